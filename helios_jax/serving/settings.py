"""The streaming server's settings: which model, its sampling overrides, and the limits it enforces per client."""

from __future__ import annotations

import dataclasses

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


@dataclasses.dataclass(frozen=True)
class ServerSettings:
  """Everything ``serve.py``'s options set (``python serve.py --help`` describes each).

  Attributes:
    model: a diffusers-format Helios folder, or None for the bundled demo model (with its bundled prompts, start
      image and start video as defaults).
    steps, guidance, height, width, dtype: overrides of the model folder's sampling defaults (None: the folder's).
      Every stream of the server uses them (one compiled program per shape).
    seed: the seed of a start message that gives none.
    blend_chunks: the default blend length (chunks) of live prompt changes.
    max_upload_mb: the largest start image / video a client may upload (decoded size, MiB).
    max_frames: frames per stream; an endless stream stops there. 0: no limit (endless means until "stop").
    jpeg_quality: quality of the JPEG frames sent to clients (1..95).
    video_dir: where the mp4 of each stream is written (None: a new temporary folder).
    keep_videos: how many finished mp4s are kept (older ones are deleted).
    prefetch: chunks the pipeline dispatches ahead of the one being sent (``pipe.stream(prefetch=...)``).
    quantization: "none", or "fp8" for float8 transformer block weights (:mod:`helios_jax.models.fp8`).
  """

  model: str | None = None
  steps: tuple[int, ...] | None = None
  guidance: float | None = None
  height: int | None = None
  width: int | None = None
  dtype: str | None = None
  seed: int = 42
  blend_chunks: int = 3
  max_upload_mb: float = 32.0
  max_frames: int = 2400
  jpeg_quality: int = 90
  video_dir: str | None = None
  keep_videos: int = 20
  prefetch: int = 1
  quantization: str = "none"

  def __post_init__(self):
    from helios_jax.errors import InputError
    if self.max_upload_mb <= 0:
      raise InputError(f"max_upload_mb must be positive, got {self.max_upload_mb:g}")
    if self.max_frames < 0:
      raise InputError(f"max_frames must be >= 0 (0: no limit), got {self.max_frames}")
    if not 1 <= self.jpeg_quality <= 95:
      raise InputError(f"jpeg_quality must be between 1 and 95, got {self.jpeg_quality}")
    if self.keep_videos < 1:
      raise InputError(f"keep_videos must be at least 1, got {self.keep_videos}")
    if not 0 <= self.blend_chunks <= 64:
      raise InputError(f"blend_chunks must be between 0 and 64, got {self.blend_chunks}")
    if self.prefetch < 0:
      raise InputError(f"prefetch must be >= 0, got {self.prefetch}")
    if self.quantization not in ("none", "fp8"):
      raise InputError(f"quantization must be 'none' or 'fp8', got {self.quantization!r}")

  @property
  def max_upload_bytes(self) -> int:
    return int(self.max_upload_mb * 2 ** 20)

  @property
  def ws_max_message_bytes(self) -> int:
    """The WebSocket layer's message size limit: room for a base64 upload 1.5x over ``max_upload_mb``, so an
    oversized upload gets a clear ``upload_too_large`` error; anything larger is cut off by the protocol layer
    (close code 1009)."""
    return int(self.max_upload_bytes * 4 / 3 * 1.5) + 2 ** 16


__all__ = ["ServerSettings", "DEFAULT_HOST", "DEFAULT_PORT"]
