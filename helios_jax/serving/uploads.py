"""Uploaded start images (I2V) and start videos (V2V): base64 payload -> bytes -> validated pixels.

The decoded files go through :mod:`helios_jax.io.media` (the same readers ``sample.py`` uses, so the pipeline
sees exactly what it would see from a file on disk). Every failure is a :class:`ProtocolError` with the code the
client can act on: ``upload_too_large``, ``bad_image`` or ``bad_video``. These functions block (decoding a video
takes a while): the server runs them in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile

import numpy as np

from helios_jax.errors import HeliosError
from helios_jax.serving.protocol import Code, ProtocolError


def payload_bytes(text: str, what: str, max_bytes: int) -> bytes:
  """Base64 text (optionally a ``data:<mime>;base64,`` URL) -> the file's bytes.

  Args:
    text: the payload of the ``image`` / ``video`` field.
    what: "image" or "video" (selects the error code and names the upload in messages).
    max_bytes: the server's upload limit (decoded size).

  Raises:
    ProtocolError: ``upload_too_large`` over ``max_bytes``; ``bad_image`` / ``bad_video`` for empty or non-base64
      text.
  """
  code = Code.BAD_IMAGE if what == "image" else Code.BAD_VIDEO
  if text.startswith("data:"):
    head, sep, text = text.partition(",")
    if not sep or not head.endswith(";base64"):
      raise ProtocolError(code, f"the {what} data URL must be base64-encoded (data:<type>;base64,...)")
  if any(c in text for c in "\r\n\t "):  # line-wrapped (MIME-style) base64
    text = "".join(text.split())
  approx = len(text) * 3 // 4
  if approx > max_bytes + 2:
    raise ProtocolError(Code.UPLOAD_TOO_LARGE, f"the {what} is {_mb(approx)}; this server takes uploads up to "
                                               f"{_mb(max_bytes)}")
  try:
    data = base64.b64decode(text, validate=True)
  except (binascii.Error, ValueError):
    raise ProtocolError(code, f"the {what} field is not valid base64") from None
  if not data:
    raise ProtocolError(code, f"the {what} upload is empty")
  if len(data) > max_bytes:
    raise ProtocolError(Code.UPLOAD_TOO_LARGE, f"the {what} is {_mb(len(data))}; this server takes uploads up to "
                                               f"{_mb(max_bytes)}")
  return data


def _mb(n: int) -> str:
  return f"{n / 2 ** 20:.1f} MiB"


def _as_file(data: bytes, suffix: str) -> str:
  fd, path = tempfile.mkstemp(prefix="helios-upload-", suffix=suffix)
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  return path


def read_image(data: bytes):
  """An uploaded image file (any format Pillow reads) -> RGB ``PIL.Image`` (EXIF orientation applied).

  Raises:
    ProtocolError: ``bad_image`` when the bytes are not a readable image.
  """
  from helios_jax.io import media
  path = _as_file(data, ".img")
  try:
    return media.load_image(path)
  except HeliosError:
    raise ProtocolError(Code.BAD_IMAGE, "the uploaded file is not an image this server can read (PNG, JPEG, WebP, "
                                        "... are fine)") from None
  finally:
    os.remove(path)


def read_video(data: bytes, width: int, height: int, min_frames: int) -> np.ndarray:
  """An uploaded video file (anything FFmpeg reads) -> uint8 (F, height, width, 3) frames, resized as decoded.

  Raises:
    ProtocolError: ``bad_video`` when the bytes are not a readable video or it has fewer than ``min_frames``
      frames (V2V continues the video from its last chunk, so it needs at least one).
  """
  from helios_jax.io import media
  path = _as_file(data, ".video")
  try:
    frames = media.read_video(path, size=(width, height))
  except HeliosError:
    raise ProtocolError(Code.BAD_VIDEO, "the uploaded file is not a video this server can read (mp4, webm, mkv, "
                                        "gif, ... are fine)") from None
  finally:
    os.remove(path)
  if frames.shape[0] < min_frames:
    raise ProtocolError(Code.BAD_VIDEO, f"the uploaded video has {frames.shape[0]} frames; v2v needs at least "
                                        f"{min_frames} (one chunk)")
  return frames


__all__ = ["payload_bytes", "read_image", "read_video"]
