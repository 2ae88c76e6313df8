"""Timestep and text conditioning of the Helios DiT (names follow diffusers' HeliosTimeTextEmbedding)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def timestep_features(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features ``[cos(t * f_k), sin(t * f_k)]``, ``f_k = exp(-ln(max_period) * k / (dim/2))``.

  Args:
    t: (B,) timesteps on the 0..1000 scale, any numeric dtype (cast to float32 first, as the reference does).
  Returns:
    (B, dim) float32.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t).astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class MLP2(nnx.Module):
  """``linear_2(act(linear_1(x)))``: diffusers' TimestepEmbedding (SiLU) and PixArtAlphaTextProjection (tanh-GELU)."""

  def __init__(self, din: int, dout: int, act, *, param_dtype, precision=None, rngs: nnx.Rngs):
    self.act = act
    self.linear_1 = nnx.Linear(din, dout, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.linear_2 = nnx.Linear(dout, dout, param_dtype=param_dtype, precision=precision, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(self.act(self.linear_1(x)))


def gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


class HeliosTimeTextEmbedding(nnx.Module):
  """time_embedder (float32 island) -> temb; time_proj(SiLU(temb)) -> 6 modulation vectors; text_embedder."""

  def __init__(self, dim: int, freq_dim: int, text_dim: int, *, param_dtype, precision=None, rngs: nnx.Rngs):
    self.freq_dim = freq_dim
    # time_embedder is in diffusers' _keep_in_fp32_modules: always float32.
    self.time_embedder = MLP2(freq_dim, dim, jax.nn.silu, param_dtype=jnp.float32, precision=precision, rngs=rngs)
    self.time_proj = nnx.Linear(dim, 6 * dim, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.text_embedder = MLP2(text_dim, dim, gelu_tanh, param_dtype=param_dtype, precision=precision, rngs=rngs)

  def time(self, t: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Returns temb (B, D) and the modulation projection (B, 6, D), both in ``dtype``.

    temb is rounded to ``dtype`` before time_proj, as the reference rounds it to the text embedding's dtype.
    """
    temb = self.time_embedder(timestep_features(t, self.freq_dim)).astype(dtype)
    proj = self.time_proj(jax.nn.silu(temb))
    return temb, proj.reshape(proj.shape[0], 6, -1)
