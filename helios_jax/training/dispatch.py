"""``train(config, workdir)``: the trainer of ``config.stage`` (what ``train.py`` calls).

The trainers (:mod:`helios_jax.training.trainers`) never import each other or this module; this is the only place
that knows them all.
"""

from __future__ import annotations

import importlib

from helios_jax.errors import InputError

# config.stage -> trainer module under helios_jax.training.trainers
TRAINERS = {"base": "base", "mid": "base", "ode": "ode", "ahd": "ahd"}


def trainer_for(stage: str):
  """The trainer module of ``stage`` (``base``, ``mid``, ``ode``, ``ahd``)."""
  if stage not in TRAINERS:
    raise InputError(f"config.stage must be one of {', '.join(TRAINERS)}, got {stage!r}")
  return importlib.import_module(f"helios_jax.training.trainers.{TRAINERS[stage]}")


def train(config, workdir: str, progress: bool = True) -> dict:
  """Runs (or resumes) the run of ``config`` in ``workdir`` with its stage's trainer; returns its summary dict
  (start_step, final_step, losses, stopped_by, resumed_from, num_trainable, and the stage's extras)."""
  return trainer_for(str(config.stage)).train(config, workdir, progress)
