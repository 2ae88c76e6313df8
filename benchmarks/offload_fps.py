"""Low-VRAM mode next to the normal mode: peak device memory, peak host RSS and FPS of the 14B distilled pipeline.

A benchmark, not a test. One process, one call. The 14B transformer (random bf16 weights) is built one layer at a
time: each layer is initialised on the device inside ``jax.jit`` and moved to pinned host memory before the next
is made (:mod:`helios_jax.offload`), so device memory never holds more than one layer of block weights plus the
small non-block parameters and the VAE. Then, at 384x640 with fixed prompt embeddings (text encoder excluded, as
``benchmarks/fps.py``), "2-2-2+amp" runs

1. offloaded (``pipe.offload_transformer_layers()``'s layout: every layer fetched to the device inside the jitted
   forward, one layer ahead), then
2. normal: the same per-layer weights moved onto the device (the ``--layer-loop split`` layout of fps.py).

The offloaded run goes first because a device's ``peak_bytes_in_use`` only ever grows: its peak is then the
offload mode's own. Host RSS peak (``ru_maxrss``) likewise: the offload figure is the process peak at the end of
the offload runs; the normal run's is the RSS measured after it (the host copies are freed before it starts).
Per mode: FPS of a steady ``--frames`` run, first-chunk seconds, compile seconds (warm-up minus two steady chunks),
peak device GiB (None where the backend reports no memory stats, e.g. the CPU), peak / current host RSS GiB.
One JSON file under ``--out``.

    python benchmarks/offload_fps.py --out benchmarks/results        # on the H200
    python benchmarks/offload_fps.py --tiny --out /tmp/offload        # a CPU smoke run (tiny models, seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.fps import SETTINGS, build_on_device, distilled_scheduler, prompt_embeddings  # noqa: E402
from benchmarks.stream_fps import rss_gib  # noqa: E402
from helios_jax.models.transformer import HeliosTransformer3DModel, HeliosTransformerConfig  # noqa: E402
from helios_jax.models.vae import AutoencoderKLWan, WanVAEConfig  # noqa: E402
from helios_jax.offload import OffloadedLayers, host_memory_kind, to_host  # noqa: E402
from helios_jax.pipelines import HeliosPyramidPipeline  # noqa: E402

CHUNK = 33  # frames per chunk
GIB = 2**30


def device_stats() -> dict | None:
  """The first device's memory statistics, or None where the backend has none (the CPU)."""
  return jax.local_devices()[0].memory_stats() or None


def peak_device_gib() -> float | None:
  stats = device_stats()
  return None if stats is None else round(stats.get("peak_bytes_in_use", 0) / GIB, 3)


def device_in_use_gib() -> float | None:
  stats = device_stats()
  return None if stats is None else round(stats.get("bytes_in_use", 0) / GIB, 3)


def peak_rss_gib() -> float:
  """This process's peak resident host memory so far (Linux reports ``ru_maxrss`` in KiB)."""
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def tiny_models() -> tuple[HeliosTransformerConfig, WanVAEConfig]:
  """Configs for a CPU smoke run: the test-sized transformer and a 4-channel VAE."""
  return (HeliosTransformerConfig.tiny(dtype="bfloat16"),
          WanVAEConfig(base_dim=8, num_res_blocks=1, z_dim=4, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4))


def build_offloaded_transformer(cfg: HeliosTransformerConfig, host_kind: str | None, seed: int = 0):
  """A random-weight transformer whose blocks are built layer by layer straight into ``host_kind`` memory.

  Returns ``(transformer, graphdef, state, layers)``: the module (placeholder blocks, as after
  ``unstack_transformer_layers``), ``nnx.split`` of it, and the :class:`OffloadedLayers` (``cfg.num_layers`` layer
  states). With ``host_kind`` None the layers stay on the device."""
  one = dataclasses.replace(cfg, num_layers=1)
  init = jax.jit(lambda key: nnx.split(HeliosTransformer3DModel(one, rngs=nnx.Rngs(key)))[1])
  layers, rest = [], None
  for i in range(cfg.num_layers):
    state = init(jax.random.key(seed + i))
    layer = jax.tree.map(lambda a: a[0], state["blocks"])
    layers.append(to_host(layer, host_kind) if host_kind else layer)
    if rest is None:
      rest = state
    else:
      del state
  model = nnx.eval_shape(lambda: HeliosTransformer3DModel(cfg, rngs=nnx.Rngs(seed)))
  placeholders = jax.tree.map(lambda a: jnp.zeros((a.shape[0],) + (0,) * (len(a.shape) - 1), a.dtype),
                              nnx.state(model.blocks))
  rest["blocks"] = placeholders
  nnx.update(model, rest)
  graphdef, state = nnx.split(model)
  return model, graphdef, state, OffloadedLayers(layers, host_kind)


def measure(pipe, emb, a, steps, amp) -> dict:
  """Warm-up (compiles every stage shape and the decode), a steady run of ``a.frames`` and a one-chunk run."""

  def run(frames):
    t = time.perf_counter()
    out = pipe(prompt_embeds=emb, num_frames=frames, height=a.height, width=a.width, guidance_scale=1.0,
               pyramid_num_inference_steps_list=steps, is_amplify_first_chunk=amp, output_type="jax",
               progress=False, seed=42)
    jax.block_until_ready(out.frames)
    return time.perf_counter() - t, int(out.frames.shape[1])

  warm_s, _ = run(2 * CHUNK)
  steady_s, n = run(a.frames)
  first_s, _ = run(CHUNK)
  per_chunk = steady_s / max(1, -(-a.frames // CHUNK))
  return {"frames": n, "fps": round(n / steady_s, 3), "seconds": round(steady_s, 3), "first_chunk_s": round(first_s, 3),
          "compile_s": round(max(0.0, warm_s - 2 * per_chunk), 1), "warmup_run_s": round(warm_s, 1)}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--frames", type=int, default=264, help="frames of the steady run (8 chunks)")
  p.add_argument("--height", type=int, default=384)
  p.add_argument("--width", type=int, default=640)
  p.add_argument("--layers", type=int, default=40)
  p.add_argument("--setting", default="2-2-2+amp", choices=list(SETTINGS))
  p.add_argument("--tiny", action="store_true",
                 help="smoke run: the tiny test transformer and VAE at 64x128, 66 frames (works on a CPU)")
  p.add_argument("--tag", default="")
  p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
  a = p.parse_args(argv)
  if a.tiny:
    a.height, a.width, a.frames = 64, 128, 2 * CHUNK
  os.makedirs(a.out, exist_ok=True)
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
  if a.tiny:
    cfg, vae_cfg = tiny_models()
  else:
    cfg, vae_cfg = HeliosTransformerConfig(num_layers=a.layers, dtype="bfloat16"), None
  kind = host_memory_kind()
  if kind is None:
    print("this backend has no host memory space: the 'offloaded' run keeps the weights on the device",
          flush=True)
  t0 = time.perf_counter()
  transformer, graphdef, state, layers = build_offloaded_transformer(cfg, kind)
  vae = build_on_device(AutoencoderKLWan, vae_cfg, dtype=jnp.bfloat16)
  build_s = time.perf_counter() - t0
  print(f"built {transformer.num_parameters() / 1e9:.3f}B transformer ({layers!r}) + VAE in {build_s:.1f} s; "
        f"device peak {peak_device_gib()} GiB, host RSS {rss_gib():.2f} GiB", flush=True)
  pipe = HeliosPyramidPipeline(transformer, distilled_scheduler(), vae, is_distilled=True)
  emb = prompt_embeddings(cfg.text_dim)
  steps, amp = SETTINGS[a.setting]

  pipe._split = (graphdef, (state, layers))
  offloaded = measure(pipe, emb, a, steps, amp)
  offloaded.update(host_kind=kind, peak_device_gib=peak_device_gib(), device_in_use_gib=device_in_use_gib(),
                   peak_rss_gib=peak_rss_gib(), rss_gib=round(rss_gib(), 3))
  print("offloaded:", json.dumps(offloaded), flush=True)

  on_device = layers.on_device()
  jax.block_until_ready(on_device)
  for x in jax.tree.leaves(layers.layers):
    x.delete()  # the host copies: the normal run holds the weights on the device only
  pipe._split = (graphdef, (state, on_device))
  normal = measure(pipe, emb, a, steps, amp)
  normal.update(peak_device_gib=peak_device_gib(), device_in_use_gib=device_in_use_gib(),
                rss_gib_after=round(rss_gib(), 3))
  print("normal:", json.dumps(normal), flush=True)

  rec = {"impl": "helios_jax", "device": dev.device_kind, "backend": jax.default_backend(), "setting": a.setting,
         "layers": cfg.num_layers, "params_b": round(transformer.num_parameters() / 1e9, 3), "height": a.height,
         "width": a.width, "tiny": a.tiny, "jax": jax.__version__, "date": datetime.date.today().isoformat(),
         "tag": a.tag, "build_s": round(build_s, 1), "offloaded": offloaded, "normal": normal,
         "fps_ratio": round(offloaded["fps"] / normal["fps"], 4),
         "goal": "offloaded peak device < 24 GiB, peak host RSS < 40 GiB, fps_ratio >= 0.5"}
  name = f"offload_fps_{a.setting.replace('+', '_')}_{'tiny' if a.tiny else f'{cfg.num_layers}l'}"
  path = os.path.join(a.out, name + (f"_{a.tag}" if a.tag else "") + ".json")
  with open(path, "w") as f:
    json.dump(rec, f, indent=1)
  print(f"wrote {path}: offloaded {offloaded['fps']} FPS / normal {normal['fps']} FPS (ratio {rec['fps_ratio']})",
        flush=True)
  return rec


if __name__ == "__main__":
  main()
