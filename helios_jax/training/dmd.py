"""Distribution Matching Distillation math of stage 3 (training-spec 7.5): timesteps, DMD gradient, critic loss.

Pure functions on arrays; layout (B, C, T, H, W). Flow convention (spec 0): ``x_s = (1 - s) x0 + s eps``, the
networks predict ``v = eps - x0`` so ``x0_hat = x_s - s v``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def shift_sigma(s, shift: float):
  """``shift * s / (1 + (shift - 1) s)`` (spec 4.3), works on NumPy and JAX arrays."""
  return shift * s / (1.0 + (shift - 1.0) * s)


def shifted_table(shift: float, num_train_timesteps: int = 1000) -> np.ndarray:
  """(1000,) float32 single-scale sigmas ``1 - i/1000`` after the dynamic shift (spec 4.1 + 4.3)."""
  s = 1.0 - np.arange(num_train_timesteps, dtype=np.float64) / num_train_timesteps
  return shift_sigma(s, shift).astype(np.float32)


def beta_params(step, alpha: float, beta: float, dynamic_step: int):
  """(alpha_k, beta_k) of the generator's timestep Beta law at optimiser step ``step`` (spec 7.5).

  ``c = (1 + cos(pi min(k / dynamic_step, 1))) / 2``; ``alpha_k = 1 + (alpha - 1) c``, ``beta_k = 1 + (beta - 1) c``:
  Beta(alpha, beta) at step 0, uniform from ``dynamic_step`` on.
  """
  k = jnp.minimum(jnp.asarray(step, jnp.float32) / float(max(dynamic_step, 1)), 1.0)
  c = (1.0 + jnp.cos(jnp.pi * k)) / 2.0
  return 1.0 + (alpha - 1.0) * c, 1.0 + (beta - 1.0) * c


def timestep_from_u(u: jax.Array, shift: float, t_min: float = 20.0, t_max: float = 980.0) -> jax.Array:
  """(B,) integer-valued float32 timesteps: ``t = round(clip(1000 shift(u), t_min, t_max))`` (spec 7.5).

  ``t_min``/``t_max`` are the reference's ``min_step``/``max_step`` (2 % and 98 % of 1000 steps).
  """
  t = 1000.0 * shift_sigma(jnp.asarray(u, jnp.float32), shift)
  return jnp.round(jnp.clip(t, t_min, t_max))


def sigma_of_timestep(t: jax.Array, table: jax.Array) -> jax.Array:
  """(B,) the entry of the shifted table whose ``1000 s`` is nearest to ``t`` (first minimum, like the reference)."""
  idx = jnp.argmin(jnp.abs(1000.0 * table[None, :] - t[:, None]), axis=-1)
  return table[idx]


def _bcast(s: jax.Array, ndim: int) -> jax.Array:
  return jnp.reshape(s, s.shape + (1,) * (ndim - s.ndim))


def add_noise(x: jax.Array, eps: jax.Array, s: jax.Array) -> jax.Array:
  """``(1 - s) x + s eps`` with per-sample ``s`` (B,)."""
  s = _bcast(s.astype(jnp.float32), x.ndim)
  return (1.0 - s) * x + s * eps


def x0_from_velocity(x_t: jax.Array, v: jax.Array, s: jax.Array) -> jax.Array:
  """``x_t - s v`` in float32 with per-sample ``s`` (B,)."""
  return x_t.astype(jnp.float32) - _bcast(s.astype(jnp.float32), x_t.ndim) * v.astype(jnp.float32)


def guided(cond: jax.Array, uncond: jax.Array, scale: float) -> jax.Array:
  """The reference's real-score guidance ``cond + scale (cond - uncond)`` (= usual CFG with ``1 + scale``)."""
  return cond + scale * (cond - uncond)


def dmd_gradient(x: jax.Array, real_x0: jax.Array, fake_x0: jax.Array) -> jax.Array:
  """DMD eq. 7/8: ``(fake - real) / mean_{C,T,H,W} |x - real|`` per sample, NaN -> 0 (float32).

  Args:
    x: (B, C, T, H, W) the generator's sample.
    real_x0: (B, ...) the guided teacher's clean estimate at (x_t, t).
    fake_x0: (B, ...) the critic's clean estimate at the same (x_t, t).
  """
  x, real_x0, fake_x0 = (a.astype(jnp.float32) for a in (x, real_x0, fake_x0))
  norm = jnp.mean(jnp.abs(x - real_x0), axis=tuple(range(1, x.ndim)), keepdims=True)
  return jnp.nan_to_num((fake_x0 - real_x0) / norm, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(x: jax.Array, grad: jax.Array) -> jax.Array:
  """``0.5 mean((x - stopgrad(x - grad))^2)``: its value is ``0.5 mean(grad^2)``, its gradient ``grad / x.size``."""
  x = x.astype(jnp.float32)
  target = jax.lax.stop_gradient(x - grad)
  return 0.5 * jnp.mean(jnp.square(x - target))


def dmd_loss_cotangent(grad: jax.Array) -> jax.Array:
  """d dmd_loss / d x for a fixed ``grad`` (what Cache Grad back-propagates through the generator)."""
  return grad / grad.size


def critic_loss(v_pred: jax.Array, eps: jax.Array, x: jax.Array) -> jax.Array:
  """Flow-matching loss of the fake score on generated samples: ``mean((v - (eps - x))^2)`` (spec 7.5 step 2)."""
  return jnp.mean(jnp.square(v_pred.astype(jnp.float32) - (eps - x.astype(jnp.float32))))
