"""Optimiser, learning-rate schedule and the train-state pytree (training-spec 5.4, 6.4, 12).

The train state is a plain dict ``{"step": int32, "rng": uint32 key data, "trainable": ..., "opt_state": ...}``;
the frozen base parameters are not part of it (they come from the pretrained folder or from ``model.init_seed``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from helios_jax.errors import InputError


def learning_rate_schedule(optim) -> optax.Schedule:
  """``constant`` or ``constant_with_warmup`` (linear from 0 over ``warmup_steps`` optimiser steps)."""
  lr = float(optim.learning_rate)
  if optim.schedule == "constant":
    return optax.constant_schedule(lr)
  if optim.schedule == "constant_with_warmup":
    warm = int(optim.warmup_steps)
    if warm <= 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm])
  raise InputError(f"optim.schedule must be 'constant' or 'constant_with_warmup', got {optim.schedule!r}")


def make_optimizer(optim) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping then AdamW (PyTorch semantics: decoupled weight decay on every trainable tensor)."""
  schedule = learning_rate_schedule(optim)
  parts = []
  if optim.max_grad_norm and optim.max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(float(optim.max_grad_norm)))
  parts.append(optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                           weight_decay=float(optim.weight_decay)))
  return optax.chain(*parts), schedule


def init_train_state(trainable: dict, tx: optax.GradientTransformation, seed: int) -> dict:
  return dict(step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(jax.random.key(seed)),
              trainable=trainable, opt_state=tx.init(trainable))
