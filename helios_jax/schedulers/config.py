"""Scheduler configs: JSON coercion, :class:`PyramidSchedulerConfig` (fields both Helios schedulers share),
:class:`HeliosSchedulerConfig` (UniPC / Euler) and reading ``scheduler_config.json`` from a folder."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from helios_jax.errors import CheckpointError, InputError
from helios_jax.io.checkpoint import load_json
from helios_jax.schedulers.shift import TIME_SHIFT_TYPES

SCHEDULER_CONFIG_NAME = "scheduler_config.json"
SCHEDULER_TYPES = ("unipc", "euler", "dmd")
# diffusers maps these legacy UniPC solver names to bh2 (and rejects everything else).
_SOLVER_TYPE_ALIASES = {"bh1": "bh1", "bh2": "bh2", "midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}


def _as_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise InputError(f"scheduler config {name!r} must be an integer, got {value!r}")
  if float(value) != int(value):
    raise InputError(f"scheduler config {name!r} must be an integer, got {value!r}")
  return int(value)


def _as_float(name: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise InputError(f"scheduler config {name!r} must be a number, got {value!r}")
  return float(value)


def _as_bool(name: str, value: Any) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise InputError(f"scheduler config {name!r} must be true or false, got {value!r}")
  return bool(value)


def _as_str(name: str, value: Any) -> str:
  if not isinstance(value, str):
    raise InputError(f"scheduler config {name!r} must be a string, got {value!r}")
  return value


def _as_float_tuple(name: str, value: Any) -> tuple[float, ...]:
  if not isinstance(value, (list, tuple, np.ndarray)):
    raise InputError(f"scheduler config {name!r} must be a list of numbers, got {value!r}")
  return tuple(_as_float(name, v) for v in value)


def _as_int_tuple(name: str, value: Any) -> tuple[int, ...]:
  if not isinstance(value, (list, tuple, np.ndarray)):
    raise InputError(f"scheduler config {name!r} must be a list of integers, got {value!r}")
  return tuple(_as_int(name, v) for v in value)


def _as_none(name: str, value: Any) -> None:
  if value is not None:
    raise InputError(f"scheduler config {name!r} is not supported (must be null), got {value!r}")
  return None


_COERCE = {int: _as_int, float: _as_float, bool: _as_bool, str: _as_str,
           "floats": _as_float_tuple, "ints": _as_int_tuple, None: _as_none}


@dataclasses.dataclass(frozen=True)
class PyramidSchedulerConfig:
  """Fields shared by both Helios schedulers (the pyramid geometry and the shift). Built by :meth:`from_dict`.

  ``extra`` keeps every key of the JSON that is not a field (``_class_name``, ``base_shift``, ``max_shift``,
  ``base_image_seq_len``, ``max_image_seq_len``, ...): diffusers keeps such keys in ``scheduler.config`` and the
  pipelines read them with ``config.get``, so :meth:`get` does the same.
  """

  num_train_timesteps: int = 1000
  shift: float = 1.0
  stages: int = 3
  stage_range: tuple[float, ...] = (0.0, 1 / 3, 2 / 3, 1.0)
  gamma: float = 1 / 3
  prediction_type: str = "flow_prediction"
  use_flow_sigmas: bool = True
  use_dynamic_shifting: bool = False
  time_shift_type: str = "exponential"
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  # How each field is coerced from JSON.
  _KINDS = {"num_train_timesteps": int, "shift": float, "stages": int, "stage_range": "floats", "gamma": float,
            "prediction_type": str, "use_flow_sigmas": bool, "use_dynamic_shifting": bool, "time_shift_type": str}

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]):
    """Builds the config from a ``scheduler_config.json`` dict; unknown keys go to ``extra``.

    Raises:
      InputError: a known key has a value of the wrong type or outside what the scheduler supports.
    """
    if not isinstance(config, Mapping):
      raise InputError(f"scheduler config must be a dict, got {type(config).__name__}")
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    kwargs, extra = {}, {}
    for key, value in config.items():
      if key in names:
        kwargs[key] = _COERCE[cls._KINDS[key]](key, value)
      else:
        extra[key] = value
    return cls(**kwargs, extra=extra)

  def __post_init__(self):
    self._validate()

  def _validate(self):
    n = self.num_train_timesteps
    if n < 2:
      raise InputError(f"num_train_timesteps must be >= 2, got {n}")
    if self.stages < 1:
      raise InputError(f"stages must be >= 1, got {self.stages}")
    # Only the first stages + 1 entries are used (diffusers keeps the 4-entry default when stages == 1).
    if len(self.stage_range) < self.stages + 1:
      raise InputError(f"stage_range needs at least stages + 1 = {self.stages + 1} entries, "
                       f"got {list(self.stage_range)}")
    r = self.stage_range[:self.stages + 1]
    if any(not 0.0 <= v <= 1.0 for v in r) or any(b < a for a, b in zip(r[:-1], r[1:])):
      raise InputError(f"stage_range must be non-decreasing values in [0, 1], got {list(self.stage_range)}")
    if any(int(v * n) >= n for v in r[:-1]):
      raise InputError(f"every stage of stage_range {list(self.stage_range)} must start below 1")
    if not self.gamma > 0:
      raise InputError(f"gamma must be > 0, got {self.gamma}")
    if not self.shift > 0:
      raise InputError(f"shift must be > 0, got {self.shift}")
    if self.time_shift_type not in TIME_SHIFT_TYPES:
      raise InputError(f"time_shift_type must be one of {TIME_SHIFT_TYPES}, got {self.time_shift_type!r}")
    if self.prediction_type != "flow_prediction":
      raise InputError(f"prediction_type {self.prediction_type!r} is not supported (only 'flow_prediction')")
    if self.use_dynamic_shifting and self.shift != 1.0:
      raise InputError(f"use_dynamic_shifting requires shift == 1.0, got shift={self.shift}")

  def get(self, key: str, default: Any = None) -> Any:
    """Like diffusers' ``scheduler.config.get``: a field, else a key kept from the JSON, else ``default``."""
    if key != "extra" and key in {f.name for f in dataclasses.fields(self)}:
      return getattr(self, key)
    return self.extra.get(key, default)

  def to_dict(self) -> dict[str, Any]:
    """The config as a JSON-ready dict (fields and kept keys)."""
    out = dict(self.extra)
    for f in dataclasses.fields(self):
      if f.name != "extra":
        v = getattr(self, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


@dataclasses.dataclass(frozen=True)
class HeliosSchedulerConfig(PyramidSchedulerConfig):
  """Config of :class:`HeliosScheduler` (diffusers defaults; ``time_shift_type`` defaults to exponential).

  Supported subset: ``prediction_type='flow_prediction'``, ``predict_x0=True``, ``thresholding=False``,
  ``solver_p=None``, ``solver_order`` 1 or 2.
  """

  thresholding: bool = False
  solver_order: int = 2
  predict_x0: bool = True
  solver_type: str = "bh2"
  lower_order_final: bool = True
  disable_corrector: tuple[int, ...] = ()
  solver_p: None = None
  scheduler_type: str = "unipc"

  _KINDS = {**PyramidSchedulerConfig._KINDS, "thresholding": bool, "solver_order": int, "predict_x0": bool,
            "solver_type": str, "lower_order_final": bool, "disable_corrector": "ints", "solver_p": None,
            "scheduler_type": str}

  def _validate(self):
    super()._validate()
    if self.scheduler_type not in SCHEDULER_TYPES:
      raise InputError(f"unknown scheduler_type {self.scheduler_type!r}; expected one of {SCHEDULER_TYPES}")
    if self.solver_type not in _SOLVER_TYPE_ALIASES:
      raise InputError(f"solver_type {self.solver_type!r} is not implemented (bh1 or bh2)")
    object.__setattr__(self, "solver_type", _SOLVER_TYPE_ALIASES[self.solver_type])
    if self.solver_order not in (1, 2):
      raise InputError(f"solver_order {self.solver_order} is not supported (1 or 2)")
    if not self.predict_x0:
      raise InputError("predict_x0=False is not supported with flow_prediction")
    if self.thresholding:
      raise InputError("thresholding is not supported by the flow-matching Helios scheduler")


def read_scheduler_config(folder: str) -> dict:
  """Reads ``folder/scheduler_config.json`` or ``folder/scheduler/scheduler_config.json``.

  Raises:
    CheckpointError: the folder or the file is missing, or the file is not a JSON object.
  """
  if not os.path.isdir(folder):
    raise CheckpointError(f"scheduler folder not found: {folder}")
  path = os.path.join(folder, SCHEDULER_CONFIG_NAME)
  if not os.path.isfile(path):
    nested = os.path.join(folder, "scheduler", SCHEDULER_CONFIG_NAME)
    if os.path.isfile(nested):
      path = nested
    else:
      raise CheckpointError(f"missing {SCHEDULER_CONFIG_NAME}: neither {path} nor {nested} exists")
  config = load_json(path, SCHEDULER_CONFIG_NAME)
  if not isinstance(config, dict):
    raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
  return config
