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

REAL_WEIGHTS = (
    "download the real weights in diffusers format from Hugging Face (BestWishYsh/Helios-Distilled for fast "
    "3-step sampling, BestWishYsh/Helios-Mid or BestWishYsh/Helios-Base), e.g. `huggingface-cli download "
    "BestWishYsh/Helios-Distilled --local-dir Helios-Distilled`, then pass --model Helios-Distilled")
DEMO_MISSING = "no --model given, and the bundled demo model is missing from this installation: " + REAL_WEIGHTS
DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helios_jax", "assets", "demo")
DEFAULT_HEIGHT, DEFAULT_WIDTH, DEFAULT_SEED = 384, 640, 42
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
  if args.num_frames is not None and args.num_frames <= 0:
    raise UsageError(f"--num-frames must be positive, got {args.num_frames}")
  if (args.height is not None and args.height <= 0) or (args.width is not None and args.width <= 0):
    raise UsageError(f"--height and --width must be positive, got {args.height}x{args.width}")
  if args.steps is not None and min(args.steps) < 1:
    raise UsageError(f"--steps must be positive, got {' '.join(map(str, args.steps))}")
  if args.guidance is not None and args.guidance < 0:
    raise UsageError(f"--guidance must be >= 0, got {args.guidance}")
  if not args.out.lower().endswith(".mp4"):
    raise UsageError(f"--out must name an .mp4 file, got {args.out}")
  if args.unstack_layers and args.mesh:
    raise UsageError("--unstack-layers is a one-device option; leave it out with --mesh")
  if args.contact_sheet and not args.contact_sheet.lower().endswith(".png"):
    raise UsageError(f"--contact-sheet must name a .png file, got {args.contact_sheet}")


def _use_demo(args) -> None:
  """No --model: the bundled demo model, and its bundled prompt / start image / start video where not given."""
  import json
  model = os.path.join(DEMO_DIR, "model")
  if not os.path.isfile(os.path.join(model, "model_index.json")):
    raise UsageError(DEMO_MISSING)
  args.model = model
  with open(os.path.join(DEMO_DIR, "prompts.json"), encoding="utf-8") as f:
    prompts = json.load(f)
  if args.prompt is None and not args.prompt_embeds:
    args.prompt = prompts[args.mode]
  if args.mode == "i2v" and not args.image and not args.video:
    args.image = os.path.join(DEMO_DIR, "start.png")
  if args.mode == "v2v" and not args.video and not args.image:
    args.video = os.path.join(DEMO_DIR, "start.mp4")
  if args.contact_sheet is None:
    args.contact_sheet = os.path.splitext(args.out)[0] + ".png"
  show = lambda p: os.path.relpath(p) if not os.path.relpath(p).startswith("..") else p
  print(f"no --model given: using the bundled demo model ({show(model)}), a small Helios trained on "
        f"procedural scenes of moving shapes (model card: {show(os.path.join(DEMO_DIR, 'README.md'))}). "
        f"For real videos, {REAL_WEIGHTS}.", flush=True)
  print(f"prompt: {args.prompt!r}" + (f", start image {show(args.image)}" if args.image else "")
        + (f", start video {show(args.video)}" if args.video else ""), flush=True)


def _component(model: str, name: str, config: str) -> str:
  folder = os.path.join(model, name)
  if not os.path.isdir(folder):
    raise CheckpointError(f"{model} has no {name}/ folder")
  if not os.path.isfile(os.path.join(folder, config)):
    raise CheckpointError(f"{folder} has no {config}")
  return folder


def _inspect_model(args) -> dict:
  """Reads the model folder's configs (no weights) and resolves the defaults; returns a plan dict."""
  from helios_jax.io.checkpoint import load_json
  model = args.model
  if not os.path.isdir(model):
    raise CheckpointError(f"model folder not found: {model}")
  index = load_json(os.path.join(model, "model_index.json"), "model_index.json")
  sched = load_json(os.path.join(_component(model, "scheduler", "scheduler_config.json"), "scheduler_config.json"),
                    "scheduler config")
  tcfg = load_json(os.path.join(_component(model, "transformer", "config.json"), "config.json"),
                   "transformer config")
  vcfg = load_json(os.path.join(_component(model, "vae", "config.json"), "config.json"), "VAE config")
  needs_text = args.prompt is not None
  if needs_text:
    for name in ("text_encoder", "tokenizer"):
      if not os.path.isdir(os.path.join(model, name)):
        raise CheckpointError(f"{model} has no {name}/ folder to encode --prompt (pass --prompt-embeds PATH.npy "
                              "instead)")
    _component(model, "text_encoder", "config.json")
  stages = int(sched.get("stages", 1))
  class_name = index.get("_class_name", "")
  folder_defaults = index.get("helios_jax_defaults") or {}  # recommended settings written by the folder's trainer
  pyramid = class_name == "HeliosPyramidPipeline" or stages > 1
  distilled = bool(index.get("is_distilled", False))
  zero_star = bool(index.get("is_cfg_zero_star", False))
  if pyramid:
    kind = "Distilled" if distilled else ("Mid" if zero_star else "pyramid")
    steps = [2] * stages if distilled else ([20] * stages if zero_star else [10] * stages)
    guidance = 1.0 if distilled else 5.0
  else:
    kind, steps, guidance = "Base", [50], 5.0
  steps = list(folder_defaults.get("steps", steps))
  guidance = float(folder_defaults.get("guidance", guidance))
  if args.height is None:
    args.height = int(folder_defaults.get("height", DEFAULT_HEIGHT))
  if args.width is None:
    args.width = int(folder_defaults.get("width", DEFAULT_WIDTH))
  if args.dtype is None:
    args.dtype = folder_defaults.get("dtype", "bf16")
  if args.steps is not None:
    want = stages if pyramid else 1
    if len(args.steps) != want:
      raise UsageError(f"--steps needs {want} number{'s' if want > 1 else ''} for this model "
                       f"({'one per pyramid stage' if pyramid else 'plain sampler'}), got {len(args.steps)}")
    steps = list(args.steps)
  guidance = guidance if args.guidance is None else float(args.guidance)
  num_frames = args.num_frames or int(folder_defaults.get("num_frames", 240 if distilled else 99))
  patch = tcfg.get("patch_size", [1, 2, 2])
  dims = vcfg.get("dim_mult", [1, 2, 4, 4])
  spatial = 2 ** (len(dims) - 1)
  temporal = 2 ** sum(bool(t) for t in vcfg.get("temperal_downsample", [False, True, True]))
  mult = spatial * 2 ** ((stages if pyramid else 1) - 1) * max(int(patch[1]), int(patch[2]))
  if args.height % mult or args.width % mult:
    raise UsageError(f"--height and --width must be multiples of {mult} for this model, got "
                     f"{args.height}x{args.width} (Helios was trained at 384x640)")
  if guidance > 1 and args.prompt_embeds and not args.negative_prompt_embeds and not os.path.isdir(
      os.path.join(model, "text_encoder")):
    raise UsageError(f"--guidance {guidance:g} > 1 needs --negative-prompt-embeds (this model folder has no text "
                     "encoder to encode an empty negative prompt)")
  return dict(pyramid=pyramid, kind=kind, steps=steps, guidance=guidance, num_frames=num_frames,
              distilled=distilled, text_dim=int(tcfg.get("text_dim", 4096)), temporal=temporal,
              window=8 * temporal + 1)


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


def _read_inputs(args, plan) -> dict:
  """Opens the image / video / embeddings (validating them) before any model is loaded."""
  from helios_jax.io import media
  out = {}
  if args.image:
    out["image"] = media.load_image(args.image)
  if args.video:
    frames = media.read_video(args.video, size=(args.width, args.height))
    if frames.shape[0] < plan["window"]:
      raise InputError(f"video {args.video} has {frames.shape[0]} frames; V2V needs at least {plan['window']} "
                       f"(one chunk)")
    out["video"] = frames
  if args.prompt_embeds:
    out["prompt_embeds"] = _load_embeds(args.prompt_embeds, "prompt embeddings", plan["text_dim"])
  if args.negative_prompt_embeds:
    out["negative_prompt_embeds"] = _load_embeds(args.negative_prompt_embeds, "negative prompt embeddings",
                                                 plan["text_dim"])
  return out


# ------------------------------------------------------------------------------------------------------------
# The run


def _encode_text_then_free(args, plan, dtype):
  """--free-text-encoder: UMT5 alone -> (prompt_embeds, negative_prompt_embeds), then drop it."""
  from helios_jax.models.tokenizer import encode_prompt, load_tokenizer
  from helios_jax.models.umt5 import UMT5EncoderModel
  encoder = UMT5EncoderModel.from_pretrained(os.path.join(args.model, "text_encoder"), dtype=dtype)
  tokenizer = load_tokenizer(os.path.join(args.model, "tokenizer"))
  pe = encode_prompt(encoder, tokenizer, [args.prompt], max_sequence_length=MAX_SEQUENCE_LENGTH)
  ne = None
  if plan["guidance"] > 1:
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

  import jax.numpy as jnp
  from helios_jax.pipelines import HeliosPipeline, HeliosPyramidPipeline
  dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
  print(f"Helios-{plan['kind']} {args.mode}: {plan['num_frames']} frames at {args.width}x{args.height}, steps "
        f"{' '.join(map(str, plan['steps']))}, guidance {plan['guidance']:g}, seed {args.seed}, {args.dtype}",
        flush=True)
  timings = {}
  t0 = time.perf_counter()
  prompt_kw = {}
  if args.prompt is not None and args.free_text_encoder:
    prompt_kw["prompt_embeds"], prompt_kw["negative_prompt_embeds"] = _encode_text_then_free(args, plan, dtype)
    load_text = False
  elif args.prompt is not None:
    prompt_kw = dict(prompt=args.prompt, negative_prompt=args.negative_prompt)
    load_text = True
  else:
    prompt_kw = dict(prompt_embeds=inputs["prompt_embeds"],
                     negative_prompt_embeds=inputs.get("negative_prompt_embeds"))
    load_text = plan["guidance"] > 1 and "negative_prompt_embeds" not in inputs
  timings["text encoder"] = time.perf_counter() - t0 if args.free_text_encoder and args.prompt else 0.0
  t0 = time.perf_counter()
  cls = HeliosPyramidPipeline if plan["pyramid"] else HeliosPipeline
  pipe = cls.from_pretrained(args.model, dtype=dtype, text_encoder_dtype=dtype, load_text_encoder=load_text)
  if args.unstack_layers:
    pipe.unstack_transformer_layers()
  timings["load"] = time.perf_counter() - t0

  call = dict(height=args.height, width=args.width, num_frames=plan["num_frames"], guidance_scale=plan["guidance"],
              seed=args.seed, output_type="np", progress=True, image=inputs.get("image"),
              video=inputs.get("video"), max_sequence_length=MAX_SEQUENCE_LENGTH, **prompt_kw)
  if plan["pyramid"]:
    call.update(pyramid_num_inference_steps_list=tuple(plan["steps"]),
                is_amplify_first_chunk=plan["distilled"])
  else:
    call.update(num_inference_steps=plan["steps"][0])
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
    steady = f"; after the first chunk {plan['window'] / mean_rest:.2f} frames/s ({mean_rest:.2f} s per chunk)"
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
