"""The Helios DiT (``HeliosTransformer3DModel``) in Flax NNX.

Computes what diffusers 0.42.1's class of the same name computes (see ``../shared/notes/inference-spec.md`` §1):
patch embedding of the noisy chunk and of the short/mid/long memory streams, 3D RoPE from frame indices, zero-history
timestep conditioning, ``num_layers`` Wan-style blocks (stacked and run with ``nnx.scan``), output norm on the noisy
tokens and unpatchify. Token order is ``[long | mid | short | noisy]``; the noisy tokens are always the last ``L_n``.

Public layout is diffusers' ``(B, C, T, H, W)``; inside, tokens are ``(B, L, D)`` channels-last.

Mixed precision follows the reference's ``_keep_in_fp32_modules``: with ``dtype=bfloat16`` the time embedder,
every ``scale_shift_table``, ``norm2`` and ``history_key_scale`` stay float32 and LayerNorm statistics, modulation and
the self-attention/FFN residual adds run in float32 and are rounded once; the cross-attention residual is a plain add
in the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from helios_jax.errors import CheckpointError, InputError
from helios_jax.models.attention import HeliosAttention, resolve_implementation
from helios_jax.models.embeddings import HeliosTimeTextEmbedding, gelu_tanh
from helios_jax.models.normalization import FP32LayerNorm, layer_norm
from helios_jax.models.rope import flat_rope_table, pooled_rope_table

# Names of the released checkpoints' config.json fields (diffusers' HeliosTransformer3DModel.__init__ arguments).
_JSON_FIELDS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
                "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "added_kv_proj_dim",
                "rope_dim", "rope_theta", "guidance_cross_attn", "zero_history_timestep",
                "has_multi_term_memory_patch", "is_amplify_history", "history_scale_mode")

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
LAYER_LOOPS = ("scan", "unrolled")


@dataclasses.dataclass(frozen=True)
class HeliosTransformerConfig:
  """Architecture (the ``config.json`` fields, defaults = the released 14B models) plus runtime options.

  Runtime options (not in ``config.json``):
    dtype: parameter and compute dtype, ``"float32"`` or ``"bfloat16"`` (the fp32 islands stay float32).
    attention_implementation: ``"auto"``, ``"xla"`` or ``"cudnn"`` (see ``helios_jax.models.attention``).
    remat_policy: ``"none"`` (no rematerialisation), ``"full"`` (save nothing per block), ``"dots"`` or
      ``"dots_no_batch"`` (``jax.checkpoint_policies`` that keep matmul outputs).
    precision: ``jax.lax.Precision`` name for the linear layers (``None`` = backend default).
    fuse_qkv: run the self-attention q/k/v projections as one matmul (same parameters; a speed option).
    layer_loop: ``"scan"`` (one ``lax.scan`` over the stacked blocks: small program, fast compile) or
      ``"unrolled"`` (a Python loop over static per-layer slices: a 40x larger program; see
      :meth:`HeliosTransformer3DModel.forward`'s ``layer_states`` for weights stored per layer).
  """

  patch_size: tuple[int, int, int] = (1, 2, 2)
  num_attention_heads: int = 40
  attention_head_dim: int = 128
  in_channels: int = 16
  out_channels: int = 16
  text_dim: int = 4096
  freq_dim: int = 256
  ffn_dim: int = 13824
  num_layers: int = 40
  cross_attn_norm: bool = True
  qk_norm: str = "rms_norm_across_heads"
  eps: float = 1e-6
  added_kv_proj_dim: int | None = None
  rope_dim: tuple[int, int, int] = (44, 42, 42)
  rope_theta: float = 10000.0
  guidance_cross_attn: bool = True
  zero_history_timestep: bool = True
  has_multi_term_memory_patch: bool = True
  is_amplify_history: bool = False
  history_scale_mode: str = "per_head"
  # runtime
  dtype: str = "float32"
  attention_implementation: str = "auto"
  remat_policy: str = "none"
  precision: str | None = None
  fuse_qkv: bool = False
  layer_loop: str = "scan"

  def __post_init__(self):
    for name in ("patch_size", "rope_dim"):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    errors = []
    if self.qk_norm != "rms_norm_across_heads":
      errors.append(f"qk_norm={self.qk_norm!r} (only 'rms_norm_across_heads' is used by Helios)")
    if self.added_kv_proj_dim is not None:
      errors.append("added_kv_proj_dim (Helios has no image branch)")
    if sum(self.rope_dim) != self.attention_head_dim:
      errors.append(f"rope_dim {self.rope_dim} does not sum to attention_head_dim {self.attention_head_dim}")
    if any(d % 2 for d in self.rope_dim):
      errors.append(f"rope_dim {self.rope_dim} must be even per axis")
    if self.history_scale_mode not in ("per_head", "scalar"):
      errors.append(f"history_scale_mode={self.history_scale_mode!r}")
    if self.dtype not in ("float32", "bfloat16"):
      errors.append(f"dtype={self.dtype!r} (use 'float32' or 'bfloat16')")
    if self.remat_policy not in REMAT_POLICIES:
      errors.append(f"remat_policy={self.remat_policy!r} (choose from {REMAT_POLICIES})")
    if self.layer_loop not in LAYER_LOOPS:
      errors.append(f"layer_loop={self.layer_loop!r} (choose from {LAYER_LOOPS})")
    if errors:
      raise InputError("unsupported transformer config: " + "; ".join(errors))

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def param_dtype(self):
    return jnp.dtype(self.dtype)

  @classmethod
  def from_dict(cls, d: dict, **runtime) -> "HeliosTransformerConfig":
    """Builds a config from a diffusers ``config.json`` dict (``_``-prefixed keys ignored)."""
    unknown = sorted(k for k in d if not k.startswith("_") and k not in _JSON_FIELDS)
    if unknown:
      raise CheckpointError(f"transformer config.json has unknown field(s): {', '.join(unknown)}")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in _JSON_FIELDS}
    if kwargs.get("out_channels") is None:
      kwargs["out_channels"] = kwargs.get("in_channels", cls.in_channels)
    return cls(**kwargs, **runtime)

  def to_dict(self) -> dict:
    """The ``config.json`` dict diffusers writes for this architecture."""
    d = {k: getattr(self, k) for k in _JSON_FIELDS}
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    return {"_class_name": "HeliosTransformer3DModel", "_diffusers_version": "0.42.1", **d}

  @classmethod
  def tiny(cls, **overrides) -> "HeliosTransformerConfig":
    """A 2-layer, 64-wide model for tests (head dim 16 with rope_dim (4, 6, 6))."""
    base = dict(num_attention_heads=4, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2,
                rope_dim=(4, 6, 6), in_channels=4, out_channels=4)
    base.update(overrides)
    return cls(**base)


class PatchEmbed3D(nnx.Module):
  """Conv3d with kernel = stride, written as a matmul over flattened patches.

  ``kernel`` is (kt*kh*kw*C_in, D) with rows ordered (kt, kh, kw, C_in); a torch Conv3d weight (D, C_in, kt, kh, kw)
  maps to it by ``w.transpose(2, 3, 4, 1, 0).reshape(-1, D)``.
  """

  def __init__(self, in_channels: int, dim: int, kernel: Sequence[int], *, param_dtype, precision=None,
               rngs: nnx.Rngs):
    self.kernel_size = tuple(kernel)
    self.proj = nnx.Linear(int(np.prod(kernel)) * in_channels, dim, param_dtype=param_dtype, precision=precision,
                           rngs=rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[int, int, int]]:
    """(B, C, T, H, W) with T, H, W multiples of the kernel -> tokens (B, T'*H'*W', D) and grid (T', H', W')."""
    kt, kh, kw = self.kernel_size
    grid = (x.shape[2] // kt, x.shape[3] // kh, x.shape[4] // kw)
    patches = rearrange(x, "b c (t i) (h j) (w k) -> b (t h w) (i j k c)", i=kt, j=kh, k=kw)
    return self.proj(patches), grid


def _replicate_pad(x: jax.Array, multiples: Sequence[int]) -> jax.Array:
  """Edge-pads (B, C, T, H, W) at the end of T, H, W up to multiples."""
  pad = [(0, 0), (0, 0)] + [(0, (m - s % m) % m) for s, m in zip(x.shape[2:], multiples)]
  return jnp.pad(x, pad, mode="edge")


class FeedForward(nnx.Module):
  """Linear -> tanh-GELU -> Linear (diffusers' ``ffn.net.0.proj`` / ``ffn.net.2``)."""

  def __init__(self, dim: int, hidden: int, *, param_dtype, precision=None, rngs: nnx.Rngs):
    self.proj_in = nnx.Linear(dim, hidden, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.proj_out = nnx.Linear(hidden, dim, param_dtype=param_dtype, precision=precision, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj_out(gelu_tanh(self.proj_in(x)))


@dataclasses.dataclass(frozen=True)
class _BlockContext:
  """Per-forward constants every block reads (static ints plus arrays)."""
  num_history: int
  num_noisy: int


class HeliosTransformerBlock(nnx.Module):
  """Self-attention over all tokens, (guidance) cross-attention, FFN; adaLN modulation per token."""

  def __init__(self, cfg: HeliosTransformerConfig, *, rngs: nnx.Rngs):
    dim, pd, prec = cfg.inner_dim, cfg.param_dtype, cfg.precision
    self.eps = cfg.eps
    self.guidance_cross_attn = cfg.guidance_cross_attn
    self.attn1 = HeliosAttention(dim, cfg.num_attention_heads, eps=cfg.eps, param_dtype=pd, precision=prec,
                                 amplify_history=cfg.is_amplify_history,
                                 history_scale_mode=cfg.history_scale_mode, fuse_qkv=cfg.fuse_qkv, rngs=rngs)
    self.attn2 = HeliosAttention(dim, cfg.num_attention_heads, eps=cfg.eps, param_dtype=pd, precision=prec, rngs=rngs)
    self.norm2 = FP32LayerNorm(dim, eps=cfg.eps, affine=True) if cfg.cross_attn_norm else None
    self.ffn = FeedForward(dim, cfg.ffn_dim, param_dtype=pd, precision=prec, rngs=rngs)
    # (shift, scale, gate) for self-attention, then for the FFN; float32 (_keep_in_fp32_modules).
    self.scale_shift_table = nnx.Param(
        jax.random.normal(rngs.params(), (6, dim), jnp.float32) / math.sqrt(dim))

  def __call__(self, x: jax.Array, context: jax.Array, tproj_history: jax.Array, tproj_noisy: jax.Array,
               rope: tuple[jax.Array, jax.Array], ctx: _BlockContext, implementation: str) -> jax.Array:
    """One block.

    Args:
      x: (B, L, D) tokens [history | noisy], L = num_history + num_noisy.
      context: (B, S, D) projected text.
      tproj_history, tproj_noisy: (B or 1, 6, D) modulation projections for history and noisy tokens.
      rope: (cos, sin), each (B or 1, L, P).
    """
    table = self.scale_shift_table[...]
    mod_h = table + tproj_history.astype(jnp.float32)
    mod_n = table + tproj_noisy.astype(jnp.float32)
    is_hist = (jnp.arange(x.shape[1]) < ctx.num_history)[None, :, None]

    def mod(i):  # (B, L, D) float32, fused by XLA; never materialises (B, L, 6, D).
      return jnp.where(is_hist, mod_h[:, None, i], mod_n[:, None, i])

    dtype = x.dtype
    h = (layer_norm(x, self.eps) * (1 + mod(1)) + mod(0)).astype(dtype)
    a = self.attn1(h, rope=rope, num_history=ctx.num_history, implementation=implementation)
    x = (x.astype(jnp.float32) + a * mod(2)).astype(dtype)

    def cross(tokens):
      n = tokens.astype(jnp.float32) if self.norm2 is None else self.norm2(tokens)
      return tokens + self.attn2(n.astype(dtype), context, implementation=implementation)

    if self.guidance_cross_attn:
      x = jnp.concatenate([x[:, :ctx.num_history], cross(x[:, ctx.num_history:])], axis=1)
    else:
      x = cross(x)

    h = (layer_norm(x, self.eps) * (1 + mod(4)) + mod(3)).astype(dtype)
    f = self.ffn(h)
    return (x.astype(jnp.float32) + f.astype(jnp.float32) * mod(5)).astype(dtype)


class HeliosOutputNorm(nnx.Module):
  """Non-affine LayerNorm modulated by (shift, scale) = scale_shift_table + temb (pre-SiLU), noisy tokens only."""

  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
    self.eps = eps
    self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (2, dim), jnp.float32) / math.sqrt(dim))

  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    """x: (B, L_n, D); temb: (B, D) -> (B, L_n, D) in x's dtype."""
    m = self.scale_shift_table[...][None] + temb[:, None, :].astype(jnp.float32)  # (B, 2, D)
    return (layer_norm(x, self.eps) * (1 + m[:, 1:2]) + m[:, 0:1]).astype(x.dtype)


_POLICIES = {
    "full": lambda: jax.checkpoint_policies.nothing_saveable,
    "dots": lambda: jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class HeliosTransformer3DModel(nnx.Module):
  """Helios DiT. Build with a :class:`HeliosTransformerConfig` or load with :meth:`from_pretrained`.

  Call with diffusers' keyword names on numpy or JAX arrays in diffusers' layout; see :meth:`__call__`.
  """

  config_class = HeliosTransformerConfig

  def __init__(self, config: HeliosTransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    cfg, dim, pd, prec = config, config.inner_dim, config.param_dtype, config.precision
    p = cfg.patch_size
    self.patch_embedding = PatchEmbed3D(cfg.in_channels, dim, p, param_dtype=pd, precision=prec, rngs=rngs)
    if cfg.has_multi_term_memory_patch:
      self.patch_short = PatchEmbed3D(cfg.in_channels, dim, p, param_dtype=pd, precision=prec, rngs=rngs)
      self.patch_mid = PatchEmbed3D(cfg.in_channels, dim, tuple(2 * v for v in p), param_dtype=pd, precision=prec,
                                    rngs=rngs)
      self.patch_long = PatchEmbed3D(cfg.in_channels, dim, tuple(4 * v for v in p), param_dtype=pd, precision=prec,
                                     rngs=rngs)
    self.condition_embedder = HeliosTimeTextEmbedding(dim, cfg.freq_dim, cfg.text_dim, param_dtype=pd,
                                                      precision=prec, rngs=rngs)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(r):
      return HeliosTransformerBlock(cfg, rngs=r)

    self.blocks = make_blocks(rngs)
    self.norm_out = HeliosOutputNorm(dim, cfg.eps, rngs=rngs)
    self.proj_out = nnx.Linear(dim, cfg.out_channels * int(np.prod(p)), param_dtype=pd, precision=prec, rngs=rngs)

  # ----------------------------------------------------------------------------------------------------------------
  # Loading

  @classmethod
  def from_pretrained(cls, path: str, dtype: Any = jnp.float32, attention_implementation: str = "auto",
                      remat_policy: str = "none", precision: str | None = None,
                      fuse_qkv: bool = False, quantization: str | None = None,
                      fp8_scaling: str = "channel") -> "HeliosTransformer3DModel":
    """Loads a diffusers-format transformer folder (or a pipeline folder with a ``transformer/`` subfolder).

    Handles one file or sharded safetensors with an index, fp32 or bf16 storage, and the official repository's
    older key names. Tensors are streamed one parameter at a time: host memory peaks at one stacked parameter, not
    at the checkpoint's size. ``quantization="fp8"`` then stores the blocks' linear kernels in float8_e4m3fn with
    ``fp8_scaling`` ("channel" or "tensor") scales (:mod:`helios_jax.models.fp8`), one kernel at a time.
    """
    if quantization not in (None, "none", "fp8"):
      raise InputError(f"quantization must be None, 'none' or 'fp8', got {quantization!r}")
    from helios_jax.io import transformer_weights  # pylint: disable=import-outside-toplevel  # loading is io's
    model = transformer_weights.load_transformer(cls, path, dtype=dtype,
                                                 attention_implementation=attention_implementation,
                                                 remat_policy=remat_policy, precision=precision,
                                                 fuse_qkv=fuse_qkv)
    if quantization == "fp8":
      from helios_jax.models.fp8 import quantize_blocks
      quantize_blocks(model, fp8_scaling)
    return model

  def save_pretrained(self, folder: str, dtype: Any = None, max_shard_size: int | str = "10GB") -> list[str]:
    """Writes the diffusers folder layout ``HeliosTransformer3DModel.from_pretrained`` (ours and diffusers') reads:
    ``config.json`` and ``diffusion_pytorch_model.safetensors``, or shards + index once the tensors pass
    ``max_shard_size`` (bytes or e.g. ``"10GB"``, diffusers' default). ``dtype`` casts every tensor (default: each
    parameter's own dtype). Host memory peaks at one shard. Returns the weight file names.

    Raises:
      InputError: the model is FP8-quantised, or ``max_shard_size`` is not a size.
    """
    from helios_jax.io import transformer_weights  # pylint: disable=import-outside-toplevel  # writing is io's
    return transformer_weights.save_transformer(self, folder, dtype=dtype, max_shard_size=max_shard_size)

  @classmethod
  def abstract(cls, config: HeliosTransformerConfig) -> "HeliosTransformer3DModel":
    """The model with ``jax.ShapeDtypeStruct`` leaves: no memory is allocated (works for the 14B config)."""
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))

  def num_parameters(self) -> int:
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(self, nnx.Param))))

  # ----------------------------------------------------------------------------------------------------------------
  # Forward

  def __call__(self, hidden_states, timestep, encoder_hidden_states, indices_hidden_states=None,
               indices_latents_history_short=None, indices_latents_history_mid=None,
               indices_latents_history_long=None, latents_history_short=None, latents_history_mid=None,
               latents_history_long=None, return_dict: bool = False):
    """Velocity prediction for a noisy chunk given text and (optionally) compressed history.

    Args:
      hidden_states: (B, C_in, T, H, W) noisy latents.
      timestep: (B,) or scalar, on the 0..1000 scale (int or float).
      encoder_hidden_states: (B, S, text_dim) text embeddings.
      indices_hidden_states: (1 or B, T / p_t) frame positions of the noisy chunk (default ``arange``).
      latents_history_short: (B, C_in, T_s, H_s, W_s) with its indices (1 or B, T_s / p_t).
      latents_history_mid: (B, C_in, T_m, H_s, W_s) with indices (1 or B, T_m); needs the short stream.
      latents_history_long: (B, C_in, T_l, H_s, W_s) with indices (1 or B, T_l); needs the short stream.
      return_dict: return ``{"sample": out}`` instead of the array.
    Returns:
      (B, C_out, T, H, W) in the model's dtype, as a JAX array.
    """
    inputs = _check_inputs(self.config, dict(
        hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
        indices_hidden_states=indices_hidden_states, indices_latents_history_short=indices_latents_history_short,
        indices_latents_history_mid=indices_latents_history_mid,
        indices_latents_history_long=indices_latents_history_long, latents_history_short=latents_history_short,
        latents_history_mid=latents_history_mid, latents_history_long=latents_history_long))
    graphdef, state = nnx.split(self)
    if any(a.size == 0 for a in jax.tree.leaves(state["blocks"])):
      raise InputError("this transformer's blocks were moved into per-layer arrays by a pipeline's "
                       "unstack_transformer_layers(); call it through that pipeline")
    out = _jitted_forward(graphdef, state, inputs)
    return {"sample": out} if return_dict else out

  def forward(self, hidden_states, timestep, encoder_hidden_states, indices_hidden_states,
              indices_latents_history_short=None, indices_latents_history_mid=None,
              indices_latents_history_long=None, latents_history_short=None, latents_history_mid=None,
              latents_history_long=None, block_adapter: tuple[Any, Callable[[Any, Any], Any]] | None = None,
              return_block_outputs: Sequence[int] = (), layer_states: Sequence[Any] | None = None):
    """Traceable forward on already-checked JAX inputs (see :meth:`__call__` for shapes).

    ``block_adapter`` = ``(per_layer, adapt)`` changes the blocks' weights one layer at a time (training's LoRA):
    ``per_layer`` is a pytree whose leaves all carry the layer axis ``num_layers`` in front; it is scanned
    alongside the stacked block state and ``adapt(block_state_slice, per_layer_slice)`` returns the block state
    that layer runs with. The adapted weights exist only inside that layer's (rematerialised) scan step, so a
    merged copy of all 40 blocks is never materialised. ``None`` (inference) runs the stored weights.

    ``return_block_outputs`` (static layer indices, e.g. the GAN hooks 5/15/25/35) makes the call return
    ``(output, features)`` with ``features`` (n, B, N_target, D): the target tokens after each listed block.

    ``layer_states`` (``num_layers`` block states, e.g. from :func:`unstack_blocks`) runs those per-layer weights
    in a Python loop instead of the stored stacked blocks (which are then not read). Inside a scan, XLA copies each
    layer's weight slice out of the stacked arrays before its matmuls (one extra read + write of all block
    weights per forward); separately stored layers avoid that copy, at the price of a larger program.

    Unfused inference LoRAs (``pipe.load_lora_weights``) sit on the model as ``lora_adapters``
    (:mod:`helios_jax.pipelines.lora`) and are applied here through the same ``block_adapter`` path, unless the
    caller passes its own ``block_adapter`` (training).
    """
    adapters = getattr(self, "lora_adapters", None)
    if adapters is not None and block_adapter is None:
      self, block_adapter = adapters.bind(self)  # pylint: disable=self-cls-assignment
    cfg = self.config
    dtype = cfg.param_dtype
    impl = resolve_implementation(cfg.attention_implementation, dtype)
    hidden_states = hidden_states.astype(dtype)
    context = encoder_hidden_states.astype(dtype)

    x, (tn, hn, wn) = self.patch_embedding(hidden_states)
    rope = flat_rope_table(indices_hidden_states, hn, wn, cfg.rope_dim, cfg.rope_theta)
    tokens, ropes = [x], [rope]
    num_noisy = x.shape[1]

    if latents_history_short is not None:
      s, (_, h1, w1) = self.patch_short(latents_history_short.astype(dtype))
      tokens.insert(0, s)
      ropes.insert(0, flat_rope_table(indices_latents_history_short, h1, w1, cfg.rope_dim, cfg.rope_theta))
      for latents, indices, patch, window in (
          (latents_history_mid, indices_latents_history_mid, self.patch_mid if latents_history_mid is not None
           else None, 2),
          (latents_history_long, indices_latents_history_long, self.patch_long if latents_history_long is not None
           else None, 4)):
        if latents is None:
          continue
        tok, _ = patch(_replicate_pad(latents.astype(dtype), patch.kernel_size))
        tokens.insert(0, tok)
        ropes.insert(0, pooled_rope_table(indices, h1, w1, window, cfg.rope_dim, cfg.rope_theta))

    x = jnp.concatenate(tokens, axis=1)
    rope_b = max(r[0].shape[0] for r in ropes)
    rope = tuple(jnp.concatenate([jnp.broadcast_to(r[i], (rope_b,) + r[i].shape[1:]) for r in ropes], axis=1)
                 for i in range(2))
    num_history = x.shape[1] - num_noisy

    emb = self.condition_embedder
    temb, tproj = emb.time(timestep, dtype)
    if cfg.zero_history_timestep:
      _, tproj_hist = emb.time(jnp.zeros((1,), timestep.dtype), dtype)
    else:
      tproj_hist = tproj
    context = emb.text_embedder(context)

    ctx = _BlockContext(num_history=num_history, num_noisy=num_noisy)

    # A plain lax.scan over the stacked block state (not nnx.scan): the forward then works at any trace level,
    # e.g. inside the pipelines' fori_loop over denoising steps, where NNX transforms refuse outer-level tracers.
    block_def, block_state = nnx.split(self.blocks)

    per_layer, adapt = block_adapter if block_adapter is not None else (None, None)

    def body(h, xs):
      state, extra = xs
      if adapt is not None:  # inside the remat'd step: the backward recomputes the adapted weights
        state = adapt(state, extra)
      h = nnx.merge(block_def, state)(h, context, tproj_hist, tproj, rope, ctx, impl)
      return h, (h[:, num_history:] if return_block_outputs else None)

    if cfg.remat_policy != "none":
      body = jax.checkpoint(body, policy=_POLICIES[cfg.remat_policy](), prevent_cse=False)
    if layer_states is None and cfg.layer_loop == "scan":
      x, per_block = jax.lax.scan(body, x, (block_state, per_layer))
    else:
      if layer_states is not None and len(layer_states) != cfg.num_layers:
        raise InputError(f"layer_states has {len(layer_states)} layers, the model has {cfg.num_layers}")
      outs = []
      for i in range(cfg.num_layers):
        layer = layer_states[i] if layer_states is not None else jax.tree.map(lambda a: a[i], block_state)
        x, o = body(x, (layer, jax.tree.map(lambda a: a[i], per_layer)))
        outs.append(o)
      per_block = jnp.stack(outs) if return_block_outputs else None

    x = self.norm_out(x[:, num_history:], temb)
    x = self.proj_out(x)
    pt, ph, pw = cfg.patch_size
    out = rearrange(x, "b (t h w) (i j k c) -> b c (t i) (h j) (w k)", t=tn, h=hn, w=wn, i=pt, j=ph, k=pw)
    if return_block_outputs:
      return out, per_block[np.asarray(return_block_outputs, np.int32)]
    return out


def unstack_blocks(model: "HeliosTransformer3DModel", delete: bool = False) -> list:
  """The stacked block state as ``num_layers`` per-layer states (for ``forward(layer_states=...)``).

  ``delete=True`` deletes each stacked array once its layers are copied out, so device memory grows by one
  parameter at a time instead of by all block weights; the model's blocks are unusable afterwards (its
  ``forward`` must then get ``layer_states``).
  """
  _, state = nnx.split(model.blocks)
  flat, treedef = jax.tree.flatten(state)
  layers = [[] for _ in range(model.config.num_layers)]
  for leaf in flat:
    for i, piece in enumerate(_split_layers(leaf)):
      layers[i].append(piece)
    if delete and isinstance(leaf, jax.Array):
      leaf.delete()
  return [jax.tree.unflatten(treedef, leaves) for leaves in layers]


@jax.jit
def _split_layers(a: jax.Array) -> list[jax.Array]:
  return [a[i] for i in range(a.shape[0])]


@functools.partial(jax.jit, static_argnums=(0,))
def _jitted_forward(graphdef, state, inputs: dict) -> jax.Array:
  model = nnx.merge(graphdef, state)
  return model.forward(**inputs)


# --------------------------------------------------------------------------------------------------------------------
# Input checks: every user mistake becomes one InputError naming the argument.

def _as_array(name: str, value) -> jax.Array:
  if isinstance(value, (jax.Array, np.ndarray, np.generic, int, float, list, tuple)):
    try:
      return jnp.asarray(value)
    except (TypeError, ValueError) as e:
      raise InputError(f"{name} cannot be converted to an array: {e}") from None
  if hasattr(value, "__array__"):
    try:
      return jnp.asarray(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as e:
      raise InputError(f"{name} cannot be converted to an array: {e}") from None
  raise InputError(f"{name} must be a numpy or JAX array, got {type(value).__name__}")


def _check_inputs(cfg: HeliosTransformerConfig, a: dict) -> dict:
  for key in ("hidden_states", "timestep", "encoder_hidden_states"):
    if a[key] is None:
      raise InputError(f"{key} is required")
  out = {k: (None if v is None else _as_array(k, v)) for k, v in a.items()}
  x = out["hidden_states"]
  pt, ph, pw = cfg.patch_size
  if x.ndim != 5:
    raise InputError(f"hidden_states must be (B, C, T, H, W), got shape {tuple(x.shape)}")
  b, c, t, h, w = x.shape
  if c != cfg.in_channels:
    raise InputError(f"hidden_states has {c} channels, the model expects in_channels={cfg.in_channels}")
  if t % pt or h % ph or w % pw:
    raise InputError(f"hidden_states frames/height/width {(t, h, w)} must be multiples of patch_size {cfg.patch_size}")
  ts = out["timestep"]
  if ts.ndim == 0:
    ts = jnp.broadcast_to(ts, (b,))
  if ts.ndim != 1 or ts.shape[0] not in (1, b):
    raise InputError(f"timestep must be a scalar or shape ({b},), got shape {tuple(ts.shape)}")
  if not (jnp.issubdtype(ts.dtype, jnp.integer) or jnp.issubdtype(ts.dtype, jnp.floating)):
    raise InputError(f"timestep must be numeric, got dtype {ts.dtype}")
  out["timestep"] = jnp.broadcast_to(ts, (b,))
  e = out["encoder_hidden_states"]
  if e.ndim != 3 or e.shape[0] != b or e.shape[2] != cfg.text_dim:
    raise InputError(f"encoder_hidden_states must be ({b}, S, {cfg.text_dim}), got shape {tuple(e.shape)}")
  for name in ("hidden_states", "encoder_hidden_states"):
    if not jnp.issubdtype(out[name].dtype, jnp.floating):
      raise InputError(f"{name} must be a floating-point array, got dtype {out[name].dtype}")

  def check_indices(name, n_expected):
    idx = out[name]
    if idx.ndim == 1:
      idx = idx[None]
    if idx.ndim != 2 or idx.shape[0] not in (1, b) or idx.shape[1] != n_expected:
      raise InputError(f"{name} must have shape (1 or {b}, {n_expected}), got {tuple(out[name].shape)}")
    if not (jnp.issubdtype(idx.dtype, jnp.integer) or jnp.issubdtype(idx.dtype, jnp.floating)):
      raise InputError(f"{name} must be numeric, got dtype {idx.dtype}")
    out[name] = idx

  if out["indices_hidden_states"] is None:
    out["indices_hidden_states"] = jnp.arange(t // pt)[None]
  check_indices("indices_hidden_states", t // pt)

  streams = ("short", "mid", "long")
  given = {}
  for s in streams:
    lat, idx = out[f"latents_history_{s}"], out[f"indices_latents_history_{s}"]
    if (lat is None) != (idx is None):
      have, miss = (f"latents_history_{s}", f"indices_latents_history_{s}") if idx is None else (
          f"indices_latents_history_{s}", f"latents_history_{s}")
      raise InputError(f"{have} was given without {miss}; pass both or neither")
    given[s] = lat is not None
  if (given["mid"] or given["long"]) and not given["short"]:
    raise InputError("mid/long history needs the short history too (its grid sets their positions)")
  if any(given.values()) and not cfg.has_multi_term_memory_patch:
    raise InputError("this model has no memory patches (has_multi_term_memory_patch=False): pass no history")
  if given["short"]:
    ref = out["latents_history_short"]
    for s in streams:
      if not given[s]:
        continue
      lat = out[f"latents_history_{s}"]
      name = f"latents_history_{s}"
      if lat.ndim != 5 or lat.shape[0] != b or lat.shape[1] != cfg.in_channels:
        raise InputError(f"{name} must be ({b}, {cfg.in_channels}, T, H, W), got shape {tuple(lat.shape)}")
      if lat.shape[3:] != ref.shape[3:]:
        raise InputError(f"{name} spatial size {tuple(lat.shape[3:])} differs from latents_history_short's "
                         f"{tuple(ref.shape[3:])}; all history streams are at full latent resolution")
      if not jnp.issubdtype(lat.dtype, jnp.floating):
        raise InputError(f"{name} must be a floating-point array, got dtype {lat.dtype}")
    ts_, hs, ws = ref.shape[2:]
    if ts_ % pt or hs % ph or ws % pw:
      raise InputError(f"latents_history_short frames/height/width {(ts_, hs, ws)} must be multiples of "
                       f"patch_size {cfg.patch_size}")
    check_indices("indices_latents_history_short", ts_ // pt)
    for s in ("mid", "long"):
      if given[s]:
        # The pooled RoPE is built on the short grid with one entry per mid/long latent frame.
        check_indices(f"indices_latents_history_{s}", out[f"latents_history_{s}"].shape[2])
  return out
