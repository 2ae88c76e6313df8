"""Stage 3 phase 5 trainer: ODE regression of the few-step student (LoRA on the frozen base) on the teacher's ODE
pairs (:mod:`helios_jax.training.ode`: generation, storage, batches, loss), on the one loop
(:func:`helios_jax.training.loop.run_from_config`). State: ``init_train_state``'s plus ``ema`` when enabled.

Mesh: the frozen base, trainables, optimiser state and EMA are split by the FSDP rule; the step's batch is one
prompt, replicated (``batch_size`` is not used).
"""

from __future__ import annotations

import itertools
import os

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from helios_jax.parallel import mesh as mesh_lib
from helios_jax.parallel.layout import TrainLayout
from helios_jax.training import ema as ema_lib, loop, lora, ode, stages, state as state_lib
from helios_jax.training.export import export_merged
from helios_jax.training.sources import negative_embeds


def train(config, workdir: str, progress: bool = True) -> dict:
  """Phase 5: generates missing ODE pairs, then ODE-regresses the student (LoRA on the same frozen base)."""
  layout = TrainLayout.from_config(config, check_batch=False)  # the batch is one prompt, replicated
  graphdef, frozen = nnx.split(stages.build_model(config.model))
  frozen = layout.place(frozen)
  with jax.set_mesh(layout.mesh):
    pairs = ode.ensure_pairs(config, graphdef, frozen, negative_embeds(config))
  tx, schedule = state_lib.make_optimizer(config.optim, int(config.total_steps))

  def init(f):
    st = state_lib.init_train_state(stages.init_trainable(f, config.train, int(config.seed)), tx, int(config.seed))
    if config.ema.enabled:
      st["ema"] = jax.tree.map(jnp.copy, st["trainable"])
    return st

  opened = loop.open_run(config, workdir, layout.init(init, frozen))
  scale = stages.lora_scale(config.train)
  e = config.ema

  def step_fn(st, frozen_, batch):
    def loss_fn(tr):
      return ode.ode_loss(lora.bind(graphdef, frozen_, tr, scale), batch, config)
    loss, grads = jax.value_and_grad(loss_fn)(st["trainable"])
    updates, opt_state = tx.update(grads, st["opt_state"], st["trainable"])
    new = dict(st, step=st["step"] + 1, trainable=optax.apply_updates(st["trainable"], updates), opt_state=opt_state)
    if "ema" in st:
      new["ema"] = ema_lib.ema_update(st["ema"], new["trainable"], st["step"] + 1, int(e.start_step), float(e.decay))
    return new, dict(ode_loss=loss, grad_norm=optax.global_norm(grads), lr=schedule(st["step"]))

  step_jit = layout.jit_step(step_fn, opened.state, frozen, batch_sharding=mesh_lib.replicated(layout.mesh))
  steps = itertools.count(opened.start)  # the data position of each next batch

  state, summary = loop.run_from_config(
      config, workdir, opened, lambda st, step, batch: step_jit(st, frozen, layout.place_batch(batch)),
      lambda: ode.ode_batch(pairs, next(steps), config), desc="train ode", loss_key="ode_loss", progress=progress,
      mesh=layout.mesh, export=lambda st: export_merged(os.path.join(workdir, "merged"), graphdef, frozen,
                                                        st.get("ema", st["trainable"]), config.train))
  return dict(summary, num_trainable=lora.count(state["trainable"]), num_pairs=len(pairs))
