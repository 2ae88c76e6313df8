"""The bundled demo model's pieces: scene generator, tokenizer / text encoder export, VAE export and objective,
encoded dataset, and ``sample.py`` with no arguments."""

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

from recipes.demo import demo, scenes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = scenes.SceneConfig(height=64, width=64)


# ----------------------------------------------------------------------------------------------------------------
# Scenes


def test_scene_is_deterministic_and_seed_dependent():
  p1, c1 = scenes.sample_scene(3, 5)
  p2, c2 = scenes.sample_scene(3, 5)
  assert c1 == c2 and all(np.array_equal(p1[k], p2[k]) for k in p1)
  others = [scenes.sample_scene(3, i)[1] for i in range(6, 12)] + [scenes.sample_scene(4, 5)[1]]
  assert any(c != c1 for c in others)
  a = np.asarray(scenes.render(scenes.stack_params([p1]), np.arange(3)))
  b = np.asarray(scenes.render(scenes.stack_params([p2]), np.arange(3)))
  np.testing.assert_array_equal(a, b)


def test_captions_describe_the_parameters():
  vocab = set(scenes.vocabulary())
  colour_of = {tuple(np.float32(v) for v in rgb): name for name, rgb in scenes.COLOURS.items()}
  for i in range(40):
    p, caption = scenes.sample_scene(0, i)
    assert set(caption.split()) <= vocab
    clauses = caption.split(" on a ")[0].split(" and a ")
    active = np.flatnonzero(p["active"])
    assert len(clauses) == len(active)
    for k, clause in zip(active, clauses):
      words = clause.removeprefix("a ").split()
      assert words[0] == colour_of[tuple(p["colour"][k])]
      assert words[1] == scenes.SHAPES[p["shape"][k]]
      direction = clause.split(" moves ")[1].split(" and spins")[0]
      np.testing.assert_allclose(p["vel"][k], np.asarray(scenes.DIRECTIONS[direction]) * scenes.SceneConfig().speed,
                                 atol=1e-4)
      spin = clause.split(" spins ")[1] if " spins " in clause else ""
      assert np.sign(p["omega"][k]) == scenes.SPINS[spin]


def _simulate(pos0, vel, radius, frames, cfg):
  """Independent reference: step the motion one frame at a time, reflecting at the walls."""
  out, pos, v = [], np.array(pos0, np.float64), np.array(vel, np.float64)
  lo = np.array([radius, radius])
  hi = np.array([cfg.width - radius, cfg.height - radius])
  for _ in range(frames):
    out.append(pos.copy())
    pos = pos + v
    for ax in range(2):
      if pos[ax] > hi[ax]:
        pos[ax], v[ax] = 2 * hi[ax] - pos[ax], -v[ax]
      elif pos[ax] < lo[ax]:
        pos[ax], v[ax] = 2 * lo[ax] - pos[ax], -v[ax]
  return np.stack(out)


def test_positions_bounce_like_a_step_simulation():
  cfg = SMALL
  for i in range(5):
    p, _ = scenes.sample_scene(1, i, cfg)
    pos = scenes.object_positions(p, np.arange(150), cfg)
    for k in np.flatnonzero(p["active"]):
      ref = _simulate(p["pos0"][k], p["vel"][k], p["radius"][k], 150, cfg)
      np.testing.assert_allclose(pos[:, k], ref, atol=1e-3)


def test_rendered_objects_sit_at_their_true_positions():
  locate = _demo_quality().locate
  cfg = SMALL
  checked = 0
  for i in range(8):
    p, _ = scenes.sample_scene(2, i, cfg)
    if p["active"].sum() != 1 or scenes.SHAPES[p["shape"][0]] == "triangle":  # centroid = centre for these
      continue
    frames = np.arange(0, 60, 7)
    px = np.asarray(scenes.render(scenes.stack_params([p]), frames, cfg))[0]
    c, ok = locate(px, p["colour"][0], 0.25)
    assert ok.all()
    np.testing.assert_allclose(c, scenes.object_positions(p, frames, cfg)[:, 0], atol=0.6)
    checked += 1
  assert checked >= 2


# ----------------------------------------------------------------------------------------------------------------
# Text side and VAE export


def test_tokenizer_covers_captions_and_falls_back_to_letters(tmp_path):
  from helios_jax.models.tokenizer import load_tokenizer
  demo.write_tokenizer(str(tmp_path))
  tok = load_tokenizer(str(tmp_path))
  vocab = json.load(open(tmp_path / "tokenizer.json"))["model"]["vocab"]
  piece = {p: i for i, (p, _) in enumerate(vocab)}
  _, caption = scenes.sample_scene(0, 1)
  ids = tok.encode(caption)
  assert ids == [piece["\u2581" + w] for w in caption.split()] + [1]
  dog = tok.encode("dog")[:-1]
  assert [vocab[i][0] for i in dog] == ["\u2581", "d", "o", "g"]


def test_text_encoder_export_round_trip(tmp_path):
  from helios_jax.models.umt5 import UMT5Config, UMT5EncoderModel
  demo.write_text_encoder(str(tmp_path), vocab_size=40, seed=3, num_layers=1)
  loaded = UMT5EncoderModel.from_pretrained(str(tmp_path), dtype=jnp.float32)
  ref = UMT5EncoderModel(UMT5Config(vocab_size=40, **{**demo.TEXT_ENCODER_CONFIG, "num_layers": 1}),
                         dtype=jnp.float32, rngs=nnx.Rngs(3))
  ids = jnp.asarray([[5, 7, 9, 1, 0, 0]])
  mask = (ids > 0).astype(jnp.int32).at[0, 3].set(1)
  np.testing.assert_array_equal(np.asarray(loaded.encode_masked(ids, mask)), np.asarray(ref.encode_masked(ids, mask)))


def _numpy_vae(cfg, seed: int):
  """A VAE with fan-in-scaled NumPy random weights (building through jax.random compiles one program per shape)."""
  from helios_jax.models.vae import AutoencoderKLWan
  rng = np.random.default_rng(seed)
  tensors = {}
  for key, shape in AutoencoderKLWan.checkpoint_shapes(cfg).items():
    if key.endswith("gamma"):
      tensors[key] = np.ones(shape, np.float32)
    elif len(shape) == 1:
      tensors[key] = rng.normal(0, 0.01, shape).astype(np.float32)
    else:
      tensors[key] = (rng.normal(0, 1, shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
  return AutoencoderKLWan.from_state_dict(cfg, tensors)


def test_vae_state_dict_round_trip():
  from helios_jax.models.vae import AutoencoderKLWan, WanVAEConfig
  cfg = WanVAEConfig(base_dim=4, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1, latents_mean=(0.0,) * 4,
                     latents_std=(1.0,) * 4)
  model = _numpy_vae(cfg, 1)
  sd = model.state_dict()
  shapes = AutoencoderKLWan.checkpoint_shapes(cfg)
  assert {k: v.shape for k, v in sd.items()} == shapes
  back = AutoencoderKLWan.from_state_dict(cfg, sd)
  for a, b in zip(jax.tree_util.tree_leaves(nnx.state(model)), jax.tree_util.tree_leaves(nnx.state(back))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _tiny_vae_config():
  from configs import demo_vae
  c = demo_vae.get_config("tiny")
  c.data.height = c.data.width = 64
  c.data.frames = 1
  c.batch_size = 2
  return c


def test_vae_objective_decreases_on_a_fixed_batch():
  import optax
  from recipes.demo import vae_train
  c = _tiny_vae_config()
  model = _numpy_vae(vae_train.vae_config(c.model), 0)
  graphdef, params = nnx.split(model)
  tx = optax.adam(3e-3)
  opt = tx.init(params)
  step = vae_train.make_train_step(graphdef, tx, kl_weight=1e-4, mse_weight=1.0)
  video = vae_train.clip_batch(0, 0, 2, 1, 0, vae_train.scene_config(c.data))
  eps = jax.random.normal(jax.random.key(0), (2, 4, 1, 8, 8))
  losses = []
  for _ in range(6):
    params, opt, m = step(params, opt, video, eps)
    losses.append(float(m["loss"]))
  final, parts = vae_train.vae_loss(nnx.merge(graphdef, params), video, eps, 1e-4, 1.0)
  assert float(final) < 0.8 * losses[0], losses
  # l1 term against an independent computation from the model's pieces
  m = nnx.merge(graphdef, params)
  mean, logvar = jnp.split(m.encode_moments(video), 2, axis=1)
  recon = np.asarray(m.decode_latents(mean + jnp.exp(0.5 * logvar) * eps, clip=False))
  np.testing.assert_allclose(float(parts["l1"]), np.mean(np.abs(recon - np.asarray(video))), rtol=1e-4)


def test_decoder_finetune_trains_the_decoder_only(tmp_path):
  """``finetune_decoder`` leaves the encoder side (and so every encoded latent) bit-identical, moves the decoder,
  and lowers the reconstruction loss on its batch stream."""
  from recipes.demo import vae_train
  c = _tiny_vae_config()
  c.total_steps, c.log_every, c.batch_size = 6, 1, 2
  c.optim.learning_rate = 3e-3
  model = _numpy_vae(vae_train.vae_config(c.model), 0)
  video = vae_train.clip_batch(0, 0, 2, int(c.data.frames), 0, vae_train.scene_config(c.data))
  moments = np.asarray(model.encode_moments(video))
  before = {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  new, losses, steps = vae_train.finetune_decoder(model, c, str(tmp_path))
  after = {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(new, nnx.Param))}
  assert steps == 6 and len(losses) == 6 and np.isfinite(losses).all()
  decoder = [k for k in before if k.startswith(("decoder", "post_quant_conv"))]
  changed = [k for k in decoder if not np.array_equal(before[k], after[k])]
  # (a 1-frame clip leaves the temporal upsampling convs without gradient)
  assert "decoder/conv_out/kernel" in changed and len(changed) >= len(decoder) // 2, changed
  for k in before:
    if k not in decoder:
      np.testing.assert_array_equal(before[k], after[k], err_msg=k)
  np.testing.assert_array_equal(np.asarray(new.encode_moments(video)), moments)
  assert losses[-1] < losses[0], losses


# ----------------------------------------------------------------------------------------------------------------
# Encoded dataset


def test_encode_dataset_matches_direct_encoding(tmp_path):
  """The stored latents are the normalised posterior mean by default (the demo's fix for a Base that ignored its
  history: sampled latents are mostly unpredictable noise), a normalised posterior draw with posterior="sample"."""
  from helios_jax.models.vae import WanVAEConfig
  cfg = WanVAEConfig(base_dim=4, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                     latents_mean=(0.1, -0.2, 0.0, 0.3), latents_std=(0.5, 2.0, 1.0, 1.5))
  vae = _numpy_vae(cfg, 2)
  embed = lambda caps: np.stack([np.full((3, 2), len(c), np.float32) for c in caps])
  meta = demo.encode_dataset(str(tmp_path / "mean"), vae, embed, num_clips=3, num_chunks=2, seed=5,
                             scene_cfg=SMALL, batch=2)
  src = demo.DemoLatents(str(tmp_path / "mean"))
  assert len(src) == 3 and meta["chunk"] == 9 and meta["height"] == 8 and meta["posterior"] == "mean"
  item = src[2]
  params, caption = scenes.sample_scene(5, 2, SMALL)
  assert item["caption"] == caption
  np.testing.assert_array_equal(item["prompt_embeds"], embed([caption])[0])
  assert item["latents"].shape == (2, 4, 9, 8, 8)
  # chunk 1 of clip 2 is frames 33..65 encoded alone
  px = np.asarray(scenes.render(scenes.stack_params([params]), np.arange(33, 66), SMALL))
  dist = vae.encode(scenes.to_video(px)).latent_dist
  shift = np.asarray(cfg.latents_mean)[:, None, None, None]
  scale = np.asarray(cfg.latents_std)[:, None, None, None]
  mean = (np.asarray(dist.mean)[0] - shift) / scale
  std = np.exp(0.5 * np.asarray(dist.logvar)[0]) / scale
  assert float(std.mean()) > 0.05  # the check below can tell a sample from the mean
  np.testing.assert_allclose(item["latents"][1], mean, atol=2e-3 * (1 + np.abs(mean)).max())  # float16 storage
  sampled = demo.encode_dataset(str(tmp_path / "sample"), vae, embed, num_clips=3, num_chunks=2, seed=5,
                                scene_cfg=SMALL, batch=2, posterior="sample")
  assert sampled["posterior"] == "sample"
  z = (demo.DemoLatents(str(tmp_path / "sample"))[2]["latents"][1] - mean) / std  # the standardised draw
  assert abs(float(z.mean())) < 0.2 and 0.8 < float(z.std()) < 1.2
  with pytest.raises(demo.InputError):
    demo.encode_dataset(str(tmp_path / "bad"), vae, embed, num_clips=1, num_chunks=1, seed=5, scene_cfg=SMALL,
                        posterior="mode")


# ----------------------------------------------------------------------------------------------------------------
# sample.py defaults


def _one_step_per_stage() -> list[str]:
  """``--steps`` for the bundled model with one step per pyramid stage (a Base: one stage): keeps tests short."""
  sched = json.load(open(os.path.join(ROOT, "helios_jax", "assets", "demo", "model", "scheduler",
                                      "scheduler_config.json")))
  return ["1"] * int(sched.get("stages", 1))


def test_sample_without_model_uses_the_bundled_demo(tmp_path, capsys):
  import sample
  if not os.path.isfile(os.path.join(sample.DEMO_DIR, "model", "model_index.json")):
    pytest.skip("bundled demo model not present")
  out = tmp_path / "demo.mp4"
  rc = sample.main(["--mode", "i2v", "--out", str(out), "--num-frames", "33", "--steps", *_one_step_per_stage()])
  text = capsys.readouterr()
  assert rc == 0, text.err
  assert "bundled demo model" in text.out and "BestWishYsh/Helios" in text.out
  assert out.stat().st_size > 0 and (tmp_path / "demo.png").stat().st_size > 0
  from helios_jax.io import media
  frames = media.read_video(str(out))
  assert frames.shape[0] == 33


def test_sample_keeps_a_compilation_cache(tmp_path):
  """--compile-cache DIR: the run stores its compiled programs there (a subprocess: JAX sets its cache up once per
  process, and the suite's other tests configure their own)."""
  cache = tmp_path / "xla"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("HELIOS_JAX_COMPILE_CACHE", None)
  run = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--mode", "i2v", "--out",
                        str(tmp_path / "a.mp4"), "--num-frames", "33", "--steps", *_one_step_per_stage(),
                        "--compile-cache", str(cache)], env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr
  assert len(list(cache.iterdir())) >= 3  # at least the text encoder, a denoising step and the VAE decode


def test_sample_compile_cache_off_and_unusable(tmp_path, capsys):
  from helios_jax.compile_cache import enable_compile_cache
  assert enable_compile_cache("none") is None
  blocker = tmp_path / "file"
  blocker.write_text("x")
  assert enable_compile_cache(str(blocker / "xla")) is None
  assert "compiling without it" in capsys.readouterr().err


@pytest.mark.slow
def test_train_demo_quick_chain(tmp_path):
  """The GPU script's whole chain on the CPU with the :tiny configs, then --assemble and sampling."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = tmp_path / "out"
  subprocess.run([sys.executable, "-m", "recipes.demo.train_demo", "--out", str(out), "--quick",
                  "--work", str(tmp_path / "work"), "--stages", "vae,base,mid", "--clips", "4",
                  "--set", "base:objective.random_drop_i2v=0.5"], check=True, env=env, cwd=ROOT)
  log = json.load(open(out / "train_log.json"))
  assert {"vae", "data", "base", "mid"} <= set(log["stages"])
  assert log["sets"] == ["base:objective.random_drop_i2v=0.5"]
  saved = json.load(open(tmp_path / "work" / "base" / "config.json"))  # what the Base trained with
  assert saved["objective"]["random_drop_i2v"] == 0.5
  assert sorted(os.listdir(out)) == ["components.tar.gz", "train_log.json", "transformer_base.tar.gz",
                                     "transformer_mid.tar.gz"]
  # --continue-mid: more Mid steps from a Mid pipeline folder (and a clear skip when --reuse is not a Mid)
  from recipes.demo import demo
  comp, mid = tmp_path / "work" / "components", tmp_path / "mid_folder"
  demo.write_pipeline_folder(str(mid), "mid", str(tmp_path / "work" / "mid" / "merged"), str(comp / "vae"),
                             str(comp / "text_encoder"), str(comp / "tokenizer"), extra={"helios_jax_demo": "mid"})
  base = tmp_path / "base_folder"
  demo.write_pipeline_folder(str(base), "base", str(tmp_path / "work" / "base" / "merged"), str(comp / "vae"),
                             str(comp / "text_encoder"), str(comp / "tokenizer"), extra={"helios_jax_demo": "base"})
  for reuse, expect in ((mid, True), (base, False)):
    out2 = tmp_path / f"out_{expect}"
    run = subprocess.run([sys.executable, "-m", "recipes.demo.train_demo", "--out", str(out2),
                          "--quick", "--work", str(tmp_path / "work"), "--stages", "mid", "--continue-mid",
                          "--reuse", str(reuse), "--clips", "4"], check=True, env=env, cwd=ROOT, capture_output=True,
                         text=True)
    assert (out2 / "transformer_mid.tar.gz").exists() == expect, run.stdout
    if not expect:
      assert "--continue mid needs a mid pipeline folder" in run.stdout
  # --continue base=FOLDER: more Base steps from an assembled Base (its own workdir, not the Base run's)
  out3 = tmp_path / "out_base"
  subprocess.run([sys.executable, "-m", "recipes.demo.train_demo", "--out", str(out3), "--quick",
                  "--work", str(tmp_path / "work"), "--stages", "base", "--continue", f"base={base}", "--clips", "4"],
                 check=True, env=env, cwd=ROOT)
  assert (out3 / "transformer_base.tar.gz").exists()
  assert (tmp_path / "work" / "base_continued" / "merged").is_dir()
  # a second call on the same --work with another config: a fresh run (resuming the first one's would fail)
  out4 = tmp_path / "out_base_again"
  again = subprocess.run([sys.executable, "-m", "recipes.demo.train_demo", "--out", str(out4),
                          "--quick", "--work", str(tmp_path / "work"), "--stages", "base", "--continue", f"base={base}",
                          "--clips", "4", "--set", "base:optim.schedule=warmup_stable_decay"],
                         env=env, cwd=ROOT, capture_output=True, text=True)
  assert again.returncode == 0, again.stdout + again.stderr
  assert "removing the earlier run" in again.stdout and (out4 / "transformer_base.tar.gz").exists()
  saved = json.load(open(tmp_path / "work" / "base_continued" / "config.json"))
  assert saved["optim"]["schedule"] == "warmup_stable_decay"
  bad = subprocess.run([sys.executable, "-m", "recipes.demo.train_demo", "--out", str(out3),
                        "--continue", "vae"], env=env, cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode == 2 and "the stage must be one of base, base_nocorrupt, mid" in bad.stderr


def test_assemble_bundles_the_base_unless_told_otherwise(tmp_path, monkeypatch):
  """``train_demo.py --assemble``: the run's Base becomes the bundled model (``BUNDLED_STAGE``), the other stages go
  to ``runs``; ``--default none`` bundles nothing, and a run without a Base leaves the bundled model alone."""
  import tarfile
  train_demo = _benchmark("train_demo")
  model = os.path.join(ROOT, "helios_jax", "assets", "demo", "model")
  src = tmp_path / "out"
  src.mkdir()
  with tarfile.open(src / "components.tar.gz", "w:gz") as tar:
    for name in ("vae", "text_encoder", "tokenizer"):
      tar.add(os.path.join(model, name), arcname=name)
  (src / "train_log.json").write_text(json.dumps({"stages": {}, "posterior": "mean"}))

  def transformers(*names):
    for n in ("base", "mid", "distilled"):
      if os.path.exists(src / f"transformer_{n}.tar.gz"):
        os.remove(src / f"transformer_{n}.tar.gz")
    for n in names:
      with tarfile.open(src / f"transformer_{n}.tar.gz", "w:gz") as tar:
        tar.add(os.path.join(model, "transformer"), arcname="transformer")

  def kind(folder):
    return json.load(open(os.path.join(folder, "model_index.json")))["helios_jax_demo"]

  bundled = tmp_path / "bundled"
  monkeypatch.setattr(train_demo, "DEFAULT_MODEL", str(bundled))
  transformers("base", "mid")
  got = train_demo.assemble(str(src), "", runs=str(tmp_path / "runs"))
  assert got == {"mid": str(tmp_path / "runs" / "mid"), "base": str(bundled)}
  assert kind(bundled) == "base" and kind(got["mid"]) == "mid"
  stamp = os.path.getmtime(bundled / "model_index.json")
  got = train_demo.assemble(str(src), "none", runs=str(tmp_path / "runs2"))
  assert set(got.values()) == {str(tmp_path / "runs2" / "mid"), str(tmp_path / "runs2" / "base")}
  transformers("mid", "distilled")
  got = train_demo.assemble(str(src), "", runs=str(tmp_path / "runs3"))
  assert str(bundled) not in got.values() and os.path.getmtime(bundled / "model_index.json") == stamp
  assert kind(got["distilled"]) == "distilled"


def test_train_demo_set_overrides_one_stage_config_key():
  """``--set STAGE:KEY=VALUE``: parsed as a Python literal, checked against the stage's config before any run,
  applied to that stage only; malformed specs, unknown stages / keys and wrong types exit with a usage error."""
  train_demo = _benchmark("train_demo")
  sets = train_demo._parse_sets(["base:objective.random_drop_i2v=0.5", "mid:optim.learning_rate=1e-4",
                                 "ahd:seed=7"])
  assert sets == [("base", "objective.random_drop_i2v", 0.5), ("mid", "optim.learning_rate", 1e-4),
                  ("ahd", "seed", 7)]
  cfg = train_demo._stage_config("base", "tiny")
  before = cfg.optim.learning_rate
  train_demo._apply_sets(cfg, "base", sets)
  assert cfg.objective.random_drop_i2v == 0.5 and cfg.optim.learning_rate == before
  nocorrupt = train_demo._stage_config("base_nocorrupt", "")
  train_demo._apply_sets(nocorrupt, "base_nocorrupt", sets)  # "base" sets leave the ablation alone
  assert nocorrupt.objective.random_drop_i2v == 0.2 and not nocorrupt.objective.corrupt_history
  for bad, msg in (("base:objective.random_drop_i2v", "STAGE:KEY=VALUE"), ("nope:seed=1", "stage must be one of"),
                   ("base:objective.no_such_key=1", "no key"), ("base:nothing.seed=1", "no 'nothing'"),
                   ("base:optim.learning_rate='fast'", "base:optim.learning_rate")):
    with pytest.raises(ValueError, match=msg):
      train_demo._parse_sets([bad])
  for argv in (["--set", "base:no.such=1"], ["--stages", "mid", "--set", "base:seed=1"]):
    with pytest.raises(SystemExit) as e:
      train_demo.main(["--out", "/tmp/unused", *argv])
    assert e.value.code == 2


def test_quality_metrics_measure_a_known_shift():
  demo_quality = _demo_quality()
  cfg = SMALL
  p, _ = scenes.sample_scene(2, 0, cfg)
  frames = np.arange(2 * demo_quality.WINDOW)
  truth = np.asarray(scenes.render(scenes.stack_params([p]), frames, cfg))[0]
  pos = scenes.object_positions(p, frames, cfg)
  same = demo_quality.clip_metrics(truth, truth, p, pos, 0.25)
  shifted = demo_quality.clip_metrics(np.roll(truth, 3, axis=2), truth, p, pos, 0.25)
  act = p["active"].astype(bool)
  # rolling by 3 columns moves every located centroid by 3 px, except where an object wraps around the border
  d = shifted["err"][:, act] - same["err"][:, act]
  assert np.nanmedian(shifted["err"][:, act]) == pytest.approx(3.0, abs=0.8)
  assert np.isfinite(d).mean() > 0.9
  expect = 10 * np.log10(1 / np.mean((np.roll(truth, 3, axis=2) - truth) ** 2, axis=(1, 2, 3)))
  np.testing.assert_allclose(shifted["psnr"], expect, rtol=1e-6)
  curves = demo_quality.per_chunk([shifted], 2)
  assert len(curves["pos_err"]) == 2 and curves["detect_rate"][0] > 0.9
  # on target: within the object's circumradius (>= 5.8 px at 64x64) -- the truth and a 3-px shift are; a shift by
  # half the frame is not, though every object is still found
  assert demo_quality.per_chunk([same], 2)["hit_rate"] == [1.0, 1.0]
  assert min(curves["hit_rate"]) > 0.9
  far = demo_quality.clip_metrics(np.roll(truth, cfg.width // 2, axis=2), truth, p, pos, 0.25)
  far_curves = demo_quality.per_chunk([far], 2)
  assert min(far_curves["detect_rate"]) > 0.9 and max(far_curves["hit_rate"]) < 0.2
  assert demo_quality.slope([1.0, 3.0, 5.0]) == pytest.approx(2.0)


def test_psnr_parts_split_the_chunk_where_the_checks_look():
  per_frame = np.tile(np.arange(33, dtype=np.float64), (2, 1))
  parts = demo.psnr_parts(per_frame)
  assert parts == dict(mean=16.0, frame0=0.0, frames_1_16=8.5, frames_17_32=24.5)


def _benchmark(name: str):
  """A script of the demo recipe (recipes/demo/<name>.py) as a module."""
  import importlib
  return importlib.import_module(f"recipes.demo.{name}")


def _demo_quality():
  return _benchmark("demo_quality")


def test_quality_paired_difference_and_its_interval():
  dq = _demo_quality()
  b = np.linspace(10.0, 50.0, 40)
  exact = dq.paired_difference(b + 2.0, b)
  assert exact["mean"] == pytest.approx(2.0) and exact["low"] == pytest.approx(2.0) and exact["n"] == 40
  noise = np.random.default_rng(1).normal(0.0, 1.0, 40)
  shifted = dq.paired_difference(b + 1.0 + noise, b)
  assert 0.0 < shifted["low"] < 1.0 + noise.mean() < shifted["high"]  # separates from 0, covers the true shift
  same = dq.paired_difference(b + noise, b + noise[::-1])
  assert same["low"] < 0.0 < same["high"]
  with_nan = dq.paired_difference([1.0, np.nan, 3.0], [0.0, 1.0, 1.0])
  assert with_nan["n"] == 2 and with_nan["mean"] == pytest.approx(1.5)
  assert np.isnan(dq.paired_difference([1.0], [0.0])["mean"])


def test_quality_scores_a_video_of_the_bundled_scene(tmp_path, capsys):
  """--score-video: the bundled scene's true frames score ~0 px and on target; the standing start image does not."""
  dq = _demo_quality()
  from helios_jax.io import media
  with open(os.path.join(ROOT, "helios_jax", "assets", "demo", "prompts.json"), encoding="utf-8") as f:
    meta = json.load(f)
  cfg = scenes.SceneConfig(height=128, width=128)
  params, caption = scenes.sample_scene(int(meta["scene_seed"]), int(meta["scene_index"]["i2v"]), cfg)
  assert caption == meta["i2v"]
  truth = np.asarray(scenes.render(scenes.stack_params([params]), np.arange(40), cfg))[0]
  path = media.write_video(str(tmp_path / "truth.mp4"), truth)
  assert dq.main(["--score-video", path, "--out", str(tmp_path / "s.json")]) == 0
  assert "start_standing" in capsys.readouterr().out
  scored = json.load(open(tmp_path / "s.json"))
  assert scored["frames"] == 40 and len(scored["objects"]) == int(np.sum(params["active"]))
  for rows in scored["objects"].values():
    assert len(rows["video"]["pos_err_per_chunk"]) == 2  # frames 1-33 and 34-39
    assert max(rows["video"]["pos_err_per_chunk"]) < 1.5 and min(rows["video"]["hit_rate_per_chunk"]) == 1.0
    assert rows["start_standing"]["pos_err_per_chunk"][1] > 5.0
  with pytest.raises(SystemExit):
    dq.main(["--score-video", str(tmp_path / "missing.mp4")])


def test_quality_sigma_shift_grid_and_its_checks(tmp_path):
  """--sigma-shift: shift 1 is HeliosPipeline's own grid, 3 moves 0.5 to 0.75; pyramid folders and shift <= 0 are
  usage errors."""
  dq = _demo_quality()
  np.testing.assert_allclose(dq.shifted_grid(4, 1.0), np.linspace(0.999, 0.0, 5)[:-1])
  g = dq.shifted_grid(30, 3.0)
  assert g.shape == (30,) and np.all(np.diff(g) < 0) and g[0] <= 1.0 and g[-1] > 0
  np.testing.assert_allclose(dq.shifted_grid(2, 3.0), [3 * 0.999 / (1 + 2 * 0.999), 3 * 0.4995 / (1 + 2 * 0.4995)])
  np.testing.assert_allclose(3 * 0.5 / (1 + 2 * 0.5), 0.75)  # the shift map itself: 0.5 -> 0.75
  pyramid = tmp_path / "pyr"
  pyramid.mkdir()
  (pyramid / "model_index.json").write_text(json.dumps({"_class_name": "HeliosPyramidPipeline"}))
  for argv in (["--sigma-shift", "0"], ["--sigma-shift", "3", "--model", f"mid={pyramid}"]):
    with pytest.raises(SystemExit):
      dq.main(argv + ["--clips", "1", "--chunks", "1"])


def test_quality_model_spec_and_bad_arguments(tmp_path):
  dq = _demo_quality()
  assert dq.parse_model("mid=some/dir:10,10,10@3") == ("mid", "some/dir", [10, 10, 10], 3.0)
  assert dq.parse_model("base=d:50") == ("base", "d", [50], None)
  assert dq.parse_model("x=d@1.5") == ("x", "d", None, 1.5)
  for bad in ("nodir", "x=d:ten", "x=d@high"):
    with pytest.raises(SystemExit, match="name=PATH"):
      dq.parse_model(bad)
  model = os.path.join(ROOT, "helios_jax", "assets", "demo", "model")
  for argv in (["--model", f"a={model}", "--compare", "a:b"], ["--model", f"a={tmp_path}"],
               ["--model", f"a={model}", "--model", f"a={model}"], ["--model", f"a={model}", "--seeds", "0"]):
    with pytest.raises(SystemExit) as e:
      dq.main(argv)
    assert e.value.code == 2


def test_quality_baselines_bracket_a_model():
  """Repeating the start image is exact at the start and drifts as objects move; random points are far anywhere."""
  dq = _demo_quality()
  clips = dq.held_out_clips(3, 3, SMALL)
  base = dq.baselines(clips, 3, 0.25)
  rep, rnd = base["repeat_start"], base["random_position"]
  assert rep["per_chunk"]["pos_err"][0] < rep["per_chunk"]["pos_err"][2]
  assert rep["per_chunk"]["pos_err"][0] < rnd["per_chunk"]["pos_err"][0]
  # mean distance of a uniform point in a 64-px square to a point inside it: 0.38 (centre) to 0.77 (corner) x 64
  assert 0.3 * 64 < rnd["pos_err_mean"] < 0.8 * 64 and rnd["detect_rate"] == 1.0
  assert len(rep["per_sample"]["pos_err"]) == 3 and np.isnan(rnd["psnr_mean"])
  # on target: the standing start image is at first (its objects have not moved off yet), a random point rarely
  assert rep["per_chunk"]["hit_rate"][0] > rep["per_chunk"]["hit_rate"][2]
  assert rep["hit_rate_first"] > 0.15 and rnd["hit_rate"] < 0.1 and len(rnd["per_sample"]["hit_rate"]) == 3


def test_quality_video_condition_scores_the_frames_after_the_given_ones():
  """``--condition video``: each clip carries its first 33 frames as V2V input, truth and positions are the frames
  after them, and the standing baseline repeats the last given frame (scored from the first generated frame)."""
  dq = _demo_quality()
  i2v = dq.held_out_clips(2, 2, SMALL)
  v2v = dq.held_out_clips(2, 1, SMALL, lead=dq.WINDOW)
  assert i2v[0]["given"] is None and np.array_equal(i2v[0]["start"], i2v[0]["truth"][0])
  c, ref = v2v[0], i2v[0]
  assert c["given"].shape[0] == dq.WINDOW and len(c["truth"]) == dq.WINDOW
  np.testing.assert_array_equal(c["given"], ref["truth"][:dq.WINDOW])
  np.testing.assert_array_equal(c["truth"], ref["truth"][dq.WINDOW:])
  np.testing.assert_array_equal(c["positions"], ref["positions"][dq.WINDOW:])
  np.testing.assert_array_equal(c["start"], ref["truth"][dq.WINDOW - 1])
  rep = dq.baselines(v2v, 1, 0.25, skip_first_frame=False)["repeat_start"]
  # the last given frame is one frame (1 px of motion) from the first scored one: close, then drifting away
  rec = dq.clip_metrics(np.repeat(c["start"][None], dq.WINDOW, axis=0), c["truth"], c["params"], c["positions"], 0.25)
  assert np.nanmean(rec["err"][0][c["params"]["active"].astype(bool)]) < 2.5
  assert rep["per_chunk"]["hit_rate"][0] > 0.15


def test_conditioning_variants_change_only_their_input():
  demo_conditioning = _benchmark("demo_conditioning")
  rng = np.random.default_rng(0)
  batch = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in
           dict(x0=(3, 2, 1, 4, 4), history=(3, 2, 19, 4, 4), target=(3, 2, 9, 4, 4), prompt_embeds=(3, 5, 6)).items()}
  changed = {name: {k for k in batch if not np.array_equal(demo_conditioning.variant_batch(batch, name)[k], batch[k])}
             for name in demo_conditioning.VARIANTS}
  assert changed == dict(true=set(), no_history={"x0", "history"}, i2v_history={"history"},
                         other_caption={"prompt_embeds"}, zero_caption={"prompt_embeds"})
  i2v = np.asarray(demo_conditioning.variant_batch(batch, "i2v_history")["history"])
  np.testing.assert_array_equal(i2v[:, :, -1], np.asarray(batch["history"])[:, :, -1])
  assert not i2v[:, :, :-1].any()
  # the same frames as training's I2V drop (anchor + newest buffer frame of the 20-frame stack)
  from helios_jax.training import corruption
  keep = np.asarray(corruption.drop_keep_mask(jnp.asarray(corruption.DROP_I2V), jnp.asarray(0)))
  assert keep[0] == 1 and keep[-1] == 1 and keep[1:-1].sum() == 0
  swapped = np.asarray(demo_conditioning.variant_batch(batch, "other_caption")["prompt_embeds"])
  np.testing.assert_array_equal(swapped[1], np.asarray(batch["prompt_embeds"])[0])
  assert not np.asarray(demo_conditioning.variant_batch(batch, "no_history")["history"]).any()
  with pytest.raises(ValueError):
    demo_conditioning.variant_batch(batch, "nothing")


def test_conditioning_fixed_sigma_lands_on_the_asked_noise_level():
  demo_conditioning = _benchmark("demo_conditioning")
  from configs import demo_base
  from helios_jax.training import losses
  obj = demo_base.get_config("").objective
  for sigma in (1.0, 0.95, 0.7, 0.3, 0.001):
    u = demo_conditioning.fixed_sigma_u(sigma, 3)
    np.testing.assert_allclose(np.asarray(losses.stage1_sigma(jnp.asarray(u), (3, 16, 9, 8, 8), obj)), sigma,
                               atol=1e-6)
  for bad in (0.0, 1.5, -0.2):
    with pytest.raises(ValueError):
      demo_conditioning.fixed_sigma_u(bad, 1)
  with pytest.raises(SystemExit):
    demo_conditioning.main(["--sigmas", "0.5,2"])


def test_pipeline_conditioning_uses_the_posterior_mean_when_asked():
  """``latents_posterior="mean"`` (demo folders: model_index helios_jax_defaults) encodes image conditioning
  without a posterior draw; the default draws, so two seeds differ."""
  from helios_jax import HeliosPipeline, InputError
  from helios_jax.pipelines.noise import JaxNoiseSource
  pipe = HeliosPipeline.from_pretrained(os.path.join(ROOT, "helios_jax", "assets", "demo", "model"),
                                        dtype=jnp.float32, load_text_encoder=False)
  pixels = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 3, 1, 32, 32)), jnp.float32)
  enc = lambda seed: np.asarray(pipe._encode_latents(pixels, JaxNoiseSource(seed)))
  pipe.latents_posterior = "sample"
  assert not np.allclose(enc(0), enc(1))
  pipe.latents_posterior = "mean"
  np.testing.assert_array_equal(enc(0), enc(1))
  with pytest.raises(InputError, match="latents_posterior"):
    HeliosPipeline(pipe.transformer, pipe.scheduler, latents_posterior="mode")


def test_vae_reconstruction_psnr_sees_a_broken_decoder():
  """``reconstruction_psnr`` (the VAE check before encoding a dataset) scores the bundled VAE finitely per frame,
  and a decoder with a zeroed output layer far lower."""
  from helios_jax.models.vae import AutoencoderKLWan
  cfg = scenes.SceneConfig(height=64, width=64)
  vae = AutoencoderKLWan.from_pretrained(os.path.join(ROOT, "helios_jax", "assets", "demo", "model", "vae"))
  good = demo.reconstruction_psnr(vae, cfg, num_clips=1, frames=9)
  assert good.shape == (1, 9) and np.isfinite(good).all()
  graphdef, state = nnx.split(vae)
  broken = nnx.merge(graphdef, jax.tree.map(lambda a: a * 0.0 if a.ndim == 5 and a.shape[-1] == 3 else a, state))
  bad = demo.reconstruction_psnr(broken, cfg, num_clips=1, frames=9)
  assert bad.mean() < good.mean() - 3.0


def test_vae_learning_rate_follows_the_budget_when_it_ends_first():
  """``budgeted_lr``: the schedule runs over the steps or the wall-clock budget, whichever ends first."""
  import optax
  from recipes.demo import vae_train
  sched = optax.warmup_cosine_decay_schedule(0.0, 1.0, 10, 100, 0.05)
  assert vae_train.budgeted_lr(sched, 50, 100, 0.0, 0.0) == float(sched(50))  # no budget: by step
  assert vae_train.budgeted_lr(sched, 20, 100, 90.0, 100.0) == float(sched(90))  # budget 90% spent at step 20
  assert vae_train.budgeted_lr(sched, 60, 100, 10.0, 100.0) == float(sched(60))  # steps ahead of the budget
  assert abs(vae_train.budgeted_lr(sched, 30, 100, 500.0, 100.0) - 0.05) < 1e-6  # past the budget: final lr


def test_vae_first_frame_weight_weighs_frame_zero():
  """With ``first_frame_weight`` k the reconstruction terms are per-frame means weighted (k, 1, 1, ...)."""
  from recipes.demo import vae_train
  c = _tiny_vae_config()
  c.data.frames = 5
  model = _numpy_vae(vae_train.vae_config(c.model), 0)
  video = vae_train.clip_batch(0, 0, 2, 5, 0, vae_train.scene_config(c.data))
  eps = jax.random.normal(jax.random.key(0), (2, 4, 2, 8, 8))
  _, plain = vae_train.vae_loss(model, video, eps, 0.0, 1.0)
  _, weighted = vae_train.vae_loss(model, video, eps, 0.0, 1.0, first_frame_weight=4.0)
  mean, logvar = jnp.split(model.encode_moments(video), 2, axis=1)
  recon = np.asarray(model.decode_latents(mean + jnp.exp(0.5 * logvar) * eps, clip=False), np.float64)
  per_frame = np.mean(np.abs(recon - np.asarray(video, np.float64)), axis=(0, 1, 3, 4))  # (5,)
  np.testing.assert_allclose(float(plain["l1"]), per_frame.mean(), rtol=1e-4)
  np.testing.assert_allclose(float(weighted["l1"]), (4 * per_frame[0] + per_frame[1:].sum()) / 8, rtol=1e-4)
  assert abs(float(weighted["l1"]) - float(plain["l1"])) > 1e-6


def test_demo_vae_check_reports_and_draws_the_start_scene(tmp_path):
  """recipes/demo/demo_vae_check.py: the start-scene PSNR is the reconstruction's, and the sheet is truth over recon."""
  demo_vae_check = _benchmark("demo_vae_check")
  from helios_jax.io import media
  from recipes.demo import demo, scenes, vae_train
  from PIL import Image
  c = _tiny_vae_config()
  model = _numpy_vae(vae_train.vae_config(c.model), 0)
  vae_train.save_vae(model, str(tmp_path / "vae"))
  sheet = tmp_path / "sheet.png"
  demo_vae_check.main(["--model", str(tmp_path / "vae"), "--clips", "1", "--sheet", str(sheet),
                       "--out", str(tmp_path / "r.json")])
  r = json.loads((tmp_path / "r.json").read_text())
  params, _ = demo_vae_check.start_scene()
  truth = np.asarray(scenes.render(params, np.arange(33), scenes.SceneConfig()), np.float64)[0]
  loaded = type(model).from_pretrained(str(tmp_path / "vae"))
  expected = demo.frame_psnr(demo.reconstruct(loaded, truth[None])[0], truth)
  np.testing.assert_allclose(r["start_scene_psnr"], expected.mean(), rtol=1e-6)
  assert np.isfinite(r["held_out_psnr"])
  img = np.asarray(Image.open(sheet))
  assert img.shape == (2 * 128 + 2, 5 * 128 + 4 * 2, 3)
  np.testing.assert_array_equal(img[:128, :128], media.to_uint8(truth[:1])[0])  # top-left: the true frame 0
  objects = np.asarray(scenes.coverage(params, np.arange(33), scenes.SceneConfig()))[0] > 0.5
  recon = demo.reconstruct(loaded, truth[None])[0]
  assert r["start_scene_objects_psnr"] == pytest.approx(demo.masked_psnr(recon, truth, objects))
  assert r["start_scene_objects_psnr"] != pytest.approx(r["start_scene_background_psnr"])


def test_masked_psnr_scores_only_the_mask():
  from recipes.demo import demo
  truth = np.zeros((2, 4, 4, 3))
  recon = truth.copy()
  recon[0, 0, 0] = 0.1  # one wrong pixel, inside the mask
  mask = np.zeros((2, 4, 4), bool)
  mask[0, 0, :2] = True
  assert demo.masked_psnr(recon, truth, mask) == pytest.approx(10 * np.log10(1 / (0.01 / 2)))
  assert demo.masked_psnr(recon, truth, ~mask) == pytest.approx(100.0)  # perfect: the 1e-10 floor
  assert np.isnan(demo.masked_psnr(recon, truth, np.zeros_like(mask)))


def test_scene_coverage_marks_the_objects():
  """``scenes.coverage``: ~1 at an object's centre, 0 far from every object, nonzero exactly where the objects change
  the pixels, and (one object) the blend factor of its colour over the background."""
  cfg = SMALL
  params, _ = scenes.scene_batch(4, range(6), cfg)
  frames = np.arange(3, 40, 9)
  px = np.asarray(scenes.render(params, frames, cfg), np.float64)  # (B, F, H, W, 3)
  bare = np.asarray(scenes.render(dict(params, active=np.zeros_like(params["active"])), frames, cfg), np.float64)
  cover = np.asarray(scenes.coverage(params, frames, cfg))  # (B, F, H, W)
  assert cover.shape == px.shape[:4] and cover.min() >= 0.0 and cover.max() <= 1.0
  pos = scenes.object_positions(params, frames, cfg)  # (B, F, K, 2)
  yy, xx = np.mgrid[:cfg.height, :cfg.width] + 0.5
  far = np.ones(cover.shape, bool)
  for b in range(cover.shape[0]):
    for k in np.flatnonzero(params["active"][b]):
      for f in range(len(frames)):
        x, y = pos[b, f, k]
        assert cover[b, f, int(y), int(x)] > 0.99
        far[b, f] &= np.hypot(xx - x, yy - y) > 1.1 * params["radius"][b, k] + 1  # (square corners: 1.06 r)
  assert far.any() and not cover[far].any()
  changed = np.abs(px - bare).max(axis=-1) > 0
  assert not (changed & (cover == 0)).any() and changed[cover > 1e-3].all()
  one = params["active"].sum(axis=1) == 1
  assert one.any()
  colour = params["colour"][one, 0][:, None, None, None]  # (b, 1, 1, 1, 3)
  blend = np.sum((px[one] - bare[one]) * (colour - bare[one]), -1) / np.sum((colour - bare[one]) ** 2, -1)
  np.testing.assert_allclose(blend, cover[one], atol=1e-4)
  both = scenes.render_with_coverage(params, frames, cfg)  # one call, the same two arrays
  np.testing.assert_array_equal(np.asarray(both[0], np.float64), px)
  np.testing.assert_allclose(np.asarray(both[1]), cover, rtol=0, atol=2e-6)  # fused with the blend: float32 rounding


def test_vae_object_weighted_loss_matches_numpy():
  """Pixel weights ``1 + object_weight * cover`` and frame weights together: a weighted mean over every element;
  ``object_weight`` 0 gives exactly the unweighted loss (and training step)."""
  import optax
  from recipes.demo import vae_train
  c = _tiny_vae_config()
  scfg = vae_train.scene_config(c.data)
  model = _numpy_vae(vae_train.vae_config(c.model), 0)
  video, cover = vae_train.clip_batch_with_coverage(3, 0, 2, 5, 0, scfg)
  np.testing.assert_array_equal(np.asarray(video), np.asarray(vae_train.clip_batch(3, 0, 2, 5, 0, scfg)))
  assert cover.shape == (2, 5, 64, 64) and 0.0 < float(cover.mean()) < 0.5
  eps = jax.random.normal(jax.random.key(0), (2, 4, 2, 8, 8))
  _, parts = vae_train.vae_loss(model, video, eps, 0.0, 1.0, first_frame_weight=4.0, pixel_weights=1 + 3.0 * cover)
  mean, logvar = jnp.split(model.encode_moments(video), 2, axis=1)
  recon = np.asarray(model.decode_latents(mean + jnp.exp(0.5 * logvar) * eps, clip=False), np.float64)
  err = recon - np.asarray(video, np.float64)  # (B, 3, F, H, W)
  weight = np.broadcast_to((np.array([4.0, 1, 1, 1, 1])[:, None, None] * (1 + 3.0 * np.asarray(cover, np.float64)))
                           [:, None], err.shape)
  np.testing.assert_allclose(float(parts["l1"]), np.sum(weight * np.abs(err)) / weight.sum(), rtol=1e-4)
  np.testing.assert_allclose(float(parts["mse"]), np.sum(weight * err ** 2) / weight.sum(), rtol=1e-4)
  _, plain = vae_train.vae_loss(model, video, eps, 0.0, 1.0, first_frame_weight=4.0)
  assert abs(float(parts["l1"]) - float(plain["l1"])) > 1e-5
  _, ones = vae_train.vae_loss(model, video, eps, 0.0, 1.0, first_frame_weight=4.0, pixel_weights=jnp.ones_like(cover))
  np.testing.assert_allclose(float(ones["l1"]), float(plain["l1"]), rtol=1e-5)
  graphdef, params = nnx.split(model)
  tx = optax.adam(1e-3)
  opt = tx.init(params)
  p0, _, m0 = vae_train.make_train_step(graphdef, tx, 1e-6, 1.0, 4.0)(params, opt, video, eps)
  p1, _, m1 = vae_train.make_train_step(graphdef, tx, 1e-6, 1.0, 4.0, object_weight=0.0)(params, opt, video, eps, cover)
  for k in m0:
    assert float(m0[k]) == float(m1[k]), k
  for a, b in zip(jax.tree_util.tree_leaves(p0), jax.tree_util.tree_leaves(p1)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_train_vae_runs_an_image_phase_then_the_video_phase(tmp_path):
  from helios_jax.models.vae import AutoencoderKLWan
  from helios_jax.training import metrics
  from recipes.demo import vae_train
  c = _tiny_vae_config()
  c.image_steps, c.total_steps, c.log_every, c.stats_clips = 2, 2, 1, 2
  assert c.objective.object_weight > 0
  model, losses = vae_train.train_vae(c, str(tmp_path))
  rows = metrics.read_metrics(str(tmp_path))
  assert [(r["phase"], r["step"]) for r in rows] == [("image", 1), ("image", 2), ("video", 1), ("video", 2)]
  assert len(losses) == 4 and np.isfinite(losses).all()
  assert isinstance(model, AutoencoderKLWan) and np.isfinite(model.config.latents_std).all()


def test_demo_vae_object_ab_runs_and_scores_objects_apart(tmp_path):
  """recipes/demo/demo_vae_object_ab.py on 2 steps: the three PSNRs are finite and the object score is its own."""
  demo_vae_object_ab = _benchmark("demo_vae_object_ab")
  demo_vae_object_ab.main(["--object-weight", "4", "--steps", "2", "--batch", "2", "--out", str(tmp_path / "r.json")])
  r = json.loads((tmp_path / "r.json").read_text())
  assert r["steps"] == 2 and r["object_weight"] == 4.0
  assert all(np.isfinite(r[k]) for k in ("psnr", "psnr_objects", "psnr_background"))
  assert r["psnr_objects"] != pytest.approx(r["psnr_background"])
