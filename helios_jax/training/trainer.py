"""Stage 1-2 training: build, resume, run :func:`helios_jax.training.loop.run`, export the merged model."""

from __future__ import annotations

import os

import jax
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
  tx, schedule = state_lib.make_optimizer(config.optim)
  seed = int(config.seed)
  state = layout.init(lambda f: state_lib.init_train_state(stages.init_trainable(f, config.train, seed), tx, seed),
                      frozen)
  state, ckpt, resumed_from, start, save_state = loop.open_run(config, workdir, state)
  step_fn = stages.make_train_step(config, graphdef, tx, schedule, layout=layout, example=(state, frozen))
  validator = validation.make_validator(config, workdir)  # None unless config.validation.vae is set
  total = int(config.total_steps)
  prefetch = data.Prefetcher(make_source(config), start, int(config.batch_size), int(config.data.seed))
  writer = loop.metrics_writer(workdir)
  holder = dict(state=state, tokens=None)

  def do_step(step, batch):
    if holder["tokens"] is None:
      holder["tokens"] = stages.tokens_per_step(batch["target"].shape, config.stage,
                                                tuple(config.objective.stage2_sample_ratios))
    new, m = step_fn(holder["state"], frozen, layout.place_batch(batch))
    return m, lambda: holder.__setitem__("state", new)

  def tokens_per_s(m):
    return dict(tokens_per_s=holder["tokens"] / max(m["step_time"], 1e-9))  # max(): a coarse timer can read 0 s

  def validate(steps_done):  # a failure only warns
    if validator.due(steps_done, total):
      validator.run_safely(steps_done, graphdef, frozen, holder["state"]["trainable"])

  try:
    losses, stopped, _ = loop.run(start=start, total=total, next_batch=lambda: prefetch.next()[1], do_step=do_step,
                                  save=lambda: save_state(holder["state"]), writer=writer,
                                  log_every=int(config.log_every), checkpoint_every=int(config.checkpoint.every),
                                  checkpoint_dir=ckpt.directory, last_saved=resumed_from,
                                  progress=progress and jax.process_index() == 0, desc=f"train {config.stage}",
                                  loss_key="loss", extra_metrics=tokens_per_s,
                                  after_step=None if validator is None else validate)
  finally:
    prefetch.close()
    writer.close()
    ckpt.close()
  state = holder["state"]
  final_step = int(jax.device_get(state["step"]))
  if config.export_merged and stopped is None and final_step >= total:
    export_merged(os.path.join(workdir, "merged"), graphdef, frozen, state["trainable"], config.train)
  return dict(start_step=start, final_step=final_step, losses=losses, stopped_by=stopped,
              resumed_from=resumed_from, num_trainable=lora.count(state["trainable"]))
