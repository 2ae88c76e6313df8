"""3D rotary position embedding of the Helios DiT (interleaved pairs, per-axis frequencies).

A token at frame position ``f`` and integer grid position ``(y, x)`` on its own stream's post-patch grid is
rotated, for each of the ``sum(rope_dim) // 2`` channel pairs ``(2i, 2i+1)`` of every head, by an angle
``pos_a * omega_a[k]`` where the first ``rope_dim[0] // 2`` pairs use time, the next ``rope_dim[1] // 2`` use y and
the last ``rope_dim[2] // 2`` use x; ``omega_a[k] = theta ** (-2k / rope_dim[a])``.

Tables are kept as ``cos`` and ``sin`` of shape ``(B_idx, L, P)`` with ``P = sum(rope_dim) // 2`` pairs (the
reference stores each value twice, interleaved, in a 2P-channel table; the two copies are identical, so nothing is
lost). Mid/long history tables are the *average-pooled* cos/sin of the short-grid table, after replicate
padding, as the reference does; pooled entries are not unit rotations and are applied with the same formula.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np
from einops import rearrange


def rope_frequencies(dim: int, theta: float) -> np.ndarray:
  """``theta ** -(2k / dim)`` for ``k < dim // 2``, float32, computed in float32 like the reference."""
  exponent = np.arange(0, dim, 2, dtype=np.float32)[: dim // 2] / np.float32(dim)
  return (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)


def rope_table(frame_indices: jnp.ndarray, height: int, width: int, rope_dim: Sequence[int],
               theta: float) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos/sin tables for a (frames, height, width) grid.

  Args:
    frame_indices: (B_idx, F) integer or float frame positions.
    height, width: the stream's post-patch grid size.
  Returns:
    cos, sin: (B_idx, F, height, width, P) float32.
  """
  f = jnp.asarray(frame_indices, jnp.float32)
  b, n = f.shape
  y = jnp.arange(height, dtype=jnp.float32)
  x = jnp.arange(width, dtype=jnp.float32)
  parts = []
  for pos, dim in ((f[:, :, None, None], rope_dim[0]), (y[None, None, :, None], rope_dim[1]),
                   (x[None, None, None, :], rope_dim[2])):
    omega = jnp.asarray(rope_frequencies(dim, theta))
    angles = pos[..., None] * omega  # fp32 outer product, as the reference forces
    parts.append(jnp.broadcast_to(angles, (b, n, height, width, dim // 2)))
  angles = jnp.concatenate(parts, axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def _replicate_pad_end(x: jnp.ndarray, multiples: Sequence[int], axes: Sequence[int]) -> jnp.ndarray:
  pad = [(0, 0)] * x.ndim
  for m, a in zip(multiples, axes):
    pad[a] = (0, (m - x.shape[a] % m) % m)
  return jnp.pad(x, pad, mode="edge")


def pooled_rope_table(frame_indices: jnp.ndarray, height: int, width: int, window: int, rope_dim: Sequence[int],
                      theta: float) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Average-pooled cos/sin tables of the mid (window 2) and long (window 4) history streams.

  Returns:
    cos, sin: (B_idx, ceil(F/w) * ceil(H/w) * ceil(W/w), P) float32, tokens in (t, y, x) row-major order.
  """
  out = []
  for table in rope_table(frame_indices, height, width, rope_dim, theta):
    table = _replicate_pad_end(table, (window,) * 3, (1, 2, 3))
    table = rearrange(table, "b (t i) (h j) (w k) p -> b t h w (i j k) p", i=window, j=window, k=window)
    out.append(rearrange(table.mean(axis=-2), "b t h w p -> b (t h w) p"))
  return out[0], out[1]


def flat_rope_table(frame_indices: jnp.ndarray, height: int, width: int, rope_dim: Sequence[int],
                    theta: float) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Like :func:`rope_table`, flattened to (B_idx, F * height * width, P)."""
  cos, sin = rope_table(frame_indices, height, width, rope_dim, theta)
  return rearrange(cos, "b t h w p -> b (t h w) p"), rearrange(sin, "b t h w p -> b (t h w) p")


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """Rotates interleaved channel pairs of ``x``.

  Args:
    x: (B, L, N, D) queries or keys, D = 2P.
    cos, sin: (B or 1, L, P) float32.
  Returns:
    (B, L, N, D) in x's dtype; the rotation itself is computed in float32.
  """
  pairs = rearrange(x, "b l n (p two) -> b l n p two", two=2).astype(jnp.float32)
  x1, x2 = pairs[..., 0], pairs[..., 1]
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
  return rearrange(out, "b l n p two -> b l n (p two)").astype(x.dtype)
