"""Stage-1 (Base) and stage-2 (Mid, pyramid) flow-matching objectives (training-spec sections 4, 5.1, 6).

Each objective is split into ``draw_*`` (all randomness of one step, from one PRNG key, as a dict of arrays) and
``*_pieces`` (deterministic: model inputs and velocity targets). ``loss_from_pieces`` runs the model on each piece
and averages the per-piece MSE. Layout everywhere: (B, C, T, H, W).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.errors import InputError
from helios_jax.pipelines.history import HistoryLayout, downsample_2x, upsample_nearest_2x
from helios_jax.schedulers.helios import build_stage_geometry
from helios_jax.training import corruption

LAYOUT = HistoryLayout.make((16, 2, 1), 9, keep_first_frame=True)


def history_indices(chunk: int) -> dict[str, np.ndarray]:
  """RoPE frame indices of the fixed relative layout (anchor 0, long 1..16, mid 17..18, recent 19, target 20..)."""
  return HistoryLayout.make((16, 2, 1), chunk, keep_first_frame=True).indices()


def split_history(hist20: jax.Array) -> dict[str, jax.Array]:
  """(B, C, 20, h, w) anchor + buffer -> the model's short (anchor, recent), mid and long history inputs."""
  return dict(latents_history_short=jnp.concatenate([hist20[:, :, :1], hist20[:, :, 19:20]], axis=2),
              latents_history_mid=hist20[:, :, 17:19], latents_history_long=hist20[:, :, 1:17])


def dynamic_shift(seq_len: int, kind: str, base_seq_len: int = 256, max_seq_len: int = 4096,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
  """Shift factor of spec 4.3 for a noised tensor of ``seq_len = T H W / 4`` tokens."""
  m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  mu = base_shift + m * (seq_len - base_seq_len)
  if kind == "linear":
    return mu
  if kind == "exponential":
    return math.exp(min(mu, math.log(7.0)))
  raise InputError(f"time_shift_type must be 'linear' or 'exponential', got {kind!r}")


def sample_u(key: jax.Array, batch: int, scheme: str, logit_mean: float = 0.0, logit_std: float = 1.0,
             mode_scale: float = 1.29) -> jax.Array:
  """(B,) timestep density draws in (0, 1) (spec 4.2)."""
  if scheme == "logit_normal":
    return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (batch,)))
  if scheme == "mode":
    r = jax.random.uniform(key, (batch,))
    return 1 - r - mode_scale * (jnp.cos(jnp.pi * r / 2) ** 2 - 1 + r)
  if scheme in ("none", "uniform", "sigma_sqrt", "cosmap"):
    return jax.random.uniform(key, (batch,))
  raise InputError(f"weighting_scheme {scheme!r} is not one of logit_normal, mode, none")


def _index(u: jax.Array) -> jax.Array:
  return jnp.clip(jnp.floor(1000.0 * u), 0, 999).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------------------
# Shared conditioning: drops, caption dropout, history corruption

def draw_conditioning(key: jax.Array, batch: dict, cfg) -> dict:
  """Drop, caption-dropout and corruption draws for a batch (``cfg`` is the ``objective`` ConfigDict)."""
  b, c, _, h, w = batch["history"].shape
  k_drop, k_cap, k_cor, k_sat = jax.random.split(key, 4)
  d = corruption.draw_drop(k_drop, cfg.random_drop_t2v, cfg.random_drop_i2v, cfg.random_drop_v2v,
                           enabled=cfg.random_drop)
  d["caption_drop"] = jax.random.uniform(k_cap, (b,)) < cfg.caption_dropout_p
  ratios = corruption.segment_ratios(cfg.noise_ratio_short, cfg.noise_ratio_mid, cfg.noise_ratio_long)
  d.update(corruption.draw_corruption(k_cor, (b, c, corruption.HIST20, h, w), cfg.corrupt_clean_prob,
                                      cfg.corrupt_mode, cfg.corrupt_noise_prob, ratios, cfg.frame_independent,
                                      cfg.blur_min, cfg.blur_max))
  d["saturation_key"] = k_sat
  return d


def conditioning(batch: dict, draws: dict, cfg, saturate: bool | None = None) -> tuple[dict, jax.Array]:
  """(history inputs, prompt embeddings) after drops and corruption (float32).

  ``saturate`` overrides ``cfg.add_saturation`` (stage 3 saturates only the generator's copy, spec 7.3).
  """
  hist20 = jnp.concatenate([batch["x0"], batch["history"]], axis=2).astype(jnp.float32)
  keep = corruption.drop_keep_mask(draws["drop_mode"], draws["drop_v2v_k"])
  hist20 = hist20 * keep[None, None, :, None, None]
  if cfg.corrupt_history:
    hist20 = corruption.apply_corruption(hist20, draws)
  if cfg.add_saturation if saturate is None else saturate:
    hist20 = corruption.saturate(hist20, draws["saturation_key"], cfg.saturation_clean_prob, cfg.saturation_min,
                                 cfg.saturation_max)
  prompt = jnp.where(draws["caption_drop"][:, None, None], 0.0, batch["prompt_embeds"].astype(jnp.float32))
  return split_history(hist20), prompt


# ---------------------------------------------------------------------------------------------------------------
# Stage 1

def draw_stage1(key: jax.Array, batch: dict, cfg) -> dict:
  k_cond, k_eps, k_u = jax.random.split(key, 3)
  d = draw_conditioning(k_cond, batch, cfg)
  d["eps"] = jax.random.normal(k_eps, batch["target"].shape, jnp.float32)
  d["u"] = sample_u(k_u, batch["target"].shape[0], cfg.weighting_scheme, cfg.logit_mean, cfg.logit_std)
  return d


def stage1_sigma(u: jax.Array, target_shape: tuple, cfg) -> jax.Array:
  """(B,) noise level: ``s = 1 - floor(1000 u) / 1000``, dynamically shifted if enabled (spec 4.1-4.3)."""
  s = 1.0 - _index(u).astype(jnp.float32) / 1000.0
  if cfg.use_dynamic_shifting:
    _, _, t, h, w = target_shape
    shift = dynamic_shift(t * h * w // 4, cfg.time_shift_type)
    s = shift * s / (1.0 + (shift - 1.0) * s)
  return s


def stage1_pieces(batch: dict, draws: dict, cfg) -> list[dict]:
  """One piece: model inputs (noisy target, timestep 1000 s, text, history) and the velocity target eps - x."""
  history, prompt = conditioning(batch, draws, cfg)
  x = batch["target"].astype(jnp.float32)
  s = stage1_sigma(draws["u"], x.shape, cfg)
  sb = s[:, None, None, None, None]
  x_s = (1.0 - sb) * x + sb * draws["eps"]
  inputs = dict(hidden_states=x_s, timestep=1000.0 * s, encoder_hidden_states=prompt, **history)
  return [dict(inputs=inputs, target=draws["eps"] - x)]


# ---------------------------------------------------------------------------------------------------------------
# Stage 2 (pyramid)

def pyramid_tables(cfg) -> dict:
  """Static per-stage constants from the scheduler geometry (spec 6.1)."""
  g = build_stage_geometry(1000, cfg.pyramid_shift, cfg.pyramid_stages, tuple(cfg.pyramid_stage_range),
                           cfg.pyramid_gamma)
  return dict(start=g.start_sigmas, end=g.end_sigmas,
              sigmas=np.stack(g.sigmas_per_stage).astype(np.float32),
              timesteps=np.stack(g.timesteps_per_stage).astype(np.float32))


def draw_stage2(key: jax.Array, batch: dict, cfg) -> dict:
  k_cond, k_eps, k_u = jax.random.split(key, 3)
  d = draw_conditioning(k_cond, batch, cfg)
  d["eps"] = jax.random.normal(k_eps, batch["target"].shape, jnp.float32)
  n_pieces = int(sum(cfg.stage2_sample_ratios))
  d["u"] = jax.random.uniform(k_u, (n_pieces, batch["target"].shape[0]))
  return d


def _avg_down2(x: jax.Array) -> jax.Array:
  return downsample_2x(x) * 0.5


def stage2_pieces(batch: dict, draws: dict, cfg) -> list[dict]:
  """Pyramid pieces (spec 6.2): per stage, ``ratio_i`` pieces ``z = s start_i + (1 - s) end_i``, target start - end.

  Clean latents are 2x2-averaged, noise is 2x2-averaged times 2 (nested, unit variance); stage i > 0 starts from
  the renoise-corrected mix of its noise and the nearest-upsampled clean latent of stage i - 1.
  """
  tables = pyramid_tables(cfg)
  n_stages = int(cfg.pyramid_stages)
  ratios = tuple(int(r) for r in cfg.stage2_sample_ratios)
  if len(ratios) != n_stages:
    raise InputError(f"stage2_sample_ratios {ratios} needs one entry per pyramid stage ({n_stages})")
  history, prompt = conditioning(batch, draws, cfg)
  clean = [batch["target"].astype(jnp.float32)]
  noise = [draws["eps"]]
  for _ in range(n_stages - 1):
    clean.insert(0, _avg_down2(clean[0]))
    noise.insert(0, downsample_2x(noise[0]))
  pieces, j = [], 0
  for i in range(n_stages):
    s0, e0 = tables["start"][i], tables["end"][i]
    start = noise[i] if i == 0 else s0 * noise[i] + (1 - s0) * upsample_nearest_2x(clean[i - 1])
    end = clean[i] if i == n_stages - 1 else e0 * noise[i] + (1 - e0) * clean[i]
    for _ in range(ratios[i]):
      k = _index(draws["u"][j])
      s = jnp.asarray(tables["sigmas"][i])[k]
      t = jnp.asarray(tables["timesteps"][i])[k]
      sb = s[:, None, None, None, None]
      z = sb * start + (1 - sb) * end
      pieces.append(dict(inputs=dict(hidden_states=z, timestep=t, encoder_hidden_states=prompt, **history),
                         target=start - end))
      j += 1
  return pieces


# ---------------------------------------------------------------------------------------------------------------

def loss_from_pieces(forward: Callable[..., jax.Array], pieces: list[dict], indices: dict) -> jax.Array:
  """Mean over pieces of ``mean((v_hat - target)^2)`` in float32 (weight 1, spec 5.1 / 6.3)."""
  losses = []
  for p in pieces:
    v_hat = forward(**p["inputs"], **indices)
    losses.append(jnp.mean(jnp.square(v_hat.astype(jnp.float32) - p["target"])))
  return sum(losses) / len(losses)


OBJECTIVES = {"base": (draw_stage1, stage1_pieces), "mid": (draw_stage2, stage2_pieces)}


def objective(stage: str):
  """(draw, pieces) functions of a stage name (``base`` or ``mid``)."""
  if stage not in OBJECTIVES:
    raise InputError(f"stage must be one of {sorted(OBJECTIVES)}, got {stage!r}")
  return OBJECTIVES[stage]
