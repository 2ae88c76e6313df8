"""Conversion between diffusers' HeliosTransformer3DModel state dict and our Flax NNX state.

One rule table serves both directions (:func:`load_transformer` and :func:`to_diffusers_state_dict`):

=========================================  =========================================  =========================
ours (stacked over layers under blocks)    diffusers key                              transform
=========================================  =========================================  =========================
``patch_*.proj.kernel`` (K*C_in, D)        ``patch_*.weight`` (D, C_in, kt, kh, kw)   conv -> flattened matmul
``*.kernel`` (in, out)                     ``*.weight`` (out, in)                     transpose
``*.scale`` (D,)                           ``*.weight`` (D,)                          none
``blocks.scale_shift_table`` (L, 6, D)     ``blocks.i.scale_shift_table`` (1, 6, D)   reshape
``norm_out.scale_shift_table`` (2, D)      ``norm_out.scale_shift_table`` (1, 2, D)   reshape
``attn*.to_out``                           ``attn*.to_out.0``
``ffn.proj_in`` / ``ffn.proj_out``         ``ffn.net.0.proj`` / ``ffn.net.2``
=========================================  =========================================  =========================

The official repository's older names are accepted on load (inference-spec §5.3) and its training-only tensors
(history LoRAs, GAN heads) are skipped.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax.errors import CheckpointError, InputError
from helios_jax.io.checkpoint import (DIFFUSERS_MAX_SHARD_SIZE, DIFFUSERS_WEIGHTS_NAME, SafetensorsFolder, TensorEntry,
                                      load_config, write_weights_folder)

# Checkpoint keys renamed before matching (longest prefixes first).
_PREFIX_ALIASES = (
    ("clean_patch_embedding.proj_4x.", "patch_long."),
    ("clean_patch_embedding.proj_2x.", "patch_mid."),
    ("clean_patch_embedding.proj.", "patch_short."),
    ("multi_term_memory_patch.patch_", "patch_"),
)
_EXACT_ALIASES = {"scale_shift_table": "norm_out.scale_shift_table"}
# Tensors that exist in some checkpoints but play no part in inference (dropped silently).
_IGNORED = re.compile(r"(^|\.)norm_added_q(\.|$)|^blocks\.\d+\.attn1\.[qkv]_loras\.|^gan_heads\.|^gan_final_head\.")

_MODULE_RENAMES = {"to_out": "to_out.0", "proj_in": "net.0.proj", "proj_out": "net.2"}


def canonical_key(key: str) -> str | None:
  """Maps a checkpoint key to its diffusers 0.42.1 name, or None for tensors to ignore."""
  if _IGNORED.search(key):
    return None
  if key in _EXACT_ALIASES:
    return _EXACT_ALIASES[key]
  for old, new in _PREFIX_ALIASES:
    if key.startswith(old):
      return new + key[len(old):]
  return key


def _path_names(path) -> tuple[str, ...]:
  names = []
  for p in path:
    if isinstance(p, jax.tree_util.DictKey):
      names.append(str(p.key))
    elif isinstance(p, jax.tree_util.GetAttrKey):
      if p.name != "value":
        names.append(p.name)
    elif isinstance(p, jax.tree_util.SequenceKey):
      names.append(str(p.idx))
  return tuple(names)


class _Rule:
  """How one of our leaves maps to diffusers tensors."""

  def __init__(self, names: tuple[str, ...], shape: tuple[int, ...], cfg):
    self.names = names
    self.stacked = names[0] == "blocks"
    self.layer_shape = tuple(shape[1:]) if self.stacked else tuple(shape)
    leaf = names[-1]
    modules = [(_MODULE_RENAMES.get(n, n) if i > 0 and names[i - 1] in ("attn1", "attn2", "ffn") else n)
               for i, n in enumerate(names[:-1])]
    self.kind = "plain"
    if names[0].startswith("patch_") and leaf in ("kernel", "bias"):
      modules = [names[0]]  # our PatchEmbed3D.proj is the Conv3d itself
      self.kind = "conv" if leaf == "kernel" else "plain"
      mult = {"patch_embedding": 1, "patch_short": 1, "patch_mid": 2, "patch_long": 4}[names[0]]
      self.conv_kernel = tuple(mult * p for p in cfg.patch_size)
      self.in_channels = cfg.in_channels
    elif leaf == "kernel":
      self.kind = "linear"
    elif leaf == "scale_shift_table":
      self.kind = "table"
    torch_leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    self.template = ".".join((["blocks", "{i}"] + modules[1:] if self.stacked else modules) + [torch_leaf])

  def key(self, i: int | None) -> str:
    return self.template.format(i=i)

  def torch_shape(self) -> tuple[int, ...]:
    s = self.layer_shape
    if self.kind == "linear":
      return (s[1], s[0])
    if self.kind == "conv":
      return (s[1], self.in_channels) + self.conv_kernel
    if self.kind == "table":
      return (1,) + s
    return s

  def to_ours(self, w: np.ndarray) -> np.ndarray:
    if self.kind == "linear":
      return w.T
    if self.kind == "conv":
      return w.transpose(2, 3, 4, 1, 0).reshape(-1, w.shape[0])
    if self.kind == "table":
      return w.reshape(self.layer_shape)
    return w

  def to_torch(self, w: np.ndarray) -> np.ndarray:
    if self.kind == "linear":
      return w.T
    if self.kind == "conv":
      kt, kh, kw = self.conv_kernel
      return w.reshape(kt, kh, kw, self.in_channels, -1).transpose(4, 3, 0, 1, 2)
    if self.kind == "table":
      return w.reshape(self.torch_shape())
    return w


def _rules(abstract_state, cfg) -> tuple[list, Any, list[_Rule]]:
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
  rules = [_Rule(_path_names(p), tuple(leaf.shape), cfg) for p, leaf in leaves_with_path]
  return [leaf for _, leaf in leaves_with_path], treedef, rules


def resolve_transformer_folder(path: str) -> str:
  """Accepts a transformer folder or a pipeline folder containing ``transformer/``."""
  if not os.path.isdir(path):
    raise CheckpointError(f"model folder not found: {path}")
  if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
      os.path.join(path, "transformer", "config.json")):
    return os.path.join(path, "transformer")
  return path


def _parse_dtype(dtype) -> str:
  names = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
  if isinstance(dtype, str):
    if dtype.lower() not in names:
      raise CheckpointError(f"unsupported dtype {dtype!r}: use float32/fp32 or bfloat16/bf16")
    return names[dtype.lower()]
  name = jnp.dtype(dtype).name
  if name not in names:
    raise CheckpointError(f"unsupported dtype {name}: use float32 or bfloat16")
  return names[name]


def load_transformer(cls, path: str, dtype=jnp.float32, progress: bool = False, **runtime):
  """Builds ``cls`` (HeliosTransformer3DModel) from a diffusers-format folder, streaming tensor by tensor.

  The config class comes from ``cls.config_class``, so this module never imports the model (the model's
  ``from_pretrained`` calls in here, one way).
  """
  folder = resolve_transformer_folder(path)
  cfg = cls.config_class.from_dict(load_config(folder), dtype=_parse_dtype(dtype), **runtime)
  reader = SafetensorsFolder(folder, DIFFUSERS_WEIGHTS_NAME)
  try:
    abstract = cls.abstract(cfg)
    graphdef, abstract_state = nnx.split(abstract)
    leaves, treedef, rules = _rules(abstract_state, cfg)

    available: dict[str, str] = {}
    for key in reader.keys():
      canon = canonical_key(key)
      if canon is None:
        continue
      if canon in available:
        raise CheckpointError(f"checkpoint in {folder} holds both {available[canon]!r} and {key!r} for {canon!r}")
      available[canon] = key
    expected = {}
    for r in rules:
      for i in (range(cfg.num_layers) if r.stacked else [None]):
        expected[r.key(i)] = r
    missing = sorted(set(expected) - set(available))
    unexpected = sorted(set(available) - set(expected))
    if missing or unexpected:
      parts = []
      if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
      if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
      raise CheckpointError(f"checkpoint in {folder} does not fit its config.json: tensors " + "; ".join(parts))

    new_leaves = []
    iterator = zip(leaves, rules)
    if progress:
      from tqdm.auto import tqdm
      iterator = tqdm(list(iterator), desc="loading transformer", unit="param")
    for leaf, r in iterator:
      target = np.dtype(leaf.dtype)
      buf = np.empty(leaf.shape, target)
      for i in (range(cfg.num_layers) if r.stacked else [None]):
        key = available[r.key(i)]
        shape = reader.shape(key)
        if shape != r.torch_shape():
          raise CheckpointError(f"tensor {key!r} in {folder} has shape {shape}, the config expects "
                                f"{r.torch_shape()}")
        w = r.to_ours(reader.get(key)).astype(target)
        if r.stacked:
          buf[i] = w
        else:
          buf[...] = w
      new_leaves.append(jax.device_put(buf))
      del buf
  finally:
    reader.close()
  state = jax.tree_util.tree_unflatten(treedef, new_leaves)
  return nnx.merge(graphdef, state)


def to_diffusers_state_dict(model, dtype: Callable | None = None) -> dict[str, np.ndarray]:
  """Our model's parameters under diffusers' names and layouts (numpy; ``dtype`` casts every tensor)."""
  cfg = model.config
  _, state = nnx.split(model)
  leaves, _, rules = _rules(state, cfg)
  out = {}
  for leaf, r in zip(leaves, rules):
    arr = np.asarray(jax.device_get(leaf))
    for i in (range(cfg.num_layers) if r.stacked else [None]):
      w = r.to_torch(arr[i] if r.stacked else arr)
      out[r.key(i)] = np.ascontiguousarray(w if dtype is None else w.astype(dtype))
  return out


def diffusers_entries(model, dtype: Callable | None = None) -> list[TensorEntry]:
  """The tensors :func:`to_diffusers_state_dict` gives, as lazily produced :class:`TensorEntry` s (one layer of
  one stacked parameter copied to the host at a time), in the same order.

  Raises:
    InputError: the model's blocks are FP8-quantised (no diffusers layout holds them).
  """
  cfg = model.config
  _, state = nnx.split(model)
  leaves, _, rules = _rules(state, cfg)
  entries = []
  for leaf, r in zip(leaves, rules):
    if r.names[-1] == "kernel_scale" or jnp.dtype(leaf.dtype).itemsize == 1:
      raise InputError("an FP8-quantised transformer cannot be saved in the diffusers layout: save it before "
                       "quantize_blocks / from_pretrained(quantization='fp8')")
    target = np.dtype(leaf.dtype if dtype is None else dtype)
    for i in (range(cfg.num_layers) if r.stacked else [None]):
      def load(leaf=leaf, r=r, i=i, target=target):
        arr = np.asarray(jax.device_get(leaf[i] if r.stacked else leaf))
        return r.to_torch(arr).astype(target)
      entries.append(TensorEntry(r.key(i), r.torch_shape(), target, load))
  return entries


def save_transformer(model, folder: str, dtype: Callable | None = None,
                     max_shard_size=DIFFUSERS_MAX_SHARD_SIZE) -> list[str]:
  """Writes ``model`` as a diffusers ``HeliosTransformer3DModel`` folder (``config.json`` + safetensors, sharded
  with an index past ``max_shard_size``); ``dtype`` casts every tensor (default: each parameter's own dtype, so a
  bf16 model keeps its float32 islands). Returns the weight file names."""
  return write_weights_folder(folder, diffusers_entries(model, dtype), model.config.to_dict(),
                              DIFFUSERS_WEIGHTS_NAME, max_shard_size)
