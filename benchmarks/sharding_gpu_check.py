"""GPU check of the sharded paths on 2+ GPUs of one host (docs/scaling.md): sharded = one GPU.

1. Sequence-parallel attention with the cuDNN flash kernel (bf16): self-attention over a padded token count,
   cross-attention, and gradients, on ``sequence = #GPUs`` against the same call on one GPU.
2. The tiny Base pipeline with CFG (tests/reference/fixtures/pipeline/base, 3 steps, one chunk) in float32 and in
   bfloat16 on ``data=2`` (CFG-parallel) and on ``sequence = #GPUs``, against one GPU.

Prints one JSON record and writes it to ``$OUT/sharding_gpu_check.json`` (or ``benchmarks/results``); exits 1 when
a difference exceeds its tolerance. ``--cpu`` runs the same on 8 simulated CPU devices (XLA attention).

    python benchmarks/sharding_gpu_check.py          # on a 2-, 4- or 8-GPU host
"""

from __future__ import annotations

import datetime
import json
import os
import sys

if "--cpu" in sys.argv:
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from helios_jax import HeliosPipeline  # noqa: E402
from helios_jax.models.attention import dot_product_attention  # noqa: E402
from helios_jax.parallel import mesh as mesh_lib, sampling  # noqa: E402

FIX = os.path.join(ROOT, "tests", "reference", "fixtures", "pipeline")


def rel(a, b) -> float:
  a, b = (np.asarray(jax.device_get(x), np.float64) for x in (a, b))
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def attention_check(n: int, impl: str, dtype) -> dict:
  mesh = mesh_lib.make_mesh(dict(sequence=n))
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(key, (1, 1037, 40, 128), dtype) for key in ks[:3])  # 40 heads as at 14B; 1037: pad
  text = jax.random.normal(ks[3], (1, 512, 40, 128), dtype)
  loss = lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, impl).astype(jnp.float32) ** 2)
  fn = jax.jit(lambda q, k, v, c: (dot_product_attention(q, k, v, impl), dot_product_attention(q, c, c, impl),
                                   jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))
  ref = fn(q, k, v, text)
  with jax.set_mesh(mesh):
    out = fn(q, k, v, text)
  names = ("self", "cross", "dq", "dk", "dv")
  return {f"attention_{name}": rel(o, r) for name, o, r in zip(names, jax.tree.leaves(out), jax.tree.leaves(ref))}


def pipeline_check(n: int, dtype) -> dict:
  data = dict(np.load(os.path.join(FIX, "base_t2v.npz")))
  pipe = HeliosPipeline.from_pretrained(os.path.join(FIX, "base"), dtype=dtype, load_vae=False)
  kw = dict(height=64, width=128, num_frames=33, output_type="latent", prompt_embeds=data["prompt_embeds"],
            negative_prompt_embeds=data["negative_prompt_embeds"], guidance_scale=5.0, num_inference_steps=3,
            progress=False, seed=0)
  ref = pipe(**kw).frames
  out = {}
  for spec in ("data=2", f"sequence={min(n, 4)}"):  # the tiny model has 4 heads
    with sampling.on_mesh(pipe, mesh_lib.make_mesh(mesh_lib.parse_mesh(spec)), fsdp_min_size=0):
      out[f"pipeline_{jnp.dtype(dtype).name}_{spec}"] = rel(pipe(**kw).frames, ref)
  return out


def main():
  n = len(jax.devices())
  if n < 2:
    sys.exit("needs at least 2 devices")
  impl = "xla" if jax.default_backend() == "cpu" else "cudnn"
  errs = attention_check(n, impl, jnp.bfloat16)
  errs.update(pipeline_check(n, jnp.float32))
  errs.update(pipeline_check(n, jnp.bfloat16))
  tol = {k: (2e-2 if ("bfloat16" in k or k.startswith("attention")) else 1e-5) for k in errs}
  ok = all(errs[k] <= tol[k] for k in errs)
  rec = dict(kind="sharding_gpu_check", device=jax.devices()[0].device_kind, devices=n, backend=jax.default_backend(),
             jax=jax.__version__, attention=impl, max_rel_err=errs, tolerance=tol, ok=ok,
             date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  print(json.dumps(rec, indent=1))
  out = os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "sharding_gpu_check.json"), "w", encoding="utf-8") as f:
    json.dump(rec, f, indent=1)
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
