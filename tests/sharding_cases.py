"""The sharding test cases, run by tests/test_sharding.py in a subprocess on 8 simulated CPU devices.

XLA reads ``--xla_force_host_platform_device_count`` when JAX creates its CPU backend, so these cases cannot run in
the pytest process (the rest of the suite runs on one device). ``python tests/sharding_cases.py CASE WORKDIR`` runs
one case; it exits non-zero (with the assertion's message) on a mismatch. Every sharded result is compared with the
same computation on one device, done in the same process.
"""

from __future__ import annotations

import os
import sys

# The stage-3 case compiles about twenty programs and runs each once or twice: LLVM's -O0 halves its compile time
# (numerics are XLA's, not LLVM's; both sides of every comparison are compiled alike).
FAST_COMPILE = " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           + (FAST_COMPILE if sys.argv[1:2] == ["ahd"] else "")).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "configs"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from helios_jax.parallel import mesh as mesh_lib  # noqa: E402
from helios_jax.parallel.layout import TrainLayout  # noqa: E402

GLOBAL_BATCH = 8  # divisible by every batch split used below (2x4, 1x8, 1x4)
STEPS = 2


def tiny_config(total_steps: int = STEPS, **mesh):
  import base
  c = base.get_config("tiny")
  c.batch_size = GLOBAL_BATCH
  c.total_steps = total_steps
  c.export_merged = False
  c.checkpoint.every = 1000
  for k, v in mesh.items():
    c.mesh[k] = v
  return c


def layout_for(**mesh) -> TrainLayout:
  return TrainLayout(mesh_lib.make_mesh(mesh_lib.mesh_shape(mesh)), fsdp_min_size=0)


def sharded_axes(tree) -> set:
  """Mesh axes used by any leaf's sharding."""
  out = set()
  for x in jax.tree.leaves(tree):
    for entry in x.sharding.spec:
      out.update((entry,) if isinstance(entry, str) else (entry or ()))
  return out


def run_steps(config, layout: TrainLayout, steps: int):
  """The trainer's step path (model, state, jitted step, batches) for ``steps`` steps: (losses, state on host)."""
  from helios_jax.training import data, stages, state as state_lib
  from helios_jax.training.trainer import make_source
  graphdef, frozen = nnx.split(stages.build_model(config.model))
  frozen = layout.place(frozen)
  tx, schedule = state_lib.make_optimizer(config.optim)
  seed = int(config.seed)
  state = layout.init(lambda f: state_lib.init_train_state(stages.init_trainable(f, config.train, seed), tx, seed),
                      frozen)
  step = stages.make_train_step(config, graphdef, tx, schedule, layout=layout, example=(state, frozen))
  source = make_source(config)
  losses = []
  for i in range(steps):
    batch = data.get_batch(source, i, int(config.batch_size), int(config.data.seed))
    state, m = step(state, frozen, layout.place_batch(batch))
    losses.append(float(m["loss"]))
  if layout.mesh.size > 1:
    assert "fsdp" in sharded_axes(frozen) or mesh_lib.axis_size(layout.mesh, "fsdp") == 1, "frozen base not sharded"
    assert "fsdp" in sharded_axes(state) or mesh_lib.axis_size(layout.mesh, "fsdp") == 1, "train state not sharded"
  return losses, jax.device_get(state)


def assert_trees_close(a, b, what: str, rtol=1e-4, atol=1e-5):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=f"{what}: {jax.tree_util.keystr(path)}")


def case_training(workdir: str) -> None:
  """One device vs train.py's loop on data=2 x fsdp=4, resumed on fsdp=4 x sequence=2 (sequence-parallel)."""
  from helios_jax.training import checkpointing
  from helios_jax.training.trainer import train
  ref_losses, ref_state = run_steps(tiny_config(), layout_for(), STEPS)
  print("single device", ref_losses)

  run = os.path.join(workdir, "run")
  first = train(tiny_config(total_steps=STEPS - 1, data=2, fsdp=4), run, progress=False)
  second = train(tiny_config(total_steps=STEPS, data=1, fsdp=4, sequence=2), run, progress=False)
  assert second["resumed_from"] == STEPS - 1, second
  losses = first["losses"] + second["losses"]
  print("2x4 -> fsdp 4 x sequence 2", losses)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg="losses, sharded runs vs one device")
  ckpt = checkpointing.Checkpointer(run, keep=2)
  restored, _ = ckpt.restore(jax.device_put(ref_state, jax.devices()[0]))
  ckpt.close()
  assert_trees_close(restored["trainable"], ref_state["trainable"], "trainables, sharded runs vs one device")


def case_checkpoint(workdir: str) -> None:
  """A train state saved on 2x4 restores on 1x8 (resharded), is saved again, and restores on one device."""
  from helios_jax.training import checkpointing, stages, state as state_lib
  config = tiny_config()
  frozen = nnx.split(stages.build_model(config.model))[1]
  tx, _ = state_lib.make_optimizer(config.optim)
  state = state_lib.init_train_state(stages.init_trainable(frozen, config.train, 0), tx, 0)
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
  state = jax.tree.map(lambda x: x + jax.random.normal(next(keys), x.shape, x.dtype)
                       if jnp.issubdtype(x.dtype, jnp.floating) else x, state)  # no all-zero moments
  state["step"] = jnp.asarray(5, jnp.int32)
  host = jax.device_get(state)
  previous, previous_mesh = host, None
  for i, mesh in enumerate((dict(data=2, fsdp=4), dict(data=1, fsdp=8), dict())):
    layout = layout_for(**mesh)
    template = layout.place(jax.tree.map(np.zeros_like, host))
    if i > 0:
      ckpt = checkpointing.Checkpointer(os.path.join(workdir, f"ckpt{i - 1}"), keep=1)
      restored, meta = ckpt.restore(template)
      ckpt.close()
      assert meta["mesh"] == previous_mesh, meta
      for x, t in zip(jax.tree.leaves(restored), jax.tree.leaves(template)):
        assert x.sharding == t.sharding, (x.sharding, t.sharding)
      assert_trees_close(restored, host, f"restored on {mesh_lib.format_mesh(layout.mesh)}", rtol=0, atol=0)
      previous = restored
    else:
      previous = layout.place(host)
    if i < 2:
      ckpt = checkpointing.Checkpointer(os.path.join(workdir, f"ckpt{i}"), keep=1)
      ckpt.save(previous, dict(mesh=mesh_lib.format_mesh(layout.mesh)))
      ckpt.close()
      previous_mesh = mesh_lib.format_mesh(layout.mesh)
    print("ok", mesh_lib.format_mesh(layout.mesh), sorted(sharded_axes(previous)))


def case_sampling(workdir: str) -> None:
  """Plain pipeline with CFG: one device vs CFG-parallel + FSDP + Ulysses meshes; attention alone, incl. grads."""
  from helios_jax import HeliosPipeline
  from helios_jax.models.attention import dot_product_attention
  from helios_jax.parallel import sampling

  mesh = mesh_lib.make_mesh(dict(data=2, fsdp=1, sequence=4))
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(key, (2, 37, 8, 16)) for key in ks[:3])  # 37 tokens: padded to 40
  text = jax.random.normal(ks[3], (2, 5, 8, 16))
  loss = lambda q, k, v: jnp.sum(jnp.sin(dot_product_attention(q, k, v, "xla")))
  fn = jax.jit(lambda q, k, v, c: (dot_product_attention(q, k, v, "xla"), dot_product_attention(q, c, c, "xla"),
                                   jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))
  ref = fn(q, k, v, text)
  with jax.set_mesh(mesh):
    out = fn(q, k, v, text)
    hlo = fn.lower(q, k, v, text).compile().as_text()
  assert "all-to-all" in hlo, "no all-to-all in the sequence-parallel attention"
  assert_trees_close(out, ref, "attention (self, cross, grads) on data=2 x sequence=4", rtol=1e-5, atol=1e-5)

  fix = os.path.join(ROOT, "tests", "reference", "fixtures", "pipeline")
  data = dict(np.load(os.path.join(fix, "base_t2v.npz")))
  pipe = HeliosPipeline.from_pretrained(os.path.join(fix, "base"), dtype=jnp.float32, load_vae=False)
  kw = dict(height=64, width=128, num_frames=33, output_type="latent", prompt_embeds=data["prompt_embeds"],
            negative_prompt_embeds=data["negative_prompt_embeds"], guidance_scale=5.0, num_inference_steps=3,
            progress=False, seed=0)
  ref = np.asarray(pipe(**kw).frames)
  for spec in ("data=2,fsdp=2,sequence=2", "data=2,sequence=4"):
    with sampling.on_mesh(pipe, mesh_lib.make_mesh(mesh_lib.parse_mesh(spec)), fsdp_min_size=0):
      out = pipe(**kw).frames
    err = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
    print(spec, "max rel err", err)
    assert err < 1e-5, f"{spec}: sharded sampling differs from one device by {err:.2e} (relative max)"


def ahd_config(total_steps: int, offload: bool = False, **mesh):
  """Tiny stage-3 DMD config (GAN off, one rollout schedule), separate teacher weights, global batch 8."""
  import ahd
  c = ahd.get_config("tiny")
  c.batch_size = GLOBAL_BATCH
  c.total_steps = total_steps
  c.dmd.amplify_first_chunk = False  # one rollout schedule: half the compilations
  c.teacher.init_seed = 1  # two trunks, so the trunk swap runs when offloading
  c.export_merged = False
  c.checkpoint.every = 1000
  c.log_every = 1
  c.mesh.fsdp_min_size = 0  # split the tiny model's tensors too
  c.offload.optimizer_on_host = c.offload.ema_on_host = c.offload.idle_trunk_on_host = offload
  for k, v in mesh.items():
    c.mesh[k] = v
  return c


def case_ahd(workdir: str) -> None:
  """Stage 3: train() on one device vs on data=2 x fsdp=4 (host offload on) for step 1 (generator + critic
  phases), resumed on one device for step 2 (critic phases)."""
  from flax import nnx as nnx_
  from helios_jax.training import ahd_trainer, metrics, state as state_lib
  from helios_jax.training.trainer import train
  # the resumed one-device run compiles the reference run's programs again: take them from a persistent cache
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  total = 2  # update_ratio 2: step 0 runs every phase, step 1 the critic's
  ref_dir, run = os.path.join(workdir, "ref"), os.path.join(workdir, "run")
  train(ahd_config(total), ref_dir, progress=False)
  first = train(ahd_config(total - 1, offload=True, data=2, fsdp=4), run, progress=False)
  second = train(ahd_config(total), run, progress=False)  # resumed on one device, offload off
  assert first["final_step"] == total - 1 and second["resumed_from"] == total - 1, (first, second)
  ref, got = metrics.read_metrics(ref_dir), metrics.read_metrics(run)
  assert [r["step"] for r in ref] == [r["step"] for r in got] == list(range(1, total + 1)), (ref, got)
  for a, b in zip(ref, got):
    keys = sorted(set(a) - {"step", "step_time"})
    assert keys == sorted(set(b) - {"step", "step_time"}) and "critic_loss" in keys, (a, b)
    print("step", a["step"], {k: (a[k], b[k]) for k in keys})
    np.testing.assert_allclose([b[k] for k in keys], [a[k] for k in keys], rtol=1e-4, atol=1e-6,
                               err_msg=f"step {a['step']} metrics {keys}: 2x4 mesh (+ resume) vs one device")

  # what the mesh run placed: trunks, trainables, optimiser states and EMA split over fsdp
  c = ahd_config(total, data=2, fsdp=4)
  layout = TrainLayout.from_config(c)
  graphdef, trunks = ahd_trainer.build_trunks(c, layout)
  tx, _ = state_lib.make_optimizer(c.optim)
  state = ahd_trainer.init_state(c, trunks, nnx_.merge(graphdef, trunks.gen).config, tx, tx, layout)
  for name, tree in (("generator trunk", trunks.gen), ("teacher trunk", trunks.teacher),
                     ("generator trainables", state["gen"]["trainable"]), ("critic optimiser", state["critic"]),
                     ("EMA", state["ema"])):
    assert "fsdp" in sharded_axes(tree), f"{name} not split over fsdp"


CASES = dict(training=case_training, checkpoint=case_checkpoint, sampling=case_sampling, ahd=case_ahd)

if __name__ == "__main__":
  assert len(jax.devices()) == 8, jax.devices()
  CASES[sys.argv[1]](sys.argv[2])
  print("PASSED", sys.argv[1])
