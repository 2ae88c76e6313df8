"""Peak device memory and step time of one full stage-3 AHD iteration at the 14B config (random bf16 weights).

A benchmark, not a test. One iteration = a generator step (student rollout, DMD teacher/critic evaluations, GAN
generator term with Cache Grad, rollout again with gradient, AdamW) plus a critic step (rollout, fake-score flow
matching, packed discriminator on fake / real / R1-perturbed crops, approximate R1, AdamW) plus the EMA update,
exactly the code path of ``train.py --config configs/ahd.py:gan`` (``helios_jax.training.trainers.ahd.train_step``).

Settings of the 14B run: ``HeliosTransformerConfig()`` defaults, 384x640 pixels -> 48x80 latents, 9-latent chunk,
history 16/2/1, batch 1, LoRA rank 256 on all linear layers (+ the memory-patch LoRAs of the generator), GAN heads
on blocks 5/15/25/35 + output (width 768), per-block remat, weights built directly on the device. By default the
generator and teacher trunks are two different weight sets (the released recipe); ``--shared-trunk`` uses one.
Offload (default on for 14B): Adam moments and the EMA live in pinned host memory between updates and only the
trunk of the running phase stays on the device.

Records (JSON, to ``--out`` and to $OUT when set): kind "ahd_memory", device, peak_gib (``memory_stats``
peak_bytes_in_use), target_gib 80, fits_target, step_s (third iteration), compile_s (first minus third), a
breakdown (trunks, trainables, device-resident optimizer / EMA, host-resident bytes, per-phase XLA temp bytes from
``compiled.memory_analysis()``), settings, date.

    python benchmarks/ahd_memory.py                       # 14B on one GPU
    python benchmarks/ahd_memory.py --arch tiny --out /tmp/ahd_mem   # dry run anywhere (CPU)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from helios_jax.models.transformer import HeliosTransformer3DModel  # noqa: E402
from helios_jax.training import offload, stages, state as state_lib  # noqa: E402
from helios_jax.training.trainers import ahd as ahd_trainer  # noqa: E402

GIB = 2 ** 30
TARGET_GIB = 80.0  # an 80 GB H100, the reference's stage-3 budget (issue #127)
STATIC_ARGNUMS = {"rollout": (4,), "score": (6,), "gen_grads": (5,), "critic_grads": (6,)}


def tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def tree_bytes_in(tree, kind: str) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
                 if isinstance(x, jax.Array) and (x.sharding.memory_kind or "device") == kind))


_T0 = time.perf_counter()


def log(msg: str) -> None:
  """A progress line with the time since start-up and the device peak so far (a slow 14B run shows where it is)."""
  peak = (device_stats().get("peak_bytes_in_use", 0)) / GIB
  print(f"[{time.perf_counter() - _T0:7.1f} s | peak {peak:6.2f} GiB] {msg}", flush=True)


def device_stats() -> dict:
  return jax.local_devices()[0].memory_stats() or {}


class Recorded:
  """A jitted phase compiled explicitly on its first call per static key, keeping ``memory_analysis()``."""

  def __init__(self, name: str, fn, static: tuple[int, ...], sink: dict):
    self.name, self.fn, self.static, self.sink, self.compiled = name, fn, static, sink, {}
    self.timing: dict | None = None  # phase -> seconds, filled during the timed iteration

  def __call__(self, *args):
    key = tuple(args[i] for i in self.static)
    if key not in self.compiled:
      t = time.perf_counter()
      log(f"compiling {self.name}{list(key) if key else ''} ...")
      self.compiled[key] = self.fn.lower(*args).compile()
      log(f"compiled {self.name}{list(key) if key else ''} in {time.perf_counter() - t:.1f} s")
      ma = self.compiled[key].memory_analysis()
      if ma is not None:
        self.sink[f"{self.name}{list(key) if key else ''}"] = dict(
            temp_gib=round(ma.temp_size_in_bytes / GIB, 3), argument_gib=round(ma.argument_size_in_bytes / GIB, 3),
            output_gib=round(ma.output_size_in_bytes / GIB, 3))
    if self.timing is None:
      return self.compiled[key](*[a for i, a in enumerate(args) if i not in self.static])
    t = time.perf_counter()  # the timed iteration: each phase waited for, to split the step time
    out = jax.block_until_ready(self.compiled[key](*[a for i, a in enumerate(args) if i not in self.static]))
    label = f"{self.name}{list(key) if key else ''}_s"
    self.timing[label] = round(self.timing.get(label, 0.0) + time.perf_counter() - t, 3)
    return out


def build_trunk(model_cfg, seed: int):
  """Random frozen weights created inside jit (directly on the device, never a host copy)."""
  cfg = stages.transformer_config(model_cfg)
  abstract = nnx.eval_shape(lambda: HeliosTransformer3DModel(cfg, rngs=nnx.Rngs(seed)))
  graphdef, _ = nnx.split(abstract)
  state = jax.jit(lambda: nnx.split(HeliosTransformer3DModel(cfg, rngs=nnx.Rngs(seed)))[1])()
  return graphdef, state, cfg


def make_config(args):
  from configs import ahd as ahd_config
  c = ahd_config.get_config("gan")
  c.gan.start_step = 0  # the iteration includes the GAN terms
  c.dmd.amplify_first_chunk = False  # a non-zero history: the regular [2, 2, 2] rollout
  if args.arch == "tiny":
    ahd_config.make_tiny(c)
    c.gan.start_step = 0
    c.model.dtype = args.dtype or "float32"
    c.model.remat_policy = args.remat or "none"
  else:
    c.model.arch = "14b"
    c.model.dtype = args.dtype or "bfloat16"
    c.model.remat_policy = args.remat or "full"
    c.train.lora_rank = c.critic.lora_rank = args.rank
    c.train.lora_alpha = c.critic.lora_alpha = float(args.rank)
    c.data.height, c.data.width, c.data.channels = args.latent_height, args.latent_width, 16
    c.data.text_len, c.data.text_dim = 512, 4096
  offload_on = args.offload if args.offload is not None else args.arch == "14b"
  c.offload.optimizer_on_host = c.offload.ema_on_host = c.offload.idle_trunk_on_host = offload_on
  return c


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--arch", choices=("14b", "tiny"), default="14b")
  p.add_argument("--dtype", default=None, help="frozen trunk dtype (bfloat16 for 14b, float32 for tiny)")
  p.add_argument("--rank", type=int, default=256)
  p.add_argument("--remat", default=None, help="remat policy per block (default: full for 14b, none for tiny)")
  p.add_argument("--latent-height", type=int, default=48)
  p.add_argument("--latent-width", type=int, default=80)
  p.add_argument("--shared-trunk", action="store_true", help="generator base == teacher base (one frozen trunk)")
  p.add_argument("--offload", dest="offload", action="store_true", default=None)
  p.add_argument("--no-offload", dest="offload", action="store_false")
  p.add_argument("--iterations", type=int, default=3, help="generator+critic iterations; the last one is timed")
  p.add_argument("--out", default="benchmarks/results")
  args = p.parse_args()

  dev = jax.local_devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"pinned_host: {offload.available(offload.HOST)}", flush=True)
  config = make_config(args)
  t0 = time.perf_counter()
  graphdef, gen_state, mcfg = build_trunk(config.model, 0)
  if args.shared_trunk:
    teacher_state = gen_state
  else:
    gen_state = offload.to_host(gen_state, bool(config.offload.idle_trunk_on_host), donate=True)
    _, teacher_state, _ = build_trunk(config.model, 1)
  trunks = ahd_trainer.Trunks(gen_state, teacher_state, bool(config.offload.idle_trunk_on_host))
  trunk_bytes = tree_bytes(gen_state) * (1 if args.shared_trunk else 2)
  roles = ahd_trainer.make_roles(config, graphdef)
  tx_gen, _ = state_lib.make_optimizer(config.optim)
  tx_critic, _ = state_lib.make_optimizer(config.critic_optim)
  state = ahd_trainer.init_state(config, trunks, mcfg, tx_gen, tx_critic)
  jax.block_until_ready(state)
  build_s = time.perf_counter() - t0
  after_build = device_stats().get("bytes_in_use", 0)

  d = config.data
  rng = np.random.default_rng(0)
  shape = (1, d.channels, 9, d.height, d.width)
  batch = dict(x0=rng.normal(size=shape[:2] + (1,) + shape[3:]), history=rng.normal(size=shape[:2] + (19,) + shape[3:]),
               target=rng.normal(size=shape), prompt_embeds=rng.normal(size=(1, d.text_len, d.text_dim)))
  batch.update(x0_2=batch["x0"], history_2=batch["history"], target_2=rng.normal(size=shape))
  batch = {k: v.astype(np.float32) for k, v in batch.items()}
  negative = jnp.zeros((d.text_len, d.text_dim), jnp.float32)

  log("built the example batch")
  phases = ahd_trainer.Phases(config, roles, tx_gen, tx_critic, shape)
  analysis: dict = {}
  for name, static in STATIC_ARGNUMS.items():
    setattr(phases, name, Recorded(name, getattr(phases, name), static, analysis))

  log(f"built trunks, trainables, optimizer state and EMA in {build_s:.1f} s "
      f"({after_build / GIB:.2f} GiB on the device)")
  settings = dict(arch=args.arch, dtype=config.model.dtype, latent=[d.height, d.width], chunk=9, history=[16, 2, 1],
                  batch=1, lora_rank=int(config.train.lora_rank), remat=config.model.remat_policy,
                  shared_trunk=bool(args.shared_trunk), gan_hooks=list(config.gan.hooks),
                  gan_head_width=int(config.gan.head_width), rollout_steps=list(config.dmd.rollout_steps),
                  offload=dict(config.offload.to_dict()), num_layers=mcfg.num_layers, dim=mcfg.inner_dim)
  name = f"ahd_memory_{args.arch}_{'shared' if args.shared_trunk else 'two'}_trunk.json"

  def write_record(times, step_metrics, phase_s):
    """Written after every iteration, so a run cut short by its time limit still leaves what it measured."""
    peak = device_stats().get("peak_bytes_in_use", 0) / GIB
    opt = (state["gen"]["opt_state"], state["critic"]["opt_state"])
    breakdown = dict(
        trunks_gib=round(trunk_bytes / GIB, 3),
        generator_trainable_gib=round(tree_bytes(state["gen"]["trainable"]) / GIB, 3),
        critic_lora_gib=round(tree_bytes({k: state["critic"]["trainable"][k] for k in ("lora", "full")}) / GIB, 3),
        gan_heads_gib=round(tree_bytes(state["critic"]["trainable"]["heads"]) / GIB, 3),
        optimizer_gib=round(tree_bytes(opt) / GIB, 3),
        optimizer_on_device_gib=round(tree_bytes_in(opt, "device") / GIB, 3),
        ema_gib=round(tree_bytes(state.get("ema", {})) / GIB, 3),
        host_resident_gib=round(tree_bytes_in((opt, state.get("ema", {}), trunks.gen, trunks.teacher),
                                              offload.HOST) / GIB, 3),
        bytes_in_use_after_build_gib=round(after_build / GIB, 3),
        phase_memory=analysis)
    rec = dict(kind="ahd_memory", device=dev.device_kind, backend=jax.default_backend(), jax=jax.__version__,
               peak_gib=round(peak, 3), target_gib=TARGET_GIB, fits_target=bool(peak <= TARGET_GIB),
               step_s=round(times[-1], 3) if len(times) > 1 else None,
               compile_s=round(times[0] - times[-1], 3) if len(times) > 1 else None, build_s=round(build_s, 3),
               iteration_s=[round(t, 3) for t in times], phase_s=phase_s,
               metrics=step_metrics, breakdown=breakdown, settings=settings,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    for folder in {args.out, os.environ.get("OUT") or args.out}:
      os.makedirs(folder, exist_ok=True)
      with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        json.dump(rec, f, indent=1)
    return rec

  times, rec = [], None
  ratio = int(config.dmd.update_ratio)
  steps = [i * ratio for i in range(args.iterations)]  # generator+critic iterations; the last is timed
  for i, step in enumerate(steps):
    timed = i == len(steps) - 1 and i > 0
    for name_ in STATIC_ARGNUMS:
      getattr(phases, name_).timing = {} if timed else None
    t = time.perf_counter()
    state, m = ahd_trainer.train_step(phases, trunks, state, batch, negative, step)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t)
    step_metrics = {k: float(v) for k, v in m.items()}
    phase_s = {}
    if timed:
      for name_ in STATIC_ARGNUMS:
        phase_s.update(getattr(phases, name_).timing)
      phase_s["other_s"] = round(times[-1] - sum(phase_s.values()), 3)  # trunk swaps, optimizer/EMA moves, updates
    log(f"iteration {len(times)} (step {step}): {times[-1]:.2f} s, "
        f"{json.dumps({k: round(v, 4) for k, v in step_metrics.items()})}" + (f", phases {phase_s}" if timed else ""))
    rec = write_record(times, step_metrics, phase_s)
  print(json.dumps(rec), flush=True)


if __name__ == "__main__":
  main()
