"""The generic step loop of the stage-3 trainers: stop on SIGTERM/Ctrl-C, stop on non-finite values, log, save.

The caller owns the train state; ``do_step(step, batch)`` returns ``(metrics, commit)`` and ``commit()`` makes the
new state current: it is only called once every metric is finite, so the last good state is what gets saved.
"""

from __future__ import annotations

import math
import signal
import time
from typing import Callable

from helios_jax.training.trainer import TrainingError, _StopFlag


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
