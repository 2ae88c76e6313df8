#!/usr/bin/env python
"""Generate a video with Helios from the command line (T2V, I2V or V2V), written as an H.264 mp4 at 24 fps.

    python sample.py --mode t2v --model Helios-Distilled --prompt "A red fox runs through fresh snow"
    python sample.py --mode i2v --model Helios-Distilled --prompt "..." --image first_frame.jpg
    python sample.py --mode v2v --model Helios-Mid --prompt "..." --video clip.mp4 --out continued.mp4

``--model`` is a diffusers-format Helios folder (BestWishYsh/Helios-Base, -Mid or -Distilled on Hugging Face).
Defaults come from its ``model_index.json``: Distilled (``is_distilled``) -> pyramid steps 2 2 2, guidance 1.0,
amplified first chunk, 240 frames; Mid (``is_cfg_zero_star``) -> 20 20 20, guidance 5.0 with CFG-Zero*, 99 frames;
Base (``HeliosPipeline``) -> 50 steps, guidance 5.0, 99 frames; always 384x640 and seed 42.

Every user mistake (missing model folder or component, unreadable image or video, a video shorter than one
33-frame chunk, contradictory arguments, an unwritable output path, a bad dtype) ends with one line
``error: ...`` on stderr and exit status 2, before any model is loaded where possible; the mp4 and the contact
sheet are written to a temporary name and renamed when complete, so nothing half-written is left behind.

This file is a thin layer over :mod:`helios_jax`; ``main(argv)`` returns the exit status (importable for tests).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

from helios_jax.errors import CheckpointError, HeliosError, InputError
from helios_jax.io.model_folder import DEFAULT_HEIGHT, DEFAULT_WIDTH, DEMO_DIR, ModelPlan, bundled_demo, \
    inspect_model_folder, load_pipeline

REAL_WEIGHTS = (
    "download the real weights in diffusers format from Hugging Face (BestWishYsh/Helios-Distilled for fast "
    "3-step sampling, BestWishYsh/Helios-Mid or BestWishYsh/Helios-Base), e.g. `huggingface-cli download "
    "BestWishYsh/Helios-Distilled --local-dir Helios-Distilled`, then pass --model Helios-Distilled")
DEMO_MISSING = "no --model given, and the bundled demo model is missing from this installation: " + REAL_WEIGHTS
DEFAULT_SEED = 42
MAX_SEQUENCE_LENGTH = 512


class UsageError(HeliosError):
  """A command-line mistake (bad or contradictory arguments)."""


class _Parser(argparse.ArgumentParser):
  """argparse that raises instead of printing usage and exiting, so every mistake is one ``error:`` line."""

  def error(self, message):
    raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="sample.py", description="Generate a video with Helios (JAX).",
              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--mode", choices=("t2v", "i2v", "v2v"), default="t2v",
                 help="text-to-video, image-to-video (--image) or video-to-video continuation (--video)")
  p.add_argument("--model", help="diffusers-format Helios folder (model_index.json, transformer/, scheduler/, vae/, "
                                 "text_encoder/, tokenizer/); default: the small bundled demo model, with a "
                                 "bundled prompt, start image (i2v) and start video (v2v)")
  p.add_argument("--prompt", help="the text prompt (longer than 512 tokens: truncated, with a warning)")
  p.add_argument("--negative-prompt", help="negative prompt for guidance > 1 (default: empty)")
  p.add_argument("--prompt-embeds", metavar="PATH.npy",
                 help="precomputed prompt embeddings (L, D) or (1, L, D) instead of --prompt (for folders without "
                      "a text encoder)")
  p.add_argument("--negative-prompt-embeds", metavar="PATH.npy", help="precomputed negative prompt embeddings")
  p.add_argument("--image", help="I2V: the first frame (any image file Pillow reads)")
  p.add_argument("--video", help="V2V: the video to continue (any file FFmpeg reads; >= 33 frames)")
  p.add_argument("--num-frames", type=int, help="frames to generate (rounded up to 33-frame chunks, then trimmed to "
                                                "4k+1); default 240 for Distilled, 99 otherwise")
  p.add_argument("--height", type=int, help=f"frame height (default: the model folder's, else {DEFAULT_HEIGHT})")
  p.add_argument("--width", type=int, help=f"frame width (default: the model folder's, else {DEFAULT_WIDTH})")
  p.add_argument("--steps", type=int, nargs="+", metavar="N",
                 help="pyramid: one step count per stage (e.g. 2 2 2); plain (Base): one count")
  p.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 disables it)")
  p.add_argument("--seed", type=int, default=DEFAULT_SEED)
  p.add_argument("--out", default="out.mp4", help="output video (.mp4)")
  p.add_argument("--dtype", choices=("bf16", "fp32"),
                 help="transformer and text-encoder dtype (the VAE always runs in fp32); default: the model "
                      "folder's, else bf16")
  p.add_argument("--contact-sheet", metavar="PATH.png", help="also write a PNG grid of 8 evenly spaced frames")
  p.add_argument("--mesh", metavar="AXIS=N,...",
                 help="run the transformer on several devices, e.g. data=2,sequence=4: data=2 puts the CFG "
                      "branches on two devices, sequence=N splits attention over tokens, fsdp=N splits the weights "
                      "(docs/scaling.md)")
  p.add_argument("--unstack-layers", action="store_true",
                 help="run the transformer blocks from per-layer weight arrays: ~3%% faster forwards on a GPU, "
                      "~4x longer compilation (docs/benchmarks.md); not with --mesh")
  p.add_argument("--compile-cache", metavar="DIR|none", default=None,
                 help="JAX's persistent compilation cache: a later run with the same shapes skips most compilation "
                      "(default: $HELIOS_JAX_COMPILE_CACHE, else $JAX_COMPILATION_CACHE_DIR when set, else "
                      f"{_default_cache_dir()}; 'none' turns it off)")
  p.add_argument("--free-text-encoder", action="store_true",
                 help="encode the prompts first, then free the text encoder (UMT5-XXL, ~11 GB) before loading "
                      "the transformer")
  return p


def _default_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "helios_jax", "xla")


def _enable_compile_cache(choice: str | None) -> str | None:
  """Points JAX's persistent compilation cache at ``choice`` (or the default, see ``--compile-cache``); returns the
  folder used, None when off. Programs that compile in under half a second are not stored. A folder that cannot
  be created is a warning, not an error: the run compiles as before."""
  choice = choice or os.environ.get("HELIOS_JAX_COMPILE_CACHE") or ""
  if choice.lower() == "none":
    return None
  if not choice and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]  # JAX reads it itself
  path = os.path.abspath(os.path.expanduser(choice or _default_cache_dir()))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    print(f"warning: compilation cache {path} unusable ({e.strerror}); compiling without it", file=sys.stderr)
    return None
  import jax
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return path


# ------------------------------------------------------------------------------------------------------------
# Checks that need no model


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
  if args.prompt is not None and args.prompt_embeds:
    raise UsageError("pass --prompt or --prompt-embeds, not both")
  if args.prompt is None and not args.prompt_embeds:
    raise UsageError("pass --prompt \"...\" (or --prompt-embeds PATH.npy)")
  if args.negative_prompt is not None and args.negative_prompt_embeds:
    raise UsageError("pass --negative-prompt or --negative-prompt-embeds, not both")
  if args.negative_prompt_embeds and not args.prompt_embeds:
    raise UsageError("--negative-prompt-embeds goes with --prompt-embeds; with --prompt use --negative-prompt")
  if not args.out.lower().endswith(".mp4"):
    raise UsageError(f"--out must name an .mp4 file, got {args.out}")
  if args.unstack_layers and args.mesh:
    raise UsageError("--unstack-layers is a one-device option; leave it out with --mesh")
  if args.contact_sheet and not args.contact_sheet.lower().endswith(".png"):
    raise UsageError(f"--contact-sheet must name a .png file, got {args.contact_sheet}")


# How the library's messages name the settings on this command line.
OPTION_NAMES = {"height": "--height", "width": "--width", "steps": "--steps", "guidance": "--guidance",
                "num_frames": "--num-frames", "dtype": "--dtype", "prompt": "--prompt",
                "prompt_embeds": "--prompt-embeds PATH.npy"}


def _use_demo(args) -> None:
  """No --model: the bundled demo model, and its bundled prompt / start image / start video where not given."""
  try:
    demo = bundled_demo(DEMO_DIR)
  except CheckpointError:
    raise UsageError(DEMO_MISSING) from None
  args.model = demo.model
  if args.prompt is None and not args.prompt_embeds:
    args.prompt = demo.prompts[args.mode]
  if args.mode == "i2v" and not args.image and not args.video:
    args.image = demo.image
  if args.mode == "v2v" and not args.video and not args.image:
    args.video = demo.video
  if args.contact_sheet is None:
    args.contact_sheet = os.path.splitext(args.out)[0] + ".png"
  show = lambda p: os.path.relpath(p) if not os.path.relpath(p).startswith("..") else p
  print(f"no --model given: using the bundled demo model ({show(demo.model)}), a small Helios trained on "
        f"procedural scenes of moving shapes (model card: {show(demo.model_card)}). "
        f"For real videos, {REAL_WEIGHTS}.", flush=True)
  print(f"prompt: {args.prompt!r}" + (f", start image {show(args.image)}" if args.image else "")
        + (f", start video {show(args.video)}" if args.video else ""), flush=True)


def _inspect_model(args) -> ModelPlan:
  """Reads the model folder's configs (no weights) and resolves the defaults of the settings not given."""
  plan = inspect_model_folder(args.model, height=args.height, width=args.width, dtype=args.dtype, steps=args.steps,
                              guidance=args.guidance, num_frames=args.num_frames,
                              needs_text_encoder=args.prompt is not None, option_names=OPTION_NAMES)
  if plan.guidance > 1 and args.prompt_embeds and not args.negative_prompt_embeds and not plan.has_text_encoder:
    raise UsageError(f"--guidance {plan.guidance:g} > 1 needs --negative-prompt-embeds (this model folder has no "
                     "text encoder to encode an empty negative prompt)")
  return plan


def _load_embeds(path: str, what: str, text_dim: int):
  import numpy as np
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


def _read_inputs(args, plan: ModelPlan) -> dict:
  """Opens the image / video / embeddings (validating them) before any model is loaded."""
  from helios_jax.io import media
  out = {}
  if args.image:
    out["image"] = media.load_image(args.image)
  if args.video:
    frames = media.read_video(args.video, size=(plan.width, plan.height))
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
# The run


def _encode_text_then_free(args, plan: ModelPlan):
  """--free-text-encoder: UMT5 alone -> (prompt_embeds, negative_prompt_embeds), then drop it."""
  from helios_jax.models.tokenizer import encode_prompt, load_tokenizer
  from helios_jax.models.umt5 import UMT5EncoderModel
  encoder = UMT5EncoderModel.from_pretrained(os.path.join(args.model, "text_encoder"), dtype=plan.jax_dtype)
  tokenizer = load_tokenizer(os.path.join(args.model, "tokenizer"))
  pe = encode_prompt(encoder, tokenizer, [args.prompt], max_sequence_length=MAX_SEQUENCE_LENGTH)
  ne = None
  if plan.guidance > 1:
    ne = encode_prompt(encoder, tokenizer, [args.negative_prompt or ""], max_sequence_length=MAX_SEQUENCE_LENGTH)
  import jax
  jax.block_until_ready((pe, ne))
  del encoder
  gc.collect()
  return pe, ne


def _run(argv) -> int:
  args = build_parser().parse_args(argv)
  if not args.model:
    _use_demo(args)
  _check_arguments(args)
  _enable_compile_cache(args.compile_cache)
  mesh_shape = None
  if args.mesh:
    from helios_jax.parallel.mesh import parse_mesh
    mesh_shape = parse_mesh(args.mesh)
  from helios_jax.io import media
  out_path = media.check_writable(args.out, "output video")
  sheet_path = media.check_writable(args.contact_sheet, "contact sheet") if args.contact_sheet else None
  plan = _inspect_model(args)
  inputs = _read_inputs(args, plan)

  print(f"Helios-{plan.kind} {args.mode}: {plan.num_frames} frames at {plan.width}x{plan.height}, steps "
        f"{' '.join(map(str, plan.steps))}, guidance {plan.guidance:g}, seed {args.seed}, {plan.dtype}",
        flush=True)
  timings = {}
  t0 = time.perf_counter()
  prompt_kw = {}
  if args.prompt is not None and args.free_text_encoder:
    prompt_kw["prompt_embeds"], prompt_kw["negative_prompt_embeds"] = _encode_text_then_free(args, plan)
    load_text = False
  elif args.prompt is not None:
    prompt_kw = dict(prompt=args.prompt, negative_prompt=args.negative_prompt)
    load_text = True
  else:
    prompt_kw = dict(prompt_embeds=inputs["prompt_embeds"],
                     negative_prompt_embeds=inputs.get("negative_prompt_embeds"))
    load_text = plan.guidance > 1 and "negative_prompt_embeds" not in inputs
  timings["text encoder"] = time.perf_counter() - t0 if args.free_text_encoder and args.prompt else 0.0
  t0 = time.perf_counter()
  pipe = load_pipeline(args.model, plan, load_text_encoder=load_text)
  if args.unstack_layers:
    pipe.unstack_transformer_layers()
  timings["load"] = time.perf_counter() - t0

  call = dict(seed=args.seed, output_type="np", progress=True, image=inputs.get("image"), video=inputs.get("video"),
              max_sequence_length=MAX_SEQUENCE_LENGTH, **plan.pipeline_kwargs(), **prompt_kw)
  if mesh_shape is None:
    out = pipe(**call)
  else:
    from helios_jax.parallel.mesh import make_mesh
    from helios_jax.parallel.sampling import on_mesh
    with on_mesh(pipe, make_mesh(mesh_shape)):
      out = pipe(**call)
  frames = out.frames[0]

  t0 = time.perf_counter()
  media.write_video(out_path, frames, fps=media.DEFAULT_FPS)
  if sheet_path:
    media.write_contact_sheet(sheet_path, frames)
  timings["write"] = time.perf_counter() - t0

  t = out.timings
  chunks = t.get("chunks", [])
  n = frames.shape[0]
  gen = t.get("total", sum(chunks))
  print(f"wrote {out_path}: {n} frames, {frames.shape[2]}x{frames.shape[1]}, {media.DEFAULT_FPS} fps "
        f"({n / media.DEFAULT_FPS:.1f} s of video)")
  if sheet_path:
    print(f"wrote {sheet_path}")
  steady = ""
  if len(chunks) > 1:
    mean_rest = sum(chunks[1:]) / (len(chunks) - 1)
    steady = f"; after the first chunk {plan.window / mean_rest:.2f} frames/s ({mean_rest:.2f} s per chunk)"
  print(f"timings: load {timings['load']:.1f} s"
        + (f", text encoder {timings['text encoder']:.1f} s" if timings["text encoder"] else "")
        + f", text {t.get('text', 0.0):.2f} s, {len(chunks)} chunk{'s' if len(chunks) != 1 else ''} "
        f"(first {chunks[0] if chunks else 0.0:.2f} s incl. compilation), decode {t.get('decode', 0.0):.2f} s, "
        f"generation {gen:.1f} s, write {timings['write']:.1f} s")
  print(f"speed: {n / gen:.2f} frames/s end to end (generation incl. compilation){steady}")
  return 0


def main(argv=None) -> int:
  """Runs the command line; returns the exit status (0 ok, 2 user mistake, 130 interrupted)."""
  try:
    return _run(argv)
  except HeliosError as e:
    msg = " ".join(str(e).split())
    print(f"error: {msg}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted; no output was written", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
