"""Memory model: per-device memory of the stage-1/2 train steps at 1, 2, 4, 8 devices (docs/scaling.md).

A benchmark, not a test. For each stage and device count ``n`` it builds the mesh (``fsdp = n`` by default;
``--axis sequence`` puts the devices on the token axis instead, ``--axis data`` replicates), takes the stage's
config (``configs/base.py`` / ``configs/mid.py``: LoRA, optimiser, per-block remat, bf16 frozen base), describes
every input as a ``jax.ShapeDtypeStruct`` carrying its ``NamedSharding`` (frozen base, train state, batch), lowers
and compiles the very step ``train.py`` runs (``stages.make_train_step`` with a ``TrainLayout``) and reads
``compiled.memory_analysis()``. Nothing is allocated, so the 14B config runs on a CPU with simulated devices
(``--xla_force_host_platform_device_count``, set here before JAX starts).

Per device it reports: frozen weights, train state (trainables + AdamW moments), batch, the step's temporaries
(activations, gradients, collectives' buffers: XLA's ``temp``), and the total = arguments + temporaries +
non-aliased outputs (the state is donated, so its outputs alias its inputs).

Backend caveat: on XLA:CPU the stacked bf16 weights are converted to float32 for the dots, which inflates the
temporaries of the bf16 configs (see benchmarks/train_memory.py); the argument columns are exact on any backend.

    python benchmarks/memory_model.py                          # 14B, stages base + mid, 1/2/4/8 devices, CPU
    python benchmarks/memory_model.py --arch tiny --devices 1 2 # seconds; the same code path
    python benchmarks/memory_model.py --backend default --devices 1   # on one GPU: compile-only calibration

One JSON line per (stage, devices) is appended to ``OUT/memory_model.jsonl`` (``$OUT`` if set, else
``benchmarks/results``); a markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("base", "mid", "ahd")
GIB = 2 ** 30


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch", default="14b", choices=["14b", "tiny"])
  p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                 help="base / mid: the stage-1/2 step; ahd: the stage-3 DMD + GAN iteration's phases")
  p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
  p.add_argument("--axis", default="fsdp", choices=["fsdp", "sequence", "data"],
                 help="the mesh axis the devices go on (fsdp: ZeRO-3 style; sequence: Ulysses; data: replicas)")
  p.add_argument("--per-device-batch", type=int, default=1,
                 help="samples per data-parallel rank (global batch = this x data x fsdp)")
  p.add_argument("--height", type=int, default=384, help="video height in pixels (latents = height / 8)")
  p.add_argument("--width", type=int, default=640)
  p.add_argument("--remat", default="", help="override model.remat_policy (default: the config's)")
  p.add_argument("--backend", default="cpu", choices=["cpu", "default"],
                 help="cpu: simulated CPU devices (any count); default: JAX's own devices (e.g. the GPUs present)")
  p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"))
  return p.parse_args()


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.backend == "cpu":
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={max(ARGS.devices)}").strip()

sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from helios_jax.models.transformer import HeliosTransformer3DModel  # noqa: E402
from helios_jax.parallel import mesh as mesh_lib  # noqa: E402
from helios_jax.parallel.layout import TrainLayout  # noqa: E402
from helios_jax.training import stages, state as state_lib  # noqa: E402
from helios_jax.training.data import HISTORY_FRAMES  # noqa: E402

CHUNK = 9  # latent frames per chunk (33 video frames)


def stage_config(stage: str, args, n: int):
  from configs import base as base_config
  from configs import mid as mid_config
  cfg = (base_config if stage == "base" else mid_config).get_config("tiny" if args.arch == "tiny" else "")
  cfg.mesh[args.axis] = n
  cfg.batch_size = args.per_device_batch * cfg.mesh.data * cfg.mesh.fsdp
  if args.remat:
    cfg.model.remat_policy = args.remat
  if args.arch == "14b":
    cfg.data.height, cfg.data.width = args.height // 8, args.width // 8  # Wan VAE: 8x spatial compression
  return cfg


def per_device_bytes(tree) -> int:
  """Bytes one device holds of an abstract tree with shardings (the first device's shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    total += int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
  return total


def analyse(stage: str, n: int, args) -> dict:
  cfg = stage_config(stage, args, n)
  layout = TrainLayout(mesh_lib.make_mesh(mesh_lib.mesh_shape(cfg.mesh)), int(cfg.mesh.fsdp_min_size))
  tcfg = stages.transformer_config(cfg.model)
  graphdef, frozen = nnx.split(HeliosTransformer3DModel.abstract(tcfg))
  tx, schedule = state_lib.make_optimizer(cfg.optim)
  seed = int(cfg.seed)
  state = jax.eval_shape(lambda f: state_lib.init_train_state(stages.init_trainable(f, cfg.train, seed), tx, seed),
                         frozen)
  d, b = cfg.data, int(cfg.batch_size)
  shapes = dict(x0=(b, d.channels, 1, d.height, d.width), history=(b, d.channels, HISTORY_FRAMES, d.height, d.width),
                target=(b, d.channels, CHUNK, d.height, d.width), prompt_embeds=(b, d.text_len, d.text_dim))
  batch = {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=layout.batch_sharding(b)) for k, s in shapes.items()}
  frozen_in = mesh_lib.abstract(frozen, layout.shardings(frozen))
  state_in = mesh_lib.abstract(state, layout.shardings(state))
  step = stages.make_train_step(cfg, graphdef, tx, schedule, layout=layout, example=(state, frozen))
  t0 = time.perf_counter()
  with jax.set_mesh(layout.mesh):
    compiled = step.jitted.lower(state_in, frozen_in, batch).compile()
  compile_s = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  get = lambda k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0)
  arg, out, alias, temp = get("argument"), get("output"), get("alias"), get("temp")
  gib = lambda v: round(v / GIB, 2)
  rec = dict(kind="memory_model", stage=stage, devices=n, mesh=mesh_lib.format_mesh(layout.mesh),
             backend=jax.default_backend(), jax=jax.__version__, date=datetime.date.today().isoformat(),
             arch=args.arch, global_batch=b, latents=[d.height, d.width], chunk=CHUNK,
             remat=cfg.model.remat_policy, dtype=cfg.model.dtype, train_mode=cfg.train.mode,
             lora_rank=int(cfg.train.lora_rank), compile_s=round(compile_s, 1),
             per_device_gib=dict(frozen=gib(per_device_bytes(frozen_in)), state=gib(per_device_bytes(state_in)),
                                 batch=gib(per_device_bytes(batch)), arguments=gib(arg), temp=gib(temp),
                                 outputs_not_aliased=gib(max(out - alias, 0)),
                                 total=gib(arg + temp + max(out - alias, 0))))
  return rec


def batch_or_replicated(tree, layout: TrainLayout, batch: int):
  """Abstract inputs that are not parameters: batch-leading leaves split like the batch, the rest replicated."""
  def one(x):
    lead = len(x.shape) > 0 and x.shape[0] == batch
    s = layout.batch_sharding(batch) if lead else mesh_lib.replicated(layout.mesh)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  return jax.tree.map(one, tree)


def analyse_ahd(n: int, args) -> dict:
  """Stage 3: each jitted phase of one AHD iteration (``ahd_trainer.Phases``) compiled on the mesh.

  Resident per device: both frozen trunks (generator and teacher, separate weights as released), generator and
  critic trainables + AdamW states, the EMA (no host offload: the mesh's FSDP replaces it). The iteration's peak
  is estimated as resident + the largest phase's temporaries and outputs.
  """
  from configs import ahd as ahd_config
  from helios_jax.training.trainers import ahd as ahd_trainer
  c = ahd_config.get_config("gan")
  if args.arch == "tiny":
    ahd_config.make_tiny(c)
  else:
    c.data.height, c.data.width = args.height // 8, args.width // 8
  c.gan.start_step = 0  # the iteration includes the GAN terms
  c.dmd.amplify_first_chunk = False  # the regular rollout with a non-zero history
  c.offload.optimizer_on_host = c.offload.ema_on_host = c.offload.idle_trunk_on_host = False
  if args.remat:
    c.model.remat_policy = args.remat
  c.mesh[args.axis] = n
  b = args.per_device_batch * c.mesh.data * c.mesh.fsdp
  layout = TrainLayout(mesh_lib.make_mesh(mesh_lib.mesh_shape(c.mesh)), int(c.mesh.fsdp_min_size))
  mcfg = stages.transformer_config(c.model)
  graphdef, frozen = nnx.split(HeliosTransformer3DModel.abstract(mcfg))
  tx_gen, _ = state_lib.make_optimizer(c.optim)
  tx_critic, _ = state_lib.make_optimizer(c.critic_optim)
  state = jax.eval_shape(lambda f: ahd_trainer.init_state(c, ahd_trainer.Trunks(f, f), mcfg, tx_gen, tx_critic),
                         frozen)
  d = c.data
  chunk = (b, d.channels, CHUNK, d.height, d.width)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  batch = dict(x0=f32(b, d.channels, 1, d.height, d.width), history=f32(b, d.channels, HISTORY_FRAMES, d.height,
                                                                        d.width),
               target=f32(*chunk), prompt_embeds=f32(b, d.text_len, d.text_dim))
  batch.update(x0_2=batch["x0"], history_2=batch["history"], target_2=batch["target"])
  batch = batch_or_replicated(batch, layout, b)
  negative = batch_or_replicated(f32(d.text_len, d.text_dim), layout, b)
  frozen_in = mesh_lib.abstract(frozen, layout.shardings(frozen))
  st = mesh_lib.abstract(state, layout.shardings(state))
  ph = ahd_trainer.Phases(c, ahd_trainer.make_roles(c, graphdef), tx_gen, tx_critic, chunk)
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=mesh_lib.replicated(layout.mesh))
  phases, t0 = {}, time.perf_counter()
  with jax.set_mesh(layout.mesh):
    pre = batch_or_replicated(jax.eval_shape(ph.prepare, st["rng"], step, batch, negative), layout, b)
    (cond_gen, cond), keys = pre["gen"], pre["keys"]
    keys = [jax.ShapeDtypeStruct(keys.shape[1:], keys.dtype, sharding=mesh_lib.replicated(layout.mesh))] * 3
    gen, critic = st["gen"], st["critic"]
    x = batch_or_replicated(jax.eval_shape(ph.rollout, gen["trainable"], frozen_in, cond_gen, keys[0], False),
                            layout, b)
    cot = batch_or_replicated(jax.eval_shape(ph.score, critic["trainable"], frozen_in, x, cond, keys[1], step,
                                             True)[0], layout, b)
    grads = lambda part: mesh_lib.abstract(st[part]["trainable"], layout.shardings(st[part]["trainable"]))
    calls = dict(rollout=(ph.rollout, (gen["trainable"], frozen_in, cond_gen, keys[0], False)),
                 score=(ph.score, (critic["trainable"], frozen_in, x, cond, keys[1], step, True)),
                 gen_grads=(ph.gen_grads, (gen["trainable"], frozen_in, cond_gen, keys[0], cot, False)),
                 critic_grads=(ph.critic_grads, (critic["trainable"], frozen_in, x, batch["target_2"], cond, keys[2],
                                                 True)),
                 gen_update=(ph.gen_update, (gen["trainable"], gen["opt_state"], grads("gen"))),
                 critic_update=(ph.critic_update, (critic["trainable"], critic["opt_state"], grads("critic"))))
    for name, (fn, fargs) in calls.items():
      ma = fn.lower(*fargs).compile().memory_analysis()
      phases[name] = dict(temp=int(ma.temp_size_in_bytes), output=int(ma.output_size_in_bytes),
                          alias=int(ma.alias_size_in_bytes))
  compile_s = time.perf_counter() - t0
  resident = 2 * per_device_bytes(frozen_in) + per_device_bytes(st)
  worst = max(phases, key=lambda k: phases[k]["temp"] + phases[k]["output"] - phases[k]["alias"])
  transient = phases[worst]["temp"] + phases[worst]["output"] - phases[worst]["alias"]
  gib = lambda v: round(v / GIB, 2)
  return dict(kind="memory_model", stage="ahd", devices=n, mesh=mesh_lib.format_mesh(layout.mesh),
              backend=jax.default_backend(), jax=jax.__version__, date=datetime.date.today().isoformat(),
              arch=args.arch, global_batch=b, latents=[d.height, d.width], chunk=CHUNK, remat=c.model.remat_policy,
              dtype=c.model.dtype, train_mode=c.train.mode, lora_rank=int(c.train.lora_rank),
              compile_s=round(compile_s, 1), largest_phase=worst,
              phases_gib={k: {kk: gib(vv) for kk, vv in v.items()} for k, v in phases.items()},
              per_device_gib=dict(frozen=gib(2 * per_device_bytes(frozen_in)), state=gib(per_device_bytes(st)),
                                  batch=gib(per_device_bytes(batch)), temp=gib(phases[worst]["temp"]),
                                  total=gib(resident + transient)))


def table(records: list[dict]) -> str:
  lines = ["| stage | devices (mesh) | global batch | frozen | train state | step temporaries | total per device |",
           "|---|---|---|---|---|---|---|"]
  for r in records:
    g = r["per_device_gib"]
    lines.append(f"| {r['stage']} | {r['devices']} ({r['mesh']}) | {r['global_batch']} | {g['frozen']} | "
                 f"{g['state']} | {g['temp']} | **{g['total']}** |")
  return "\n".join(lines)


def main():
  args = ARGS
  os.makedirs(args.out, exist_ok=True)
  print(f"backend {jax.default_backend()}, {len(jax.devices())} devices, jax {jax.__version__}", flush=True)
  records = []
  for stage in args.stages:
    for n in args.devices:
      rec = analyse_ahd(n, args) if stage == "ahd" else analyse(stage, n, args)
      print(json.dumps(rec), flush=True)
      with open(os.path.join(args.out, "memory_model.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
      records.append(rec)
  print(f"\nGiB per device ({args.arch}, {records[0]['dtype']} frozen base, LoRA, remat {records[0]['remat']}, "
        f"{args.per_device_batch} sample(s) per data-parallel rank, backend {jax.default_backend()}):\n")
  print(table(records))


if __name__ == "__main__":
  main()
