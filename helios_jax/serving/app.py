"""The streaming server's FastAPI app: the page, its static files, the finished mp4s and the WebSocket API.

Routes:

* ``GET /`` the page (``static/index.html``), ``GET /static/...`` its script and style sheet;
* ``GET /api/info`` the server description (the ``ready`` event's fields);
* ``GET /videos/<stream id>.mp4`` a finished stream's video;
* ``GET /inputs/start.png`` / ``start.mp4`` the bundled demo's start image / video (demo model only);
* ``WS /ws`` the streaming API (``docs/streaming.md``).

Each WebSocket is one :class:`Connection`: it reads client messages in order, runs at most one
:class:`~helios_jax.serving.session.StreamSession` at a time, and sends everything through one queue drained by
one task, so the messages of one event (a chunk and its frames) are never interleaved with others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Sequence

from fastapi import FastAPI, HTTPException, WebSocket
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.websockets import WebSocketDisconnect

from helios_jax.errors import HeliosError
from helios_jax.serving.engine import Engine
from helios_jax.serving.protocol import (Code, PromptMessage, ProtocolError, StartMessage, StopMessage, error_event,
                                         event, parse_message)
from helios_jax.serving.recorder import VideoStore
from helios_jax.serving.session import StreamSession

logger = logging.getLogger("helios_jax.serving")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


class Connection:
  """One WebSocket client (see the module docstring)."""

  def __init__(self, ws: WebSocket, engine: Engine, store: VideoStore):
    self.ws = ws
    self.engine = engine
    self.store = store
    self.session: StreamSession | None = None
    self.closed = False
    self._loop: asyncio.AbstractEventLoop | None = None
    self._outbox: asyncio.Queue = asyncio.Queue()

  # ------------------------------------------------------------------------------------------------------------------
  # Sending

  def post(self, messages: Sequence[str | bytes]) -> None:
    """Queues messages to be sent back to back; callable from any thread."""
    if self.closed or self._loop is None:
      return
    try:
      self._loop.call_soon_threadsafe(self._outbox.put_nowait, list(messages))
    except RuntimeError:  # the event loop has shut down
      pass

  def _put(self, *messages: str | bytes) -> None:
    """:meth:`post` from the event loop itself."""
    if not self.closed:
      self._outbox.put_nowait(list(messages))

  async def _send_loop(self) -> None:
    try:
      while True:
        for message in await self._outbox.get():
          if isinstance(message, bytes):
            await self.ws.send_bytes(message)
          else:
            await self.ws.send_text(message)
    except (WebSocketDisconnect, RuntimeError, OSError):  # the client went away mid-send
      self.closed = True

  # ------------------------------------------------------------------------------------------------------------------
  # Receiving

  async def run(self) -> None:
    """Serves the socket until the client disconnects; then stops its stream, which frees the device."""
    await self.ws.accept()
    self._loop = asyncio.get_running_loop()
    sender = asyncio.create_task(self._send_loop())
    self._put(event("ready", **self.engine.info()))
    try:
      while True:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
          break
        if message.get("text") is not None:
          await self._handle(message["text"])
        elif message.get("bytes") is not None:
          self._put(error_event(Code.BINARY_NOT_EXPECTED, "this server takes JSON text messages only; send "
                                                          "uploads as base64 in the start message"))
    except WebSocketDisconnect:
      pass
    finally:
      self.closed = True
      if self.session is not None and not self.session.ended:
        logger.info("client left: stopping stream %s", self.session.id)
        self.session.cancel()
      sender.cancel()

  async def _handle(self, text: str) -> None:
    t_request = time.perf_counter()
    cid = None
    try:
      msg = parse_message(text)
      cid = msg.id
      if isinstance(msg, StartMessage):
        await self._start(msg, t_request)
      elif isinstance(msg, PromptMessage):
        self._put(self._running(msg.id, "change the prompt").set_prompt(msg))
      elif isinstance(msg, StopMessage):
        self._running(msg.id, "stop").stop()
        self._put(event("stopping", stream_id=self.session.id, id=msg.id))
    except ProtocolError as e:
      self._put(error_event(e.code, e.message, id=e.id if e.id is not None else cid))
    except HeliosError as e:
      self._put(error_event(Code.BAD_INPUT, " ".join(str(e).split()), id=cid))
    except Exception:
      logger.exception("failed to handle a client message")
      self._put(error_event(Code.INTERNAL, "the server failed to handle this message; the details are in its log",
                            id=cid))

  def _running(self, cid, action: str) -> StreamSession:
    if self.session is None or self.session.ended:
      ended = " (the last one has ended)" if self.session is not None else ""
      raise ProtocolError(Code.NOT_RUNNING, f"no stream is running on this connection{ended}; start one to "
                                            f"{action}", cid)
    return self.session

  async def _start(self, msg: StartMessage, t_request: float) -> None:
    if self.session is not None and not self.session.ended:
      raise ProtocolError(Code.ALREADY_RUNNING, "this connection already has a stream; stop it (or wait for "
                                                "\"done\") before starting another", msg.id)
    busy = ProtocolError(Code.BUSY, "another client's stream is using the device; try again when it ends (a "
                                    "\"device\" event with busy false says when)", msg.id)
    if self.engine.busy:
      raise busy
    request = await asyncio.get_running_loop().run_in_executor(None, self.engine.prepare, msg)
    if self.closed:  # the client left while its upload was decoded
      return
    session = StreamSession(self.engine, request, self.store, self.post, t_request)
    if not self.engine.claim(session):
      raise busy
    self.session = session
    session.start()


def create_app(engine: Engine, store: VideoStore | None = None) -> FastAPI:
  """The server's ASGI app over a loaded ``engine``; mp4s go to ``store`` (default: one from the settings)."""
  store = store or VideoStore(engine.settings.video_dir, engine.settings.keep_videos)
  connections: set[Connection] = set()

  @contextlib.asynccontextmanager
  async def lifespan(_app: FastAPI):
    yield
    # shutting down: end the running stream (its thread holds the device) before the interpreter exits
    sessions = [c.session for c in list(connections) if c.session is not None and not c.session.ended]
    for session in sessions:
      session.cancel()
    for session in sessions:
      await asyncio.get_running_loop().run_in_executor(None, session.join, 60.0)

  app = FastAPI(title="helios-jax live streaming", docs_url=None, redoc_url=None, openapi_url=None,
                lifespan=lifespan)
  app.state.engine, app.state.store = engine, store

  def broadcast(busy: bool) -> None:  # from whichever thread claimed / released the device
    for conn in list(connections):
      conn.post([event("device", busy=busy)])

  engine.add_listener(broadcast)
  app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

  @app.get("/", include_in_schema=False)
  async def index() -> FileResponse:
    return FileResponse(os.path.join(STATIC_DIR, "index.html"), media_type="text/html")

  @app.get("/api/info")
  async def info() -> JSONResponse:
    return JSONResponse(engine.info())

  @app.get("/videos/{name}")
  async def video(name: str) -> FileResponse:
    path = store.find(name)
    if path is None:
      raise HTTPException(404, f"no finished video {name} on this server")
    return FileResponse(path, media_type="video/mp4", filename=f"helios-{name}")

  @app.get("/inputs/{name}")
  async def bundled_input(name: str) -> FileResponse:
    demo = engine.demo
    paths = {"start.png": demo.image, "start.mp4": demo.video} if demo else {}
    if name not in paths or not os.path.isfile(paths[name]):
      raise HTTPException(404, f"this server has no bundled input {name}")
    return FileResponse(paths[name])

  @app.websocket("/ws")
  async def websocket(ws: WebSocket) -> None:
    conn = Connection(ws, engine, store)
    connections.add(conn)
    try:
      await conn.run()
    finally:
      connections.discard(conn)

  return app


__all__ = ["create_app", "Connection", "STATIC_DIR"]
