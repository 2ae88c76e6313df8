"""Training metrics as JSON lines (``WORKDIR/metrics.jsonl``) and TensorBoard event files (``WORKDIR/tensorboard``).

TensorBoard events are written with the ``tensorboard`` package's own event-file writer and protobufs (the path
PyTorch's ``SummaryWriter`` uses): no TensorFlow, and one dependency that also provides the reader (tests) and the
viewer (``tensorboard --logdir WORKDIR/tensorboard``). Without the package only the JSON lines are written.

Faults (docs/reliability.md): each row is one unbuffered append; a row torn by a kill (no final newline) is cut off
when the next run opens the file, and :func:`read_metrics` ignores one at the end. A write that fails on a full disk
truncates the file back to its last whole row and raises :class:`~helios_jax.errors.DiskFullError`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings

from helios_jax.io.disk_space import disk_full_error, is_disk_full


class MetricsWriter:
  """Appends one JSON object per logged step and mirrors every scalar to TensorBoard.

  ``write(step, {name: scalar, ...})`` takes any scalar names (stage 1/2 log loss, grad_norm, lr, step_time,
  tokens_per_s; other stages add their own). A string value (a label such as the VAE's ``phase``) goes to the JSON
  row only.
  """

  def __init__(self, workdir: str, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tensorboard_dir = os.path.join(workdir, "tensorboard")
    _cut_torn_row(self.path)
    self._file = open(self.path, "ab", buffering=0)  # unbuffered: a failed write leaves nothing to flush at close
    self._tb = None
    if tensorboard:
      try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
      except ImportError:
        warnings.warn("the 'tensorboard' package is not installed: metrics go to metrics.jsonl only")
      else:
        self._tb = EventFileWriter(self.tensorboard_dir)
        self._event, self._summary = event_pb2.Event, summary_pb2.Summary

  def write(self, step: int, values: dict) -> None:
    row = {"step": int(step)}
    scalars = {k: float(v) for k, v in values.items() if not isinstance(v, str)}
    for k, v in values.items():
      row[k] = v if isinstance(v, str) else (scalars[k] if math.isfinite(scalars[k]) else str(scalars[k]))
    self._append((json.dumps(row) + "\n").encode("utf-8"))
    if self._tb is not None:
      try:
        summary = self._summary(value=[self._summary.Value(tag=k, simple_value=v) for k, v in scalars.items()])
        self._tb.add_event(self._event(wall_time=time.time(), step=int(step), summary=summary))
        self._tb.flush()
      except Exception as e:
        if not is_disk_full(e):
          raise
        self._tb = None  # its buffered events cannot be written; closing it would fail the same way
        raise disk_full_error("TensorBoard events", self.tensorboard_dir) from e

  def _append(self, data: bytes) -> None:
    """Appends ``data`` whole or not at all (a failed write is truncated away)."""
    start = self._file.tell()
    try:
      view = memoryview(data)
      while view:
        view = view[self._file.write(view):]  # raw writes may be partial
    except OSError as e:
      with contextlib.suppress(OSError):
        self._file.truncate(start)  # frees space: needs none
        self._file.seek(start)
      if is_disk_full(e):
        raise disk_full_error("metrics", self.path) from e
      raise

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      try:
        self._tb.close()
      except Exception as e:
        if not is_disk_full(e):
          raise


def _cut_torn_row(path: str) -> None:
  """Truncates ``path`` after its last newline (a row torn by a kill mid-write has none)."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    size = f.seek(0, os.SEEK_END)
    if size == 0:
      return
    f.seek(size - 1)
    if f.read(1) == b"\n":
      return
    chunk, pos = 4096, size  # bytes read backwards per step looking for the last newline
    while pos > 0:
      start = max(0, pos - chunk)
      f.seek(start)
      i = f.read(pos - start).rfind(b"\n")
      if i >= 0:
        f.truncate(start + i + 1)
        return
      pos = start
    f.truncate(0)


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    text = f.read()
  lines = text.split("\n")
  if not text.endswith("\n"):
    lines = lines[:-1]  # a row torn by a kill mid-write (the next run cuts it off)
  return [json.loads(line) for line in lines if line.strip()]


def read_tensorboard(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """``{tag: [(step, value), ...]}`` of every scalar in the event files under ``logdir`` (needs ``tensorboard``)."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(logdir, size_guidance={"scalars": 0})  # 0 = keep every event
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
