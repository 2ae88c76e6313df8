"""The compressed history of the autoregressive sampler: frame indices, the 16/2/1 buffer, and pyramid resampling.

keep_first_frame=True (the released models): indices 0..28 split as prefix [0] | long [1..16] | mid [17, 18] |
1x [19] | noisy [20..28]; short = [prefix, 1x]. The buffer holds the last 19 latent frames; the prefix is zeros for a
T2V first chunk, then the anchor latent (the image latent, or the first latent of chunk 0).

keep_first_frame=False: history sizes become [16, 2, 2] over a 20-frame buffer, indices long [0..15] | mid [16, 17] |
short [18, 19] | noisy [20..28], and no anchor frame is kept. diffusers 0.42.1 and the official inference code crash
in this mode (they size the buffer before enlarging the last history slot); we size the buffer after, which is what
the official *training* pipeline does.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from helios_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class HistoryLayout:
  """Sizes and frame indices of the history streams (all static)."""

  sizes: tuple[int, int, int]  # (long, mid, short-part taken from the buffer)
  chunk: int
  keep_first_frame: bool

  @classmethod
  def make(cls, history_sizes: Sequence[int], chunk: int, keep_first_frame: bool) -> "HistoryLayout":
    sizes = sorted((int(s) for s in history_sizes), reverse=True)
    if len(sizes) != 3 or min(sizes) < 1:
      raise InputError(f"history_sizes must be three positive sizes (long, mid, short), got {list(history_sizes)}")
    if int(chunk) < 1:
      raise InputError(f"num_latent_frames_per_chunk must be >= 1, got {chunk}")
    if not keep_first_frame:
      sizes[-1] += 1
    return cls(sizes=tuple(sizes), chunk=int(chunk), keep_first_frame=bool(keep_first_frame))

  @property
  def buffer_frames(self) -> int:
    return sum(self.sizes)

  def indices(self) -> dict[str, np.ndarray]:
    """Frame indices, each (1, n) int32, keyed by the transformer's argument names."""
    long_n, mid_n, short_n = self.sizes
    if self.keep_first_frame:
      bounds = np.cumsum([1, long_n, mid_n, short_n, self.chunk])
      idx = np.arange(bounds[-1])
      prefix, long_i, mid_i, one_i, noisy = np.split(idx, bounds[:-1])
      short_i = np.concatenate([prefix, one_i])
    else:
      bounds = np.cumsum([long_n, mid_n, short_n, self.chunk])
      idx = np.arange(bounds[-1])
      long_i, mid_i, short_i, noisy = np.split(idx, bounds[:-1])
    as2d = lambda a: a.astype(np.int32)[None]
    return dict(indices_hidden_states=as2d(noisy), indices_latents_history_short=as2d(short_i),
                indices_latents_history_mid=as2d(mid_i), indices_latents_history_long=as2d(long_i))

  def split(self, history: jax.Array, prefix: jax.Array | None) -> dict[str, jax.Array]:
    """The three history streams from the buffer's last frames.

    Args:
      history: (B, C, F, h, w) buffer, F >= buffer_frames.
      prefix: (B, C, 1, h, w) anchor latent (keep_first_frame only).
    """
    recent = history[:, :, history.shape[2] - self.buffer_frames:]
    long_n, mid_n, _ = self.sizes
    long_ = recent[:, :, :long_n]
    mid = recent[:, :, long_n:long_n + mid_n]
    short = recent[:, :, long_n + mid_n:]
    if self.keep_first_frame:
      short = jnp.concatenate([prefix.astype(short.dtype), short], axis=2)
    return dict(latents_history_short=short, latents_history_mid=mid, latents_history_long=long_)


def downsample_2x(x: jax.Array) -> jax.Array:
  """Per-frame bilinear x1/2 (align_corners=False, no antialias) == 2x2 block mean, then x2 to keep unit variance.

  (B, C, T, h, w) -> (B, C, T, h/2, w/2).
  """
  return 2.0 * rearrange(x, "b c t (h i) (w j) -> b c t h w (i j)", i=2, j=2).mean(axis=-1)


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
  """(B, C, T, h, w) -> (B, C, T, 2h, 2w), each value copied to a 2x2 block."""
  return jnp.repeat(jnp.repeat(x, 2, axis=3), 2, axis=4)


# The CUDA factor of the singular gamma = 1/3 covariance that the reference pipelines run with (H100, torch 2.11;
# inference-spec section 3.5). A float32 Cholesky of that matrix fails on the CPU.
_CUDA_L_GAMMA_THIRD = np.array([[1.0, 0.0, 0.0, 0.0],
                                [-0.33333334, 0.94280899, 0.0, 0.0],
                                [-0.33333334, -0.47140449, 0.81649655, 0.0],
                                [-0.33333334, -0.47140449, -0.81649649, 4.0744789e-4]], np.float32)


def block_noise_cholesky(gamma: float) -> np.ndarray:
  """Lower Cholesky factor (4, 4) float32 of the 2x2-block covariance ``(1+gamma) I - gamma 11^T + 1e-8 I``.

  gamma = 1/3 (every released config) makes the matrix singular: we use the factor the reference gets on CUDA.
  Other gammas are factored in float64.
  """
  if abs(gamma - 1.0 / 3.0) < 1e-7:
    return _CUDA_L_GAMMA_THIRD.copy()
  cov = (1.0 + gamma) * np.eye(4) - gamma * np.ones((4, 4)) + 1e-8 * np.eye(4)
  return np.linalg.cholesky(cov).astype(np.float32)


def place_block_noise(z: jax.Array, lower: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Correlated 2x2 block noise from i.i.d. draws, placed exactly as the reference does.

  Args:
    z: (B*C*T*(h/2)*(w/2), 4) standard normal, rows ordered (b, c, t, i, k).
    lower: (4, 4) Cholesky factor.
    shape: (B, C, T, h, w).
  Returns:
    (B, C, T, h, w) float32; element j of a row goes to (2i + j // 2, 2k + j % 2) of block (i, k).
  """
  b, c, t, h, w = shape
  n = z @ lower.T
  return rearrange(n, "(b c t i k) (p q) -> b c t (i p) (k q)", b=b, c=c, t=t, i=h // 2, k=w // 2, p=2, q=2)
