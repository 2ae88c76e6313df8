"""Sequence-parallel attention over the mesh's ``sequence`` axis with ``shard_map`` (Ulysses-style all-to-all).

Each of the ``s`` devices of the ``sequence`` axis holds ``L / s`` tokens of q, k and v (all heads). Self-attention:
one all-to-all turns that into all ``L`` tokens of ``N / s`` heads, each device runs ordinary attention for its
heads, and a second all-to-all returns its tokens (Ulysses, arXiv 2309.14509). Cross-attention (keys are the
text, replicated) needs no communication: every device attends with its own query tokens. Token counts that ``s``
does not divide are padded and the padded keys masked (``key_value_seq_lengths``), so any Helios shape works; the
head count must be divisible by ``s`` (40 heads at 14B: 2, 4, 5, 8 ...).

:func:`attention` is called by :func:`helios_jax.models.attention.dot_product_attention` when the mesh made current
by ``jax.set_mesh`` has a ``sequence`` axis larger than one; the result equals single-device attention up to float
rounding.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from helios_jax.errors import InputError
from helios_jax.parallel import mesh as mesh_lib

AXIS = "sequence"

try:  # jax >= 0.7 (0.10, 0.11): public jax.shard_map
  shard_map = jax.shard_map
except AttributeError:  # pragma: no cover - older jax
  from jax.experimental.shard_map import shard_map  # noqa: F401


def active_size() -> int:
  """Size of the current mesh's ``sequence`` axis (1 without a mesh)."""
  return mesh_lib.axis_size(mesh_lib.current_mesh(), AXIS)


def _pad_tokens(x: jax.Array, multiple: int) -> jax.Array:
  pad = -x.shape[1] % multiple
  return x if pad == 0 else jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, local: Callable) -> jax.Array:
  """Sequence-parallel ``local(q, k, v, kv_lengths)`` over the current mesh.

  Args:
    q: (B, L, N, D); k, v: (B, S, N, D) (self-attention when S == L).
    local: ``(q, k, v, key_value_seq_lengths or None) -> out`` single-device attention.
  Returns:
    (B, L, N, D).
  """
  mesh = mesh_lib.current_mesh()
  s = mesh_lib.axis_size(mesh, AXIS)
  b, length, heads, _ = q.shape
  batch = mesh_lib.batch_axes(mesh, b) or None
  spec = P(batch, AXIS, None, None)
  qp = _pad_tokens(q, s)
  if k.shape[1] != length:  # cross-attention: split the queries only
    out = shard_map(lambda q_, k_, v_: local(q_, k_, v_, None), mesh=mesh,
                    in_specs=(spec, P(batch), P(batch)), out_specs=spec)(qp, k, v)
    return out[:, :length]
  if heads % s:
    raise InputError(f"sequence-parallel attention needs the head count ({heads}) divisible by mesh.sequence ({s})")
  padded = qp.shape[1] != length

  def body(q_, k_, v_):  # (b, Lp/s, N, D) -> all-to-all -> (b, Lp, N/s, D)
    q_, k_, v_ = (jax.lax.all_to_all(t, AXIS, 2, 1, tiled=True) for t in (q_, k_, v_))
    lengths = jnp.full((q_.shape[0],), length, jnp.int32) if padded else None
    o = local(q_, k_, v_, lengths)
    return jax.lax.all_to_all(o, AXIS, 1, 2, tiled=True)  # back to (b, Lp/s, N, D)

  out = shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)(qp, _pad_tokens(k, s), _pad_tokens(v, s))
  return out[:, :length]
