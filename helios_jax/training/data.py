"""Stage-1/2 training samples from encoded clips (training-spec section 3.2) and a deterministic batch stream.

A *source* is any random-access sequence whose items are dicts with ``latents`` (n_chunks, C, 9, h, w) and
``prompt_embeds`` (S, D): :class:`helios_jax.training.synthetic.SyntheticClips` or a prepared dataset.
Batch ``step`` is a pure function of (source, seed, step), so the data position saved in a checkpoint is the
step number alone and a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from helios_jax.errors import InputError

HISTORY_FRAMES = 19  # 16 + 2 + 1


def assemble_sample(latents: np.ndarray, chunk_index: int, history_frames: int = HISTORY_FRAMES) -> dict:
  """Anchor, history and target for one chosen chunk of a clip (spec 3.2 steps 2-4).

  Args:
    latents: (n, C, T, h, w) independently encoded chunks of one clip.
    chunk_index: the target chunk ``c`` in [0, n).
  Returns:
    dict of float32 ``x0`` (C, 1, h, w) (zeros when c == 0), ``history`` (C, 19, h, w) (zero-padded at the
    old end), ``target`` (C, T, h, w).
  """
  latents = np.asarray(latents, np.float32)
  if latents.ndim != 5:
    raise InputError(f"clip latents must be (n_chunks, C, T, h, w), got shape {latents.shape}")
  n, c, t, h, w = latents.shape
  if not 0 <= chunk_index < n:
    raise InputError(f"chunk_index {chunk_index} is out of range for a clip of {n} chunk(s)")
  seq = latents.transpose(1, 0, 2, 3, 4).reshape(c, n * t, h, w)
  seq = np.concatenate([np.zeros((c, history_frames, h, w), np.float32), seq], axis=1)
  start = t * chunk_index
  x0 = latents[0, :, :1] * (0.0 if chunk_index == 0 else 1.0)
  return dict(x0=x0.astype(np.float32), history=seq[:, start:start + history_frames],
              target=seq[:, start + history_frames:start + history_frames + t])


def sample_index(position: int, num_items: int, seed: int) -> tuple[int, int]:
  """(epoch, item index) of the ``position``-th sample of the shuffled, repeated stream."""
  epoch, offset = divmod(int(position), num_items)
  order = np.random.default_rng([seed, epoch]).permutation(num_items)
  return epoch, int(order[offset])


def get_batch(source: Sequence[dict], step: int, batch_size: int, seed: int) -> dict:
  """Batch number ``step``: stacked ``x0``, ``history``, ``target``, ``prompt_embeds`` (leading axis B)."""
  n_items = len(source)
  if n_items == 0:
    raise InputError("the training data source is empty")
  items = []
  for j in range(batch_size):
    epoch, idx = sample_index(step * batch_size + j, n_items, seed)
    item = source[idx]
    lat = np.asarray(item["latents"])
    chunk = int(np.random.default_rng(seed + epoch * 1_000_000 + idx).integers(lat.shape[0]))
    s = assemble_sample(lat, chunk)
    s["prompt_embeds"] = np.asarray(item["prompt_embeds"], np.float32)
    items.append(s)
  shapes = {tuple(s["target"].shape) for s in items}
  if len(shapes) != 1:
    raise InputError(f"a batch mixes clip shapes {sorted(shapes)}; use one resolution per dataset")
  return {k: np.stack([s[k] for s in items]) for k in items[0]}


def get_pair_batch(source: Sequence[dict], step: int, batch_size: int, seed: int) -> dict:
  """Stage-3 batch (spec 3.4, GT history): :func:`get_batch`'s primary sample plus a secondary sample ``*_2``
  (``x0_2``, ``history_2``, ``target_2``) from an independently chosen chunk of the same clip."""
  out = get_batch(source, step, batch_size, seed)
  second = []
  for j in range(batch_size):
    epoch, idx = sample_index(step * batch_size + j, len(source), seed)
    lat = np.asarray(source[idx]["latents"])
    chunk = int(np.random.default_rng(seed + epoch * 1_000_000 + idx + 999_999).integers(lat.shape[0]))
    second.append(assemble_sample(lat, chunk))
  for k in ("x0", "history", "target"):
    out[f"{k}_2"] = np.stack([s[k] for s in second])
  return out


class Prefetcher:
  """Builds batches ``start, start+1, ...`` in a background thread (depth ``depth``), in order.

  ``batch_fn(source, step, batch_size, seed)`` builds one batch (default :func:`get_batch`).
  """

  def __init__(self, source, start: int, batch_size: int, seed: int, depth: int = 2, batch_fn=None):
    batch_fn = get_batch if batch_fn is None else batch_fn
    import queue
    import threading
    self._q: "queue.Queue" = queue.Queue(maxsize=depth)
    self._stop = threading.Event()

    def work():
      step = start
      while not self._stop.is_set():
        try:
          item = (step, batch_fn(source, step, batch_size, seed))
        except Exception as e:  # surfaced to the consumer
          item = (step, e)
        while not self._stop.is_set():
          try:
            self._q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        step += 1

    self._thread = threading.Thread(target=work, daemon=True)
    self._thread.start()

  def next(self) -> tuple[int, dict]:
    step, batch = self._q.get()
    if isinstance(batch, Exception):
      raise batch
    return step, batch

  def close(self):
    self._stop.set()
    self._thread.join(timeout=5)
