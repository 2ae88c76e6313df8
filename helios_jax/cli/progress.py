"""What ``sample.py`` prints while it makes a video: per-chunk progress lines with the time left, per-step lines on
a CPU, the contact-sheet frames picked as they pass, and the summary after each video."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence

import numpy as np

SHEET_FRAMES = 8  # frames on a contact sheet (media.write_contact_sheet's default)


class _SheetFrames:
  """Keeps, as the frames pass, the ones :func:`helios_jax.io.media.contact_sheet` would pick from the whole video
  (``SHEET_FRAMES`` evenly spaced, first and last included)."""

  def __init__(self, total: int):
    self.wanted = set(np.round(np.linspace(0, total - 1, min(SHEET_FRAMES, total))).astype(int).tolist())
    self.kept: dict[int, np.ndarray] = {}

  def offer(self, first: int, frames: np.ndarray) -> None:
    for i in self.wanted.intersection(range(first, first + len(frames))):
      self.kept[i] = np.array(frames[i - first])

  def frames(self) -> np.ndarray:
    return np.stack([self.kept[i] for i in sorted(self.kept)])


@dataclasses.dataclass
class _VideoStats:
  frames: int = 0
  chunks: list = dataclasses.field(default_factory=list)  # seconds between chunks (the first: since the call)
  first_chunk: float = 0.0
  total: float = 0.0
  size: tuple = (0, 0)


def _duration(seconds: float) -> str:
  """A duration for people: "7.5 s", "42 s", "4 min 05 s", "3 h 41 min"."""
  if seconds < 9.95:
    return f"{seconds:.1f} s"
  if seconds < 59.5:
    return f"{seconds:.0f} s"
  whole = int(round(seconds))
  if whole < 3600:
    return f"{whole // 60} min {whole % 60:02d} s"
  return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def _eta(chunk_seconds: Sequence[float], num_chunks: int) -> str:
  """The time left after ``len(chunk_seconds)`` of ``num_chunks`` chunks, from the median time of the chunks after
  the first (the first includes start-up and compilation; the median keeps out one-off stalls); "" at the end."""
  left = num_chunks - len(chunk_seconds)
  if left <= 0:
    return ""
  if len(chunk_seconds) < 2:
    return "; ETA after the next chunk"
  per_chunk = statistics.median(chunk_seconds[1:])
  return f"; about {_duration(per_chunk * left)} left ({left} chunk{'s' if left != 1 else ''})"


def _report_chunk(chunk, num_chunks: int, seconds: float, scheduled: bool, eta: str = "") -> None:
  """One progress line per chunk: k/N, its frames, the ``seconds`` it took (the first: since the stream was asked
  for), its frames/s and ``eta`` (:func:`_eta`); flushed, so a log file shows it at once."""
  n = len(chunk.frames)
  first = chunk.first_frame
  if chunk.index == 0:
    timing = f"first chunk after {seconds:.2f} s (prompt encoding, inputs and compilation included)"
  else:
    timing = f"{seconds:.2f} s, {n / seconds:.2f} frames/s"
  prompt = ""
  if scheduled and chunk.prompt.get("text"):
    text = chunk.prompt["text"]
    weight = chunk.prompt.get("weight", 1.0)
    short = text[:48] + ("..." if len(text) > 48 else "")
    prompt = f"; blending to {short!r}: {weight:.0%}" if weight < 1 else f"; prompt {short!r}"
  print(f"chunk {chunk.index + 1}/{num_chunks}: frames {first}-{first + n - 1}, {timing}{prompt}{eta}", flush=True)


def _encoding_line(call: dict) -> str | None:
  """The start-up line before ``pipe.stream(**call)`` encodes the prompt(s) and start image / video; None when it
  has nothing to encode."""
  parts = []
  schedule = call.get("prompt_schedule")
  if schedule is not None and schedule.uses_text:
    parts.append(f"the {len(schedule.prompts)} prompts" if len(schedule.prompts) > 1 else "the prompt")
  elif call.get("prompt") is not None:
    parts.append("the prompt")
  if call.get("image") is not None:
    parts.append("the start image")
  if call.get("video") is not None:
    parts.append("the start video")
  return f"encoding {' and '.join(parts)} ..." if parts else None


class _StepReporter:
  """Prints, at most every ``every`` seconds, which denoising step the running stage has reached (for chunks that
  take many seconds: on a CPU). Called from XLA's callback thread, hence only a flushed print."""

  def __init__(self, every: float = 5.0):
    self.every = every
    self._last = time.perf_counter()

  def __call__(self, step: int, num_steps: int) -> None:
    now = time.perf_counter()
    if now - self._last >= self.every and step + 1 < num_steps:
      self._last = now
      print(f"  ... denoising step {step + 1}/{num_steps}", flush=True)


def _step_progress_wanted() -> bool:
  """Per-step progress costs a host callback per step (a program of its own): only where chunks take seconds."""
  import jax
  return jax.default_backend() == "cpu"


def _print_summary(job, stats: _VideoStats, plan, fps: int, load_s: float, text_s: float) -> None:
  n = stats.frames
  print(f"wrote {job.out}: {n} frames, {stats.size[0]}x{stats.size[1]}, {fps} fps ({n / fps:.1f} s of video)")
  if job.sheet:
    print(f"wrote {job.sheet}")
  steady = ""
  if len(stats.chunks) > 1:
    mean_rest = sum(stats.chunks[1:]) / (len(stats.chunks) - 1)
    steady = f"; after the first chunk {plan.window / mean_rest:.2f} frames/s ({mean_rest:.2f} s per chunk)"
  print((f"timings: load {load_s:.1f} s, " if load_s else "timings: ")
        + (f"text encoder {text_s:.1f} s, " if text_s else "")
        + f"first chunk {stats.first_chunk:.2f} s, {len(stats.chunks)} chunk{'s' if len(stats.chunks) != 1 else ''}, "
        f"generation and writing {stats.total:.1f} s")
  print(f"speed: {n / stats.total:.2f} frames/s end to end (generation incl. compilation){steady}", flush=True)
