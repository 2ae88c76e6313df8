"""Where a training run's arrays live on the mesh: train state, frozen base, batch, and the jitted step's shardings.

Every training stage uses it the same way::

  layout = TrainLayout.from_config(config)             # config.mesh (absent: one device)
  frozen = layout.place(frozen)                        # frozen base sharded over fsdp
  state = layout.init(lambda f: make_state(f), frozen)  # built directly in its shards (jit with out_shardings)
  step = layout.jit_step(step_fn, state, frozen)      # step(state, frozen, batch) -> (state, metrics)
  state, metrics = step(state, frozen, layout.place_batch(numpy_batch))

The step is ``jax.jit`` with explicit ``in_shardings`` / ``out_shardings`` (state donated) and is traced under
``jax.set_mesh(mesh)``, so the attention layers see the mesh and go sequence-parallel when ``mesh.sequence > 1``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from helios_jax.errors import InputError
from helios_jax.parallel import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class TrainLayout:
  mesh: Mesh
  fsdp_min_size: int = mesh_lib.DEFAULT_FSDP_MIN_SIZE

  @classmethod
  def from_config(cls, config, check_batch: bool = True) -> "TrainLayout":
    """From ``config.mesh`` (see :func:`helios_jax.parallel.mesh.add_mesh_config`); checks ``config.batch_size``
    unless ``check_batch`` is False (a stage whose batch does not come from ``batch_size``: ODE regression)."""
    mesh_cfg = config.get("mesh") if hasattr(config, "get") else None
    mesh = mesh_lib.make_mesh(mesh_lib.mesh_shape(mesh_cfg))
    min_size = mesh_lib.DEFAULT_FSDP_MIN_SIZE if mesh_cfg is None else mesh_cfg.get("fsdp_min_size",
                                                                                  mesh_lib.DEFAULT_FSDP_MIN_SIZE)
    layout = cls(mesh, int(min_size))
    if check_batch:
      layout.check_batch(int(config.batch_size))
    return layout

  @property
  def batch_split(self) -> int:
    return mesh_lib.batch_split(self.mesh)

  def check_batch(self, batch_size: int) -> None:
    if batch_size % self.batch_split:
      raise InputError(f"batch_size {batch_size} (the global batch) must be divisible by mesh.data x mesh.fsdp = "
                       f"{self.batch_split}")

  def shardings(self, tree):
    """``NamedSharding`` pytree for parameter-like ``tree`` (arrays or ``ShapeDtypeStruct``s)."""
    return mesh_lib.param_shardings(tree, self.mesh, self.fsdp_min_size)

  def place(self, tree):
    """``tree`` moved onto its parameter shardings."""
    return mesh_lib.place(tree, self.shardings(tree))

  def init(self, fn: Callable, *args):
    """``fn(*args)`` computed directly into its shardings (never a whole unsharded copy on one device)."""
    out = jax.eval_shape(fn, *args)
    with jax.set_mesh(self.mesh):
      return jax.jit(fn, out_shardings=self.shardings(out))(*args)

  def batch_sharding(self, batch_size: int):
    return mesh_lib.batch_sharding(self.mesh, batch_size)

  def place_batch(self, batch: dict) -> dict:
    """A host batch (the same global batch on every process) split over ``data x fsdp`` along its leading axis."""
    def one(x):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, self.batch_sharding(x.shape[0]), lambda idx: x[idx])
    return jax.tree.map(one, batch)

  def jit_step(self, step: Callable, state, frozen, donate: bool = True, batch_sharding=None) -> Callable:
    """``jax.jit(step)`` with the state's, frozen base's and batch's shardings declared; traced under the mesh.

    Args:
      step: ``step(state, frozen, batch) -> (state, metrics)``.
      state, frozen: example (or abstract) trees that fix the shardings.
      batch_sharding: one sharding for every batch leaf; default: leading axis over ``data x fsdp``.
    """
    state_sh, frozen_sh = self.shardings(state), self.shardings(frozen)
    batch_sh = (mesh_lib.batch_sharding(self.mesh, self.batch_split) if batch_sharding is None
                else batch_sharding)  # a prefix for every batch leaf
    jitted = jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh),
                     out_shardings=(state_sh, mesh_lib.replicated(self.mesh)),
                     donate_argnums=(0,) if donate else ())

    def run(state, frozen, batch):
      with jax.set_mesh(self.mesh):
        return jitted(state, frozen, batch)

    run.jitted = jitted
    run.mesh = self.mesh
    return run
