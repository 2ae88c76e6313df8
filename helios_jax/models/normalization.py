"""Normalisation layers with the reference's float32 islands.

Both layers normalise in float32 whatever the input dtype. :class:`RMSNorm` casts back to the input dtype once,
after the weight multiply (the q/k norms of the DiT); :class:`FP32LayerNorm` returns float32 and leaves the cast to
the caller, because the DiT applies its modulation in float32 before rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
  """``x * rsqrt(mean(x^2) + eps) * scale`` over the last axis; (..., D) -> (..., D) in x's dtype."""

  def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """Non-affine LayerNorm over the last axis, computed and returned in float32."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


class FP32LayerNorm(nnx.Module):
  """LayerNorm computed and returned in float32; affine parameters optional (kept float32)."""

  def __init__(self, dim: int, *, eps: float, affine: bool):
    self.eps = eps
    self.affine = affine
    if affine:
      self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
      self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = layer_norm(x, self.eps)
    if self.affine:
      y = y * self.scale[...] + self.bias[...]
    return y
