"""UMT5 encoder (the Wan / Helios text encoder) in Flax NNX.

Mirrors transformers' ``UMT5EncoderModel`` at inference:

* token embedding ``shared`` (no scaling), then ``num_layers`` pre-norm blocks, then a final RMS norm;
* each block: RMS norm -> self-attention (no bias, **no 1/sqrt(d_kv) scaling**, plus a relative-position bias that
  **every** layer owns, unlike T5/mT5 where only layer 0 has one) -> residual; RMS norm -> gated FFN
  ``act(x W_wi_0) * (x W_wi_1) W_wo`` (``gelu_new`` = tanh GELU for ``gated-gelu``) -> residual;
* RMS norm: ``x * rsqrt(mean(x^2) + eps)`` with the mean in fp32, cast to the weight dtype before the weight
  multiply when that is bf16/fp16;
* the attention mask (1 = token, 0 = pad) hides padded keys; padded query rows are computed like the reference's
  (and usually discarded by the caller).

The blocks are stored stacked (each parameter has a leading ``num_layers`` axis) and run with ``nnx.scan``.
Numerics: matmuls run in the parameter dtype (fp32 runs use ``Precision.HIGHEST``); attention scores, the
position bias, the mask and the softmax are fp32 in every mode.

Weights load from a transformers folder (``config.json`` + ``model.safetensors`` or shards + index) with
:meth:`UMT5EncoderModel.from_pretrained`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax.errors import CheckpointError, InputError
from helios_jax.io.checkpoint import TRANSFORMERS_WEIGHTS_NAME, SafetensorsFolder, load_config

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class UMT5Config:
  """Encoder hyper-parameters (the keys of a transformers ``config.json``; defaults are UMT5-XXL's)."""

  vocab_size: int = 256384
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @property
  def is_gated_act(self) -> bool:
    return self.feed_forward_proj.split("-")[0] == "gated"

  @property
  def dense_act_fn(self) -> str:
    """The activation name as transformers derives it from ``feed_forward_proj``."""
    if self.feed_forward_proj == "gated-gelu":
      return "gelu_new"
    return self.feed_forward_proj.split("-")[-1]

  def __post_init__(self):
    parts = self.feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or self.dense_act_fn not in _ACTIVATIONS:
      raise InputError(f"unsupported feed_forward_proj {self.feed_forward_proj!r} (expected 'gated-gelu', "
                       f"'relu', 'gated-silu', ...)")
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                 "relative_attention_num_buckets", "relative_attention_max_distance"):
      if int(getattr(self, name)) < 1:
        raise InputError(f"UMT5 config: {name} must be positive, got {getattr(self, name)}")

  def to_dict(self) -> dict[str, Any]:
    """The transformers ``config.json`` keys this encoder needs (``UMT5EncoderModel``, ``model_type`` umt5)."""
    out = {"architectures": ["UMT5EncoderModel"], "model_type": "umt5", "dense_act_fn": self.dense_act_fn,
           "is_gated_act": self.is_gated_act}
    out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
    return out

  @classmethod
  def from_dict(cls, config: dict) -> "UMT5Config":
    """Builds the config from a transformers ``config.json`` dict (unknown keys are ignored)."""
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in config.items() if k in known}
    try:
      return cls(**kwargs)
    except (InputError, TypeError, ValueError) as e:
      raise CheckpointError(f"invalid UMT5 config: {e}") from None


class UMT5EncoderOutput(NamedTuple):
  """Output of :class:`UMT5EncoderModel`. ``last_hidden_state``: (B, L, d_model) in the model dtype."""

  last_hidden_state: jax.Array


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int = 32,
                              max_distance: int = 128) -> np.ndarray:
  """Bidirectional T5 relative-position buckets, (query_length, key_length) int32, computed on the host.

  ``offset = key - query``; half of the buckets per direction (positive offsets get ``+num_buckets // 2``); within
  a direction offsets below ``num_buckets // 4`` are exact and larger ones are log-spaced up to ``max_distance``,
  beyond which they share the last bucket.
  """
  offsets = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  return _bucket_of_offsets(offsets, num_buckets, max_distance)


def _bucket_of_offsets(offsets: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
  half = num_buckets // 2
  direction = np.where(offsets > 0, half, 0)
  distance = np.abs(offsets)
  max_exact = half // 2
  with np.errstate(divide="ignore"):
    log_part = np.log(np.maximum(distance, 1) / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
  large = np.minimum(max_exact + log_part.astype(np.int64), half - 1)
  return (direction + np.where(distance < max_exact, distance, large)).astype(np.int32)


class RMSNorm(nnx.Module):
  """T5 layer norm: scale only, no mean subtraction; statistics in fp32.

  Args:
    dim: size of the last axis.
    eps: added to the mean square.
    dtype: parameter dtype.
  """

  def __init__(self, dim: int, eps: float = 1e-6, *, dtype: Any = jnp.float32):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """(..., dim) -> (..., dim) in the weight dtype when it is a half type, else fp32."""
    weight = self.weight[...]
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    if weight.dtype in (jnp.bfloat16, jnp.float16):
      y = y.astype(weight.dtype)
    return weight * y


class UMT5Block(nnx.Module):
  """One encoder block: self-attention with its own relative-position table, then the (gated) FFN.

  Parameter names follow the torch state dict: ``layer_norm`` / ``q`` ``k`` ``v`` ``o`` /
  ``relative_attention_bias`` (buckets, heads) for ``layer.0``; ``ffn_norm`` / ``wi_0`` ``wi_1`` (or ``wi``) / ``wo``
  for ``layer.1``. Kernels are (in, out).
  """

  def __init__(self, config: UMT5Config, *, dtype: Any, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    self.precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    d, inner, ff = config.d_model, config.inner_dim, config.d_ff
    init = nnx.initializers.normal(0.02)

    def linear(n_in: int, n_out: int) -> nnx.Linear:
      return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=dtype, precision=self.precision,
                        kernel_init=init, rngs=rngs)

    self.layer_norm = RMSNorm(d, config.layer_norm_epsilon, dtype=dtype)
    self.q = linear(d, inner)
    self.k = linear(d, inner)
    self.v = linear(d, inner)
    self.o = linear(inner, d)
    self.relative_attention_bias = nnx.Param(
        init(rngs.params(), (config.relative_attention_num_buckets, config.num_heads), dtype))
    self.ffn_norm = RMSNorm(d, config.layer_norm_epsilon, dtype=dtype)
    if config.is_gated_act:
      self.wi_0 = linear(d, ff)
      self.wi_1 = linear(d, ff)
    else:
      self.wi = linear(d, ff)
    self.wo = linear(ff, d)

  def attention(self, x: jax.Array, buckets: jax.Array, key_mask: jax.Array) -> jax.Array:
    """Self-attention. x: (B, L, d_model); buckets: (L, L) int32; key_mask: (B, L) bool -> (B, L, d_model)."""
    b, n, _ = x.shape
    heads, dk = self.config.num_heads, self.config.d_kv
    q = self.q(x).reshape(b, n, heads, dk)
    k = self.k(x).reshape(b, n, heads, dk)
    v = self.v(x).reshape(b, n, heads, dk)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision, preferred_element_type=jnp.float32)
    bias = jnp.take(self.relative_attention_bias[...], buckets, axis=0)  # (L, L, heads)
    scores = scores + jnp.transpose(bias, (2, 0, 1)).astype(jnp.float32)[None]
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=self.precision, preferred_element_type=jnp.float32)
    return self.o(out.astype(x.dtype).reshape(b, n, heads * dk))

  def feed_forward(self, x: jax.Array) -> jax.Array:
    """(B, L, d_model) -> (B, L, d_model)."""
    act = _ACTIVATIONS[self.config.dense_act_fn]
    if self.config.is_gated_act:
      h = act(self.wi_0(x).astype(jnp.float32)).astype(x.dtype) * self.wi_1(x)
    else:
      h = act(self.wi(x).astype(jnp.float32)).astype(x.dtype)
    return self.wo(h)

  def __call__(self, x: jax.Array, buckets: jax.Array, key_mask: jax.Array) -> jax.Array:
    """(B, L, d_model) -> (B, L, d_model); residual adds in the model dtype."""
    x = x + self.attention(self.layer_norm(x), buckets, key_mask)
    return x + self.feed_forward(self.ffn_norm(x))


class UMT5EncoderModel(nnx.Module):
  """The UMT5 encoder stack.

  Args:
    config: :class:`UMT5Config`.
    dtype: parameter and activation dtype (``jnp.bfloat16`` as Helios runs it, or ``jnp.float32``).
    rngs: initialisation randomness (weights are normally loaded with :meth:`from_pretrained`).
  """

  def __init__(self, config: UMT5Config, *, dtype: Any = jnp.bfloat16, rngs: nnx.Rngs):
    self.config = config
    self.dtype = jnp.dtype(dtype)
    self.shared = nnx.Embed(config.vocab_size, config.d_model, dtype=dtype, param_dtype=dtype,
                            embedding_init=nnx.initializers.normal(1.0), rngs=rngs)

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs: nnx.Rngs) -> UMT5Block:
      return UMT5Block(config, dtype=dtype, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, dtype=dtype)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> UMT5EncoderOutput:
    """Encodes token ids.

    Args:
      input_ids: (B, L) integer token ids.
      attention_mask: (B, L), nonzero on real tokens; ``None`` attends to every position.

    Returns:
      :class:`UMT5EncoderOutput` with ``last_hidden_state`` (B, L, d_model) in the model dtype.
    """
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise InputError(f"input_ids must be a (B, L) integer array, got shape {input_ids.shape} "
                       f"dtype {input_ids.dtype}")
    if attention_mask is None:
      key_mask = jnp.ones(input_ids.shape, bool)
    else:
      attention_mask = jnp.asarray(attention_mask)
      if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask shape {attention_mask.shape} does not match input_ids "
                         f"{input_ids.shape}")
      key_mask = attention_mask != 0
    n = input_ids.shape[1]
    buckets = jnp.asarray(relative_position_buckets(n, n, self.config.relative_attention_num_buckets,
                                                    self.config.relative_attention_max_distance))
    x = self.shared(input_ids)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run_blocks(h: jax.Array, block: UMT5Block) -> jax.Array:
      return block(h, buckets, key_mask)

    x = run_blocks(x, self.blocks)
    return UMT5EncoderOutput(self.final_layer_norm(x))

  def encode_masked(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Jitted forward pass that also zeroes the rows of padded positions (the Helios prompt convention).

    Args:
      input_ids: (B, L) int; attention_mask: (B, L), 1 on real tokens.

    Returns:
      (B, L, d_model) in the model dtype, exactly zero where ``attention_mask == 0``.
    """
    return _encode_masked(self, jnp.asarray(input_ids), jnp.asarray(attention_mask))

  def state_dict(self, dtype: Any = None) -> dict[str, np.ndarray]:
    """The transformers ``UMT5EncoderModel`` state dict (``shared.weight``, ``encoder.*``) that
    :meth:`from_pretrained` reads back; ``dtype`` casts every tensor (default: the parameter dtype)."""
    pure = nnx.state(self).to_pure_dict()
    cast = lambda a: np.ascontiguousarray(np.asarray(jax.device_get(a)).astype(dtype or a.dtype))
    out = {"shared.weight": cast(pure["shared"]["embedding"]),
           "encoder.final_layer_norm.weight": cast(pure["final_layer_norm"]["weight"])}
    for path, (suffix, _, transpose) in _block_spec(self.config).items():
      stacked = pure["blocks"]
      for part in path:
        stacked = stacked[part]
      for i in range(self.config.num_layers):
        out[f"encoder.block.{i}.{suffix}"] = cast(stacked[i].T if transpose else stacked[i])
    return out

  @classmethod
  def from_pretrained(cls, folder: str, dtype: Any = jnp.bfloat16) -> "UMT5EncoderModel":
    """Loads a transformers ``UMT5EncoderModel`` folder (e.g. a Helios checkpoint's ``text_encoder/``).

    Reads ``config.json`` and ``model.safetensors`` (or ``model-0000k-of-0000N.safetensors`` shards with
    ``model.safetensors.index.json``). The embedding comes from ``shared.weight`` or, failing that,
    ``encoder.embed_tokens.weight``; decoder / head tensors of a full UMT5 checkpoint are ignored. Weights are
    cast to ``dtype``.

    Raises:
      CheckpointError: missing folder, config, shard or tensor, or a tensor whose shape does not fit the config.
    """
    config = UMT5Config.from_dict(load_config(folder))
    dtype = jnp.dtype(dtype)
    abstract = nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    with SafetensorsFolder(folder, TRANSFORMERS_WEIGHTS_NAME) as weights:
      arrays = _read_weights(weights, config, folder, np.dtype(dtype))
    pure = state.to_pure_dict()
    expected = jax.tree_util.tree_map(lambda s: tuple(s.shape), pure)
    got = jax.tree_util.tree_map(lambda a: tuple(a.shape), arrays)
    if expected != got:  # a bug in the mapping, not in the checkpoint
      raise AssertionError(f"weight tree mismatch: expected {expected}, got {got}")
    state.replace_by_pure_dict(jax.tree_util.tree_map(jnp.asarray, arrays))
    return nnx.merge(graphdef, state)

  def save_pretrained(self, folder: str, dtype: Any = None, max_shard_size: int | str = "5GB") -> list[str]:
    """Writes a transformers ``UMT5EncoderModel`` folder (``config.json`` + ``model.safetensors``, or shards +
    ``model.safetensors.index.json`` past ``max_shard_size``, transformers' default 5GB). ``config.json`` holds
    the encoder's fields (:meth:`UMT5Config.to_dict`; keys of a loaded config that the encoder does not use are
    not kept). ``dtype`` casts every tensor (default: the parameter dtype). Returns the weight file names."""
    from helios_jax.io.checkpoint import entries_from_arrays, write_weights_folder  # pylint: disable=import-outside-toplevel
    return write_weights_folder(folder, entries_from_arrays(self.state_dict(dtype)), self.config.to_dict(),
                                TRANSFORMERS_WEIGHTS_NAME, max_shard_size)


@nnx.jit
def _encode_masked(model: UMT5EncoderModel, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
  hidden = model(input_ids, attention_mask).last_hidden_state
  return jnp.where(attention_mask[:, :, None] != 0, hidden, jnp.zeros((), hidden.dtype))


def _block_spec(config: UMT5Config) -> dict[tuple[str, ...], tuple[str, tuple[int, ...], bool]]:
  """Per-block parameter path -> (checkpoint key suffix, our shape, stored transposed)."""
  d, inner, ff = config.d_model, config.inner_dim, config.d_ff
  spec: dict[tuple[str, ...], tuple[str, tuple[int, ...], bool]] = {
      ("layer_norm", "weight"): ("layer.0.layer_norm.weight", (d,), False),
      ("q", "kernel"): ("layer.0.SelfAttention.q.weight", (d, inner), True),
      ("k", "kernel"): ("layer.0.SelfAttention.k.weight", (d, inner), True),
      ("v", "kernel"): ("layer.0.SelfAttention.v.weight", (d, inner), True),
      ("o", "kernel"): ("layer.0.SelfAttention.o.weight", (inner, d), True),
      ("relative_attention_bias",): ("layer.0.SelfAttention.relative_attention_bias.weight",
                                     (config.relative_attention_num_buckets, config.num_heads), False),
      ("ffn_norm", "weight"): ("layer.1.layer_norm.weight", (d,), False),
      ("wo", "kernel"): ("layer.1.DenseReluDense.wo.weight", (ff, d), True),
  }
  if config.is_gated_act:
    spec[("wi_0", "kernel")] = ("layer.1.DenseReluDense.wi_0.weight", (d, ff), True)
    spec[("wi_1", "kernel")] = ("layer.1.DenseReluDense.wi_1.weight", (d, ff), True)
  else:
    spec[("wi", "kernel")] = ("layer.1.DenseReluDense.wi.weight", (d, ff), True)
  return spec


def _read_weights(weights: SafetensorsFolder, config: UMT5Config, folder: str, dtype: np.dtype) -> dict:
  """Reads every tensor the encoder needs, cast to ``dtype`` on the host, into a dict shaped like the pure state."""
  missing: list[str] = []
  bad_shape: list[str] = []

  def read(key: str, shape: tuple[int, ...], transpose: bool = False) -> np.ndarray | None:
    if key not in weights:
      missing.append(key)
      return None
    stored = weights.shape(key)
    want = shape[::-1] if transpose else shape
    if tuple(stored) != tuple(want):
      bad_shape.append(f"{key} has shape {tuple(stored)}, expected {tuple(want)}")
      return None
    arr = weights.get(key)
    arr = arr.T if transpose else arr
    return arr if arr.dtype == dtype else arr.astype(dtype)

  d, nl = config.d_model, config.num_layers
  emb_key = "shared.weight" if "shared.weight" in weights else "encoder.embed_tokens.weight"
  if emb_key not in weights:
    missing.append("shared.weight (or encoder.embed_tokens.weight)")
    embedding = None
  else:
    embedding = read(emb_key, (config.vocab_size, d))

  block_spec = _block_spec(config)
  blocks: dict = {}
  for path, (suffix, shape, transpose) in block_spec.items():
    stacked = None
    for i in range(nl):
      arr = read(f"encoder.block.{i}.{suffix}", shape, transpose)
      if arr is None:
        continue
      if stacked is None:  # one preallocated (num_layers, ...) host buffer per parameter
        stacked = np.empty((nl, *shape), dtype)
      stacked[i] = arr
    node = blocks
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = stacked
  final_norm = read("encoder.final_layer_norm.weight", (d,))

  if missing or bad_shape:
    problems = []
    if missing:
      shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
      problems.append(f"missing tensor(s) {shown}")
    if bad_shape:
      shown = "; ".join(bad_shape[:3]) + (f"; and {len(bad_shape) - 3} more" if len(bad_shape) > 3 else "")
      problems.append(f"wrong shape: {shown}")
    raise CheckpointError(f"UMT5 checkpoint {folder} does not fit its config.json: {'; '.join(problems)}")
  return {"shared": {"embedding": embedding}, "blocks": blocks, "final_layer_norm": {"weight": final_norm}}
