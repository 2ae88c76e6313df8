"""Stage 3 (Adversarial Hierarchical Distillation): DMD / GAN / EMA math vs NumPy, Cache Grad, tiny runs on a CPU."""

from __future__ import annotations

import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "helios_jax_test_ahd_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

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
