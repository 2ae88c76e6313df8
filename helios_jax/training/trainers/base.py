"""Stage 1-2 training: build, resume, run :func:`helios_jax.training.loop.run_from_config`, export the merged
model."""

from __future__ import annotations

import os

from flax import nnx

from helios_jax.errors import InputError
from helios_jax.parallel.layout import TrainLayout
from helios_jax.training import data, loop, lora, stages, state as state_lib, validation
from helios_jax.training.loop import TrainingError  # noqa: F401  (re-exported)
from helios_jax.training.synthetic import SyntheticClips


def make_source(config):
  """The clip source of ``config.data`` (``synthetic``, an encoded ``demo`` scene set or a prepared ``tfds`` dataset)."""
  d = config.data
  if d.source == "synthetic":
    return SyntheticClips(num_clips=d.num_clips, num_chunks=d.num_chunks, channels=d.channels, height=d.height,
                          width=d.width, text_len=d.text_len, text_dim=d.text_dim, seed=d.seed)
  if d.source == "demo":  # rendered scenes encoded by the demo VAE + text encoder (helios_jax.training.demo)
    from helios_jax.training.demo import DemoLatents
    return DemoLatents(d.data_dir)
  if d.source == "tfds":
    from helios_jax.training import prepare_data  # optional dependency (tensorflow-datasets)
    return prepare_data.open_source(d.data_dir, d.name)
  raise InputError(f"data.source must be 'synthetic', 'demo' or 'tfds', got {d.source!r}")


def export_merged(folder: str, graphdef, frozen, trainable: dict, train_cfg, dtype=None) -> None:
  """Fuses the adapters and writes a diffusers transformer folder that ``from_pretrained`` loads."""
  from helios_jax.io.checkpoint import save_safetensors_folder
  from helios_jax.io.transformer_weights import to_diffusers_state_dict
  model = lora.merge_into_model(graphdef, frozen, trainable, stages.lora_scale(train_cfg))
  tensors = to_diffusers_state_dict(model, dtype=dtype)
  save_safetensors_folder(folder, tensors, model.config.to_dict())


def train(config, workdir: str, progress: bool = True) -> dict:
  """Runs (or resumes) a training run in ``workdir``. Returns a summary dict.

  Stops after ``config.total_steps`` optimiser steps, on SIGTERM/Ctrl-C (after saving), or raises
  :class:`TrainingError` on a non-finite loss or gradient norm (the last good checkpoint is kept; see ``loop.run``).
  Stage 3 (``config.stage`` "ahd" / "ode") runs :mod:`helios_jax.training.ahd_trainer` / ``ode``.
  """
  if config.stage in ("ahd", "ode"):
    from helios_jax.training import ahd_trainer, ode
    return (ahd_trainer.train if config.stage == "ahd" else ode.train)(config, workdir, progress)
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
