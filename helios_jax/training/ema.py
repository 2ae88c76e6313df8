"""Exponential moving average of the generator's trainables (training-spec 7.8, diffusers ``EMAModel`` rule).

Only the trainable tensors are averaged: the base is frozen, so an EMA of (base + LoRA) equals base + EMA(LoRA).
``n`` counts update *calls* (not optimiser steps), as in the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ema_decay(n, start_step: int, max_decay: float) -> jax.Array:
  """Decay of the ``n``-th call: 0 while ``k = n - start_step - 1 <= 0``, else ``min((1 + k)/(10 + k), max_decay)``."""
  k = jnp.asarray(n, jnp.float32) - float(start_step) - 1.0
  warm = (1.0 + k) / (10.0 + k)
  return jnp.where(k <= 0, 0.0, jnp.minimum(warm, max_decay))


def ema_update(ema, params, n, start_step: int, max_decay: float):
  """``ema - (1 - d)(ema - params)`` leaf by leaf with ``d = ema_decay(n, ...)`` (a pure copy while d = 0)."""
  d = ema_decay(n, start_step, max_decay)
  return jax.tree.map(lambda e, p: (e - (1.0 - d) * (e - p.astype(e.dtype))).astype(e.dtype), ema, params)
