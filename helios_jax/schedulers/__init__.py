"""helios_jax.schedulers: the Helios pyramid schedulers (UniPC / Euler, and DMD for Helios-Distilled).

One concept per module: ``shift`` (mu and the time-shift maps), ``config`` (JSON configs), ``pyramid`` (stage
geometry and one stage's schedule), ``tables`` (host tables and their device copy), ``solver_state``, ``unipc``,
``euler``, ``base`` (what both scheduler classes share), ``helios`` (:class:`HeliosScheduler`), ``dmd``
(:class:`HeliosDMDScheduler`).
"""

from __future__ import annotations

from typing import Any, Mapping

from helios_jax.errors import CheckpointError, InputError
from helios_jax.schedulers.base import SchedulerOutput
from helios_jax.schedulers.config import HeliosSchedulerConfig, read_scheduler_config
from helios_jax.schedulers.dmd import HeliosDMDScheduler, HeliosDMDSchedulerConfig, dmd_step
from helios_jax.schedulers.euler import euler_step
from helios_jax.schedulers.helios import HeliosScheduler, helios_step
from helios_jax.schedulers.pyramid import StageGeometry, build_stage_geometry
from helios_jax.schedulers.shift import calculate_shift, time_shift
from helios_jax.schedulers.solver_state import SolverState, init_solver_state
from helios_jax.schedulers.tables import SchedulerTables, StepTables
from helios_jax.schedulers.unipc import unipc_step

__all__ = [
    "HeliosScheduler", "HeliosSchedulerConfig", "HeliosDMDScheduler", "HeliosDMDSchedulerConfig",
    "SchedulerOutput", "SchedulerTables", "SolverState", "StageGeometry", "StepTables", "build_stage_geometry",
    "calculate_shift", "time_shift", "init_solver_state", "unipc_step", "euler_step", "helios_step", "dmd_step",
    "scheduler_from_config", "scheduler_from_pretrained",
]


def scheduler_from_config(config: Mapping[str, Any]) -> HeliosScheduler | HeliosDMDScheduler:
  """Picks the class a ``scheduler_config.json`` describes.

  ``_class_name == "HeliosDMDScheduler"`` or ``scheduler_type == "dmd"`` (the official repo's spelling) gives a
  :class:`HeliosDMDScheduler`; anything else a :class:`HeliosScheduler`.
  """
  if not isinstance(config, Mapping):
    raise InputError(f"scheduler config must be a dict, got {type(config).__name__}")
  if config.get("_class_name") == "HeliosDMDScheduler" or config.get("scheduler_type") == "dmd":
    return HeliosDMDScheduler.from_config(config)
  return HeliosScheduler.from_config(config)


def scheduler_from_pretrained(folder: str) -> HeliosScheduler | HeliosDMDScheduler:
  """:func:`scheduler_from_config` on ``folder/[scheduler/]scheduler_config.json``."""
  raw = read_scheduler_config(folder)
  try:
    return scheduler_from_config(raw)
  except InputError as e:
    raise CheckpointError(f"bad scheduler config in {folder}: {e}") from None
