"""The generic step loop of every trainer: stop on SIGTERM/Ctrl-C, stop on non-finite values, log, save.

The caller owns the train state; ``do_step(step, batch)`` returns ``(metrics, commit)`` and ``commit()`` makes the
new state current: it is only called once every metric is finite, so a non-finite state is never current or saved.
Every trainer runs through :func:`run_from_config`, which owns the state of an :func:`open_run` run.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import signal
import threading
import time
from typing import Callable

import jax

from helios_jax.errors import HeliosError
from helios_jax.training import checkpointing, metrics


class TrainingError(HeliosError):
  """Training cannot continue (e.g. the loss became NaN)."""


class _StopFlag:
  """Set by SIGTERM / SIGINT; the loop saves a checkpoint and returns at the next step boundary.

  Before the run's first step is done there is nothing to save, but that step may spend a minute in XLA's compiler,
  where Python signal handlers do not run. A watcher thread, woken through ``signal.set_wakeup_fd`` the moment a
  signal arrives, then ends the process at once (exit status 128 + signal) instead of letting it wait for the
  compiler. Once a step is done (:meth:`step_done`) the signal only sets the flag, as before.
  """

  def __init__(self):
    self.signum = None
    self._old = {}
    self._idle = True  # no step done yet in this run: nothing to save
    self._wakeup = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGTERM, signal.SIGINT):
        self._old[s] = signal.signal(s, self._handle)
      self._start_watcher()
    return self

  def _start_watcher(self) -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
      old_fd = signal.set_wakeup_fd(w)
    except ValueError:  # not the main thread of the main interpreter
      os.close(r)
      os.close(w)
      return
    self._wakeup = (r, w, old_fd)
    threading.Thread(target=self._watch, args=(r,), name="helios-stop-watcher", daemon=True).start()

  def _watch(self, fd: int) -> None:
    try:
      self._wait_for_signals(fd)
    finally:
      os.close(fd)

  def _wait_for_signals(self, fd: int) -> None:
    while True:
      try:
        data = os.read(fd, 1)
      except OSError:
        return
      if not data or data == b"\0":  # closed, or the loop ended
        return
      signum = data[0]
      if self._idle and signum in (signal.SIGTERM, signal.SIGINT):
        name = signal.Signals(signum).name
        os.write(2, f"\nstopped by {name} before the first step finished: nothing to save, exiting now\n".encode())
        os._exit(128 + signum)

  def step_done(self) -> None:
    self._idle = False

  def _handle(self, signum, frame):
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # second Ctrl-C: give up immediately
    self.signum = signum

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    if self._wakeup is not None:
      r, w, old_fd = self._wakeup
      signal.set_wakeup_fd(old_fd)
      try:
        os.write(w, b"\0")  # ends the watcher
      except OSError:
        pass
      os.close(w)


OpenRun = collections.namedtuple("OpenRun", "state ckpt resumed_from start save")


def open_run(config, workdir: str, state: dict) -> OpenRun:
  """Creates ``workdir``, resumes ``state`` from its latest checkpoint (config checked) and writes config.json.

  Returns ``OpenRun(state, ckpt, resumed_from, start, save)`` (checkpointer, start step) where ``save(state)``
  checkpoints a state with the run's metadata (seed, data position = step, config).
  """
  os.makedirs(workdir, exist_ok=True)
  cfg_json = json.loads(config.to_json_best_effort())
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

  return OpenRun(state, ckpt, resumed_from, int(jax.device_get(state["step"])), save)


def metrics_writer(workdir: str) -> metrics.MetricsWriter:
  """Process 0 logs to ``workdir``; in a multi-host run the others keep their own ``workdir/process_<i>``."""
  i = jax.process_index()
  return metrics.MetricsWriter(workdir if i == 0 else os.path.join(workdir, f"process_{i}"))


def run(*, start: int, total: int, next_batch: Callable[[], dict], do_step: Callable, save: Callable[[], int],
        writer, log_every: int, checkpoint_every: int, checkpoint_dir: str, last_saved, progress: bool,
        desc: str, loss_key: str, extra_metrics: Callable[[dict], dict] | None = None,
        after_step: Callable[[int], None] | None = None) -> tuple[list[float], str | None, int | None]:
  """Runs steps ``start .. total - 1``. Returns (values of ``loss_key`` per step, stop signal name, last saved).

  Every step's metrics (plus ``step_time``, seconds) are checked; every ``log_every`` steps and at the last step
  they go to ``writer`` together with ``extra_metrics(metrics)`` (e.g. tokens/s). After a committed step, and its
  checkpoint when one is due, ``after_step(steps_done)`` runs (e.g. validation sampling). A checkpoint is written
  every ``checkpoint_every`` steps and at the end, also when SIGTERM/SIGINT stopped the loop (at a step boundary).

  Non-finite metrics (any of them, not only the loss: an infinite gradient norm already poisons the new state) stop
  the run: their row is logged, nothing of that step is committed or saved and :class:`TrainingError` says which
  values went bad and which checkpoint is kept. The state before the bad step is not saved: the steps donate
  the previous state's buffers, so keeping it would cost a copy of the whole state on every step; what is lost is
  at most ``checkpoint_every - 1`` steps.
  """
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
          kept = (f"the last good checkpoint (step {last_saved}) in {checkpoint_dir} is kept" if last_saved is not None
                  else f"no checkpoint was written yet in {checkpoint_dir}")
          values = ", ".join(f"{k}={metrics[k]}" for k in bad)
          raise TrainingError(f"non-finite values at step {step + 1} ({values}); stopping, {kept}")
        commit()
        stop.step_done()
        losses.append(metrics.get(loss_key, float("nan")))
        if (step + 1) % log_every == 0 or step + 1 == total:
          writer.write(step + 1, dict(metrics, **(extra_metrics(metrics) if extra_metrics else {})))
        bar.update(1)
        if loss_key in metrics:
          bar.set_postfix({loss_key: f"{metrics[loss_key]:.4f}"})
        if (step + 1) % checkpoint_every == 0:
          last_saved = save()
        if after_step is not None:
          after_step(step + 1)
      last_saved = save()
  finally:
    bar.close()
  return losses, stopped, last_saved


def run_from_config(config, workdir: str, opened: OpenRun, step: Callable[[dict, int, dict], tuple[dict, dict]],
                    next_batch: Callable[[], dict], *, desc: str, loss_key: str, progress: bool, mesh=None,
                    close: Callable[[], None] | None = None, extra_metrics: Callable[[dict], dict] | None = None,
                    after_step: Callable[[int, dict], None] | None = None,
                    export: Callable[[dict], None] | None = None) -> tuple[dict, dict]:
  """:func:`run` of an :func:`open_run` run with ``config``'s total_steps, log_every and checkpoint.every, logging to
  :func:`metrics_writer`, under ``jax.set_mesh(mesh)`` when given. Returns ``(final state, dict(start_step,
  final_step, losses, stopped_by, resumed_from))``. ``step(state, step, batch)`` returns ``(new state, metrics)``,
  ``after_step(steps_done, state)`` sees the committed state; ``close()`` (e.g. a prefetcher's), the writer and the
  checkpointer are closed however the run ends; ``export(state)`` runs on the final state when
  ``config.export_merged`` is set and the run reached ``total_steps``.
  """
  holder = dict(state=opened.state)
  total = int(config.total_steps)
  writer = metrics_writer(workdir)

  def do_step(i, batch):
    new, m = step(holder["state"], i, batch)
    return m, lambda: holder.__setitem__("state", new)

  try:
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
      losses, stopped, _ = run(start=opened.start, total=total, next_batch=next_batch, do_step=do_step,
                               save=lambda: opened.save(holder["state"]), writer=writer,
                               log_every=int(config.log_every), checkpoint_every=int(config.checkpoint.every),
                               checkpoint_dir=opened.ckpt.directory, last_saved=opened.resumed_from,
                               progress=progress and jax.process_index() == 0, desc=desc, loss_key=loss_key,
                               extra_metrics=extra_metrics,
                               after_step=None if after_step is None else lambda n: after_step(n, holder["state"]))
  finally:
    if close is not None:
      close()
    writer.close()
    opened.ckpt.close()
  state = holder["state"]
  final_step = int(jax.device_get(state["step"]))
  if export is not None and config.export_merged and stopped is None and final_step >= total:
    export(state)
  return state, dict(start_step=opened.start, final_step=final_step, losses=losses, stopped_by=stopped,
                     resumed_from=opened.resumed_from)
