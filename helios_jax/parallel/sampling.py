"""Sampling on a device mesh: CFG-parallel (``data``), sequence-parallel attention (``sequence``), FSDP weights.

  mesh = make_mesh(parse_mesh("data=2,sequence=4"))
  with on_mesh(pipe, mesh):
    video = pipe(...)

``data = 2`` puts the conditional and unconditional halves of the CFG batch on different devices
(:func:`helios_jax.parallel.mesh.constrain_batch` in the denoising loop); ``sequence = s`` splits the transformer's
tokens inside attention (:mod:`helios_jax.parallel.sequence`); ``fsdp = f`` splits the transformer's weights (for
GPUs too small for the whole model). Everything else (scheduler, VAE, text encoder) runs as on one device.
"""

from __future__ import annotations

import contextlib

import jax
from flax import nnx

from helios_jax.parallel import mesh as mesh_lib


def shard_transformer(transformer, mesh, fsdp_min_size: int = mesh_lib.DEFAULT_FSDP_MIN_SIZE) -> None:
  """Moves the transformer's parameters onto ``mesh`` in place (split over ``fsdp``, replicated otherwise)."""
  state = nnx.state(transformer)
  nnx.update(transformer, mesh_lib.place(state, mesh_lib.param_shardings(state, mesh, fsdp_min_size)))


@contextlib.contextmanager
def on_mesh(pipe, mesh, fsdp_min_size: int = mesh_lib.DEFAULT_FSDP_MIN_SIZE):
  """Shards ``pipe.transformer`` onto ``mesh`` and makes the mesh current for the calls inside the block."""
  shard_transformer(pipe.transformer, mesh, fsdp_min_size)
  pipe._split = None  # the cached nnx.split holds the old arrays
  with jax.set_mesh(mesh):
    yield pipe
