"""Stage 3, Adversarial Hierarchical Distillation (training-spec 7.1-7.3, 7.5, 7.7, 7.8): the pure step functions.

Networks (spec 7.1). One frozen graph definition, two frozen states: the generator's base and the teacher's base
(the same object when both come from one folder / init seed, so only one trunk exists). Roles:

* generator = generator base + generator LoRA (``gen`` trainable);
* real score = teacher base, adapters off;
* fake score = teacher base + critic LoRA (``critic["lora"]``);
* discriminator = the fake score's trunk with heads on hooked blocks and on the output (``critic["heads"]``).

Every model call goes through :func:`helios_jax.training.lora.bind`. A step is split into jitted phases (see
:mod:`helios_jax.training.ahd_trainer`):

* generator step (every ``update_ratio``-th step): :func:`generator_cotangent` rolls the student out without
  gradient, evaluates teacher and critic at the noised sample and returns ``dL/dx`` (DMD gradient plus the GAN
  term's input gradient: **Cache Grad**, the discriminator graph is freed before the generator backward), then
  :func:`generator_grads` re-runs the rollout with gradient and back-propagates that cached cotangent
  (``sum(stopgrad(c) * x)``), so the generator graph and the score/discriminator graphs never coexist;
* critic step (every step): :func:`student_rollout` without gradient, then :func:`critic_loss_fn` (flow matching on
  generated samples, plus the discriminator loss and approximate R1/R2 once the GAN is on).

Layout (B, C, T, H, W) everywhere; conditioning dicts hold the model's history inputs, prompt embeddings and RoPE
frame indices.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.errors import InputError
from helios_jax.pipelines.history import block_noise_cholesky, downsample_2x, place_block_noise, upsample_nearest_2x
from helios_jax.schedulers.dmd import HeliosDMDScheduler
from helios_jax.schedulers.helios import calculate_shift
from helios_jax.training import dmd, gan, lora

# ---------------------------------------------------------------------------------------------------------------
# The student's few-step pyramid rollout (spec 7.2) and its simulated backward (spec 7.3)


@dataclasses.dataclass(frozen=True)
class RolloutSchedule:
  """Host-side per-stage tables of the student's rollout (float32 NumPy; static for jit).

  ``timesteps[i]`` (n_i,) network timesteps (fractional, as in training), ``step_sigma[i]`` the sigma of each call,
  ``renoise_sigma[i]`` the sigma the x0 estimate is re-noised to before the next call (toward the stage's start
  latent), ``alpha``/``beta`` the upsample-renoise constants of each stage > 0, ``gamma`` the block-noise
  correlation.
  """

  timesteps: tuple
  step_sigma: tuple
  renoise_sigma: tuple
  alpha: tuple
  beta: tuple
  gamma: float

  @property
  def steps(self) -> tuple[int, ...]:
    return tuple(len(t) for t in self.timesteps)


def rollout_schedule(steps: Sequence[int], latent_hw: tuple[int, int], chunk: int, amplify: bool,
                     patch: Sequence[int] = (1, 2, 2), stage_range=(0.0, 1 / 3, 2 / 3, 1.0),
                     gamma: float = 1 / 3) -> RolloutSchedule:
  """The distilled sampler's schedule (HeliosDMDScheduler, linear dynamic shift at each stage's own resolution).

  ``amplify`` doubles the calls per stage (the first chunk of a video, spec 7.2). Values at 384x640 with
  [2, 2, 2] are the spec's table (998.53, 833.96 | 742.82, 547.19 | 385.41, 253.99).
  """
  n_stages = len(steps)
  sched = HeliosDMDScheduler.from_config(dict(stages=n_stages, stage_range=list(stage_range), gamma=gamma,
                                              use_dynamic_shifting=True, time_shift_type="linear"))
  h, w = latent_hw
  ts, ss, rs, al, be = [], [], [], [], []
  for i, n in enumerate(steps):
    f = 2 ** (n_stages - 1 - i)
    if h % (f * patch[1]) or w % (f * patch[2]):
      raise InputError(f"latent size {h}x{w} must be divisible by {f * patch[1]}x{f * patch[2]} for "
                       f"{n_stages} pyramid stages")
    seq = chunk * (h // f) * (w // f) // int(np.prod(patch))
    tab = sched.set_timesteps(int(n), stage_index=i, mu=calculate_shift(seq), is_amplify_first_chunk=amplify)
    ts.append(np.asarray(tab.timesteps, np.float32))
    ss.append(np.asarray(tab.coef["step_sigma"], np.float32))
    rs.append(np.asarray(tab.coef["renoise_sigma"], np.float32))
    a, b = sched.renoise_coefficients(i) if i > 0 else (1.0, 0.0)
    al.append(float(a))
    be.append(float(b))
  return RolloutSchedule(tuple(ts), tuple(ss), tuple(rs), tuple(al), tuple(be), float(gamma))


def draw_rollout(key: jax.Array, shape: tuple, schedule: RolloutSchedule) -> dict:
  """All randomness of one rollout: full-resolution noise, per-stage block noise, per-stage exit indices."""
  n_stages = len(schedule.steps)
  k_noise, k_block, k_exit = jax.random.split(key, 3)
  b, c, t, h, w = shape
  blocks = []
  lower = jnp.asarray(block_noise_cholesky(schedule.gamma))
  for i in range(1, n_stages):
    f = 2 ** (n_stages - 1 - i)
    hs, ws = h // f, w // f
    z = jax.random.normal(jax.random.fold_in(k_block, i), (b * c * t * (hs // 2) * (ws // 2), 4), jnp.float32)
    blocks.append(place_block_noise(z, lower, (b, c, t, hs, ws)))
  exits = jnp.stack([jax.random.randint(jax.random.fold_in(k_exit, i), (), 0, n)
                     for i, n in enumerate(schedule.steps)]).astype(jnp.int32)
  return dict(noise=jax.random.normal(k_noise, shape, jnp.float32), block_noise=blocks, exits=exits)


def call_model(forward: Callable, z: jax.Array, t: jax.Array, cond: dict, prompt_key: str = "prompt",
               **extra):
  """``forward`` on latents ``z`` at timestep ``t`` (scalar or (B,)) with the history / prompt / indices of ``cond``."""
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (z.shape[0],))
  return forward(hidden_states=z, timestep=t, encoder_hidden_states=cond[prompt_key], **cond["history"],
                 **cond["indices"], **extra)


def student_rollout(forward: Callable, forward_nograd: Callable, cond: dict, draws: dict,
                    schedule: RolloutSchedule) -> jax.Array:
  """The generated chunk x (B, C, T, H, W) float32 (spec 7.2) with the simulated backward of spec 7.3.

  In stage i the calls before the exit index ``e_i`` run through ``forward_nograd`` (its parameters under
  ``stop_gradient``) and their results are cut from the graph; call ``e_i`` runs through ``forward`` and its
  x0 estimate is the stage output (later calls are skipped). So the gradient reaches stage i - 1 only when
  ``e_i == 0``, exactly as in the reference. ``e_i`` is traced: one compiled program serves every exit draw.
  """
  z = draws["noise"]
  n_stages = len(schedule.steps)
  for _ in range(n_stages - 1):
    z = downsample_2x(z)
  x0 = None
  for i in range(n_stages):
    if i > 0:
      z = schedule.alpha[i] * upsample_nearest_2x(x0) + schedule.beta[i] * draws["block_noise"][i - 1]
    start = jax.lax.stop_gradient(z)
    ts, ss, rs = (jnp.asarray(a) for a in (schedule.timesteps[i], schedule.step_sigma[i], schedule.renoise_sigma[i]))
    e = draws["exits"][i]

    def body(j, zz, ts=ts, ss=ss, rs=rs, start=start):
      v = call_model(forward_nograd, zz, ts[j], cond).astype(jnp.float32)
      x0j = zz - ss[j] * v
      return (1.0 - rs[j]) * x0j + rs[j] * start

    z_ng = jax.lax.fori_loop(0, e, body, jax.lax.stop_gradient(z))
    z = jnp.where(e == 0, z, z_ng)  # the graph into earlier stages survives only through e_i == 0
    v = call_model(forward, z, ts[e], cond).astype(jnp.float32)
    x0 = z - ss[e] * v
  return x0


# ---------------------------------------------------------------------------------------------------------------
# Networks


@dataclasses.dataclass(frozen=True)
class Roles:
  """Static description of the networks: graph definition, LoRA scales, GAN hook layout."""

  graphdef: object
  gen_scale: float
  critic_scale: float
  hooks: tuple[int, ...]
  head_groups: int
  patch: tuple[int, int, int]

  def generator(self, frozen, gen_trainable):
    return lora.bind(self.graphdef, frozen, gen_trainable, self.gen_scale)

  def fake_score(self, frozen, critic_trainable):
    return lora.bind(self.graphdef, frozen, adapters(critic_trainable), self.critic_scale)

  def real_score(self, frozen):
    return lora.bind(self.graphdef, frozen, {"lora": {}, "full": {}}, 1.0)


def adapters(critic_trainable: dict) -> dict:
  """The critic LoRA part (what :func:`lora.bind` applies); the GAN heads are used separately."""
  return {"lora": critic_trainable["lora"], "full": critic_trainable["full"]}


def discriminator_logits(roles: Roles, frozen, critic_trainable: dict, y: jax.Array, t: jax.Array,
                         cond: dict) -> jax.Array:
  """(B, n_heads) logits of the discriminator on cropped noisy latents ``y`` (B, C, T, ch, cw)."""
  forward = roles.fake_score(frozen, critic_trainable)
  v, feats = call_model(forward, y, t, cond, return_block_outputs=roles.hooks)
  pt, ph, pw = roles.patch
  grid = (y.shape[2] // pt, y.shape[3] // ph, y.shape[4] // pw)
  feats = [feats[i] for i in range(len(roles.hooks))] if critic_trainable["heads"].get("hooks") else []
  return gan.head_logits(critic_trainable["heads"], v, feats, grid, roles.head_groups)


def tile_cond(cond: dict, n: int) -> dict:
  """The conditioning repeated ``n`` times along the batch (for one packed discriminator forward)."""
  rep = lambda x: jnp.concatenate([x] * n, axis=0)
  return dict(history={k: rep(v) for k, v in cond["history"].items()}, prompt=rep(cond["prompt"]),
              negative=rep(cond["negative"]) if "negative" in cond else None, indices=cond["indices"])


# ---------------------------------------------------------------------------------------------------------------
# Generator step


def draw_generator(key: jax.Array, shape: tuple, step: jax.Array, cfg) -> dict:
  """DMD timestep (Beta law annealed to uniform, spec 7.5), its noise, the GAN noise and crop offsets."""
  k_u, k_eps, k_geps, k_crop = jax.random.split(key, 4)
  a, b = dmd.beta_params(step, cfg.dmd.gen_beta_alpha, cfg.dmd.gen_beta_beta, cfg.dmd.gen_beta_steps)
  u = jax.random.beta(k_u, a, b, (shape[0],))
  d = dict(u=u, eps=jax.random.normal(k_eps, shape, jnp.float32),
           gan_eps=jax.random.normal(k_geps, shape, jnp.float32))
  d["crop"] = gan.draw_crop(k_crop, shape[0], shape[3:], crop_hw(shape, cfg))
  return d


def crop_hw(shape: tuple, cfg) -> tuple[int, int]:
  return gan.crop_size(shape[3], shape[4], float(cfg.gan.crop_scale), 2)


def noise_level(u: jax.Array, shape: tuple, cfg) -> tuple[jax.Array, jax.Array]:
  """(t, s): integer timesteps from ``u`` and their sigmas in the full-resolution shifted table (spec 7.5)."""
  _, _, t, h, w = shape
  shift = calculate_shift(t * h * w // 4)
  ts = dmd.timestep_from_u(u, shift, float(cfg.dmd.min_timestep), float(cfg.dmd.max_timestep))
  return ts, dmd.sigma_of_timestep(ts, jnp.asarray(dmd.shifted_table(shift)))


def generator_cotangent(roles: Roles, frozen_teacher, critic_trainable: dict, x: jax.Array, cond: dict,
                        draws: dict, cfg, gan_active: bool) -> tuple[jax.Array, dict]:
  """``dL/dx`` (B, C, T, H, W) of the generator loss at the rolled-out sample ``x``, and metrics (spec 7.5 / 7.7).

  ``cond`` is the teacher's / critic's conditioning (unsaturated history; also holds ``negative``, the
  negative-prompt embeddings). Nothing here is differentiated w.r.t. parameters: the DMD gradient is a constant
  (computed without gradient in the reference too) and the GAN term's input gradient is computed and its graph
  dropped here (Cache Grad).
  """
  x = jax.lax.stop_gradient(x)
  t, s = noise_level(draws["u"], x.shape, cfg)
  x_t = dmd.add_noise(x, draws["eps"], s)
  fake = dmd.x0_from_velocity(x_t, call_model(roles.fake_score(frozen_teacher, critic_trainable), x_t, t, cond), s)
  real_fwd = roles.real_score(frozen_teacher)
  real_c = dmd.x0_from_velocity(x_t, call_model(real_fwd, x_t, t, cond), s)
  real_u = dmd.x0_from_velocity(x_t, call_model(real_fwd, x_t, t, cond, prompt_key="negative"), s)
  g = dmd.dmd_gradient(x, dmd.guided(real_c, real_u, float(cfg.dmd.real_guidance_scale)), fake)
  cot = dmd.dmd_loss_cotangent(g)
  metrics = dict(dmd_loss=0.5 * jnp.mean(jnp.square(g)), dmd_grad_abs=jnp.mean(jnp.abs(g)), dmd_timestep=t.mean())
  if gan_active:
    size = crop_hw(x.shape, cfg)
    critic_const = jax.lax.stop_gradient(critic_trainable)

    def gan_g(y):
      return gan.g_loss(discriminator_logits(roles, frozen_teacher, critic_const, gan.crop(y, draws["crop"], size),
                                             t, cond))

    y = dmd.add_noise(x, draws["gan_eps"], s)
    lg, g_y = jax.value_and_grad(gan_g)(y)  # Cache Grad: only this input gradient leaves the discriminator
    w = float(cfg.gan.g_weight)
    cot = cot + w * (1.0 - s)[:, None, None, None, None] * g_y
    metrics["gan_g_loss"] = lg
  return cot, metrics


def generator_grads(roles: Roles, frozen_gen, gen_trainable: dict, cond_gen: dict, rollout_draws: dict,
                    cotangent: jax.Array, schedule: RolloutSchedule) -> dict:
  """Gradient of the generator loss w.r.t. its trainables: ``grad sum(stopgrad(cotangent) * x(theta))``."""

  def surrogate(tr):
    x = student_rollout(roles.generator(frozen_gen, tr), roles.generator(frozen_gen, jax.lax.stop_gradient(tr)),
                        cond_gen, rollout_draws, schedule)
    return jnp.sum(jax.lax.stop_gradient(cotangent) * x)

  return jax.grad(surrogate)(gen_trainable)


# ---------------------------------------------------------------------------------------------------------------
# Critic / discriminator step


def draw_critic(key: jax.Array, shape: tuple, cfg) -> dict:
  """Critic timestep ``u ~ U(0.001, 1)`` (spec 7.5), its noise, crop offsets and the R1/R2 perturbations."""
  k_u, k_eps, k_cf, k_cr, k_r1, k_r2 = jax.random.split(key, 6)
  size = crop_hw(shape, cfg)
  cshape = shape[:3] + size
  return dict(u=jax.random.uniform(k_u, (shape[0],), minval=0.001, maxval=1.0),
              eps=jax.random.normal(k_eps, shape, jnp.float32),
              crop_fake=gan.draw_crop(k_cf, shape[0], shape[3:], size),
              crop_real=gan.draw_crop(k_cr, shape[0], shape[3:], size),
              r1_noise=jax.random.normal(k_r1, cshape, jnp.float32),
              r2_noise=jax.random.normal(k_r2, cshape, jnp.float32))


def critic_loss_fn(critic_trainable: dict, roles: Roles, frozen_teacher, x_fake: jax.Array, real: jax.Array,
                   cond: dict, draws: dict, cfg, gan_active: bool) -> tuple[jax.Array, dict]:
  """Fake-score flow matching on generated samples (+ GAN discriminator loss and R1/R2 when active).

  ``real`` is the real continuation of the same history as ``x_fake`` (the reference pairs the real chunk with a
  different chunk's history; see docs). One optimiser step takes the sum (the reference's DeepSpeed engine
  happened to take two).
  """
  x_fake = jax.lax.stop_gradient(x_fake)
  t, s = noise_level(draws["u"], x_fake.shape, cfg)
  x_t = dmd.add_noise(x_fake, draws["eps"], s)
  v = call_model(roles.fake_score(frozen_teacher, critic_trainable), x_t, t, cond)
  l_critic = dmd.critic_loss(v, draws["eps"], x_fake)
  total, metrics = l_critic, dict(critic_loss=l_critic)
  if gan_active:
    g = cfg.gan
    size = crop_hw(x_fake.shape, cfg)
    real_t = gan.crop(dmd.add_noise(real, draws["eps"], s), draws["crop_real"], size)
    fake_t = gan.crop(x_t, draws["crop_fake"], size)
    pieces = [fake_t, real_t]
    if g.r1_weight > 0:
      pieces.append(real_t + float(g.r1_sigma) * draws["r1_noise"])  # same crop as real_t
    if g.r2_weight > 0:
      pieces.append(fake_t + float(g.r2_sigma) * draws["r2_noise"])
    n = len(pieces)
    logits = discriminator_logits(roles, frozen_teacher, critic_trainable, jnp.concatenate(pieces, axis=0),
                                  jnp.concatenate([t] * n), tile_cond(cond, n))
    parts = jnp.split(logits, n, axis=0)
    l_d = float(g.d_weight) * gan.d_loss(parts[0], parts[1])
    total = total + l_d
    metrics["gan_d_loss"] = l_d
    k = 2
    if g.r1_weight > 0:
      metrics["r1"] = float(g.r1_weight) * gan.approx_penalty(parts[1], parts[k], float(g.r1_sigma), g.approximate)
      total = total + metrics["r1"]
      k += 1
    if g.r2_weight > 0:
      metrics["r2"] = float(g.r2_weight) * gan.approx_penalty(parts[0], parts[k], float(g.r2_sigma), g.approximate)
      total = total + metrics["r2"]
  return total, metrics
