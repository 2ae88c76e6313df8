"""Training metrics as JSON lines (``WORKDIR/metrics.jsonl``), optionally mirrored to TensorBoard."""

from __future__ import annotations

import json
import math
import os


class MetricsWriter:
  """Appends one JSON object per logged step; TensorBoard too if ``tensorboardX`` is installed."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # type: ignore
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        self._tb = None

  def write(self, step: int, values: dict) -> None:
    row = {"step": int(step)}
    for k, v in values.items():
      v = float(v)
      row[k] = v if math.isfinite(v) else str(v)
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, float(v), int(step))

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
