"""Building blocks of the Wan2.1 VAE (channels-last: every ``x`` is ``(B, T, H, W, C)``): the causal 3D
convolution, per-frame 2D convolution, RMS norm, residual / attention / resample blocks, and the encoder and
decoder stacks that :class:`helios_jax.models.vae.AutoencoderKLWan` assembles. The whole-sequence formulation
they implement is described in :mod:`helios_jax.models.vae`."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from helios_jax.models.vae_config import WanVAEConfig

# (input, kernel, output) layouts of every 3D convolution: channels-last.
_CONV3D_DIMS = ("NDHWC", "DHWIO", "NDHWC")


def _kernel_init(key, shape, dtype):
  """torch's default conv init scale: uniform(+-1/sqrt(fan_in)); fan_in = all dims but the last."""
  fan_in = int(np.prod(shape[:-1]))
  bound = 1.0 / np.sqrt(fan_in)
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class CausalConv3d(nnx.Module):
  """Time-causal 3D convolution (``WanCausalConv3d``): (B, T, H, W, Cin) -> (B, T', H', W', Cout).

  The configured padding ``(pt, ph, pw)`` becomes ``2 * pt`` zero frames in front of the clip (none behind) and a
  symmetric ``ph`` / ``pw`` zero border. ``kernel`` is stored as ``(kT, kH, kW, Cin, Cout)``.
  """

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int] = 3,
               stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    ks = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
    self.stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
    pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
    self.padding = ((2 * pt, 0), (ph, ph), (pw, pw))
    self.pointwise = ks == (1, 1, 1) and self.stride == (1, 1, 1) and (pt, ph, pw) == (0, 0, 0)
    self.kernel = nnx.Param(_kernel_init(rngs.params(), (*ks, in_channels, out_channels), dtype))
    self.bias = nnx.Param(jnp.zeros((out_channels,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel[...]
    if self.pointwise:
      y = jnp.einsum("bthwi,io->bthwo", x, k[0, 0, 0])
    else:
      y = jax.lax.conv_general_dilated(x, k, window_strides=self.stride, padding=self.padding,
                                       dimension_numbers=_CONV3D_DIMS)
    return y + self.bias[...]


class FrameConv2d(nnx.Module):
  """A 2D convolution applied to every frame: (B, T, H, W, Cin) -> (B, T, H', W', Cout).

  ``padding`` is ``((top, bottom), (left, right))``; ``kernel`` is stored as ``(kH, kW, Cin, Cout)``.
  """

  def __init__(self, in_channels: int, out_channels: int, *, stride: int, padding, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.stride = (1, stride, stride)
    self.padding = ((0, 0), *[tuple(p) for p in padding])
    self.kernel = nnx.Param(_kernel_init(rngs.params(), (3, 3, in_channels, out_channels), dtype))
    self.bias = nnx.Param(jnp.zeros((out_channels,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(x, self.kernel[...][None], window_strides=self.stride, padding=self.padding,
                                     dimension_numbers=_CONV3D_DIMS)
    return y + self.bias[...]


class RMSNorm(nnx.Module):
  """``WanRMS_norm`` over the channel (last) axis: ``x / max(||x||_2, 1e-12) * sqrt(C) * gamma``.

  The L2 normalisation runs in fp32 and is cast back to x's dtype before the scale and gamma multiplies, as the
  reference does for 16-bit inputs. (..., C) -> (..., C).
  """

  def __init__(self, dim: int, *, dtype=jnp.float32):
    self.scale = float(dim) ** 0.5
    self.gamma = nnx.Param(jnp.ones((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
    y = (x32 / jnp.maximum(norm, 1e-12)).astype(x.dtype)
    return y * self.scale * self.gamma[...]


class ResidualBlock(nnx.Module):
  """``WanResidualBlock``: (B, T, H, W, Cin) -> (B, T, H, W, Cout).

  ``conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x)``; the shortcut is a 1x1x1 conv when Cin != Cout.
  Dropout is an inference no-op.
  """

  def __init__(self, in_dim: int, out_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.norm1 = RMSNorm(in_dim, dtype=dtype)
    self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1, dtype=dtype, rngs=rngs)
    self.norm2 = RMSNorm(out_dim, dtype=dtype)
    self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1, dtype=dtype, rngs=rngs)
    self.conv_shortcut = (CausalConv3d(in_dim, out_dim, 1, dtype=dtype, rngs=rngs) if in_dim != out_dim
                          else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x if self.conv_shortcut is None else self.conv_shortcut(x)
    x = self.conv1(jax.nn.silu(self.norm1(x)))
    x = self.conv2(jax.nn.silu(self.norm2(x)))
    return x + h


class AttentionBlock(nnx.Module):
  """``WanAttentionBlock``: single-head self-attention inside each frame; (B, T, H, W, C) -> same.

  RMS norm, 1x1 projection to ``[q | k | v]`` (C channels each), softmax attention over the H*W positions with
  scale 1/sqrt(C), 1x1 output projection, residual add.
  """

  def __init__(self, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.norm = RMSNorm(dim, dtype=dtype)
    self.to_qkv = nnx.Linear(dim, 3 * dim, dtype=dtype, param_dtype=dtype, kernel_init=_kernel_init, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, dtype=dtype, param_dtype=dtype, kernel_init=_kernel_init, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, h, w, c = x.shape
    qkv = self.to_qkv(self.norm(x))
    qkv = rearrange(qkv, "b t h w (k n c) -> k (b t) (h w) n c", k=3, n=1)
    y = jax.nn.dot_product_attention(qkv[0], qkv[1], qkv[2])
    y = rearrange(y, "(b t) (h w) 1 c -> b t h w c", b=b, h=h)
    return self.proj(y) + x


def _upsample_nearest2x(x: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x spatial upsampling: (B, T, H, W, C) -> (B, T, 2H, 2W, C)."""
  b, t, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, :, None, :, None, :], (b, t, h, 2, w, 2, c))
  return x.reshape(b, t, 2 * h, 2 * w, c)


class Resample(nnx.Module):
  """``WanResample`` in one of four modes; (B, T, H, W, C) in, channels-last out.

  * ``downsample2d``: per frame, pad one zero row/column at the bottom/right, 3x3 conv stride 2 (C -> C).
  * ``downsample3d``: the same, then frame 0 is kept and a stride-2 temporal conv (kernel 3, no padding) over the
    whole sequence appends ``(T - 1) // 2`` frames: T -> 1 + (T - 1) // 2.
  * ``upsample2d``: per frame, nearest 2x, 3x3 conv padding 1 (C -> C // 2).
  * ``upsample3d``: frame 0 is kept; frames 1.. go through a causal temporal conv C -> 2C whose halves become two
    sub-frames in the order t1a, t1b, t2a, ...: T -> 1 + 2 (T - 1); then the upsample2d step.
  """

  MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

  def __init__(self, dim: int, mode: str, *, dtype=jnp.float32, rngs: nnx.Rngs):
    if mode not in self.MODES:
      raise ValueError(f"unknown resample mode {mode!r}")
    self.mode = mode
    if mode.startswith("down"):
      self.resample = FrameConv2d(dim, dim, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs)
    else:
      self.resample = FrameConv2d(dim, dim // 2, stride=1, padding=((1, 1), (1, 1)), dtype=dtype, rngs=rngs)
    if mode == "downsample3d":
      self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=0, dtype=dtype, rngs=rngs)
    elif mode == "upsample3d":
      self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0), dtype=dtype, rngs=rngs)
    else:
      self.time_conv = None

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.mode == "upsample3d" and x.shape[1] > 1:
      y = self.time_conv(x[:, 1:])
      y = rearrange(y, "b t h w (k c) -> b (t k) h w c", k=2)
      x = jnp.concatenate([x[:, :1], y], axis=1)
    if self.mode.startswith("up"):
      x = _upsample_nearest2x(x)
    x = self.resample(x)
    if self.mode == "downsample3d" and x.shape[1] >= 3:
      x = jnp.concatenate([x[:, :1], self.time_conv(x)], axis=1)
    return x


class MidBlock(nnx.Module):
  """``WanMidBlock``: resblock, per-frame attention, resblock; (B, T, H, W, C) -> same."""

  def __init__(self, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResidualBlock(dim, dim, dtype=dtype, rngs=rngs),
                             ResidualBlock(dim, dim, dtype=dtype, rngs=rngs)])
    self.attentions = nnx.List([AttentionBlock(dim, dtype=dtype, rngs=rngs)])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    for attn, resnet in zip(self.attentions, self.resnets[1:]):
      x = resnet(attn(x))
    return x


class UpBlock(nnx.Module):
  """``WanUpBlock``: ``num_res_blocks + 1`` resblocks, then an optional upsampler."""

  def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    resnets = []
    for _ in range(num_res_blocks + 1):
      resnets.append(ResidualBlock(in_dim, out_dim, dtype=dtype, rngs=rngs))
      in_dim = out_dim
    self.resnets = nnx.List(resnets)
    self.upsamplers = (nnx.List([Resample(out_dim, upsample_mode, dtype=dtype, rngs=rngs)])
                       if upsample_mode else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


class Encoder3d(nnx.Module):
  """``WanEncoder3d``: (B, F, H, W, Cin) with F = 1 + 4k -> (B, 1 + k, H/8, W/8, 2 z_dim) (Wan2.1 config)."""

  def __init__(self, cfg: WanVAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1, dtype=dtype, rngs=rngs)
    blocks: list[nnx.Module] = []
    n_stages = len(cfg.dim_mult)
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(cfg.num_res_blocks):
        blocks.append(ResidualBlock(in_dim, out_dim, dtype=dtype, rngs=rngs))
        in_dim = out_dim
      if i != n_stages - 1:
        mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
        blocks.append(Resample(out_dim, mode, dtype=dtype, rngs=rngs))
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(dims[-1], dtype=dtype, rngs=rngs)
    self.norm_out = RMSNorm(dims[-1], dtype=dtype)
    self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.norm_out(x)))


class Decoder3d(nnx.Module):
  """``WanDecoder3d``: (B, T, h, w, z_dim) -> (B, 1 + 4 (T - 1), 8h, 8w, Cout) (Wan2.1 config), not clamped."""

  def __init__(self, cfg: WanVAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    base = cfg.decoder_base_dim or cfg.base_dim
    mult = cfg.dim_mult
    dims = [base * m for m in (mult[-1], *mult[::-1])]
    temperal_upsample = tuple(cfg.temperal_downsample)[::-1]
    self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1, dtype=dtype, rngs=rngs)
    self.mid_block = MidBlock(dims[0], dtype=dtype, rngs=rngs)
    blocks = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      if i > 0:
        in_dim //= 2  # the previous upsampler halved the channels
      mode = None
      if i != len(mult) - 1:
        mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
      blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, mode, dtype=dtype, rngs=rngs))
    self.up_blocks = nnx.List(blocks)
    self.norm_out = RMSNorm(dims[-1], dtype=dtype)
    self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(x))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.norm_out(x)))
