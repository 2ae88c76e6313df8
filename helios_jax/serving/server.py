"""Running the app under uvicorn: on a pre-bound socket, in the foreground (``serve.py``) or in a background thread
(tests, notebooks, other programs).

The socket is bound here, before uvicorn starts, so a taken port is one clear error and port 0 (a free port
chosen by the OS) works without a race.
"""

from __future__ import annotations

import errno
import socket
import threading
import time

import uvicorn

from helios_jax.errors import InputError
from helios_jax.serving.settings import ServerSettings


def bind(host: str, port: int) -> socket.socket:
  """A listening TCP socket on ``host:port`` (port 0: any free port).

  Raises:
    InputError: the port is taken or the address cannot be used.
  """
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    if e.errno == errno.EADDRINUSE:
      raise InputError(f"port {port} on {host} is already in use; pass another --port") from None
    raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
  sock.listen(128)
  sock.setblocking(False)
  return sock


def uvicorn_server(app, settings: ServerSettings, log_level: str = "info") -> uvicorn.Server:
  """A uvicorn server for ``app``: WebSocket messages up to ``settings.ws_max_message_bytes``, no per-message
  compression (JPEG frames do not compress), a 5 s graceful shutdown."""
  config = uvicorn.Config(app, ws_max_size=settings.ws_max_message_bytes, ws_per_message_deflate=False,
                          log_level=log_level, timeout_graceful_shutdown=5, lifespan="on")
  return uvicorn.Server(config)


def url_of(sock: socket.socket) -> str:
  """``http://host:port`` of a bound socket."""
  host, port = sock.getsockname()[:2]
  return f"http://{f'[{host}]' if ':' in host else host}:{port}"


class BackgroundServer:
  """Serves ``app`` from a daemon thread on ``host:port`` (port 0: a free port); ``url`` once started.

      with BackgroundServer(create_app(engine), settings) as server:
          client = StreamClient(server.ws_url)
  """

  def __init__(self, app, settings: ServerSettings, host: str = "127.0.0.1", port: int = 0,
               log_level: str = "warning"):
    self._sock = bind(host, port)
    self.url = url_of(self._sock)
    self.ws_url = "ws" + self.url[len("http"):] + "/ws"
    self._server = uvicorn_server(app, settings, log_level)
    self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                    name="helios-uvicorn", daemon=True)

  def start(self, timeout: float = 30.0) -> "BackgroundServer":
    self._thread.start()
    deadline = time.monotonic() + timeout
    while not self._server.started:
      if not self._thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError("the server did not start")
      time.sleep(0.02)
    return self

  def stop(self, timeout: float = 10.0) -> None:
    self._server.should_exit = True
    self._thread.join(timeout)
    self._sock.close()

  def __enter__(self) -> "BackgroundServer":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


__all__ = ["bind", "uvicorn_server", "url_of", "BackgroundServer"]
