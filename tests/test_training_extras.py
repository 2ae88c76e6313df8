"""Training extras on the CPU: per-layer LoRA in the block scan, TensorBoard metrics, the step loop's hooks and
non-finite stop, validation sampling, the train-memory benchmark's dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from configs import base as base_config  # noqa: E402
from configs import mid as mid_config  # noqa: E402

from helios_jax.training import data, losses, lora, metrics, stages  # noqa: E402
from helios_jax.training.sources import make_source  # noqa: E402


def _small(cfg):
  cfg.data.height = 8
  cfg.data.width = 8
  cfg.data.num_clips = 4
  return cfg


def _random_trainable(frozen, train_cfg, seed=0):
  """Trainables with non-zero B and perturbed full tensors, so every adapter changes the output."""
  tr = stages.init_trainable(frozen, train_cfg, seed)
  leaves, treedef = jax.tree.flatten(tr)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, leaves)


def _merged_forward(graphdef, frozen, trainable, scale):
  """Reference: the whole model merged (the pre-scan path)."""
  return nnx.merge(graphdef, lora.effective_state(frozen, trainable, scale)).forward


@pytest.mark.parametrize("mode,remat", [("lora", "full"), ("full", "dots")])
def test_per_layer_lora_equals_merged_model(mode, remat):
  """Forward values and gradients w.r.t. A, B and fully trained tensors: per-layer path == whole merged model."""
  cfg = _small(base_config.get_config("tiny"))
  cfg.model.remat_policy = remat
  cfg.train.mode = mode
  graphdef, frozen = nnx.split(stages.build_model(cfg.model))
  tr = _random_trainable(frozen, cfg.train)
  blocks, rest = lora.split_blocks(tr)
  assert (blocks["lora"] or blocks["full"]) and (rest["lora"] or rest["full"])
  scale = stages.lora_scale(cfg.train)
  cfg.objective.random_drop = False  # every history stream non-zero, so memory patches get gradients
  batch = data.get_batch(make_source(cfg), 2, cfg.batch_size, cfg.data.seed)
  piece = losses.stage1_pieces(batch, losses.draw_stage1(jax.random.key(3), batch, cfg.objective),
                               cfg.objective)[0]
  idx = {k: jnp.asarray(v) for k, v in losses.history_indices(batch["target"].shape[2]).items()}

  def run(make):
    def loss(t):
      out = make(graphdef, frozen, t, scale)(**piece["inputs"], **idx)
      return jnp.mean(jnp.square(out - piece["target"])), out
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(tr)

  (_, out), grads = run(lora.bind)
  (_, want), ref = run(_merged_forward)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
  flat_ours, flat_ref = lora.named_params(grads), lora.named_params(ref)
  assert flat_ours.keys() == flat_ref.keys()
  for name, g in flat_ref.items():
    assert float(jnp.abs(g).max()) > 0, name  # every trainable gets a gradient
    np.testing.assert_allclose(np.asarray(flat_ours[name]), np.asarray(g), rtol=2e-4,
                               atol=2e-5 * float(jnp.abs(g).max()), err_msg=name)


def test_bind_never_builds_a_merged_block_stack():
  """The jitted loss holds no (L, in, out) adapted kernel: block deltas exist only per layer inside the scan."""
  cfg = _small(base_config.get_config("tiny"))
  graphdef, frozen = nnx.split(stages.build_model(cfg.model))
  tr = _random_trainable(frozen, cfg.train)
  x = jnp.zeros((1, 4, 9, 8, 8))
  idx = {k: jnp.asarray(v) for k, v in losses.history_indices(9).items()}

  def fwd(make):
    return jax.make_jaxpr(lambda t: make(graphdef, frozen, t, 1.0)(x, jnp.ones((1,)), jnp.zeros((1, 2, 32)),
                                                                    idx["indices_hidden_states"]))(tr)

  def stacked_dots(jaxpr):  # dot_generals at top level producing a (layers, in, out) tensor
    return [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"
            and e.outvars[0].aval.shape[:1] == (2,) and len(e.outvars[0].aval.shape) == 3]

  assert stacked_dots(fwd(_merged_forward))  # the reference merges the whole stack up front
  assert not stacked_dots(fwd(lora.bind))


def test_metrics_go_to_tensorboard(tmp_path):
  pytest.importorskip("tensorboard")
  rows = [(1, dict(loss=0.5, grad_norm=2.0, lr=1e-4, step_time=0.1, tokens_per_s=1e3)),
          (2, dict(loss=0.25, dmd_loss=-3.5, critic_loss=7.0)), (3, dict(loss=float("nan")))]
  w = metrics.MetricsWriter(str(tmp_path))
  for step, values in rows:
    w.write(step, values)
  w.close()
  tb = metrics.read_tensorboard(str(tmp_path / "tensorboard"))
  expected: dict = {}
  for step, values in rows:
    for k, v in values.items():
      expected.setdefault(k, []).append((step, v))
  assert tb.keys() == expected.keys()
  for k, pairs in expected.items():
    assert [s for s, _ in tb[k]] == [s for s, _ in pairs]
    np.testing.assert_allclose([v for _, v in tb[k]], np.float32([v for _, v in pairs]), rtol=1e-7)
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 2, 3]



class _Recorder:
  """A fake run for ``loop.run``: ``do_step`` returns ``values(step)``; every call is recorded in ``events``."""

  def __init__(self, values):
    self.values, self.state, self.events = values, 0, []

  def write(self, step, row):
    self.events.append(("write", step, dict(row)))

  def do_step(self, step, batch):
    return self.values(step), lambda: setattr(self, "state", step + 1)

  def save(self):
    self.events.append(("save", self.state))
    return self.state

  def run(self, total, checkpoint_every, **hooks):
    from helios_jax.training import loop
    return loop.run(start=0, total=total, next_batch=dict, do_step=self.do_step, save=self.save, writer=self,
                    log_every=2, checkpoint_every=checkpoint_every, checkpoint_dir="CKPT", last_saved=None,
                    progress=False, desc="test", loss_key="loss", **hooks)


def test_loop_hooks_log_and_after_step_order():
  r = _Recorder(lambda step: dict(loss=1.0 / (step + 1)))
  losses_, stopped, last = r.run(5, 2, extra_metrics=lambda m: dict(double=2 * m["loss"]),
                                 after_step=lambda n: r.events.append(("after", n)))
  assert (losses_, stopped, last) == ([1.0, 0.5, 1 / 3, 0.25, 0.2], None, 5)
  writes = [e for e in r.events if e[0] == "write"]
  assert [e[1] for e in writes] == [2, 4, 5]  # every log_every steps and the last
  assert all(set(e[2]) == {"loss", "step_time", "double"} and e[2]["double"] == 2 * e[2]["loss"] for e in writes)
  order = [e[:2] for e in r.events if e[0] != "write"]
  assert order == [("after", 1), ("save", 2), ("after", 2), ("after", 3), ("save", 4), ("after", 4), ("after", 5),
                   ("save", 5)]  # a due checkpoint comes before the hook; the final save last


def test_loop_stops_on_any_non_finite_metric():
  from helios_jax.training.loop import TrainingError
  r = _Recorder(lambda step: dict(loss=0.5, grad_norm=float("inf") if step == 2 else 1.0))
  with pytest.raises(TrainingError, match=r"step 3 \(grad_norm=inf\); stopping, the last good checkpoint \(step 2\)"):
    r.run(5, 2, after_step=lambda n: r.events.append(("after", n)))
  assert r.state == 2  # the bad step is not committed ...
  assert r.events[-1][:2] == ("write", 3) and r.events[-1][2]["grad_norm"] == float("inf")  # ... but logged
  assert [e for e in r.events if e[0] in ("save", "after")][-1] == ("after", 2)  # nothing saved after it
  r = _Recorder(lambda step: dict(loss=float("nan")))
  with pytest.raises(TrainingError, match="no checkpoint was written yet in CKPT"):
    r.run(5, 10)
  assert r.state == 0 and not any(e[0] == "save" for e in r.events)


def _tiny_validation(cfg, **overrides):
  cfg.export_merged = False
  cfg.validation.update(dict(every=1, at_end=True, prompts=("A red fox, snow!", "second")), **overrides)
  return cfg


def test_validation_samples_and_tensorboard_from_a_tiny_run(tmp_path):
  """Base tiny run, 2 steps, sampling every step: an mp4 per prompt and step that decodes to 33 frames at 64x64;
  TensorBoard holds the same metrics as metrics.jsonl."""
  from helios_jax.io.media import read_video
  from helios_jax.training.dispatch import train
  cfg = _tiny_validation(_small(base_config.get_config("tiny")))
  cfg.total_steps = 2
  out = train(cfg, str(tmp_path), progress=False)
  assert out["final_step"] == 2
  for step in (1, 2):
    folder = tmp_path / "samples" / f"step_{step:06d}"
    assert sorted(os.listdir(folder)) == ["00_a-red-fox-snow.mp4", "01_second.mp4"]
    frames = read_video(str(folder / "00_a-red-fox-snow.mp4"))
    assert frames.shape[:3] == (33, 64, 64)
  rows = metrics.read_metrics(str(tmp_path))
  tb = metrics.read_tensorboard(str(tmp_path / "tensorboard"))
  for key in ("loss", "grad_norm", "lr", "step_time", "tokens_per_s"):
    assert [s for s, _ in tb[key]] == [r["step"] for r in rows]
    np.testing.assert_allclose([v for _, v in tb[key]], np.float32([r[key] for r in rows]), rtol=1e-6)


def test_validation_failure_warns_and_returns(tmp_path):
  from helios_jax.training import validation
  cfg = _tiny_validation(_small(base_config.get_config("tiny")), height=60)  # not a multiple of 8: fails
  graphdef, frozen = nnx.split(stages.build_model(cfg.model))
  v = validation.make_validator(cfg, str(tmp_path))
  with pytest.warns(UserWarning, match="validation sampling at step 3 failed"):
    assert v.run_safely(3, graphdef, frozen, stages.init_trainable(frozen, cfg.train, 0)) == []


def test_validation_config_mistakes(tmp_path):
  from helios_jax.errors import InputError
  from helios_jax.training import validation
  cfg = base_config.get_config("")
  assert validation.make_validator(cfg, str(tmp_path)) is None  # no VAE configured: off
  cfg.validation.vae = str(tmp_path / "missing")
  with pytest.raises(InputError, match="diffusers VAE folder"):
    validation.make_validator(cfg, str(tmp_path))
  cfg.validation.vae = validation.RANDOM_TINY_VAE
  with pytest.raises(InputError, match="needs prompt embeddings"):
    validation.make_validator(cfg, str(tmp_path))


@pytest.mark.slow
def test_validation_pyramid_pipeline(tmp_path):
  """Stage-2 validation (pyramid pipeline, CFG-Zero*) on the current adapters, called directly."""
  from helios_jax.io.media import read_video
  from helios_jax.training import validation
  cfg = _tiny_validation(_small(mid_config.get_config("tiny")), prompts=("mid",))
  graphdef, frozen = nnx.split(stages.build_model(cfg.model))
  paths = validation.make_validator(cfg, str(tmp_path)).run(7, graphdef, frozen, _random_trainable(frozen, cfg.train))
  assert paths == [str(tmp_path / "samples" / "step_000007" / "00_mid.mp4")]
  assert read_video(paths[0]).shape[:3] == (33, 64, 64)


@pytest.mark.slow
def test_train_memory_benchmark_dry_run(tmp_path):
  """benchmarks/train_memory.py --arch tiny: the 14B benchmark's code path on the CPU, one JSON record, written to a
  temporary folder (not the recorded benchmarks/results) when no --out or $OUT is given."""
  env = {k: v for k, v in os.environ.items() if k != "OUT"}
  env.update(JAX_PLATFORMS="cpu", TMPDIR=str(tmp_path))
  recorded = os.path.join(ROOT, "benchmarks", "results", "train_memory.jsonl")
  before = open(recorded, "rb").read() if os.path.exists(recorded) else None
  subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_memory.py"), "--arch", "tiny",
                  "--stages", "base", "--steps", "1"], check=True, env=env, cwd=ROOT, timeout=900)
  assert (open(recorded, "rb").read() if os.path.exists(recorded) else None) == before
  recs = [json.loads(line) for line in open(tmp_path / "helios_jax_train_memory" / "train_memory.jsonl")]
  assert len(recs) == 1 and "error" not in recs[0]
  r = recs[0]
  assert r["kind"] == "train_memory" and r["stage"] == "base" and r["peak_gib"] is None
  assert np.isfinite(r["loss"]) and r["step_s"] > 0 and r["settings"]["remat"] == "full"
  assert r["breakdown_gib"]["step_temp"] is not None
