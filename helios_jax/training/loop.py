"""The generic step loop of the stage-3 trainers: stop on SIGTERM/Ctrl-C, stop on non-finite values, log, save.

The caller owns the train state; ``do_step(step, batch)`` returns ``(metrics, commit)`` and ``commit()`` makes the
new state current: it is only called once every metric is finite, so the last good state is what gets saved.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Callable

import jax

from helios_jax.training import checkpointing, metrics
from helios_jax.training.trainer import TrainingError, _StopFlag, config_json


def open_run(config, workdir: str, state: dict):
  """Creates ``workdir``, resumes ``state`` from its latest checkpoint (config checked) and writes config.json.

  Returns ``(state, checkpointer, resumed_from, start_step, save)`` where ``save(state)`` checkpoints a state with
  the run's metadata (seed, data position = step, config).
  """
  os.makedirs(workdir, exist_ok=True)
  cfg_json = config_json(config)
  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint.keep)
  resumed_from = ckpt.latest_step()
  if resumed_from is not None:
    state, meta = ckpt.restore(state)
    checkpointing.check_config_compatible(meta.get("config", {}), cfg_json)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      json.dump(cfg_json, f, indent=2)

  def save(s):
    step = int(jax.device_get(s["step"]))
    return ckpt.save(s, dict(seed=int(config.seed), data_position=step, config=cfg_json))

  return state, ckpt, resumed_from, int(jax.device_get(state["step"])), save


def metrics_writer(workdir: str) -> metrics.MetricsWriter:
  """Process 0 logs to ``workdir``; in a multi-host run the others keep their own ``workdir/process_<i>``."""
  i = jax.process_index()
  return metrics.MetricsWriter(workdir if i == 0 else os.path.join(workdir, f"process_{i}"))


def run(*, start: int, total: int, next_batch: Callable[[], dict], do_step: Callable, save: Callable[[], int],
        writer, log_every: int, checkpoint_every: int, checkpoint_dir: str, last_saved, progress: bool,
        desc: str, loss_key: str) -> tuple[list[float], str | None, int | None]:
  """Runs steps ``start .. total - 1``. Returns (values of ``loss_key`` per step, stop signal name, last saved)."""
  from tqdm.auto import tqdm
  losses, stopped = [], None
  bar = tqdm(total=total, initial=start, disable=not progress, desc=desc, dynamic_ncols=True)
  try:
    with _StopFlag() as stop:
      for step in range(start, total):
        if stop.signum is not None:
          stopped = signal.Signals(stop.signum).name
          break
        batch = next_batch()
        t0 = time.perf_counter()
        metrics, commit = do_step(step, batch)
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["step_time"] = time.perf_counter() - t0
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        if bad:
          writer.write(step + 1, metrics)
          raise TrainingError(f"{', '.join(bad)} became non-finite at step {step + 1}; stopping, the last good "
                              f"checkpoint (step {last_saved}) in {checkpoint_dir} is kept")
        commit()
        losses.append(metrics.get(loss_key, float("nan")))
        if (step + 1) % log_every == 0 or step + 1 == total:
          writer.write(step + 1, metrics)
        bar.update(1)
        if loss_key in metrics:
          bar.set_postfix({loss_key: f"{metrics[loss_key]:.4f}"})
        if (step + 1) % checkpoint_every == 0:
          last_saved = save()
      last_saved = save()
  finally:
    bar.close()
  return losses, stopped, last_saved
