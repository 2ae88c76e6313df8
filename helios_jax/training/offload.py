"""Moving pytrees between device memory and pinned host memory (memory kinds), for the 14B stage-3 fit.

Arrays keep their sharding (mesh layout) and only change memory kind. Where a backend has no ``pinned_host``
memory (some jax versions on CPU), the moves are no-ops, so the same code runs everywhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

HOST = "pinned_host"
DEVICE = "device"


@functools.lru_cache(maxsize=None)
def available(kind: str) -> bool:
  """Whether the first device can address memory of ``kind``."""
  try:
    return kind in {m.kind for m in jax.devices()[0].addressable_memories()}
  except (AttributeError, RuntimeError, NotImplementedError):
    return False


def to_memory(tree, kind: str):
  """``tree`` with every array moved to memory ``kind`` (same sharding); unchanged if the kind is unavailable."""
  if not (available(kind) and available(HOST)):
    return tree

  def move(x):
    if not isinstance(x, jax.Array) or x.sharding.memory_kind == kind:
      return x
    return jax.device_put(x, x.sharding.with_memory_kind(kind))

  return jax.tree.map(move, tree)


def to_host(tree, enabled: bool = True):
  return to_memory(tree, HOST) if enabled else tree


def to_device(tree):
  return to_memory(tree, DEVICE)


def init_on_host(init, params, enabled: bool = True):
  """``init(params)`` for an optimiser whose initial state is all zeros (optax clip + AdamW: counts, moments),
  built leaf by leaf in host memory so the device never holds the whole state at once."""
  if not enabled:
    return init(params)
  return jax.tree.map(lambda a: to_host(jnp.zeros(a.shape, a.dtype)), jax.eval_shape(init, params))


def copy_to_host(tree, enabled: bool = True):
  """A copy of ``tree`` (in host memory when ``enabled``), made leaf by leaf."""
  return jax.tree.map(lambda x: to_host(jnp.copy(x), enabled), tree)
