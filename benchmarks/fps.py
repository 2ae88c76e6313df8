"""End-to-end FPS of helios-jax's pyramid pipeline at the released 14B config, random bf16 weights.

A benchmark, not a test. Builds the 14B transformer and the Wan2.1 VAE with random weights directly on the
accelerator (initialised inside ``jax.jit``: no host copy), then runs ``HeliosPyramidPipeline`` at 384x640 with
prompt embeddings given (text encoder excluded, as in the diffusers anchor) for each setting:

* ``1-1-1``: pyramid steps [1, 1, 1], no CFG (the paper's 19.5 FPS setting);
* ``2-2-2+amp``: [2, 2, 2] with the amplified first chunk (the shipped default).

It reports end-to-end frames per second (transformer + scheduler + VAE decode, output left on the device),
one-time compilation (first run minus a steady run), first-chunk latency, per-stage transformer time, per-chunk
VAE decode time and peak device memory, and appends one JSON record per setting to ``--out``.

    python benchmarks/fps.py --out benchmarks/results            # on a GPU
    python benchmarks/fps.py --layers 2 --height 128 --width 128  # a smoke run anywhere
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
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from helios_jax.models.transformer import HeliosTransformer3DModel, HeliosTransformerConfig  # noqa: E402
from helios_jax.models.vae import AutoencoderKLWan  # noqa: E402
from helios_jax.pipelines import HeliosPyramidPipeline  # noqa: E402
from helios_jax.pipelines.history import HistoryLayout  # noqa: E402
from helios_jax.schedulers import HeliosDMDScheduler  # noqa: E402

SETTINGS = {"1-1-1": ((1, 1, 1), False), "2-2-2+amp": ((2, 2, 2), True)}


def build_on_device(cls, *args, seed=0, **kwargs):
  """Initialises an NNX module's parameters inside jit, so they are created on the default device."""
  abstract = nnx.eval_shape(lambda: cls(*args, rngs=nnx.Rngs(seed), **kwargs))
  graphdef, _ = nnx.split(abstract)
  state = jax.jit(lambda: nnx.split(cls(*args, rngs=nnx.Rngs(seed), **kwargs))[1])()
  return nnx.merge(graphdef, state)


def distilled_scheduler() -> HeliosDMDScheduler:
  """Helios-Distilled's scheduler: 3 pyramid stages, DMD, linear dynamic shift."""
  return HeliosDMDScheduler.from_config(dict(stages=3, use_dynamic_shifting=True, time_shift_type="linear"))


def prompt_embeddings(text_dim: int) -> jax.Array:
  """Fixed random (1, 512, text_dim) bf16 prompt embeddings (the text encoder is not part of these benchmarks)."""
  return (0.1 * jax.random.normal(jax.random.key(1), (1, 512, text_dim))).astype(jnp.bfloat16)


def peak_gib() -> float:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", 0) / 2**30


def timeit(fn, repeats=3):
  fn()  # warm-up / compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--frames", type=int, default=264)
  p.add_argument("--height", type=int, default=384)
  p.add_argument("--width", type=int, default=640)
  p.add_argument("--layers", type=int, default=40)
  p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
  p.add_argument("--vae-dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
  p.add_argument("--fuse-qkv", action="store_true", help="one matmul for the self-attention q/k/v projections")
  p.add_argument("--layer-loop", default="scan", choices=["scan", "unrolled", "split"],
                 help="how the 40 blocks run: one lax.scan over stacked weights, a Python loop over static slices "
                      "of them, or a Python loop over per-layer arrays (pipe.unstack_transformer_layers())")
  p.add_argument("--components-only", action="store_true", help="time the forwards and the decode, no pipeline")
  p.add_argument("--tag", default="", help="variant name stored in the records (e.g. the XLA flags used)")
  p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)

  t0 = time.perf_counter()
  cfg = HeliosTransformerConfig(num_layers=a.layers, dtype="bfloat16", attention_implementation=a.attention,
                                fuse_qkv=a.fuse_qkv, layer_loop="unrolled" if a.layer_loop == "unrolled" else "scan")
  transformer = build_on_device(HeliosTransformer3DModel, cfg)
  vae = build_on_device(AutoencoderKLWan, None, dtype=jnp.dtype(a.vae_dtype))
  jax.block_until_ready(nnx.state(transformer))
  build_s = time.perf_counter() - t0
  nparams = transformer.num_parameters()
  print(f"built {nparams / 1e9:.3f}B transformer + VAE ({a.vae_dtype}) in {build_s:.1f}s, "
        f"peak {peak_gib():.1f} GiB", flush=True)

  pipe = HeliosPyramidPipeline(transformer, distilled_scheduler(), vae, is_distilled=True)
  if a.layer_loop == "split":
    pipe.unstack_transformer_layers()
  emb = prompt_embeddings(cfg.text_dim)

  # Component timings: one transformer forward per pyramid resolution, one chunk decode.
  h, w = a.height // 8, a.width // 8
  layout = HistoryLayout.make((16, 2, 1), 9, True)
  idx = {k: jnp.asarray(v) for k, v in layout.indices().items()}
  hist = layout.split(jnp.zeros((1, 16, 19, h, w), jnp.bfloat16), jnp.zeros((1, 16, 1, h, w), jnp.bfloat16))
  graphdef, params = pipe._transformer_split()
  fwd = jax.jit(lambda p, x, t: (nnx.merge(graphdef, p[0]).forward(x, t, emb, **idx, **hist, layer_states=p[1])
                                 if isinstance(p, tuple) else nnx.merge(graphdef, p).forward(x, t, emb, **idx, **hist)))
  comp = {}
  for name, scale in (("quarter", 4), ("half", 2), ("full", 1)):
    x = jax.random.normal(jax.random.key(2), (1, 16, 9, h // scale, w // scale)).astype(jnp.bfloat16)
    t_c = time.perf_counter()
    jax.block_until_ready(fwd(params, x, jnp.array([500], jnp.int32)))
    compile_fwd = time.perf_counter() - t_c
    comp[f"forward_{name}_s"] = timeit(lambda: fwd(params, x, jnp.array([500], jnp.int32)))
    comp[f"forward_{name}_compile_s"] = compile_fwd
  lat = jax.random.normal(jax.random.key(3), (1, 16, 9, h, w), jnp.float32)
  comp["vae_decode_chunk_s"] = timeit(lambda: pipe._decode_chunk(lat))
  comp["forward_sum_s"] = comp["forward_quarter_s"] + comp["forward_half_s"] + comp["forward_full_s"]
  variant = {"fuse_qkv": a.fuse_qkv, "layer_loop": a.layer_loop, "tag": a.tag, "xla_flags": os.environ.get("XLA_FLAGS", "")}
  print("components:", json.dumps({**variant, **{k: round(v, 4) for k, v in comp.items()}}), flush=True)
  if a.components_only:
    with open(os.path.join(a.out, f"components_{a.tag or 'default'}{'_fused' if a.fuse_qkv else ''}.json"), "w") as f:
      json.dump({**variant, **comp, "device": dev.device_kind, "jax": jax.__version__}, f, indent=1)
    return

  records = []
  for setting in a.settings:
    steps, amp = SETTINGS[setting]

    def run(frames, timings=False):
      t = time.perf_counter()
      out = pipe(prompt_embeds=emb, num_frames=frames, height=a.height, width=a.width, guidance_scale=1.0,
                 pyramid_num_inference_steps_list=steps, is_amplify_first_chunk=amp, output_type="jax",
                 progress=False, seed=42)
      jax.block_until_ready(out.frames)
      return time.perf_counter() - t, out

    warm_s, _ = run(66)  # first (amplified) + a plain chunk: compiles every stage shape and the decode
    steady_s, out = run(a.frames)
    first_s, _ = run(33)
    n = int(out.frames.shape[1])
    fps = n / steady_s
    per_chunk = steady_s / max(1, -(-a.frames // 33))
    rec = {"impl": "helios_jax", "device": dev.device_kind, "setting": setting, "frames": n, "fps": round(fps, 2),
           "seconds": round(steady_s, 3), "first_chunk_s": round(first_s, 3),
           "compile_s": round(max(0.0, warm_s - 2 * per_chunk), 1), "warmup_run_s": round(warm_s, 1),
           "peak_gib": round(peak_gib(), 1), "params_b": round(nparams / 1e9, 3), "layers": a.layers,
           "height": a.height, "width": a.width, "vae_dtype": a.vae_dtype, "attention": a.attention,
           "jax": jax.__version__, "date": datetime.date.today().isoformat(), **variant,
           **{k: round(v, 4) for k, v in comp.items()}}
    records.append(rec)
    print(json.dumps(rec), flush=True)
    suffix = f"_{a.tag}" if a.tag else ""
    with open(os.path.join(a.out, f"fps_helios_jax_{setting.replace('+', '_')}_{a.layers}l{suffix}.json"), "w") as f:
      json.dump(rec, f, indent=1)
  print("\nsetting      frames   fps    first_chunk_s  compile_s  peak_gib")
  for r in records:
    print(f"{r['setting']:<12} {r['frames']:>6} {r['fps']:>6} {r['first_chunk_s']:>13} {r['compile_s']:>10} "
          f"{r['peak_gib']:>9}")


if __name__ == "__main__":
  from helios_jax import runtime  # XLA flags (Triton GEMM off, NHWC convolutions): before any computation
  runtime.configure_xla()
  runtime.quiet_gpu_plugin_errors()
  main()
