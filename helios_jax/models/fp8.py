"""FP8 (float8_e4m3fn) weights for the transformer blocks' linear layers: quantisation and the matmul.

A quantised layer stores its kernel in float8_e4m3fn with float32 scales, per output channel (``"channel"``,
default) or one per layer (``"tensor"``); activations are scaled dynamically per tensor (their absolute maximum
maps to e4m3's largest finite value, 448) and rounded to e4m3 as well; the product accumulates in float32 and is
returned in the activations' dtype, then scaled by the weight scales (and the bias added). Written as
"dequantise, then dot" (``convert(x8) * s_x`` with a scalar ``s_x``, ``convert(w8)``): the pattern XLA's GPU
compiler rewrites into one cuBLASLt FP8 GEMM on Hopper (NVIDIA JAX-Toolbox, native FP8); elsewhere (the CPU) XLA
runs the same arithmetic in higher precision, so tests see the quantisation error itself.

Only the blocks' linear layers (self- and cross-attention q/k/v/out, FFN in/out) are quantised: patch embeddings,
the condition embedder, ``proj_out``, norms, modulation tables and the other float32 islands keep their dtypes.
``attention="fp8"`` also runs the attention itself in FP8 (cuDNN's FP8 flash attention on a GPU, its emulation
elsewhere: :func:`helios_jax.models.attention.fp8_attention`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax.errors import InputError

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = float(jnp.finfo(E4M3).max)  # 448
SCALINGS = ("channel", "tensor")
# The linear layers of a block that are quantised (attribute paths under HeliosTransformerBlock).
BLOCK_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out", "attn2.to_q", "attn2.to_k",
                 "attn2.to_v", "attn2.to_out", "ffn.proj_in", "ffn.proj_out")


def quantize_kernel(kernel: jax.Array, scaling: str = "channel") -> tuple[jax.Array, jax.Array]:
  """(..., in, out) kernel -> (float8_e4m3fn kernel, float32 scale (..., out) or (...)) with kernel ~ q * scale.

  Leading axes (the stacked layer axis) get scales of their own."""
  if scaling not in SCALINGS:
    raise InputError(f"fp8 scaling must be one of {SCALINGS}, got {scaling!r}")
  w = kernel.astype(jnp.float32)
  axes = (-2,) if scaling == "channel" else (-2, -1)
  amax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
  scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
  q = jnp.clip(w / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3)
  return q, jnp.squeeze(scale, axis=axes)


def dequantize_kernel(q: jax.Array, scale: jax.Array) -> jax.Array:
  """The float32 kernel a quantised one stands for ((..., in, out))."""
  s = scale[..., None, :] if scale.ndim == q.ndim - 1 else scale[..., None, None]
  return q.astype(jnp.float32) * s


GEMM_OUTPUTS = ("float32", "compute")
ATTENTIONS = ("bf16", "fp8")  # quantize_blocks(attention=...): the model's own attention kernel, or FP8 attention  # what the fp8 product returns before the weight scale: f32, or x's dtype


def fp8_linear(x: jax.Array, q: jax.Array, scale: jax.Array, bias: jax.Array | None,
               gemm_output: str = "float32") -> jax.Array:
  """(..., in) activations times a quantised (in, out) kernel (+ bias) -> (..., out) in ``x.dtype``.

  ``scale`` is (out,) (per channel) or () (per tensor); the activation scale is their absolute maximum / 448.
  ``gemm_output="compute"`` has the GEMM write ``x.dtype`` (half the bytes of float32; the weight scale and bias are
  then applied to the rounded product)."""
  dtype = x.dtype
  amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
  sx = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
  x8 = jnp.clip(x.astype(jnp.float32) / sx, -E4M3_MAX, E4M3_MAX).astype(E4M3)
  wide = jnp.bfloat16 if dtype == jnp.bfloat16 else jnp.float32
  out = jnp.float32 if gemm_output == "float32" else dtype
  y = jnp.dot(x8.astype(wide) * sx.astype(wide), q.astype(wide), preferred_element_type=out)
  y = y * scale.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(dtype)


class Fp8Linear(nnx.Module):
  """A linear layer with a float8_e4m3fn kernel (``kernel``, (in, out)), float32 ``kernel_scale`` ((out,) or ()) and
  the original ``bias``; built from an ``nnx.Linear`` by :func:`quantize_blocks` (stacked: a leading layer axis)."""

  def __init__(self, kernel: jax.Array, kernel_scale: jax.Array, bias: jax.Array | None,
               gemm_output: str = "float32"):
    self.kernel = nnx.Param(kernel)
    self.kernel_scale = nnx.Param(kernel_scale)
    self.bias = nnx.Param(bias) if bias is not None else None
    self.gemm_output = gemm_output

  def __call__(self, x: jax.Array) -> jax.Array:
    return fp8_linear(x, self.kernel[...], self.kernel_scale[...],
                      None if self.bias is None else self.bias[...], self.gemm_output)


def _resolve(module, path: str):
  parent = module
  *heads, leaf = path.split(".")
  for name in heads:
    parent = getattr(parent, name)
  return parent, leaf


def fp8_attention_implementation() -> str:
  """The FP8 attention kernel for this process's backend: cuDNN's on a GPU, the XLA emulation elsewhere."""
  return "cudnn_fp8" if jax.default_backend() == "gpu" else "xla_fp8"


def quantize_blocks(model: Any, scaling: str = "channel", gemm_output: str = "float32",
                    attention: str = "bf16") -> int:
  """Replaces the blocks' linear layers of a ``HeliosTransformer3DModel`` with :class:`Fp8Linear` in place, one
  stacked kernel at a time (each bf16 kernel is deleted once quantised, so device memory only shrinks). Returns
  the number of parameters now stored in fp8. ``attention="fp8"`` switches the model's attention kernel to FP8
  (:func:`fp8_attention_implementation`). Call before the model is handed to a pipeline."""
  if getattr(model.config, "fuse_qkv", False):
    raise InputError("fp8 quantisation and fuse_qkv do not go together (the fused path concatenates bf16 kernels)")
  if gemm_output not in GEMM_OUTPUTS:  # (a bad scaling is refused by quantize_kernel, before any layer changes)
    raise InputError(f"fp8 gemm_output must be one of {GEMM_OUTPUTS}, got {gemm_output!r}")
  if attention not in ATTENTIONS:
    raise InputError(f"fp8 attention must be one of {ATTENTIONS}, got {attention!r}")
  if attention == "fp8":
    model.config = dataclasses.replace(model.config, attention_implementation=fp8_attention_implementation())
  quantize = jax.jit(lambda w: quantize_kernel(w, scaling))
  count = 0
  for path in BLOCK_LINEARS:
    parent, name = _resolve(model.blocks, path)
    layer = getattr(parent, name)
    if isinstance(layer, Fp8Linear):
      continue
    kernel = layer.kernel[...]
    q, scale = quantize(kernel)
    bias = None if layer.bias is None else layer.bias[...]
    setattr(parent, name, Fp8Linear(q, scale, bias, gemm_output))
    count += int(np.prod(q.shape))
    if isinstance(kernel, jax.Array):
      kernel.delete()
  model.quantization = f"fp8-{scaling}" + ("+attention" if attention == "fp8" else "")
  return count


__all__ = ["E4M3_MAX", "Fp8Linear", "dequantize_kernel", "fp8_attention_implementation", "fp8_linear",
           "quantize_blocks", "quantize_kernel"]
