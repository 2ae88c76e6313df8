"""LoRA on a frozen Helios transformer, kept outside the model as a separate pytree (training-spec 5.3, 12).

The base model's parameters stay an ``nnx.State`` that is never differentiated. The trainables are a plain dict::

  {"lora": {name: {"a": (..., in, r), "b": (..., r, out)}}, "full": {name: array}}

where ``name`` is the dotted parameter path (``blocks.attn1.to_q.kernel``; stacked block kernels carry the layer
axis L in front, so A is (L, in, r) and B (L, r, out)). The adapted weight is ``W + (A @ B) * alpha / r`` and fully
trained tensors replace the stored ones ("merge on the fly"); the model code is unchanged. Because every Helios
linear (and every patch "conv", stored as a linear on flattened patches) is ``x @ W``, this equals the PEFT forward
``x @ W + (x @ A) @ B * scale`` exactly in real arithmetic; merging for export is the same function.

Where the merge happens (:func:`bind`): tensors outside the blocks (condition embedder, proj_out, patch
embeddings; a few MB) are merged whole, while the stacked block entries are handed to the transformer's
``block_adapter`` and merged one layer at a time inside the (rematerialised) block scan, so a second copy of the
40 x 0.7 GB block weights never exists (at 14B that copy alone would be ~28 GB in bf16).
"""

from __future__ import annotations

import functools
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax.errors import InputError

# "all-linear" of the reference (spec 5.3): every Dense kernel incl. condition embedder and proj_out, plus the
# patch_embedding conv (stride = kernel, stored as a linear on flattened patches).
ALL_LINEAR = (r"^blocks\.(attn1|attn2)\.to_(q|k|v|out)\.kernel$", r"^blocks\.ffn\.proj_(in|out)\.kernel$",
              r"^condition_embedder\..*\.kernel$", r"^proj_out\.kernel$")
PATCH_EMBEDDING = (r"^patch_embedding\.proj\.kernel$",)
MEMORY_PATCHES = (r"^patch_(short|mid|long)\.proj\.(kernel|bias)$",)
MEMORY_PATCH_KERNELS = (r"^patch_(short|mid|long)\.proj\.kernel$",)


def path_name(path) -> str:
  """Dotted name of an ``nnx.State`` leaf path (``blocks.attn1.to_q.kernel``)."""
  parts = []
  for p in path:
    if isinstance(p, jax.tree_util.DictKey):
      parts.append(str(p.key))
    elif isinstance(p, jax.tree_util.SequenceKey):
      parts.append(str(p.idx))
  return ".".join(parts)


def named_params(state) -> dict[str, jax.Array]:
  """Flat ``{name: array}`` view of a model state."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {path_name(p): x for p, x in leaves}


def _match(name: str, patterns: Sequence[str]) -> bool:
  return any(re.search(p, name) for p in patterns)


def select(state, patterns: Sequence[str]) -> list[str]:
  """Names of the parameters matching any regex in ``patterns`` (sorted)."""
  return sorted(n for n in named_params(state) if _match(n, patterns))


def init_trainable(state, key: jax.Array, *, mode: str, rank: int, lora_targets: Sequence[str],
                   full_targets: Sequence[str]) -> dict:
  """Trainable pytree (float32) for ``mode`` ``"lora"`` (adapters + ``full_targets``) or ``"full"`` (everything).

  LoRA init as PEFT's "gaussian": A ~ N(0, (1/r)^2), B = 0, so the initial model equals the base.
  """
  params = named_params(state)
  if mode == "full":
    return {"lora": {}, "full": {n: jnp.asarray(x, jnp.float32) for n, x in params.items()}}
  if mode != "lora":
    raise InputError(f"train mode must be 'lora' or 'full', got {mode!r}")
  if rank < 1:
    raise InputError(f"lora rank must be >= 1, got {rank}")
  full = {n: jnp.asarray(x, jnp.float32) for n, x in params.items() if _match(n, full_targets)}
  names = [n for n in sorted(params) if _match(n, lora_targets) and n not in full]
  if not names:
    raise InputError(f"no parameter matches the LoRA targets {tuple(lora_targets)}")
  lora = {}
  for i, n in enumerate(names):
    w = params[n]
    if w.ndim < 2:
      raise InputError(f"LoRA target {n} is not a kernel (shape {tuple(w.shape)})")
    a = jax.random.normal(jax.random.fold_in(key, i), w.shape[:-1] + (rank,), jnp.float32) / rank
    b = jnp.zeros(w.shape[:-2] + (rank, w.shape[-1]), jnp.float32)
    lora[n] = {"a": a, "b": b}
  return {"lora": lora, "full": full}


def lora_delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """(..., in, out) float32 ``(A @ B) * scale``."""
  return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)) * scale


def effective_state(state, trainable: dict, scale: float):
  """The model state with LoRA deltas added and fully trained tensors substituted (same dtypes as ``state``)."""
  lora, full = trainable["lora"], trainable["full"]

  def f(path, x):
    n = path_name(path)
    if n in full:
      return full[n].astype(x.dtype)
    if n in lora:
      return (x.astype(jnp.float32) + lora_delta(lora[n]["a"], lora[n]["b"], scale)).astype(x.dtype)
    return x

  return jax.tree_util.tree_map_with_path(f, state)


BLOCKS = "blocks."  # name prefix of the stacked (scanned) block parameters


def split_blocks(trainable: dict) -> tuple[dict, dict]:
  """(block entries with the ``blocks.`` prefix dropped, every other entry), both in the trainable layout.

  The block entries' names are then relative to one block (``attn1.to_q.kernel``), as the per-layer state slice
  seen inside the scan names them, and every leaf keeps its layer axis in front.
  """
  def part(d: dict, inside: bool) -> dict:
    return {(n[len(BLOCKS):] if inside else n): v for n, v in d.items() if n.startswith(BLOCKS) == inside}

  return ({k: part(trainable[k], True) for k in ("lora", "full")},
          {k: part(trainable[k], False) for k in ("lora", "full")})


def bind(graphdef, state, trainable: dict, scale: float):
  """The adapted model's ``forward`` (same signature as :meth:`HeliosTransformer3DModel.forward`).

  Every training objective calls the model through this one function. Non-block tensors are merged whole
  (:func:`effective_state`); block tensors go to the forward's ``block_adapter`` and are merged per layer inside
  the block scan (transient, recomputed by the backward under remat). Same values as
  ``nnx.merge(graphdef, effective_state(state, trainable, scale)).forward``.
  """
  blocks, rest = split_blocks(trainable)
  forward = nnx.merge(graphdef, effective_state(state, rest, scale)).forward
  if not (blocks["lora"] or blocks["full"]):
    return forward
  return functools.partial(forward, block_adapter=(blocks, functools.partial(effective_state, scale=scale)))


def merge_into_model(graphdef, state, trainable: dict, scale: float, dtype=None):
  """A new model with the adapters fused into the base weights (``W += A B alpha / r``); optional dtype cast."""
  merged = jax.jit(effective_state, static_argnums=2)(state, trainable, scale)
  if dtype is not None:
    merged = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, merged)
  return nnx.merge(graphdef, merged)


def count(trainable: dict) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(trainable)))
