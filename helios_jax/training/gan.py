"""The GAN part of stage 3 (training-spec 7.7): discriminator heads, crops, non-saturating losses, approximate R1/R2.

The discriminator is the critic trunk (frozen base + critic LoRA) with heads on the target tokens of a few hooked
blocks plus one head on the output velocity. Heads are plain parameter dicts (float32) so they live in the critic's
trainable pytree next to its LoRA. Sign convention of the reference: a *low* logit means real.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from einops import rearrange

from helios_jax.errors import InputError

# (kernel, stride, padding) of the reference's Discriminator3DHead convolutions, (t, h, w) order; each is followed
# by GroupNorm and SiLU, then a global average pool and Linear(width -> 1).
HEAD_LAYERS = (((3, 3, 3), (1, 1, 1), (1, 1, 1)),
               ((4, 4, 4), (2, 2, 2), (1, 1, 1)),
               ((4, 4, 4), (2, 2, 2), (1, 1, 1)),
               ((3, 3, 3), (2, 1, 1), (1, 1, 1)),
               ((3, 3, 3), (2, 1, 1), (1, 1, 1)),
               ((1, 3, 3), (1, 1, 1), (0, 1, 1)))
GROUPNORM_EPS = 1e-5  # torch.nn.GroupNorm default


def _uniform(key, shape, bound):
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def init_head(key: jax.Array, in_channels: int, width: int, groups: int) -> dict:
  """Parameters of one head with PyTorch's default init (U(+-1/sqrt(fan_in)) for weights and biases)."""
  if width % groups:
    raise InputError(f"gan head width {width} must be a multiple of its group count {groups}")
  layers, cin = [], in_channels
  keys = jax.random.split(key, 2 * len(HEAD_LAYERS) + 2)
  for i, (k, _, _) in enumerate(HEAD_LAYERS):
    bound = 1.0 / float(cin * k[0] * k[1] * k[2]) ** 0.5
    layers.append(dict(kernel=_uniform(keys[2 * i], k + (cin, width), bound),
                       bias=_uniform(keys[2 * i + 1], (width,), bound),
                       gn_scale=jnp.ones((width,), jnp.float32), gn_bias=jnp.zeros((width,), jnp.float32)))
    cin = width
  bound = 1.0 / width ** 0.5
  return dict(layers=layers, out_kernel=_uniform(keys[-2], (width, 1), bound),
              out_bias=_uniform(keys[-1], (1,), bound))


def init_heads(key: jax.Array, *, num_hooks: int, hidden_dim: int, out_channels: int, width: int, groups: int,
               use_hooks: bool = True, use_final: bool = True) -> dict:
  """``{"hooks": [head per hooked block], "final": head on the velocity}`` (keys of unused heads left out)."""
  if not (use_hooks and num_hooks) and not use_final:
    raise InputError("the GAN needs hook heads, a final head, or both")
  k_hooks, k_final = jax.random.split(key)
  heads = {}
  if use_hooks and num_hooks:
    heads["hooks"] = [init_head(jax.random.fold_in(k_hooks, i), hidden_dim, width, groups) for i in range(num_hooks)]
  if use_final:
    heads["final"] = init_head(k_final, out_channels, width, groups)
  return heads


def _group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int) -> jax.Array:
  """GroupNorm over channels-last (B, T, H, W, C) in float32."""
  g = rearrange(x, "b t h w (g c) -> b t h w g c", g=groups)
  mean = g.mean(axis=(1, 2, 3, 5), keepdims=True)
  var = jnp.square(g - mean).mean(axis=(1, 2, 3, 5), keepdims=True)
  g = (g - mean) * jax.lax.rsqrt(var + GROUPNORM_EPS)
  return rearrange(g, "b t h w g c -> b t h w (g c)") * scale + bias


def apply_head(params: dict, x: jax.Array, groups: int) -> jax.Array:
  """(B, T, H, W, C) channels-last features -> (B,) logits (float32)."""
  h = x.astype(jnp.float32)
  for layer, (_, stride, pad) in zip(params["layers"], HEAD_LAYERS):
    h = jax.lax.conv_general_dilated(h, layer["kernel"], window_strides=stride, padding=[(p, p) for p in pad],
                                     dimension_numbers=("NDHWC", "DHWIO", "NDHWC")) + layer["bias"]
    h = jax.nn.silu(_group_norm(h, layer["gn_scale"], layer["gn_bias"], groups))
  h = h.mean(axis=(1, 2, 3))
  return (h @ params["out_kernel"] + params["out_bias"])[:, 0]


def head_logits(heads: dict, velocity: jax.Array, features: Sequence[jax.Array], grid: tuple[int, int, int],
                groups: int) -> jax.Array:
  """(B, n_heads) logits: final head on the velocity (B, C, T, H, W), then one per hooked feature (B, N, D).

  ``grid`` is the target-token grid (t, h, w) of the features.
  """
  logits = []
  if "final" in heads:
    logits.append(apply_head(heads["final"], rearrange(velocity, "b c t h w -> b t h w c"), groups))
  for head, f in zip(heads.get("hooks", []), features):
    t, h, w = grid
    logits.append(apply_head(head, rearrange(f, "b (t h w) d -> b t h w d", t=t, h=h, w=w), groups))
  return jnp.stack(logits, axis=1)


def draw_crop(key: jax.Array, batch: int, size: tuple[int, int], crop: tuple[int, int]) -> jax.Array:
  """(B, 2) int32 top/left offsets of a ``crop`` window inside ``size``, uniform and independent per sample."""
  (h, w), (ch, cw) = size, crop
  k1, k2 = jax.random.split(key)
  return jnp.stack([jax.random.randint(k1, (batch,), 0, h - ch + 1), jax.random.randint(k2, (batch,), 0, w - cw + 1)],
                   axis=1).astype(jnp.int32)


def crop(x: jax.Array, offsets: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(B, C, T, H, W) -> (B, C, T, ch, cw) windows at per-sample ``offsets`` (B, 2)."""
  ch, cw = size

  def one(xi, o):
    return jax.lax.dynamic_slice(xi, (0, 0, o[0], o[1]), xi.shape[:2] + (ch, cw))

  return jax.vmap(one)(x, offsets)


def crop_size(height: int, width: int, scale: float, multiple: int) -> tuple[int, int]:
  """``int(H scale), int(W scale)`` (the reference's crop), rounded down to a multiple of the patch size."""
  ch, cw = int(height * scale) // multiple * multiple, int(width * scale) // multiple * multiple
  if ch < multiple or cw < multiple:
    raise InputError(f"a GAN crop of scale {scale} of {height}x{width} latents is smaller than one patch")
  return ch, cw


def d_loss(logits_fake: jax.Array, logits_real: jax.Array) -> jax.Array:
  """Non-saturating discriminator loss ``mean softplus(-D(fake)) + mean softplus(D(real))`` (unweighted)."""
  return jnp.mean(jax.nn.softplus(-logits_fake)) + jnp.mean(jax.nn.softplus(logits_real))


def g_loss(logits_fake: jax.Array) -> jax.Array:
  """Generator loss ``mean softplus(D(fake))``."""
  return jnp.mean(jax.nn.softplus(logits_fake))


def approx_penalty(logits: jax.Array, logits_perturbed: jax.Array, sigma: float, approximate: bool) -> jax.Array:
  """R1 (on real) / R2 (on fake) by finite differences of the logits under an ``N(0, sigma^2)`` input perturbation.

  ``approximate=True`` (the reference's ``aprox_r1``): ``mean((D(x) - D(x + sigma n))^2)``; otherwise the
  difference quotient ``mean(((D(x + sigma n) - D(x)) / sigma)^2)``. The caller multiplies by the weight.
  """
  diff = logits_perturbed.astype(jnp.float32) - logits.astype(jnp.float32)
  if not approximate:
    diff = diff / sigma
  return jnp.mean(jnp.square(diff))
