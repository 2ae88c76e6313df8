"""The training loop: build, resume, step, log, checkpoint, stop cleanly, export the merged model."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import jax
from flax import nnx

from helios_jax.errors import HeliosError, InputError
from helios_jax.parallel.layout import TrainLayout
from helios_jax.training import checkpointing, data, lora, metrics, stages, state as state_lib, validation
from helios_jax.training.synthetic import SyntheticClips


class TrainingError(HeliosError):
  """Training cannot continue (e.g. the loss became NaN)."""


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


def config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


class _StopFlag:
  """Set by SIGTERM / SIGINT; the loop saves a checkpoint and returns at the next step boundary."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGTERM, signal.SIGINT):
        self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # second Ctrl-C: give up immediately
    self.signum = signum

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


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
  :class:`TrainingError` on a non-finite loss (the last good checkpoint is kept).
  Stage 3 (``config.stage`` "ahd" / "ode") runs :mod:`helios_jax.training.ahd_trainer` / ``ode``.
  """
  if config.stage in ("ahd", "ode"):
    from helios_jax.training import ahd_trainer, ode
    return (ahd_trainer.train if config.stage == "ahd" else ode.train)(config, workdir, progress)
  os.makedirs(workdir, exist_ok=True)
  cfg_json = config_json(config)
  layout = TrainLayout.from_config(config)  # config.mesh; one device when absent
  model = stages.build_model(config.model)
  graphdef, frozen = nnx.split(model)
  del model
  frozen = layout.place(frozen)
  tx, schedule = state_lib.make_optimizer(config.optim)
  seed = int(config.seed)
  state = layout.init(lambda f: state_lib.init_train_state(stages.init_trainable(f, config.train, seed), tx, seed),
                      frozen)
  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint.keep)
  resumed_from = ckpt.latest_step()
  if resumed_from is not None:
    state, meta = ckpt.restore(state)
    checkpointing.check_config_compatible(meta.get("config", {}), cfg_json)
  start = int(jax.device_get(state["step"]))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      json.dump(cfg_json, f, indent=2)

  source = make_source(config)
  step_fn = stages.make_train_step(config, graphdef, tx, schedule, layout=layout, example=(state, frozen))
  primary = jax.process_index() == 0  # multi-host: process 0 logs; the others keep their own metrics file
  writer = metrics.MetricsWriter(workdir if primary else os.path.join(workdir, f"process_{jax.process_index()}"))
  validator = validation.make_validator(config, workdir)  # None unless config.validation.vae is set
  total = int(config.total_steps)
  meta = lambda: dict(seed=int(config.seed), data_position=int(jax.device_get(state["step"])), config=cfg_json)
  losses, stopped, last_saved = [], None, resumed_from
  from tqdm.auto import tqdm
  bar = tqdm(total=total, initial=start, disable=not (progress and primary), desc=f"train {config.stage}",
             dynamic_ncols=True)
  prefetch = data.Prefetcher(source, start, int(config.batch_size), int(config.data.seed))
  tokens = None
  try:
    with _StopFlag() as stop:
      for step in range(start, total):
        if stop.signum is not None:
          stopped = signal.Signals(stop.signum).name
          break
        _, batch = prefetch.next()
        if tokens is None:
          tokens = stages.tokens_per_step(batch["target"].shape, config.stage,
                                          tuple(config.objective.stage2_sample_ratios))
        t0 = time.perf_counter()
        new_state, m = step_fn(state, frozen, layout.place_batch(batch))
        loss = float(m["loss"])
        dt = time.perf_counter() - t0
        if not math.isfinite(loss):
          writer.write(step + 1, dict(loss=loss))
          raise TrainingError(f"the loss became {loss} at step {step + 1}; stopping, the last good checkpoint "
                              f"(step {last_saved}) in {ckpt.directory} is kept")
        state = new_state
        losses.append(loss)
        if (step + 1) % int(config.log_every) == 0 or step + 1 == total:
          writer.write(step + 1, dict(loss=loss, grad_norm=float(m["grad_norm"]), lr=float(m["lr"]),
                                      step_time=dt, tokens_per_s=tokens / max(dt, 1e-9)))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if (step + 1) % int(config.checkpoint.every) == 0:
          last_saved = ckpt.save(state, meta())
        if validator is not None and validator.due(step + 1, total):  # a failure only warns
          validator.run_safely(step + 1, graphdef, frozen, state["trainable"])
      last_saved = ckpt.save(state, meta())
  finally:
    prefetch.close()
    bar.close()
    writer.close()
    ckpt.close()
  final_step = int(jax.device_get(state["step"]))
  if config.export_merged and stopped is None and final_step >= total:
    export_merged(os.path.join(workdir, "merged"), graphdef, frozen, state["trainable"], config.train)
  return dict(start_step=start, final_step=final_step, losses=losses, stopped_by=stopped,
              resumed_from=resumed_from, num_trainable=lora.count(state["trainable"]))
