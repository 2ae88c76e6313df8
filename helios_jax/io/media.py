"""Images and videos in and out: reading, the Helios pipelines' preprocessing, H.264 mp4 and PNG writing.

Preprocessing follows diffusers' ``VideoProcessor.preprocess`` / ``preprocess_video`` (a ``VaeImageProcessor`` with
its defaults: ``do_resize``, Lanczos resampling, ``do_normalize``, no RGB conversion, ``resize_mode="default"``)
as the Helios pipelines call them with ``height`` and ``width``:

* PIL images are resized to exactly ``(width, height)`` with ``Image.resize(..., LANCZOS, reducing_gap=None)``:
  no crop, no aspect-ratio preservation. Then ``x / 255`` in float32 and ``2 x - 1``.
* Floating-point arrays (values in [0, 1]) are resized with torch's ``F.interpolate(mode="nearest")`` (reproduced
  here index for index), then ``2 x - 1``. As in diffusers, an array whose minimum is below 0 is taken to be in
  [-1, 1] already and is not rescaled (diffusers warns that this is deprecated; so do we).
* Differences from diffusers, only where diffusers would fail or silently produce garbage: uint8 arrays are
  treated as images (``PIL.Image.fromarray``, then the PIL path; diffusers would rescale 0..255 as if it were
  0..1), and PIL images / uint8 arrays that are not RGB (grey, RGBA, palette) are converted to RGB (diffusers
  would hand a 1- or 4-channel tensor to the VAE). Files are opened like ``diffusers.utils.load_image`` /
  ``load_video`` do (EXIF orientation applied, frames converted to RGB).

Layouts: images come out as (B, 3, H, W) float32 in [-1, 1], videos as (B, 3, F, H, W) float32 in [-1, 1].

Output: :func:`write_video` encodes H.264 (libx264, yuv420p) at 24 fps with PyAV into a temporary file in the
target's folder and renames it into place (``os.replace``), so a half-written video never carries the final name;
:func:`write_contact_sheet` writes a PNG grid of evenly spaced frames the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Any, Iterable

import numpy as np

from helios_jax.errors import InputError

logger = logging.getLogger("helios_jax")

DEFAULT_FPS = 24

# ------------------------------------------------------------------------------------------------------------
# Reading


def _pil():
  import PIL.Image
  import PIL.ImageOps
  return PIL


def _is_pil(x) -> bool:
  try:
    import PIL.Image
  except ImportError:  # pragma: no cover - pillow is a runtime requirement
    return False
  return isinstance(x, PIL.Image.Image)


def load_image(path: str | os.PathLike):
  """Opens an image file as an RGB ``PIL.Image`` (EXIF orientation applied, fully decoded).

  Raises:
    InputError: the file does not exist or is not a readable image.
  """
  PIL = _pil()
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise InputError(f"image file not found: {path}")
  try:
    with PIL.Image.open(path) as img:
      img = PIL.ImageOps.exif_transpose(img)
      img.load()
      return img.convert("RGB")
  except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
    raise InputError(f"cannot read image {path}: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0] if text else type(e).__name__


def read_video(path: str | os.PathLike, size: tuple[int, int] | None = None,
               max_frames: int | None = None, resize: str = "stretch", pad_fill: str = "black") -> np.ndarray:
  """Decodes a video file (mp4, webm, mkv, gif, ... anything FFmpeg reads) to RGB frames.

  Args:
    path: the video file.
    size: optional ``(width, height)``; each frame is then resized as it is decoded (PIL Lanczos, exactly as the
      preprocessing does), which keeps memory at the target resolution for long or large videos.
    max_frames: stop after this many frames.
    resize: how a frame of another aspect ratio is fitted to ``size`` (:func:`fit_image`): "stretch" (the default,
      the preprocessing's plain resize), "crop" or "pad" (with ``pad_fill``).

  Returns:
    uint8 array (F, H, W, 3).

  Raises:
    InputError: missing, unreadable or corrupt file, no video stream, or no decodable frame.
  """
  import av
  PIL = _pil()
  path = os.fspath(path)
  _check_fit(resize, pad_fill)
  if not os.path.isfile(path):
    raise InputError(f"video file not found: {path}")
  frames = []
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise InputError(f"{path} has no video stream")
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"
      for frame in container.decode(stream):
        img = frame.to_image()
        if img.mode != "RGB":
          img = img.convert("RGB")
        if size is not None and resize != "stretch":
          img = fit_image(img, size[0], size[1], resize, pad_fill)
        elif size is not None and img.size != tuple(size):
          img = img.resize(tuple(size), resample=PIL.Image.LANCZOS, reducing_gap=None)
        frames.append(np.asarray(img, np.uint8))
        if max_frames is not None and len(frames) >= max_frames:
          break
  except InputError:
    raise
  except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:
    raise InputError(f"cannot read video {path}: {_reason(e)}") from None
  if not frames:
    raise InputError(f"cannot read video {path}: no frame could be decoded")
  return np.stack(frames)


# ------------------------------------------------------------------------------------------------------------
# Preprocessing (diffusers VideoProcessor parity)


def _torch_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source indices of torch's ``F.interpolate(mode="nearest")`` along one axis (``size=`` given, no scale)."""
  o = np.arange(out_size)
  if out_size == in_size:
    return o
  if out_size == 2 * in_size:
    return o >> 1
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(o.astype(np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


def _resize_nearest(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """(N, H, W, C) -> (N, height, width, C), torch nearest semantics."""
  rows = _torch_nearest_indices(frames.shape[1], height)
  cols = _torch_nearest_indices(frames.shape[2], width)
  return frames[:, rows][:, :, cols]


def _pil_to_unit(img, height: int, width: int) -> np.ndarray:
  """PIL image -> (H, W, 3) float32 in [0, 1] after the Lanczos resize."""
  PIL = _pil()
  if img.mode != "RGB":
    img = img.convert("RGB")
  if img.size != (width, height):
    img = img.resize((width, height), resample=PIL.Image.LANCZOS, reducing_gap=None)
  return np.asarray(img).astype(np.float32) / 255.0


def _uint8_to_pil(arr: np.ndarray, name: str):
  PIL = _pil()
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
    raise InputError(f"{name} must be an (H, W, 3) image, got a uint8 array of shape {arr.shape}")
  return PIL.Image.fromarray(np.ascontiguousarray(arr))


def _target_size(height, width, vae_scale_factor: int) -> tuple[int, int]:
  """diffusers' ``get_default_height_width``: both sizes rounded down to a multiple of ``vae_scale_factor``."""
  if not isinstance(height, (int, np.integer)) or not isinstance(width, (int, np.integer)) or height <= 0 \
      or width <= 0:
    raise InputError(f"height and width must be positive integers, got {height!r}x{width!r}")
  f = max(1, int(vae_scale_factor))
  h, w = int(height) - int(height) % f, int(width) - int(width) % f
  if h == 0 or w == 0:
    raise InputError(f"height and width must be at least {f} pixels, got {height}x{width}")
  return h, w


def _float_frames(arr: np.ndarray, height: int, width: int, name: str) -> np.ndarray:
  """Float frames (N, H, W, 3) in [0, 1] (or [-1, 1]) -> (N, height, width, 3) in [-1, 1], diffusers' numpy path."""
  if arr.ndim != 4 or arr.shape[-1] != 3:
    raise InputError(f"{name} must have 3 channels last, got a float array of shape {arr.shape}")
  if arr.size == 0 or min(arr.shape[1:3]) < 1:
    raise InputError(f"{name} is empty (shape {arr.shape})")
  if not np.isfinite(arr).all():
    raise InputError(f"{name} contains NaN or infinite values")
  if arr.dtype not in (np.float32, np.float64):
    arr = arr.astype(np.float32)
  lo, hi = float(arr.min()), float(arr.max())
  if lo < -1.0 or hi > 1.0:
    raise InputError(f"{name} values must lie in [0, 1] (float arrays; uint8 for 0..255), got [{lo:g}, {hi:g}]")
  arr = _resize_nearest(arr, height, width)
  if lo < 0:
    logger.warning("%s has values in [-1, 1]; taken as already normalised (as diffusers does, deprecated there)",
                   name)
    return arr.astype(np.float32)
  return (2.0 * arr - 1.0).astype(np.float32)


def _image_to_unit_or_signed(image, height: int, width: int, name: str) -> np.ndarray:
  """One image (PIL, path, uint8 or float array) -> (height, width, 3) float32 in [-1, 1]."""
  if isinstance(image, (str, os.PathLike)):
    image = load_image(image)
  if _is_pil(image):
    return 2.0 * _pil_to_unit(image, height, width) - 1.0
  if hasattr(image, "__array__") and not isinstance(image, np.ndarray):
    image = np.asarray(image)
  if isinstance(image, np.ndarray):
    if image.dtype == np.uint8:
      return 2.0 * _pil_to_unit(_uint8_to_pil(image, name), height, width) - 1.0
    if np.issubdtype(image.dtype, np.floating):
      if image.ndim != 3:
        raise InputError(f"{name} must be an (H, W, 3) array, got shape {image.shape}")
      return _float_frames(image[None], height, width, name)[0]
    raise InputError(f"{name} must be uint8 (0..255) or floating point (0..1), got dtype {image.dtype}")
  raise InputError(f"{name} must be a file path, a PIL image or an (H, W, 3) array, got {type(image).__name__}")


def preprocess_image(image, height: int, width: int, vae_scale_factor: int = 8) -> np.ndarray:
  """An image, or a list of images (a batch), -> (B, 3, height, width) float32 in [-1, 1].

  Each image is a file path, a ``PIL.Image``, an (H, W, 3) uint8 array (0..255) or an (H, W, 3) float array
  (0..1). Matches diffusers' ``VideoProcessor(vae_scale_factor).preprocess(image, height=height, width=width)``
  (module docstring), including its rounding of ``height`` and ``width`` down to multiples of ``vae_scale_factor``.
  """
  height, width = _target_size(height, width, vae_scale_factor)
  images = list(image) if isinstance(image, (list, tuple)) else [image]
  if not images:
    raise InputError("image list is empty")
  out = [_image_to_unit_or_signed(im, height, width, "image") for im in images]
  return np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2), np.float32)


def preprocess_video(video, height: int, width: int, vae_scale_factor: int = 8) -> np.ndarray:
  """A video -> (1, 3, F, height, width) float32 in [-1, 1].

  ``video`` is a file path (decoded with PyAV and resized frame by frame), a list of frames (PIL images or
  (H, W, 3) arrays), or an (F, H, W, 3) array (uint8 0..255 or float 0..1). Matches diffusers'
  ``VideoProcessor.preprocess_video(video, height=height, width=width)``: a list of PIL frames goes through the
  Lanczos path, a float array through the nearest path with one [-1, 1] check over the whole video. ``height`` and
  ``width`` are rounded down to multiples of ``vae_scale_factor`` as in :func:`preprocess_image`.
  """
  height, width = _target_size(height, width, vae_scale_factor)
  if isinstance(video, (str, os.PathLike)):
    frames = read_video(video, size=(width, height))
    signed = 2.0 * (frames.astype(np.float32) / 255.0) - 1.0
  elif isinstance(video, (list, tuple)):
    if not video:
      raise InputError("video has no frames")
    if all(isinstance(f, np.ndarray) and np.issubdtype(f.dtype, np.floating) for f in video):
      # diffusers stacks float frames and checks the value range once over the whole video.
      shapes = {f.shape for f in video}
      if len(shapes) != 1:
        raise InputError(f"video frames have different shapes: {sorted(shapes)}")
      signed = _float_frames(np.stack(video), height, width, "video")
    else:
      signed = np.stack([_image_to_unit_or_signed(f, height, width, "video frame") for f in video])
  else:
    arr = np.asarray(video) if hasattr(video, "__array__") else None
    if arr is None:
      raise InputError(f"video must be a file path, a list of frames or an (F, H, W, 3) array, got "
                       f"{type(video).__name__}")
    if arr.ndim != 4:
      raise InputError(f"video must be an (F, H, W, 3) array, got shape {arr.shape}")
    if arr.shape[0] == 0:
      raise InputError("video has no frames")
    if arr.dtype == np.uint8:
      signed = np.stack([_image_to_unit_or_signed(f, height, width, "video frame") for f in arr])
    elif np.issubdtype(arr.dtype, np.floating):
      signed = _float_frames(arr, height, width, "video")
    else:
      raise InputError(f"video must be uint8 (0..255) or floating point (0..1), got dtype {arr.dtype}")
  return np.ascontiguousarray(signed.astype(np.float32).transpose(3, 0, 1, 2)[None])


# ------------------------------------------------------------------------------------------------------------
# Fitting an input of another size or aspect ratio (sample.py's --resize), and saying what was done
#
# The preprocessing above stretches (diffusers' behaviour). These pure functions offer the alternatives: centre
# crop to the target aspect ratio, or pad (letterbox / pillarbox) to it, each followed by the same Lanczos resize.

RESIZE_MODES = ("stretch", "crop", "pad")
PAD_FILLS = ("black", "edge")
MIN_INPUT_SIZE = 8  # smallest width and height of an input image / video frame that is accepted (pixels)


def _check_fit(mode: str, fill: str) -> None:
  if mode not in RESIZE_MODES:
    raise InputError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
  if fill not in PAD_FILLS:
    raise InputError(f"pad fill must be one of {', '.join(PAD_FILLS)}, got {fill!r}")


def aspect_label(width: int, height: int) -> str:
  """An aspect ratio as ``"1.73:1"`` (two decimals, trailing zeros dropped: ``"1:1"``, ``"0.6:1"``)."""
  return f"{width / height:.2f}".rstrip("0").rstrip(".") + ":1"


def crop_box(src_width: int, src_height: int, width: int, height: int) -> tuple[int, int, int, int]:
  """The centred ``(left, top, right, bottom)`` box of a ``src_width`` x ``src_height`` image with the aspect ratio
  ``width``:``height`` (rounded to whole pixels; the whole image when the ratios already agree)."""
  if src_width * height > width * src_height:  # too wide: keep the full height
    w = min(src_width, max(1, (src_height * width + height // 2) // height))
    left = (src_width - w) // 2
    return left, 0, left + w, src_height
  h = min(src_height, max(1, (src_width * height + width // 2) // width))
  top = (src_height - h) // 2
  return 0, top, src_width, top + h


def pad_size(src_width: int, src_height: int, width: int, height: int) -> tuple[int, int, int, int]:
  """``(padded_width, padded_height, left, top)``: the smallest canvas with the aspect ratio ``width``:``height``
  that holds a ``src_width`` x ``src_height`` image, and where the image sits in it (centred)."""
  if src_width * height > width * src_height:  # too wide: pad above and below
    h = max(src_height, (src_width * height + width // 2) // width)
    return src_width, h, 0, (h - src_height) // 2
  w = max(src_width, (src_height * width + height // 2) // height)
  return w, src_height, (w - src_width) // 2, 0


def _as_array(image) -> np.ndarray:
  if _is_pil(image):
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
  arr = np.asarray(image)
  if arr.ndim != 3:
    raise InputError(f"image must be an (H, W, C) array, got shape {arr.shape}")
  return arr


def crop_to_aspect(image, width: int, height: int) -> np.ndarray:
  """``image`` (PIL or (H, W, C) array) centre-cropped to the aspect ratio ``width``:``height`` (no resize), as an
  (h, w, C) array (PIL images as RGB uint8). See :func:`crop_box`."""
  arr = _as_array(image)
  left, top, right, bottom = crop_box(arr.shape[1], arr.shape[0], width, height)
  return arr[top:bottom, left:right].copy()


def pad_to_aspect(image, width: int, height: int, fill: str = "black") -> np.ndarray:
  """``image`` (PIL or (H, W, C) array) padded, centred, to the aspect ratio ``width``:``height`` (no resize), as
  an (h, w, C) array; the border is black (zeros) or, with ``fill="edge"``, the image's edge pixels repeated.
  See :func:`pad_size`."""
  _check_fit("pad", fill)
  arr = _as_array(image)
  pw, ph, left, top = pad_size(arr.shape[1], arr.shape[0], width, height)
  pads = ((top, ph - arr.shape[0] - top), (left, pw - arr.shape[1] - left), (0, 0))
  return np.pad(arr, pads, mode="edge") if fill == "edge" else np.pad(arr, pads, mode="constant")


def fit_image(image, width: int, height: int, mode: str = "stretch", fill: str = "black"):
  """``image`` (PIL, or an (H, W, 3) uint8 array) as an RGB ``PIL.Image`` of exactly ``width`` x ``height``.

  ``mode``: "stretch" resizes as the preprocessing does (Lanczos, ``reducing_gap=None``; the aspect ratio follows
  the target's); "crop" first centre-crops to the target aspect ratio (:func:`crop_to_aspect`); "pad" first pads
  to it with ``fill`` (:func:`pad_to_aspect`). The preprocessing leaves an image of the target size as it is, so
  handing the result to the pipeline gives exactly this fitting.
  """
  _check_fit(mode, fill)
  PIL = _pil()
  if _is_pil(image):
    img = image if image.mode == "RGB" else image.convert("RGB")
  else:
    img = _uint8_to_pil(np.asarray(image), "image").convert("RGB")
  if mode == "crop":
    img = PIL.Image.fromarray(crop_to_aspect(img, width, height))
  elif mode == "pad":
    img = PIL.Image.fromarray(pad_to_aspect(img, width, height, fill))
  if img.size != (width, height):
    img = img.resize((width, height), resample=PIL.Image.LANCZOS, reducing_gap=None)
  return img


def check_input_size(size: tuple[int, int], what: str) -> None:
  """Refuses an input whose ``(width, height)`` is below :data:`MIN_INPUT_SIZE` on either side.

  Raises:
    InputError: naming ``what`` (e.g. "image first.png") and its size.
  """
  w, h = size
  if w < MIN_INPUT_SIZE or h < MIN_INPUT_SIZE:
    raise InputError(f"{what} is {w}x{h} pixels: too small to start a video from (at least "
                     f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} is needed)")


def resize_note(src: tuple[int, int], dst: tuple[int, int], mode: str = "stretch", fill: str = "black"
                ) -> str | None:
  """What fitting a ``src`` = (width, height) input to ``dst`` does, in words; None when the sizes are equal.

  E.g. ``"1280x768 is resized to 640x384"``, ``"832x480 (1.73:1) is stretched to 128x128 (1:1)"``,
  ``"832x480 (1.73:1) is centre-cropped to 480x480, then resized to 128x128 (1:1)"``, ``"832x480 (1.73:1) is
  padded with black to 832x832, then resized to 128x128 (1:1)"``. The aspect ratio counts as changed when
  :func:`aspect_label` differs.
  """
  _check_fit(mode, fill)
  (sw, sh), (dw, dh) = tuple(src), tuple(dst)
  if (sw, sh) == (dw, dh):
    return None
  a_src, a_dst = aspect_label(sw, sh), aspect_label(dw, dh)
  if mode == "crop":
    left, top, right, bottom = crop_box(sw, sh, dw, dh)
    mid, how = (right - left, bottom - top), "centre-cropped"
  elif mode == "pad":
    pw, ph, _, _ = pad_size(sw, sh, dw, dh)
    mid, how = (pw, ph), f"padded with {'black' if fill == 'black' else 'its edge pixels'}"
  else:
    mid, how = (sw, sh), ""
  if a_src == a_dst and mid == (sw, sh):
    return f"{sw}x{sh} is resized to {dw}x{dh}"
  if mid == (sw, sh):  # stretch (or crop / pad with nothing to take away or add)
    return f"{sw}x{sh} ({a_src}) is stretched to {dw}x{dh} ({a_dst})"
  then = "" if mid == (dw, dh) else f", then resized to {dw}x{dh}"
  return f"{sw}x{sh} ({a_src}) is {how} to {mid[0]}x{mid[1]}{then} ({a_dst})"


def video_frame_size(path: str | os.PathLike) -> tuple[int, int]:
  """``(width, height)`` of a video file's first decodable frame (what :func:`read_video` gets before resizing).

  Raises:
    InputError: as :func:`read_video`.
  """
  return tuple(int(n) for n in read_video(path, max_frames=1).shape[2:0:-1])


# ------------------------------------------------------------------------------------------------------------
# Writing


def to_uint8(frame: np.ndarray) -> np.ndarray:
  """(…, H, W, 3) float in [0, 1] (clipped, rounded) or uint8 -> uint8."""
  frame = np.asarray(frame)
  if frame.dtype == np.uint8:
    return frame
  if not np.issubdtype(frame.dtype, np.floating):
    raise InputError(f"frames must be uint8 or float in [0, 1], got dtype {frame.dtype}")
  return np.round(np.clip(np.nan_to_num(frame.astype(np.float32)), 0.0, 1.0) * 255.0).astype(np.uint8)


def _temp_path(path: str, suffix: str) -> str:
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".partial{suffix}", dir=folder)
  os.close(fd)
  return tmp


def _publish(tmp: str, path: str) -> None:
  """Gives the finished temporary file the usual permissions (mkstemp makes it 0600) and renames it into place."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)
  os.replace(tmp, path)


@contextlib.contextmanager
def _atomic_output(path: str, suffix: str, what: str, library_errors: tuple = ()):
  """Yields a temporary name beside ``path``; publishes it as ``path`` on success, removes it on any failure.

  OS errors (and ``library_errors``) become one :class:`InputError` naming ``what`` and the path.
  """
  tmp = _temp_path(path, suffix)
  try:
    yield tmp
    _publish(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise InputError(f"cannot write {what} {path}: {e.strerror or _reason(e)}") from None
    if library_errors and isinstance(e, library_errors):
      raise InputError(f"cannot write {what} {path}: {_reason(e)}") from None
    raise


def check_writable(path: str | os.PathLike, what: str = "output") -> str:
  """Checks, before any work, that ``path`` can be created: its folder exists (created if missing) and takes a
  file, and ``path`` is not a folder. Returns the absolute path.

  Raises:
    InputError: naming the path and the reason.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(path):
    raise InputError(f"{what} path {path} is a folder")
  folder = os.path.dirname(path)
  try:
    os.makedirs(folder, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".probe", dir=folder)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise InputError(f"cannot write {what} {path}: {e.strerror or _reason(e)}") from None
  return path


def _frame_iter(frames) -> Iterable[np.ndarray]:
  if isinstance(frames, np.ndarray) or (hasattr(frames, "__array__") and not isinstance(frames, (list, tuple))):
    arr = np.asarray(frames)
    if arr.ndim == 5 and arr.shape[0] == 1:
      arr = arr[0]
    if arr.ndim != 4 or arr.shape[-1] != 3:
      raise InputError(f"frames must have shape (F, H, W, 3), got {arr.shape}")
    if arr.shape[0] == 0:
      raise InputError("no frames to write")
    return iter(arr)
  return iter(frames)


def write_video(path: str | os.PathLike, frames, fps: int = DEFAULT_FPS, crf: int = 18) -> str:
  """Encodes frames to an H.264 mp4 (libx264, yuv420p, ``crf``) at ``fps`` and returns the absolute path.

  Args:
    frames: (F, H, W, 3) (or (1, F, H, W, 3)) float in [0, 1] or uint8, or any iterable of (H, W, 3) frames
      (frames are then encoded as they come). Odd sizes are padded by one edge row/column (yuv420p needs even
      sizes).

  The video is written to a hidden temporary file beside ``path`` and renamed into place only when complete; on
  any error (including one raised by ``frames`` while iterating) the temporary file is removed and ``path`` is
  left as it was.
  """
  import av
  path = os.path.abspath(os.fspath(path))
  it = _frame_iter(frames)
  count = 0
  with _atomic_output(path, ".mp4", "video", (av.error.FFmpegError,)) as tmp:
    container = av.open(tmp, mode="w", format="mp4")
    try:
      stream = None
      for frame in it:
        frame = to_uint8(frame)
        if frame.ndim != 3 or frame.shape[-1] != 3:
          raise InputError(f"each frame must have shape (H, W, 3), got {frame.shape}")
        pad_h, pad_w = frame.shape[0] % 2, frame.shape[1] % 2
        if pad_h or pad_w:
          frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        if stream is None:
          stream = container.add_stream("libx264", rate=int(fps))
          stream.width, stream.height = frame.shape[1], frame.shape[0]
          stream.pix_fmt = "yuv420p"
          stream.options = {"crf": str(int(crf))}
        elif (frame.shape[1], frame.shape[0]) != (stream.width, stream.height):
          raise InputError(f"frame {count} is {frame.shape[1]}x{frame.shape[0]}, earlier frames are "
                           f"{stream.width}x{stream.height}")
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
          container.mux(packet)
        count += 1
      if stream is None:
        raise InputError("no frames to write")
      for packet in stream.encode(None):
        container.mux(packet)
    finally:
      container.close()
  return path


def contact_sheet(frames, num: int = 8, columns: int = 4) -> np.ndarray:
  """A grid of ``num`` evenly spaced frames (first and last included), row-major, 2-pixel black gutters.

  ``frames``: (F, H, W, 3) float in [0, 1] or uint8. Returns uint8 (rows·H + gutters, columns·W + gutters, 3).
  """
  arr = np.asarray(frames)
  if arr.ndim == 5 and arr.shape[0] == 1:
    arr = arr[0]
  if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
    raise InputError(f"frames must have shape (F, H, W, 3) with F >= 1, got {arr.shape}")
  if num < 1 or columns < 1:
    raise InputError(f"contact sheet needs num >= 1 and columns >= 1, got {num} and {columns}")
  idx = np.unique(np.round(np.linspace(0, arr.shape[0] - 1, min(num, arr.shape[0]))).astype(int))
  tiles = to_uint8(arr[idx])
  n, h, w, _ = tiles.shape
  cols = min(columns, n)
  rows = -(-n // cols)
  gut = 2
  sheet = np.zeros((rows * h + (rows - 1) * gut, cols * w + (cols - 1) * gut, 3), np.uint8)
  for k, tile in enumerate(tiles):
    r, c = divmod(k, cols)
    sheet[r * (h + gut):r * (h + gut) + h, c * (w + gut):c * (w + gut) + w] = tile
  return sheet


def write_contact_sheet(path: str | os.PathLike, frames, num: int = 8, columns: int = 4) -> str:
  """Writes :func:`contact_sheet` as a PNG (atomically, like :func:`write_video`); returns the absolute path."""
  PIL = _pil()
  path = os.path.abspath(os.fspath(path))
  sheet = contact_sheet(frames, num, columns)
  with _atomic_output(path, ".png", "contact sheet") as tmp:
    PIL.Image.fromarray(sheet).save(tmp, format="PNG")
  return path


def write_png_frame(path: str | os.PathLike, frame) -> str:
  """Writes one frame (H, W, 3), float in [0, 1] or uint8, as a PNG (atomically); returns the absolute path."""
  PIL = _pil()
  path = os.path.abspath(os.fspath(path))
  arr = np.asarray(frame)
  if arr.ndim != 3 or arr.shape[-1] != 3:
    raise InputError(f"a frame must have shape (H, W, 3), got {arr.shape}")
  with _atomic_output(path, ".png", "frame") as tmp:
    PIL.Image.fromarray(to_uint8(arr)).save(tmp, format="PNG")
  return path


def video_info(path: str | os.PathLike) -> dict[str, Any]:
  """Frame count, size, fps and codec of a video file (decodes it to count frames exactly)."""
  import av
  path = os.fspath(path)
  try:
    with av.open(path) as container:
      stream = container.streams.video[0]
      n = sum(1 for _ in container.decode(stream))
      return dict(frames=n, width=stream.codec_context.width, height=stream.codec_context.height,
                  fps=float(stream.average_rate) if stream.average_rate else None, codec=stream.codec_context.name)
  except (av.error.FFmpegError, OSError, IndexError) as e:
    raise InputError(f"cannot read video {path}: {_reason(e)}") from None


__all__ = ["load_image", "read_video", "preprocess_image", "preprocess_video", "write_video", "check_writable",
           "contact_sheet", "write_contact_sheet", "video_info", "to_uint8", "DEFAULT_FPS", "RESIZE_MODES",
           "PAD_FILLS", "MIN_INPUT_SIZE", "aspect_label", "crop_box", "pad_size", "crop_to_aspect", "pad_to_aspect",
           "fit_image", "check_input_size", "resize_note", "video_frame_size"]
