"""The mp4 of each stream, written while it streams: :class:`Mp4Recorder` and the folder they live in.

A recorder feeds :func:`helios_jax.io.media.write_video` from a queue in its own thread, so H.264 encoding runs
beside generation and the file is complete a moment after the last chunk. ``write_video`` writes to a hidden
temporary name and renames it when done: a half-written or aborted video never appears under its final name (an
aborted one is deleted). :class:`VideoStore` names the files after their stream ids, serves their paths by name,
and keeps only the newest ``keep`` videos.
"""

from __future__ import annotations

import os
import queue
import re
import tempfile
import threading
from typing import Iterator

import numpy as np

_END, _ABORT = object(), object()
_NAME = re.compile(r"^[0-9a-f]{12}\.mp4$")


class _Aborted(Exception):
  pass


class Mp4Recorder:
  """Encodes frames to ``path`` (H.264 at ``fps``) as they are added. Methods are called from one thread."""

  def __init__(self, path: str, fps: int):
    from helios_jax.io import media
    self.path = path
    self._media = media
    self._fps = int(fps)
    self._queue: queue.Queue = queue.Queue()
    self._error: BaseException | None = None
    self._drained = False  # the writer has taken the final _END / _ABORT from the queue
    self.frames = 0
    self._thread = threading.Thread(target=self._write, name="helios-mp4", daemon=True)
    self._thread.start()

  def _frames(self) -> Iterator[np.ndarray]:
    while True:
      item = self._queue.get()
      if item is _END or item is _ABORT:
        self._drained = True
        if item is _ABORT:
          raise _Aborted
        return
      yield from item

  def _write(self) -> None:
    try:
      self._media.write_video(self.path, self._frames(), fps=self._fps)
    except _Aborted:
      pass
    except BaseException as e:  # reported by finish()
      self._error = e
      while not self._drained:  # take what add() still sends, up to finish() / abort()
        item = self._queue.get()
        self._drained = item is _END or item is _ABORT

  def add(self, frames: np.ndarray) -> None:
    """Queues uint8 (T, H, W, 3) frames (not copied: do not modify them afterwards)."""
    self._queue.put(frames)
    self.frames += len(frames)

  def finish(self) -> str | None:
    """Waits until the mp4 is complete; returns its path, or None when no frame was added.

    Raises:
      helios_jax.errors.HeliosError (or what the encoder raised): the video could not be written.
    """
    self._queue.put(_END)
    self._thread.join()
    if self.frames == 0:
      return None
    if self._error is not None:
      raise self._error
    return self.path

  def abort(self) -> None:
    """Stops encoding and deletes the partial file."""
    self._queue.put(_ABORT)
    self._thread.join()


class VideoStore:
  """The folder of the streams' mp4s (``folder``, or a new temporary folder), named ``<stream id>.mp4``."""

  def __init__(self, folder: str | None = None, keep: int = 20):
    self.folder = os.path.abspath(folder) if folder else tempfile.mkdtemp(prefix="helios-serve-videos-")
    os.makedirs(self.folder, exist_ok=True)
    self.keep = int(keep)
    self._lock = threading.Lock()

  def recorder(self, stream_id: str, fps: int) -> Mp4Recorder:
    """A recorder writing ``<stream_id>.mp4`` (``stream_id``: 12 hex digits)."""
    name = f"{stream_id}.mp4"
    if not _NAME.match(name):
      raise ValueError(f"stream ids are 12 hex digits, got {stream_id!r}")
    return Mp4Recorder(os.path.join(self.folder, name), fps)

  def url(self, path: str) -> str:
    """The server path a finished video is served at."""
    return f"/videos/{os.path.basename(path)}"

  def find(self, name: str) -> str | None:
    """The path of the finished video ``name`` (e.g. ``0123456789ab.mp4``), None if there is none."""
    if not _NAME.match(name):
      return None
    path = os.path.join(self.folder, name)
    return path if os.path.isfile(path) else None

  def prune(self) -> None:
    """Deletes all but the newest ``keep`` finished videos."""
    with self._lock:
      names = [n for n in os.listdir(self.folder) if _NAME.match(n)]
      paths = sorted((os.path.join(self.folder, n) for n in names), key=os.path.getmtime, reverse=True)
      for path in paths[self.keep:]:
        try:
          os.remove(path)
        except OSError:
          pass


__all__ = ["Mp4Recorder", "VideoStore"]
