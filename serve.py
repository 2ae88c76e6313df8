#!/usr/bin/env python
"""Serve live, interactive Helios generation to a web page and over a WebSocket API.

    python serve.py                                   # the bundled demo model on the CPU: open http://127.0.0.1:8000
    python serve.py --model Helios-Distilled --warmup # released weights on a GPU, compiled before the first client
    python serve.py --steps 2 --guidance 1 --port 8001

The page (``/``) picks t2v / i2v / v2v, starts and stops a stream, changes the prompt mid-stream and plays the
frames as they arrive; at the end it offers the mp4. The WebSocket API (``/ws``) is documented in
``docs/streaming.md``; ``helios_jax.serving.client.StreamClient`` is a Python client of it.

The model is loaded once at start-up. One stream runs at a time (a second client gets a ``busy`` error). Every
start-up mistake (missing model folder, a setting that does not fit the model, a taken port) ends with one line
``error: ...`` on stderr and exit status 2. ``main(argv)`` returns the exit status (importable for tests).
"""

from __future__ import annotations

import argparse
import logging
import sys

from helios_jax.errors import HeliosError
from helios_jax.serving.settings import DEFAULT_HOST, DEFAULT_PORT, ServerSettings


class UsageError(HeliosError):
  """A command-line mistake."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
  d = ServerSettings()
  p = _Parser(prog="serve.py", description="Live Helios video generation in the browser (FastAPI + WebSockets).")
  p.add_argument("--host", default=DEFAULT_HOST,
                 help=f"address to listen on (default {DEFAULT_HOST}; the server has no authentication, so only "
                      "listen elsewhere on a trusted network)")
  p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0: any free one)")
  p.add_argument("--model", help="diffusers-format Helios folder with text_encoder/ and tokenizer/ (default: the "
                                 "small bundled demo model, with its bundled prompts, start image and start video)")
  p.add_argument("--steps", type=int, nargs="+", metavar="N",
                 help="denoising steps: one count per pyramid stage (e.g. 2 2 2), or one for the plain sampler "
                      "(default: the model folder's)")
  p.add_argument("--guidance", type=float, help="classifier-free guidance scale, 1 disables it (default: the "
                                                "model folder's)")
  p.add_argument("--height", type=int, help="frame height of every stream (default: the model folder's)")
  p.add_argument("--width", type=int, help="frame width of every stream (default: the model folder's)")
  p.add_argument("--dtype", choices=("bf16", "fp32"), help="transformer and text-encoder dtype (default: the "
                                                           "model folder's, else bf16)")
  p.add_argument("--quantization", choices=("none", "fp8"), default="none",
                 help="fp8: the transformer blocks' linear weights in float8 (Hopper GPUs; see sample.py --help)")
  p.add_argument("--seed", type=int, default=d.seed, help=f"seed of a stream whose client gives none "
                                                          f"(default {d.seed})")
  p.add_argument("--blend-chunks", type=int, default=d.blend_chunks,
                 help=f"default blend length of live prompt changes, in chunks (default {d.blend_chunks})")
  p.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb,
                 help=f"largest start image / video a client may upload, MiB (default {d.max_upload_mb:g})")
  p.add_argument("--max-frames", type=int, default=d.max_frames,
                 help=f"frames per stream; an endless stream stops there (default {d.max_frames}, 100 s at 24 fps; "
                      "0: no limit)")
  p.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality,
                 help=f"quality of the JPEG frames sent to clients, 1-95 (default {d.jpeg_quality})")
  p.add_argument("--video-dir", help="folder for the mp4 of each stream (default: a new temporary folder)")
  p.add_argument("--keep-videos", type=int, default=d.keep_videos,
                 help=f"finished mp4s kept in --video-dir; older ones are deleted (default {d.keep_videos})")
  p.add_argument("--warmup", action="store_true",
                 help="compile before serving (streams two t2v chunks and one i2v and v2v chunk from grey inputs, "
                      "discarded), so the first client does not wait for compilation")
  p.add_argument("--compile-cache", metavar="DIR|none",
                 help="JAX's persistent compilation cache, as in sample.py (default: $HELIOS_JAX_COMPILE_CACHE, "
                      "else ~/.cache/helios_jax/xla; 'none' turns it off)")
  p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
  return p


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
  """The :class:`ServerSettings` of parsed command-line arguments."""
  if not 0 <= args.port <= 65535:
    raise UsageError(f"--port must be between 0 and 65535, got {args.port}")
  try:
    return ServerSettings(model=args.model, steps=tuple(args.steps) if args.steps else None, guidance=args.guidance,
                          height=args.height, width=args.width, dtype=args.dtype, seed=args.seed,
                          blend_chunks=args.blend_chunks, max_upload_mb=args.max_upload_mb,
                          max_frames=args.max_frames, jpeg_quality=args.jpeg_quality, video_dir=args.video_dir,
                          keep_videos=args.keep_videos, quantization=args.quantization)
  except HeliosError as e:  # the message starts with the field's name: name the option instead
    field, _, rest = str(e).partition(" ")
    raise UsageError(f"--{field.replace('_', '-')} {rest}") from None


def _run(argv) -> int:
  args = build_parser().parse_args(argv)
  settings = settings_from_args(args)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")  # JAX's INFO lines stay quiet
  logging.getLogger("helios_jax.serving").setLevel(args.log_level.upper())
  from helios_jax.compile_cache import enable_compile_cache
  enable_compile_cache(args.compile_cache)
  from helios_jax.serving.server import bind, uvicorn_server, url_of
  sock = bind(args.host, args.port)  # before loading: a taken port fails at once
  from helios_jax.serving.app import create_app
  from helios_jax.serving.engine import load_engine
  engine = load_engine(settings)
  plan = engine.plan
  print(f"{engine.model_name} (Helios-{plan.kind}): {plan.width}x{plan.height}, steps "
        f"{' '.join(map(str, plan.steps))}, guidance {plan.guidance:g}, {plan.dtype}", flush=True)
  if engine.demo is not None:
    print("no --model given: serving the bundled demo model (a small Helios trained on procedural scenes of moving "
          "shapes); pass --model for released weights", flush=True)
  if args.warmup:
    print("warming up (compiling) ...", flush=True)
    print(f"warm-up done in {engine.warmup():.1f} s", flush=True)
  app = create_app(engine)
  url = url_of(sock)
  if args.host in ("0.0.0.0", "::"):
    url = url.replace(args.host, "127.0.0.1" if args.host == "0.0.0.0" else "[::1]")
  print(f"open {url} in a browser (WebSocket API: {url.replace('http', 'ws', 1)}/ws; videos in "
        f"{app.state.store.folder}); Ctrl-C stops the server", flush=True)
  uvicorn_server(app, settings, args.log_level).run(sockets=[sock])
  return 0


def main(argv=None) -> int:
  """Runs the server; returns the exit status (0 after Ctrl-C, 2 for a start-up mistake)."""
  try:
    return _run(argv)
  except HeliosError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 0


if __name__ == "__main__":
  from helios_jax import runtime  # XLA flags (Triton GEMM off, NHWC convolutions): before any computation
  runtime.configure_xla()
  runtime.quiet_gpu_plugin_errors()
  sys.exit(main())
