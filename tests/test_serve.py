"""The live-streaming server (helios_jax.serving, serve.py) over real WebSockets.

One uvicorn server per module (a background thread on 127.0.0.1, a free port) serves the bundled demo model at
64x64 with 2 steps and no guidance (a chunk in ~2 s on a 2-core CPU after ~10 s of compilation), driven by the
package's own client (``helios_jax.serving.client.StreamClient``). Covered: a t2v stream with decoded frames, a
live prompt change accepted and applied (with its blend weight), stop, the mp4 by URL, a second client getting
``busy``, a disconnect freeing the device, every malformed or refused message getting its error code on a socket
that stays open, library errors becoming ``bad_input`` / ``internal`` events, and serve.py's start-up and
mistakes.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import PIL.Image
import pytest

from helios_jax.errors import InputError
from helios_jax.io import media
from helios_jax.serving.app import create_app
from helios_jax.serving.client import ServerError, StreamClient
from helios_jax.serving.engine import load_engine
from helios_jax.serving.protocol import ProtocolError, event
from helios_jax.serving.uploads import payload_bytes, read_image
from helios_jax.serving.server import BackgroundServer
from helios_jax.serving.settings import ServerSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT, NEW_PROMPT = "a purple circle moves down on a grey striped background", "a white circle moves up"
MAX_UPLOAD_MB = 0.25
TIMEOUT = 120.0  # seconds for any one event (the first chunk includes compilation)


def serve_settings(video_dir: str) -> ServerSettings:
  """Fast settings of the bundled demo model, shared with tests/test_browser.py."""
  return ServerSettings(steps=(2,), guidance=1.0, height=64, width=64, max_upload_mb=MAX_UPLOAD_MB,
                        max_frames=330, video_dir=video_dir, seed=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  settings = serve_settings(str(tmp_path_factory.mktemp("videos")))
  engine = load_engine(settings)
  app = create_app(engine)
  with BackgroundServer(app, settings) as srv:
    srv.engine, srv.store = engine, app.state.store
    yield srv


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only: no proxy from the environment


def get(url: str) -> tuple[int, bytes, str]:
  """(status, body, content type) of a GET."""
  try:
    with _OPENER.open(url, timeout=30) as r:
      return r.status, r.read(), r.headers.get("content-type", "")
  except urllib.error.HTTPError as e:
    return e.code, e.read(), e.headers.get("content-type", "")


def connect(server) -> StreamClient:
  return StreamClient(server.ws_url, timeout=TIMEOUT)


def wait_until_free(client: StreamClient, timeout: float = TIMEOUT) -> None:
  """Returns once the device is free: the last device state the client heard (``ready``, then ``device``
  events, in order) is free, or a ``device`` event with busy false arrives."""
  busy = [e["busy"] for e in client.history if e.type in ("ready", "device")][-1]
  deadline = time.monotonic() + timeout
  while busy:
    busy = client.wait_for("device", timeout=deadline - time.monotonic())["busy"]


def expect_error(client: StreamClient, code: str, timeout: float = 30.0):
  ev = client.wait_for("error", timeout=timeout)
  assert ev["code"] == code, ev.data
  assert ev["message"] and "\n" not in ev["message"]
  return ev


# ------------------------------------------------------------------------------------------------------------------
# HTTP


def test_page_info_and_files(server):
  status, body, kind = get(server.url + "/")
  page = body.decode()
  assert status == 200 and kind.startswith("text/html") and "<canvas" in page and "/static/app.js" in page
  for name in ("app.js", "style.css"):
    status, body, _ = get(f"{server.url}/static/{name}")
    assert status == 200 and b"http://" not in body and b"https://" not in body  # nothing loaded from elsewhere
  assert "http://" not in page and "https://" not in page
  status, body, kind = get(server.url + "/api/info")
  info = json.loads(body)
  assert info["demo"] and info["fps"] == 24 and (info["width"], info["height"]) == (64, 64)
  assert info["frames_per_chunk"] == 33 and info["modes"] == ["t2v", "i2v", "v2v"]
  assert info["defaults"]["steps"] == [2] and info["defaults"]["prompts"]["t2v"] == PROMPT
  assert info["limits"]["max_upload_bytes"] == int(MAX_UPLOAD_MB * 2 ** 20) and info["limits"]["max_frames"] == 330
  status, body, _ = get(server.url + info["defaults"]["start_image_url"])
  assert status == 200 and PIL.Image.open(io.BytesIO(body)).size == (128, 128)
  assert get(server.url + "/videos/0123456789ab.mp4")[0] == 404
  assert get(server.url + "/videos/..%2F..%2Fetc%2Fpasswd")[0] == 404
  assert get(server.url + "/inputs/README.md")[0] == 404


# ------------------------------------------------------------------------------------------------------------------
# A stream


def test_stream_live_prompt_busy_and_stop(server):
  with connect(server) as a, connect(server) as b:
    assert a.info["busy"] is False
    a.start(PROMPT, endless=True, id="s1")
    started = a.wait_for("started")
    assert started["id"] == "s1" and started["endless"] and started["num_chunks"] == 10  # 330 frames / 33
    assert (started["width"], started["height"], started["fps"]) == (64, 64, 24)

    b.start(PROMPT, id="b1")  # the device is taken: a clear error, and b's socket stays open
    assert expect_error(b, "busy")["id"] == "b1"
    a.start(PROMPT)
    expect_error(a, "already_running")

    chunk0 = next((e for e in a.history if e.type == "chunk"), None) or a.wait_for("chunk")
    frames = chunk0.images()
    assert chunk0["index"] == 0 and chunk0["first_frame"] == 0 and frames.shape == (33, 64, 64, 3)
    assert frames.std() > 1 and chunk0["prompt"]["text"] == PROMPT and chunk0["elapsed_s"] > 0
    a.set_prompt(NEW_PROMPT, blend_chunks=2, id="p1")
    accepted = a.wait_for("prompt_accepted")
    assert accepted["id"] == "p1" and accepted["blend_chunks"] == 2 and accepted["expected_chunk"] >= 1
    rid = accepted["request_id"]
    chunks = [chunk0]
    while True:
      ev = a.wait_for("chunk", "prompt_applied")
      if ev.type == "chunk":
        chunks.append(ev)
        assert ev["first_frame"] == 33 * ev["index"] and len(ev.frames) == ev["num_frames"] == 33
        continue
      assert ev["request_id"] == rid
      break
    applied = chunks[-1]
    assert ev["chunk"] == applied["index"] >= accepted["expected_chunk"]
    assert applied["prompt"] == {"text": NEW_PROMPT, "weight": 0.5, "request_ids": [rid]}  # blend over 2 chunks
    assert [c["index"] for c in chunks] == list(range(len(chunks))) and len(chunks) >= 2
    a.stop(id="x")
    assert a.wait_for("stopping")["id"] == "x"
    done = a.wait_for("done")
    n = sum(c["num_frames"] for c in a.history if c.type == "chunk")
    assert done["reason"] == "stopped" and done["frames"] == n >= 66 and done["chunks"] >= 2
    assert done["time_to_first_frame_s"] > 0 and done["generation_fps"] > 0 and done["unapplied_request_ids"] == []
    assert re.fullmatch(r"/videos/[0-9a-f]{12}\.mp4", done["video_url"])
    mp4 = a.download(done, os.path.join(server.store.folder, "..", "copy.mp4"))
    info = media.video_info(mp4)
    assert info["frames"] == n and (info["width"], info["height"], info["fps"]) == (64, 64, 24.0)

    # after the end: a prompt change or stop is refused, the socket stays open
    a.set_prompt("too late", id="late")
    assert "ended" in expect_error(a, "not_running")["message"]
    a.stop()
    expect_error(a, "not_running")
    wait_until_free(b)
    assert not server.engine.busy


def test_disconnect_frees_the_device(server):
  a = connect(server)
  a.start(PROMPT, endless=True)
  sid = a.wait_for("started")["stream_id"]
  a.close()  # gone without "stop": its generation must end and free the device
  with connect(server) as b:
    wait_until_free(b)
    b.start(PROMPT, num_frames=33)
    assert b.wait_for("started")["num_chunks"] == 1
    done = b.wait_for("done")
    assert done["reason"] == "finished" and done["frames"] == 33 and done["chunks"] == 1
  assert not os.path.exists(os.path.join(server.store.folder, f"{sid}.mp4"))  # the cancelled stream left no mp4
  assert not [n for n in os.listdir(server.store.folder) if n.startswith(f".{sid}")]


def _png(size=(16, 16)) -> bytes:
  buf = io.BytesIO()
  PIL.Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
  return buf.getvalue()


def _short_video(tmp_path) -> bytes:
  path = media.write_video(str(tmp_path / "short.mp4"), np.zeros((5, 64, 64, 3), np.uint8))
  with open(path, "rb") as f:
    return f.read()


def b64(data: bytes) -> str:
  return base64.b64encode(data).decode()


BAD_MESSAGES = [
    ("not json", "bad_json"),
    ("[1, 2]", "bad_json"),
    ('{"prompt": "no type"}', "unknown_type"),
    ('{"type": "dance", "id": 7}', "unknown_type"),
    ('{"type": "start", "mode": "x2v", "prompt": "a"}', "unknown_mode"),
    ('{"type": "start", "prompt": ""}', "bad_message"),
    ('{"type": "start", "prompt": 5}', "bad_message"),
    ('{"type": "start", "prompt": "a", "num_frames": "many"}', "bad_message"),
    ('{"type": "start", "prompt": "a", "num_frames": 0}', "bad_message"),
    ('{"type": "start", "prompt": "a", "num_frames": 40, "endless": true}', "bad_message"),
    ('{"type": "start", "prompt": "a", "seed": -1}', "bad_message"),
    ('{"type": "start", "prompt": "a", "num_frames": 10000}', "too_many_frames"),
    ('{"type": "start", "mode": "t2v", "prompt": "a", "image": "AAAA"}', "bad_message"),
    ('{"type": "start", "mode": "i2v", "prompt": "a", "image": "@@ not base64 @@"}', "bad_image"),
    ('{"type": "start", "mode": "i2v", "prompt": "a", "image": "%s"}' % b64(b"plain text, not an image"), "bad_image"),
    ('{"type": "start", "mode": "i2v", "prompt": "a", "image": "data:image/png;base64,%s"}'
     % b64(os.urandom(int(MAX_UPLOAD_MB * 2 ** 20) + 1000)), "upload_too_large"),
    ('{"type": "start", "mode": "v2v", "prompt": "a", "video": "%s"}' % b64(_png()), "bad_video"),
    ('{"type": "prompt", "prompt": "x"}', "not_running"),
    ('{"type": "prompt", "prompt": "x", "blend_chunks": -2}', "bad_message"),
    ('{"type": "stop"}', "not_running"),
    (b"\x00\x01binary", "binary_not_expected"),
]


@pytest.fixture(scope="module")
def idle_client(server):
  with connect(server) as client:
    yield client


@pytest.mark.parametrize("raw,code", BAD_MESSAGES, ids=[c + str(i) for i, (_, c) in enumerate(BAD_MESSAGES)])
def test_bad_message_gets_its_error(server, idle_client, raw, code):
  idle_client.send_raw(raw)
  ev = expect_error(idle_client, code)
  assert ev["fatal"] is False
  if '"id": 7' in str(raw):
    assert ev["id"] == 7


def test_too_short_video_and_socket_still_serving(server, idle_client, tmp_path):
  idle_client.start("a", mode="v2v", video=_short_video(tmp_path), id="v")
  ev = expect_error(idle_client, "bad_video")
  assert "5 frames" in ev["message"] and ev["id"] == "v"
  # after all the errors above the same socket still answers, and a valid request works
  idle_client.start(PROMPT, mode="i2v", image=_png((40, 30)), num_frames=33)
  assert idle_client.wait_for("started")["mode"] == "i2v"
  done = idle_client.wait_for("done")
  assert done["frames"] == 33 and done["video_url"]


def test_library_errors_become_events(server, monkeypatch, caplog):
  engine = server.engine
  with connect(server) as client:
    def refuse(request):
      time.sleep(0.5)
      raise InputError("the pipeline refuses this request")
    monkeypatch.setattr(engine, "open_stream", refuse)
    client.start(PROMPT, id="r")
    client.set_prompt("while it starts")  # before "started": not_started, not a crash
    expect_error(client, "not_started")
    ev = expect_error(client, "bad_input")
    assert ev["fatal"] and ev["id"] == "r" and ev["message"] == "the pipeline refuses this request"

    def crash(request):
      raise RuntimeError("a bug")
    monkeypatch.setattr(engine, "open_stream", crash)
    wait_until_free(client)
    client.start(PROMPT)
    ev = expect_error(client, "internal")
    assert ev["fatal"] and "a bug" not in ev["message"] and "log" in ev["message"]
    assert any("a bug" in r.getMessage() or (r.exc_info and "a bug" in str(r.exc_info[1])) for r in caplog.records)
    monkeypatch.undo()
    wait_until_free(client)
    assert not engine.busy
    client.start(PROMPT, num_frames=1)  # and the next stream works
    assert client.wait_for("done")["chunks"] == 1


def test_client_raises_server_errors(server):
  with connect(server) as client:
    client.stop()
    with pytest.raises(ServerError) as e:
      client.wait_for("stopping")
    assert e.value.code == "not_running"


def test_upload_payloads():
  png = _png()
  assert payload_bytes("data:image/png;base64," + b64(png), "image", 2 ** 20) == png  # the page sends data URLs
  wrapped = "\n".join(b64(png)[i:i + 76] for i in range(0, len(b64(png)), 76))  # MIME-style line breaks
  assert payload_bytes(wrapped, "image", 2 ** 20) == png
  for text, code in [("", "bad_image"), ("data:image/png,raw", "bad_image"), (b64(png), "upload_too_large")]:
    with pytest.raises(ProtocolError) as e:
      payload_bytes(text, "image", 10)
    assert e.value.code == code
  assert read_image(png).size == (16, 16)


def test_events_are_strict_json():
  text = event("chunk", fps=float("nan"), x=np.float32(0.5), n=np.int64(3), id=None)
  assert json.loads(text) == {"type": "chunk", "fps": None, "x": 0.5, "n": 3}  # no NaN, no numpy, no null id


# ------------------------------------------------------------------------------------------------------------------
# serve.py


def _serve(*args: str, **kw) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), *args], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_serve_py_starts_and_stops():
  proc = _serve("--port", "0", "--steps", "2", "--guidance", "1", "--height", "64", "--width", "64",
                "--log-level", "warning")
  try:
    deadline, url = time.monotonic() + 120, None
    while url is None and time.monotonic() < deadline:
      line = proc.stdout.readline()
      assert line, proc.stderr.read()
      m = re.match(r"open (http://127\.0\.0\.1:\d+) ", line)
      url = m and m.group(1)
    for _ in range(100):
      try:
        info = json.loads(get(url + "/api/info")[1])
        break
      except urllib.error.URLError:
        time.sleep(0.1)
    assert info["demo"] and info["width"] == 64 and info["defaults"]["guidance"] == 1.0
  finally:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err


@pytest.mark.parametrize("args,message", [
    (["--steps", "2", "2"], "--steps needs 1 number for this model"),
    (["--port", "70000"], "--port must be between 0 and 65535"),
    (["--max-frames", "-1"], "--max-frames must be >= 0"),
    (["--height", "60"], "must be multiples of 16"),
    (["--model", "/nonexistent/model"], "model folder not found"),
])
def test_serve_py_mistakes_are_one_line(args, message):
  proc = _serve(*args)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_serve_py_taken_port(server):
  port = server.url.rsplit(":", 1)[1]
  proc = _serve("--port", port)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 2 and f"port {port} on 127.0.0.1 is already in use" in err, err
