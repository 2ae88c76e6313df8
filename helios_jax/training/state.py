"""Optimiser, learning-rate schedule and the train-state pytree (training-spec 5.4, 6.4, 12).

The train state is a plain dict ``{"step": int32, "rng": uint32 key data, "trainable": ..., "opt_state": ...}``;
the frozen base parameters are not part of it (they come from the pretrained folder or from ``model.init_seed``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from helios_jax.errors import InputError


SCHEDULES = ("constant", "constant_with_warmup", "warmup_stable_decay")


def learning_rate_schedule(optim, total_steps: int | None = None) -> optax.Schedule:
  """The learning rate per optimiser step.

  ``constant``; ``constant_with_warmup`` (linear from 0 over ``warmup_steps``); ``warmup_stable_decay`` (the same,
  then linear to 0 over the last ``decay_steps`` of ``total_steps``; ``decay_steps <= 0`` decays over everything after
  the warm-up). Annealing the rate at the end of a run lowers the loss a constant rate leaves on the table (the demo
  model's continuation runs, docs/benchmarks.md).
  """
  lr = float(optim.learning_rate)
  warm = max(int(optim.get("warmup_steps", 0)), 0) if optim.schedule != "constant" else 0
  if optim.schedule not in SCHEDULES:
    raise InputError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {optim.schedule!r}")
  if optim.schedule != "warmup_stable_decay":
    if warm == 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm])
  if not total_steps or total_steps <= warm:
    raise InputError(f"optim.schedule 'warmup_stable_decay' needs the run's total_steps ({total_steps}) above "
                     f"optim.warmup_steps ({warm}); stages 1-2 and the ODE stage give it, the AHD stage's "
                     "optimisers (stepped on alternate steps) do not")
  decay = int(optim.get("decay_steps", 0))
  decay = total_steps - warm if decay <= 0 else min(decay, total_steps - warm)
  stable = total_steps - warm - decay
  parts, bounds = [], []
  if warm:
    parts.append(optax.linear_schedule(0.0, lr, warm))
    bounds.append(warm)
  if stable:
    parts.append(optax.constant_schedule(lr))
    bounds.append(warm + stable)
  parts.append(optax.linear_schedule(lr, 0.0, decay))
  return optax.join_schedules(parts, bounds[:len(parts) - 1])


def make_optimizer(optim, total_steps: int | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping then AdamW (PyTorch semantics: decoupled weight decay on every trainable tensor).
  ``total_steps``: the run's length, read by the ``warmup_stable_decay`` schedule."""
  schedule = learning_rate_schedule(optim, total_steps)
  parts = []
  if optim.max_grad_norm and optim.max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(float(optim.max_grad_norm)))
  parts.append(optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                           weight_decay=float(optim.weight_decay)))
  return optax.chain(*parts), schedule


def init_train_state(trainable: dict, tx: optax.GradientTransformation, seed: int) -> dict:
  return dict(step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(jax.random.key(seed)),
              trainable=trainable, opt_state=tx.init(trainable))
