"""What the plain and the pyramid Helios pipelines share: loading, input checks, the unified T2V / I2V / V2V input
representation, the chunk loop over the history buffer, decoding and trimming.

Subclasses implement :meth:`HeliosPipelineBase._denoise_chunk` (one 9-latent chunk from its initial noise).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax.errors import CheckpointError, InputError
from helios_jax.io.checkpoint import load_json
from helios_jax.pipelines.history import HistoryLayout
from helios_jax.pipelines.lora import LoraMixin
from helios_jax.pipelines.noise import JaxNoiseSource, draw

logger = logging.getLogger("helios_jax")

# Defaults shared by diffusers' two Helios pipelines (their __call__ signatures).
IMAGE_NOISE_SIGMA = (0.111, 0.135)
VIDEO_NOISE_SIGMA = (0.111, 0.135)
VAE_SCALE_TEMPORAL = 4  # Wan2.1 VAE: 4x temporal, 8x spatial compression (used when no VAE is loaded)
VAE_SCALE_SPATIAL = 8

# Keyword arguments of both pipelines' __call__ that go unchanged to HeliosPipelineBase._generate.
COMMON_CALL_ARGS = (
    "prompt", "negative_prompt", "height", "width", "num_frames", "guidance_scale", "prompt_embeds",
    "negative_prompt_embeds", "output_type", "max_sequence_length", "image", "image_latents", "fake_image_latents",
    "add_noise_to_image_latents", "image_noise_sigma_min", "image_noise_sigma_max", "video", "video_latents",
    "add_noise_to_video_latents", "video_noise_sigma_min", "video_noise_sigma_max", "history_sizes",
    "num_latent_frames_per_chunk", "keep_first_frame", "is_skip_first_chunk", "seed", "noise_source", "progress",
    "prompt_schedule", "interpolation_steps", "step_progress")


@dataclasses.dataclass
class HeliosPipelineOutput:
  """``frames``: (B, F, H, W, 3) float32 in [0, 1] (numpy for ``output_type="np"``, a device array for ``"jax"``,
  which skips the host copy), or the latents (B, C, F, h, w)
  (``output_type="latent"``: the generated part of the history buffer, including given image/video latents).
  ``timings``: seconds per phase (``text``, ``chunks`` list, ``decode``, ``total``)."""

  frames: Any
  timings: dict = dataclasses.field(default_factory=dict)


def _to_array(name: str, value, ndim: int | None = None) -> jax.Array:
  try:
    arr = jnp.asarray(np.asarray(value) if not isinstance(value, jax.Array) else value)
  except (TypeError, ValueError, RuntimeError) as e:
    raise InputError(f"{name} cannot be converted to an array: {e}") from None
  if ndim is not None and arr.ndim != ndim:
    raise InputError(f"{name} must have {ndim} dimensions, got shape {tuple(arr.shape)}")
  if not jnp.issubdtype(arr.dtype, jnp.floating):
    raise InputError(f"{name} must be floating point, got dtype {arr.dtype}")
  return arr


@jax.jit
def _roll_in(buffer: jax.Array, new: jax.Array) -> jax.Array:
  """(B, C, F, h, w) buffer with ``new`` (B, C, n, h, w) appended and the oldest frames dropped (shape kept)."""
  return jnp.concatenate([buffer, new.astype(buffer.dtype)], axis=2)[:, :, new.shape[2]:]


def trimmed_frames(num_chunks: int, window: int = 33, temporal: int = VAE_SCALE_TEMPORAL) -> int:
  """Frames a video of ``num_chunks`` chunks of ``window`` decoded frames keeps: trimmed to 4k + 1 (``temporal``
  = 4), as the reference trims the concatenated decode (99 -> 97)."""
  return (num_chunks * window - 1) // temporal * temporal + 1


@jax.jit
def _to_unit(decoded: jax.Array) -> jax.Array:
  """VAE output in [-1, 1] -> [0, 1] (the one conversion the batch and the streamed frames share)."""
  return jnp.clip(decoded * 0.5 + 0.5, 0.0, 1.0)


@dataclasses.dataclass
class _ChunkRun:
  """Everything the chunk loop needs once the inputs are prepared; ``history`` and ``image_latents`` change as
  chunks are made. ``num_chunks``/``total_frames`` are None for an endless stream."""

  layout: HistoryLayout
  history: jax.Array
  produced: list
  image_latents: jax.Array | None
  latent_shape: tuple
  num_chunks: int | None
  total_frames: int | None
  window: int
  negative_prompt_embeds: jax.Array | None
  prompts: Any
  guidance_scale: float
  do_cfg: bool
  noise_source: Any
  is_skip_first_chunk: bool
  output_type: str
  chunk_fn: Callable
  steps_per_chunk: Callable[[int], int]
  timings: dict
  height: int
  width: int
  step_progress: Callable[[int, int], None] | None = None


class HeliosPipelineBase(LoraMixin):
  """Shared machinery. Components mirror diffusers: ``transformer``, ``scheduler``, ``vae``, ``text_encoder``,
  ``tokenizer``; pipeline flags ``is_cfg_zero_star`` and ``is_distilled`` come from ``model_index.json``."""

  _class_names: tuple[str, ...] = ()

  def __init__(self, transformer, scheduler, vae=None, text_encoder=None, tokenizer=None, *,
               is_cfg_zero_star: bool = False, is_distilled: bool = False, latents_posterior: str = "sample"):
    self.transformer = transformer
    self.scheduler = scheduler
    self.vae = vae
    self.text_encoder = text_encoder
    self.tokenizer = tokenizer
    self.is_cfg_zero_star = bool(is_cfg_zero_star)
    self.is_distilled = bool(is_distilled)
    if latents_posterior not in ("sample", "mean"):
      raise InputError(f"latents_posterior must be 'sample' or 'mean', got {latents_posterior!r}")
    # how image / video conditioning is encoded: a posterior draw (diffusers, the released models) or its mean
    self.latents_posterior = latents_posterior
    self._split = None

  # ------------------------------------------------------------------------------------------------------------------
  # Loading

  @classmethod
  def from_pretrained(cls, path: str, dtype: Any = jnp.bfloat16, vae_dtype: Any = jnp.float32,
                      text_encoder_dtype: Any = jnp.bfloat16, load_text_encoder: bool = True,
                      load_vae: bool = True, attention_implementation: str = "auto", quantization: str | None = None,
                      fp8_scaling: str = "channel"):
    """Loads a diffusers-format Helios folder (``model_index.json``, ``scheduler/``, ``transformer/``, and optionally
    ``vae/``, ``text_encoder/``, ``tokenizer/``). Missing optional components are None: then pass
    ``prompt_embeds`` instead of prompts, and latents instead of images/videos, and use ``output_type="latent"``.
    ``quantization="fp8"``: the transformer blocks' linear kernels in float8 (see :meth:`quantize_transformer`).
    """
    from helios_jax.models.transformer import HeliosTransformer3DModel
    from helios_jax.schedulers import scheduler_from_pretrained

    if not os.path.isdir(path):
      raise CheckpointError(f"model folder not found: {path}")
    index = load_json(os.path.join(path, "model_index.json"), "model_index.json")
    name = index.get("_class_name")
    if cls._class_names and name not in cls._class_names:
      logger.warning("%s loads a folder made for %s", cls.__name__, name)
    for required in ("scheduler", "transformer"):
      if not os.path.isdir(os.path.join(path, required)):
        raise CheckpointError(f"{path} has no {required}/ folder")
    scheduler = scheduler_from_pretrained(os.path.join(path, "scheduler"))
    transformer = HeliosTransformer3DModel.from_pretrained(os.path.join(path, "transformer"), dtype=dtype,
                                                           attention_implementation=attention_implementation,
                                                           quantization=quantization, fp8_scaling=fp8_scaling)
    vae = text_encoder = tokenizer = None
    if load_vae and os.path.isdir(os.path.join(path, "vae")):
      from helios_jax.models.vae import AutoencoderKLWan
      vae = AutoencoderKLWan.from_pretrained(os.path.join(path, "vae"), dtype=vae_dtype)
    if load_text_encoder and os.path.isdir(os.path.join(path, "text_encoder")):
      from helios_jax.models.tokenizer import load_tokenizer
      from helios_jax.models.umt5 import UMT5EncoderModel
      text_encoder = UMT5EncoderModel.from_pretrained(os.path.join(path, "text_encoder"), dtype=text_encoder_dtype)
      if os.path.isdir(os.path.join(path, "tokenizer")):
        tokenizer = load_tokenizer(os.path.join(path, "tokenizer"))
    return cls(transformer, scheduler, vae, text_encoder, tokenizer,
               is_cfg_zero_star=bool(index.get("is_cfg_zero_star", False)),
               is_distilled=bool(index.get("is_distilled", False)),
               latents_posterior=(index.get("helios_jax_defaults") or {}).get("latents_posterior", "sample"))

  # ------------------------------------------------------------------------------------------------------------------
  # Pieces

  @property
  def vae_scale_temporal(self) -> int:
    return self.vae.config.temporal_compression if self.vae is not None else VAE_SCALE_TEMPORAL

  @property
  def vae_scale_spatial(self) -> int:
    return self.vae.config.spatial_compression if self.vae is not None else VAE_SCALE_SPATIAL

  def _transformer_split(self):
    """(graphdef, params): ``params`` is the transformer's state, or ``(state, layer_states)`` after
    :meth:`unstack_transformer_layers`."""
    if self._split is None:
      self._split = nnx.split(self.transformer)
    return self._split

  def unstack_transformer_layers(self) -> None:
    """Stores the transformer's blocks as one array per layer and parameter (a speed option for accelerators).

    A ``lax.scan`` over stacked blocks makes XLA copy each layer's weight slice before its matmuls: for the 14B
    model one extra read and write of 26 GB per forward (docs/benchmarks.md measures the gain). Afterwards the
    pipeline's forwards run the layers from separate arrays (a Python loop: a larger program, longer compile).
    Done leaf by leaf, each stacked array deleted after its split, so device memory grows by one parameter at most.
    The transformer module itself keeps small placeholders instead of its stacked blocks: call it through this
    pipeline (its own ``__call__`` raises on the placeholders).
    """
    from helios_jax.models.transformer import unstack_blocks
    graphdef, params = self._transformer_split()
    if isinstance(params, tuple):
      return
    layers = unstack_blocks(self.transformer, delete=True)
    placeholders = jax.tree.map(lambda a: jnp.zeros((a.shape[0],) + (0,) * (a.ndim - 1), a.dtype),
                                nnx.state(self.transformer.blocks))
    nnx.update(self.transformer.blocks, placeholders)
    self._split = (graphdef, (nnx.split(self.transformer)[1], layers))

  def quantize_transformer(self, scaling: str = "channel", gemm_output: str = "float32",
                           attention: str = "bf16") -> int:
    """Stores the transformer blocks' linear kernels in float8_e4m3fn with per-channel (or per-tensor) scales;
    activations are scaled per tensor at run time (:mod:`helios_jax.models.fp8`); ``attention="fp8"`` runs the
    attention in FP8 too. Returns the number of fp8 parameters. Before :meth:`unstack_transformer_layers`."""
    from helios_jax.models.fp8 import quantize_blocks
    if self._split is not None and isinstance(self._split[1], tuple):
      raise InputError("quantize the transformer before unstack_transformer_layers(), not after")
    self._split = None
    return quantize_blocks(self.transformer, scaling, gemm_output, attention)

  def offload_transformer_layers(self, host_kind: str | None = "auto") -> str | None:
    """Low-VRAM mode: keeps the transformer's per-layer block weights in host memory (pinned where the backend has
    it) and brings each layer to the device inside the jitted forward one layer ahead of its use
    (:mod:`helios_jax.offload`); the frames are the same as without it. Unstacks the layers first
    (:meth:`unstack_transformer_layers`). Returns the memory kind the weights now live in, or None where the
    backend has no host memory space (then they stay on the device)."""
    from helios_jax.offload import offload_layers
    self.unstack_transformer_layers()
    graphdef, (state, layers) = self._split
    layers = offload_layers(layers, host_kind)
    self._split = (graphdef, (state, layers))
    return layers.host_kind

  def free_text_encoder(self):
    """Drops the text encoder (11 GB for UMT5-XXL) once prompts are encoded; pass embeddings afterwards."""
    self.text_encoder = None

  def encode_prompt(self, prompt, negative_prompt=None, do_classifier_free_guidance=True,
                    max_sequence_length: int = 512):
    """Prompt strings -> (prompt_embeds, negative_prompt_embeds), each (B, max_sequence_length, text_dim)."""
    if self.text_encoder is None or self.tokenizer is None:
      raise InputError("no text encoder/tokenizer loaded: pass prompt_embeds (and negative_prompt_embeds) instead "
                       "of prompt strings")
    from helios_jax.models.tokenizer import encode_prompt
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    pos = encode_prompt(self.text_encoder, self.tokenizer, prompts, max_sequence_length=max_sequence_length)
    neg = None
    if do_classifier_free_guidance:
      negative_prompt = "" if negative_prompt is None else negative_prompt
      negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
      if len(negs) != len(prompts):
        raise InputError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
      neg = encode_prompt(self.text_encoder, self.tokenizer, negs, max_sequence_length=max_sequence_length)
    return pos, neg

  def _prepare_embeds(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, do_cfg,
                      max_sequence_length):
    if prompt is not None and prompt_embeds is not None:
      raise InputError("pass either prompt or prompt_embeds, not both")
    if prompt is None and prompt_embeds is None:
      raise InputError("pass prompt (a string or list of strings) or prompt_embeds")
    if negative_prompt is not None and negative_prompt_embeds is not None:
      raise InputError("pass either negative_prompt or negative_prompt_embeds, not both")
    if prompt is not None:
      if not isinstance(prompt, (str, list, tuple)):
        raise InputError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
      pos, neg = self.encode_prompt(prompt, negative_prompt if negative_prompt_embeds is None else None,
                                    do_cfg and negative_prompt_embeds is None, max_sequence_length)
      prompt_embeds = pos
      negative_prompt_embeds = neg if negative_prompt_embeds is None else negative_prompt_embeds
    elif do_cfg and negative_prompt_embeds is None:
      if self.text_encoder is None:
        raise InputError("guidance_scale > 1 needs negative_prompt_embeds (or a text encoder to encode the "
                         "negative prompt)")
      _, negative_prompt_embeds = self.encode_prompt([""] * int(np.shape(prompt_embeds)[0]), negative_prompt,
                                                     True, max_sequence_length)
    tdt = self.transformer.config.param_dtype
    text_dim = self.transformer.config.text_dim
    pe = _to_array("prompt_embeds", prompt_embeds, 3)
    if pe.shape[-1] != text_dim:
      raise InputError(f"prompt_embeds have width {pe.shape[-1]}, the transformer expects text_dim={text_dim}")
    ne = None
    if do_cfg:
      ne = _to_array("negative_prompt_embeds", negative_prompt_embeds, 3)
      if ne.shape[-1] != text_dim or ne.shape[0] != pe.shape[0]:
        raise InputError(f"negative_prompt_embeds shape {tuple(ne.shape)} does not fit prompt_embeds "
                         f"{tuple(pe.shape)}")
      ne = ne.astype(tdt)
    return pe.astype(tdt), ne

  def _check_size(self, height: int, width: int, num_stages: int):
    patch = self.transformer.config.patch_size
    s = self.vae_scale_spatial
    mult = s * (2 ** (num_stages - 1)) * max(patch[1], patch[2])
    if not isinstance(height, (int, np.integer)) or not isinstance(width, (int, np.integer)) or height <= 0 \
        or width <= 0 or height % mult or width % mult:
      raise InputError(
          f"height and width must be positive multiples of {mult} (the latent, {s}x smaller, must split into "
          f"{2 ** (num_stages - 1)}x smaller pyramid levels of whole {patch[1]}x{patch[2]} patches); got "
          f"{height}x{width}")

  # ------------------------------------------------------------------------------------------------------------------
  # The chunk loop

  def _generate(self, *, num_stages: int, chunk_fn: Callable, steps_per_chunk: Callable[[int], int],
                stream: dict | None = None, **call):
    """The call both pipelines share: prepares the run, then either consumes every chunk (the batch output) or,
    with ``stream`` (the options of :meth:`stream`), returns a :class:`~helios_jax.pipelines.stream.HeliosStream`
    over the same chunk generator."""
    t_start = time.perf_counter()
    run = self._prepare_run(num_stages=num_stages, chunk_fn=chunk_fn, steps_per_chunk=steps_per_chunk,
                            streaming=stream is not None, **call)
    if stream is not None:
      from helios_jax.pipelines.stream import HeliosStream
      return HeliosStream(self, run, **stream)
    timings = run.timings
    bar = None
    if call["progress"]:
      from tqdm.auto import tqdm
      bar = tqdm(total=run.num_chunks, desc="chunks", unit="chunk", disable=None)
    frames = []
    t_chunk = time.perf_counter()
    for k, x, _ in self._chunk_latents(run):
      if run.output_type == "latent":
        run.produced.append(x)
      else:
        # Dispatch the decode now: XLA runs it while the host prepares (and the GPU runs) the next chunk.
        frames.append(self._decode_unit(x))
      if bar is not None:
        jax.block_until_ready(x)
        bar.set_postfix(fps=f"{run.window / (time.perf_counter() - t_chunk):.2f}", steps=steps_per_chunk(k))
        bar.update()
      timings["chunks"].append(time.perf_counter() - t_chunk)
      t_chunk = time.perf_counter()
    if bar is not None:
      bar.close()
    if run.output_type == "latent":
      out = jnp.concatenate(run.produced, axis=2)
    else:
      t0 = time.perf_counter()
      video_out = jnp.concatenate(frames, axis=2)[:, :, :run.total_frames]  # (B, 3, F, H, W) in [0, 1]
      out = jnp.transpose(video_out, (0, 2, 3, 4, 1))
      out = np.asarray(out, np.float32) if run.output_type == "np" else out
      timings["decode"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    return HeliosPipelineOutput(frames=out, timings=timings)

  def stream(self, prompt: str | None = None, *, num_frames: int | None = None, prefetch: int = 1,
             progress: bool = False, **kwargs):
    """Chunk-by-chunk generation: a :class:`~helios_jax.pipelines.stream.HeliosStream` that yields each chunk's
    decoded frames (uint8 (T, H, W, 3)) as soon as they reach the host, and takes prompt changes between chunks
    (:meth:`HeliosStream.set_prompt`). Keyword arguments are those of ``__call__`` (one prompt, batch 1), with
    ``num_frames=None`` for an endless stream (until ``stop()``; with a ``prompt_schedule``: the schedule's
    length) and ``prefetch`` chunks dispatched ahead of the one returned, so the VAE decode and host transfer of
    chunk k overlap the transformer's work on chunk k + 1. Same seed and inputs give the batch call's frames."""
    if not isinstance(prefetch, (int, np.integer)) or isinstance(prefetch, bool) or prefetch < 0:
      raise InputError(f"prefetch must be a non-negative integer, got {prefetch!r}")
    return self(prompt=prompt, num_frames=num_frames, progress=progress, _stream={"prefetch": int(prefetch)},
                **kwargs)

  def _prepare_run(self, *, prompt, negative_prompt, height, width, num_frames, guidance_scale, prompt_embeds,
                   negative_prompt_embeds, output_type, max_sequence_length, image, image_latents,
                   fake_image_latents, add_noise_to_image_latents, image_noise_sigma_min, image_noise_sigma_max, video,
                   video_latents, add_noise_to_video_latents, video_noise_sigma_min, video_noise_sigma_max,
                   history_sizes, num_latent_frames_per_chunk, keep_first_frame, is_skip_first_chunk, seed,
                   noise_source, progress, prompt_schedule, interpolation_steps, step_progress, num_stages,
                   chunk_fn, steps_per_chunk, streaming: bool) -> "_ChunkRun":
    """Checks the inputs, encodes prompts / image / video (in the reference's draw order) and fills the history
    buffer: everything before the first chunk."""
    from helios_jax.pipelines.prompts import PromptController, PromptSchedule
    timings: dict = {"chunks": []}
    if output_type not in ("np", "jax", "latent"):
      raise InputError(f"output_type must be 'np', 'jax' or 'latent', got {output_type!r}")
    if streaming and output_type == "latent":
      raise InputError("a stream yields decoded frames; use the batch call for output_type='latent'")
    if prompt_schedule is not None and not isinstance(prompt_schedule, PromptSchedule):
      raise InputError(f"prompt_schedule must be a PromptSchedule, got {type(prompt_schedule).__name__}")
    if num_frames is None and prompt_schedule is None and not streaming:
      raise InputError("num_frames is needed (only a stream or a prompt schedule may leave it out)")
    if num_frames is not None and (not isinstance(num_frames, (int, np.integer)) or isinstance(num_frames, bool)
                                   or num_frames <= 0):
      raise InputError(f"num_frames must be a positive integer, got {num_frames!r}")
    if not isinstance(interpolation_steps, (int, np.integer)) or interpolation_steps < 0:
      raise InputError(f"interpolation_steps must be a non-negative integer, got {interpolation_steps!r}")
    self._check_size(height, width, num_stages)
    if (image is not None or fake_image_latents is not None) and (video is not None or video_latents is not None):
      # (image_latents with video_latents is V2V's first-frame latent; a fake image latent is I2V-only.)
      raise InputError("image and video cannot be given together: image is for I2V, video for V2V")
    if output_type != "latent" and self.vae is None:
      raise InputError(f"output_type={output_type!r} needs a VAE to decode; load one or use output_type='latent'")
    if guidance_scale > 1.0 and self.is_distilled:
      logger.warning("guidance_scale %s > 1 on a step-distilled model: it was trained without CFG "
                     "(the reference warns and still applies it)", guidance_scale)
    do_cfg = guidance_scale > 1.0
    noise_source = noise_source if noise_source is not None else JaxNoiseSource(seed)
    t0 = time.perf_counter()
    schedule_embeds = None
    if prompt_schedule is not None:
      if prompt is not None or prompt_embeds is not None:
        raise InputError("pass prompt_schedule or prompt / prompt_embeds, not both")
      if prompt_schedule.uses_text:
        schedule_embeds = list(self._prepare_embeds(list(prompt_schedule.prompts), None, None, None, False,
                                                    max_sequence_length)[0][:, None])
      else:
        schedule_embeds = [self._prepare_embeds(None, None, e if np.ndim(e) == 3 else np.asarray(e)[None], None,
                                                False, max_sequence_length)[0] for e in prompt_schedule.prompts]
        if len({tuple(e.shape) for e in schedule_embeds}) > 1 or schedule_embeds[0].shape[0] != 1:
          raise InputError("the schedule's prompt embeddings must all have the same shape (1, L, D)")
      prompt_embeds = schedule_embeds[0]
    pe, ne = self._prepare_embeds(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, do_cfg,
                                  max_sequence_length)
    timings["text"] = time.perf_counter() - t0
    batch = pe.shape[0]
    if streaming and batch != 1:
      raise InputError(f"a stream makes one video: pass one prompt (got a batch of {batch})")

    def encode(text: str) -> jax.Array:  # a live prompt change: (1, L, D) in the transformer's dtype
      return self._prepare_embeds(text, None, None, None, False, max_sequence_length)[0]

    can_encode = self.text_encoder is not None and self.tokenizer is not None
    prompts = PromptController(pe, encode if can_encode else None, schedule_embeds=schedule_embeds,
                               schedule=prompt_schedule, interpolation_steps=interpolation_steps,
                               text=prompt if isinstance(prompt, str) else None)
    cfg = self.transformer.config
    channels = cfg.in_channels
    h, w = height // self.vae_scale_spatial, width // self.vae_scale_spatial
    layout = HistoryLayout.make(history_sizes, num_latent_frames_per_chunk, keep_first_frame)

    def check_latent(name, arr, frames=None):
      arr = _to_array(name, arr, 5).astype(jnp.float32)
      if arr.shape[0] != batch or arr.shape[1] != channels or arr.shape[3:] != (h, w) or (
          frames is not None and arr.shape[2] != frames):
        want = (batch, channels, frames if frames is not None else "T", h, w)
        raise InputError(f"{name} must have shape {want} for {height}x{width}, got {tuple(arr.shape)}")
      return arr

    # Unified input representation (inference-spec 3.3), with the reference's draw order (3.8).
    if image is not None:
      image_latents, fake_image_latents = self._encode_image(image, height, width, layout, noise_source,
                                                             image_latents, fake_image_latents)
    if image_latents is not None:
      image_latents = check_latent("image_latents", image_latents, 1)
    if fake_image_latents is not None:
      fake_image_latents = check_latent("fake_image_latents", fake_image_latents, 1)
    is_v2v = video is not None or video_latents is not None
    # In V2V, image_latents is the video's first-frame latent and is noised in the V2V block below (with a real
    # video the reference reaches its I2V block before that latent exists, so it never applies there).
    if image_latents is not None and add_noise_to_image_latents and not is_v2v:
      if fake_image_latents is None:
        raise InputError("I2V with image_latents also needs fake_image_latents (or pass the image itself)")
      s_img = image_noise_sigma_min + draw(noise_source, "uniform", (1,)) * (
          image_noise_sigma_max - image_noise_sigma_min)
      image_latents = s_img * draw(noise_source, "normal", image_latents.shape) + (1 - s_img) * image_latents
      s_fake = video_noise_sigma_min + draw(noise_source, "uniform", (1,)) * (
          video_noise_sigma_max - video_noise_sigma_min)
      fake_image_latents = (s_fake * draw(noise_source, "normal", fake_image_latents.shape)
                            + (1 - s_fake) * fake_image_latents)
    if video is not None:
      image_latents, video_latents = self._encode_video(video, height, width, layout, noise_source)
    if video_latents is not None:
      video_latents = check_latent("video_latents", video_latents)
      if image_latents is None:
        raise InputError("V2V with video_latents also needs image_latents (the first frame's latent)")
      if video_latents.shape[2] < layout.chunk:
        raise InputError(f"video_latents has {video_latents.shape[2]} frames; V2V needs at least one chunk of "
                         f"{layout.chunk} latent frames ({(layout.chunk - 1) * self.vae_scale_temporal + 1} video "
                         f"frames)")
      if add_noise_to_video_latents:
        s_img = image_noise_sigma_min + draw(noise_source, "uniform", (1,)) * (
            image_noise_sigma_max - image_noise_sigma_min)
        image_latents = s_img * draw(noise_source, "normal", image_latents.shape) + (1 - s_img) * image_latents
        windows = []
        for i in range(video_latents.shape[2] // layout.chunk):
          win = video_latents[:, :, i * layout.chunk:(i + 1) * layout.chunk]
          s = video_noise_sigma_min + draw(noise_source, "uniform", (win.shape[2],)) * (
              video_noise_sigma_max - video_noise_sigma_min)
          s = s.reshape(1, 1, -1, 1, 1)
          windows.append(s * draw(noise_source, "normal", win.shape) + (1 - s) * win)
        video_latents = jnp.concatenate(windows, axis=2)

    window = (layout.chunk - 1) * self.vae_scale_temporal + 1
    if num_frames is not None:
      num_chunks = max(1, math.ceil(num_frames / window))
    else:
      num_chunks = prompt_schedule.total_chunks if prompt_schedule is not None else None
    if prompt_schedule is not None and num_chunks is not None and num_chunks < prompt_schedule.total_chunks:
      logger.warning("num_frames=%s covers %d chunks, the prompt schedule %d: its later prompts are not reached",
                     num_frames, num_chunks, prompt_schedule.total_chunks)
    # Decoded frames kept: whole chunks, trimmed to 4k + 1 (the reference's trim of the concatenated decode).
    total_frames = None if num_chunks is None else trimmed_frames(num_chunks, window, self.vae_scale_temporal)
    # The history is a fixed-size rolling buffer of the last ``buffer_frames`` latents (constant shapes: no
    # per-chunk recompilation and constant memory however long the video); ``produced`` keeps what the
    # ``latent`` output returns (the conditioning latents, then every chunk).
    history = jnp.zeros((batch, channels, layout.buffer_frames, h, w), jnp.float32)
    produced = []
    if fake_image_latents is not None:
      history = _roll_in(history, fake_image_latents)
      produced.append(fake_image_latents)
    if video_latents is not None:
      history = _roll_in(history, video_latents)
      produced.append(video_latents)
    return _ChunkRun(layout=layout, history=history, produced=produced, image_latents=image_latents,
                     latent_shape=(batch, channels, 1, h, w), num_chunks=num_chunks, total_frames=total_frames,
                     window=window, negative_prompt_embeds=ne, prompts=prompts, guidance_scale=float(guidance_scale),
                     do_cfg=do_cfg, noise_source=noise_source, is_skip_first_chunk=bool(is_skip_first_chunk),
                     output_type=output_type, chunk_fn=chunk_fn, steps_per_chunk=steps_per_chunk, timings=timings,
                     height=int(height), width=int(width), step_progress=step_progress)

  def _chunk_latents(self, run: "_ChunkRun"):
    """The chunk loop: yields (k, latents (B, C, 9, h, w) float32, prompt info) for k = 0, 1, ... (endless when
    ``run.num_chunks`` is None), each chunk dispatched (not waited for) and rolled into the history. While it runs,
    ``run.step_progress(step, num_steps)`` (if given) hears every denoising step."""
    from helios_jax.pipelines.denoise import set_step_listener
    if run.step_progress is not None:
      # kept after the loop: the last chunk's steps still report while the device finishes them
      set_step_listener(run.step_progress)
    layout = run.layout
    indices = {k: jnp.asarray(a) for k, a in layout.indices().items()}
    b, c, _, h, w = run.latent_shape
    k = 0
    while run.num_chunks is None or k < run.num_chunks:
      prefix = None
      if layout.keep_first_frame:
        prefix = jnp.zeros(run.latent_shape, jnp.float32) if run.image_latents is None and k == 0 \
            else run.image_latents
      hist = layout.split(run.history, prefix)
      pe, info = run.prompts.for_chunk(k)
      x = draw(run.noise_source, "normal", (b, c, layout.chunk, h, w))
      x = run.chunk_fn(k=k, x=x, history=hist, indices=indices, prompt_embeds=pe,
                       negative_prompt_embeds=run.negative_prompt_embeds, guidance_scale=run.guidance_scale,
                       noise_source=run.noise_source, do_cfg=run.do_cfg)
      if layout.keep_first_frame and ((k == 0 and run.image_latents is None) or (run.is_skip_first_chunk and k == 1)):
        run.image_latents = x[:, :, 0:1].astype(jnp.float32)
      x = x.astype(jnp.float32)
      run.history = _roll_in(run.history, x)
      yield k, x, info
      k += 1

  # VAE-backed pieces (need a VAE; see helios_jax.models.vae)

  def _latents_mean_invstd(self):
    cfg = self.vae.config
    mean = jnp.asarray(np.asarray(cfg.latents_mean, np.float32)).reshape(1, -1, 1, 1, 1)
    inv_std = jnp.asarray(1.0 / np.asarray(cfg.latents_std, np.float32)).reshape(1, -1, 1, 1, 1)
    return mean, inv_std

  def _decode_chunk(self, latents: jax.Array) -> jax.Array:
    """Normalised chunk latents (B, C, T, h, w) -> video (B, 3, 1 + 4(T-1), H, W) clamped to [-1, 1]."""
    mean, inv_std = self._latents_mean_invstd()
    z = latents.astype(jnp.float32) / inv_std + mean
    return jnp.clip(self.vae.decode(z).sample, -1.0, 1.0)

  def _decode_unit(self, latents: jax.Array) -> jax.Array:
    """Normalised chunk latents (B, C, T, h, w) -> frames (B, 3, 1 + 4(T-1), H, W) float32 in [0, 1] (what the
    batch output holds; a stream rounds the same values to uint8)."""
    return _to_unit(self._decode_chunk(latents))

  def _encode_latents(self, pixels, noise_source) -> jax.Array:
    """(B, 3, F, H, W) pixels -> normalised (B, z, f, h, w) float32 latents: one encode with a fresh causal cache,
    then a posterior draw from ``noise_source`` (diffusers), or the posterior mean when
    ``self.latents_posterior == "mean"`` (models trained on mean latents, e.g. the bundled demo; no draw)."""
    from helios_jax.models.vae import normalize_latents
    cfg = self.vae.config
    dist = self.vae.encode(jnp.asarray(pixels)).latent_dist
    if self.latents_posterior == "mean":
      z = dist.mean
    else:
      z = dist.sample(draw(noise_source, "normal", dist.mean.shape))
    return normalize_latents(z, cfg.latents_mean, cfg.latents_std).astype(jnp.float32)

  def _encode_image(self, image, height, width, layout, noise_source, image_latents, fake_image_latents):
    """I2V (diffusers ``prepare_image_latents``): image -> (image_latents, fake_image_latents), each (B, C, 1, h, w)
    float32 and normalised. ``image`` is whatever :func:`helios_jax.io.media.preprocess_image` takes (path, PIL
    image, (H, W, 3) array, or a list of them); it is resized to (width, height). image_latents = sample of the
    image as a 1-frame video; fake_image_latents = last latent of the image repeated for one chunk
    ((chunk - 1) * 4 + 1 = 33 frames). Either latent given by the caller is kept and its encode (and draw)
    skipped. VAE posterior noise is drawn from ``noise_source`` in the reference order (image, then fake video)."""
    from helios_jax.io.media import preprocess_image
    if self.vae is None:
      raise InputError("image input needs a VAE to encode it; load one or pass image_latents and "
                       "fake_image_latents instead")
    pixels = jnp.asarray(preprocess_image(image, height, width, self.vae_scale_spatial))[:, :, None]  # (B,3,1,H,W)
    if image_latents is None:
      image_latents = self._encode_latents(pixels, noise_source)
    if fake_image_latents is None:
      min_frames = (layout.chunk - 1) * self.vae_scale_temporal + 1
      fake = self._encode_latents(jnp.repeat(pixels, min_frames, axis=2), noise_source)
      fake_image_latents = fake[:, :, -1:]
    return image_latents, fake_image_latents

  def _encode_video(self, video, height, width, layout, noise_source):
    """V2V (diffusers ``prepare_video_latents``): video -> (first_frame_latents (B, C, 1, h, w), video_latents
    (B, C, 9 * num_win, h, w)), float32 and normalised. ``video`` is whatever
    :func:`helios_jax.io.media.preprocess_video` takes (path, (F, H, W, 3) array, list of frames); it is resized to
    (width, height). Frame 0 is encoded alone; then num_win = F // 33 windows of 33 frames taken from the end
    (leading frames dropped), each encoded with a fresh causal cache, concatenated along time. VAE posterior noise
    is drawn from ``noise_source`` in the reference order (frame 0, then each window)."""
    from helios_jax.io.media import preprocess_video
    if self.vae is None:
      raise InputError("video input needs a VAE to encode it; load one or pass image_latents and video_latents "
                       "instead")
    pixels = preprocess_video(video, height, width, self.vae_scale_spatial)  # (B, 3, F, H, W) numpy
    num_frames = pixels.shape[2]
    min_frames = (layout.chunk - 1) * self.vae_scale_temporal + 1
    num_win = num_frames // min_frames
    if num_win == 0:
      raise InputError(f"the video has {num_frames} frames; V2V needs at least {min_frames} (one chunk of "
                       f"{layout.chunk} latent frames)")
    start = num_frames - num_win * min_frames
    first = self._encode_latents(pixels[:, :, 0:1], noise_source)
    windows = [self._encode_latents(pixels[:, :, start + i * min_frames:start + (i + 1) * min_frames], noise_source)
               for i in range(num_win)]
    return first, jnp.concatenate(windows, axis=2)
