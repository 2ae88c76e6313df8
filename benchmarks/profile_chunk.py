"""Where the time of one chunk goes: a jax.profiler trace of the three pyramid-stage forwards of the 14B transformer
(random bf16 weights) and one VAE chunk decode, with GPU kernel time summed by kind.

    python benchmarks/profile_chunk.py --out $OUT

Writes ``profile_breakdown.json`` (seconds per kernel category and the top kernels) under ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import helios_jax  # noqa: E402,F401  (sets the XLA flags before JAX starts)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.fps import build_on_device  # noqa: E402
from helios_jax.models.transformer import HeliosTransformer3DModel, HeliosTransformerConfig  # noqa: E402
from helios_jax.models.vae import AutoencoderKLWan, decode_chunk  # noqa: E402
from helios_jax.pipelines.history import HistoryLayout  # noqa: E402

CATEGORIES = (  # first match wins; names of cuBLAS / cuDNN / XLA kernels
    ("attention (cuDNN flash)", r"fmha|flash|cudnn.*attn|sdpa"),
    ("convolution (cuDNN)", r"conv|implicit_gemm|xmma_fprop|fprop|dgrad|wgrad|winograd"),
    ("matmul (cuBLAS)", r"gemm|sm90_xmma|cutlass|nvjet|matmul|dot"),
    ("elementwise / reduce (XLA fusions)", r"fusion|loop_|input_|reduce|transpose|copy|concatenate|slice"),
)


def categorize(name: str) -> str:
  low = name.lower()
  for cat, pattern in CATEGORIES:
    if re.search(pattern, low):
      return cat
  return "other"


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default=os.environ.get("OUT", "/tmp/profile"))
  p.add_argument("--layers", type=int, default=40)
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  cfg = HeliosTransformerConfig(num_layers=a.layers, dtype="bfloat16")
  model = build_on_device(HeliosTransformer3DModel, cfg)
  vae = build_on_device(AutoencoderKLWan, None, dtype=jnp.bfloat16)
  h, w = 48, 80
  layout = HistoryLayout.make((16, 2, 1), 9, True)
  idx = {k: jnp.asarray(v) for k, v in layout.indices().items()}
  hist = layout.split(jnp.zeros((1, 16, 19, h, w), jnp.bfloat16), jnp.zeros((1, 16, 1, h, w), jnp.bfloat16))
  emb = (0.1 * jax.random.normal(jax.random.key(1), (1, 512, 4096))).astype(jnp.bfloat16)
  g, s = nnx.split(model)
  fwd = jax.jit(lambda st, x: nnx.merge(g, st).forward(x, jnp.array([500], jnp.int32), emb, **idx, **hist))
  xs = [jax.random.normal(jax.random.key(i), (1, 16, 9, h // f, w // f)).astype(jnp.bfloat16)
        for i, f in enumerate((4, 2, 1))]
  vg, vs = nnx.split(vae)
  lat = jax.random.normal(jax.random.key(9), (1, 16, 9, h, w))

  def chunk():
    outs = [fwd(s, x) for x in xs]
    return outs, decode_chunk(vg, vs, lat)

  jax.block_until_ready(chunk())  # compile
  trace_dir = os.path.join("/tmp", "helios_trace")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    jax.block_until_ready(chunk())
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
  if not files:
    print("no perfetto trace written; files:", glob.glob(trace_dir + "/**", recursive=True))
    return
  with gzip.open(files[-1], "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  # GPU kernel events live on the device "process"; find its pid by name.
  pid_names = {e.get("pid"): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu_pids = {pid for pid, n in pid_names.items() if "/device:GPU" in n or "GPU" in n.upper()}
  by_cat = collections.Counter()
  by_kernel = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in gpu_pids:
      continue
    dur = float(e.get("dur", 0)) / 1e6
    name = e.get("name", "")
    by_cat[categorize(name)] += dur
    by_kernel[name] += dur
  total = sum(by_cat.values())
  res = {"device": jax.devices()[0].device_kind, "gpu_pids": sorted(map(str, gpu_pids)),
         "total_kernel_s": total, "by_category_s": dict(by_cat.most_common()),
         "top_kernels_s": dict(by_kernel.most_common(25))}
  with open(os.path.join(a.out, "profile_breakdown.json"), "w") as f:
    json.dump(res, f, indent=1)
  print(f"kernel time in one chunk (3 forwards + VAE decode): {total:.3f} s")
  for cat, sec in by_cat.most_common():
    print(f"  {cat:<40} {sec:7.3f} s  {100 * sec / max(total, 1e-9):5.1f} %")
  print("top kernels:")
  for k, v in by_kernel.most_common(12):
    print(f"  {v:7.4f} s  {k[:110]}")


if __name__ == "__main__":
  main()
