"""Training metrics as JSON lines (``WORKDIR/metrics.jsonl``) and TensorBoard event files (``WORKDIR/tensorboard``).

TensorBoard events are written with the ``tensorboard`` package's own event-file writer and protobufs (the path
PyTorch's ``SummaryWriter`` uses): no TensorFlow, and one dependency that also provides the reader (tests) and the
viewer (``tensorboard --logdir WORKDIR/tensorboard``). Without the package only the JSON lines are written.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings


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
    self._file = open(self.path, "a", encoding="utf-8")
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
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      summary = self._summary(value=[self._summary.Value(tag=k, simple_value=v) for k, v in scalars.items()])
      self._tb.add_event(self._event(wall_time=time.time(), step=int(step), summary=summary))
      self._tb.flush()

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def read_tensorboard(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """``{tag: [(step, value), ...]}`` of every scalar in the event files under ``logdir`` (needs ``tensorboard``)."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(logdir, size_guidance={"scalars": 0})  # 0 = keep every event
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
