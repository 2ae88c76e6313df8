"""Old import path, kept for users' code: the stage-3 DMD trainer is :mod:`helios_jax.training.trainers.ahd`
(``negative_embeds`` lives in :mod:`helios_jax.training.sources`). Nothing in the package imports this module."""

from helios_jax.training.trainers.ahd import (Phases, Trunks, build_trunks, init_state, make_roles,  # noqa: F401
                                              output_shardings, split_batch, train, train_step)
from helios_jax.training.sources import negative_embeds  # noqa: F401
