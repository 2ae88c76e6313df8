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


def _move(x, kind: str, donate: bool):
  if not isinstance(x, jax.Array) or x.sharding.memory_kind == kind:
    return x
  y = jax.device_put(x, x.sharding.with_memory_kind(kind))
  if donate:  # free the source now, not when Python drops it: the two copies never coexist beyond one leaf
    y.block_until_ready()
    x.delete()
  return y


def to_memory(tree, kind: str, donate: bool = False):
  """``tree`` with every array moved to memory ``kind`` (same sharding); unchanged if the kind is unavailable.

  ``donate=True`` deletes each source array right after its copy (the caller must hold no other reference): the
  peak of the source memory then falls leaf by leaf instead of holding both copies until the tree is dropped.
  """
  if not (available(kind) and available(HOST)):
    return tree
  return jax.tree.map(lambda x: _move(x, kind, donate), tree)


def to_host(tree, enabled: bool = True, donate: bool = False):
  return to_memory(tree, HOST, donate) if enabled else tree


def to_device(tree, donate: bool = False):
  return to_memory(tree, DEVICE, donate)


def swap(outgoing, incoming):
  """(``outgoing`` on the host, ``incoming`` on the device), moved leaf by leaf in alternation with each source
  deleted after its copy, so neither the device nor the pinned host pool ever holds both trees (the transient is
  one leaf, at 14B the largest stacked FFN kernel, 5.3 GiB). Both trees are consumed."""
  if not available(HOST):
    return outgoing, incoming
  out_leaves, out_def = jax.tree.flatten(outgoing)
  in_leaves, in_def = jax.tree.flatten(incoming)
  for i in range(max(len(out_leaves), len(in_leaves))):
    if i < len(out_leaves):
      out_leaves[i] = _move(out_leaves[i], HOST, True)
    if i < len(in_leaves):
      in_leaves[i] = _move(in_leaves[i], DEVICE, True)
  return jax.tree.unflatten(out_def, out_leaves), jax.tree.unflatten(in_def, in_leaves)


def init_on_host(init, params, enabled: bool = True, shardings=None):
  """``init(params)`` for an optimiser whose initial state is all zeros (optax clip + AdamW: counts, moments),
  built leaf by leaf in host memory so the device never holds the whole state at once.

  ``shardings``: optional callable, abstract state -> ``Sharding`` pytree (a mesh layout's rule); each leaf is
  then created in its shards and keeps them on the host.
  """
  if not enabled:
    return init(params)
  abstract = jax.eval_shape(init, params)
  leaves, treedef = jax.tree.flatten(abstract)
  where = [None] * len(leaves) if shardings is None else jax.tree.leaves(shardings(abstract))
  return jax.tree.unflatten(treedef, [to_host(jnp.zeros(a.shape, a.dtype, device=s), donate=True)
                                      for a, s in zip(leaves, where)])


def copy_to_host(tree, enabled: bool = True):
  """A copy of ``tree`` (in host memory when ``enabled``), made leaf by leaf."""
  return jax.tree.map(lambda x: to_host(jnp.copy(x), enabled), tree)
