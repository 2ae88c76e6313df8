"""Prompts that change while a video is generated: the official offline interactive schedule and live changes.

Two ways a prompt changes between chunks, both linear in embedding space (``a + w (b - a)``, as the official
``interpolate_prompt_embeds``):

* :class:`PromptSchedule` (the official ``infer_helios.py --interactive_prompt_csv_path``): prompt ``i`` holds for
  ``chunks[i]`` chunks; in the first ``interpolation_steps`` chunks of prompt ``i > 0`` the weight of the new prompt
  is ``linspace(0, 1, interpolation_steps)[p]`` at position ``p`` (so the first chunk of a new prompt is still the
  old one, as in the reference). Past the schedule's end the last prompt holds (the reference falls back to the
  first prompt there, and also runs ``sum(cumulative lengths)`` chunks: both treated as bugs, not reproduced).
* A live change (:meth:`PromptController.request`, what ``HeliosStream.set_prompt`` calls): from the embeddings in
  use to the new ones over ``n`` chunks with weights ``1/n, 2/n, ..., 1`` (the next chunk already moves; ``n`` of
  0 or 1 switches at once). A live change ends any schedule.

Negative prompt embeddings do not change (the reference keeps the first one).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.errors import InputError

OFFICIAL_INTERPOLATE_TIME = 7  # chunks per prompt (infer_helios.py --interpolate_time)
OFFICIAL_INTERPOLATION_STEPS = 3  # blend length in chunks (infer_helios.py --interpolation_steps)


def schedule_weight(position: int, steps: int) -> float:
  """Weight of the new prompt ``position`` chunks into a scheduled switch (official: linspace(0, 1, steps))."""
  if position >= steps:
    return 1.0
  return 0.0 if steps == 1 else position / (steps - 1)


def live_weight(position: int, steps: int) -> float:
  """Weight of the new prompt ``position`` chunks after a live change: (position + 1) / steps, capped at 1."""
  return 1.0 if steps <= 1 else min(1.0, (position + 1) / steps)


@jax.jit
def _lerp(a: jax.Array, b: jax.Array, w: jax.Array) -> jax.Array:
  """(1, L, D) embeddings ``a + w (b - a)`` computed in float32, returned in ``a``'s dtype."""
  a32 = a.astype(jnp.float32)
  return (a32 + w * (b.astype(jnp.float32) - a32)).astype(a.dtype)


def blend(a: jax.Array, b: jax.Array, w: float) -> jax.Array:
  """``a`` at w = 0 and ``b`` at w = 1 exactly (no arithmetic), the linear blend between."""
  if w <= 0.0:
    return a
  if w >= 1.0:
    return b
  return _lerp(a, b, jnp.float32(w))


@dataclasses.dataclass(frozen=True)
class PromptSchedule:
  """Prompts (strings, or (1, L, D) / (L, D) embeddings) each held for ``chunks[i]`` chunks."""

  prompts: tuple
  chunks: tuple[int, ...]
  interpolation_steps: int = OFFICIAL_INTERPOLATION_STEPS

  def __post_init__(self):
    prompts, chunks = tuple(self.prompts), tuple(self.chunks)
    object.__setattr__(self, "prompts", prompts)
    object.__setattr__(self, "chunks", chunks)
    if not prompts:
      raise InputError("a prompt schedule needs at least one prompt")
    if len(prompts) != len(chunks):
      raise InputError(f"a prompt schedule needs one length per prompt: {len(prompts)} prompts, {len(chunks)} "
                       "lengths")
    kinds = {isinstance(p, str) for p in prompts}
    if len(kinds) > 1:
      raise InputError("a prompt schedule takes either strings or embeddings, not both")
    for n in chunks:
      if not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"each prompt must hold for a positive whole number of chunks, got {n!r}")
    steps = self.interpolation_steps
    if not isinstance(steps, (int, np.integer)) or steps < 0:
      raise InputError(f"interpolation_steps must be a non-negative integer, got {steps!r}")
    short = [i for i, n in enumerate(chunks[1:], 1) if n < steps]
    if short:
      raise InputError(f"prompt {short[0]} holds for {chunks[short[0]]} chunks, fewer than its "
                       f"{steps}-chunk blend (interpolation_steps)")

  @property
  def total_chunks(self) -> int:
    return int(sum(self.chunks))

  @property
  def uses_text(self) -> bool:
    return isinstance(self.prompts[0], str)

  def position(self, k: int) -> tuple[int, int, float]:
    """Chunk ``k`` -> (previous prompt index, current prompt index, weight of the current one)."""
    start = 0
    for i, n in enumerate(self.chunks):
      if k < start + n:
        if i == 0:
          return 0, 0, 1.0
        return i - 1, i, schedule_weight(k - start, self.interpolation_steps)
      start += n
    last = len(self.chunks) - 1
    return last, last, 1.0

  @classmethod
  def from_csv(cls, path: str | os.PathLike, interpolate_time: int = OFFICIAL_INTERPOLATE_TIME,
               interpolation_steps: int = OFFICIAL_INTERPOLATION_STEPS) -> dict[str, "PromptSchedule"]:
    """The official interactive CSV (columns ``id, prompt_index, prompt``, optional ``refined_prompt`` preferred
    where filled) -> {id: schedule}, ids in sorted order, each prompt held ``interpolate_time`` chunks."""
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise InputError(f"interactive prompt file not found: {path}")
    try:
      with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a byte-order mark (Excel) is dropped
        rows = list(csv.DictReader(f))
    except UnicodeDecodeError:
      raise InputError(f"{path} is not UTF-8 text") from None
    except csv.Error as e:
      raise InputError(f"{path} is not a readable CSV file: {e}") from None
    if not rows:
      raise InputError(f"{path} has no prompt rows (expected a header id,prompt_index,prompt and rows)")
    missing = [c for c in ("id", "prompt_index", "prompt") if c not in rows[0]]
    if missing:
      raise InputError(f"{path} lacks the column{'s' if len(missing) > 1 else ''} {', '.join(missing)} (expected "
                       "id,prompt_index,prompt)")
    groups: dict[str, list[tuple[int, str]]] = {}
    for line, row in enumerate(rows, 2):
      try:
        index = int(str(row["prompt_index"]).strip())
      except ValueError:
        raise InputError(f"{path} line {line}: prompt_index must be an integer, got {row['prompt_index']!r}") \
            from None
      text = (row.get("refined_prompt") or "").strip() or (row["prompt"] or "").strip()
      if not text:
        raise InputError(f"{path} line {line}: empty prompt")
      groups.setdefault(str(row["id"]).strip(), []).append((index, text))

    def order(key: str):
      return (0, int(key), key) if key.lstrip("-").isdigit() else (1, 0, key)

    return {vid: cls(prompts=tuple(t for _, t in sorted(items, key=lambda x: x[0])),
                     chunks=(int(interpolate_time),) * len(items), interpolation_steps=int(interpolation_steps))
            for vid, items in sorted(groups.items(), key=lambda kv: order(kv[0]))}


@dataclasses.dataclass
class _Blend:
  """A switch in progress: from ``source`` to ``target`` starting at chunk ``start``."""

  source: jax.Array
  target: jax.Array
  start: int
  steps: int


class PromptController:
  """Chooses each chunk's prompt embeddings: fixed, from a :class:`PromptSchedule`, or changed live.

  ``encode(text) -> (1, L, D)`` embeds a string (the pipeline's text encoder); ``embeds`` are the first chunk's.
  :meth:`request` may be called from any thread; requests are taken up by the next :meth:`for_chunk` call.
  """

  def __init__(self, embeds: jax.Array, encode: Callable[[str], jax.Array] | None, *,
               schedule_embeds: Sequence[jax.Array] | None = None, schedule: PromptSchedule | None = None,
               interpolation_steps: int = OFFICIAL_INTERPOLATION_STEPS, text: str | None = None):
    self._encode = encode
    self._fixed = embeds
    self._schedule = schedule
    self._schedule_embeds = list(schedule_embeds) if schedule_embeds is not None else None
    self._blend: _Blend | None = None
    self._current = embeds
    self._text = text
    self.interpolation_steps = int(interpolation_steps)
    self._lock = threading.Lock()
    self._pending: list[tuple[int, Any, str | None, int]] = []
    self._next_id = 0

  def check(self, prompt=None, prompt_embeds=None, blend_chunks: int | None = None) -> None:
    """Raises InputError for a request :meth:`request` would refuse."""
    if (prompt is None) == (prompt_embeds is None):
      raise InputError("a prompt change needs either a prompt string or prompt_embeds")
    if prompt is not None and not isinstance(prompt, str):
      raise InputError(f"the new prompt must be a string, got {type(prompt).__name__}")
    if prompt is not None and self._encode is None:
      raise InputError("no text encoder is loaded: change the prompt with prompt_embeds instead")
    if blend_chunks is not None and (not isinstance(blend_chunks, (int, np.integer)) or isinstance(
        blend_chunks, bool) or blend_chunks < 0):
      raise InputError(f"blend_chunks must be a non-negative integer, got {blend_chunks!r}")
    if prompt_embeds is not None:
      arr = np.asarray(prompt_embeds)
      arr = arr[None] if arr.ndim == 2 else arr
      if arr.shape != tuple(self._fixed.shape) or not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"prompt_embeds must be floating point with shape {tuple(self._fixed.shape)} (or without "
                         f"the leading 1), got {arr.dtype} {tuple(np.shape(prompt_embeds))}")

  def request(self, prompt=None, prompt_embeds=None, blend_chunks: int | None = None) -> int:
    """Queues a change for the next chunk; returns its request id."""
    self.check(prompt, prompt_embeds, blend_chunks)
    steps = self.interpolation_steps if blend_chunks is None else int(blend_chunks)
    with self._lock:
      rid = self._next_id
      self._next_id += 1
      self._pending.append((rid, prompt_embeds, prompt, steps))
    return rid

  def for_chunk(self, k: int) -> tuple[jax.Array, dict]:
    """Chunk ``k``'s (1, L, D) embeddings and what they are: {"weight", "request_ids", "text"}."""
    with self._lock:
      pending, self._pending = self._pending, []
    ids = []
    for rid, embeds, text, steps in pending:
      target = self._encode(text) if text is not None else jnp.asarray(
          np.asarray(embeds).reshape(self._fixed.shape), self._fixed.dtype)
      self._blend = _Blend(source=self._current, target=target.astype(self._fixed.dtype), start=k, steps=steps)
      self._schedule = None
      self._text = text
      ids.append(rid)
    if self._blend is not None:
      w = live_weight(k - self._blend.start, self._blend.steps)
      embeds = blend(self._blend.source, self._blend.target, w)
    elif self._schedule is not None:
      i_prev, i_cur, w = self._schedule.position(k)
      embeds = blend(self._schedule_embeds[i_prev], self._schedule_embeds[i_cur], w)
      prompt = self._schedule.prompts[i_cur]
      self._text = prompt if isinstance(prompt, str) else None
    else:
      w, embeds = 1.0, self._fixed
    self._current = embeds
    return embeds, {"weight": float(w), "request_ids": ids, "text": self._text}
