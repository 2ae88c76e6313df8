"""FP8 weights for the transformer blocks (helios_jax.models.fp8): quantisation, the matmul, the quantised model.

On the CPU XLA computes the fp8 arithmetic exactly as written (e4m3 values widened, float32 accumulation), so these
tests bound the quantisation error itself. Bounds: e4m3 keeps 3 mantissa bits (relative rounding error <= 2^-4 =
6.25% per value, ~3.6% rms for random values), so one quantised matmul of random inputs lands near 4-5% relative
error; the tiny reference transformer (fixtures of tests/test_transformer.py) with all ten block linears quantised
was measured at 8.5e-3 (per-channel scales) and 8.7e-3 (per-tensor) relative error; its bound, 3e-2, leaves ~3.5x
headroom. A bug (wrong scale axis, a missing scale,
transposed kernel) gives errors of order 1.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helios_jax import HeliosTransformer3DModel, InputError
from helios_jax.models import fp8

FIX = os.path.join(os.path.dirname(__file__), "reference", "fixtures", "transformer")


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("scaling", fp8.SCALINGS)
def test_kernel_round_trip(scaling):
  w = jax.random.normal(jax.random.key(0), (3, 64, 48)) * jnp.geomspace(1e-4, 10.0, 48)  # channels of other sizes
  q, s = fp8.quantize_kernel(w, scaling)
  assert q.dtype == jnp.float8_e4m3fn and s.dtype == jnp.float32
  assert s.shape == ((3, 48) if scaling == "channel" else (3,))
  back = fp8.dequantize_kernel(q, s)
  err = rel_err(back, w)
  print(f"{scaling}: kernel rel_err {err:.3e}")
  assert err < 0.04
  # per channel, the smallest channels keep their precision; per tensor they fall into e4m3's subnormals
  small = rel_err(back[..., :4], w[..., :4])
  assert small < 0.05 if scaling == "channel" else small > 0.05


def test_matmul_matches_float_and_applies_bias():
  k = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(k[0], (2, 10, 64)).astype(jnp.bfloat16)
  w = jax.random.normal(k[1], (64, 32)) * 0.1
  b = jax.random.normal(k[2], (32,))
  q, s = fp8.quantize_kernel(w, "channel")
  y = fp8.fp8_linear(x, q, s, b)
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 10, 32)
  want = x.astype(jnp.float32) @ w + b
  err = rel_err(y, want)
  print(f"fp8 matmul rel_err {err:.3e}")
  assert 0.005 < err < 0.08  # it is quantised (not silently bf16), and close
  assert rel_err(fp8.fp8_linear(jnp.zeros_like(x), q, s, b), jnp.broadcast_to(b, want.shape)) < 1e-2  # x = 0


def test_quantised_tiny_model_stays_close():
  data = dict(np.load(os.path.join(FIX, "cases", "full_history.npz")))
  ref = data.pop("out")
  data.pop("out_bf16", None)
  model = HeliosTransformer3DModel.from_pretrained(os.path.join(FIX, "models", "base"), dtype=jnp.float32)
  base = np.asarray(model(**data))
  assert rel_err(base, ref) < 1e-5
  errs = {}
  for scaling in fp8.SCALINGS:
    q = HeliosTransformer3DModel.from_pretrained(os.path.join(FIX, "models", "base"), dtype=jnp.float32,
                                                 quantization="fp8", fp8_scaling=scaling)
    assert q.blocks.attn1.to_q.kernel[...].dtype == jnp.float8_e4m3fn
    assert q.blocks.ffn.proj_out.kernel_scale[...].shape == ((q.config.num_layers, q.config.inner_dim)
                                                              if scaling == "channel" else (q.config.num_layers,))
    assert q.proj_out.kernel[...].dtype == jnp.float32 and q.blocks.scale_shift_table[...].dtype == jnp.float32
    out = np.asarray(q(**data))
    assert np.isfinite(out).all()
    errs[scaling] = rel_err(out, ref)
  print("quantised tiny model rel_err:", errs)
  assert all(0 < e < 0.03 for e in errs.values()), errs


def test_bad_options():
  with pytest.raises(InputError, match="quantization must be"):
    HeliosTransformer3DModel.from_pretrained(os.path.join(FIX, "models", "base"), quantization="int4")
  with pytest.raises(InputError, match="fp8 scaling must be"):
    fp8.quantize_kernel(jnp.ones((4, 4)), "row")


def test_gemm_output_in_the_compute_dtype():
  """gemm_output="compute": the product is rounded to bf16 before the weight scale; within bf16's rounding of the
  float32-output result (relative 2^-8 per value), not the same bits."""
  x = jax.random.normal(jax.random.key(3), (8, 64)).astype(jnp.bfloat16)
  q, s = fp8.quantize_kernel(jax.random.normal(jax.random.key(4), (64, 32)), "tensor")
  a = np.asarray(fp8.fp8_linear(x, q, s, None), np.float32)
  b = np.asarray(fp8.fp8_linear(x, q, s, None, "compute"), np.float32)
  assert rel_err(b, a) < 2 ** -7
  with pytest.raises(InputError, match="gemm_output must be"):
    fp8.quantize_blocks(HeliosTransformer3DModel.from_pretrained(os.path.join(FIX, "models", "base")),
                        gemm_output="f16")


def test_fp8_attention_emulation_bounds_its_error():
  """FP8 attention (q, k, v, probabilities and output in e4m3, per-tensor scales), emulated on the CPU.

  Bound: four e4m3 roundings (q, k, v: 3 mantissa bits each; P: 3 bits after scaling its maximum to 448; the
  output: 3 bits) on random inputs measured 7.8e-2 relative error at these shapes (the output rounding alone is
  ~3.6% rms); 0.12 leaves ~1.5x headroom, while a wrong scale (v's scale dropped, q and k's applied twice) gives
  errors of order 1. The result must also differ from the unquantised attention (it is not silently bf16)."""
  from helios_jax.models import attention
  k = jax.random.split(jax.random.key(5), 3)
  q = jax.random.normal(k[0], (1, 96, 2, 32)) * 3.0
  kk = jax.random.normal(k[1], (1, 80, 2, 32))
  v = jax.random.normal(k[2], (1, 80, 2, 32)) * 0.01  # a small scale: a missing descale would show at once
  ref = np.asarray(attention.dot_product_attention(q, kk, v, "xla"))
  out = np.asarray(attention.dot_product_attention(q, kk, v, "xla_fp8"))
  err = rel_err(out, ref)
  print(f"fp8 attention rel_err {err:.3e}")
  assert 1e-3 < err < 0.12


def test_fp8_attention_option_on_the_tiny_model():
  """quantize_blocks(attention="fp8") switches the attention kernel (the emulation on the CPU); the tiny model's
  error grows but stays bounded (measured 1.0e-2 with the attention quantised as well vs 8.5e-3 without: bound
  3e-2)."""
  data = dict(np.load(os.path.join(FIX, "cases", "full_history.npz")))
  ref = data.pop("out")
  data.pop("out_bf16", None)
  model = HeliosTransformer3DModel.from_pretrained(os.path.join(FIX, "models", "base"), dtype=jnp.float32)
  fp8.quantize_blocks(model, "channel", attention="fp8")
  assert model.config.attention_implementation == "xla_fp8" and model.quantization == "fp8-channel+attention"
  out = np.asarray(model(**data))
  err = rel_err(out, ref)
  print(f"tiny model, fp8 blocks + fp8 attention: rel_err {err:.3e}")
  assert np.isfinite(out).all() and 0 < err < 3e-2
  with pytest.raises(InputError, match="fp8 attention must be"):
    fp8.quantize_blocks(model, attention="int8")
