"""Stage 3 (Adversarial Hierarchical Distillation): DMD / GAN / EMA math vs NumPy, Cache Grad, tiny runs on a CPU."""

from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "helios_jax_test_ahd_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from helios_jax.training import dmd, ema, gan  # noqa: E402

RNG = np.random.default_rng(0)


def _softplus(x):
  return np.logaddexp(0.0, x)


# ---------------------------------------------------------------------------------------------------------------
# DMD math

def test_dmd_gradient_matches_numpy_formula():
  shape = (2, 3, 4, 6, 6)
  x, cond, uncond, fake = (RNG.normal(size=shape).astype(np.float32) for _ in range(4))
  scale = 3.0
  real = cond + scale * (cond - uncond)
  norm = np.abs(x - real).mean(axis=(1, 2, 3, 4), keepdims=True)
  want = (fake - real) / norm
  got = dmd.dmd_gradient(jnp.asarray(x), dmd.guided(jnp.asarray(cond), jnp.asarray(uncond), scale),
                         jnp.asarray(fake))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  # a degenerate sample (x == real) gives 0, not NaN
  got0 = dmd.dmd_gradient(jnp.asarray(real), jnp.asarray(real), jnp.asarray(real))
  assert np.all(np.asarray(got0) == 0)


def test_dmd_loss_value_and_gradient():
  x = RNG.normal(size=(2, 3, 2, 4, 4)).astype(np.float32)
  g = RNG.normal(size=x.shape).astype(np.float32)
  val, grad = jax.value_and_grad(dmd.dmd_loss)(jnp.asarray(x), jnp.asarray(g))
  np.testing.assert_allclose(float(val), 0.5 * np.mean(g.astype(np.float64) ** 2), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), g / g.size, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(np.asarray(dmd.dmd_loss_cotangent(jnp.asarray(g))), g / g.size, rtol=1e-6)


def test_timesteps_and_sigma_lookup():
  shift = 1.9192
  u = np.array([0.1, 0.25, 0.5, 0.75, 0.0001, 0.9999], np.float32)
  want = np.round(np.clip(1000 * shift * u / (1 + (shift - 1) * u), 20, 980))
  got = np.asarray(dmd.timestep_from_u(jnp.asarray(u), shift))
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(want[:4], [176, 390, 657, 852])  # spec 7.5 worked examples
  table = dmd.shifted_table(shift)
  s = 1 - np.arange(1000) / 1000
  np.testing.assert_allclose(table, shift * s / (1 + (shift - 1) * s), rtol=1e-6)
  sig = np.asarray(dmd.sigma_of_timestep(jnp.asarray(got), jnp.asarray(table)))
  ref = np.array([table[np.argmin(np.abs(1000 * table - t))] for t in got])
  np.testing.assert_array_equal(sig, ref)


def test_beta_schedule_of_generator_timesteps():
  for step in (0, 100, 250, 500, 900):
    c = (1 + np.cos(np.pi * min(step / 500, 1))) / 2
    a, b = dmd.beta_params(step, 4.0, 1.5, 500)
    np.testing.assert_allclose([float(a), float(b)], [1 + 3 * c, 1 + 0.5 * c], rtol=1e-6)


def test_critic_loss_and_add_noise():
  x, eps, v = (RNG.normal(size=(2, 3, 2, 4, 4)).astype(np.float32) for _ in range(3))
  s = np.array([0.3, 0.8], np.float32)
  np.testing.assert_allclose(np.asarray(dmd.add_noise(jnp.asarray(x), jnp.asarray(eps), jnp.asarray(s))),
                             (1 - s[:, None, None, None, None]) * x + s[:, None, None, None, None] * eps, rtol=1e-6)
  np.testing.assert_allclose(float(dmd.critic_loss(jnp.asarray(v), jnp.asarray(eps), jnp.asarray(x))),
                             np.mean((v - (eps - x)) ** 2), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# GAN math

def test_gan_losses_and_penalties():
  fake, real, real_p = (RNG.normal(size=(3, 5)).astype(np.float32) for _ in range(3))
  np.testing.assert_allclose(float(gan.d_loss(jnp.asarray(fake), jnp.asarray(real))),
                             _softplus(-fake).mean() + _softplus(real).mean(), rtol=1e-5)
  np.testing.assert_allclose(float(gan.g_loss(jnp.asarray(fake))), _softplus(fake).mean(), rtol=1e-5)
  np.testing.assert_allclose(float(gan.approx_penalty(jnp.asarray(real), jnp.asarray(real_p), 0.1, True)),
                             np.mean((real - real_p) ** 2), rtol=1e-5)
  np.testing.assert_allclose(float(gan.approx_penalty(jnp.asarray(real), jnp.asarray(real_p), 0.1, False)),
                             np.mean(((real_p - real) / 0.1) ** 2), rtol=1e-5)


def _np_conv3d(x, k, stride, pad):
  """Direct NDHWC / DHWIO convolution in float64."""
  x = np.pad(x, [(0, 0)] + [(p, p) for p in pad] + [(0, 0)])
  kt, kh, kw, _, co = k.shape
  b, t, h, w, _ = x.shape
  ot, oh, ow = ((t - kt) // stride[0] + 1, (h - kh) // stride[1] + 1, (w - kw) // stride[2] + 1)
  out = np.zeros((b, ot, oh, ow, co))
  for i in range(ot):
    for j in range(oh):
      for m in range(ow):
        patch = x[:, i * stride[0]:i * stride[0] + kt, j * stride[1]:j * stride[1] + kh, m * stride[2]:m * stride[2] + kw]
        out[:, i, j, m] = np.einsum("bthwc,thwco->bo", patch, k)
  return out


def test_discriminator_head_matches_numpy():
  width, groups = 8, 4
  params = gan.init_head(jax.random.key(1), 6, width, groups)
  x = RNG.normal(size=(2, 9, 4, 6, 6)).astype(np.float32)
  got = np.asarray(gan.apply_head(params, jnp.asarray(x), groups))
  h = x.astype(np.float64)
  for layer, (_, stride, pad) in zip(params["layers"], gan.HEAD_LAYERS):
    h = _np_conv3d(h, np.asarray(layer["kernel"], np.float64), stride, pad) + np.asarray(layer["bias"])
    b, t, hh, ww, c = h.shape
    g = h.reshape(b, t, hh, ww, groups, c // groups)
    mean = g.mean(axis=(1, 2, 3, 5), keepdims=True)
    var = g.var(axis=(1, 2, 3, 5), keepdims=True)
    h = ((g - mean) / np.sqrt(var + 1e-5)).reshape(h.shape) * np.asarray(layer["gn_scale"]) + np.asarray(layer["gn_bias"])
    h = h / (1 + np.exp(-h))
  want = h.mean(axis=(1, 2, 3)) @ np.asarray(params["out_kernel"], np.float64) + np.asarray(params["out_bias"])
  np.testing.assert_allclose(got, want[:, 0], rtol=2e-4, atol=2e-5)


def test_crop_windows():
  x = jnp.asarray(RNG.normal(size=(3, 2, 2, 8, 10)).astype(np.float32))
  off = gan.draw_crop(jax.random.key(0), 3, (8, 10), (4, 4))
  got = np.asarray(gan.crop(x, off, (4, 4)))
  for i, (a, b) in enumerate(np.asarray(off)):
    assert 0 <= a <= 4 and 0 <= b <= 6
    np.testing.assert_array_equal(got[i], np.asarray(x)[i, :, :, a:a + 4, b:b + 4])


# ---------------------------------------------------------------------------------------------------------------
# EMA

def test_ema_decay_ramp_and_update():
  start, top = 5, 0.99
  for n in range(0, 40):
    k = n - start - 1
    want = 0.0 if k <= 0 else min((1 + k) / (10 + k), top)
    np.testing.assert_allclose(float(ema.ema_decay(n, start, top)), want, rtol=1e-6)
  e = {"a": jnp.ones((3,)), "b": [jnp.zeros((2,))]}
  p = {"a": jnp.full((3,), 3.0), "b": [jnp.full((2,), -1.0)]}
  out = ema.ema_update(e, p, 20, start, top)
  d = min((1 + 14) / (10 + 14), top)
  np.testing.assert_allclose(np.asarray(out["a"]), 1 - (1 - d) * (1 - 3), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out["b"][0]), 0 - (1 - d) * (0 + 1), rtol=1e-6)
  copied = ema.ema_update(e, p, 3, start, top)  # before the start step: a pure copy
  np.testing.assert_array_equal(np.asarray(copied["a"]), 3.0)


# ---------------------------------------------------------------------------------------------------------------
# The AHD step on the tiny model

from configs import ahd as ahd_config  # noqa: E402
from configs import ode as ode_config  # noqa: E402

from helios_jax.training import ahd, metrics, offload, state as state_lib  # noqa: E402
from helios_jax.training.trainers import ahd as ahd_trainer  # noqa: E402
from helios_jax.training.data import get_pair_batch  # noqa: E402
from helios_jax.training.synthetic import SyntheticClips  # noqa: E402


def tiny_ahd(gan_on=True):
  c = ahd_config.get_config("tiny_gan" if gan_on else "tiny")
  c.dmd.amplify_first_chunk = False  # one rollout schedule: half the compilations
  return c


def _setup(c):
  graphdef, trunks = ahd_trainer.build_trunks(c)
  roles = ahd_trainer.make_roles(c, graphdef)
  tx_g, _ = state_lib.make_optimizer(c.optim)
  tx_c, _ = state_lib.make_optimizer(c.critic_optim)
  from flax import nnx
  mcfg = nnx.merge(graphdef, trunks.gen).config
  st = ahd_trainer.init_state(c, trunks, mcfg, tx_g, tx_c)
  # non-zero LoRA B so that generator, critic and teacher differ
  perturb = lambda tr, k: jax.tree.map(lambda x: x + 0.05 * jax.random.normal(k, x.shape), tr)
  st["gen"]["trainable"] = perturb(st["gen"]["trainable"], jax.random.key(11))
  st["critic"]["trainable"] = perturb(st["critic"]["trainable"], jax.random.key(12))
  d = c.data
  src = SyntheticClips(num_clips=4, num_chunks=d.num_chunks, channels=d.channels, height=d.height, width=d.width,
                       text_len=d.text_len, text_dim=d.text_dim, seed=0)
  batch = get_pair_batch(src, 3, 1, 0)
  negative = jnp.asarray(RNG.normal(size=(d.text_len, d.text_dim)).astype(np.float32))
  ph = ahd_trainer.Phases(c, roles, tx_g, tx_c, batch["target"].shape)
  return roles, trunks, st, batch, negative, ph


def test_generator_step_dmd_formula_and_cache_grad_equal_direct_backward():
  c = tiny_ahd()
  roles, trunks, st, batch, negative, ph = _setup(c)
  pre = ph.prepare(st["rng"], jnp.int32(0), batch, negative)
  cond_gen, cond = pre["gen"]
  k_roll, k_gen = pre["keys"][0], pre["keys"][1]
  gen_tr, critic_tr, frozen = st["gen"]["trainable"], st["critic"]["trainable"], trunks.gen
  sched = ph.schedules[False]
  shape = batch["target"].shape

  # (1) DMD part of the cached cotangent vs the hand-written formula on separately evaluated scores
  x = ph.rollout(gen_tr, frozen, cond_gen, k_roll, False)
  cot_dmd, m = jax.jit(lambda *a: ahd.generator_cotangent(roles, *a, c, False))(frozen, critic_tr, x, cond,
                                                                                ahd.draw_generator(k_gen, shape, 0, c))
  draws = ahd.draw_generator(k_gen, shape, 0, c)
  t, s = ahd.noise_level(draws["u"], shape, c)
  x_t = np.asarray(x) * (1 - np.asarray(s)) + np.asarray(s) * np.asarray(draws["eps"])
  velocity = lambda fwd, key="prompt": np.asarray(ahd.call_model(fwd, jnp.asarray(x_t), t, cond, prompt_key=key))
  sv = float(s[0])
  fake = x_t - sv * velocity(roles.fake_score(frozen, critic_tr))
  real_c = x_t - sv * velocity(roles.real_score(frozen))
  real_u = x_t - sv * velocity(roles.real_score(frozen), "negative")
  real = real_c + c.dmd.real_guidance_scale * (real_c - real_u)
  xn = np.asarray(x)
  want = (fake - real) / np.abs(xn - real).mean()
  np.testing.assert_allclose(np.asarray(cot_dmd) * xn.size, want, rtol=2e-3, atol=2e-4)
  np.testing.assert_allclose(float(m["dmd_loss"]), 0.5 * np.mean(want ** 2), rtol=2e-3)

  # (2) Cache Grad: cached cotangent through the rollout == direct backward through rollout + discriminator
  cot, _ = ph.score(critic_tr, frozen, x, cond, k_gen, jnp.int32(0), True)
  cached, _ = ph.gen_grads(gen_tr, frozen, cond_gen, k_roll, cot, False)
  g_const = jnp.asarray(want, jnp.float32)

  def direct(tr):
    rd = ahd.draw_rollout(k_roll, shape, sched)
    xx = ahd.student_rollout(roles.generator(frozen, tr), roles.generator(frozen, jax.lax.stop_gradient(tr)),
                             cond_gen, rd, sched)
    y = gan.crop(xx * (1 - s[:, None, None, None, None]) + s[:, None, None, None, None] * draws["gan_eps"],
                 draws["crop"], ahd.crop_hw(shape, c))
    logits = ahd.discriminator_logits(roles, frozen, critic_tr, y, t, cond)
    return dmd.dmd_loss(xx, g_const) + c.gan.g_weight * gan.g_loss(logits)

  want_grads = jax.jit(jax.grad(direct))(gen_tr)
  flat_c, flat_d = jax.tree.leaves(cached), jax.tree.leaves(want_grads)
  scale = max(float(np.abs(np.asarray(g)).max()) for g in flat_d)
  assert scale > 0
  for a, b in zip(flat_c, flat_d):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-3 * scale)


def test_rollout_gradient_reaches_earlier_stages_only_through_exit_zero():
  c = tiny_ahd(gan_on=False)
  roles, trunks, st, batch, negative, ph = _setup(c)
  pre = ph.prepare(st["rng"], jnp.int32(0), batch, negative)
  cond_gen, _ = pre["gen"]
  sched = ph.schedules[False]
  rd = ahd.draw_rollout(jax.random.key(5), batch["target"].shape, sched)
  noise = rd["noise"]

  def grad_wrt_noise(exits):
    d = dict(rd, exits=jnp.asarray(exits, jnp.int32), noise=noise)
    fwd = roles.generator(trunks.gen, st["gen"]["trainable"])
    return jax.grad(lambda n: jnp.sum(ahd.student_rollout(fwd, fwd, cond_gen, dict(d, noise=n), sched)))(noise)

  g = jax.jit(grad_wrt_noise)
  assert float(jnp.abs(g([0, 0, 0])).max()) > 0  # stage 0's input reaches the output
  assert float(jnp.abs(g([1, 0, 0])).max()) == 0  # stage 0 exit 1: its first call is cut
  assert float(jnp.abs(g([0, 0, 1])).max()) == 0  # stage 2 exit 1: everything before it is cut


def _run(c, workdir, total):
  c.total_steps = total
  return ahd_trainer.train(c, workdir, progress=False)


def test_tiny_ahd_trains_checkpoints_and_resumes(tmp_path):
  c = tiny_ahd()
  c.gan.start_step = 0  # GAN from the first step: one compiled variant per phase
  c.total_steps = 30
  out = _run(c, str(tmp_path), 30)
  assert out["final_step"] == 30
  rows = metrics.read_metrics(str(tmp_path))
  assert len(rows) == 30
  keys = set().union(*rows)
  for k in ("dmd_loss", "critic_loss", "gan_g_loss", "gan_d_loss", "r1", "gen_grad_norm", "critic_grad_norm",
            "step_time"):
    assert k in keys, k
  for r in rows:
    for k, v in r.items():
      assert isinstance(v, float) or isinstance(v, int), (k, v)
      assert np.isfinite(v), (r["step"], k)
  assert os.path.isdir(os.path.join(str(tmp_path), "checkpoints", "30"))
  assert os.path.exists(os.path.join(str(tmp_path), "merged", "config.json"))
  c2 = tiny_ahd()
  c2.gan.start_step = 0
  out2 = _run(c2, str(tmp_path), 33)
  assert out2["start_step"] == 30 and out2["final_step"] == 33 and out2["resumed_from"] == 30

  # the distilled student, exported in the diffusers layout, samples like Helios-Distilled
  from helios_jax.models.transformer import HeliosTransformer3DModel
  from helios_jax.pipelines import HeliosPyramidPipeline
  from helios_jax.schedulers import HeliosDMDScheduler
  model = HeliosTransformer3DModel.from_pretrained(os.path.join(str(tmp_path), "merged"))
  sched = HeliosDMDScheduler.from_config(dict(use_dynamic_shifting=True, time_shift_type="linear"))
  pipe = HeliosPyramidPipeline(model, sched, is_distilled=True)
  emb = np.asarray(SyntheticClips(num_clips=1, channels=4, height=16, width=16, text_len=c.data.text_len,
                                  text_dim=c.data.text_dim)[0]["prompt_embeds"])[None]
  lat = pipe(prompt_embeds=emb, height=128, width=128, num_frames=33, guidance_scale=1.0,
             pyramid_num_inference_steps_list=(2, 2, 2), is_amplify_first_chunk=True, output_type="latent",
             progress=False).frames
  lat = np.asarray(lat)
  assert lat.shape[1:] == (4, 9, 16, 16) and np.all(np.isfinite(lat))


def test_optimizer_state_on_host_matches_init_and_moves_back():
  c = tiny_ahd(gan_on=False)
  graphdef, trunks = ahd_trainer.build_trunks(c)
  gen = ahd_trainer.stages.init_trainable(trunks.gen, c.train, 0)
  tx, _ = state_lib.make_optimizer(c.optim)
  host = offload.init_on_host(tx.init, gen)
  ref = tx.init(gen)
  for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if offload.available(offload.HOST):
      assert a.sharding.memory_kind == offload.HOST
  back = offload.to_device(host)
  assert all(x.sharding.memory_kind == "device" for x in jax.tree.leaves(back) if offload.available(offload.HOST))


def test_trunk_swap_moves_leafwise_and_frees_sources():
  """offload.swap: values kept, memory kinds exchanged, every source buffer deleted (what keeps the 14B run's
  pinned-host pool under one trunk plus optimizer state)."""
  rng = np.random.default_rng(0)
  a = {"w": jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32), "b": jnp.asarray(rng.normal(size=(7,)))}
  b = {"w": jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)}
  want_a, want_b = jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b)
  b = offload.to_host(b, donate=True)
  out, inc = offload.swap(a, b)
  for got, want in ((out, want_a), (inc, want_b)):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got), want)
  if offload.available(offload.HOST):
    assert all(x.sharding.memory_kind == offload.HOST for x in jax.tree.leaves(out))
    assert all(x.sharding.memory_kind == "device" for x in jax.tree.leaves(inc))
    assert all(x.is_deleted() for x in jax.tree.leaves(a) + jax.tree.leaves(b))


@pytest.mark.slow
def test_tiny_ode_pairs_and_regression(tmp_path):
  c = ode_config.get_config("tiny")
  c.ode.data_dir = str(tmp_path / "pairs")
  c.ode.num_prompts = 1
  c.total_steps = 4
  c.checkpoint.every = 2
  from helios_jax.training import dispatch, ode
  out = dispatch.train(c, str(tmp_path / "run"), progress=False)
  assert out["final_step"] == 4 and out["num_pairs"] == 1
  assert all(np.isfinite(out["losses"]))
  rec = np.load(ode.list_pairs(c.ode.data_dir)[0])
  sched0 = ahd.rollout_schedule(tuple(c.dmd.rollout_steps), (16, 16), 9, amplify=True)
  assert rec["s0_p0_latents"].shape == (5, 4, 9, 4, 4)  # 4 student points + the stage end, at 1/4 resolution
  assert rec["s1_p2_latents"].shape == (3, 4, 9, 16, 16)
  np.testing.assert_allclose(rec["s0_p1_timesteps"], sched0.timesteps[1], rtol=1e-6)
  # the recorded trajectory starts at the stage's start latent: a unit-variance noise at stage 0
  assert 0.5 < float(np.std(rec["s0_p0_latents"][0])) < 1.5
