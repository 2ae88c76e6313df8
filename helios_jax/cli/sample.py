"""Generate videos with Helios from the command line (T2V, I2V or V2V), written as H.264 mp4s (24 fps by default).

    python sample.py --mode t2v --model Helios-Distilled --prompt "A red fox runs through fresh snow"
    python sample.py --mode i2v --model Helios-Distilled --prompt "..." --image first_frame.jpg
    python sample.py --mode v2v --model Helios-Mid --prompt "..." --video clip.mp4 --out continued.mp4
    python sample.py --model Helios-Distilled --prompt-file prompts.txt --out runs/video.mp4     # one per line
    python sample.py --model Helios-Distilled --interactive-prompts story.csv --out runs/story.mp4  # one per id

``--model`` is a diffusers-format Helios folder (BestWishYsh/Helios-Base, -Mid or -Distilled on Hugging Face).
Defaults come from its ``model_index.json`` (:mod:`helios_jax.io.model_folder`): Distilled (``is_distilled``) ->
pyramid steps 2 2 2, guidance 1.0, amplified first chunk, 240 frames; Mid (``is_cfg_zero_star``) -> 20 20 20,
guidance 5.0 with CFG-Zero*, 99 frames; Base (``HeliosPipeline``) -> 50 steps, guidance 5.0, 99 frames; always
384x640 and seed 42.

Generation streams (``pipe.stream``): each 33-frame chunk is encoded into the mp4 as it arrives, with one progress
line per chunk (and the time left), so the video is never held in host memory whole; every line is flushed, so a
redirected log shows each start-up phase and chunk as it happens. An --image / --video of another size is fitted
to the generation size by ``--resize`` (stretch, as diffusers; crop; pad), with one line saying what was done.
``--prompt-file`` makes one video per line and ``--interactive-prompts`` one video per id of the official
interactive CSV (each prompt held ``--interpolate-time`` chunks, blended into the next over
``--interpolation-steps``); with several videos each gets its own numbered output, video i uses seed + i, and
outputs that already exist are skipped (``--overwrite`` replaces them).

Every user mistake (missing model folder or component, unreadable image, video or prompt file, a video shorter than
one 33-frame chunk, contradictory arguments, an unwritable output path, a bad dtype) ends with one line
``error: ...`` on stderr and exit status 2, before any model is loaded where possible; each mp4 and contact sheet
is written to a temporary name and renamed when complete, so nothing half-written is left behind.

A thin layer over :mod:`helios_jax` (``python sample.py`` in the repository root runs it); ``main(argv)`` returns
the exit status. The videos of a run are planned in :mod:`helios_jax.cli.jobs`, progress is printed by
:mod:`helios_jax.cli.progress`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from helios_jax import __version__
from helios_jax.compile_cache import default_cache_dir, enable_compile_cache
from helios_jax.errors import CheckpointError, HeliosError, InputError
from helios_jax.io import media
from helios_jax.io.model_folder import DEFAULT_HEIGHT, DEFAULT_WIDTH, DEMO_DIR, DTYPES, ModelPlan, bundled_demo, \
    inspect_model_folder, load_pipeline
from helios_jax.pipelines.base import trimmed_frames
from helios_jax.pipelines.prompts import OFFICIAL_INTERPOLATE_TIME, OFFICIAL_INTERPOLATION_STEPS, PromptSchedule
from helios_jax.cli.jobs import Job, _show, _writable_jobs, plan_jobs
from helios_jax.cli.progress import SHEET_FRAMES, _duration, _encoding_line, _eta, _print_summary, _report_chunk, \
    _SheetFrames, _step_progress_wanted, _StepReporter, _VideoStats  # noqa: F401

REAL_WEIGHTS = (
    "download the real weights in diffusers format from Hugging Face (BestWishYsh/Helios-Distilled for fast "
    "3-step sampling, BestWishYsh/Helios-Mid or BestWishYsh/Helios-Base), e.g. `huggingface-cli download "
    "BestWishYsh/Helios-Distilled --local-dir Helios-Distilled`, then pass --model Helios-Distilled")
DEMO_MISSING = "no --model given, and the bundled demo model is missing from this installation: " + REAL_WEIGHTS
DEFAULT_SEED = 42
MAX_SEQUENCE_LENGTH = 512
LONG_VIDEO_FRAMES = 1452  # 44 chunks, a minute of video at 24 fps: longer videos get a warning on a CPU

# How the library's messages name the settings on this command line.
OPTION_NAMES = {"height": "--height", "width": "--width", "steps": "--steps", "guidance": "--guidance",
                "num_frames": "--num-frames", "dtype": "--dtype", "prompt": "--prompt",
                "prompt_embeds": "--prompt-embeds PATH.npy"}

ChunkHook = Callable[["Job", Any], None]  # (the video being made, a helios_jax.pipelines.StreamChunk)


class UsageError(HeliosError):
  """A command-line mistake (bad or contradictory arguments)."""


class _Parser(argparse.ArgumentParser):
  """argparse that raises instead of printing usage and exiting, so every mistake is one ``error:`` line."""

  def error(self, message):
    raise UsageError(message)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Appends "(default: X)" only where there is a default to show and the help text does not already say it."""

  def _get_help_string(self, action: argparse.Action) -> str:
    text = action.help or ""
    if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
      return text
    return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="sample.py", description="Generate videos with Helios (JAX).", formatter_class=_HelpFormatter)
  p.add_argument("--version", action="version", version=f"%(prog)s (helios-jax {__version__})")
  p.add_argument("--mode", choices=("t2v", "i2v", "v2v"), default="t2v",
                 help="text-to-video, image-to-video (--image) or video-to-video continuation (--video)")
  p.add_argument("--model", help="diffusers-format Helios folder (model_index.json, transformer/, scheduler/, vae/, "
                                 "text_encoder/, tokenizer/); default: the small bundled demo model, with a "
                                 "bundled prompt, start image (i2v) and start video (v2v)")
  prompts = p.add_argument_group("prompts (one of --prompt, --prompt-embeds, --prompt-file, --interactive-prompts)")
  prompts.add_argument("--prompt", help="the text prompt (longer than 512 tokens: truncated, with a warning)")
  prompts.add_argument("--negative-prompt", help="negative prompt for guidance > 1 (default: empty)")
  prompts.add_argument("--prompt-embeds", metavar="PATH.npy",
                       help="precomputed prompt embeddings (L, D) or (1, L, D) instead of --prompt (for folders "
                            "without a text encoder)")
  prompts.add_argument("--negative-prompt-embeds", metavar="PATH.npy", help="precomputed negative prompt embeddings")
  prompts.add_argument("--prompt-file", metavar="FILE.txt",
                       help="one video per non-empty line of this UTF-8 text file (the official --prompt_txt_path); "
                            "with several lines the outputs are <--out stem>_000.mp4, _001, ... (numbered from 0 "
                            "in line order)")
  prompts.add_argument("--interactive-prompts", metavar="FILE.csv",
                       help="the official interactive CSV (--interactive_prompt_csv_path): columns id, "
                            "prompt_index, prompt and optionally refined_prompt (used where filled); one video per "
                            "id whose prompts follow each other in prompt_index order; with several ids the outputs "
                            "are <--out stem>_<id>.mp4")
  prompts.add_argument("--interpolate-time", type=int, metavar="CHUNKS",
                       help="--interactive-prompts: chunks (33 frames each) every prompt is held (default: "
                            f"{OFFICIAL_INTERPOLATE_TIME}, as the official script)")
  prompts.add_argument("--interpolation-steps", type=int, metavar="CHUNKS",
                       help="--interactive-prompts: chunks over which each new prompt is blended in, inside its own "
                            "--interpolate-time, with weights linspace(0, 1, N) as the official script (so its first "
                            "chunk is still the previous prompt; 0 switches at once) (default: "
                            f"{OFFICIAL_INTERPOLATION_STEPS})")
  p.add_argument("--image", help="I2V: the first frame (any image file Pillow reads)")
  p.add_argument("--video", help="V2V: the video to continue (any file FFmpeg reads; >= 33 frames)")
  p.add_argument("--resize", choices=media.RESIZE_MODES, default="stretch",
                 help="how an --image / --video of another size is fitted to --width x --height: stretch (resize "
                      "to exactly that size, as diffusers does; the aspect ratio may change), crop (centre-crop to "
                      "the target aspect ratio, then resize) or pad (pad to it with --pad-fill, then resize)")
  p.add_argument("--pad-fill", choices=media.PAD_FILLS,
                 help="--resize pad: the border's colour, black or the image's edge pixels repeated (default: "
                      "black)")
  p.add_argument("--num-frames", type=int, help="frames to generate (rounded up to 33-frame chunks, then trimmed to "
                                                "4k+1); default 240 for Distilled, 99 otherwise, and with "
                                                "--interactive-prompts the schedule's length")
  p.add_argument("--height", type=int, help=f"frame height (default: the model folder's, else {DEFAULT_HEIGHT})")
  p.add_argument("--width", type=int, help=f"frame width (default: the model folder's, else {DEFAULT_WIDTH})")
  p.add_argument("--steps", type=int, nargs="+", metavar="N",
                 help="pyramid: one step count per stage (e.g. 2 2 2); plain (Base): one count (default: the "
                      "model folder's)")
  p.add_argument("--guidance", type=float,
                 help="classifier-free guidance scale, 1 disables it (default: the model folder's)")
  p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                 help="random seed of the (first) video; with --prompt-file or --interactive-prompts video i of the "
                      "file (counted from 0) uses seed + i")
  p.add_argument("--out", default="out.mp4", help="output video (.mp4)")
  p.add_argument("--overwrite", action="store_true",
                 help="with --prompt-file or --interactive-prompts, replace outputs that already exist (without it "
                      "they are skipped, so an interrupted run can be resumed); a --prompt or --prompt-embeds run always replaces --out")
  p.add_argument("--fps", type=int, default=media.DEFAULT_FPS, help="frame rate of the mp4 (playback only)")
  p.add_argument("--dtype", choices=DTYPES,
                 help="transformer and text-encoder dtype (the VAE always runs in fp32); default: the model "
                      "folder's, else bf16")
  p.add_argument("--contact-sheet", metavar="PATH.png",
                 help=f"also write a PNG grid of {SHEET_FRAMES} evenly spaced frames (default: none, with the "
                      "bundled demo <--out stem>.png); numbered like --out when there are several videos")
  p.add_argument("--mesh", metavar="AXIS=N,...",
                 help="run the transformer on several devices, e.g. data=2,sequence=4: data=2 puts the CFG "
                      "branches on two devices, sequence=N splits attention over tokens, fsdp=N splits the weights "
                      "(docs/scaling.md); streams like a one-device run")
  p.add_argument("--unstack-layers", action="store_true",
                 help="run the transformer blocks from per-layer weight arrays: ~3%% faster forwards on a GPU, "
                      "~4x longer compilation (docs/benchmarks.md); not with --mesh")
  p.add_argument("--quantization", choices=("none", "fp8"), default="none",
                 help="fp8: the transformer blocks' linear weights in float8_e4m3fn with per-channel scales, "
                      "activations scaled per tensor (Hopper GPUs run cuBLASLt FP8 GEMMs: 1.27x the FPS of bf16 "
                      "at 14B on an H200, 2.7%% relative error per forward; docs/benchmarks.md); emulated, and "
                      "slower, on a CPU")
  p.add_argument("--compile-cache", metavar="DIR|none", default=None,
                 help="JAX's persistent compilation cache: a later run with the same shapes skips most compilation "
                      "(default: $HELIOS_JAX_COMPILE_CACHE, else $JAX_COMPILATION_CACHE_DIR when set, else "
                      f"{default_cache_dir()}; 'none' turns it off)")
  p.add_argument("--offload", action="store_true",
                 help="low-VRAM mode: the transformer blocks' weights stay in pinned host memory and each layer is "
                      "brought to the device inside the forward one layer ahead of its use, overlapped with compute "
                      "(the official --enable_low_vram_mode; same frames, docs/sample.md); with --free-text-encoder "
                      "the text encoder is also gone before sampling; not with --mesh")
  p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                 help="a LoRA adapter (file or folder; helios_jax.pipelines.lora) applied with weight SCALE "
                      "(default 1); repeat for several, all active together")
  p.add_argument("--crf", type=int, default=18,
                 help="H.264 quality of the mp4: 0 lossless .. 51 worst (18: visually near lossless)")
  p.add_argument("--frames-dir", metavar="DIR",
                 help="also write every frame as a PNG, DIR/<--out stem>/00000.png, 00001.png, ... as it is made")
  p.add_argument("--free-text-encoder", action="store_true",
                 help="encode the prompts first, then free the text encoder (UMT5-XXL, ~11 GB) before loading "
                      "the transformer")
  return p


# ------------------------------------------------------------------------------------------------------------
# Checks that need no model


def _check_prompt_sources(args) -> None:
  """Exactly one of --prompt, --prompt-embeds, --prompt-file, --interactive-prompts, and what goes with each;
  fills in the --interpolate-time / --interpolation-steps defaults."""
  given = [name for name, value in (("--prompt", args.prompt is not None), ("--prompt-embeds", args.prompt_embeds),
                                    ("--prompt-file", args.prompt_file),
                                    ("--interactive-prompts", args.interactive_prompts)) if value]
  if len(given) > 1:
    raise UsageError(f"pass {given[0]} or {given[1]}, not both")
  if not given:
    raise UsageError("pass --prompt \"...\" (or --prompt-embeds PATH.npy, --prompt-file FILE.txt or "
                     "--interactive-prompts FILE.csv)")
  if args.negative_prompt is not None and args.negative_prompt_embeds:
    raise UsageError("pass --negative-prompt or --negative-prompt-embeds, not both")
  if args.negative_prompt_embeds and not args.prompt_embeds:
    raise UsageError("--negative-prompt-embeds goes with --prompt-embeds; with --prompt use --negative-prompt")
  for flag, value in (("--interpolate-time", args.interpolate_time),
                      ("--interpolation-steps", args.interpolation_steps)):
    if value is not None and not args.interactive_prompts:
      raise UsageError(f"{flag} goes with --interactive-prompts FILE.csv")
  if args.interactive_prompts:
    hold = OFFICIAL_INTERPOLATE_TIME if args.interpolate_time is None else args.interpolate_time
    blend = OFFICIAL_INTERPOLATION_STEPS if args.interpolation_steps is None else args.interpolation_steps
    if hold < 1:
      raise UsageError(f"--interpolate-time must be at least 1 chunk, got {hold}")
    if blend < 0:
      raise UsageError(f"--interpolation-steps must be >= 0, got {blend}")
    if blend > hold:
      raise UsageError(f"--interpolation-steps ({blend}) must not exceed --interpolate-time ({hold}): each new "
                       "prompt is blended in within the chunks it is held")
    args.interpolate_time, args.interpolation_steps = hold, blend


def _check_arguments(args) -> None:
  if args.mode == "t2v" and (args.image or args.video):
    raise UsageError(f"--mode t2v takes no {'--image' if args.image else '--video'}; use --mode "
                     f"{'i2v' if args.image else 'v2v'}")
  if args.mode == "i2v":
    if args.video:
      raise UsageError("--mode i2v takes --image, not --video (use --mode v2v to continue a video)")
    if not args.image:
      raise UsageError("--mode i2v needs --image PATH")
  if args.mode == "v2v":
    if args.image:
      raise UsageError("--mode v2v takes --video, not --image (use --mode i2v to start from an image)")
    if not args.video:
      raise UsageError("--mode v2v needs --video PATH")
  _check_prompt_sources(args)
  if not args.out.lower().endswith(".mp4"):
    raise UsageError(f"--out must name an .mp4 file, got {args.out}")
  if args.fps < 1:
    raise UsageError(f"--fps must be positive, got {args.fps}")
  if args.offload and args.mesh:
    raise UsageError("--offload is a one-device option; leave it out with --mesh")
  from helios_jax.pipelines.lora import parse_lora_arg
  args.lora = [parse_lora_arg(text) for text in args.lora]  # (path, scale) pairs; a bad one is an InputError
  for path, _ in args.lora:
    if not os.path.exists(path):
      raise InputError(f"LoRA not found: {path}")
  if not 0 <= args.crf <= 51:  # libx264's CRF range
    raise UsageError(f"--crf must be between 0 and 51, got {args.crf}")
  if args.unstack_layers and args.mesh:
    raise UsageError("--unstack-layers is a one-device option; leave it out with --mesh")
  if args.contact_sheet and not args.contact_sheet.lower().endswith(".png"):
    raise UsageError(f"--contact-sheet must name a .png file, got {args.contact_sheet}")
  if args.pad_fill is not None and args.resize != "pad":
    raise UsageError("--pad-fill goes with --resize pad")
  if args.resize != "stretch" and not (args.image or args.video):
    raise UsageError(f"--resize {args.resize} fits an --image or --video; this {args.mode} run has neither")
  args.pad_fill = args.pad_fill or "black"


def _use_demo(args) -> None:
  """No --model: the bundled demo model, and its bundled prompt / start image / start video where not given."""
  try:
    demo = bundled_demo(DEMO_DIR)
  except CheckpointError:
    raise UsageError(DEMO_MISSING) from None
  args.model = demo.model
  if args.prompt is None and not (args.prompt_embeds or args.prompt_file or args.interactive_prompts):
    args.prompt = demo.prompts[args.mode]
  if args.mode == "i2v" and not args.image and not args.video:
    args.image = demo.image
  if args.mode == "v2v" and not args.video and not args.image:
    args.video = demo.video
  if args.contact_sheet is None:
    args.contact_sheet = os.path.splitext(args.out)[0] + ".png"
  print(f"no --model given: using the bundled demo model ({_show(demo.model)}), a small Helios trained on "
        f"procedural scenes of moving shapes (model card: {_show(demo.model_card)}). "
        f"For real videos, {REAL_WEIGHTS}.", flush=True)
  inputs = (f", start image {_show(args.image)}" if args.image else "") + \
      (f", start video {_show(args.video)}" if args.video else "")
  if args.prompt is not None:
    print(f"prompt: {args.prompt!r}{inputs}", flush=True)
  elif inputs:
    print(inputs[2:], flush=True)


def _inspect_model(args, needs_text_encoder: bool) -> ModelPlan:
  """Reads the model folder's configs (no weights) and resolves the defaults of the settings not given."""
  plan = inspect_model_folder(args.model, height=args.height, width=args.width, dtype=args.dtype, steps=args.steps,
                              guidance=args.guidance, num_frames=args.num_frames,
                              needs_text_encoder=needs_text_encoder, option_names=OPTION_NAMES)
  if plan.guidance > 1 and args.prompt_embeds and not args.negative_prompt_embeds and not plan.has_text_encoder:
    raise UsageError(f"--guidance {plan.guidance:g} > 1 needs --negative-prompt-embeds (this model folder has no "
                     "text encoder to encode an empty negative prompt)")
  return plan


def _load_embeds(path: str, what: str, text_dim: int) -> np.ndarray:
  if not os.path.isfile(path):
    raise InputError(f"{what} file not found: {path}")
  try:
    arr = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise InputError(f"cannot read {what} {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
        from None
  if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.floating):
    raise InputError(f"{what} {path} must hold one floating-point array")
  if arr.ndim == 2:
    arr = arr[None]
  if arr.ndim != 3 or arr.shape[0] != 1 or arr.shape[-1] != text_dim:
    raise InputError(f"{what} {path} must have shape (L, {text_dim}) or (1, L, {text_dim}), got {arr.shape}")
  return arr.astype(np.float32)


def _fit_note(what: str, src: tuple[int, int], plan: ModelPlan, args) -> None:
  """Refuses a tiny input; says in one line how an input of another size is fitted to the generation size."""
  media.check_input_size(src, what)
  note = media.resize_note(src, (plan.width, plan.height), args.resize, args.pad_fill)
  if note is None:
    return
  hint = " (--resize crop or pad keeps its aspect ratio)" if " is stretched to " in note else ""
  print(f"{what}: {note}{hint}", flush=True)


def _read_inputs(args, plan: ModelPlan) -> dict:
  """Opens the image / video / embeddings (validating them) before any model is loaded; says how an image or
  video of another size is fitted to the generation size (``--resize``)."""
  out = {}
  if args.image:
    image = media.load_image(args.image)
    _fit_note(f"start image {_show(args.image)}", image.size, plan, args)
    # stretch: the pipeline's own (diffusers-identical) resize; crop / pad: fitted here to exactly the size, which
    # the pipeline then leaves as it is.
    out["image"] = image if args.resize == "stretch" else \
        media.fit_image(image, plan.width, plan.height, args.resize, args.pad_fill)
  if args.video:
    _fit_note(f"start video {_show(args.video)}", media.video_frame_size(args.video), plan, args)
    frames = media.read_video(args.video, size=(plan.width, plan.height), resize=args.resize,
                              pad_fill=args.pad_fill)
    if frames.shape[0] < plan.window:
      raise InputError(f"video {args.video} has {frames.shape[0]} frames; V2V needs at least {plan.window} "
                       f"(one chunk)")
    out["video"] = frames
  if args.prompt_embeds:
    out["prompt_embeds"] = _load_embeds(args.prompt_embeds, "prompt embeddings", plan.text_dim)
  if args.negative_prompt_embeds:
    out["negative_prompt_embeds"] = _load_embeds(args.negative_prompt_embeds, "negative prompt embeddings",
                                                 plan.text_dim)
  return out


# ------------------------------------------------------------------------------------------------------------
# The videos of a run: one, or one per prompt-file line / interactive-CSV id


# ------------------------------------------------------------------------------------------------------------
# The run


def _encode_texts_then_free(model: str, plan: ModelPlan, texts: Sequence[str], negative: str | None
                            ) -> tuple[dict[str, Any], Any]:
  """--free-text-encoder: UMT5 alone -> ({text: (1, L, D) embeddings}, negative embeddings or None), then drop
  it."""
  from helios_jax.models.tokenizer import encode_prompt, load_tokenizer
  from helios_jax.models.umt5 import UMT5EncoderModel
  encoder = UMT5EncoderModel.from_pretrained(os.path.join(model, "text_encoder"), dtype=plan.jax_dtype)
  tokenizer = load_tokenizer(os.path.join(model, "tokenizer"))
  embeds = {text: encode_prompt(encoder, tokenizer, [text], max_sequence_length=MAX_SEQUENCE_LENGTH)
            for text in dict.fromkeys(texts)}
  ne = None
  if plan.guidance > 1:
    ne = encode_prompt(encoder, tokenizer, [negative or ""], max_sequence_length=MAX_SEQUENCE_LENGTH)
  import jax
  jax.block_until_ready((embeds, ne))
  del encoder
  gc.collect()
  return embeds, ne


class _PromptArguments:
  """The prompt keywords of each video's pipeline call: text, embeddings encoded up front (--free-text-encoder),
  or --prompt-embeds; also whether the pipeline needs its text encoder."""

  def __init__(self, args, plan: ModelPlan, jobs: list[Job], inputs: dict):
    self._args = args
    self._embeds: dict[str, Any] | None = None
    self._negative = None
    self._inputs = inputs
    self.encode_s = 0.0  # seconds spent encoding up front
    uses_text = args.prompt_embeds is None
    if uses_text and args.free_text_encoder:
      t0 = time.perf_counter()
      texts = [t for job in jobs for t in (job.schedule.prompts if job.schedule else (job.prompt,))]
      n = len(dict.fromkeys(texts))
      print(f"encoding {n} prompt{'s' if n != 1 else ''} with the text encoder, then freeing it ...", flush=True)
      self._embeds, self._negative = _encode_texts_then_free(args.model, plan, texts, args.negative_prompt)
      self.encode_s = time.perf_counter() - t0
      self.load_text_encoder = False
    elif uses_text:
      self.load_text_encoder = True
    else:
      self.load_text_encoder = plan.guidance > 1 and "negative_prompt_embeds" not in inputs

  def __call__(self, job: Job) -> dict:
    if self._args.prompt_embeds:
      return dict(prompt_embeds=self._inputs["prompt_embeds"],
                  negative_prompt_embeds=self._inputs.get("negative_prompt_embeds"))
    if self._embeds is None:
      first = dict(prompt_schedule=job.schedule) if job.schedule else dict(prompt=job.prompt)
      return dict(negative_prompt=self._args.negative_prompt, **first)
    if job.schedule:
      s = job.schedule
      first = dict(prompt_schedule=PromptSchedule(prompts=tuple(self._embeds[t] for t in s.prompts), chunks=s.chunks,
                                                  interpolation_steps=s.interpolation_steps))
    else:
      first = dict(prompt_embeds=self._embeds[job.prompt])
    return dict(negative_prompt_embeds=self._negative, **first)


def _make_video(pipe, call: dict, job: Job, plan: ModelPlan, fps: int, on_chunk: ChunkHook | None,
                compiles: bool = True, crf: int = 18, frames_dir: str | None = None) -> _VideoStats:
  """Streams one video into ``job.out`` (and its contact sheet), chunk by chunk; returns its statistics. Prints
  (flushed) a line as it encodes the inputs, one as the first chunk starts (``compiles``: it compiles the
  programs), and one per chunk with the time left."""
  stats = _VideoStats()
  t_call = time.perf_counter()
  line = _encoding_line(call)
  if line:
    print(line, flush=True)
  with pipe.stream(**call) as stream:
    total = stream.num_frames
    sheet = _SheetFrames(total) if job.sheet else None
    stats.size = (stream.width, stream.height)
    print(f"generating chunk 1/{stream.num_chunks}" + (" (it includes compiling the model)" if compiles else "")
          + " ...", flush=True)

    def frames() -> Iterator[np.ndarray]:
      for chunk in stream:
        if chunk.index == 0:
          stats.first_chunk = time.perf_counter() - t_call
        stats.chunks.append(stats.first_chunk if chunk.index == 0 else chunk.timings["interval_s"])
        _report_chunk(chunk, stream.num_chunks, stats.chunks[-1], job.schedule is not None,
                      _eta(stats.chunks, stream.num_chunks))
        if on_chunk is not None:
          on_chunk(job, chunk)
        if sheet is not None:
          sheet.offer(chunk.first_frame, chunk.frames)
        stats.frames += len(chunk.frames)
        yield from chunk.frames

    def with_pngs(source: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
      for i, frame in enumerate(source):
        media.write_png_frame(os.path.join(frames_dir, f"{i:05d}.png"), frame)
        yield frame

    media.write_video(job.out, with_pngs(frames()) if frames_dir else frames(), fps=fps, crf=crf)
  if sheet is not None:
    media.write_contact_sheet(job.sheet, sheet.frames(), num=SHEET_FRAMES)
  stats.total = time.perf_counter() - t_call
  return stats


def _describe(args, plan: ModelPlan, job: Job, position: str) -> str:
  """The line printed before a video: model kind, mode, frames, size, sampler settings, seed, dtype."""
  if job.schedule is not None and args.num_frames is None:
    frames = f"{trimmed_frames(job.schedule.total_chunks, plan.window, plan.temporal)} frames " \
             f"({len(job.schedule.prompts)} prompts, {job.schedule.total_chunks} chunks)"
  else:
    frames = f"{plan.num_frames} frames"
  head = f"{position}{job.label}: " if job.label else position
  return (f"{head}Helios-{plan.kind} {args.mode}: {frames} at {plan.width}x{plan.height}, steps "
          f"{' '.join(map(str, plan.steps))}, guidance {plan.guidance:g}, seed {job.seed}, {plan.dtype}"
          + (f"\n  prompt: {job.prompt!r}" if job.label and job.prompt else ""))


def _job_length(args, plan: ModelPlan, job: Job) -> tuple[int, int]:
  """(chunks, frames) of a video: ``--num-frames`` (or the schedule's length) in whole chunks, trimmed to 4k+1."""
  if job.schedule is not None and args.num_frames is None:
    chunks = job.schedule.total_chunks
  else:
    chunks = max(1, math.ceil(plan.num_frames / plan.window))
  return chunks, trimmed_frames(chunks, plan.window, plan.temporal)


def _length_line(args, plan: ModelPlan, job: Job) -> str:
  """The line before a video is generated: its chunks, frames and duration at --fps, and that memory stays flat."""
  chunks, frames = _job_length(args, plan, job)
  asked = ""
  if (job.schedule is None or args.num_frames is not None) and frames != plan.num_frames:
    asked = f" ({plan.num_frames} asked for, in whole chunks trimmed to 4k+1)"
  return (f"  {chunks} chunk{'s' if chunks != 1 else ''} of {plan.window} frames: {frames} frames{asked}, "
          f"{_duration(frames / args.fps)} of video at {args.fps} fps; memory stays flat (each chunk is written "
          "to the mp4 as it is made)")


def _warn_if_long(args, plan: ModelPlan, jobs: list[Job]) -> None:
  """One warning line, before the model is loaded, when a video is longer than ``LONG_VIDEO_FRAMES`` and JAX runs on
  the CPU."""
  chunks, frames = max(_job_length(args, plan, job) for job in jobs)
  if frames <= LONG_VIDEO_FRAMES:
    return
  import jax
  if jax.default_backend() != "cpu":
    return
  print(f"warning: {frames} frames ({chunks} chunks{', the longest video' if len(jobs) > 1 else ''}) will take long "
        "on a CPU: every chunk runs the whole model; each chunk's line says how long the rest takes",
        file=sys.stderr, flush=True)


def _run(argv: Sequence[str] | None, on_chunk: ChunkHook | None = None) -> int:
  args = build_parser().parse_args(argv)
  if not args.model:
    _use_demo(args)
  _check_arguments(args)
  enable_compile_cache(args.compile_cache)
  mesh_shape = None
  if args.mesh:
    from helios_jax.parallel.mesh import parse_mesh
    mesh_shape = parse_mesh(args.mesh)
  batch = bool(args.prompt_file or args.interactive_prompts)
  jobs = _writable_jobs(plan_jobs(args), batch, args.overwrite)
  plan = _inspect_model(args, needs_text_encoder=args.prompt_embeds is None)
  inputs = _read_inputs(args, plan)
  if not jobs:
    print("nothing to do: every output exists (pass --overwrite to replace them)")
    return 0

  _warn_if_long(args, plan, jobs)
  prompt_args = _PromptArguments(args, plan, jobs, inputs)
  t0 = time.perf_counter()
  print(f"loading the model from {_show(args.model)} ...", flush=True)
  pipe = load_pipeline(args.model, plan, load_text_encoder=prompt_args.load_text_encoder,
                       quantization=args.quantization)
  for path, scale in args.lora:
    name = pipe.load_lora_weights(path, scale=scale)
    print(f"LoRA {name}: {_show(path)} at scale {scale:g}", flush=True)
  if args.unstack_layers:
    pipe.unstack_transformer_layers()
  if args.offload:
    kind = pipe.offload_transformer_layers()
    print(f"low-VRAM mode: the transformer blocks' weights are in {kind} memory, brought to the device layer by "
          "layer" if kind else "low-VRAM mode: this backend has no host memory space, so the weights stay on the "
          "device (same frames, no memory saved)", flush=True)
  load_s = time.perf_counter() - t0

  base = dict(image=inputs.get("image"), video=inputs.get("video"), max_sequence_length=MAX_SEQUENCE_LENGTH,
              **plan.pipeline_kwargs())
  done = 0
  with contextlib.ExitStack() as scope:
    if mesh_shape is not None:
      from helios_jax.parallel.mesh import make_mesh
      from helios_jax.parallel.sampling import on_mesh
      scope.enter_context(on_mesh(pipe, make_mesh(mesh_shape)))
    for i, job in enumerate(jobs):
      call = dict(base, seed=job.seed, **prompt_args(job))
      if _step_progress_wanted():
        call["step_progress"] = _StepReporter()
      if job.schedule is not None and args.num_frames is None:
        call["num_frames"] = None  # the schedule's length
      print(_describe(args, plan, job, f"[{i + 1}/{len(jobs)}] " if len(jobs) > 1 else ""), flush=True)
      print(_length_line(args, plan, job), flush=True)
      try:
        frames_dir = None
        if args.frames_dir:
          frames_dir = os.path.join(args.frames_dir, os.path.splitext(os.path.basename(job.out))[0])
          os.makedirs(frames_dir, exist_ok=True)
        stats = _make_video(pipe, call, job, plan, args.fps, on_chunk, i == 0, crf=args.crf, frames_dir=frames_dir)
      except KeyboardInterrupt:
        kept = f"; the {done} finished video{'s' if done != 1 else ''} before it {'are' if done != 1 else 'is'} kept"
        raise KeyboardInterrupt(f"interrupted; {job.out} was not written" + (kept if done else "")) from None
      _print_summary(job, stats, plan, args.fps, load_s if i == 0 else 0.0,
                     prompt_args.encode_s if i == 0 else 0.0)
      done += 1
  return 0


def main(argv: Sequence[str] | None = None, on_chunk: ChunkHook | None = None) -> int:
  """Runs the command line; returns the exit status (0 ok, 2 user mistake, 130 interrupted).

  ``on_chunk(job, chunk)``, if given, sees every :class:`~helios_jax.pipelines.StreamChunk` as it arrives (before
  it is written), with the :class:`Job` (output path, seed, prompt) it belongs to.
  """
  try:
    return _run(argv, on_chunk)
  except HeliosError as e:
    msg = " ".join(str(e).split())
    print(f"error: {msg}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:
    print(f"error: {e.args[0] if e.args else 'interrupted; no output was written'}", file=sys.stderr)
    return 130
  except SystemExit as e:  # --help, --version
    return e.code if isinstance(e.code, int) else 0


if __name__ == "__main__":
  sys.exit(main())
