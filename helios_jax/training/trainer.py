"""Old import path, kept for users' code: ``train`` is now :func:`helios_jax.training.dispatch.train` (every stage,
by config.stage), the stage-1/2 trainer :mod:`helios_jax.training.trainers.base`, ``make_source``
:mod:`helios_jax.training.sources`, ``export_merged`` :mod:`helios_jax.training.export`. Nothing in the package
imports this module."""

from helios_jax.training.dispatch import train  # noqa: F401
from helios_jax.training.export import export_merged  # noqa: F401
from helios_jax.training.loop import TrainingError  # noqa: F401
from helios_jax.training.sources import make_source  # noqa: F401
