"""Peak memory and step time of the stage-1 (Base) and stage-2 (Mid) train steps at the released 14B size.

A benchmark, not a test. For each stage it takes the stage's config (``configs/base.py`` / ``configs/mid.py``:
LoRA rank/alpha/targets, fully trained memory patches, optimiser, remat per block), sets batch 1 and the latent
size (384x640 video = 48x80 latents, 9-latent chunk, history 16/2/1), builds the bf16 frozen base with random
weights directly on the device (initialised inside ``jax.jit``: never a 28 GB host copy), the float32 trainables
and the AdamW state likewise, compiles the one jitted train step, runs it a few times and records:

  kind="train_memory", stage, device, peak_gib (device ``memory_stats()["peak_bytes_in_use"]``; null on the CPU),
  step_s (median over the timed steps), compile_s, date, settings, breakdown (GiB: frozen weights, trainables,
  optimizer state, and the compiled step's temporaries = activations + gradients + transients, from
  ``compiled.memory_analysis()``).

Each stage runs in its own process (so one stage's peak is not the other's) and one JSON line per stage is
appended to ``OUT/train_memory.jsonl`` (``--out``, else ``$OUT``, else ``benchmarks/results``; dry runs with ``--arch tiny``
write to a temporary folder instead) and printed.

    python benchmarks/train_memory.py                       # 14B, both stages, on a GPU
    python benchmarks/train_memory.py --arch tiny --steps 1  # the same code path as a CPU dry run (seconds)

``--abstract`` compiles with shapes only and records ``memory_analysis()`` (no allocation; runs the 14B config on
a CPU). On the CPU the bf16 numbers are not the GPU's: XLA:CPU converts the stacked bf16 weights to float32 for its
dots (about 1.3 GiB of temporaries per 14B block, in inference too); ``--dtype float32`` shows the step's own
per-layer cost there.

The GPU machine has no ml_collections: ``pip install --no-deps .whl/ml_collections-*.whl`` first (PyYAML and
absl are there).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.fps import build_on_device  # noqa: E402
from helios_jax.models.transformer import HeliosTransformer3DModel  # noqa: E402
from helios_jax.training import lora, stages, state as state_lib  # noqa: E402
from helios_jax.training.data import HISTORY_FRAMES  # noqa: E402

GIB = 2**30
STAGES = ("base", "mid")


def stage_config(stage: str, arch: str, args):
  """The stage's config (default variant, or ``:tiny``) with the benchmark's size and batch."""
  from configs import base as base_config
  from configs import mid as mid_config
  cfg = (base_config if stage == "base" else mid_config).get_config("tiny" if arch == "tiny" else "")
  cfg.batch_size = args.batch
  cfg.model.remat_policy = args.remat
  cfg.model.attention_implementation = args.attention
  if args.dtype:
    cfg.model.dtype = args.dtype
  if arch == "tiny":
    cfg.data.height, cfg.data.width = 8, 8
  else:
    cfg.data.height, cfg.data.width = args.height // 8, args.width // 8  # Wan VAE: 8x spatial compression
  return cfg


def nbytes(tree) -> int:
  return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def random_batch(cfg, chunk: int) -> dict:
  """Device-resident batch of the layout :func:`helios_jax.training.data.get_batch` returns."""
  d, b = cfg.data, int(cfg.batch_size)
  shape = lambda t: (b, d.channels, t, d.height, d.width)
  ks = jax.random.split(jax.random.key(1), 4)
  return dict(x0=jax.random.normal(ks[0], shape(1)), history=jax.random.normal(ks[1], shape(HISTORY_FRAMES)),
              target=jax.random.normal(ks[2], shape(chunk)),
              prompt_embeds=0.1 * jax.random.normal(ks[3], (b, d.text_len, d.text_dim)))


def peak_gib() -> float | None:
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats or "peak_bytes_in_use" not in stats else stats["peak_bytes_in_use"] / GIB


def run_stage(stage: str, args) -> dict:
  cfg = stage_config(stage, args.arch, args)
  chunk = 9  # latent frames per chunk (spec: 33 video frames)
  dev = jax.devices()[0]
  t0 = time.perf_counter()
  tcfg = stages.transformer_config(cfg.model)
  if args.layers:
    tcfg = dataclasses.replace(tcfg, num_layers=args.layers)
  tx, schedule = state_lib.make_optimizer(cfg.optim)
  init_trainable = lambda f: stages.init_trainable(f, cfg.train, int(cfg.seed))
  init_state = lambda t: state_lib.init_train_state(t, tx, int(cfg.seed))
  if args.abstract:  # shapes only: compile and analyse without allocating anything
    graphdef, frozen = nnx.split(HeliosTransformer3DModel.abstract(tcfg))
    state = jax.eval_shape(lambda f: init_state(init_trainable(f)), frozen)
    batch = jax.eval_shape(lambda: random_batch(cfg, chunk))
  else:
    graphdef, frozen = nnx.split(build_on_device(HeliosTransformer3DModel, tcfg, seed=0))
    state = jax.jit(init_state, donate_argnums=0)(jax.jit(init_trainable)(frozen))
    batch = random_batch(cfg, chunk)
    jax.block_until_ready((frozen, state, batch))
  build_s = time.perf_counter() - t0
  sizes = dict(frozen_weights=nbytes(frozen), trainables=nbytes(state["trainable"]),
               optimizer_state=nbytes(state["opt_state"]), batch=nbytes(batch))
  print(f"[{stage}] built in {build_s:.1f}s: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in sizes.items()),
        flush=True)

  step_fn = stages.make_train_step(cfg, graphdef, tx, schedule)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  analysis = {} if ma is None else {k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0)
                                     for k in ("argument", "output", "alias", "temp", "generated_code")}
  print(f"[{stage}] compiled in {compile_s:.1f}s; memory_analysis (GiB): "
        + json.dumps({k: round(v / GIB, 3) for k, v in analysis.items()}), flush=True)

  times, loss = [], None
  for i in range(0 if args.abstract else args.steps + 1):  # the first call is a warm-up (allocation, autotuning)
    t = time.perf_counter()
    state, m = compiled(state, frozen, batch)
    loss = float(m["loss"])  # blocks until the step is done
    if i:
      times.append(time.perf_counter() - t)
  step_s = float(np.median(times)) if times else None
  tokens = stages.tokens_per_step(batch["target"].shape, stage, tuple(cfg.objective.stage2_sample_ratios))
  peak = None if args.abstract else peak_gib()
  rec = dict(kind="train_memory", stage=stage, device=dev.device_kind, backend=jax.default_backend(),
             peak_gib=None if peak is None else round(peak, 2), step_s=None if step_s is None else round(step_s, 3),
             compile_s=round(compile_s, 1), build_s=round(build_s, 1), date=datetime.date.today().isoformat(),
             jax=jax.__version__, loss=loss, tokens_per_step=tokens,
             tokens_per_s=None if not step_s else round(tokens / step_s, 1),
             settings=dict(arch=args.arch, layers=tcfg.num_layers, height=args.height if args.arch == "14b" else None,
                           width=args.width if args.arch == "14b" else None,
                           latents=[cfg.data.height, cfg.data.width], chunk=chunk, history=[16, 2, 1],
                           batch=int(cfg.batch_size), remat=cfg.model.remat_policy, dtype=cfg.model.dtype,
                           attention=cfg.model.attention_implementation, train_mode=cfg.train.mode,
                           lora_rank=int(cfg.train.lora_rank), lora_alpha=float(cfg.train.lora_alpha),
                           lora_patch_embedding=bool(cfg.train.lora_patch_embedding),
                           memory_patches=cfg.train.memory_patches,
                           sample_ratios=list(cfg.objective.stage2_sample_ratios) if stage == "mid" else None,
                           num_trainable=lora.count(state["trainable"]), timed_steps=len(times),
                           abstract=bool(args.abstract)),
             breakdown_gib=dict(**{k: round(v / GIB, 3) for k, v in sizes.items()},
                                step_temp=round(analysis["temp"] / GIB, 3) if "temp" in analysis else None,
                                step_arguments=round(analysis["argument"] / GIB, 3) if analysis else None,
                                step_outputs=round(analysis["output"] / GIB, 3) if analysis else None,
                                step_aliased=round(analysis["alias"] / GIB, 3) if analysis else None))
  if analysis:  # the step's live memory floor: every argument plus the temporaries (outputs alias the donated state)
    rec["breakdown_gib"]["step_floor"] = round((analysis["argument"] + analysis["temp"]) / GIB, 2)
  return rec


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch", default="14b", choices=["14b", "tiny"])
  p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
  p.add_argument("--height", type=int, default=384, help="video height in pixels (latents = height / 8)")
  p.add_argument("--width", type=int, default=640)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--remat", default="full", choices=["none", "full", "dots", "dots_no_batch"])
  p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
  p.add_argument("--dtype", default="", choices=["", "bfloat16", "float32"], help="frozen base dtype override")
  p.add_argument("--layers", type=int, default=0, help="override the number of blocks (0 = the config's)")
  p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
  p.add_argument("--out", default=os.environ.get("OUT"),
                 help="folder of train_memory.jsonl (default: $OUT, else benchmarks/results for the 14B arch and a "
                      "temporary folder for dry runs, which never touch the recorded results)")
  p.add_argument("--abstract", action="store_true",
                 help="compile with abstract inputs and record memory_analysis only (no allocation, no steps)")
  p.add_argument("--in-process", action="store_true", help="run the stages in this process (no subprocess)")
  a = p.parse_args()
  if a.out is None:
    a.out = os.path.join(ROOT, "benchmarks", "results") if a.arch != "tiny" else os.path.join(
        tempfile.gettempdir(), "helios_jax_train_memory")
  os.makedirs(a.out, exist_ok=True)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
  if len(a.stages) > 1 and not a.in_process:
    # One process per stage: device peak memory cannot be reset, and one stage's failure leaves the other.
    rc = 0
    for stage in a.stages:
      # argparse keeps the last --stages given.
      rc |= subprocess.call([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--stages", stage])
    sys.exit(rc)
  path = os.path.join(a.out, "train_memory.jsonl")
  for stage in a.stages:
    try:
      rec = run_stage(stage, a)
    except Exception as e:  # noqa: BLE001  (an out-of-memory is a result too)
      rec = dict(kind="train_memory", stage=stage, device=jax.devices()[0].device_kind, error=repr(e)[:2000],
                 peak_gib=peak_gib(), date=datetime.date.today().isoformat(), settings=vars(a))
    print(json.dumps(rec), flush=True)
    with open(path, "a", encoding="utf-8") as f:
      f.write(json.dumps(rec) + "\n")
    print(f"appended to {path}", flush=True)
    if "error" in rec:
      sys.exit(1)


if __name__ == "__main__":
  main()
