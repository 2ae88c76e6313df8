"""GPU correctness check before timing: the 14B-width transformer (2 layers, random bf16 weights) with cuDNN flash
attention against the XLA attention path on the full-resolution chunk + history shapes, and an fp32 run against a
bf16 one. Prints relative errors; exits non-zero on NaN or an error above the bf16 bound (2e-2).

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.fps import build_on_device  # noqa: E402
from helios_jax.models.transformer import HeliosTransformer3DModel, HeliosTransformerConfig  # noqa: E402
from helios_jax.pipelines.history import HistoryLayout  # noqa: E402


def main():
  cfg = HeliosTransformerConfig(num_layers=2, dtype="bfloat16", attention_implementation="cudnn")
  model = build_on_device(HeliosTransformer3DModel, cfg)
  h, w = 48, 80
  layout = HistoryLayout.make((16, 2, 1), 9, True)
  idx = {k: jnp.asarray(v) for k, v in layout.indices().items()}
  key = jax.random.key(0)
  hist = layout.split(jax.random.normal(key, (1, 16, 19, h, w)), jax.random.normal(key, (1, 16, 1, h, w)))
  x = jax.random.normal(jax.random.key(1), (1, 16, 9, h, w))
  emb = 0.1 * jax.random.normal(jax.random.key(2), (1, 512, 4096))
  t = jnp.array([500], jnp.int32)
  g, s = nnx.split(model)
  outs = {}
  for impl in ("cudnn", "xla"):
    m = nnx.merge(g, s)
    m.config = dataclasses.replace(cfg, attention_implementation=impl)
    gi, si = nnx.split(m)
    outs[impl] = jax.jit(lambda st: nnx.merge(gi, st).forward(x, t, emb, **idx, **hist))(si)
  m32 = nnx.merge(g, jax.tree.map(lambda a: a.astype(jnp.float32), s))
  m32.config = dataclasses.replace(cfg, dtype="float32", attention_implementation="xla")
  g32, s32 = nnx.split(m32)
  with jax.default_matmul_precision("highest"):
    outs["fp32"] = jax.jit(lambda st: nnx.merge(g32, st).forward(x, t, emb, **idx, **hist))(s32)
  rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
  e1, e2 = rel(outs["cudnn"], outs["xla"]), rel(outs["cudnn"], outs["fp32"])
  finite = all(bool(jnp.isfinite(o.astype(jnp.float32)).all()) for o in outs.values())
  print(f"gpu_check: cudnn vs xla (bf16) {e1:.3e}; cudnn bf16 vs fp32 {e2:.3e}; finite {finite}", flush=True)
  sys.exit(0 if finite and e1 < 2e-2 and e2 < 2e-2 else 1)


if __name__ == "__main__":
  main()
