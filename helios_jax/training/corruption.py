"""Representation-control drops and Easy Anti-Drifting history corruption (training-spec sections 3.3 and 5.2).

The history seen by the model during training is 20 latent frames: the first-frame anchor followed by the 19-frame
buffer (long 16 | mid 2 | recent 1). Everything here works on that 20-frame stack ``hist20`` (B, C, 20, h, w)
(index 0 = anchor, 1..19 = buffer, oldest first) so that drops and corruption are per-frame masks and mixes.

Randomness is split from arithmetic: ``draw_*`` functions turn a PRNG key into a dict of arrays, ``apply_*``
functions are deterministic given those arrays (the tests re-implement them in NumPy).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.errors import InputError

HIST20 = 20  # anchor + 16 + 2 + 1

# Segment of each of the 20 frames: 0 = anchor ("begin"), 1 = oldest frame ("tail"), 2 = window A (long[1:10]),
# 3 = first 2 frames of window B (long[10:12]), 4 = last 7 frames of window B (long[12:16] + mid + recent).
SEGMENT_OF_FRAME = np.array([0, 1] + [2] * 9 + [3] * 2 + [4] * 7, np.int32)
NUM_SEGMENTS = 5


def segment_ratios(ratio_short: float, ratio_mid: float, ratio_long: float) -> np.ndarray:
  """(5,) max noise level per segment, assigned the way the reference does (spec 5.2 step 4)."""
  return np.array([ratio_short, ratio_long, ratio_long, ratio_long, ratio_mid], np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Representation-control drops (one draw per batch)

DROP_NONE, DROP_T2V, DROP_I2V, DROP_V2V = 0, 1, 2, 3


def draw_drop(key: jax.Array, t2v: float, i2v: float, v2v: float, enabled: bool = True) -> dict:
  """One per-batch draw: ``mode`` (int32 scalar, DROP_*) and ``v2v_k`` (int32 in {0, 1, 2}; d = 1 + 9k)."""
  k1, k2, k3, k4 = jax.random.split(key, 4)
  u1, u2, u3 = (jax.random.uniform(k, ()) for k in (k1, k2, k3))
  mode = jnp.where(u1 < t2v, DROP_T2V, jnp.where(u2 < i2v, DROP_I2V, jnp.where(u3 < v2v, DROP_V2V, DROP_NONE)))
  if not enabled:
    mode = jnp.asarray(DROP_NONE)
  return dict(drop_mode=mode.astype(jnp.int32), drop_v2v_k=jax.random.randint(k4, (), 0, 3).astype(jnp.int32))


def drop_keep_mask(mode: jax.Array, v2v_k: jax.Array) -> jax.Array:
  """(20,) float32 1 = keep, 0 = zero, for the 20 history frames (anchor first).

  T2V: everything (anchor included) zeroed. I2V: the 18 oldest buffer frames zeroed (anchor + recent kept).
  V2V: the d = 1 + 9k oldest buffer frames zeroed, anchor kept.
  """
  f = jnp.arange(HIST20)
  buf = f - 1  # buffer position, -1 for the anchor
  t2v = jnp.zeros((HIST20,), jnp.float32)
  i2v = jnp.where((f >= 1) & (buf < 18), 0.0, 1.0)
  d = 1 + 9 * v2v_k
  v2v = jnp.where((f >= 1) & (buf < d), 0.0, 1.0)
  none = jnp.ones((HIST20,), jnp.float32)
  return jnp.select([mode == DROP_T2V, mode == DROP_I2V, mode == DROP_V2V], [t2v, i2v, v2v], none)


# ---------------------------------------------------------------------------------------------------------------
# Frame-aware corruption

def draw_corruption(key: jax.Array, shape: tuple, clean_prob: float, mode: str, noise_mode_prob: float,
                    ratios: np.ndarray, frame_independent: bool, blur_min: float, blur_max: float) -> dict:
  """Random inputs of :func:`apply_corruption` for a ``hist20`` of ``shape`` (B, C, 20, h, w).

  Returns ``corrupt_clean`` (bool scalar: leave everything clean), ``corrupt_use_noise`` (bool scalar),
  ``corrupt_sigma`` (B, 20) per-frame noise levels in [0, ratio of the frame's segment), ``corrupt_eps``
  (B, C, 20, h, w) fresh noise, ``corrupt_blur`` (5,) per-segment resize ratios.
  """
  if mode not in ("noise", "downsample", "random"):
    raise InputError(f"corrupt_mode must be 'noise', 'downsample' or 'random', got {mode!r}")
  b = shape[0]
  k1, k2, k3, k4, k5 = jax.random.split(key, 5)
  clean = jax.random.uniform(k1, ()) < clean_prob
  if mode == "noise":
    use_noise = jnp.asarray(True)
  elif mode == "downsample":
    use_noise = jnp.asarray(False)
  else:
    use_noise = jax.random.uniform(k2, ()) < noise_mode_prob
  frame_max = jnp.asarray(ratios, jnp.float32)[SEGMENT_OF_FRAME]  # (20,)
  if frame_independent:
    u = jax.random.uniform(k3, (b, HIST20))
  else:
    u = jax.random.uniform(k3, (b, NUM_SEGMENTS))[:, SEGMENT_OF_FRAME]
  sigma = u * frame_max[None]
  eps = jax.random.normal(k4, shape, jnp.float32)
  blur = jax.random.uniform(k5, (NUM_SEGMENTS,), minval=blur_min, maxval=blur_max)
  return dict(corrupt_clean=clean, corrupt_use_noise=use_noise, corrupt_sigma=sigma, corrupt_eps=eps,
              corrupt_blur=blur)


def _aa_resize_matrix(n_in: int, n_out: jax.Array, size: int) -> jax.Array:
  """(size, n_in) antialiased bilinear resize matrix from n_in to a traced n_out <= size (rows >= n_out are 0).

  Mirrors PyTorch's ``interpolate(mode='bilinear', antialias=True, align_corners=False)`` weights: triangle filter
  widened by the scale when downsampling, truncated to the input and renormalised.
  """
  n_out_f = n_out.astype(jnp.float32)
  i, _, w = _triangle_weights(n_in / n_out_f, size, n_in)
  w = w / jnp.maximum(w.sum(axis=1, keepdims=True), 1e-12)
  return jnp.where(i < n_out_f, w, 0.0)


def _triangle_weights(scale, rows: int, cols: int):
  """Unnormalised (rows, cols) triangle-filter weights of a resize by ``scale`` (input / output size), widened by
  the scale when downsampling; also returns the row and column index grids."""
  support = jnp.maximum(scale, 1.0)
  i = jnp.arange(rows, dtype=jnp.float32)[:, None]
  j = jnp.arange(cols, dtype=jnp.float32)[None, :]
  center = scale * (i + 0.5)
  return i, j, jnp.maximum(0.0, 1.0 - jnp.abs((j + 0.5 - center) / support))


def _aa_upsize_matrix(n_small: jax.Array, n_out: int, size: int) -> jax.Array:
  """(n_out, size) resize matrix from a traced n_small <= size (columns >= n_small are 0) back to n_out."""
  n_small_f = n_small.astype(jnp.float32)
  _, j, w = _triangle_weights(n_small_f / n_out, n_out, size)
  w = jnp.where(j < n_small_f, w, 0.0)
  return w / jnp.maximum(w.sum(axis=1, keepdims=True), 1e-12)


def blur_frames(x: jax.Array, ratio: jax.Array) -> jax.Array:
  """Resize (B, C, F, h, w) to (round(h r), round(w r)) and back, antialiased bilinear, for a traced ratio r."""
  h, w = x.shape[-2:]
  nh = jnp.clip(jnp.round(h * ratio), 1, h).astype(jnp.int32)
  nw = jnp.clip(jnp.round(w * ratio), 1, w).astype(jnp.int32)
  mh = _aa_upsize_matrix(nh, h, h) @ _aa_resize_matrix(h, nh, h)  # (h, h)
  mw = _aa_upsize_matrix(nw, w, w) @ _aa_resize_matrix(w, nw, w)  # (w, w)
  return jnp.einsum("ij,bctjk,lk->bctil", mh, x.astype(jnp.float32), mw)


def apply_corruption(hist20: jax.Array, draws: dict) -> jax.Array:
  """Corrupts the 20-frame history (spec 5.2). Segments whose sum over the whole batch is exactly 0 are skipped.

  Noise mode: ``x' = s eps + (1 - s) x`` with per-sample, per-frame ``s``. Downsample mode: per-segment blur.
  Returns float32 (B, C, 20, h, w).
  """
  x = hist20.astype(jnp.float32)
  seg = jnp.asarray(SEGMENT_OF_FRAME)
  frame_sum = x.sum(axis=(0, 1, 3, 4))  # (20,)
  seg_sum = jax.ops.segment_sum(frame_sum, seg, num_segments=NUM_SEGMENTS)
  active = (seg_sum != 0)[seg]  # (20,)
  s = draws["corrupt_sigma"][:, None, :, None, None]
  noised = s * draws["corrupt_eps"] + (1.0 - s) * x
  blurred = x
  for i in range(NUM_SEGMENTS):
    sel = (seg == i)[None, None, :, None, None]
    blurred = jnp.where(sel, blur_frames(x, draws["corrupt_blur"][i]), blurred)
  corrupted = jnp.where(draws["corrupt_use_noise"], noised, blurred)
  corrupted = jnp.where(active[None, None, :, None, None], corrupted, x)
  return jnp.where(draws["corrupt_clean"], x, corrupted)


def saturate(hist20: jax.Array, key: jax.Array, clean_prob: float, lo: float, hi: float) -> jax.Array:
  """Optional saturation augmentation (spec 5.2): per non-zero segment (anchor excluded), ``(x - m) f + m``.

  ``m`` is the channel mean at each (b, t, y, x). The released trainer never applies this in stages 1/2.
  """
  x = hist20.astype(jnp.float32)
  seg = jnp.asarray(SEGMENT_OF_FRAME)
  k1, k2, k3, k4 = jax.random.split(key, 4)
  keep = jax.random.uniform(k1, (NUM_SEGMENTS,)) < clean_prob
  low = jax.random.uniform(k2, (NUM_SEGMENTS,), minval=lo, maxval=0.999)
  high = jax.random.uniform(k3, (NUM_SEGMENTS,), minval=1.001, maxval=hi)
  f = jnp.where(jax.random.uniform(k4, (NUM_SEGMENTS,)) < 0.5, low, high)
  f = jnp.where(keep, 1.0, f).at[0].set(1.0)
  frame_sum = x.sum(axis=(0, 1, 3, 4))
  active = (jax.ops.segment_sum(frame_sum, seg, num_segments=NUM_SEGMENTS) != 0)
  f = jnp.where(active, f, 1.0)[seg][None, None, :, None, None]
  m = x.mean(axis=1, keepdims=True)
  return (x - m) * f + m
