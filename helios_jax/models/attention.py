"""Attention for the Helios DiT: one kernel entry point and the attention layer.

:func:`dot_product_attention` is the only place that picks a kernel. ``implementation``:

* ``"xla"``: XLA's reference attention (materialises the (L, S) logits; softmax in float32). Works everywhere and
  in float32, so it is the parity path on CPU.
* ``"cudnn"``: cuDNN flash attention through ``jax.nn.dot_product_attention`` (GPU, bf16/fp16 only).
* ``None`` / ``"auto"``: cuDNN when running on a GPU with a 16-bit dtype, else XLA.
* ``"cudnn_fp8"``: cuDNN's FP8 flash attention (Hopper; inference only): q, k and v are scaled per tensor into
  float8_e4m3fn, the softmax probabilities are held in e4m3 inside the kernel, the output comes back in e4m3 and is
  scaled back (see :func:`fp8_attention`). Reached through ``jax._src.cudnn`` (``jax.nn.dot_product_attention``
  has no FP8 switch), so it is an opt-in of the FP8 inference mode, never a default.
* ``"xla_fp8"``: the same quantisation steps emulated around XLA's attention (any backend): what the CPU tests use
  to bound the FP8 attention's error.

Under a mesh with a ``sequence`` axis (``jax.set_mesh``), the same kernel runs sequence-parallel
(:mod:`helios_jax.parallel.sequence`).

No Triton kernels are used anywhere.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from helios_jax.models.normalization import RMSNorm
from helios_jax.models.rope import apply_rope
from helios_jax.parallel import sequence

IMPLEMENTATIONS = (None, "auto", "xla", "cudnn", "cudnn_fp8", "xla_fp8")
FP8_IMPLEMENTATIONS = ("cudnn_fp8", "xla_fp8")
_E4M3 = jnp.float8_e4m3fn
_E4M3_MAX = float(jnp.finfo(_E4M3).max)  # 448


def resolve_implementation(implementation: str | None, dtype) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; choose one of "
                     f"{', '.join(repr(i) for i in IMPLEMENTATIONS[1:])}")
  if implementation in (None, "auto"):
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"
  return implementation


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None = None) -> jax.Array:
  """Non-causal, unmasked scaled dot-product attention.

  Args:
    q: (B, L, N, D); k, v: (B, S, N, D).
  Returns:
    (B, L, N, D) in q's dtype.
  """
  impl = resolve_implementation(implementation, q.dtype)
  if impl in FP8_IMPLEMENTATIONS:
    if sequence.active_size() > 1:
      raise ValueError("FP8 attention does not run sequence-parallel; use the bf16 attention on a sequence mesh")
    return fp8_attention(q, k, v, emulate=impl == "xla_fp8").astype(q.dtype)

  def local(q, k, v, kv_lengths):
    return jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), implementation=impl,
                                        key_value_seq_lengths=kv_lengths)

  if sequence.active_size() > 1:  # a mesh with a sequence axis is current (jax.set_mesh): Ulysses over tokens
    out = sequence.attention(q, k, v, local)
  else:
    out = local(q, k, v, None)
  return out.astype(q.dtype)


def _to_e4m3(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-tensor dynamic scaling: x ~ x8 * s with x8 float8_e4m3fn, s = amax / 448 (float32 scalar)."""
  amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
  s = jnp.where(amax > 0, amax / _E4M3_MAX, 1.0)
  return jnp.clip(x.astype(jnp.float32) / s, -_E4M3_MAX, _E4M3_MAX).astype(_E4M3), s


def fp8_attention(q: jax.Array, k: jax.Array, v: jax.Array, emulate: bool = False) -> jax.Array:
  """Non-causal, unmasked attention with q, k, v, the probabilities and the output in float8_e4m3fn.

  q, k, v are each scaled by their absolute maximum into e4m3. The kernel holds the softmax numerator
  ``exp(s - rowmax)`` (in [0, 1]) times 448 in e4m3 for the P.V product (so P's largest entries keep e4m3's full
  precision) and normalises by the unrounded row sum; the output, bounded by max |v|, is written in e4m3 with v's
  scale and multiplied back here. ``emulate=True`` runs these roundings around XLA's float32 attention (any
  backend; it materialises the (L, S) probabilities, so it is for tests and small shapes).

  Args:
    q: (B, L, N, D); k, v: (B, S, N, D).
  Returns:
    (B, L, N, D) float32.
  """
  q8, sq = _to_e4m3(q)
  k8, sk = _to_e4m3(k)
  v8, sv = _to_e4m3(v)
  softmax_scale = 1.0 / math.sqrt(q.shape[-1])
  if emulate:
    logits = jnp.einsum("blnd,bsnd->bnls", q8.astype(jnp.float32), k8.astype(jnp.float32)) * (sq * sk *
                                                                                               softmax_scale)
    num = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # (B, N, L, S) in [0, 1]
    den = jnp.sum(num, axis=-1)  # (B, N, L)
    p8 = (num * _E4M3_MAX).astype(_E4M3).astype(jnp.float32) / _E4M3_MAX
    out = jnp.einsum("bnls,bsnd->blnd", p8, v8.astype(jnp.float32)) / jnp.moveaxis(den, 1, 2)[..., None]
    out8 = jnp.clip(out, -_E4M3_MAX, _E4M3_MAX).astype(_E4M3)  # output in v8's units (|out| <= max |v8|)
    return out8.astype(jnp.float32) * sv
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention  # private: no public FP8 entry point

  one = lambda x: jnp.reshape(jnp.asarray(x, jnp.float32), (1, 1, 1, 1))
  params = {name: one(1.0) for name in cudnn_attention.fp8_params_keys}  # backward-only entries stay unused
  params.update(descale_q=one(sq), descale_k=one(sk), descale_v=one(sv), scale_s=one(_E4M3_MAX),
                descale_s=one(1.0 / _E4M3_MAX), scale_o=one(1.0 / sv))
  out8, _, _ = cudnn_attention.dot_product_attention(q8, k8, v8, scale=softmax_scale, use_fp8=True,
                                                     fp8_params=params, qkv_layout="BTNH")
  return out8.astype(jnp.float32) * sv


class HeliosAttention(nnx.Module):
  """q/k/v projections, RMSNorm over all heads, optional RoPE and history-key amplification, output projection.

  Parameter names follow diffusers (``to_q``, ``to_k``, ``to_v``, ``to_out``, ``norm_q``, ``norm_k``,
  ``history_key_scale``).
  """

  def __init__(self, dim: int, heads: int, *, eps: float, param_dtype, precision=None,
               amplify_history: bool = False, history_scale_mode: str = "per_head", max_scale: float = 10.0,
               fuse_qkv: bool = False, rngs: nnx.Rngs):
    self.heads = heads
    self.fuse_qkv = fuse_qkv
    self.max_scale = max_scale
    self.amplify_history = amplify_history
    linear = lambda: nnx.Linear(dim, dim, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.to_q, self.to_k, self.to_v, self.to_out = linear(), linear(), linear(), linear()
    self.norm_q = RMSNorm(dim, eps=eps, param_dtype=param_dtype)
    self.norm_k = RMSNorm(dim, eps=eps, param_dtype=param_dtype)
    if amplify_history:
      n = {"per_head": heads, "scalar": 1}.get(history_scale_mode)
      if n is None:
        raise ValueError(f"unknown history_scale_mode {history_scale_mode!r}; expected 'per_head' or 'scalar'")
      # Reference initialises to ones and keeps it in float32 (_keep_in_fp32_modules).
      self.history_key_scale = nnx.Param(jnp.ones((n,), jnp.float32))

  def __call__(self, x: jax.Array, context: jax.Array | None = None, rope: tuple[jax.Array, jax.Array] | None = None,
               num_history: int = 0, implementation: str | None = None) -> jax.Array:
    """Self-attention (``context is None``) or cross-attention.

    Args:
      x: (B, L, D) queries' input.
      context: (B, S, D) keys'/values' input for cross-attention.
      rope: (cos, sin), each (B or 1, L, D_head / 2), for self-attention.
      num_history: the first ``num_history`` tokens are history (their keys are amplified when enabled).
    Returns:
      (B, L, D).
    """
    kv_in = x if context is None else context
    if context is None and self.fuse_qkv:
      # One (D, 3D) matmul instead of three (D, D) ones; the parameters stay separate (checkpoint layout).
      kernel = jnp.concatenate([self.to_q.kernel[...], self.to_k.kernel[...], self.to_v.kernel[...]], axis=1)
      bias = jnp.concatenate([self.to_q.bias[...], self.to_k.bias[...], self.to_v.bias[...]])
      qkv = jnp.dot(x, kernel.astype(x.dtype), precision=self.to_q.precision) + bias.astype(x.dtype)
      q, k, v = jnp.split(qkv, 3, axis=-1)
    else:
      q, k, v = self.to_q(x), self.to_k(kv_in), self.to_v(kv_in)
    q = rearrange(self.norm_q(q), "b l (n d) -> b l n d", n=self.heads)
    k = rearrange(self.norm_k(k), "b l (n d) -> b l n d", n=self.heads)
    v = rearrange(v, "b l (n d) -> b l n d", n=self.heads)
    if rope is not None:
      q = apply_rope(q, *rope)
      k = apply_rope(k, *rope)
    if context is None and self.amplify_history and num_history > 0:
      gain = 1.0 + jax.nn.sigmoid(self.history_key_scale[...]) * (self.max_scale - 1.0)  # (N,) or (1,)
      is_hist = (jnp.arange(k.shape[1]) < num_history)[None, :, None, None]
      k = jnp.where(is_hist, k * gain[None, None, :, None], k).astype(k.dtype)
    out = dot_product_attention(q, k, v, implementation)
    return self.to_out(rearrange(out, "b l n d -> b l (n d)"))
