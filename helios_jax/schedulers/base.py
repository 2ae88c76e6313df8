"""What both Helios schedulers share: :class:`PyramidScheduler` (config, geometry, shift helpers, construction
from JSON) and the eager :class:`SchedulerOutput`."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from helios_jax.errors import CheckpointError, InputError
from helios_jax.schedulers.config import SCHEDULER_CONFIG_NAME, PyramidSchedulerConfig, read_scheduler_config
from helios_jax.schedulers.pyramid import build_stage_geometry
from helios_jax.schedulers.shift import calculate_shift, time_shift
from helios_jax.schedulers.tables import SchedulerTables


@dataclasses.dataclass
class SchedulerOutput:
  """Eager step result, shaped like diffusers' output (``.prev_sample``)."""

  prev_sample: jax.Array


class PyramidScheduler:
  """Shared part of both Helios schedulers: config, geometry, shift helpers, construction from JSON."""

  config_class: type[PyramidSchedulerConfig] = PyramidSchedulerConfig

  def __init__(self, config: PyramidSchedulerConfig | None = None):
    self.config = config if config is not None else self.config_class()
    if not isinstance(self.config, self.config_class):
      raise InputError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
    cfg = self.config
    self.geometry = build_stage_geometry(cfg.num_train_timesteps, cfg.shift, cfg.stages, cfg.stage_range, cfg.gamma)
    self.tables: SchedulerTables | None = None

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | PyramidSchedulerConfig | None = None, **overrides):
    """Builds the scheduler from a ``scheduler_config.json`` dict (unknown keys kept) plus keyword overrides."""
    if isinstance(config, PyramidSchedulerConfig):
      config = config.to_dict()
    merged = dict(config or {})
    merged.update(overrides)
    return cls(cls.config_class.from_dict(merged))

  @classmethod
  def from_pretrained(cls, folder: str):
    """Reads ``folder/scheduler_config.json`` or ``folder/scheduler/scheduler_config.json``.

    Raises:
      CheckpointError: missing/corrupt file, or a value the scheduler does not support.
    """
    raw = read_scheduler_config(folder)
    try:
      return cls.from_config(raw)
    except InputError as e:
      raise CheckpointError(f"bad scheduler config in {folder}: {e}") from None

  def save_pretrained(self, folder: str) -> str:
    """Writes ``folder/scheduler_config.json`` (the config's fields and kept keys, ``_class_name`` = this class)
    that :meth:`from_pretrained` and diffusers read. Returns the file's path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, SCHEDULER_CONFIG_NAME)
    config = {"_diffusers_version": "0.42.1", **self.config.to_dict(), "_class_name": type(self).__name__}
    with open(path, "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    return path

  # -- geometry accessors (names as in diffusers) --
  @property
  def ori_start_sigmas(self) -> tuple[float, ...]:
    return self.geometry.ori_start_sigmas

  @property
  def start_sigmas(self) -> tuple[float, ...]:
    return self.geometry.start_sigmas

  @property
  def end_sigmas(self) -> tuple[float, ...]:
    return self.geometry.end_sigmas

  @property
  def timestep_ratios(self) -> tuple[tuple[float, float], ...]:
    return self.geometry.timestep_ratios

  @property
  def timesteps_per_stage(self) -> tuple[np.ndarray, ...]:
    return self.geometry.timesteps_per_stage

  @property
  def sigmas_per_stage(self) -> tuple[np.ndarray, ...]:
    return self.geometry.sigmas_per_stage

  @property
  def timesteps(self) -> np.ndarray:
    """(n,) float64 timesteps of the last ``set_timesteps`` (global table before any call)."""
    return self.tables.timesteps if self.tables is not None else self.geometry.timesteps

  @property
  def sigmas(self) -> np.ndarray:
    """(n + 1,) float64 sigmas of the last ``set_timesteps`` (global table before any call)."""
    return self.tables.sigmas if self.tables is not None else self.geometry.sigmas

  def renoise_coefficients(self, stage_index: int) -> tuple[float, float]:
    """(alpha, beta) for ``x <- alpha * upsample(x) + beta * block_noise`` at the start of stage >= 1."""
    return self.geometry.renoise_coefficients(stage_index)

  def calculate_shift(self, image_seq_len: float) -> float:
    """mu for ``image_seq_len`` tokens, with base/max shift and lengths read like ``config.get`` in diffusers."""
    cfg = self.config
    return calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                           cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))

  def time_shift(self, mu: float, sigmas: np.ndarray) -> np.ndarray:
    """The configured time-shift map (host, dtype preserved)."""
    return time_shift(self.config.time_shift_type, mu, sigmas)
