"""HeliosScheduler: the pyramid flow-matching schedule with a UniPC (bh1/bh2) or Euler solver, in JAX.

Notation: sigmas are flow-matching noise levels (x_s = (1 - s) x0 + s eps); the network predicts the velocity
v = eps - x0, so x0 = x_s - s v. Timesteps are on the 0..num_train_timesteps scale.

The scheduler's pieces live one concept per module (this one ties them together):

* **Host side (numpy float64).** :mod:`.shift` (:func:`calculate_shift`, the time-shift maps), :mod:`.config`
  (the JSON configs), :mod:`.pyramid` (:func:`build_stage_geometry`: global table, stage bands, renoise constants;
  ``stage_schedule``), :mod:`.tables` (:class:`SchedulerTables`: the float64 ``timesteps`` / ``sigmas`` of one
  schedule plus every per-step solver coefficient, computed in float64 like the reference, float32 on the one
  path where the reference's sigma tensor is float32).
* **Device side (JAX, traceable).** :meth:`SchedulerTables.to_jax` gives a :class:`StepTables` pytree (float32
  copies of those tables). :func:`unipc_step` (:mod:`.unipc`) / :func:`euler_step` (:mod:`.euler`) take an
  explicit :class:`SolverState` (:mod:`.solver_state`) and a step index that may be a traced int32, so a pipeline
  can run a whole pyramid stage as one ``lax.fori_loop`` inside ``jax.jit``. Only elementwise tensor arithmetic
  happens on device, in float32.

:class:`HeliosScheduler` (here) ties both halves together and also offers an eager API shaped like diffusers'
(``set_timesteps(...)`` then ``step(model_output, timestep, sample).prev_sample``). Every name this module held
before the split is still importable from it.

The DMD sampler of Helios-Distilled lives in :mod:`helios_jax.schedulers.dmd`; it shares the geometry, config
and table modules (it does not import this one; this one imports its coefficient table for
``scheduler_type='dmd'``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from helios_jax.errors import InputError
# The names below are re-exported: ``helios_jax.schedulers.helios`` was the one module of the UniPC scheduler
# before the split, and user code may import any of them from here.
from helios_jax.schedulers.base import PyramidScheduler, SchedulerOutput
from helios_jax.schedulers.config import (SCHEDULER_CONFIG_NAME, SCHEDULER_TYPES,
                                          HeliosSchedulerConfig, PyramidSchedulerConfig, read_scheduler_config)
from helios_jax.schedulers.dmd import dmd_coefficients
from helios_jax.schedulers.euler import euler_coefficients, euler_step
from helios_jax.schedulers.pyramid import (StageGeometry, build_stage_geometry, global_sigmas,
                                           stage_schedule)
from helios_jax.schedulers.shift import (TIME_SHIFT_TYPES, calculate_shift, time_shift,
                                         time_shift_exponential, time_shift_linear)
from helios_jax.schedulers.solver_state import SolverState, flow_to_x0, init_solver_state
from helios_jax.schedulers.tables import SchedulerTables, StepTables
from helios_jax.schedulers.unipc import unipc_coefficients, unipc_step

__all__ = [
    "HeliosScheduler", "helios_step",
    # re-exported (the module's names before the split)
    "SCHEDULER_CONFIG_NAME", "SCHEDULER_TYPES", "TIME_SHIFT_TYPES", "PyramidScheduler", "SchedulerOutput",
    "PyramidSchedulerConfig", "HeliosSchedulerConfig", "read_scheduler_config", "StageGeometry",
    "build_stage_geometry", "global_sigmas", "stage_schedule", "calculate_shift", "time_shift",
    "time_shift_exponential", "time_shift_linear", "SolverState", "flow_to_x0", "init_solver_state",
    "SchedulerTables", "StepTables", "unipc_coefficients", "unipc_step", "euler_coefficients", "euler_step",
]


def helios_step(state: SolverState, model_output: jax.Array, sample: jax.Array, tables: StepTables,
                step_index: Any = None) -> tuple[jax.Array, SolverState]:
  """Dispatches on ``tables.kind`` (static): :func:`unipc_step` or :func:`euler_step`."""
  if tables.kind == "unipc":
    return unipc_step(state, model_output, sample, tables, step_index)
  if tables.kind == "euler":
    return euler_step(state, model_output, sample, tables, step_index)
  raise InputError(f"tables of kind {tables.kind!r} cannot be stepped by HeliosScheduler; use HeliosDMDScheduler")


_jit_helios_step = jax.jit(helios_step)


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
