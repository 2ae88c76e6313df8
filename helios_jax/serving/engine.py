"""The loaded model of a streaming server: one pipeline, its resolved sampling plan, and who owns the device.

:func:`load_engine` reads the model folder's defaults (:func:`helios_jax.io.model_folder.inspect_model_folder`,
with the server's overrides) and loads the pipeline once. An :class:`Engine` then

* turns a client's :class:`~helios_jax.serving.protocol.StartMessage` into a :class:`StreamRequest` (server
  defaults, frame limit, decoded uploads or the bundled demo inputs): :meth:`Engine.prepare`;
* opens a ``pipe.stream(...)`` for it: :meth:`Engine.open_stream`;
* lets one stream at a time use the device: :meth:`Engine.claim` / :meth:`Engine.release` (thread-safe; listeners
  hear every change, which the server broadcasts as ``device`` events).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Any, Callable

import numpy as np

from helios_jax.errors import CheckpointError
from helios_jax.serving import uploads
from helios_jax.serving.protocol import FRAME_FORMAT, MAX_PROMPT_CHARS, MODES, Code, ProtocolError, StartMessage
from helios_jax.serving.settings import ServerSettings

logger = logging.getLogger("helios_jax.serving")

# How model-folder errors name the server's settings.
OPTION_NAMES = {"height": "--height", "width": "--width", "steps": "--steps", "guidance": "--guidance",
                "dtype": "--dtype", "num_frames": "num_frames"}


@dataclasses.dataclass(frozen=True)
class StreamRequest:
  """A start message resolved against the server: what ``pipe.stream`` gets.

  Attributes:
    mode: "t2v", "i2v" or "v2v".
    prompt, negative_prompt: the texts (negative: None for empty).
    num_frames: frames to generate, None for a stream without end (until "stop").
    endless: the client asked for an endless stream (``num_frames`` is then the server's frame limit or None).
    seed: the noise seed.
    blend_chunks: default blend length of later prompt changes (``interpolation_steps``).
    image: I2V start image (RGB ``PIL.Image``), else None.
    video: V2V start video, uint8 (F, H, W, 3) at the server's frame size, else None.
    id: the client's correlation id of the start message.
  """

  mode: str
  prompt: str
  negative_prompt: str | None
  num_frames: int | None
  endless: bool
  seed: int
  blend_chunks: int
  image: Any = None
  video: np.ndarray | None = None
  id: Any = None


class Engine:
  """A loaded pipeline plus the settings every stream on it uses (see the module docstring).

  Args:
    pipe: a loaded ``HeliosPipeline`` / ``HeliosPyramidPipeline`` (with VAE and text encoder).
    plan: the folder's resolved :class:`~helios_jax.io.model_folder.ModelPlan` (server overrides applied).
    settings: the server's settings.
    model_name: how the model is shown to clients.
    demo: the bundled demo's inputs (:class:`~helios_jax.io.model_folder.BundledDemo`) when serving it, else None.
  """

  def __init__(self, pipe, plan, settings: ServerSettings, model_name: str, demo=None):
    from helios_jax.pipelines.stream import DEFAULT_FPS
    self.pipe = pipe
    self.plan = plan
    self.settings = settings
    self.model_name = model_name
    self.demo = demo
    self.fps = DEFAULT_FPS
    self._lock = threading.Lock()
    self._owner: object | None = None
    self._listeners: list[Callable[[bool], None]] = []

  # ------------------------------------------------------------------------------------------------------------------
  # What clients are told

  @property
  def frames_per_chunk(self) -> int:
    return self.plan.window

  def info(self) -> dict[str, Any]:
    """The server description of the ``ready`` event and ``GET /api/info`` (fields in docs/streaming.md)."""
    plan, s = self.plan, self.settings
    demo = self.demo
    return dict(
        model=self.model_name, kind=plan.kind, demo=demo is not None, modes=list(MODES), fps=self.fps,
        width=plan.width, height=plan.height, frames_per_chunk=self.frames_per_chunk, frame_format=FRAME_FORMAT,
        defaults=dict(num_frames=self._default_frames(), seed=s.seed, blend_chunks=s.blend_chunks,
                      steps=list(plan.steps), guidance=plan.guidance, dtype=plan.dtype,
                      prompts=dict(demo.prompts) if demo else {},
                      start_image_url="/inputs/start.png" if demo else None,
                      start_video_url="/inputs/start.mp4" if demo else None),
        limits=dict(max_upload_bytes=s.max_upload_bytes, max_frames=s.max_frames or None,
                    max_prompt_chars=MAX_PROMPT_CHARS),
        busy=self.busy)

  def _default_frames(self) -> int:
    n = self.plan.num_frames
    return min(n, self.settings.max_frames) if self.settings.max_frames else n

  # ------------------------------------------------------------------------------------------------------------------
  # The device

  @property
  def busy(self) -> bool:
    with self._lock:
      return self._owner is not None

  def claim(self, owner: object) -> bool:
    """Makes ``owner`` the one stream on the device; False when another owns it."""
    with self._lock:
      if self._owner is not None and self._owner is not owner:
        return False
      changed, self._owner = self._owner is None, owner
    if changed:
      self._notify(True)
    return True

  def release(self, owner: object) -> None:
    """Frees the device if ``owner`` holds it (idempotent)."""
    with self._lock:
      if self._owner is not owner:
        return
      self._owner = None
    self._notify(False)

  def add_listener(self, fn: Callable[[bool], None]) -> None:
    """``fn(busy)`` is called (from the thread that changed it) whenever the device is claimed or released."""
    self._listeners.append(fn)

  def _notify(self, busy: bool) -> None:
    for fn in list(self._listeners):
      try:
        fn(busy)
      except Exception:  # a listener's failure must not keep the device claimed
        logger.exception("device listener failed")

  # ------------------------------------------------------------------------------------------------------------------
  # Streams

  def prepare(self, msg: StartMessage) -> StreamRequest:
    """Resolves a start message: defaults, the frame limit, and the start image / video (decoded and checked).

    Blocks while decoding uploads (run it in a worker thread).

    Raises:
      ProtocolError: ``too_many_frames``, ``missing_upload``, ``upload_too_large``, ``bad_image``, ``bad_video``.
    """
    s = self.settings
    if msg.endless:
      num_frames = s.max_frames or None
    elif msg.num_frames is None:
      num_frames = self._default_frames()
    else:
      if s.max_frames and msg.num_frames > s.max_frames:
        raise ProtocolError(Code.TOO_MANY_FRAMES, f"num_frames {msg.num_frames} is above this server's limit of "
                                                  f"{s.max_frames} frames per stream")
      num_frames = msg.num_frames
    image = video = None
    if msg.mode == "i2v":
      image = self._start_image(msg.image)
    elif msg.mode == "v2v":
      video = self._start_video(msg.video)
    return StreamRequest(mode=msg.mode, prompt=msg.prompt, negative_prompt=msg.negative_prompt,
                         num_frames=num_frames, endless=msg.endless,
                         seed=s.seed if msg.seed is None else msg.seed,
                         blend_chunks=s.blend_chunks if msg.blend_chunks is None else msg.blend_chunks,
                         image=image, video=video, id=msg.id)

  def _start_image(self, payload: str | None):
    if payload is not None:
      return uploads.read_image(uploads.payload_bytes(payload, "image", self.settings.max_upload_bytes))
    if self.demo is None:
      raise ProtocolError(Code.MISSING_UPLOAD, "mode i2v needs a start image (the \"image\" field)")
    from helios_jax.io import media
    return media.load_image(self.demo.image)

  def _start_video(self, payload: str | None) -> np.ndarray:
    plan = self.plan
    if payload is not None:
      data = uploads.payload_bytes(payload, "video", self.settings.max_upload_bytes)
      return uploads.read_video(data, plan.width, plan.height, self.frames_per_chunk)
    if self.demo is None:
      raise ProtocolError(Code.MISSING_UPLOAD, "mode v2v needs a start video (the \"video\" field)")
    from helios_jax.io import media
    return media.read_video(self.demo.video, size=(plan.width, plan.height))

  def stream_kwargs(self, request: StreamRequest) -> dict[str, Any]:
    """The keyword arguments of ``pipe.stream`` for ``request``."""
    kw = self.plan.pipeline_kwargs()
    kw.update(num_frames=request.num_frames, prompt=request.prompt, negative_prompt=request.negative_prompt,
              seed=request.seed, image=request.image, video=request.video,
              interpolation_steps=request.blend_chunks, prefetch=self.settings.prefetch, progress=False)
    return kw

  def open_stream(self, request: StreamRequest):
    """``pipe.stream(...)`` for ``request`` (blocks while it encodes the prompt and the start image / video).

    Raises:
      helios_jax.errors.HeliosError: the pipeline refused the request.
    """
    return self.pipe.stream(**self.stream_kwargs(request))

  def warmup(self) -> float:
    """Compiles what streams run: two chunks of t2v (the first chunk and the steady one differ in pyramid models
    with an amplified first chunk), then one chunk each of i2v and v2v from a grey start image / video (their
    VAE encoders). Frames are discarded; returns the seconds it took."""
    t0 = time.perf_counter()
    plan, window = self.plan, self.frames_per_chunk
    prompt = (self.demo.prompts.get("t2v") if self.demo else None) or "warm-up"
    grey = np.full((window, plan.height, plan.width, 3), 128, np.uint8)
    import PIL.Image
    runs = [("t2v", 2 * window, {}), ("i2v", window, {"image": PIL.Image.fromarray(grey[0])}),
            ("v2v", window, {"video": grey})]
    for mode, frames, inputs in runs:
      request = StreamRequest(mode=mode, prompt=prompt, negative_prompt=None, num_frames=frames, endless=False,
                              seed=self.settings.seed, blend_chunks=self.settings.blend_chunks, **inputs)
      stream = self.open_stream(request)
      try:
        for _ in stream:
          pass
      finally:
        stream.close(wait=True)
      logger.info("warm-up %s done after %.1f s", mode, time.perf_counter() - t0)
    return time.perf_counter() - t0


def load_engine(settings: ServerSettings) -> Engine:
  """Resolves the model folder's defaults with the server's overrides and loads the pipeline once.

  Raises:
    helios_jax.errors.InputError: an override that does not fit the model (steps count, frame size, dtype).
    helios_jax.errors.CheckpointError: a missing or incomplete model folder, or one without a text encoder.
  """
  from helios_jax.io.model_folder import bundled_demo, inspect_model_folder, load_pipeline
  demo = bundled_demo() if settings.model is None else None
  model = demo.model if demo else settings.model
  plan = inspect_model_folder(model, height=settings.height, width=settings.width, dtype=settings.dtype,
                              steps=settings.steps, guidance=settings.guidance, needs_text_encoder=False,
                              option_names=OPTION_NAMES)
  if not plan.has_text_encoder:
    raise CheckpointError(f"{model} has no text_encoder/ and tokenizer/: the server encodes its clients' prompts, "
                          "so it needs a model folder with both")
  t0 = time.perf_counter()
  pipe = load_pipeline(model, plan, quantization=settings.quantization)
  logger.info("loaded %s in %.1f s", model, time.perf_counter() - t0)
  name = "bundled demo model" if demo else os.path.basename(os.path.normpath(model))
  return Engine(pipe, plan, settings, name, demo)


__all__ = ["Engine", "StreamRequest", "load_engine", "OPTION_NAMES"]
