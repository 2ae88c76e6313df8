"""Stage 1-2 trainer (Base, Mid): the flow-matching step of :mod:`helios_jax.training.stages` on the one loop
(:func:`helios_jax.training.loop.run_from_config`); the state is ``init_train_state``'s (step, rng, trainable LoRA /
full parameters, AdamW state)."""

from __future__ import annotations

import os

from flax import nnx

from helios_jax.parallel.layout import TrainLayout
from helios_jax.training import data, loop, lora, stages, state as state_lib, validation
from helios_jax.training.export import export_merged
from helios_jax.training.sources import make_source


def train(config, workdir: str, progress: bool = True) -> dict:
  """Runs (or resumes) a stage-1/2 run in ``workdir``. Returns a summary dict.

  Stops after ``config.total_steps`` optimiser steps, on SIGTERM/Ctrl-C (after saving), or raises
  :class:`helios_jax.training.loop.TrainingError` on a non-finite loss or gradient norm (the last good checkpoint is
  kept; see ``loop.run``). Every stage goes through :func:`helios_jax.training.dispatch.train`.
  """
  layout = TrainLayout.from_config(config)  # config.mesh; one device when absent
  graphdef, frozen = nnx.split(stages.build_model(config.model))
  frozen = layout.place(frozen)
  tx, schedule = state_lib.make_optimizer(config.optim, int(config.total_steps))
  seed = int(config.seed)
  state = layout.init(lambda f: state_lib.init_train_state(stages.init_trainable(f, config.train, seed), tx, seed),
                      frozen)
  opened = loop.open_run(config, workdir, state)
  step_fn = stages.make_train_step(config, graphdef, tx, schedule, layout=layout, example=(opened.state, frozen))
  validator = validation.make_validator(config, workdir)  # None unless config.validation.vae is set
  prefetch = data.Prefetcher(make_source(config), opened.start, int(config.batch_size), int(config.data.seed))
  tokens = []  # per step, from the first batch's shape

  def do_step(st, step, batch):
    if not tokens:
      tokens.append(stages.tokens_per_step(batch["target"].shape, config.stage,
                                           tuple(config.objective.stage2_sample_ratios)))
    return step_fn(st, frozen, layout.place_batch(batch))

  def tokens_per_s(m):
    return dict(tokens_per_s=tokens[0] / max(m["step_time"], 1e-9))  # max(): a coarse timer can read 0 s

  def validate(steps_done, st):  # a failure only warns
    if validator.due(steps_done, int(config.total_steps)):
      validator.run_safely(steps_done, graphdef, frozen, st["trainable"])

  state, summary = loop.run_from_config(
      config, workdir, opened, do_step, lambda: prefetch.next()[1], desc=f"train {config.stage}", loss_key="loss",
      progress=progress, close=prefetch.close, extra_metrics=tokens_per_s,
      after_step=None if validator is None else validate,
      export=lambda st: export_merged(os.path.join(workdir, "merged"), graphdef, frozen, st["trainable"],
                                      config.train))
  return dict(summary, num_trainable=lora.count(state["trainable"]))
