"""Training a small Wan-architecture VAE (``AutoencoderKLWan``) on procedural scenes, for the bundled demo model.

Objective (as simple as works, the usual KL-autoencoder recipe without the adversarial and perceptual terms)::

    loss = mean_w |x - D(z)| + mse_weight * mean_w (x - D(z))^2 + kl_weight * mean KL(q(z|x) || N(0, I)),
    z ~ q(z|x) = N(mean, exp(logvar))   (reparameterised),

where ``mean_w`` is a weighted mean. Frame weights: frame 0 weighs ``first_frame_weight`` times a later frame. The
Wan VAE encodes frame 0 alone into the first latent, and that single-frame latent is what image-to-video conditions
on; with plain averaging it is one frame in 33 and the first demo VAE decoded it to a nearly flat colour. Pixel
weights (``object_weight`` > 0): a pixel weighs ``1 + object_weight * coverage``, its anti-aliased coverage by the
scene's objects (:func:`recipes.demo.scenes.coverage`); the objects are a small fraction of the pixels, and
with plain averaging a briefly trained VAE decoded them to faint blobs of the wrong colour. An element's weight is
the product of its frame's and its pixel's; ``object_weight`` 0 leaves the loss exactly as without pixel weights.

Training runs in two phases (:func:`train_vae`), each with its own warmup-cosine learning-rate schedule and
wall-clock budget: an optional image phase on single frames (F = 1: the causal VAE's first-frame path, about 30x
cheaper than a 33-frame clip, so thousands of steps fit in a minute on a GPU and the encoder / decoder learn
shapes and colours), then the video phase on short clips (``config.data.frames`` frames, 1 + 4k). Data are
rendered on the fly from :mod:`recipes.demo.scenes`, and every step is a pure function of (seed, step):
scene indices ``step * B .. step * B + B - 1`` of the phase's scene stream and a start frame drawn from
``(seed, step)``. The decoder's output clamp is skipped in the loss (it has no gradient outside [-1, 1]). At the
end the per-channel mean and std of posterior samples over ``config.stats_clips`` fresh clips become
``latents_mean`` / ``latents_std`` of the exported config, as the Wan VAE ships them, so the diffusion model sees
unit-scale latents.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from helios_jax.models.vae import AutoencoderKLWan, WanVAEConfig
from helios_jax.training import metrics
from recipes.demo import scenes


def vae_config(model_cfg) -> WanVAEConfig:
  """The ``WanVAEConfig`` of ``config.model`` (placeholder latents mean/std: 0 and 1)."""
  z = int(model_cfg.z_dim)
  return WanVAEConfig(base_dim=int(model_cfg.base_dim), z_dim=z, dim_mult=tuple(model_cfg.dim_mult),
                      num_res_blocks=int(model_cfg.num_res_blocks), latents_mean=(0.0,) * z,
                      latents_std=(1.0,) * z)


def scene_config(data_cfg) -> scenes.SceneConfig:
  return scenes.SceneConfig(height=int(data_cfg.height), width=int(data_cfg.width))


def vae_loss(model: AutoencoderKLWan, video: jax.Array, eps: jax.Array, kl_weight: float,
             mse_weight: float, first_frame_weight: float = 1.0, pixel_weights: jax.Array | None = None
             ) -> tuple[jax.Array, dict]:
  """Loss of one batch. video (B, 3, F, H, W) in [-1, 1]; eps (B, z, T, h, w) standard normal draws;
  pixel_weights (B, F, H, W) or None (all 1).

  Without ``pixel_weights`` the L1 / MSE terms are frame-weighted means of the per-frame means (frame 0 weighs
  ``first_frame_weight``, a later frame 1). With them every element (b, c, f, h, w) weighs
  ``frame_weight[f] * pixel_weights[b, f, h, w]`` and the terms are ``sum(weight * err) / sum(weight)`` (equal to the
  former when the pixel weights are all 1). The reported ``l1`` / ``mse`` are these weighted means.
  """
  moments = model.encode_moments(video)
  mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=1)
  logvar = jnp.clip(logvar, -30.0, 20.0)  # the clamp of diffusers' DiagonalGaussianDistribution
  z = mean + jnp.exp(0.5 * logvar) * eps
  recon = model.decode_latents(z, clip=False).astype(jnp.float32)
  f = recon.shape[2]
  target = video[:, :, :f].astype(jnp.float32)
  w = jnp.ones((f,), jnp.float32).at[0].set(first_frame_weight)
  if pixel_weights is None:
    w = w / jnp.sum(w)  # (F,) frame weights summing to 1

    def weighted_mean(err):  # (B, C, F, H, W) -> weighted mean over frames of the per-frame means
      return jnp.sum(jnp.mean(err, axis=(0, 1, 3, 4)) * w)
  else:
    weight = pixel_weights[:, None, :f].astype(jnp.float32) * w[:, None, None]  # (B, 1, F, H, W)

    def weighted_mean(err):  # (B, C, F, H, W) -> mean weighted by ``weight`` (broadcast over channels)
      return jnp.sum(err * weight) / (jnp.sum(weight) * err.shape[1])

  l1 = weighted_mean(jnp.abs(recon - target))
  mse = weighted_mean((recon - target) ** 2)
  kl = jnp.mean(0.5 * (mean ** 2 + jnp.exp(logvar) - 1.0 - logvar))
  loss = l1 + mse_weight * mse + kl_weight * kl
  return loss, dict(l1=l1, mse=mse, kl=kl)


def make_train_step(graphdef, tx, kl_weight: float, mse_weight: float, first_frame_weight: float = 1.0,
                    object_weight: float = 0.0):
  """Jitted ``step(params, opt_state, video, eps, cover=None) -> (params, opt_state, metrics)``.

  ``cover`` (B, F, H, W) is the object coverage of the video's pixels (:func:`clip_batch_with_coverage`): with
  ``object_weight`` > 0 a pixel weighs ``1 + object_weight * cover`` in the reconstruction terms; with 0 it is
  ignored (the loss is :func:`vae_loss` without pixel weights, exactly).
  """

  def loss_fn(params, video, eps, cover):
    pixel_weights = None if object_weight == 0 or cover is None else 1.0 + object_weight * cover
    return vae_loss(nnx.merge(graphdef, params), video, eps, kl_weight, mse_weight, first_frame_weight,
                    pixel_weights)

  @jax.jit
  def step(params, opt_state, video, eps, cover=None):
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, video, eps, cover)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, dict(loss=loss, grad_norm=optax.global_norm(grads), **parts)

  return step


def _clip_scenes(seed: int, step: int, batch: int, frames: int, max_start: int,
                 cfg: scenes.SceneConfig) -> tuple[dict, np.ndarray]:
  """Scene parameters (batch of ``batch``) and frame indices (frames,) of batch ``step`` of stream ``seed``."""
  start = int(np.random.default_rng([seed, step, 1]).integers(0, max_start + 1))
  params, _ = scenes.scene_batch(seed, range(step * batch, (step + 1) * batch), cfg)
  return params, np.arange(start, start + frames)


def _to_video(pixels: jax.Array) -> jax.Array:
  """(B, F, H, W, 3) in [0, 1] -> (B, 3, F, H, W) in [-1, 1]."""
  return jnp.transpose(pixels * 2.0 - 1.0, (0, 4, 1, 2, 3))


def clip_batch(seed: int, step: int, batch: int, frames: int, max_start: int,
               cfg: scenes.SceneConfig) -> jax.Array:
  """Video batch ``step``: (B, 3, frames, H, W) in [-1, 1], rendered on the default device.

  Scenes ``step * B .. step * B + B - 1`` of stream ``seed``, all from one start frame drawn in [0, max_start]
  from ``(seed, step)``.
  """
  params, frame_ids = _clip_scenes(seed, step, batch, frames, max_start, cfg)
  return _to_video(scenes.render(params, frame_ids, cfg))


def clip_batch_with_coverage(seed: int, step: int, batch: int, frames: int, max_start: int,
                             cfg: scenes.SceneConfig) -> tuple[jax.Array, jax.Array]:
  """:func:`clip_batch` and its pixels' object coverage: (B, 3, frames, H, W), (B, frames, H, W) in [0, 1]."""
  params, frame_ids = _clip_scenes(seed, step, batch, frames, max_start, cfg)
  pixels, cover = scenes.render_with_coverage(params, frame_ids, cfg)
  return _to_video(pixels), cover


def latent_stats(model: AutoencoderKLWan, seed: int, clips: int, batch: int, frames: int,
                 cfg: scenes.SceneConfig) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of posterior *samples* over ``clips`` clips of stream ``seed``: (z,), (z,).

  Exact moments of the mixture (E z = E mu, E z^2 = E mu^2 + E exp(logvar)), so the normalised samples the
  dataset stores have unit variance even while the posterior variance is still large (a briefly trained VAE).
  """
  encode = jax.jit(lambda m, v: m.encode_moments(v))
  total, total_sq, count = 0.0, 0.0, 0
  for i in range(max(1, clips // batch)):
    video = clip_batch(seed, i, batch, frames, 0, cfg)
    mean, logvar = (np.asarray(a, np.float64) for a in jnp.split(encode(model, video), 2, axis=1))
    total = total + mean.sum(axis=(0, 2, 3, 4))
    total_sq = total_sq + (mean ** 2 + np.exp(np.clip(logvar, -30.0, 20.0))).sum(axis=(0, 2, 3, 4))
    count += mean.size // mean.shape[1]
  mu = total / count
  std = np.sqrt(np.maximum(total_sq / count - mu ** 2, 1e-12))
  return mu.astype(np.float32), std.astype(np.float32)


def budgeted_lr(schedule, step: int, total_steps: int, elapsed: float, budget: float) -> float:
  """Learning rate of ``schedule`` (a function of the step) at the larger of the fractions of the steps and of the
  wall-clock budget done (``budget`` 0 = steps only)."""
  done = step / total_steps
  if budget > 0:
    done = max(done, min(elapsed / budget, 1.0))
  return float(schedule(int(done * total_steps)))


def _schedule(config, steps: int) -> optax.Schedule:
  """Warmup then cosine decay to ``final_lr_fraction`` of the peak over ``steps`` steps (``config.optim``)."""
  lr, warm = float(config.optim.learning_rate), min(int(config.optim.warmup_steps), steps // 2)
  return optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(steps, warm + 1),
                                            float(config.optim.final_lr_fraction) * lr)


def _run_phase(phase: str, state: tuple, step_fn, batch_fn, eps_key, eps_shape: tuple, steps: int, budget: float,
               schedule, writer, log_every: int, progress: bool) -> tuple[tuple, list[float]]:
  """``steps`` training steps (fewer when the wall-clock ``budget`` in seconds, 0 = none, counted from the end
  of the first (compiling) step, runs out); returns (the final (params, opt_state), logged losses).

  ``batch_fn(step) -> (video, cover or None)``; eps of step ``i`` are ``normal(fold_in(eps_key, i), eps_shape)``.
  The learning rate follows ``schedule`` over the steps or the budget, whichever ends first (:func:`budgeted_lr`).
  Logged rows carry ``phase``.
  """
  params, opt_state = state
  losses, compile_s = [], 0.0
  t0 = time.perf_counter()
  for step in range(steps):
    if budget and time.perf_counter() - t0 > budget:
      print(f"vae ({phase} phase): wall-clock budget of {budget:.0f} s reached after {step} steps", flush=True)
      break
    video, cover = batch_fn(step)
    eps = jax.random.normal(jax.random.fold_in(eps_key, step), eps_shape)
    lr_now = budgeted_lr(schedule, step, steps, time.perf_counter() - t0 if step else 0.0, budget)
    opt_state[1].hyperparams["learning_rate"] = jnp.asarray(lr_now, jnp.float32)
    params, opt_state, m = step_fn(params, opt_state, video, eps, cover)
    if step == 0:  # the budget counts training, not the first step's compilation
      jax.block_until_ready(params)
      compile_s, t0 = time.perf_counter() - t0, time.perf_counter()
    if (step + 1) % log_every == 0 or step + 1 == steps:
      m = {k: float(v) for k, v in m.items()}
      losses.append(m["loss"])
      writer.write(step + 1, dict(phase=phase, **m, lr=lr_now, elapsed=time.perf_counter() - t0,
                                  first_step_s=compile_s))
      if progress:
        print(f"vae {phase} step {step + 1}: loss {m['loss']:.4f} l1 {m['l1']:.4f} kl {m['kl']:.3f}", flush=True)
  return (params, opt_state), losses


IMAGE_STREAM = 2  # the image phase's scenes: stream data.seed + 2 (+0: video phase, +1: latent stats, +7: decoder)


def train_vae(config, workdir: str, progress: bool = False) -> tuple[AutoencoderKLWan, list[float]]:
  """Trains the VAE of ``config`` (configs/demo_vae.py); returns (model with latents mean/std set, logged losses of
  both phases in order).

  Two phases, each with its own warmup-cosine learning-rate schedule (one Adam state throughout):

  1. images: ``config.image_steps`` (0 = skipped) steps on single frames (F = 1, the causal VAE's first-frame
     path), ``config.image_batch_size`` scenes of stream ``data.seed + 2`` per step at a start frame drawn in
     [0, data.max_start] per step; wall-clock budget ``config.image_max_seconds`` (0 = none);
  2. video: ``config.total_steps`` steps on ``config.data.frames``-frame clips of ``config.batch_size`` scenes of
     stream ``data.seed``; budget ``config.max_seconds`` (0 = none; the GPU script sets it so one command always
     finishes).

  A budget counts from the end of its phase's first (compiling) step, and the phase's schedule runs over whichever
  ends first, its steps or its budget: a phase stopped by its budget still ends at the low learning rate. With
  ``config.objective.object_weight`` > 0 both phases weigh object pixels ``1 + object_weight * coverage``.
  Writes ``workdir/metrics.jsonl`` (each row has ``phase``: "image" or "video"; steps count from 1 in each phase).
  The model is float32.
  """
  cfg = vae_config(config.model)
  scfg = scene_config(config.data)
  model = AutoencoderKLWan(cfg, dtype=jnp.float32, rngs=nnx.Rngs(int(config.seed)))
  graphdef, params = nnx.split(model)
  tx = optax.chain(optax.clip_by_global_norm(float(config.optim.max_grad_norm)),
                   optax.inject_hyperparams(optax.adam)(learning_rate=float(config.optim.learning_rate)))
  state = (params, tx.init(params))
  obj = config.objective
  object_weight = float(obj.get("object_weight", 0.0))
  step_fn = make_train_step(graphdef, tx, float(obj.kl_weight), float(obj.mse_weight),
                            float(obj.get("first_frame_weight", 1.0)), object_weight)
  writer = metrics.MetricsWriter(workdir, tensorboard=False)
  h, w = scfg.height // cfg.spatial_compression, scfg.width // cfg.spatial_compression
  seed, max_start, key = int(config.data.seed), int(config.data.max_start), jax.random.key(int(config.seed))

  def batches(stream: int, batch: int, frames: int):
    if object_weight:
      return lambda step: clip_batch_with_coverage(stream, step, batch, frames, max_start, scfg)
    return lambda step: (clip_batch(stream, step, batch, frames, max_start, scfg), None)

  losses = []
  image_steps, bi = int(config.get("image_steps", 0) or 0), int(config.get("image_batch_size", 1) or 1)
  if image_steps:
    state, logged = _run_phase("image", state, step_fn, batches(seed + IMAGE_STREAM, bi, 1),
                               jax.random.fold_in(key, 2 ** 31 - 1), (bi, cfg.z_dim, 1, h, w), image_steps,
                               float(config.get("image_max_seconds", 0) or 0), _schedule(config, image_steps),
                               writer, int(config.log_every), progress)
    losses += logged
  b, f, steps = int(config.batch_size), int(config.data.frames), int(config.total_steps)
  state, logged = _run_phase("video", state, step_fn, batches(seed, b, f), key,
                             (b, cfg.z_dim, cfg.num_latent_frames(f), h, w), steps,
                             float(config.get("max_seconds", 0) or 0), _schedule(config, steps), writer,
                             int(config.log_every), progress)
  losses += logged
  writer.close()
  model = nnx.merge(graphdef, state[0])
  mu, std = latent_stats(model, seed + 1, int(config.stats_clips), b, f, scfg)
  model.config = dataclasses.replace(cfg, latents_mean=tuple(float(v) for v in mu),
                                     latents_std=tuple(float(v) for v in std))
  return model, losses


def _decoder_filter():
  """The parameters a decoder fine-tune trains: ``post_quant_conv`` and ``decoder`` (encoder side frozen)."""
  return nnx.All(nnx.Param, nnx.Any(nnx.PathContains("decoder"), nnx.PathContains("post_quant_conv")))


def finetune_decoder(model: AutoencoderKLWan, config, workdir: str, progress: bool = False
                     ) -> tuple[AutoencoderKLWan, list[float], int]:
  """Fine-tunes only the decoder of a trained VAE on posterior *means* of ``config.data.frames``-frame clips.

  The encoder, ``quant_conv`` and ``latents_mean`` / ``latents_std`` stay as they are, so every latent already
  encoded with this VAE (the demo's training set) and every DiT trained on them stay valid; only decoding gets
  better. Loss: ``mean |x - D(mu)| + mse_weight * mean (x - D(mu))^2``. Scenes come from stream
  ``config.data.seed + 7`` (not the stream the VAE was trained on). ``config.max_seconds`` caps the wall time,
  counted from the start (the first step's compilation included, unlike :func:`train_vae`). Returns (the model
  with the fine-tuned decoder, logged losses, steps done).
  """
  scfg = scene_config(config.data)
  graphdef, train_params, frozen = nnx.split(model, _decoder_filter(), ...)
  lr = float(config.optim.learning_rate)
  tx = optax.chain(optax.clip_by_global_norm(float(config.optim.max_grad_norm)), optax.adam(lr))
  opt_state = tx.init(train_params)
  mse_weight = float(config.objective.mse_weight)

  def loss_fn(train_params, frozen, video):
    m = nnx.merge(graphdef, train_params, frozen)
    mean, _ = jnp.split(m.encode_moments(video).astype(jnp.float32), 2, axis=1)
    recon = m.decode_latents(jax.lax.stop_gradient(mean), clip=False).astype(jnp.float32)
    target = video[:, :, :recon.shape[2]].astype(jnp.float32)
    l1, mse = jnp.mean(jnp.abs(recon - target)), jnp.mean((recon - target) ** 2)
    return l1 + mse_weight * mse, dict(l1=l1, mse=mse)

  @jax.jit
  def step_fn(train_params, opt_state, frozen, video):
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_params, frozen, video)
    updates, opt_state = tx.update(grads, opt_state, train_params)
    return optax.apply_updates(train_params, updates), opt_state, dict(loss=loss, **parts)

  writer = metrics.MetricsWriter(workdir, tensorboard=False)
  b, f = int(config.batch_size), int(config.data.frames)
  losses, t0, done = [], time.perf_counter(), 0
  budget = float(config.get("max_seconds", 0) or 0)
  for step in range(int(config.total_steps)):
    if budget and step > 0 and time.perf_counter() - t0 > budget:
      print(f"vae decoder: wall-clock budget of {budget:.0f} s reached after {step} steps", flush=True)
      break
    done = step + 1
    video = clip_batch(int(config.data.seed) + 7, step, b, f, int(config.data.max_start), scfg)
    train_params, opt_state, m = step_fn(train_params, opt_state, frozen, video)
    if (step + 1) % int(config.log_every) == 0 or step + 1 == int(config.total_steps):
      m = {k: float(v) for k, v in m.items()}
      losses.append(m["loss"])
      writer.write(step + 1, dict(**m, elapsed=time.perf_counter() - t0))
      if progress:
        print(f"vae decoder step {step + 1}: loss {m['loss']:.4f} l1 {m['l1']:.4f} mse {m['mse']:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
  writer.close()
  return nnx.merge(graphdef, train_params, frozen), losses, done


def save_vae(model: AutoencoderKLWan, folder: str) -> None:
  """Writes a diffusers ``vae/`` folder (config.json + diffusion_pytorch_model.safetensors, float32)."""
  from helios_jax.io.checkpoint import save_safetensors_folder
  c = model.config
  config = {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.42.1", "attn_scales": [],
            "base_dim": c.base_dim, "decoder_base_dim": None, "dim_mult": list(c.dim_mult), "dropout": 0.0,
            "in_channels": 3, "is_residual": False, "latents_mean": list(c.latents_mean),
            "latents_std": list(c.latents_std), "num_res_blocks": c.num_res_blocks, "out_channels": 3,
            "patch_size": None, "scale_factor_spatial": c.spatial_compression,
            "scale_factor_temporal": c.temporal_compression, "temperal_downsample": list(c.temperal_downsample),
            "z_dim": c.z_dim}
  save_safetensors_folder(folder, model.state_dict(np.float32), config)
