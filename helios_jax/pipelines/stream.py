"""Chunk-by-chunk generation: :class:`HeliosStream`, what ``pipe.stream(...)`` returns.

The stream runs the pipelines' one chunk loop (``HeliosPipelineBase._chunk_latents``; no second sampler) and
turns each chunk into uint8 frames on the device. It keeps ``prefetch`` chunks in flight: chunk k + 1's denoising
is dispatched before chunk k's frames are fetched, so with JAX's asynchronous dispatch the device runs chunk k's
VAE decode and chunk k + 1's transformer back to back while the host waits for (and hands out) chunk k.

Prompt changes (:meth:`HeliosStream.set_prompt`) and :meth:`HeliosStream.stop` may come from any thread; the
chunk loop takes them up when it starts its next chunk.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.errors import InputError

DEFAULT_FPS = 24  # playback rate of Helios videos (the official export_to_video fps)


class StreamClosedError(InputError):
  """The stream has ended or was stopped: it takes no more prompt changes."""


@dataclasses.dataclass
class StreamChunk:
  """One chunk of a stream.

  ``frames``: uint8 (T, H, W, 3), T = 33 for a 9-latent chunk (fewer for the trimmed last chunk of a finite
  stream); ``first_frame``: index of ``frames[0]`` in the whole video; ``timings``: ``ready_s`` (seconds from the
  stream's creation until these frames were on the host), ``interval_s`` (since the previous chunk was ready),
  ``steps`` (denoising steps of this chunk); ``prompt``: ``weight`` (of the prompt being moved to; 1 = fully it),
  ``request_ids`` (``set_prompt`` requests first used by this chunk), ``text`` (that prompt, None for embeddings).
  """

  index: int
  frames: np.ndarray
  first_frame: int
  timings: dict
  prompt: dict


@jax.jit
def _to_uint8_frames(unit: jax.Array) -> jax.Array:
  """(1, 3, T, H, W) float in [0, 1] -> (T, H, W, 3) uint8, rounded as ``helios_jax.io.media.to_uint8``."""
  return jnp.transpose(jnp.round(unit[0] * 255.0), (1, 2, 3, 0)).astype(jnp.uint8)


class HeliosStream:
  """Iterator of :class:`StreamChunk`; made by ``pipe.stream(...)`` (see there for the arguments)."""

  def __init__(self, pipe, run, prefetch: int = 1):
    self._pipe = pipe
    self._run = run
    self._chunks = pipe._chunk_latents(run)
    self._prefetch = int(prefetch)
    self._pending: collections.deque = collections.deque()
    self._stop = threading.Event()
    self._closed = False
    self._exhausted = False
    self._t0 = time.perf_counter()
    self._last_ready = 0.0
    self.fps = DEFAULT_FPS
    self.height, self.width = run.height, run.width
    self.num_chunks = run.num_chunks
    self.frames_per_chunk = run.window

  # ------------------------------------------------------------------------------------------------------------------
  # Control (thread-safe)

  @property
  def closed(self) -> bool:
    return self._closed or self._stop.is_set()

  def set_prompt(self, prompt: str | None = None, *, prompt_embeds=None, blend_chunks: int | None = None) -> int:
    """Changes the prompt from the next chunk the stream starts, blended over ``blend_chunks`` chunks (None: the
    stream's ``interpolation_steps``; 0 or 1: at once). Returns the request id that chunks report in
    ``chunk.prompt["request_ids"]``. ``prompt_embeds``: (1, L, D) or (L, D), instead of a string."""
    if self.closed or self._exhausted:
      raise StreamClosedError("the stream has ended: start a new one to change the prompt")
    return self._run.prompts.request(prompt, prompt_embeds, blend_chunks)

  def stop(self) -> None:
    """Starts no new chunk; the chunks already dispatched are still yielded, then the iteration ends."""
    self._stop.set()

  def close(self) -> None:
    """Ends the stream at once and drops the chunks in flight."""
    self._stop.set()
    self._closed = True
    self._pending.clear()
    try:
      self._chunks.close()
    except ValueError:  # closed from another thread while that one runs the loop: it ends at its next chunk
      pass

  def __enter__(self) -> "HeliosStream":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # ------------------------------------------------------------------------------------------------------------------
  # Iteration

  def __iter__(self) -> "HeliosStream":
    return self

  def _dispatch(self) -> bool:
    """Starts the next chunk (denoise + decode + uint8 conversion, all dispatched); False when there is none."""
    if self._exhausted or self._stop.is_set():
      return False
    try:
      k, x, info = next(self._chunks)
    except StopIteration:
      self._exhausted = True
      return False
    run = self._run
    frames = _to_uint8_frames(self._pipe._decode_unit(x))
    first = k * run.window
    if run.total_frames is not None and first + run.window > run.total_frames:
      frames = frames[:run.total_frames - first]
    self._pending.append((k, frames, first, info))
    return True

  def __next__(self) -> StreamChunk:
    if self._closed:
      raise StopIteration
    while len(self._pending) <= self._prefetch and self._dispatch():
      pass
    if not self._pending:
      self._exhausted = True
      raise StopIteration
    k, frames, first, info = self._pending.popleft()
    host = np.asarray(frames)  # waits for this chunk only; the next one is already queued on the device
    ready = time.perf_counter() - self._t0
    timings = {"ready_s": ready, "interval_s": ready - self._last_ready, "steps": self._run.steps_per_chunk(k)}
    self._last_ready = ready
    self._run.timings["chunks"].append(timings["interval_s"])
    return StreamChunk(index=k, frames=host, first_frame=first, timings=timings, prompt=info)

  def frames(self):
    """Yields the video's frames one by one (uint8 (H, W, 3)), e.g. for ``helios_jax.io.media.write_video``."""
    for chunk in self:
      yield from chunk.frames

  def __repr__(self) -> str:
    n = "endless" if self.num_chunks is None else f"{self.num_chunks} chunks"
    return f"HeliosStream({n}, {self.width}x{self.height} at {self.fps} fps, prefetch {self._prefetch})"


__all__ = ["HeliosStream", "StreamChunk", "StreamClosedError", "DEFAULT_FPS"]
