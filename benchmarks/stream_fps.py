"""Streaming speed at the released 14B config (random bf16 weights): batch vs ``pipe.stream`` vs the server.

A benchmark, not a test. Builds the 14B transformer and the Wan2.1 VAE on the accelerator as ``benchmarks/fps.py``
does, then for each setting ("1-1-1", "2-2-2+amp") and ``--chunks`` chunks at 384x640 measures, in one process:

* ``batch``: ``pipe(...)`` with ``output_type="jax"`` (frames left on the device), as benchmarks/fps.py;
* ``stream``: ``pipe.stream(...)`` (uint8 frames on the host per chunk) with ``prefetch`` 0 and 1;
* ``server``: the same through ``helios_jax.serving`` (uvicorn on 127.0.0.1, one WebSocket client in this process,
  JPEG frames over the socket), from the client's "start" message to each frame's arrival.

For each: time to first frame (TTFF, compiled programs warm), sustained FPS (frames after the first chunk over the
time after it) and end-to-end FPS (all frames over the whole time). The text encoder is excluded as in
benchmarks/fps.py: prompts map to fixed random embeddings. Records go to ``--out`` (one JSON per setting).

    python benchmarks/stream_fps.py --out benchmarks/results          # on a GPU
    python benchmarks/stream_fps.py --layers 2 --height 128 --width 128 --chunks 3   # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.fps import SETTINGS, build_on_device, distilled_scheduler, peak_gib, prompt_embeddings  # noqa: E402
from helios_jax.models.transformer import HeliosTransformer3DModel, HeliosTransformerConfig  # noqa: E402
from helios_jax.models.vae import AutoencoderKLWan  # noqa: E402
from helios_jax.pipelines import HeliosPyramidPipeline  # noqa: E402


def summarise(ready: list[float], counts: list[int]) -> dict:
  """Per-chunk arrival times (s since start) and frame counts -> TTFF, sustained and end-to-end FPS."""
  total = sum(counts)
  rest = sum(counts[1:])
  sustained = rest / (ready[-1] - ready[0]) if len(ready) > 1 and ready[-1] > ready[0] else float("nan")
  return {"ttff_s": round(ready[0], 3), "sustained_fps": round(sustained, 2), "e2e_fps": round(total / ready[-1], 2),
          "frames": total, "chunk_intervals_s": [round(b - a, 3) for a, b in zip([0.0] + ready[:-1], ready)]}


def batch_run(pipe, call: dict, frames: int) -> dict:
  t = time.perf_counter()
  out = pipe(num_frames=frames, output_type="jax", progress=False, **call)
  jax.block_until_ready(out.frames)
  s = time.perf_counter() - t
  n = int(out.frames.shape[1])
  return {"seconds": round(s, 3), "fps": round(n / s, 2), "frames": n}


def stream_run(pipe, call: dict, frames: int, prefetch: int) -> dict:
  s = pipe.stream(num_frames=frames, prefetch=prefetch, **call)
  ready, counts = [], []
  for chunk in s:
    ready.append(chunk.timings["ready_s"])
    counts.append(int(chunk.frames.shape[0]))
  return summarise(ready, counts)


def rss_gib() -> float:
  """This process's resident host memory (Linux /proc), GiB."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def device_gib() -> float:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("bytes_in_use", 0) / 2**30


def long_run(pipe, call: dict, chunks: int) -> dict:
  """A minute-long stream (``chunks`` chunks): device memory in use and host RSS after every chunk, frames consumed
  as they arrive (JPEG-encoded, as the server does, then dropped)."""
  from helios_jax.serving.protocol import encode_jpeg
  s = pipe.stream(num_frames=chunks * 33, **call)
  ready, counts, dev, rss = [], [], [], []
  for chunk in s:
    encode_jpeg(chunk.frames)
    ready.append(chunk.timings["ready_s"])
    counts.append(int(chunk.frames.shape[0]))
    dev.append(round(device_gib(), 3))
    rss.append(round(rss_gib(), 3))
  out = summarise(ready, counts)
  k = min(5, len(dev) - 1)
  out.update(device_gib_per_chunk=dev, rss_gib_per_chunk=rss, device_growth_gib_after_chunk5=round(dev[-1] - dev[k], 3),
             rss_growth_gib_after_chunk5=round(rss[-1] - rss[k], 3))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--chunks", type=int, default=12)
  p.add_argument("--height", type=int, default=384)
  p.add_argument("--width", type=int, default=640)
  p.add_argument("--layers", type=int, default=40)
  p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
  p.add_argument("--no-server", action="store_true", help="skip the server measurement")
  p.add_argument("--repeats", type=int, default=2, help="measured runs of each variant (the best is kept)")
  p.add_argument("--long-chunks", type=int, default=44,
                 help="chunks of the minute-long memory run at the first setting (44 = 1452 frames = 60 s; 0: skip)")
  p.add_argument("--tag", default="")
  p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
  cfg = HeliosTransformerConfig(num_layers=a.layers, dtype="bfloat16")
  transformer = build_on_device(HeliosTransformer3DModel, cfg)
  vae = build_on_device(AutoencoderKLWan, None, dtype=jnp.bfloat16)
  jax.block_until_ready(nnx.state(transformer))
  scheduler = distilled_scheduler()
  pipe = HeliosPyramidPipeline(transformer, scheduler, vae, is_distilled=True)
  emb = prompt_embeddings(cfg.text_dim)
  frames = a.chunks * 33
  server = None if a.no_server else ServerHarness(pipe, emb, a)

  for setting in a.settings:
    steps, amp = SETTINGS[setting]
    call = dict(prompt_embeds=emb, height=a.height, width=a.width, guidance_scale=1.0,
                pyramid_num_inference_steps_list=steps, is_amplify_first_chunk=amp, seed=42)
    t = time.perf_counter()
    batch_run(pipe, call, 66)  # compiles every stage shape (amplified first chunk + a plain one) and the decode
    stream_run(pipe, call, 66, 1)  # and the stream's uint8 conversion
    warm_s = time.perf_counter() - t
    rec = {"impl": "helios_jax", "device": dev.device_kind, "setting": setting, "chunks": a.chunks,
           "height": a.height, "width": a.width, "layers": a.layers, "jax": jax.__version__,
           "date": datetime.date.today().isoformat(), "warmup_s": round(warm_s, 1), "tag": a.tag}
    rec["batch"] = max((batch_run(pipe, call, frames) for _ in range(a.repeats)), key=lambda r: r["fps"])
    for prefetch in (0, 1):
      rec[f"stream_prefetch{prefetch}"] = max((stream_run(pipe, call, frames, prefetch) for _ in range(a.repeats)),
                                              key=lambda r: r["e2e_fps"])
    if server is not None:
      server.run(steps, amp, 33)  # warm the server path (JPEG encoder, socket)
      rec["server"] = max((server.run(steps, amp, frames) for _ in range(a.repeats)), key=lambda r: r["e2e_fps"])
    if a.long_chunks and setting == a.settings[0]:
      rec["long"] = long_run(pipe, call, a.long_chunks)
    rec["peak_gib"] = round(peak_gib(), 1)
    b = rec["batch"]["fps"]
    for key in ("stream_prefetch0", "stream_prefetch1", "server"):
      if key in rec:
        rec[key]["sustained_vs_batch"] = round(rec[key]["sustained_fps"] / b, 4)
        rec[key]["e2e_vs_batch"] = round(rec[key]["e2e_fps"] / b, 4)
    print(json.dumps(rec), flush=True)
    suffix = f"_{a.tag}" if a.tag else ""
    with open(os.path.join(a.out, f"stream_fps_{setting.replace('+', '_')}_{a.layers}l{suffix}.json"), "w") as f:
      json.dump(rec, f, indent=1)
  if server is not None:
    server.close()


class _NoMp4:
  """Stands in for the server's mp4 recorder where PyAV is missing (the GPU machine: its 35 MB wheel does not fit
  the transfer limit); with PyAV the real recorder runs (its H.264 encoding has a thread of its own)."""

  def add(self, frames):
    pass

  def finish(self):
    return None

  def abort(self):
    pass


class ServerHarness:
  """The streaming server (helios_jax.serving) on 127.0.0.1 in a background thread, serving ``pipe``, and one
  WebSocket client in this process. Prompts map to the fixed embeddings ``emb`` (no 14B text encoder here)."""

  def __init__(self, pipe, emb, a):
    self.pipe, self.a = pipe, a
    pipe.text_encoder = pipe.tokenizer = "fixed embeddings"  # tells the pipeline prompts can be encoded
    pipe.encode_prompt = lambda prompt, negative_prompt=None, do_classifier_free_guidance=True, \
        max_sequence_length=512: (emb, emb if do_classifier_free_guidance else None)
    try:
      import av  # noqa: F401  (PyAV writes the server's mp4s)
      self.mp4 = True
    except ImportError:
      self.mp4 = False

  def run(self, steps, amp, frames) -> dict:
    from helios_jax.io.model_folder import ModelPlan
    from helios_jax.serving.app import create_app
    from helios_jax.serving.client import StreamClient
    from helios_jax.serving.engine import Engine
    from helios_jax.serving.recorder import VideoStore
    from helios_jax.serving.server import BackgroundServer
    from helios_jax.serving.settings import ServerSettings
    a = self.a
    settings = ServerSettings(max_frames=0)
    plan = ModelPlan(pyramid=True, kind="Distilled", steps=tuple(steps), guidance=1.0, num_frames=frames,
                     height=a.height, width=a.width, dtype="bf16", distilled=amp, text_dim=4096, temporal=4,
                     window=33, has_text_encoder=True)
    store = VideoStore()
    if not self.mp4:
      store.recorder = lambda stream_id, fps: _NoMp4()
    engine = Engine(self.pipe, plan, settings, "helios-14b-random")
    with BackgroundServer(create_app(engine, store), settings) as server:
      client = StreamClient(server.ws_url, timeout=300)
      try:
        t0 = time.perf_counter()
        client.start("a benchmark prompt", num_frames=frames, seed=42)
        ready, counts, done = [], [], None
        for ev in client.events(timeout=300):
          if ev.type == "chunk":
            ready.append(time.perf_counter() - t0)
            counts.append(len(ev.frames))
          elif ev.type == "done":
            done = ev.data
      finally:
        client.close()
    out = summarise(ready, counts)
    out.update(mp4_written=self.mp4, server_done={k: done.get(k) for k in (
        "time_to_first_frame_s", "generation_fps", "steady_fps", "frames")} if done else None)
    return out

  def close(self) -> None:
    pass


if __name__ == "__main__":
  main()
