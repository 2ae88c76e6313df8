"""The WebSocket wire format of the streaming server: client messages, server events, error codes, JPEG frames.

Control messages and events are JSON objects (text messages) with a ``"type"`` field; video frames travel as binary
messages, one JPEG per frame, right after the ``chunk`` event they belong to. Every field is documented in
``docs/streaming.md``; this module is the one place that parses client messages and builds server events, so the
server, the Python client and the page agree on it.

Parsing never raises anything but :class:`ProtocolError` (a stable ``code`` and one sentence), which the server
sends back as an ``error`` event and then keeps serving.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from typing import Any, Mapping

import numpy as np

MODES = ("t2v", "i2v", "v2v")
FRAME_FORMAT = "jpeg"
MAX_PROMPT_CHARS = 4000   # longer prompts are refused (the tokenizer would truncate them at 512 tokens anyway)
MAX_BLEND_CHUNKS = 64
MAX_SEED = 2 ** 32 - 1


class Code:
  """Stable error codes of ``error`` events (``docs/streaming.md`` lists when each is sent)."""

  BAD_JSON = "bad_json"                    # a text message that is not a JSON object
  BAD_MESSAGE = "bad_message"              # a field is missing, of the wrong type or out of range
  UNKNOWN_TYPE = "unknown_type"            # "type" is not start / prompt / stop
  UNKNOWN_MODE = "unknown_mode"            # "mode" is not t2v / i2v / v2v
  BINARY_NOT_EXPECTED = "binary_not_expected"  # the client sent a binary message
  UPLOAD_TOO_LARGE = "upload_too_large"    # the decoded image / video is larger than the server's limit
  BAD_IMAGE = "bad_image"                  # the image payload is not base64 or not an image
  BAD_VIDEO = "bad_video"                  # the video payload is not base64, not a video, or too short
  MISSING_UPLOAD = "missing_upload"        # i2v without an image / v2v without a video (and no bundled one)
  TOO_MANY_FRAMES = "too_many_frames"      # num_frames above the server's frames-per-stream limit
  BUSY = "busy"                            # another client's stream is using the device
  ALREADY_RUNNING = "already_running"      # this connection already has a stream
  NOT_RUNNING = "not_running"              # prompt / stop with no stream on this connection
  NOT_STARTED = "not_started"              # prompt before the "started" event
  STREAM_ENDED = "stream_ended"            # prompt after the stream was stopped (or reached its end)
  BAD_INPUT = "bad_input"                  # the pipeline refused the request (helios_jax InputError / HeliosError)
  VIDEO_WRITE = "video_write"              # the mp4 of the stream could not be written
  INTERNAL = "internal"                    # a server bug; the details are in the server's log


class ProtocolError(Exception):
  """A client mistake: ``code`` (one of :class:`Code`) and a one-sentence ``message``."""

  def __init__(self, code: str, message: str, id: Any = None):
    super().__init__(message)
    self.code = code
    self.message = message
    self.id = id  # the client's correlation id of the message that caused it, when it could be read


# ------------------------------------------------------------------------------------------------------------------
# Client -> server


@dataclasses.dataclass(frozen=True)
class StartMessage:
  """``{"type": "start", ...}``: begin a stream.

  Attributes:
    mode: "t2v", "i2v" or "v2v".
    prompt: the text prompt.
    negative_prompt: used when guidance > 1 (None: empty).
    num_frames: frames to generate (rounded up to whole chunks and trimmed to 4k+1 by the pipeline); None with
      ``endless`` (until "stop", or the server's frame limit) or for the server's default.
    endless: generate until stopped.
    seed: noise seed (None: the server's default).
    blend_chunks: default blend length (chunks) of later prompt changes (None: the server's default).
    image, video: base64 text of the uploaded file (I2V / V2V), or None for the server's bundled input.
    id: the client's correlation id, echoed in the replies (any JSON value).
  """

  mode: str
  prompt: str
  negative_prompt: str | None = None
  num_frames: int | None = None
  endless: bool = False
  seed: int | None = None
  blend_chunks: int | None = None
  image: str | None = None
  video: str | None = None
  id: Any = None


@dataclasses.dataclass(frozen=True)
class PromptMessage:
  """``{"type": "prompt", "prompt": ..., "blend_chunks": ...}``: change the prompt of the running stream."""

  prompt: str
  blend_chunks: int | None = None
  id: Any = None


@dataclasses.dataclass(frozen=True)
class StopMessage:
  """``{"type": "stop"}``: start no new chunk; chunks already in flight are still sent, then ``done``."""

  id: Any = None


Message = StartMessage | PromptMessage | StopMessage


def _int_field(obj: Mapping, name: str, lo: int, hi: int | None) -> int | None:
  value = obj.get(name)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
    raise ProtocolError(Code.BAD_MESSAGE, f"{name} must be an integer, got {json.dumps(value)[:40]}")
  value = int(value)
  if value < lo or (hi is not None and value > hi):
    bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
    raise ProtocolError(Code.BAD_MESSAGE, f"{name} must be {bound}, got {value}")
  return value


def _text_field(obj: Mapping, name: str, required: bool) -> str | None:
  value = obj.get(name)
  if value is None:
    if required:
      raise ProtocolError(Code.BAD_MESSAGE, f"the message needs a \"{name}\" string")
    return None
  if not isinstance(value, str):
    raise ProtocolError(Code.BAD_MESSAGE, f"{name} must be a string, got {type(value).__name__}")
  if required and not value.strip():
    raise ProtocolError(Code.BAD_MESSAGE, f"{name} is empty")
  if len(value) > MAX_PROMPT_CHARS:
    raise ProtocolError(Code.BAD_MESSAGE, f"{name} has {len(value)} characters; the limit is {MAX_PROMPT_CHARS}")
  return value


def _payload_field(obj: Mapping, name: str) -> str | None:
  value = obj.get(name)
  if value is None:
    return None
  if not isinstance(value, str):
    raise ProtocolError(Code.BAD_IMAGE if name == "image" else Code.BAD_VIDEO,
                        f"{name} must be a base64 string (optionally a data: URL), got {type(value).__name__}")
  return value


def parse_message(text: str) -> Message:
  """One client text message -> a :class:`StartMessage`, :class:`PromptMessage` or :class:`StopMessage`.

  Unknown fields are ignored (forward compatibility). Limits that depend on the server (frame count, upload size,
  the device) are checked later by the server.

  Raises:
    ProtocolError: not a JSON object (``bad_json``), an unknown ``type`` or ``mode``, or a bad field.
  """
  try:
    obj = json.loads(text)
  except (ValueError, RecursionError):
    raise ProtocolError(Code.BAD_JSON, "the message is not valid JSON") from None
  if not isinstance(obj, dict):
    raise ProtocolError(Code.BAD_JSON, f"the message must be a JSON object, got a JSON {_json_kind(obj)}")
  try:
    return _parse_object(obj)
  except ProtocolError as e:
    e.id = obj.get("id")
    raise


def _json_kind(value: Any) -> str:
  return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _parse_object(obj: Mapping) -> Message:
  kind = obj.get("type")
  cid = obj.get("id")
  if kind == "start":
    mode = obj.get("mode", "t2v")
    if mode not in MODES:
      raise ProtocolError(Code.UNKNOWN_MODE, f"mode must be one of {', '.join(MODES)}, got {json.dumps(mode)[:40]}")
    endless = obj.get("endless", False)
    if not isinstance(endless, bool):
      raise ProtocolError(Code.BAD_MESSAGE, f"endless must be true or false, got {json.dumps(endless)[:40]}")
    num_frames = _int_field(obj, "num_frames", 1, None)
    if endless and num_frames is not None:
      raise ProtocolError(Code.BAD_MESSAGE, "pass num_frames or endless, not both")
    image, video = _payload_field(obj, "image"), _payload_field(obj, "video")
    if mode == "t2v" and (image is not None or video is not None):
      raise ProtocolError(Code.BAD_MESSAGE, f"mode t2v takes no {'image' if image is not None else 'video'}; use "
                                            f"mode {'i2v' if image is not None else 'v2v'}")
    if mode == "i2v" and video is not None:
      raise ProtocolError(Code.BAD_MESSAGE, "mode i2v takes an image, not a video (use mode v2v)")
    if mode == "v2v" and image is not None:
      raise ProtocolError(Code.BAD_MESSAGE, "mode v2v takes a video, not an image (use mode i2v)")
    return StartMessage(mode=mode, prompt=_text_field(obj, "prompt", True),
                        negative_prompt=_text_field(obj, "negative_prompt", False), num_frames=num_frames,
                        endless=endless, seed=_int_field(obj, "seed", 0, MAX_SEED),
                        blend_chunks=_int_field(obj, "blend_chunks", 0, MAX_BLEND_CHUNKS), image=image, video=video,
                        id=cid)
  if kind == "prompt":
    return PromptMessage(prompt=_text_field(obj, "prompt", True),
                         blend_chunks=_int_field(obj, "blend_chunks", 0, MAX_BLEND_CHUNKS), id=cid)
  if kind == "stop":
    return StopMessage(id=cid)
  if kind is None:
    raise ProtocolError(Code.UNKNOWN_TYPE, "the message has no \"type\" (start, prompt or stop)")
  raise ProtocolError(Code.UNKNOWN_TYPE,
                      f"unknown message type {json.dumps(kind)[:40]}; the server takes start, prompt and stop")


# ------------------------------------------------------------------------------------------------------------------
# Server -> client


def _clean(value: Any) -> Any:
  """JSON-safe copy: numpy scalars -> Python, non-finite floats -> None, floats rounded to microseconds."""
  if isinstance(value, dict):
    return {str(k): _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float):
    return round(value, 6) if math.isfinite(value) else None
  return value


def event(event_type: str, /, **fields: Any) -> str:
  """A server event as JSON text: ``{"type": event_type, **fields}`` (None-valued ``id`` left out)."""
  if fields.get("id", 0) is None:
    del fields["id"]
  return json.dumps({"type": event_type, **_clean(fields)}, allow_nan=False, separators=(",", ":"))


def error_event(code: str, message: str, *, id: Any = None, fatal: bool = False) -> str:
  """An ``error`` event; ``fatal``: the stream of this connection has ended because of it."""
  return event("error", code=code, message=message, fatal=fatal, id=id)


# ------------------------------------------------------------------------------------------------------------------
# Frames


def encode_jpeg(frames: np.ndarray, quality: int = 90) -> list[bytes]:
  """uint8 (T, H, W, 3) frames -> T JPEG files (Pillow; 4:2:0 chroma, ``quality`` 1..95)."""
  import PIL.Image
  out = []
  for frame in frames:
    buf = io.BytesIO()
    PIL.Image.fromarray(np.ascontiguousarray(frame), "RGB").save(buf, format="JPEG", quality=int(quality))
    out.append(buf.getvalue())
  return out


def decode_jpeg(data: bytes) -> np.ndarray:
  """One JPEG frame -> uint8 (H, W, 3)."""
  import PIL.Image
  with PIL.Image.open(io.BytesIO(data)) as img:
    return np.asarray(img.convert("RGB"))


__all__ = ["MODES", "FRAME_FORMAT", "Code", "ProtocolError", "StartMessage", "PromptMessage", "StopMessage",
           "Message", "parse_message", "event", "error_event", "encode_jpeg", "decode_jpeg"]
