"""HeliosDMDScheduler: the few-step sampler of Helios-Distilled, in JAX.

Each model call predicts a velocity v at timestep t; the sampler turns it into a clean estimate
x0 = x - sigma(t) * v and, unless it is the last call of the stage, re-noises x0 *toward the latent the stage
started from* (``noisy_start``, not fresh noise): x_next = (1 - sigma') * x0 + sigma' * noisy_start, with sigma'
the sigma of the next timestep. The last call of a stage returns x0 itself.

Schedule (host, float64; :mod:`helios_jax.schedulers.pyramid`, shared with the UniPC scheduler): a stage with n requested calls is built
with m = n + 1 points (m = 2n + 1 for the amplified first chunk), then the last timestep and the second-to-last
sigma are dropped, giving n (or 2n) timesteps and n + 1 (or 2n + 1) sigmas ending with 0; dynamic shifting then
applies as in the UniPC scheduler. Sigma look-ups go through ``argmin |timesteps - trunc(t)|`` like the
reference, which truncates the timestep to an integer first.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.errors import InputError
from helios_jax.schedulers.base import PyramidScheduler, SchedulerOutput
from helios_jax.schedulers.config import PyramidSchedulerConfig
from helios_jax.schedulers.pyramid import stage_schedule
from helios_jax.schedulers.tables import SchedulerTables, StepTables


@dataclasses.dataclass(frozen=True)
class HeliosDMDSchedulerConfig(PyramidSchedulerConfig):
  """Config of :class:`HeliosDMDScheduler` (diffusers defaults; note ``time_shift_type`` defaults to linear).

  A ``scheduler_type`` key in the JSON (the official repo writes ``"dmd"``) is kept in ``extra``.
  """

  time_shift_type: str = "linear"

  def _validate(self):
    super()._validate()
    stype = self.extra.get("scheduler_type", "dmd")
    if stype != "dmd":
      raise InputError(f"HeliosDMDScheduler got scheduler_type {stype!r}; use HeliosScheduler for unipc/euler")


def _nearest_index(timesteps: np.ndarray, t: float) -> int:
  """argmin |timesteps - trunc(t)| (first minimum), as the reference looks sigmas up."""
  return int(np.argmin(np.abs(timesteps - float(np.trunc(t)))))


def dmd_coefficients(timesteps: np.ndarray, sigmas: np.ndarray) -> dict[str, np.ndarray]:
  """Per-call sigmas of the DMD sampler, float64, each of shape (n,).

  * ``step_sigma[i]``: sigma of call i (looked up from trunc(timesteps[i])).
  * ``renoise_sigma[i]``: sigma' used to re-noise after call i (looked up from trunc(timesteps[i + 1]));
    0 for the last call, which does not re-noise.
  * ``renoise_keep[i]``: 1 - renoise_sigma[i] (formed in float64 as the reference does).
  """
  ts = np.asarray(timesteps, np.float64)
  sig = np.asarray(sigmas, np.float64)
  n = ts.shape[0]
  step_sigma = np.array([sig[_nearest_index(ts, ts[i])] for i in range(n)])
  renoise = np.array([sig[_nearest_index(ts, ts[i + 1])] if i + 1 < n else 0.0 for i in range(n)])
  return {"step_sigma": step_sigma, "renoise_sigma": renoise, "renoise_keep": 1.0 - renoise}


def dmd_step(model_output: jax.Array, timestep: Any, sample: jax.Array, step_index: Any, noisy_start: jax.Array,
             tables: StepTables) -> jax.Array:
  """One DMD call, traceable (``step_index`` may be a traced int32).

  Args:
    model_output: (B, ...) velocity v at ``sample``.
    timestep: the call's timestep, scalar or (B,), float or int (truncated toward zero before the look-up,
      as the reference does); ``None`` uses the host look-up ``tables.coef['step_sigma'][step_index]``.
      Passing ``tables.model_timesteps[k]`` (host-truncated) is exact; a float32 timestep could truncate
      differently from the float64 one when it lies within float32 rounding of an integer.
    sample: (B, ...) current latent x.
    step_index: index of this call within the stage.
    noisy_start: (B, ...) the latent the current stage started from.
    tables: ``set_timesteps(...).to_jax()`` of kind "dmd".
  Returns:
    (B, ...) next latent in ``noisy_start.dtype``: re-noised x0 for every call but the last, x0 for the last.
    The reference returns the last x0 in ``model_output.dtype`` and the others in ``noisy_start.dtype``; a
    traced step index cannot change the dtype, so the last x0 is rounded to ``model_output.dtype`` first and then
    cast (exactly) to ``noisy_start.dtype``. The eager :meth:`HeliosDMDScheduler.step` restores the reference
    dtype.

  Precision: the reference forms x0 and the re-noised mix in float64 and rounds once (x0 to the model output
  dtype, the mix to ``noisy_start.dtype``); without x64 we compute both in float32 (sigma rounded to float32 once)
  and round the same way, so results can differ by float32 rounding (and, for bf16 outputs, rarely by one bf16
  ulp where the float32 value sits at a bf16 rounding boundary).
  """
  f32 = jnp.float32
  k = jnp.asarray(step_index, jnp.int32)
  c = tables.coef
  if timestep is None:
    sigma = c["step_sigma"][k]
  else:
    t = jnp.asarray(timestep)
    t = jnp.trunc(t.astype(f32)) if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(f32)
    idx = jnp.argmin(jnp.abs(tables.timesteps - t[..., None]), axis=-1)
    sigma = tables.sigmas[idx]
    if sigma.ndim == 1:
      sigma = sigma.reshape(sigma.shape + (1,) * (sample.ndim - 1))
  x0 = (sample.astype(f32) - sigma.astype(f32) * model_output.astype(f32)).astype(model_output.dtype)
  x0_f = x0.astype(f32)
  renoised = c["renoise_keep"][k] * x0_f + c["renoise_sigma"][k] * noisy_start.astype(f32)
  is_last = k >= tables.num_steps - 1
  return jnp.where(is_last, x0_f, renoised).astype(noisy_start.dtype)


_jit_dmd_step = jax.jit(dmd_step)


class HeliosDMDScheduler(PyramidScheduler):
  """DMD sampler of Helios-Distilled (x0 prediction, re-noising toward the stage start latent).

  Usage inside jit (one pyramid stage, ``x_start`` = the stage's start latent)::

      tables = scheduler.set_timesteps(2, stage_index=i, mu=mu, is_amplify_first_chunk=first_chunk)
      tab = tables.to_jax()

      def body(k, x):
        t = tab.model_timesteps[k]
        v = model(x, t)
        return HeliosDMDScheduler.pure_step(v, t, x, k, x_start, tab)

      x = jax.lax.fori_loop(0, tables.num_steps, body, x_start)
  """

  config_class = HeliosDMDSchedulerConfig
  order = 1

  def __init__(self, config: HeliosDMDSchedulerConfig | None = None):
    super().__init__(config)
    self._jtables: StepTables | None = None

  @property
  def kind(self) -> str:
    return "dmd"

  def set_timesteps(self, num_inference_steps: int, stage_index: int | None = None, mu: float | None = None,
                    sigmas: Any = None, is_amplify_first_chunk: bool = False) -> SchedulerTables:
    """Builds the schedule of one stage: n (2n if amplified) calls, n + 1 (2n + 1) sigmas ending with 0.

    Raises:
      InputError: steps <= 0, stage_index missing or out of range, mu missing, bad sigmas.
    """
    cfg = self.config
    # The reference's DMD step converts sigmas to float64 itself, so the schedule's own dtype does not matter.
    ts, sig, _ = stage_schedule(cfg, self.geometry, num_inference_steps, stage_index, mu, sigmas, dmd=True,
                                is_amplify_first_chunk=is_amplify_first_chunk)
    self.tables = SchedulerTables(kind="dmd", timesteps=ts, sigmas=sig,
                                  stage_index=None if cfg.stages == 1 else int(stage_index),
                                  mu=None if mu is None else float(mu), coef=dmd_coefficients(ts, sig))
    self._jtables = None
    return self.tables

  pure_step = staticmethod(dmd_step)
  """``pure_step(model_output, timestep, sample, step_index, noisy_start, tables) -> prev_sample``."""

  def step(self, model_output: jax.Array, timestep: Any = None, sample: jax.Array = None,
           cur_sampling_step: int = 0, dmd_noisy_tensor: jax.Array | None = None,
           return_dict: bool = True) -> SchedulerOutput | tuple[jax.Array]:
    """Eager step mirroring diffusers' keyword names (``cur_sampling_step``, ``dmd_noisy_tensor``).

    Uses this scheduler's own tables (the pipelines always pass the scheduler's sigmas/timesteps). Returns the
    re-noised sample in ``dmd_noisy_tensor.dtype``, or x0 in ``model_output.dtype`` on the last call.
    """
    if self.tables is None:
      raise InputError("call set_timesteps before step")
    if sample is None:
      raise InputError("step needs the current sample")
    n = self.tables.num_steps
    if isinstance(cur_sampling_step, bool) or not 0 <= int(cur_sampling_step) < n:
      raise InputError(f"cur_sampling_step must be in [0, {n}), got {cur_sampling_step!r}")
    model_output = jnp.asarray(model_output)
    sample = jnp.asarray(sample)
    if model_output.shape != sample.shape:
      raise InputError(f"model_output shape {model_output.shape} does not match sample shape {sample.shape}")
    last = int(cur_sampling_step) == n - 1
    if dmd_noisy_tensor is None:
      if not last:
        raise InputError("dmd_noisy_tensor (the stage's start latent) is required before the last step")
      dmd_noisy_tensor = sample
    noisy = jnp.asarray(dmd_noisy_tensor)
    if noisy.shape != sample.shape:
      raise InputError(f"dmd_noisy_tensor shape {noisy.shape} does not match sample shape {sample.shape}")
    if timestep is None:
      timestep = self.tables.timesteps[int(cur_sampling_step)]
    # Truncate on the host in float64 (the reference's int64 cast), so the look-up never sees float32 rounding.
    t_int = jnp.asarray(np.trunc(np.asarray(timestep, np.float64)).astype(np.int32))
    if self._jtables is None:
      self._jtables = self.tables.to_jax()
    prev = _jit_dmd_step(model_output, t_int, sample, jnp.int32(cur_sampling_step), noisy, self._jtables)
    if last:
      prev = prev.astype(model_output.dtype)
    if not return_dict:
      return (prev,)
    return SchedulerOutput(prev_sample=prev)

  def __len__(self) -> int:
    return self.config.num_train_timesteps
