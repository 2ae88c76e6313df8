"""One client's stream: the generation thread, JPEG encoding, the mp4 recording and the events they produce.

A :class:`StreamSession` owns the device from :meth:`Engine.claim` (done by the server before it is started)
until its generation thread has closed the pipeline stream. Three threads work for it:

* the generation thread opens ``pipe.stream(...)`` and iterates it (JAX calls block, so never the event loop);
* a :class:`FrameEncoder` turns each chunk into JPEG frames (Pillow releases the GIL while encoding), so encoding
  never delays the next chunk;
* an :class:`~helios_jax.serving.recorder.Mp4Recorder` writes the whole video as it streams.

Events leave through ``emit(messages)``, a thread-safe callable the server provides (it hands them to the event
loop with ``loop.call_soon_threadsafe``); the messages of one call are sent back to back, so a ``chunk`` event
is always followed directly by its frames. Control calls (:meth:`StreamSession.set_prompt`, :meth:`stop`,
:meth:`cancel`) come from the event loop and never block.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from typing import Callable, Sequence

import numpy as np

from helios_jax.errors import HeliosError
from helios_jax.serving.engine import Engine, StreamRequest
from helios_jax.serving.protocol import Code, PromptMessage, ProtocolError, encode_jpeg, error_event, event
from helios_jax.serving.recorder import VideoStore

logger = logging.getLogger("helios_jax.serving")

Emit = Callable[[Sequence[str | bytes]], None]
INTERNAL_MESSAGE = "the server failed while generating this stream; the details are in its log"


class FrameEncoder:
  """Encodes chunks to JPEG in a thread of its own and emits ``[head, *jpeg frames, *tail]`` per chunk, in order."""

  def __init__(self, emit: Emit, quality: int):
    self._emit = emit
    self._quality = int(quality)
    self._queue: queue.Queue = queue.Queue()
    self._dropped = threading.Event()
    self._thread = threading.Thread(target=self._work, name="helios-jpeg", daemon=True)
    self._thread.start()

  def _work(self) -> None:
    while True:
      item = self._queue.get()
      if item is None:
        return
      if self._dropped.is_set():
        continue
      head, frames, tail = item
      try:
        jpegs = encode_jpeg(frames, self._quality)
      except Exception:
        logger.exception("JPEG encoding failed")
        self._emit([error_event(Code.INTERNAL, INTERNAL_MESSAGE)])
        continue
      self._emit([head, *jpegs, *tail])

  def put(self, head: str, frames: np.ndarray, tail: Sequence[str] = ()) -> None:
    """Queues one chunk: its event ``head``, uint8 (T, H, W, 3) ``frames``, events to send after the frames."""
    self._queue.put((head, frames, list(tail)))

  def finish(self) -> None:
    """Waits until every queued chunk has been emitted."""
    self._queue.put(None)
    self._thread.join()

  def abort(self) -> None:
    """Drops the chunks not yet emitted and ends the thread."""
    self._dropped.set()
    self.finish()


class StreamSession:
  """A stream of one connection (see the module docstring).

  Args:
    engine: the server's engine; the caller has claimed the device for this session.
    request: the resolved start request.
    store: where the mp4 goes.
    emit: thread-safe sender of a list of messages (JSON text / binary frames), sent back to back.
    t_request: ``time.perf_counter()`` when the start message arrived (the reference of every ``elapsed_s``).
  """

  def __init__(self, engine: Engine, request: StreamRequest, store: VideoStore, emit: Emit, t_request: float):
    self.id = secrets.token_hex(6)
    self.engine = engine
    self.request = request
    self._store = store
    self._emit = emit
    self._t_request = t_request
    self._lock = threading.Lock()
    self._stream = None
    self._stop_requested = False
    self._cancelled = threading.Event()
    self._ended = threading.Event()
    self._last_index = -1      # the last chunk the pipeline handed out
    self._waiting = False      # the generation thread is inside next(stream)
    self._accepted: list[int] = []
    self._applied: set[int] = set()
    self._thread = threading.Thread(target=self._run, name=f"helios-stream-{self.id}", daemon=True)

  # ------------------------------------------------------------------------------------------------------------------
  # Control (event loop)

  def start(self) -> None:
    self._thread.start()

  @property
  def ended(self) -> bool:
    """The generation thread is done: ``done`` (or a fatal error) has been emitted, the device is free."""
    return self._ended.is_set()

  def set_prompt(self, msg: PromptMessage) -> str:
    """Queues a live prompt change; returns the ``prompt_accepted`` event.

    Raises:
      ProtocolError: ``not_started`` before the stream is open, ``stream_ended`` once it stops, ``bad_input``
        when the pipeline refuses the prompt.
    """
    from helios_jax.pipelines import StreamClosedError
    with self._lock:
      stream = self._stream
    if stream is None:
      raise ProtocolError(Code.NOT_STARTED, "the stream is still starting; send prompt changes after the "
                                            "\"started\" event", msg.id)
    if self._stop_requested or self._cancelled.is_set():
      raise ProtocolError(Code.STREAM_ENDED, "the stream is stopping; start a new one to change the prompt", msg.id)
    try:
      rid = stream.set_prompt(msg.prompt, blend_chunks=msg.blend_chunks)
    except StreamClosedError:
      raise ProtocolError(Code.STREAM_ENDED, "the stream has ended; start a new one to change the prompt",
                          msg.id) from None
    except HeliosError as e:
      raise ProtocolError(Code.BAD_INPUT, _sentence(e), msg.id) from None
    with self._lock:
      self._accepted.append(int(rid))
      expected = self._expected_chunk(stream)
    blend = self.request.blend_chunks if msg.blend_chunks is None else msg.blend_chunks
    return event("prompt_accepted", request_id=int(rid), prompt=msg.prompt, blend_chunks=blend,
                 expected_chunk=expected, id=msg.id)

  def _expected_chunk(self, stream) -> int | None:
    """The chunk a change made now applies from at the latest, None when the stream ends before it.

    While the pipeline's caller holds chunk k, chunks up to k + ``prefetch`` may have been started; while it waits
    in ``next()`` for chunk k + 1, up to k + 1 + ``prefetch``; before the first ``next()``, none. ``prompt_applied``
    reports the real chunk (earlier when the pipeline has not run that far ahead)."""
    prefetch = self.engine.settings.prefetch
    if self._last_index < 0 and not self._waiting:
      k = 0
    else:
      k = self._last_index + 1 + prefetch + (1 if self._waiting else 0)
    return None if stream.num_chunks is not None and k >= stream.num_chunks else k

  def stop(self) -> None:
    """No new chunk is started; the chunks in flight are still sent, then ``done`` with the mp4."""
    self._stop_requested = True
    with self._lock:
      stream = self._stream
    if stream is not None:
      stream.stop()

  def cancel(self) -> None:
    """The client is gone: end after the chunk being computed, send nothing more, delete the partial mp4."""
    self._cancelled.set()
    self.stop()

  def join(self, timeout: float | None = None) -> None:
    self._thread.join(timeout)

  # ------------------------------------------------------------------------------------------------------------------
  # Generation thread

  def _send(self, *messages: str | bytes) -> None:
    """Emits ``messages`` back to back, unless the client is gone."""
    if not self._cancelled.is_set():
      self._emit(list(messages))

  def _run(self) -> None:
    try:
      self._generate()
    except Exception:  # a bug in this module; never leave the device claimed
      logger.exception("stream %s failed", self.id)
      self._send(error_event(Code.INTERNAL, INTERNAL_MESSAGE, fatal=True))
    finally:
      self.engine.release(self)
      self._ended.set()

  def _generate(self) -> None:
    stream = self._open()
    if stream is None:
      return
    recorder = self._store.recorder(self.id, stream.fps)
    encoder = FrameEncoder(lambda messages: self._send(*messages), self.engine.settings.jpeg_quality)
    progress = _Progress()
    failure = None
    try:
      for chunk in self._chunks(stream):
        progress.add(chunk, time.perf_counter() - self._t_request)
        recorder.add(chunk.frames)
        encoder.put(*self._chunk_events(chunk, progress))
    except HeliosError as e:
      failure = (Code.BAD_INPUT, _sentence(e))
    except Exception:
      logger.exception("stream %s failed while generating", self.id)
      failure = (Code.INTERNAL, INTERNAL_MESSAGE)
    finally:
      stream.close(wait=True)
      self.engine.release(self)  # the device is free before the last frames are encoded and "done" is sent
    if self._cancelled.is_set():
      encoder.abort()
      recorder.abort()
      return
    encoder.finish()
    if failure is not None:
      recorder.abort()
      self._send(error_event(*failure, fatal=True))
      return
    self._send(self._done_event(stream, progress, self._publish(recorder)))

  def _open(self):
    """``pipe.stream(...)`` for the request and the ``started`` event; None (after a fatal error event) when the
    pipeline refuses it."""
    req = self.request
    try:
      stream = self.engine.open_stream(req)
    except Exception as e:
      if isinstance(e, HeliosError):
        code, message = Code.BAD_INPUT, _sentence(e)
      else:
        logger.exception("pipe.stream failed for stream %s", self.id)
        code, message = Code.INTERNAL, INTERNAL_MESSAGE
      self.engine.release(self)
      self._send(error_event(code, message, id=req.id, fatal=True))
      return None
    with self._lock:
      self._stream = stream
    if self._stop_requested:  # "stop" came while the stream was being opened
      stream.stop()
    plan = self.engine.plan
    self._send(event("started", stream_id=self.id, mode=req.mode, prompt=req.prompt,
                     negative_prompt=req.negative_prompt, fps=stream.fps, width=stream.width, height=stream.height,
                     frames_per_chunk=stream.frames_per_chunk, num_chunks=stream.num_chunks,
                     num_frames=req.num_frames, endless=req.endless, seed=req.seed, steps=list(plan.steps),
                     guidance=plan.guidance, blend_chunks=req.blend_chunks, id=req.id))
    return stream

  def _publish(self, recorder) -> str | None:
    """Waits for the mp4; returns its URL (None without frames, or after a ``video_write`` error event)."""
    try:
      path = recorder.finish()
    except Exception as e:
      logger.exception("stream %s: the mp4 could not be written", self.id)
      self._send(error_event(Code.VIDEO_WRITE, f"the video file could not be written ({_sentence(e)})"))
      return None
    if path is None:
      return None
    self._store.prune()
    return self._store.url(path)

  def _done_event(self, stream, p: "_Progress", url: str | None) -> str:
    req = self.request
    finished = req.num_frames is not None and stream.num_chunks is not None and p.chunks >= stream.num_chunks
    with self._lock:
      unapplied = [r for r in self._accepted if r not in self._applied]
    return event("done", stream_id=self.id,
                 reason=("frame_limit" if req.endless else "finished") if finished else "stopped",
                 frames=p.frames, chunks=p.chunks, video_url=url, time_to_first_frame_s=p.first_s,
                 generation_fps=p.frames / p.last_s if p.last_s else None, steady_fps=p.steady_fps(),
                 elapsed_s=time.perf_counter() - self._t_request, unapplied_request_ids=unapplied)

  def _chunks(self, stream):
    """Iterates ``stream``, tracking which chunk is awaited (for :meth:`_expected_chunk`); ends on cancel."""
    it = iter(stream)
    while not self._cancelled.is_set():
      with self._lock:
        self._waiting = True
      try:
        chunk = next(it)
      except StopIteration:
        return
      finally:
        with self._lock:
          self._waiting = False
      with self._lock:
        self._last_index = chunk.index
      if self._cancelled.is_set():
        return
      yield chunk

  def _chunk_events(self, chunk, progress: "_Progress") -> tuple[str, np.ndarray, list[str]]:
    """The ``chunk`` event of ``chunk``, its frames, and a ``prompt_applied`` event per request it applies."""
    t = chunk.timings
    interval = float(t.get("interval_s") or 0.0)
    elapsed = progress.last_s
    ids = [int(r) for r in chunk.prompt.get("request_ids", ())]
    with self._lock:
      self._applied.update(ids)
    head = event("chunk", index=chunk.index, first_frame=chunk.first_frame, num_frames=len(chunk.frames),
                 elapsed_s=elapsed, timings=dict(t), chunk_fps=len(chunk.frames) / interval if interval > 0 else None,
                 generation_fps=progress.frames / elapsed if elapsed > 0 else None,
                 prompt=dict(text=chunk.prompt.get("text"), weight=chunk.prompt.get("weight"), request_ids=ids))
    tail = [event("prompt_applied", request_id=r, chunk=chunk.index, first_frame=chunk.first_frame) for r in ids]
    return head, chunk.frames, tail


class _Progress:
  """Frames and chunks so far, and when (seconds since the start message) the first and the last chunk came."""

  def __init__(self):
    self.frames = self.chunks = self.first_frames = 0
    self.first_s: float | None = None
    self.last_s: float | None = None

  def add(self, chunk, elapsed: float) -> None:
    self.frames += len(chunk.frames)
    self.chunks += 1
    self.first_frames = self.first_frames or len(chunk.frames)
    self.first_s = elapsed if self.first_s is None else self.first_s
    self.last_s = elapsed

  def steady_fps(self) -> float | None:
    """Frames per second after the first chunk (None with one chunk)."""
    if self.chunks < 2 or self.last_s <= self.first_s:
      return None
    return (self.frames - self.first_frames) / (self.last_s - self.first_s)


def _sentence(e: BaseException) -> str:
  """An exception's message on one line (the library's errors are one sentence already)."""
  return " ".join(str(e).split()) or type(e).__name__


__all__ = ["StreamSession", "FrameEncoder", "Emit"]
