"""A minute-long video through sample.py's writer: device memory and host RSS per chunk, FPS per chunk.

A benchmark, not a test. Builds the 14B distilled pipeline with random bf16 weights (as ``benchmarks/fps.py``;
``--offload``: the low-VRAM layout of ``benchmarks/offload_fps.py``), then makes one ``--num-frames`` video (default
1452 = 44 chunks = 60 s at 24 fps) at 384x640, "2-2-2+amp", through the same code as ``sample.py``
(``helios_jax.cli.sample._make_video``: ``pipe.stream`` -> each chunk encoded into the mp4 as it arrives, nothing
held whole). After every chunk it records device memory in use (``memory_stats()``; None on the CPU), host RSS and
the chunk's seconds, and reports the growth from chunk 5 to the last (both should be ~0: flat memory).

Where PyAV is missing (the GPU machine) frames go to a sink that converts and drops them, and the record says
``mp4_written: false``. One JSON file under ``--out``.

    python benchmarks/minute_long.py --out benchmarks/results                   # on the H200
    python benchmarks/minute_long.py --tiny --num-frames 330 --out /tmp/minute  # CPU smoke run (10 chunks)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.fps import SETTINGS, build_on_device, distilled_scheduler, prompt_embeddings  # noqa: E402
from benchmarks.offload_fps import build_offloaded_transformer, device_in_use_gib, tiny_models  # noqa: E402
from benchmarks.stream_fps import rss_gib  # noqa: E402
from helios_jax.cli import sample as cli  # noqa: E402
from helios_jax.models.transformer import HeliosTransformer3DModel, HeliosTransformerConfig  # noqa: E402
from helios_jax.models.vae import AutoencoderKLWan  # noqa: E402
from helios_jax.offload import host_memory_kind  # noqa: E402
from helios_jax.pipelines import HeliosPyramidPipeline  # noqa: E402

FLAT_FROM_CHUNK = 5  # growth is measured from this chunk (1-based) to the last: the first ones allocate caches


def build(a):
  """The pipeline and prompt embeddings: 14B random weights (or the tiny test models with ``--tiny``)."""
  if a.tiny:
    cfg, vae_cfg = tiny_models()
  else:
    cfg, vae_cfg = HeliosTransformerConfig(num_layers=a.layers, dtype="bfloat16"), None
  if a.offload:
    transformer, graphdef, state, layers = build_offloaded_transformer(cfg, host_memory_kind())
  else:
    transformer = build_on_device(HeliosTransformer3DModel, cfg)
  vae = build_on_device(AutoencoderKLWan, vae_cfg, dtype=jnp.bfloat16)
  jax.block_until_ready(nnx.state(transformer))
  pipe = HeliosPyramidPipeline(transformer, distilled_scheduler(), vae, is_distilled=True)
  if a.offload:
    pipe._split = (graphdef, (state, layers))
  return pipe, prompt_embeddings(cfg.text_dim)


def growth(values: list, start: int) -> float | None:
  """values[-1] - values[start - 1] (None when not measured or too few chunks)."""
  if len(values) < start or values[start - 1] is None:
    return None
  return round(values[-1] - values[start - 1], 4)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--num-frames", type=int, default=1452)
  p.add_argument("--height", type=int, default=384)
  p.add_argument("--width", type=int, default=640)
  p.add_argument("--layers", type=int, default=40)
  p.add_argument("--setting", default="2-2-2+amp", choices=list(SETTINGS))
  p.add_argument("--offload", action="store_true", help="the low-VRAM mode (block weights in pinned host memory)")
  p.add_argument("--tiny", action="store_true", help="the tiny test models at 64x128 (a CPU smoke run)")
  p.add_argument("--keep-mp4", action="store_true", help="keep the mp4 under --out (default: deleted)")
  p.add_argument("--tag", default="")
  p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
  a = p.parse_args(argv)
  if a.tiny:
    a.height, a.width = 64, 128
  os.makedirs(a.out, exist_ok=True)
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
  t0 = time.perf_counter()
  pipe, emb = build(a)
  build_s = time.perf_counter() - t0
  steps, amp = SETTINGS[a.setting]
  call = dict(prompt_embeds=emb, num_frames=a.num_frames, height=a.height, width=a.width, guidance_scale=1.0,
              pyramid_num_inference_steps_list=steps, is_amplify_first_chunk=amp, seed=42)
  per_chunk: list[dict] = []

  def on_chunk(job, chunk):
    per_chunk.append({"chunk": chunk.index + 1, "frames": int(len(chunk.frames)),
                      "interval_s": round(float(chunk.timings.get("interval_s", 0.0)), 4),
                      "device_gib": device_in_use_gib(), "rss_gib": round(rss_gib(), 4)})

  try:
    import av  # noqa: F401
    mp4 = True
  except ImportError:
    mp4 = False
    cli.media.write_video = _drop_frames  # no PyAV: convert and drop (the memory path up to the encoder)
  folder = a.out if a.keep_mp4 else tempfile.mkdtemp(prefix="minute_long_")
  job = cli.Job(out=os.path.abspath(os.path.join(folder, "minute_long.mp4")), sheet=None, seed=42)
  stats = cli._make_video(pipe, call, job, None, 24, on_chunk, compiles=True)
  if mp4 and not a.keep_mp4:
    os.remove(job.out)
  steady = [c["interval_s"] for c in per_chunk[1:]]
  fps_steady = [c["frames"] / c["interval_s"] for c in per_chunk[1:] if c["interval_s"] > 0]
  rec = {"impl": "helios_jax", "device": dev.device_kind, "backend": jax.default_backend(), "setting": a.setting,
         "num_frames": stats.frames, "chunks": len(per_chunk), "height": a.height, "width": a.width,
         "offload": a.offload, "tiny": a.tiny, "jax": jax.__version__, "date": datetime.date.today().isoformat(),
         "tag": a.tag, "build_s": round(build_s, 1), "mp4_written": mp4, "first_chunk_s": round(stats.first_chunk, 3),
         "total_s": round(stats.total, 2), "fps_end_to_end": round(stats.frames / stats.total, 3),
         "fps_median_after_first": round(statistics.median(fps_steady), 3) if fps_steady else None,
         "chunk_s_min_max_after_first": [min(steady), max(steady)] if steady else None,
         f"device_growth_gib_chunk{FLAT_FROM_CHUNK}_to_last": growth([c["device_gib"] for c in per_chunk],
                                                                     FLAT_FROM_CHUNK),
         f"rss_growth_gib_chunk{FLAT_FROM_CHUNK}_to_last": growth([c["rss_gib"] for c in per_chunk], FLAT_FROM_CHUNK),
         "per_chunk": per_chunk}
  name = f"minute_long_{a.setting.replace('+', '_')}_{'tiny' if a.tiny else f'{a.layers}l'}" \
      + ("_offload" if a.offload else "") + (f"_{a.tag}" if a.tag else "")
  path = os.path.join(a.out, name + ".json")
  with open(path, "w") as f:
    json.dump(rec, f, indent=1)
  print(f"wrote {path}: {rec['chunks']} chunks, device growth {rec[f'device_growth_gib_chunk{FLAT_FROM_CHUNK}_to_last']}"
        f" GiB, RSS growth {rec[f'rss_growth_gib_chunk{FLAT_FROM_CHUNK}_to_last']} GiB", flush=True)
  return rec


def _drop_frames(path, frames, fps=24, crf=18):
  """Stands in for ``media.write_video`` without PyAV: consumes the frames (uint8 conversion included), keeps
  none."""
  for frame in frames:
    cli.media.to_uint8(frame)
  return path


if __name__ == "__main__":
  main()
