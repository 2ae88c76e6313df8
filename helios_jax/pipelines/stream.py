"""Chunk-by-chunk generation: :class:`HeliosStream`, what ``pipe.stream(...)`` returns.

The stream runs the pipelines' one chunk loop (``HeliosPipelineBase._chunk_latents``; no second sampler) on a
dispatch thread and turns each chunk into uint8 frames on the device. It keeps ``prefetch`` chunks in flight:
chunk k + 1's denoising is dispatched while chunk k's frames are fetched, so with JAX's asynchronous dispatch the
device runs chunk k's VAE decode and chunk k + 1's transformer back to back while the caller gets chunk k.

Prompt changes (:meth:`HeliosStream.set_prompt`) and :meth:`HeliosStream.stop` may come from any thread; the
chunk loop takes them up when it starts its next chunk.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time

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


_END = object()  # the dispatch thread's last item


class HeliosStream:
  """Iterator of :class:`StreamChunk`; made by ``pipe.stream(...)`` (see there for the arguments).

  A dispatch thread runs the chunk loop (started by the first ``next()``): it dispatches chunk k (denoise, decode,
  uint8 conversion, host copy started) and goes on to chunk k + 1 while the caller's thread waits for chunk k's
  frames. Dispatching can itself block once many programs are queued on the device, which is why it has a thread
  of its own: the caller gets each chunk as soon as its frames are on the host. While the caller holds chunk k,
  at most chunks k + 1 .. k + ``prefetch`` have been started, so a prompt change made then applies from chunk
  k + prefetch + 1 at the latest (exactly there with ``prefetch=0``; chunks report it in ``prompt["request_ids"]``).
  """

  def __init__(self, pipe, run, prefetch: int = 1):
    self._pipe = pipe
    self._run = run
    self._chunks = pipe._chunk_latents(run)
    self._prefetch = int(prefetch)
    self._slots = threading.Semaphore(self._prefetch + 1)  # chunks started and not yet handed past by the caller
    self._held = False  # the caller holds a chunk whose slot is released at the next next()
    self._queue: queue.Queue = queue.Queue()
    self._worker: threading.Thread | None = None
    self._last_dispatched = None  # the newest chunk's device frames (what join() waits for)
    self._stop = threading.Event()
    self._closed = False
    self._ended = False
    self._t0 = time.perf_counter()
    self._last_ready = 0.0
    self.fps = DEFAULT_FPS
    self.height, self.width = run.height, run.width
    self.num_chunks = run.num_chunks
    self.num_frames = run.total_frames  # frames the whole stream yields (None: endless)
    self.frames_per_chunk = run.window

  # ------------------------------------------------------------------------------------------------------------------
  # Control (thread-safe)

  @property
  def closed(self) -> bool:
    return self._closed or self._ended or self._stop.is_set()

  def set_prompt(self, prompt: str | None = None, *, prompt_embeds=None, blend_chunks: int | None = None) -> int:
    """Changes the prompt from the next chunk the stream starts, blended over ``blend_chunks`` chunks (None: the
    stream's ``interpolation_steps``; 0 or 1: at once). Returns the request id that chunks report in
    ``chunk.prompt["request_ids"]``. ``prompt_embeds``: (1, L, D) or (L, D), instead of a string."""
    if self.closed:
      raise StreamClosedError("the stream has ended: start a new one to change the prompt")
    return self._run.prompts.request(prompt, prompt_embeds, blend_chunks)

  def stop(self) -> None:
    """Starts no new chunk; the chunks already started are still yielded, then the iteration ends."""
    self._stop.set()

  def close(self, wait: bool = False, timeout: float | None = None) -> None:
    """Ends the stream at once and drops the chunks in flight. The dispatch thread ends after the chunk it is
    dispatching; ``wait=True`` blocks until it has (and the device has finished that chunk), so the device is free
    for the next user when this returns (``timeout`` seconds at most)."""
    self._stop.set()
    self._closed = True
    self._slots.release()  # wakes a dispatch thread waiting for a slot
    if self._worker is None:
      self._chunks.close()
    elif wait:
      self.join(timeout)

  def join(self, timeout: float | None = None) -> bool:
    """Waits until the dispatch thread has ended and the work it dispatched is done; True if it has."""
    worker = self._worker
    if worker is not None:
      worker.join(timeout)
      if worker.is_alive():
        return False
    jax.block_until_ready((self._run.history, self._last_dispatched))
    return True

  def __enter__(self) -> "HeliosStream":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # ------------------------------------------------------------------------------------------------------------------
  # The dispatch thread

  def _dispatch_loop(self) -> None:
    run = self._run
    try:
      while not self._stop.is_set():
        if not self._slots.acquire(timeout=0.05):
          continue
        if self._stop.is_set():
          break
        try:
          k, x, info = next(self._chunks)
        except StopIteration:
          break
        frames = _to_uint8_frames(self._pipe._decode_unit(x))
        first = k * run.window
        if run.total_frames is not None and first + run.window > run.total_frames:
          frames = frames[:run.total_frames - first]
        self._last_dispatched = frames
        frames.copy_to_host_async()  # the transfer starts as soon as the frames exist
        self._queue.put((k, frames, first, info))
    except BaseException as e:  # noqa: BLE001  (handed to the caller's thread, raised there)
      self._queue.put(e)
    finally:
      self._chunks.close()
      self._queue.put(_END)

  # ------------------------------------------------------------------------------------------------------------------
  # Iteration

  def __iter__(self) -> "HeliosStream":
    return self

  def __next__(self) -> StreamChunk:
    if self._closed or self._ended:
      raise StopIteration
    if self._held:
      self._held = False
      self._slots.release()
    if self._worker is None:
      self._worker = threading.Thread(target=self._dispatch_loop, name="helios-stream", daemon=True)
      self._worker.start()
    while True:
      try:
        item = self._queue.get(timeout=0.1)
        break
      except queue.Empty:
        if self._closed:
          raise StopIteration from None
    if item is _END or self._closed:
      self._ended = True
      raise StopIteration
    if isinstance(item, BaseException):
      self._ended = True
      raise item
    k, frames, first, info = item
    host = np.asarray(frames)  # this chunk only: the dispatch thread is already on the next one
    self._held = True
    ready = time.perf_counter() - self._t0
    timings = {"ready_s": ready, "interval_s": ready - self._last_ready, "steps": self._run.steps_per_chunk(k)}
    self._last_ready = ready
    self._run.timings["chunks"].append(timings["interval_s"])
    return StreamChunk(index=k, frames=host, first_frame=first, timings=timings, prompt=info)

  def __repr__(self) -> str:
    n = "endless" if self.num_chunks is None else f"{self.num_chunks} chunks"
    return f"HeliosStream({n}, {self.width}x{self.height} at {self.fps} fps, prefetch {self._prefetch})"


__all__ = ["HeliosStream", "StreamChunk", "StreamClosedError", "DEFAULT_FPS"]
