"""LoRA adapter files -> our parameter names and layouts (reading, key conversion, checks; and a writer).

Accepted inputs (a ``.safetensors`` file, a folder holding ``pytorch_lora_weights.safetensors`` or one
``.safetensors`` file, or an already loaded ``{key: array}`` dict):

* diffusers / PEFT keys as ``pipe.save_lora_weights`` / ``get_peft_model_state_dict`` write them:
  ``transformer.blocks.N.attn1.to_q.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r), optional
  ``.lora_B.bias`` (out,), with or without the ``transformer.`` / ``diffusion_model.`` / ``base_model.model.``
  prefix. Scale ``lora_alpha / r`` from the file's ``lora_adapter_metadata`` (``r``, ``lora_alpha``,
  ``alpha_pattern``, ``use_rslora``) or from per-module ``.alpha`` tensors; without either it is 1 (diffusers'
  convention: alpha = rank). The rank of each module is read from its tensors' shapes.
* kohya-style ``lora_down.weight`` / ``lora_up.weight`` (+ ``.alpha``), and the original Wan / Helios module names
  (``self_attn.q``, ``cross_attn.o``, ``ffn.0``, ``head.head``, ...), as diffusers' Wan converter accepts them.
* the official Helios repository's LoRA checkpoints (``pytorch_lora_weights.safetensors``: PEFT keys with the
  ``transformer.`` prefix and the training metadata; LoRA on the ``patch_*`` Conv3d layers; full
  ``transformer.<param>`` tensors of ``train_norm_layers``), with its older module names (``clean_patch_embedding``,
  ``multi_term_memory_patch``) mapped as the transformer loader maps them.
* our trainer's adapters, written by :func:`save_lora_weights` in the diffusers format above.

The result, :class:`LoraWeights`, uses our names (``blocks.attn1.to_q.kernel``) and layouts: A (L, in, r) and
B (L, r, out) for the stacked block kernels (layers a file leaves out get zeros), A (in, r) / B (r, out) elsewhere,
float32, with ``alpha / r`` folded into B, so the delta of a kernel is ``A @ B`` (times the adapter's weight).
Conv3d (patch embedding) LoRAs become the same two matrices over flattened patches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from typing import Any, Mapping

import numpy as np

from helios_jax.errors import CheckpointError, InputError
from helios_jax.io.checkpoint import PICKLE_SUFFIXES, _open
from helios_jax.io.transformer_weights import _rules, canonical_key

logger = logging.getLogger("helios_jax")

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file name diffusers' save_lora_weights writes
METADATA_KEY = "lora_adapter_metadata"  # safetensors header entry with the PEFT LoraConfig (JSON)
PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.")
_SHOWN = 3  # offending keys named in an error message

# Original Wan / Helios module names -> diffusers names (diffusers' Wan LoRA converter accepts these).
_WAN_RENAMES = (
    (r"^blocks\.(\d+)\.self_attn\.(q|k|v)$", r"blocks.\1.attn1.to_\2"),
    (r"^blocks\.(\d+)\.self_attn\.o$", r"blocks.\1.attn1.to_out.0"),
    (r"^blocks\.(\d+)\.cross_attn\.(q|k|v)$", r"blocks.\1.attn2.to_\2"),
    (r"^blocks\.(\d+)\.cross_attn\.o$", r"blocks.\1.attn2.to_out.0"),
    (r"^blocks\.(\d+)\.ffn\.0$", r"blocks.\1.ffn.net.0.proj"),
    (r"^blocks\.(\d+)\.ffn\.2$", r"blocks.\1.ffn.net.2"),
    (r"^head\.head$", "proj_out"),
    (r"^time_projection\.1$", "condition_embedder.time_proj"),
    (r"^text_embedding\.0$", "condition_embedder.text_embedder.linear_1"),
    (r"^text_embedding\.2$", "condition_embedder.text_embedder.linear_2"),
    (r"^time_embedding\.0$", "condition_embedder.time_embedder.linear_1"),
    (r"^time_embedding\.2$", "condition_embedder.time_embedder.linear_2"),
)
# key suffix -> role: "a" / "b" LoRA factors, "bias" (lora_B.bias / diff_b: a bias delta), "alpha"
_SUFFIXES = ((".lora_A.weight", "a"), (".lora_down.weight", "a"), (".lora_B.weight", "b"),
             (".lora_up.weight", "b"), (".lora_B.bias", "bias"), (".diff_b", "bias"), (".alpha", "alpha"))


@dataclasses.dataclass
class LoraWeights:
  """One adapter in our names and layouts (numpy float32; see the module docstring).

  ``factors``: {param: {"a": (..., in, r), "b": (..., r, out)}} with alpha / r folded into ``b``; ``bias``:
  {bias param: (..., out) delta}; ``full``: {param: replacement tensor in our layout and the model's shape}.
  Leading ``...`` is the layer axis L for ``blocks.*`` names and absent otherwise.
  """

  factors: dict[str, dict[str, np.ndarray]]
  bias: dict[str, np.ndarray]
  full: dict[str, np.ndarray]
  source: str = "<dict>"

  def names(self) -> list[str]:
    return sorted(set(self.factors) | set(self.bias) | set(self.full))

  def ranks(self) -> dict[str, int]:
    return {n: int(f["a"].shape[-1]) for n, f in self.factors.items()}


def param_name(path) -> str:
  """Dotted name of an ``nnx.State`` leaf path (``blocks.attn1.to_q.kernel``)."""
  import jax
  parts = []
  for p in path:
    if isinstance(p, jax.tree_util.DictKey):
      parts.append(str(p.key))
    elif isinstance(p, jax.tree_util.SequenceKey):
      parts.append(str(p.idx))
    elif isinstance(p, jax.tree_util.GetAttrKey) and p.name != "value":
      parts.append(p.name)
  return ".".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Reading

def read_lora_file(path: str) -> tuple[dict[str, np.ndarray], dict | None]:
  """(tensors, PEFT metadata or None) of a LoRA ``.safetensors`` file or a folder holding one."""
  if not isinstance(path, (str, os.PathLike)):
    raise InputError(f"a LoRA must be a path or a dict of arrays, got {type(path).__name__}")
  path = os.fspath(path)
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME)):
      path = os.path.join(path, LORA_WEIGHT_NAME)
    else:
      files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
      if len(files) != 1:
        pickles = sorted(n for n in os.listdir(path) if n.lower().endswith(PICKLE_SUFFIXES))
        hint = f" (pickle files are never loaded: {', '.join(pickles)})" if pickles else ""
        raise CheckpointError(f"LoRA folder {path} must hold {LORA_WEIGHT_NAME} or exactly one .safetensors file, "
                              f"found {len(files)}{hint}")
      path = os.path.join(path, files[0])
  elif not os.path.isfile(path):
    raise CheckpointError(f"LoRA file not found: {path}")
  if path.lower().endswith(PICKLE_SUFFIXES):
    raise CheckpointError(f"{path} is a PyTorch pickle, which is never loaded (unpickling can run code): convert it "
                          "to .safetensors")
  with _open(path) as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = f.metadata() or {}
  metadata = None
  if header.get(METADATA_KEY):
    try:
      metadata = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path}: its {METADATA_KEY} header is not JSON ({e})") from None
  return tensors, metadata


def _module_of(key: str) -> tuple[str, str] | None:
  """(diffusers module name, role) of a LoRA key, or None when the key is not a LoRA tensor."""
  for p in PREFIXES:
    if key.startswith(p):
      key = key[len(p):]
      break
  for suffix, role in _SUFFIXES:
    if key.endswith(suffix):
      module = key[:-len(suffix)]
      break
  else:
    return None
  for pattern, repl in _WAN_RENAMES:
    module = re.sub(pattern, repl, module)
  return module, role


def _strip_prefix(key: str) -> str:
  for p in PREFIXES:
    if key.startswith(p):
      return key[len(p):]
  return key


def _metadata_alpha(metadata: Mapping | None, module: str, rank: int) -> float | None:
  """``lora_alpha / r`` (or / sqrt(r) with rsLoRA) of ``module`` from PEFT metadata, or None without metadata."""
  if not metadata:
    return None
  meta = {_strip_prefix(k): v for k, v in metadata.items()}
  if meta.get("use_dora"):
    raise CheckpointError("DoRA adapters (use_dora) are not supported")
  alpha = meta.get("lora_alpha")
  for pattern, value in (meta.get("alpha_pattern") or {}).items():
    bare = pattern.lstrip("^")
    if re.fullmatch(bare, module) or re.fullmatch(rf"(.*\.)?{bare}", module):
      alpha = value
  if alpha is None:
    return None
  denom = math.sqrt(rank) if meta.get("use_rslora") else rank
  return float(alpha) / denom


class _Target:
  """One of our parameters as a LoRA target: its name, layer (None outside the blocks) and shapes."""

  def __init__(self, rule, layer):
    self.rule, self.layer = rule, layer
    self.name = ".".join(rule.names)
    self.shape = rule.layer_shape  # ours, one layer


def _targets(model) -> tuple[dict[str, _Target], dict[str, _Target], dict[str, tuple]]:
  """(kernels by diffusers module name, biases by module name, every parameter by diffusers key -> (rule, i)) of
  ``model`` (a HeliosTransformer3DModel; its abstract twin is used, so loaded adapters or fp8 layers do not
  matter)."""
  from flax import nnx
  model_config = model.config
  _, state = nnx.split(type(model).abstract(model_config))
  _, _, rules = _rules(state, model_config)
  kernels, biases, params = {}, {}, {}
  for r in rules:
    for i in (range(model_config.num_layers) if r.stacked else [None]):
      key = r.key(i)
      params[key] = (r, i)
      module, leaf = key.rsplit(".", 1)
      if r.kind in ("linear", "conv"):
        kernels[module] = _Target(r, i)
      elif r.names[-1] == "bias":
        biases[module] = _Target(r, i)
  return kernels, biases, params


def _first(keys) -> str:
  keys = sorted(keys)
  more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
  return ", ".join(keys[:_SHOWN]) + more


def convert_lora(state_dict: Mapping[str, Any], model, metadata: Mapping | None = None,
                 source: str = "<dict>") -> LoraWeights:
  """Converts a LoRA state dict (any accepted key style) to :class:`LoraWeights` for ``model``
  (a HeliosTransformer3DModel).

  Raises CheckpointError naming the first offending keys when keys name no module of this model, when a module
  has only one of its two factors, or when shapes / ranks do not fit.
  """
  if not isinstance(state_dict, Mapping) or not state_dict:
    raise CheckpointError(f"LoRA {source} holds no tensors")
  kernels, biases, params = _targets(model)
  groups: dict[str, dict[str, np.ndarray]] = {}
  full: dict[str, np.ndarray] = {}
  unknown, dropped = [], []
  for key, value in state_dict.items():
    value = np.asarray(value)
    if "dora_scale" in key or "lora_magnitude_vector" in key:
      raise CheckpointError(f"LoRA {source} is a DoRA adapter ({key}), which is not supported")
    parsed = _module_of(key)
    if parsed is None:
      canon = canonical_key(_strip_prefix(key))
      if canon is None:
        dropped.append(key)
      elif canon in params:
        full[key] = value  # a fully trained tensor stored beside the adapters (official train_norm_layers)
      else:
        unknown.append(key)
      continue
    module, role = parsed
    canon = canonical_key(module + ".weight")
    if canon is None:  # official training-only modules (history q/k/v LoRAs, GAN heads): not part of inference
      dropped.append(key)
      continue
    module = canon[:-len(".weight")]
    if module not in kernels:
      unknown.append(key)
      continue
    if role in groups.setdefault(module, {}):
      raise CheckpointError(f"LoRA {source} holds two {role} tensors for {module} (e.g. {key})")
    groups[module][role] = value
  if dropped:
    logger.info("LoRA %s: %d training-only tensors ignored (e.g. %s)", source, len(dropped), dropped[0])
  if unknown:
    raise CheckpointError(f"LoRA {source} has {len(unknown)} keys that name no module of this transformer: "
                          f"{_first(unknown)}")

  incomplete = [m for m, g in groups.items() if ("a" in g) != ("b" in g)]
  if incomplete:
    raise CheckpointError(f"LoRA {source}: modules with only one of lora_A / lora_B: {_first(incomplete)}")
  per_param: dict[str, dict[int | None, tuple]] = {}
  bias_param: dict[str, dict[int | None, np.ndarray]] = {}
  bad = []
  for module, g in sorted(groups.items()):
    target = kernels[module]
    r = target.rule
    if "a" in g:
      a, b = g["a"].astype(np.float32), g["b"].astype(np.float32)
      rank = a.shape[0] if a.ndim >= 2 else -1
      torch_shape = r.torch_shape()
      out_dim = torch_shape[0]
      if r.kind == "linear":
        ok = a.ndim == 2 and b.shape == (out_dim, rank) and a.shape[1] == torch_shape[1]
      else:  # Conv3d: A (r, C, kt, kh, kw) with the layer's kernel, B (out, r, 1, 1, 1)
        ok = (a.ndim == 5 and tuple(a.shape[1:]) == tuple(torch_shape[1:])
              and b.reshape(b.shape[:2]).shape == (out_dim, rank) and b.size == out_dim * rank)
      if not ok:
        bad.append(f"{module} (lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}; the layer's weight is "
                   f"{tuple(torch_shape)})")
        continue
      scale = _metadata_alpha(metadata, module, rank)
      if "alpha" in g:
        scale = float(np.asarray(g["alpha"]).reshape(-1)[0]) / rank
      scale = 1.0 if scale is None else scale
      if r.kind == "linear":
        a_ours, b_ours = a.T, b.T
      else:
        a_ours = a.transpose(2, 3, 4, 1, 0).reshape(-1, rank)
        b_ours = b.reshape(out_dim, rank).T
      per_param.setdefault(target.name, {})[target.layer] = (a_ours, b_ours * np.float32(scale))
    elif "alpha" in g:
      bad.append(f"{module} (an alpha without lora_A / lora_B)")
    if "bias" in g:
      bt = biases.get(module)
      d = g["bias"].astype(np.float32)
      if bt is None or d.shape != tuple(bt.shape):
        bad.append(f"{module} bias delta {tuple(d.shape)} (the layer has "
                   f"{'no bias' if bt is None else tuple(bt.shape)})")
        continue
      scale = _metadata_alpha(metadata, module, g["a"].shape[0]) if "a" in g else None
      bias_param.setdefault(bt.name, {})[bt.layer] = d * np.float32(1.0 if scale is None else scale)
  if bad:
    raise CheckpointError(f"LoRA {source} does not fit this transformer: {_first(bad)}")

  num_layers = model.config.num_layers
  factors = {}
  for name, layers in per_param.items():
    if None in layers:
      a, b = layers[None]
      factors[name] = {"a": a, "b": b}
      continue
    rank = max(ab[0].shape[-1] for ab in layers.values())  # other ranks are zero-padded (same delta)
    a0, b0 = next(iter(layers.values()))
    a = np.zeros((num_layers, a0.shape[0], rank), np.float32)
    b = np.zeros((num_layers, rank, b0.shape[1]), np.float32)
    for i, (ai, bi) in layers.items():
      a[i, :, :ai.shape[1]] = ai
      b[i, :bi.shape[0]] = bi
    factors[name] = {"a": a, "b": b}
  bias = {}
  for name, layers in bias_param.items():
    if None in layers:
      bias[name] = layers[None]
      continue
    d0 = next(iter(layers.values()))
    d = np.zeros((num_layers,) + d0.shape, np.float32)
    for i, di in layers.items():
      d[i] = di
    bias[name] = d
  full_ours = _convert_full(full, params, num_layers, source)
  if not (factors or bias or full_ours):
    raise CheckpointError(f"LoRA {source} has no tensor for this transformer")
  return LoraWeights(factors=factors, bias=bias, full=full_ours, source=source)


def _convert_full(full: dict, params: dict, num_layers: int, source: str) -> dict[str, np.ndarray]:
  out: dict[str, dict] = {}
  bad = []
  for key, value in full.items():
    rule, i = params[canonical_key(_strip_prefix(key))]
    if tuple(value.shape) != rule.torch_shape():
      bad.append(f"{key} {tuple(value.shape)} (the model's is {rule.torch_shape()})")
      continue
    out.setdefault(".".join(rule.names), {})[i] = rule.to_ours(value.astype(np.float32))
  if bad:
    raise CheckpointError(f"LoRA {source}: full tensors that do not fit this transformer: {_first(bad)}")
  result = {}
  for name, layers in out.items():
    if None in layers:
      result[name] = layers[None]
    elif len(layers) != num_layers:
      missing = sorted(set(range(num_layers)) - set(layers))
      raise CheckpointError(f"LoRA {source}: full tensor {name} is given for some layers only (missing "
                            f"{missing[:_SHOWN]})")
    else:
      result[name] = np.stack([layers[i] for i in range(num_layers)])
  return result


def load_lora(path_or_state_dict, model) -> LoraWeights:
  """Reads a LoRA (path or ``{key: array}`` dict) and converts it for ``model`` (a HeliosTransformer3DModel)."""
  if isinstance(path_or_state_dict, Mapping):
    return convert_lora(path_or_state_dict, model)
  tensors, metadata = read_lora_file(path_or_state_dict)
  return convert_lora(tensors, model, metadata, source=os.fspath(path_or_state_dict))


# ----------------------------------------------------------------------------------------------------------------
# Writing (our trainer's adapters -> the diffusers format)

def save_lora_weights(path: str, trainable: Mapping, model, rank: int, alpha: float) -> str:
  """Writes a trainer's adapter pytree (``{"lora": {name: {"a", "b"}}, "full": {name: array}}``, see
  :mod:`helios_jax.training.lora`) as diffusers writes ``pipe.save_lora_weights``: PEFT keys with the
  ``transformer.`` prefix, per layer, and ``r`` / ``lora_alpha`` in the metadata; ``full`` tensors as
  ``transformer.<diffusers key>``. ``path``: a ``.safetensors`` file or a folder (gets
  ``pytorch_lora_weights.safetensors``). Returns the file written.
  """
  from safetensors.numpy import save_file
  import jax
  _, _, params = _targets(model)
  by_name = {}
  for key, (rule, i) in params.items():
    by_name.setdefault(".".join(rule.names), (rule, []))[1].append((i, key))
  tensors, modules = {}, set()
  for name, ab in (trainable.get("lora") or {}).items():
    if name not in by_name or by_name[name][0].kind not in ("linear", "conv"):
      raise InputError(f"adapter entry {name} names no kernel of this transformer")
    rule, layers = by_name[name]
    a_all, b_all = (np.asarray(jax.device_get(ab[k]), np.float32) for k in ("a", "b"))
    if a_all.shape[-1] != rank:
      raise InputError(f"adapter entry {name} has rank {a_all.shape[-1]}, not {rank}")
    for i, key in layers:
      a, b = (a_all[i], b_all[i]) if i is not None else (a_all, b_all)
      module = key[:-len(".weight")]
      if rule.kind == "linear":
        ta, tb = a.T, b.T
      else:
        kt, kh, kw = rule.conv_kernel
        ta = a.reshape(kt, kh, kw, rule.in_channels, rank).transpose(4, 3, 0, 1, 2)
        tb = b.T.reshape(b.shape[1], rank, 1, 1, 1)
      tensors[f"transformer.{module}.lora_A.weight"] = np.ascontiguousarray(ta)
      tensors[f"transformer.{module}.lora_B.weight"] = np.ascontiguousarray(tb)
      modules.add(module)
  for name, value in (trainable.get("full") or {}).items():
    if name not in by_name:
      raise InputError(f"trained tensor {name} names no parameter of this transformer")
    rule, layers = by_name[name]
    arr = np.asarray(jax.device_get(value), np.float32)
    for i, key in layers:
      tensors[f"transformer.{key}"] = np.ascontiguousarray(rule.to_torch(arr[i] if i is not None else arr))
  if not tensors:
    raise InputError("the adapter pytree is empty")
  meta = {"transformer.r": int(rank), "transformer.lora_alpha": float(alpha),
          "transformer.target_modules": sorted(modules), "transformer.use_rslora": False,
          "transformer.use_dora": False}
  if os.path.isdir(path) or not path.endswith(".safetensors"):
    os.makedirs(path, exist_ok=True)
    path = os.path.join(path, LORA_WEIGHT_NAME)
  save_file(tensors, path, metadata={"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)})
  return path
