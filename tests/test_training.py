"""Training (stages 1 and 2) on the CPU: loss formula vs NumPy, tiny runs train and resume exactly, LoRA merge/export."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

# The tiny runs below compile the same train step several times (uninterrupted, interrupted, resumed): a
# persistent compilation cache turns the repeats into cache hits.
import tempfile  # noqa: E402
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "helios_jax_test_training_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from configs import base as base_config  # noqa: E402
from configs import mid as mid_config  # noqa: E402

from helios_jax.models.transformer import HeliosTransformer3DModel  # noqa: E402
from helios_jax.training import corruption, data, losses, lora, metrics, stages  # noqa: E402
from helios_jax.training.synthetic import SyntheticClips  # noqa: E402
from helios_jax.training.dispatch import train  # noqa: E402
from helios_jax.training.loop import TrainingError  # noqa: E402
from helios_jax.training.sources import make_source  # noqa: E402


def small(cfg, steps=60):
  """The :tiny config shrunk to 8x8 latents so the whole file runs in about two minutes on a CPU."""
  cfg.total_steps = steps
  cfg.data.height = 8
  cfg.data.width = 8
  cfg.data.num_clips = 16
  cfg.checkpoint.every = 10
  return cfg


def _batch(cfg, step=0):
  return data.get_batch(make_source(cfg), step, cfg.batch_size, cfg.data.seed)


# ------------------------------------------------------------------------------------------------------------------
# Data assembly

def test_assemble_sample_pads_and_anchors():
  lat = np.arange(3 * 1 * 9 * 1 * 1, dtype=np.float32).reshape(3, 1, 9, 1, 1) + 1
  s0 = data.assemble_sample(lat, 0)
  assert s0["x0"].sum() == 0 and s0["history"].sum() == 0
  np.testing.assert_array_equal(s0["target"], lat[0])
  s1 = data.assemble_sample(lat, 1)
  np.testing.assert_array_equal(s1["x0"], lat[0, :, :1])
  np.testing.assert_array_equal(s1["history"][:, :10], 0)
  np.testing.assert_array_equal(s1["history"][:, 10:], lat[0])
  s2 = data.assemble_sample(lat, 2)
  np.testing.assert_array_equal(s2["history"][:, 1:10], lat[0])
  np.testing.assert_array_equal(s2["history"][:, 10:], lat[1])
  np.testing.assert_array_equal(s2["target"], lat[2])


def test_drop_masks():
  m = lambda mode, k=0: np.asarray(corruption.drop_keep_mask(jnp.int32(mode), jnp.int32(k)))
  assert m(corruption.DROP_T2V).sum() == 0
  assert m(corruption.DROP_NONE).sum() == 20
  i2v = m(corruption.DROP_I2V)
  assert i2v[0] == 1 and i2v[19] == 1 and i2v[1:19].sum() == 0
  for k, d in ((0, 1), (1, 10), (2, 19)):
    v = m(corruption.DROP_V2V, k)
    assert v[0] == 1 and v[1:1 + d].sum() == 0 and v[1 + d:].sum() == 19 - d


# ------------------------------------------------------------------------------------------------------------------
# One step's loss == NumPy

def _numpy_stage1_loss(model, batch, dr, obj):
  """The stage-1 formula written plainly (spec 3.3, 4, 5.1, 5.2) given the step's random draws."""
  hist = np.concatenate([batch["x0"], batch["history"]], axis=2).astype(np.float64)
  mode, k = int(dr["drop_mode"]), int(dr["drop_v2v_k"])
  keep = np.ones(20)
  if mode == corruption.DROP_T2V:
    keep[:] = 0
  elif mode == corruption.DROP_I2V:
    keep[1:19] = 0
  elif mode == corruption.DROP_V2V:
    keep[1:1 + 1 + 9 * k] = 0
  hist = hist * keep[None, None, :, None, None]
  segments = [[0], [1], list(range(2, 11)), [11, 12], list(range(13, 20))]
  if not bool(dr["corrupt_clean"]):
    assert bool(dr["corrupt_use_noise"])
    s = np.asarray(dr["corrupt_sigma"], np.float64)[:, None, :, None, None]
    noised = s * np.asarray(dr["corrupt_eps"], np.float64) + (1 - s) * hist
    out = hist.copy()
    for seg in segments:
      if hist[:, :, seg].sum() != 0:
        out[:, :, seg] = noised[:, :, seg]
    hist = out
  x = batch["target"].astype(np.float64)
  eps = np.asarray(dr["eps"], np.float64)
  i = np.clip(np.floor(1000 * np.asarray(dr["u"], np.float64)), 0, 999)
  sig = (1 - i / 1000)[:, None, None, None, None]
  x_s = (1 - sig) * x + sig * eps
  idx = losses.history_indices(x.shape[2])
  v_hat = model(hidden_states=x_s.astype(np.float32), timestep=(1000 * sig[:, 0, 0, 0, 0]).astype(np.float32),
                encoder_hidden_states=batch["prompt_embeds"],
                latents_history_short=hist[:, :, [0, 19]].astype(np.float32),
                latents_history_mid=hist[:, :, 17:19].astype(np.float32),
                latents_history_long=hist[:, :, 1:17].astype(np.float32), **idx)
  return float(np.mean((np.asarray(v_hat, np.float64) - (eps - x)) ** 2))


@pytest.mark.parametrize("drop_mode", ["v2v", "i2v"])
def test_stage1_loss_matches_numpy(drop_mode):
  cfg = small(base_config.get_config("tiny"))
  o = cfg.objective
  o.random_drop_t2v = 0.0
  o.random_drop_i2v = 1.0 if drop_mode == "i2v" else 0.0
  o.random_drop_v2v = 1.0
  o.corrupt_clean_prob = 0.0
  batch = _batch(cfg, step=3)
  batch["x0"] = batch["x0"] + 0.5  # make the anchor non-zero even if chunk 0 was picked
  model = stages.build_model(cfg.model)
  graphdef, frozen = nnx.split(model)
  trainable = stages.init_trainable(frozen, cfg.train, cfg.seed)
  key = jax.random.key(123)
  ours = float(jax.jit(stages.make_loss_fn(cfg, graphdef))(trainable, frozen, batch, key))
  dr = losses.draw_stage1(key, batch, o)
  dr = {k: np.asarray(v) for k, v in dr.items() if k != "saturation_key"}
  expected = _numpy_stage1_loss(model, batch, dr, o)
  assert np.isfinite(ours) and ours > 0
  np.testing.assert_allclose(ours, expected, rtol=2e-5)


def test_stage2_pieces_formula():
  cfg = small(mid_config.get_config("tiny"))
  batch = _batch(cfg)
  dr = losses.draw_stage2(jax.random.key(5), batch, cfg.objective)
  pieces = losses.stage2_pieces(batch, dr, cfg.objective)
  assert len(pieces) == sum(cfg.objective.stage2_sample_ratios)
  tab = losses.pyramid_tables(cfg.objective)
  x = batch["target"].astype(np.float64)
  eps = np.asarray(dr["eps"], np.float64)
  pool = lambda a: a.reshape(*a.shape[:3], a.shape[3] // 2, 2, a.shape[4] // 2, 2).mean(axis=(4, 6))
  p1, n1 = pool(x), 2 * pool(eps)
  p0, n0 = pool(p1), 2 * pool(n1)
  up = lambda a: a.repeat(2, axis=3).repeat(2, axis=4)
  starts = [n0, tab["start"][1] * n1 + (1 - tab["start"][1]) * up(p0), tab["start"][2] * eps + (1 - tab["start"][2]) * up(p1)]
  ends = [tab["end"][0] * n0 + (1 - tab["end"][0]) * p0, tab["end"][1] * n1 + (1 - tab["end"][1]) * p1, x]
  stage_of_piece = [i for i, r in enumerate(cfg.objective.stage2_sample_ratios) for _ in range(r)]
  for j, (p, i) in enumerate(zip(pieces, stage_of_piece)):
    k = np.clip(np.floor(1000 * np.asarray(dr["u"][j], np.float64)), 0, 999).astype(int)
    s = tab["sigmas"][i][k][:, None, None, None, None]
    np.testing.assert_allclose(p["inputs"]["hidden_states"], s * starts[i] + (1 - s) * ends[i], atol=1e-5)
    np.testing.assert_allclose(p["target"], starts[i] - ends[i], atol=1e-5)
    np.testing.assert_allclose(p["inputs"]["timestep"], tab["timesteps"][i][k], rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# LoRA

def test_lora_merge_equals_unmerged_linear():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(3, 12, 10)).astype(np.float32)
  a = rng.normal(size=(3, 12, 4)).astype(np.float32)
  b = rng.normal(size=(3, 4, 10)).astype(np.float32)
  x = rng.normal(size=(3, 5, 12)).astype(np.float32)
  state = {"blocks": {"lin": {"kernel": jnp.asarray(w)}}}
  merged = lora.effective_state(state, {"lora": {"blocks.lin.kernel": {"a": a, "b": b}}, "full": {}}, 0.5)
  got = x @ np.asarray(merged["blocks"]["lin"]["kernel"])
  unmerged = x @ w + (x @ a) @ b * 0.5
  np.testing.assert_allclose(got, unmerged, rtol=1e-5, atol=1e-5)


def test_trainable_partition_matches_spec():
  cfg = base_config.get_config("tiny")
  _, frozen = nnx.split(stages.build_model(cfg.model))
  tr = stages.init_trainable(frozen, cfg.train, 0)
  assert "patch_embedding.proj.kernel" in tr["lora"] and "proj_out.kernel" in tr["lora"]
  assert "condition_embedder.time_proj.kernel" in tr["lora"]
  assert set(tr["full"]) == {f"patch_{n}.proj.{p}" for n in ("short", "mid", "long") for p in ("kernel", "bias")}
  a = tr["lora"]["blocks.attn1.to_q.kernel"]["a"]
  assert a.shape == (2, 64, 8) and tr["lora"]["blocks.attn1.to_q.kernel"]["b"].shape == (2, 8, 64)
  assert all(float(jnp.abs(v["b"]).max()) == 0 for v in tr["lora"].values())
  post = mid_config.get_config("post")
  post.model.arch = "tiny"
  tr2 = stages.init_trainable(frozen, post.train, 0)
  assert not tr2["full"] and "patch_long.proj.kernel" in tr2["lora"]


# ------------------------------------------------------------------------------------------------------------------
# Tiny runs: train, resume exactly, export

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  out = train(small(base_config.get_config("tiny")), workdir, progress=False)
  return workdir, out


def test_tiny_base_loss_falls(uninterrupted):
  workdir, out = uninterrupted
  assert out["final_step"] == 60 and len(out["losses"]) == 60
  first, last = np.mean(out["losses"][:10]), np.mean(out["losses"][-10:])
  assert last < 0.7 * first, (first, last)
  rows = metrics.read_metrics(workdir)
  assert len(rows) == 60 and {"step", "loss", "grad_norm", "lr", "step_time", "tokens_per_s"} <= set(rows[0])
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [50, 60]  # keep = 2


def test_interrupted_and_resumed_equals_uninterrupted(uninterrupted, tmp_path):
  _, full = uninterrupted
  workdir = str(tmp_path)

  def send_sigterm_after(n_rows):
    path = os.path.join(workdir, "metrics.jsonl")
    for _ in range(3000):
      if os.path.exists(path) and len(open(path).readlines()) >= n_rows:
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.02)

  threading.Thread(target=send_sigterm_after, args=(23,), daemon=True).start()
  first = train(small(base_config.get_config("tiny")), workdir, progress=False)
  assert first["stopped_by"] == "SIGTERM" and 23 <= first["final_step"] < 60
  second = train(small(base_config.get_config("tiny")), workdir, progress=False)
  assert second["resumed_from"] == first["final_step"] and second["final_step"] == 60
  np.testing.assert_array_equal(np.array(first["losses"] + second["losses"]), np.array(full["losses"]))


def test_export_round_trip(uninterrupted):
  workdir, _ = uninterrupted
  cfg = small(base_config.get_config("tiny"))
  loaded = HeliosTransformer3DModel.from_pretrained(os.path.join(workdir, "merged"))
  # Rebuild the trained model with the adapters applied on the fly, from the last checkpoint.
  from helios_jax.training import checkpointing, state as state_lib
  model = stages.build_model(cfg.model)
  graphdef, frozen = nnx.split(model)
  tx, _ = state_lib.make_optimizer(cfg.optim)
  template = state_lib.init_train_state(stages.init_trainable(frozen, cfg.train, cfg.seed), tx, cfg.seed)
  ck = checkpointing.Checkpointer(workdir, 2)
  st, _ = ck.restore(template)
  ck.close()
  assert float(jnp.abs(st["trainable"]["lora"]["blocks.attn1.to_q.kernel"]["b"]).max()) > 0
  batch = _batch(cfg)
  pieces = losses.stage1_pieces(batch, losses.draw_stage1(jax.random.key(0), batch, cfg.objective), cfg.objective)
  idx = losses.history_indices(9)
  live = nnx.merge(graphdef, lora.effective_state(frozen, st["trainable"], stages.lora_scale(cfg.train)))
  want = live(**pieces[0]["inputs"], **idx)
  got = loaded(**pieces[0]["inputs"], **idx)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
  base_out = model(**pieces[0]["inputs"], **idx)
  assert float(jnp.abs(base_out - want).max()) > 1e-3  # the adapters changed the model


def test_tiny_mid_trains(tmp_path):
  cfg = small(mid_config.get_config("tiny"), steps=20)
  cfg.export_merged = False
  out = train(cfg, str(tmp_path), progress=False)
  assert np.mean(out["losses"][-5:]) < np.mean(out["losses"][:5])


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path):
  cfg = small(base_config.get_config("tiny"), steps=15)
  cfg.optim.learning_rate = 1e30  # diverges
  cfg.optim.max_grad_norm = 0.0
  cfg.checkpoint.every = 1
  with pytest.raises(TrainingError, match="last good checkpoint"):
    train(cfg, str(tmp_path), progress=False)
  steps = sorted(int(s) for s in os.listdir(os.path.join(tmp_path, "checkpoints")))
  assert steps, "no checkpoint kept"
  rows = metrics.read_metrics(str(tmp_path))
  finite = lambda r: all(np.isfinite(float(v)) for v in r.values())
  assert all(finite(r) for r in rows[:-1]) and not finite(rows[-1])  # the bad step's row is logged
  assert steps[-1] == rows[-1]["step"] - 1  # checkpoint.every = 1: the last good step is kept


def test_synthetic_is_deterministic():
  a = SyntheticClips(num_clips=4, channels=4, height=8, width=8, text_len=2, text_dim=8)
  np.testing.assert_array_equal(a[2]["latents"], a[2]["latents"])
  assert a[2]["latents"].shape == (4, 4, 9, 8, 8)
  b1 = data.get_batch(a, 7, 2, 0)
  b2 = data.get_batch(a, 7, 2, 0)
  for k in b1:
    np.testing.assert_array_equal(b1[k], b2[k])


def test_prepare_data_round_trip_with_corrupt_file(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from helios_jax.io.media import write_video
  from helios_jax.models.vae import AutoencoderKLWan, WanVAEConfig
  from helios_jax.training import prepare_data as prep
  d = str(tmp_path)
  rng = np.random.default_rng(0)
  for i in range(2):
    write_video(os.path.join(d, f"v{i}.mp4"), rng.integers(0, 255, (70, 40, 56, 3), dtype=np.uint8), fps=16)
  open(os.path.join(d, "bad.mp4"), "wb").write(b"not a video")
  with open(os.path.join(d, "captions.jsonl"), "w") as f:
    for p, c in (("v0.mp4", "a red ball"), ("bad.mp4", "broken"), ("v1.mp4", "a blue cube")):
      f.write(json.dumps({"path": p, "caption": c}) + "\n")
  cfg = WanVAEConfig(base_dim=8, num_res_blocks=1, z_dim=4, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
  graphdef, shapes = nnx.split(nnx.eval_shape(lambda: AutoencoderKLWan(cfg)))  # eager random init is slow
  vae = nnx.merge(graphdef, jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype), shapes))
  items = prep.read_captions(d, os.path.join(d, "captions.jsonl"))
  text = lambda c: np.full((3, 8), len(c), np.float32)
  out = os.path.join(d, "out")
  kw = dict(height=32, width=48, progress=False)
  assert prep.encode_folder(items, out, prep.vae_chunk_encoder(vae), text, **kw) == dict(
      encoded=2, skipped_existing=0, failed=1)
  assert prep.encode_folder(items, out, prep.vae_chunk_encoder(vae), text, **kw)["skipped_existing"] == 2  # resume
  prep.build_dataset(out, os.path.join(d, "tfds"))
  src = prep.open_source(os.path.join(d, "tfds"))
  assert len(src) == 2
  assert src[0]["latents"].shape == (2, 4, 9, 4, 6) and src[1]["prompt_embeds"][0, 0] == len("a blue cube")
  batch = data.get_batch(src, 0, 2, 0)
  assert batch["history"].shape == (2, 4, 19, 4, 6) and batch["target"].shape == (2, 4, 9, 4, 6)


def test_learning_rate_schedules():
  """Each schedule's rate at its corners, from the config keys (incl. the warm-up / decay clamps and bad values)."""
  from helios_jax.errors import InputError
  from helios_jax.training import state as state_lib
  optim = base_config.get_config("").optim
  optim.learning_rate = 1e-3
  optim.warmup_steps = 10
  lr = lambda sched, *steps: [float(sched(s)) for s in steps]  # noqa: E731
  optim.schedule = "constant"
  assert lr(state_lib.learning_rate_schedule(optim), 0, 5, 1000) == pytest.approx([1e-3] * 3)
  optim.schedule = "constant_with_warmup"
  assert lr(state_lib.learning_rate_schedule(optim), 0, 5, 10, 1000) == pytest.approx([0, 5e-4, 1e-3, 1e-3])
  optim.schedule = "warmup_stable_decay"
  optim.decay_steps = 40  # warm-up 0-10, stable 10-60, decay 60-100
  got = lr(state_lib.learning_rate_schedule(optim, 100), 0, 5, 10, 59, 60, 80, 100, 120)
  assert got == pytest.approx([0, 5e-4, 1e-3, 1e-3, 1e-3, 5e-4, 0, 0], abs=1e-9)
  optim.decay_steps = 0  # decay over everything after the warm-up
  got = lr(state_lib.learning_rate_schedule(optim, 110), 10, 60, 110)
  assert got == pytest.approx([1e-3, 5e-4, 0], abs=1e-9)
  optim.decay_steps = 500  # longer than the run: clamped to what follows the warm-up
  assert lr(state_lib.learning_rate_schedule(optim, 110), 10, 60) == pytest.approx([1e-3, 5e-4])
  optim.warmup_steps = 0
  assert lr(state_lib.learning_rate_schedule(optim, 100), 0, 50) == pytest.approx([1e-3, 5e-4])
  with pytest.raises(InputError, match="total_steps"):
    state_lib.learning_rate_schedule(optim)
  optim.schedule = "cosine"
  with pytest.raises(InputError, match="warmup_stable_decay"):
    state_lib.learning_rate_schedule(optim)


def test_train_py_exit_status_after_signal(tmp_path):
  """train.py stopped by SIGTERM saves, says how to resume and exits 143 (128 + SIGTERM), not 0."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen([sys.executable, os.path.join(root, "train.py"), "--config", "configs/base.py:tiny",
                           "--workdir", workdir, "--config.total_steps=100000", "--noprogress"], cwd=root,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics_path) and len(open(metrics_path).readlines()) >= 3:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, (out, err)
  assert "stopped by SIGTERM" in out and "run the same command to resume" in err


def test_train_py_stops_at_once_during_the_first_compile(tmp_path):
  """A signal before the first step is done (XLA compiling, Python handlers waiting) ends the run at once, 143."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, os.path.join(root, "train.py"), "--config", "configs/base.py:tiny",
                           "--workdir", str(workdir), "--config.total_steps=100000", "--noprogress"], cwd=root,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None and not (workdir / "config.json").exists():
    time.sleep(0.05)  # config.json is written just before the step loop starts
  assert proc.poll() is None, proc.communicate()
  time.sleep(0.5)
  rows = workdir / "metrics.jsonl"
  assert not rows.exists() or rows.read_text() == ""  # still inside the first step (it compiles for seconds)
  t0 = time.time()
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, (out, err)
  assert time.time() - t0 < 3.0, "the run waited for the compiler"
  assert "before the first step finished: nothing to save" in err
