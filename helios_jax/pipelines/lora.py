"""LoRA at inference: load adapters into a pipeline's transformer, weight them, fuse and unfuse them.

  pipe.load_lora_weights("style.safetensors", adapter_name="style", scale=0.8)
  pipe.load_lora_weights("motion/", adapter_name="motion")      # several adapters at once, each with its weight
  pipe.set_adapters(["style", "motion"], [0.5, 1.0])
  pipe.fuse_lora()      # merged into the kernels (faster); pipe.unfuse_lora() restores the exact original weights

Unfused adapters are held on the transformer as :class:`LoraAdapters` (a small float32 pytree under the attribute
``lora_adapters``, part of the transformer's nnx state, so the pipelines' jitted stages receive them as arguments);
the transformer's ``forward`` calls :meth:`LoraAdapters.bind`, which merges the non-block tensors whole and hands
the block factors to ``forward(block_adapter=...)``: ``W + sum_k w_k A_k B_k`` is built one layer at a time
inside the block scan, so no second copy of the block weights exists. Adapter weights are arrays: changing them
with :meth:`LoraMixin.set_adapters` does not recompile; changing which adapters are active does (once).

Fusing writes ``W + sum_k w_k A_k B_k`` (computed in float32, rounded once to the kernel's dtype) into the
kernels and keeps each touched original kernel as a host (numpy) copy; :meth:`LoraMixin.unfuse_lora` puts those
copies back, so the weights are bit-identical to the ones before fusing (a subtraction would not be: in bf16,
``(W + D) - D != W``). The host copy costs the touched kernels' size in host RAM (device memory is unchanged);
:meth:`LoraMixin.unload_lora_weights` after fusing keeps the fused weights and drops copies and adapters, as in
diffusers.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax.errors import InputError
from helios_jax.io.lora_weights import LoraWeights, load_lora, param_name

logger = logging.getLogger("helios_jax")

ATTRIBUTE = "lora_adapters"  # the transformer attribute holding the unfused adapters (read by its forward)
BLOCKS = "blocks."
_SCALE_SUFFIX = re.compile(r"^(.*):([-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?)$")


def parse_lora_arg(text: str) -> tuple[str, float]:
  """``"PATH[:SCALE]"`` -> ``(path, scale)``; only a float after the last ``:`` is a scale (``C:\\x``, ``a:b/c``
  and ``weights:v2.safetensors`` are paths), default scale 1.0."""
  if not isinstance(text, str) or not text.strip():
    raise InputError(f"--lora needs PATH or PATH:SCALE, got {text!r}")
  m = _SCALE_SUFFIX.match(text)
  if m and m.group(1):
    scale = float(m.group(2))
    if not math.isfinite(scale):
      raise InputError(f"LoRA scale must be a finite number, got {m.group(2)!r}")
    return m.group(1), scale
  return text, 1.0


class LoraTensor(nnx.Variable):
  """A LoRA factor, bias delta, replacement tensor or adapter weight (not an ``nnx.Param``: never counted,
  exported or trained)."""


class LoraAdapters(nnx.Module):
  """The loaded adapters of one transformer: tensors ``t<i>`` plus a static index of what each one is.

  ``index``: tuple of ``(adapter, kind, param, role)`` per tensor, kind ``"factor"`` (role ``"a"`` / ``"b"``),
  ``"bias"`` or ``"full"``; ``names``: adapters in load order; ``weights`` ``w<j>``: one float32 scalar each;
  ``active``: the adapters the forward applies (static: a change recompiles).
  """

  def __init__(self, adapters: dict[str, LoraWeights], weights: dict[str, float], active: Sequence[str]):
    index, i = [], 0
    for name, lw in adapters.items():
      entries = [("factor", p, role, f[role]) for p, f in lw.factors.items() for role in ("a", "b")]
      entries += [("bias", p, "d", d) for p, d in lw.bias.items()] + [("full", p, "w", w) for p, w in lw.full.items()]
      for kind, p, role, arr in entries:
        setattr(self, f"t{i}", LoraTensor(jnp.asarray(arr, jnp.float32)))
        index.append((name, kind, p, role))
        i += 1
    self.index = tuple(index)
    self.names = tuple(adapters)
    for j, name in enumerate(self.names):
      setattr(self, f"w{j}", LoraTensor(jnp.asarray(weights[name], jnp.float32)))
    self.active = tuple(active)

  def tensors(self, names: Sequence[str] | None = None) -> dict[str, dict]:
    """``{adapter: {"factor": {param: {"a", "b"}}, "bias": {param: d}, "full": {param: w}}}`` (arrays)."""
    names = self.active if names is None else names
    out = {n: {"factor": {}, "bias": {}, "full": {}} for n in names}
    for i, (name, kind, p, role) in enumerate(self.index):
      if name in out:
        value = getattr(self, f"t{i}")[...]
        if kind == "factor":
          out[name]["factor"].setdefault(p, {})[role] = value
        else:
          out[name][kind][p] = value
    return out

  def weight(self, name: str) -> jax.Array:
    return getattr(self, f"w{self.names.index(name)}")[...]

  def bind(self, model):
    """``(model with the non-block tensors adapted, block_adapter or None)`` for ``model.forward`` (traceable)."""
    if not self.active:
      return model, None
    parts = self.tensors()
    weights = {n: self.weight(n) for n in self.active}
    inner = {n: {k: {p: v for p, v in d.items() if p.startswith(BLOCKS)} for k, d in t.items()}
             for n, t in parts.items()}
    outer = {n: {k: {p: v for p, v in d.items() if not p.startswith(BLOCKS)} for k, d in t.items()}
             for n, t in parts.items()}
    if any(d for t in outer.values() for d in t.values()):
      graphdef, state = nnx.split(model)
      state = adapt_state(state, outer, weights, "")
      model = nnx.merge(graphdef, state)
    if not any(d for t in inner.values() for d in t.values()):
      return model, None
    return model, (inner, lambda layer_state, extra: adapt_state(layer_state, extra, weights, BLOCKS))


def adapt_state(state, parts: dict, weights: dict, prefix: str):
  """``state`` with each active adapter's deltas added (``W + w A B``, float32, rounded once) and its full tensors
  substituted. ``parts`` as :meth:`LoraAdapters.tensors`; names inside ``state`` are ``param[len(prefix):]``."""
  wanted = {p for t in parts.values() for d in t.values() for p in d}
  seen = set()

  def f(path, x):
    n = prefix + param_name(path)
    if n not in wanted:
      return x
    seen.add(n)
    y = x.astype(jnp.float32)
    for name, t in parts.items():
      w = weights[name]
      if n in t["full"]:
        y = t["full"][n]
      if n in t["factor"]:
        y = y + w * jnp.matmul(t["factor"][n]["a"], t["factor"][n]["b"])
      if n in t["bias"]:
        y = y + w * t["bias"][n]
    return y.astype(x.dtype)

  out = jax.tree_util.tree_map_with_path(f, state)
  missing = wanted - seen
  if missing:
    raise InputError(f"LoRA targets {sorted(missing)[:3]} are not in the transformer (quantised to fp8 after the "
                     "LoRA was loaded? fuse the LoRA before quantizing)")
  return out


def _fused_value(x, parts, weights, name):
  """(..., in, out) the fused kernel ``name``: one layer at a time for stacked kernels (bounded transient)."""
  single = {a: {k: {name: v[name]} if name in v else {} for k, v in t.items()} for a, t in parts.items()}

  if name.startswith(BLOCKS):
    return jax.lax.map(lambda args: _apply(args[0], args[1], weights, name), (x, single))
  return _apply(x, single, weights, name)


def _apply(x, parts, weights, name):
  y = x.astype(jnp.float32)
  for a, t in parts.items():
    if name in t["full"]:
      y = t["full"][name]
    if name in t["factor"]:
      y = y + weights[a] * jnp.matmul(t["factor"][name]["a"], t["factor"][name]["b"])
    if name in t["bias"]:
      y = y + weights[a] * t["bias"][name]
  return y.astype(x.dtype)


_fuse_jit = jax.jit(_fused_value, static_argnums=3)


class LoraMixin:
  """LoRA methods of the Helios pipelines (diffusers' names). Needs ``self.transformer`` and ``self._split``."""

  # -- state kept on the pipeline: {adapter: LoraWeights}, {adapter: weight}, fused bookkeeping
  def _lora_state(self) -> dict:
    if getattr(self, "_lora", None) is None:
      self._lora = {"adapters": {}, "weights": {}, "active": (), "fused": None}
    return self._lora

  def _lora_refresh(self) -> None:
    """Re-attaches the adapters to the transformer and drops the pipeline's cached split (new graph)."""
    st = self._lora_state()
    t = self.transformer
    if st["adapters"]:
      setattr(t, ATTRIBUTE, LoraAdapters(st["adapters"], st["weights"], () if st["fused"] else st["active"]))
    elif hasattr(t, ATTRIBUTE):
      delattr(t, ATTRIBUTE)
    split = getattr(self, "_split", None)
    if split is not None and isinstance(split[1], tuple):  # unstack_transformer_layers(): keep the layer arrays
      graphdef, state = nnx.split(t)
      self._split = (graphdef, (state, split[1][1]))
    else:
      self._split = None

  def _check_lora_model(self, what: str) -> None:
    if getattr(self.transformer, "quantization", None):
      raise InputError(f"cannot {what} on an fp8-quantised transformer: load and fuse the LoRA, then quantize")

  def load_lora_weights(self, path_or_state_dict, adapter_name: str | None = None, scale: float = 1.0) -> str:
    """Loads one adapter (file, folder or ``{key: array}``; formats in :mod:`helios_jax.io.lora_weights`) and
    activates it beside the already active ones with weight ``scale``. Returns its name (``default_<n>`` when
    not given). Keys or ranks that do not fit the transformer raise ``CheckpointError``."""
    self._check_lora_model("load a LoRA")
    st = self._lora_state()
    if st["fused"] is not None:
      raise InputError("a LoRA is fused: call unfuse_lora() (or unload_lora_weights()) before loading another")
    if adapter_name is None:
      n = len(st["adapters"])
      while f"default_{n}" in st["adapters"]:
        n += 1
      adapter_name = f"default_{n}"
    if not isinstance(adapter_name, str) or not adapter_name:
      raise InputError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    if adapter_name in st["adapters"]:
      raise InputError(f"an adapter named {adapter_name!r} is already loaded: choose another adapter_name")
    scale = _check_weight(scale, "scale")
    weights = load_lora(path_or_state_dict, self.transformer)
    st["adapters"][adapter_name] = weights
    st["weights"][adapter_name] = scale
    st["active"] = st["active"] + (adapter_name,)
    self._lora_refresh()
    logger.info("LoRA %s loaded from %s (%d tensors, ranks %s)", adapter_name, weights.source, len(weights.names()),
                sorted(set(weights.ranks().values())))
    return adapter_name

  def set_adapters(self, adapter_names: str | Sequence[str], weights: float | Sequence[float] | None = None):
    """Activates exactly ``adapter_names`` with ``weights`` (one per adapter, a single number for all, or None:
    1.0 each)."""
    st = self._lora_state()
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    unknown = [n for n in names if n not in st["adapters"]]
    if unknown:
      raise InputError(f"no adapter named {unknown[0]!r} is loaded (loaded: {sorted(st['adapters'])})")
    if len(set(names)) != len(names):
      raise InputError(f"adapter names repeat: {names}")
    if weights is None:
      weights = [1.0] * len(names)
    elif isinstance(weights, (int, float, np.number)):
      weights = [weights] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
      raise InputError(f"{len(names)} adapters but {len(weights)} weights")
    if st["fused"] is not None:
      raise InputError("a LoRA is fused: call unfuse_lora() before changing the active adapters")
    for n, w in zip(names, weights):
      st["weights"][n] = _check_weight(w, f"weight of {n}")
    st["active"] = tuple(names)
    self._lora_refresh()

  def get_active_adapters(self) -> list[str]:
    """Names of the adapters in use (unfused) or fused into the weights."""
    st = self._lora_state()
    return list(st["fused"]["active"] if st["fused"] is not None else st["active"])

  def get_list_adapters(self) -> list[str]:
    return list(self._lora_state()["adapters"])

  def fuse_lora(self, lora_scale: float = 1.0, adapter_names: Sequence[str] | None = None) -> None:
    """Merges the active adapters (or ``adapter_names``), each at its weight times ``lora_scale``, into the
    kernels; the originals of the touched kernels are kept on the host for :meth:`unfuse_lora`."""
    self._check_lora_model("fuse a LoRA")
    st = self._lora_state()
    if st["fused"] is not None:
      raise InputError("a LoRA is already fused: call unfuse_lora() first")
    split = getattr(self, "_split", None)
    if split is not None and isinstance(split[1], tuple):
      raise InputError("fuse the LoRA before unstack_transformer_layers(), not after")
    names = tuple(st["active"] if adapter_names is None else adapter_names)
    unknown = [n for n in names if n not in st["adapters"]]
    if unknown:
      raise InputError(f"no adapter named {unknown[0]!r} is loaded (loaded: {sorted(st['adapters'])})")
    if not names:
      raise InputError("no active adapter to fuse: load one or call set_adapters()")
    lora_scale = _check_weight(lora_scale, "lora_scale")
    holder = LoraAdapters({n: st["adapters"][n] for n in names}, st["weights"], names)
    parts = holder.tensors()
    weights = {n: jnp.float32(st["weights"][n] * lora_scale) for n in names}
    targets = sorted({p for t in parts.values() for d in t.values() for p in d})
    _, state = nnx.split(self.transformer)
    flat = {param_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    originals, fused = {}, {}
    for name in targets:
      x = flat[name]
      originals[name] = (np.asarray(jax.device_get(x)), getattr(x, "sharding", None))
      fused[name] = _fuse_jit(x, parts, weights, name)
    _replace(self.transformer, fused)
    st["fused"] = {"originals": originals, "active": names, "unfused_active": st["active"]}
    self._lora_refresh()

  def unfuse_lora(self) -> None:
    """Puts the kernels saved by :meth:`fuse_lora` back (bit-identical) and re-activates the adapters unfused."""
    st = self._lora_state()
    if st["fused"] is None:
      raise InputError("no LoRA is fused")
    self._check_lora_model("unfuse a LoRA")
    restored = {n: (jax.device_put(a, s) if s is not None else jnp.asarray(a))
                for n, (a, s) in st["fused"]["originals"].items()}
    _replace(self.transformer, restored)
    st["active"] = st["fused"]["unfused_active"]
    st["fused"] = None
    self._lora_refresh()

  def unload_lora_weights(self) -> None:
    """Removes every adapter. After :meth:`fuse_lora` the fused weights stay (the saved originals are dropped)."""
    self._lora = None
    self._lora_refresh()

  def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
    st = self._lora_state()
    if st["fused"] is not None:
      raise InputError("a LoRA is fused: call unfuse_lora() before deleting adapters")
    for n in ([adapter_names] if isinstance(adapter_names, str) else adapter_names):
      if n not in st["adapters"]:
        raise InputError(f"no adapter named {n!r} is loaded")
      del st["adapters"][n], st["weights"][n]
      st["active"] = tuple(a for a in st["active"] if a != n)
    self._lora_refresh()


def _check_weight(value, what: str) -> float:
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise InputError(f"LoRA {what} must be a number, got {value!r}") from None
  if not math.isfinite(v):
    raise InputError(f"LoRA {what} must be finite, got {value!r}")
  return v


def _replace(module, values: dict) -> None:
  """Sets the named parameters of ``module`` (dotted names) to ``values`` in place."""
  state = nnx.state(module)
  new = jax.tree_util.tree_map_with_path(lambda p, x: values.get(param_name(p), x), state)
  nnx.update(module, new)
