"""HeliosScheduler: the pyramid flow-matching schedule with a UniPC (bh1/bh2) or Euler solver, in JAX.

Notation: sigmas are flow-matching noise levels (x_s = (1 - s) x0 + s eps); the network predicts the velocity
v = eps - x0, so x0 = x_s - s v. Timesteps are on the 0..num_train_timesteps scale.

The module is split in two halves:

* **Host side (numpy float64).** :func:`build_stage_geometry` (global table, pyramid stage bands, renoise
  constants), :func:`calculate_shift`, the time-shift maps and ``set_timesteps``. ``set_timesteps`` returns a
  :class:`SchedulerTables`: the float64 ``timesteps`` / ``sigmas`` of one schedule plus every per-step solver
  coefficient (lambdas, expm1 terms, the 2x2 UniPC corrector solve), computed in float64 like the reference
  (float32 on the one path where the reference's sigma tensor is float32).
* **Device side (JAX, traceable).** :meth:`SchedulerTables.to_jax` gives a :class:`StepTables` pytree (float32
  copies of those tables). :func:`unipc_step` / :func:`euler_step` take an explicit :class:`SolverState` and a
  step index that may be a traced int32, so a pipeline can run a whole pyramid stage as one ``lax.fori_loop``
  inside ``jax.jit``. Only elementwise tensor arithmetic happens on device, in float32.

:class:`HeliosScheduler` ties both halves together and also offers an eager API shaped like diffusers'
(``set_timesteps(...)`` then ``step(model_output, timestep, sample).prev_sample``).

The DMD sampler of Helios-Distilled lives in :mod:`helios_jax.schedulers.dmd` and reuses the geometry, config and
table code of this module.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from helios_jax.errors import CheckpointError, InputError
from helios_jax.io.checkpoint import load_json

SCHEDULER_CONFIG_NAME = "scheduler_config.json"
TIME_SHIFT_TYPES = ("exponential", "linear")
SCHEDULER_TYPES = ("unipc", "euler", "dmd")
# diffusers maps these legacy UniPC solver names to bh2 (and rejects everything else).
_SOLVER_TYPE_ALIASES = {"bh1": "bh1", "bh2": "bh2", "midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}
# Lower clamp of the sigma that enters log() in UniPC's lambda (use_flow_sigmas).
_SIGMA_FLOOR = 1e-8
# The reference pins the end ratio of the last pyramid stage just below 1.
_LAST_END_RATIO = 0.9999999999999999


# ------------------------------------------------------------------------------------------------------------
# Shift maps (host side)
# ------------------------------------------------------------------------------------------------------------

def calculate_shift(image_seq_len: float, base_seq_len: float = 256, max_seq_len: float = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
  """Resolution-dependent shift mu: a straight line through (base_seq_len, base_shift), (max_seq_len, max_shift).

  Args:
    image_seq_len: number of noisy tokens (T * h * w / 4 for the 1x2x2 patch).
  Returns:
    mu as a Python float.
  """
  slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  intercept = base_shift - slope * base_seq_len
  return image_seq_len * slope + intercept


def _shift_map(m: float, sigmas: np.ndarray, torch_order: bool) -> np.ndarray:
  """m / (m + 1/sigma - 1) elementwise in the dtype of ``sigmas``; sigma = 0 maps to 0.

  ``torch_order``: the reference applies the maps to torch tensors, where ``scalar / tensor`` is evaluated as
  ``reciprocal(tensor) * scalar`` (two roundings); on numpy arrays (its float32 stages == 1 grid) it is one
  division. Following the right order keeps our tables bit-identical.
  """
  sigmas = np.asarray(sigmas)
  with np.errstate(divide="ignore"):
    denom = m + (1.0 / sigmas - 1.0)
    return (1.0 / denom) * m if torch_order else m / denom


def time_shift_exponential(mu: float, sigmas: np.ndarray, torch_order: bool = True) -> np.ndarray:
  """sigma -> e^mu / (e^mu + 1/sigma - 1), elementwise, in the dtype of ``sigmas`` (sigma = 0 stays 0)."""
  return _shift_map(math.exp(mu), sigmas, torch_order)


def time_shift_linear(mu: float, sigmas: np.ndarray, torch_order: bool = True) -> np.ndarray:
  """sigma -> mu / (mu + 1/sigma - 1), elementwise, in the dtype of ``sigmas`` (sigma = 0 stays 0)."""
  return _shift_map(mu, sigmas, torch_order)


def time_shift(time_shift_type: str, mu: float, sigmas: np.ndarray, torch_order: bool = True) -> np.ndarray:
  """Applies the ``exponential`` or ``linear`` shift map to a 1-D sigma array (host, dtype preserved)."""
  if time_shift_type == "exponential":
    return time_shift_exponential(mu, sigmas, torch_order)
  if time_shift_type == "linear":
    return time_shift_linear(mu, sigmas, torch_order)
  raise InputError(f"time_shift_type must be one of {TIME_SHIFT_TYPES}, got {time_shift_type!r}")


# ------------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------------------
# Pyramid geometry (host side, float64)
# ------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StageGeometry:
  """Global table and per-stage geometry, fixed at construction.

  Attributes:
    sigmas: (N,) float64, global sigmas from ~1 down to ~1/N (N = num_train_timesteps).
    timesteps: (N,) float64, N * sigmas.
    ori_start_sigmas: per stage, the global sigma at the stage start (used by the renoise constants).
    start_sigmas: per stage, the start sigma after the upsample-renoise correction (stage >= 1).
    end_sigmas: per stage, the global sigma at the stage end (0 for the last stage).
    timestep_ratios: per stage, (start, end) fraction of the total flow length.
    timesteps_per_stage: per stage, (N,) float64 timestep band (descending).
    sigmas_per_stage: per stage, (N,) float64 linspace(0.999, 0, N + 1)[:-1].
    gamma: the block-noise correlation gamma.
  """

  sigmas: np.ndarray
  timesteps: np.ndarray
  ori_start_sigmas: tuple[float, ...]
  start_sigmas: tuple[float, ...]
  end_sigmas: tuple[float, ...]
  timestep_ratios: tuple[tuple[float, float], ...]
  timesteps_per_stage: tuple[np.ndarray, ...]
  sigmas_per_stage: tuple[np.ndarray, ...]
  gamma: float

  @property
  def num_stages(self) -> int:
    return len(self.start_sigmas)

  def renoise_coefficients(self, stage_index: int) -> tuple[float, float]:
    """(alpha, beta) of the stage-start renoise ``x <- alpha * upsample(x) + beta * block_noise`` (stage >= 1).

    Uses the *uncorrected* stage start sigma, as the pyramid pipelines do.
    """
    _check_stage_index(stage_index, self.num_stages)
    if stage_index == 0:
      raise InputError("stage 0 is not renoised; renoise coefficients exist for stage_index >= 1")
    return _renoise_alpha_beta(self.ori_start_sigmas[stage_index], self.gamma)


def _renoise_alpha_beta(ori_start_sigma: float, gamma: float) -> tuple[float, float]:
  signal = 1 - ori_start_sigma
  alpha = 1 / (math.sqrt(1 + (1 / gamma)) * (1 - signal) + signal)
  beta = alpha * (1 - signal) / math.sqrt(gamma)
  return alpha, beta


def _check_stage_index(stage_index: Any, stages: int) -> int:
  if isinstance(stage_index, bool) or not isinstance(stage_index, (int, np.integer)):
    raise InputError(f"stage_index must be an integer in [0, {stages}), got {stage_index!r}")
  if not 0 <= stage_index < stages:
    raise InputError(f"stage_index {stage_index} is out of range: the scheduler has {stages} stage(s)")
  return int(stage_index)


def global_sigmas(num_train_timesteps: int, shift: float) -> np.ndarray:
  """(N,) float64 global sigmas: linspace(0, 1 - 1/N, N + 1), statically shifted, reversed, last (0) dropped."""
  n = num_train_timesteps
  s = 1.0 - np.linspace(1, 1 / n, n + 1)
  s = shift * s / (1 + (shift - 1) * s)
  return np.flip(s)[:-1].copy()


def build_stage_geometry(num_train_timesteps: int = 1000, shift: float = 1.0, stages: int = 3,
                         stage_range: Sequence[float] = (0.0, 1 / 3, 2 / 3, 1.0),
                         gamma: float = 1 / 3) -> StageGeometry:
  """Computes the global table and the pyramid stage geometry (all float64 / Python floats).

  Each stage i covers global indices [int(r_i N), int(r_{i+1} N)). Stages >= 1 start from a corrected sigma that
  accounts for the upsample + block-noise renoise; stage lengths along the flow then define each stage's share of
  the timestep axis, and each stage gets a band of N+1 linearly spaced timesteps (last dropped).
  """
  n = num_train_timesteps
  sig = global_sigmas(n, shift)
  ts = sig * n
  ori_start, start, end, dist = [], [], [], []
  for i in range(stages):
    a = max(int(stage_range[i] * n), 0)
    b = min(int(stage_range[i + 1] * n), n)
    s_start = float(sig[a])
    s_end = float(sig[b]) if b < n else 0.0
    ori_start.append(s_start)
    if i > 0:
      signal = 1 - s_start
      alpha = 1 / (math.sqrt(1 + (1 / gamma)) * (1 - signal) + signal)
      s_start = 1 - alpha * signal
    start.append(s_start)
    end.append(s_end)
    dist.append(s_start - s_end)

  total = sum(dist)
  ratios = []
  for i in range(stages):
    r0 = 0.0 if i == 0 else sum(dist[:i]) / total
    r1 = _LAST_END_RATIO if i == stages - 1 else sum(dist[:i + 1]) / total
    ratios.append((r0, r1))

  bands, stage_sigmas = [], []
  unit = np.linspace(0.999, 0, n + 1)[:-1]
  for r0, r1 in ratios:
    t_max = min(float(ts[int(r0 * n)]), 999.0)
    t_min = float(ts[min(int(r1 * n), n - 1)])
    bands.append(np.linspace(t_max, t_min, n + 1)[:-1])
    stage_sigmas.append(unit.copy())

  return StageGeometry(sigmas=sig, timesteps=ts, ori_start_sigmas=tuple(ori_start), start_sigmas=tuple(start),
                       end_sigmas=tuple(end), timestep_ratios=tuple(ratios), timesteps_per_stage=tuple(bands),
                       sigmas_per_stage=tuple(stage_sigmas), gamma=float(gamma))


def _check_steps(num_inference_steps: Any) -> int:
  if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
    raise InputError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
  if num_inference_steps <= 0:
    raise InputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
  return int(num_inference_steps)


def stage_schedule(config: PyramidSchedulerConfig, geometry: StageGeometry, num_inference_steps: int,
                   stage_index: int | None = None, mu: float | None = None, sigmas: Any = None,
                   dmd: bool = False, is_amplify_first_chunk: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.dtype]:
  """Timesteps and sigmas of one schedule (one pyramid stage, or the whole run when ``stages == 1``).

  Args:
    num_inference_steps: model calls requested for this stage (for DMD: per stage, doubled when amplified).
    stage_index: pyramid stage (required when ``config.stages > 1``, ignored when it is 1).
    mu: dynamic-shift parameter (required when ``config.use_dynamic_shifting``).
    sigmas: only for ``stages == 1``: the caller's sigma grid (one per internal step), e.g. the plain pipeline's
      ``linspace(0.999, 0, n + 1)[:-1]``. Its dtype is kept for the arithmetic, as the reference does.
    dmd: the DMD variant (n + 1 or 2n + 1 internal points; drop the last timestep and the second-to-last sigma).
  Returns:
    ``(timesteps, sigmas, dtype)``: float64 numpy arrays of shapes (n,) and (n + 1,) (n = model calls), and the
    dtype the reference holds its sigmas in (float32 only on the stages == 1 path without custom float64 sigmas;
    the values above are exactly representable in it).
  """
  steps = _check_steps(num_inference_steps)
  if dmd:
    steps = 2 * steps + 1 if is_amplify_first_chunk else steps + 1
  n_train = config.num_train_timesteps
  band = None
  if config.stages == 1:
    if sigmas is None:
      # The reference builds this grid in float32 and stays in float32 (also through the shift maps).
      sig = np.linspace(1, 1 / n_train, steps + 1)[:-1].astype(np.float32)
      if config.shift != 1.0:
        sig = time_shift(config.time_shift_type, config.shift, sig, torch_order=False).astype(np.float32)
    else:
      sig = np.asarray(sigmas)
      if sig.dtype.kind not in "fiu":
        raise InputError(f"sigmas must be a numeric array, got dtype {sig.dtype}")
      if sig.dtype != np.float32:
        sig = sig.astype(np.float64)
      if sig.ndim != 1 or sig.shape[0] != steps:
        raise InputError(f"sigmas must be a 1-D array of {steps} values, got shape {sig.shape}")
      if not np.all(np.isfinite(sig)) or np.any(sig < 0) or np.any(sig > 1):
        raise InputError("sigmas must be finite and in [0, 1]")
    ts = sig * n_train
    sig = np.concatenate([sig, np.zeros(1, sig.dtype)])
  else:
    if sigmas is not None:
      raise InputError("custom sigmas are only supported when the scheduler has stages == 1")
    if stage_index is None:
      raise InputError(f"stage_index is required: the scheduler has {config.stages} pyramid stages")
    stage_index = _check_stage_index(stage_index, config.stages)
    band = geometry.timesteps_per_stage[stage_index]
    unit = geometry.sigmas_per_stage[stage_index]
    ts = np.linspace(band[0], band[-1], steps)
    sig = np.concatenate([np.linspace(unit[0], unit[-1], steps), np.zeros(1)])

  if dmd:
    ts = ts[:-1]
    sig = np.concatenate([sig[:-2], sig[-1:]])

  if config.use_dynamic_shifting:
    if mu is None:
      raise InputError("mu is required when use_dynamic_shifting is true (see calculate_shift)")
    mu = float(mu)
    if not math.isfinite(mu):
      raise InputError(f"mu must be finite, got {mu}")
    sig = time_shift(config.time_shift_type, mu, sig)
    if band is None:
      ts = sig[:-1] * n_train
    else:
      ts = band.min() + sig[:-1] * (band.max() - band.min())
  return np.asarray(ts, np.float64), np.asarray(sig, np.float64), sig.dtype


# ------------------------------------------------------------------------------------------------------------
# Tables (host) and their device copy
# ------------------------------------------------------------------------------------------------------------

@struct.dataclass
class StepTables:
  """Device copy of a :class:`SchedulerTables`: a pytree of float32/int32/bool jnp arrays (pass it into jit).

  Attributes:
    sigmas: (n + 1,) float32.
    timesteps: (n,) float32.
    model_timesteps: (n,) int32, timesteps truncated toward zero on the host (what the pyramid pipelines feed
      the transformer).
    coef: per-step solver coefficients, each (n,) (names depend on ``kind``).
    kind: "unipc" | "euler" | "dmd" (static).
  """

  sigmas: jax.Array
  timesteps: jax.Array
  model_timesteps: jax.Array
  coef: dict[str, jax.Array]
  kind: str = struct.field(pytree_node=False, default="unipc")

  @property
  def num_steps(self) -> int:
    return self.timesteps.shape[0]


@dataclasses.dataclass(frozen=True, eq=False)
class SchedulerTables:
  """Host result of ``set_timesteps``: one schedule plus its precomputed per-step solver coefficients.

  Attributes:
    kind: "unipc" | "euler" | "dmd".
    timesteps: (n,) float64, one per model call (the reference's ``scheduler.timesteps``).
    sigmas: (n + 1,) float64, ending with 0 (the reference's ``scheduler.sigmas``).
    stage_index: the pyramid stage, or None.
    mu: the dynamic-shift parameter used, or None.
    coef: name -> (n,) numpy array (float64 coefficients, bool/int flags).
  """

  kind: str
  timesteps: np.ndarray
  sigmas: np.ndarray
  stage_index: int | None
  mu: float | None
  coef: Mapping[str, np.ndarray]

  @property
  def num_steps(self) -> int:
    return int(self.timesteps.shape[0])

  @property
  def model_timesteps(self) -> np.ndarray:
    """(n,) int64: timesteps truncated toward zero, as ``t.to(torch.int64)`` does in the pyramid pipelines."""
    return np.trunc(self.timesteps).astype(np.int64)

  def to_jax(self) -> StepTables:
    """float32 / int32 / bool device copies (float64 values are rounded once, on the host)."""
    def dev(a: np.ndarray) -> jax.Array:
      a = np.asarray(a)
      if a.dtype.kind == "f":
        a = a.astype(np.float32)
      elif a.dtype.kind in "iu":
        a = a.astype(np.int32)
      return jnp.asarray(a)
    return StepTables(sigmas=dev(self.sigmas), timesteps=dev(self.timesteps),
                      model_timesteps=dev(self.model_timesteps), coef={k: dev(v) for k, v in self.coef.items()},
                      kind=self.kind)


def _alpha_sigma(sig: np.ndarray, use_flow_sigmas: bool) -> tuple[np.ndarray, np.ndarray]:
  if use_flow_sigmas:
    return 1.0 - sig, np.maximum(sig, sig.dtype.type(_SIGMA_FLOOR))
  alpha = 1.0 / np.sqrt(sig ** 2 + 1.0)
  return alpha, sig * alpha


def _log(x: np.ndarray) -> np.ndarray:
  """log in the dtype of ``x``, evaluated in float64 and rounded once.

  Only matters for float32 input (the reference's float32-only stages == 1 path): torch's float32 log is within
  an ulp of this but not always equal, and lambda differences cancel, so that path agrees to ~2e-5 only.
  """
  x = np.asarray(x)
  return np.log(x.astype(np.float64)).astype(x.dtype)


def _expm1(x: Any) -> Any:
  """expm1 in the dtype of ``x``, evaluated in float64 and rounded once (see :func:`_log`)."""
  x = np.asarray(x)
  return np.expm1(x.astype(np.float64)).astype(x.dtype)


def unipc_coefficients(sigmas: np.ndarray, solver_type: str = "bh2", solver_order: int = 2,
                       lower_order_final: bool = True, disable_corrector: Sequence[int] = (),
                       use_flow_sigmas: bool = True, dtype: Any = np.float64) -> dict[str, np.ndarray]:
  """Per-step scalars of UniPC (predict-x0, B(h) = h for bh1, expm1(h) for bh2), in ``dtype``.

  ``dtype`` is the dtype of the reference's sigma tensor, in which it does all of this scalar arithmetic: float64
  for every pipeline schedule, float32 on the stages == 1 path without custom sigmas.

  For step k (n steps, sigmas of shape (n + 1,)) with lambda(s) = log(alpha_s) - log(sigma_s):

  * predictor k -> k+1: ``x_{k+1} = pred_ratio*x - pred_m*x0_k - pred_b * 0.5 * (x0_{k-1} - x0_k) / pred_rk``
    (the last term only at order 2);
  * corrector k-1 -> k (k >= 1): ``x_k = corr_ratio*x_{k-1} - corr_m*x0_{k-1} - corr_b * R`` with
    ``R = 0.5 * (x0_k - x0_{k-1})`` at order 1 and
    ``R = corr_rho_a * (x0_{k-2} - x0_{k-1}) / corr_rk + corr_rho_b * (x0_k - x0_{k-1})`` at order 2;
  * ``max_order[k]``: order cap from lower_order_final; ``corr_enabled[k]``: k >= 1 and k-1 not disabled.

  Entries that a step never reads are filled with harmless finite values (0, or 1 for the divisors).
  """
  dtype = np.dtype(dtype)
  sig = np.asarray(sigmas).astype(dtype)
  n = sig.shape[0] - 1
  alpha, sig_c = _alpha_sigma(sig, use_flow_sigmas)
  with np.errstate(divide="ignore"):
    lam = _log(alpha) - _log(sig_c)

  def segment(s: int, t: int):
    """(ratio, m, b, hh, phi1, B) of the exponential-integrator step from index s to t."""
    h = lam[t] - lam[s]
    hh = -h
    phi1 = _expm1(hh)
    b_h = hh if solver_type == "bh1" else _expm1(hh)
    return sig_c[t] / sig_c[s], alpha[t] * phi1, alpha[t] * b_h, h, hh, phi1, b_h

  out = {name: np.zeros(n, dtype) for name in ("pred_ratio", "pred_m", "pred_b", "corr_ratio", "corr_m",
                                               "corr_b", "corr_rho_a", "corr_rho_b")}
  out["pred_rk"] = np.ones(n, dtype)
  out["corr_rk"] = np.ones(n, dtype)
  for k in range(n):
    ratio, m, b, h, _, _, _ = segment(k, k + 1)
    out["pred_ratio"][k], out["pred_m"][k], out["pred_b"][k] = ratio, m, b
    if k >= 1:
      out["pred_rk"][k] = (lam[k - 1] - lam[k]) / h
      ratio, m, b, h, hh, phi1, b_h = segment(k - 1, k)
      out["corr_ratio"][k], out["corr_m"][k], out["corr_b"][k] = ratio, m, b
    if k >= 2:
      rk = (lam[k - 2] - lam[k - 1]) / h
      g1 = phi1 / hh - 1
      g2 = g1 / hh - 0.5
      rhs = np.array([g1 * 1 / b_h, g2 * 2 / b_h], dtype)
      rho = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]], dtype), rhs)
      out["corr_rk"][k], out["corr_rho_a"][k], out["corr_rho_b"][k] = rk, rho[0], rho[1]
  steps = np.arange(n)
  if lower_order_final:
    out["max_order"] = np.minimum(solver_order, n - steps).astype(np.int64)
  else:
    out["max_order"] = np.full(n, solver_order, np.int64)
  disabled = set(int(d) for d in disable_corrector)
  out["corr_enabled"] = np.array([k >= 1 and (k - 1) not in disabled for k in range(n)], bool)
  return out


def euler_coefficients(sigmas: np.ndarray) -> dict[str, np.ndarray]:
  """``sigma_delta[k] = sigmas[k + 1] - sigmas[k]`` in float64, shape (n,)."""
  sig = np.asarray(sigmas, np.float64)
  return {"sigma_delta": sig[1:] - sig[:-1]}


# ------------------------------------------------------------------------------------------------------------
# Solver state and the traceable step functions
# ------------------------------------------------------------------------------------------------------------

class SolverState(NamedTuple):
  """UniPC / Euler solver state (a pytree; use it as a ``fori_loop`` / ``scan`` carry).

  Attributes:
    x0_last: (*sample.shape) newest converted output x0_{k-1} (the FIFO's newest slot).
    x0_prev: (*sample.shape) the one before, x0_{k-2}.
    last_sample: (*sample.shape) the (corrected) sample the last predictor started from.
    this_order: int32 scalar, the order the last predictor used (the next corrector reuses it).
    lower_order_nums: int32 scalar, steps taken so far, capped at 2 (0 means "no history yet").
    step_index: int32 scalar, index of the next step.
  """

  x0_last: jax.Array
  x0_prev: jax.Array
  last_sample: jax.Array
  this_order: jax.Array
  lower_order_nums: jax.Array
  step_index: jax.Array


def init_solver_state(sample: jax.Array, model_dtype: Any = None) -> SolverState:
  """Fresh state (what ``set_timesteps`` resets in the reference).

  Args:
    sample: (B, C, T, H, W) (any shape) the latent the schedule starts from.
    model_dtype: dtype of the model outputs; the x0 history uses the promotion of it with ``sample.dtype``
      (float32 for the pipelines' float32 latents). Defaults to ``sample.dtype``.
  """
  sample = jnp.asarray(sample)
  x0_dtype = jnp.promote_types(sample.dtype, model_dtype if model_dtype is not None else sample.dtype)
  zeros = jnp.zeros(sample.shape, x0_dtype)
  zero = jnp.zeros((), jnp.int32)
  return SolverState(x0_last=zeros, x0_prev=zeros, last_sample=jnp.zeros_like(sample), this_order=zero,
                     lower_order_nums=zero, step_index=zero)


def flow_to_x0(model_output: jax.Array, sample: jax.Array, sigma: jax.Array) -> jax.Array:
  """x0 = sample - sigma * v with the reference's rounding.

  The reference multiplies a 0-dim float64 sigma tensor into the model output *in the model output's dtype* (a
  0-dim tensor does not promote): sigma itself is first rounded to that dtype (bf16 in the pipelines), the product
  is formed in float32 and rounded to that dtype again, then subtracted from the float32 sample. We do the same
  three roundings (verified against torch bit for bit). Result dtype: the promotion of the two input dtypes.
  """
  out_dtype = jnp.promote_types(sample.dtype, model_output.dtype)
  sigma = sigma.astype(model_output.dtype).astype(jnp.float32)
  prod = (sigma * model_output.astype(jnp.float32)).astype(model_output.dtype)
  return (sample.astype(jnp.float32) - prod.astype(jnp.float32)).astype(out_dtype)


def _index(step_index: Any, state: SolverState | None) -> jax.Array:
  if step_index is None:
    return state.step_index
  return jnp.asarray(step_index, jnp.int32)


def unipc_step(state: SolverState, model_output: jax.Array, sample: jax.Array, tables: StepTables,
               step_index: Any = None) -> tuple[jax.Array, SolverState]:
  """One UniPC predictor-corrector step (flow prediction, predict-x0), traceable.

  Args:
    state: from :func:`init_solver_state` or the previous call.
    model_output: (*shape) velocity v_k predicted at ``sample`` (any float dtype; bf16 in the pipelines).
    sample: (*shape) x_k (float32 in the pipelines).
    tables: ``set_timesteps(...).to_jax()`` of kind "unipc".
    step_index: k, a Python int or (traced) int32 scalar; defaults to ``state.step_index``.
  Returns:
    ``(x_{k+1}, new_state)``; x_{k+1} has ``sample.dtype``.

  Precision: every scalar coefficient was computed on the host in float64 and rounded once to float32, which is
  exactly what the reference does when it multiplies a 0-dim float64 tensor into a float32 tensor; the tensor
  arithmetic (differences, the D1 divisions, the einsum-like sums) runs in float32 in the reference's order.
  Both corrector orders and both predictor orders are evaluated and selected with ``jnp.where``.
  """
  k = _index(step_index, state)
  c = tables.coef
  f32 = jnp.float32
  x0 = flow_to_x0(model_output, sample, tables.sigmas[k])
  x0_f = x0.astype(f32)
  m0 = state.x0_last.astype(f32)       # x0_{k-1}
  m1 = state.x0_prev.astype(f32)       # x0_{k-2}
  last = state.last_sample.astype(f32)

  # Corrector from k-1 to k (order = the previous predictor's order).
  base = c["corr_ratio"][k] * last - c["corr_m"][k] * m0
  d1_t = x0_f - m0
  corr1 = base - c["corr_b"][k] * (0.5 * d1_t)
  d1 = (m1 - m0) / c["corr_rk"][k]
  corr2 = base - c["corr_b"][k] * (c["corr_rho_a"][k] * d1 + c["corr_rho_b"][k] * d1_t)
  corrected = jnp.where(state.this_order >= 2, corr2, corr1).astype(sample.dtype)
  use_corrector = c["corr_enabled"][k] & (state.lower_order_nums > 0)
  x_c = jnp.where(use_corrector, corrected, sample)

  # Predictor from k to k+1 (warm-up: order <= steps taken + 1; lower_order_final via max_order).
  order = jnp.minimum(c["max_order"][k], state.lower_order_nums + 1).astype(jnp.int32)
  xc_f = x_c.astype(f32)
  pred1 = c["pred_ratio"][k] * xc_f - c["pred_m"][k] * x0_f
  d1_p = (m0 - x0_f) / c["pred_rk"][k]
  pred2 = pred1 - c["pred_b"][k] * (0.5 * d1_p)
  prev = jnp.where(order >= 2, pred2, pred1).astype(sample.dtype)

  new_state = SolverState(
      x0_last=x0.astype(state.x0_last.dtype), x0_prev=state.x0_last, last_sample=x_c.astype(state.last_sample.dtype),
      this_order=order, lower_order_nums=jnp.minimum(state.lower_order_nums + 1, 2).astype(jnp.int32),
      step_index=(k + 1).astype(jnp.int32))
  return prev, new_state


def euler_step(state: SolverState, model_output: jax.Array, sample: jax.Array, tables: StepTables,
               step_index: Any = None) -> tuple[jax.Array, SolverState]:
  """One flow-matching Euler step ``x + (sigma_{k+1} - sigma_k) * v``, traceable.

  Returns ``(x_{k+1}, new_state)`` with x_{k+1} in ``model_output.dtype``, as the reference casts it. The
  reference forms (dsigma * v) in the model output's dtype (a 0-dim float64 tensor does not promote, so dsigma is
  rounded to that dtype, e.g. bf16, and so is the product) and adds it to the float32 sample; we round the same
  way. Inside a ``fori_loop`` with a float32 carry and bf16 model outputs, cast the result back to the carry dtype
  (the values are bf16-exact).
  """
  k = _index(step_index, state)
  delta = tables.coef["sigma_delta"][k].astype(model_output.dtype).astype(jnp.float32)
  prod = (delta * model_output.astype(jnp.float32)).astype(model_output.dtype)
  prev = (sample.astype(jnp.float32) + prod.astype(jnp.float32)).astype(model_output.dtype)
  new_state = state._replace(step_index=(k + 1).astype(jnp.int32),
                             lower_order_nums=jnp.minimum(state.lower_order_nums + 1, 2).astype(jnp.int32))
  return prev, new_state


def helios_step(state: SolverState, model_output: jax.Array, sample: jax.Array, tables: StepTables,
                step_index: Any = None) -> tuple[jax.Array, SolverState]:
  """Dispatches on ``tables.kind`` (static): :func:`unipc_step` or :func:`euler_step`."""
  if tables.kind == "unipc":
    return unipc_step(state, model_output, sample, tables, step_index)
  if tables.kind == "euler":
    return euler_step(state, model_output, sample, tables, step_index)
  raise InputError(f"tables of kind {tables.kind!r} cannot be stepped by HeliosScheduler; use HeliosDMDScheduler")


_jit_helios_step = jax.jit(helios_step)


# ------------------------------------------------------------------------------------------------------------
# Scheduler classes
# ------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SchedulerOutput:
  """Eager step result, shaped like diffusers' output (``.prev_sample``)."""

  prev_sample: jax.Array


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


class HeliosScheduler(PyramidScheduler):
  """Helios pyramid scheduler with the UniPC (default) or Euler solver.

  Usage inside jit (one pyramid stage)::

      tables = scheduler.set_timesteps(20, stage_index=i, mu=mu)
      tab = tables.to_jax()
      state = scheduler.init_state(x)

      def body(k, carry):
        x, state = carry
        v = model(x, tab.model_timesteps[k])
        return HeliosScheduler.pure_step(state, v, x, tab, k)

      x, state = jax.lax.fori_loop(0, tables.num_steps, body, (x, state))

  Eager, diffusers-like: ``scheduler.set_timesteps(...)`` then ``scheduler.step(v, t, x).prev_sample`` per step.
  """

  config_class = HeliosSchedulerConfig
  order = 1

  def __init__(self, config: HeliosSchedulerConfig | None = None):
    super().__init__(config)
    self._state: SolverState | None = None
    self._jtables: StepTables | None = None
    self._step_index = 0

  @property
  def kind(self) -> str:
    return self.config.scheduler_type

  def set_timesteps(self, num_inference_steps: int, stage_index: int | None = None, mu: float | None = None,
                    sigmas: Any = None, is_amplify_first_chunk: bool = False) -> SchedulerTables:
    """Builds the schedule of one stage (host, float64) and resets the solver state.

    Args:
      num_inference_steps: model calls (for ``scheduler_type='dmd'``: per stage, doubled when amplified).
      stage_index: pyramid stage in [0, stages) (required when stages > 1).
      mu: dynamic-shift parameter (required when use_dynamic_shifting).
      sigmas: (n,) custom sigma grid, only for stages == 1.
      is_amplify_first_chunk: DMD only: 2n steps instead of n.
    Returns:
      :class:`SchedulerTables` (also kept as ``self.tables``; ``self.timesteps`` / ``self.sigmas`` mirror it).
    Raises:
      InputError: steps <= 0, stage_index missing or out of range, mu missing, bad sigmas.
    """
    cfg = self.config
    dmd = cfg.scheduler_type == "dmd"
    ts, sig, work_dtype = stage_schedule(cfg, self.geometry, num_inference_steps, stage_index, mu, sigmas,
                                         dmd=dmd, is_amplify_first_chunk=is_amplify_first_chunk and dmd)
    if cfg.scheduler_type == "unipc":
      coef = unipc_coefficients(sig, cfg.solver_type, cfg.solver_order, cfg.lower_order_final,
                                cfg.disable_corrector, cfg.use_flow_sigmas, dtype=work_dtype)
    elif cfg.scheduler_type == "euler":
      coef = euler_coefficients(sig)
    else:
      from helios_jax.schedulers.dmd import dmd_coefficients  # pylint: disable=import-outside-toplevel
      coef = dmd_coefficients(ts, sig)
    self.tables = SchedulerTables(kind=cfg.scheduler_type, timesteps=ts, sigmas=sig,
                                  stage_index=None if cfg.stages == 1 else int(stage_index),
                                  mu=None if mu is None else float(mu), coef=coef)
    self._jtables = None
    self._state = None
    self._step_index = 0
    return self.tables

  @staticmethod
  def init_state(sample: jax.Array, model_dtype: Any = None) -> SolverState:
    """Fresh solver state for a schedule starting at ``sample`` (see :func:`init_solver_state`)."""
    return init_solver_state(sample, model_dtype)

  pure_step = staticmethod(helios_step)
  """``pure_step(state, model_output, sample, tables, step_index=None) -> (prev_sample, new_state)``."""

  def step(self, model_output: jax.Array, timestep: Any = None, sample: jax.Array = None,
           return_dict: bool = True) -> SchedulerOutput | tuple[jax.Array]:
    """Eager step mirroring diffusers: uses the internal step counter (``timestep`` is not used for lookup).

    Args:
      model_output: (*shape) velocity at ``sample``.
      timestep: the current timestep (accepted for signature compatibility).
      sample: (*shape) current latent.
    """
    if self.tables is None:
      raise InputError("call set_timesteps before step")
    if self.tables.kind == "dmd":
      raise InputError("scheduler_type 'dmd' is stepped by HeliosDMDScheduler (see scheduler_from_config)")
    if sample is None:
      raise InputError("step needs the current sample")
    if self._step_index >= self.tables.num_steps:
      raise InputError(f"all {self.tables.num_steps} steps of this schedule were taken; call set_timesteps again")
    model_output = jnp.asarray(model_output)
    sample = jnp.asarray(sample)
    if model_output.shape != sample.shape:
      raise InputError(f"model_output shape {model_output.shape} does not match sample shape {sample.shape}")
    if self._jtables is None:
      self._jtables = self.tables.to_jax()
    if self._state is None:
      self._state = init_solver_state(sample, model_output.dtype)
    prev, self._state = _jit_helios_step(self._state, model_output, sample, self._jtables,
                                         jnp.int32(self._step_index))
    self._step_index += 1
    if not return_dict:
      return (prev,)
    return SchedulerOutput(prev_sample=prev)

  @property
  def step_index(self) -> int:
    return self._step_index

  def __len__(self) -> int:
    return self.config.num_train_timesteps
