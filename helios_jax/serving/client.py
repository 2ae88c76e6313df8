"""A small synchronous Python client of the streaming server's WebSocket API (``docs/streaming.md``).

    from helios_jax.serving.client import StreamClient

    with StreamClient("ws://127.0.0.1:8000/ws") as client:
        print(client.info["model"], client.info["fps"])
        client.start("a purple circle moves down", num_frames=99)
        for ev in client.events():               # until "done" (or a fatal error)
            if ev.type == "chunk":
                frames = ev.images()             # uint8 (T, H, W, 3)
                if ev["index"] == 0:
                    client.set_prompt("a white circle moves up", blend_chunks=2)
        print(ev["video_url"])                   # the mp4 of the whole stream: client.download(ev, "out.mp4")

Requests are sent without waiting for their replies; replies and stream events come back in order through
:meth:`StreamClient.recv` / :meth:`events` / :meth:`wait_for`. A ``chunk`` event arrives with its JPEG frames
attached (``Event.frames``), so a reader never sees a frame without its chunk.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import time
import urllib.request
from typing import Any, Iterator

import numpy as np

from helios_jax.serving.protocol import decode_jpeg


class ServerError(Exception):
  """An ``error`` event from the server: ``code`` (stable, see docs/streaming.md), ``message``, the ``event``."""

  def __init__(self, ev: "Event"):
    super().__init__(f"{ev.data.get('code')}: {ev.data.get('message')}")
    self.code = ev.data.get("code")
    self.message = ev.data.get("message")
    self.event = ev


@dataclasses.dataclass
class Event:
  """One server event: ``type``, the JSON ``data`` (fields as documented), and for ``chunk`` events the frames
  that followed it (``frames``: one JPEG file per frame)."""

  type: str
  data: dict
  frames: list[bytes] = dataclasses.field(default_factory=list)

  def __getitem__(self, key: str) -> Any:
    return self.data[key]

  def get(self, key: str, default: Any = None) -> Any:
    return self.data.get(key, default)

  def images(self) -> np.ndarray:
    """The chunk's frames decoded: uint8 (T, H, W, 3)."""
    return np.stack([decode_jpeg(f) for f in self.frames]) if self.frames else np.zeros((0, 0, 0, 3), np.uint8)


def _payload(upload: str | os.PathLike | bytes) -> str:
  if isinstance(upload, (bytes, bytearray)):
    data = bytes(upload)
  else:
    with open(upload, "rb") as f:
      data = f.read()
  return base64.b64encode(data).decode("ascii")


class StreamClient:
  """A connection to ``url`` (``ws://host:port/ws``); :attr:`info` holds the server's ``ready`` event.

  Args:
    url: the WebSocket URL.
    timeout: seconds to wait for the connection and the ``ready`` event, and the default of :meth:`recv`.
  """

  def __init__(self, url: str, timeout: float = 60.0):
    from websockets.sync.client import connect
    self.url = url
    self.timeout = timeout
    self._ws = connect(url, open_timeout=timeout, max_size=2 ** 26, compression=None)
    self.history: list[Event] = []
    self.info: dict = self.wait_for("ready", timeout=timeout).data

  # ------------------------------------------------------------------------------------------------------------------
  # Requests (sent at once; the replies come through recv)

  def send(self, message: dict) -> None:
    """Sends one JSON message as is."""
    self._ws.send(json.dumps(message))

  def send_raw(self, data: str | bytes) -> None:
    """Sends a text or binary message unchanged (for testing the server's error handling)."""
    self._ws.send(data)

  def start(self, prompt: str, mode: str = "t2v", *, num_frames: int | None = None, endless: bool = False,
            seed: int | None = None, negative_prompt: str | None = None, blend_chunks: int | None = None,
            image: str | os.PathLike | bytes | None = None, video: str | os.PathLike | bytes | None = None,
            id: Any = None) -> None:
    """Sends a ``start`` message; ``image`` / ``video``: a file path or the file's bytes (sent as base64)."""
    msg: dict[str, Any] = {"type": "start", "mode": mode, "prompt": prompt}
    optional = dict(num_frames=num_frames, seed=seed, negative_prompt=negative_prompt, blend_chunks=blend_chunks,
                    id=id, image=None if image is None else _payload(image),
                    video=None if video is None else _payload(video))
    msg.update({k: v for k, v in optional.items() if v is not None})
    if endless:
      msg["endless"] = True
    self.send(msg)

  def set_prompt(self, prompt: str, blend_chunks: int | None = None, id: Any = None) -> None:
    """Sends a ``prompt`` message (a live prompt change); the reply is ``prompt_accepted`` or ``error``."""
    msg: dict[str, Any] = {"type": "prompt", "prompt": prompt}
    if blend_chunks is not None:
      msg["blend_chunks"] = blend_chunks
    if id is not None:
      msg["id"] = id
    self.send(msg)

  def stop(self, id: Any = None) -> None:
    """Sends a ``stop`` message; the reply is ``stopping``, then the chunks in flight, then ``done``."""
    self.send({"type": "stop"} if id is None else {"type": "stop", "id": id})

  # ------------------------------------------------------------------------------------------------------------------
  # Events

  def recv(self, timeout: float | None = None) -> Event:
    """The next event (a ``chunk`` with its frames). Raises TimeoutError after ``timeout`` seconds (default: the
    client's), and websockets' ``ConnectionClosed`` when the server closed the socket."""
    timeout = self.timeout if timeout is None else timeout
    raw = self._ws.recv(timeout=timeout)
    if isinstance(raw, bytes):
      raise RuntimeError("the server sent a frame without a chunk event before it")
    data = json.loads(raw)
    ev = Event(type=data.get("type", ""), data=data)
    for _ in range(int(data.get("num_frames", 0)) if ev.type == "chunk" else 0):
      frame = self._ws.recv(timeout=timeout)
      if not isinstance(frame, bytes):
        raise RuntimeError(f"expected a binary frame after the chunk event, got {frame[:80]!r}")
      ev.frames.append(frame)
    self.history.append(ev)
    return ev

  def wait_for(self, *types: str, timeout: float | None = None) -> Event:
    """Reads events until one of ``types`` arrives and returns it (the others stay in :attr:`history`).

    Raises:
      ServerError: an ``error`` event came first (unless "error" is one of ``types``).
      TimeoutError: nothing matching within ``timeout`` seconds (default: the client's) in total.
    """
    timeout = self.timeout if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while True:
      left = deadline - time.monotonic()
      if left <= 0:
        raise TimeoutError(f"no {' / '.join(types)} event within {timeout:g} s")
      ev = self.recv(timeout=left)
      if ev.type in types:
        return ev
      if ev.type == "error":
        raise ServerError(ev)

  def events(self, timeout: float | None = None) -> Iterator[Event]:
    """Yields events until the stream's ``done`` (yielded too). A fatal ``error`` raises :class:`ServerError`;
    other errors (e.g. a refused prompt change) are yielded. ``timeout``: the longest wait for one event."""
    while True:
      ev = self.recv(timeout)
      if ev.type == "error" and ev.data.get("fatal"):
        raise ServerError(ev)
      yield ev
      if ev.type == "done":
        return

  def generate(self, prompt: str, **start: Any) -> tuple[np.ndarray, Event]:
    """Starts a stream, collects it to the end: (uint8 (F, H, W, 3) frames, the ``done`` event)."""
    self.start(prompt, **start)
    chunks = []
    for ev in self.events():
      if ev.type == "chunk":
        chunks.append(ev.images())
      done = ev
    return (np.concatenate(chunks) if chunks else np.zeros((0, 0, 0, 3), np.uint8)), done

  def download(self, done: Event, path: str | os.PathLike) -> str:
    """Saves the mp4 of a ``done`` event to ``path``; returns the path."""
    if not done.get("video_url"):
      raise ValueError("this stream has no video (no frames were generated, or writing it failed)")
    base = "http" + self.url[len("ws"):].rsplit("/", 1)[0]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to the server, no proxy
    with opener.open(base + done["video_url"], timeout=self.timeout) as r, open(path, "wb") as f:
      f.write(r.read())
    return os.fspath(path)

  def close(self) -> None:
    self._ws.close()

  def __enter__(self) -> "StreamClient":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


__all__ = ["StreamClient", "Event", "ServerError"]
