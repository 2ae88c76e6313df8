"""Pyramid stage geometry (host side, float64): the global sigma table, each stage's band and renoise constants
(:func:`build_stage_geometry`) and the timesteps / sigmas of one stage (:func:`stage_schedule`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from helios_jax.errors import InputError
from helios_jax.schedulers.config import PyramidSchedulerConfig
from helios_jax.schedulers.shift import time_shift

# The reference pins the end ratio of the last pyramid stage just below 1.
_LAST_END_RATIO = 0.9999999999999999


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
