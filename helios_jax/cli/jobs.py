"""The videos of a ``sample.py`` run: one, or one per prompt-file line / interactive-CSV id, each with its output
paths and seed (:func:`plan_jobs`), and the checks that the outputs can be written (:func:`_writable_jobs`)."""

from __future__ import annotations

import dataclasses
import os
import re

from helios_jax.errors import InputError
from helios_jax.io import media
from helios_jax.pipelines.prompts import PromptSchedule


def _show(path: str) -> str:
  """A path as messages show it: relative to the working folder when inside it, else as it is."""
  rel = os.path.relpath(path)
  return path if rel.startswith("..") else rel



@dataclasses.dataclass(frozen=True)
class Job:
  """One video to make.

  Attributes:
    out: the mp4 (made absolute by the writability check); sheet: its contact sheet or None.
    seed: the video's seed.
    prompt: its prompt text (None with --prompt-embeds or a schedule).
    schedule: its interactive prompt schedule (--interactive-prompts), else None.
    label: what the video is in messages ("" for a single video, "prompt 3" / "id 7" from a file).
  """

  out: str
  sheet: str | None
  seed: int
  prompt: str | None = None
  schedule: PromptSchedule | None = None
  label: str = ""


def read_prompt_file(path: str) -> list[str]:
  """The non-empty lines of a UTF-8 text file (a byte-order mark is allowed), stripped.

  Raises:
    InputError: the file is missing, a folder, unreadable, not UTF-8 text, or has no prompt.
  """
  if os.path.isdir(path):
    raise InputError(f"prompt file {path} is a folder")
  if not os.path.isfile(path):
    raise InputError(f"prompt file not found: {path}")
  try:
    with open(path, encoding="utf-8-sig") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise InputError(f"prompt file {path} is not UTF-8 text (byte {e.start} cannot be decoded)") from None
  except OSError as e:
    raise InputError(f"cannot read prompt file {path}: {e.strerror}") from None
  if "\x00" in text:
    raise InputError(f"prompt file {path} is not a text file (it holds NUL bytes)")
  prompts = [line.strip() for line in text.splitlines() if line.strip()]
  if not prompts:
    raise InputError(f"prompt file {path} has no prompts (expected one prompt per line)")
  return prompts


def _numbered(path: str | None, tag: str) -> str | None:
  """``dir/stem.ext`` -> ``dir/stem_<tag>.ext``."""
  if path is None:
    return None
  stem, ext = os.path.splitext(path)
  return f"{stem}_{tag}{ext}"


def _file_tag(video_id: str) -> str:
  """A CSV id as it goes into a file name: characters other than letters, digits, '.', '-' and '_' become '_'."""
  return re.sub(r"[^\w.-]", "_", video_id) or "_"


def plan_jobs(args) -> list[Job]:
  """The run's videos with their output paths and seeds, from --prompt / --prompt-embeds (one video),
  --prompt-file (one per line) or --interactive-prompts (one per id). Reads and checks the prompt files.

  Raises:
    InputError: a prompt file that cannot be used, or CSV ids that give the same file name.
  """
  if args.interactive_prompts:
    schedules = PromptSchedule.from_csv(args.interactive_prompts, interpolate_time=args.interpolate_time,
                                        interpolation_steps=args.interpolation_steps)
    entries = [(f"id {vid}", _file_tag(vid), None, s) for vid, s in schedules.items()]
    seen: dict[str, str] = {}
    for label, tag, _, _ in entries:
      if tag in seen:
        raise InputError(f"{args.interactive_prompts}: {seen[tag]} and {label} give the same output name "
                         f"{_numbered(args.out, tag)}")
      seen[tag] = label
  elif args.prompt_file:
    lines = read_prompt_file(args.prompt_file)
    digits = max(3, len(str(len(lines) - 1)))
    entries = [(f"prompt {i}", f"{i:0{digits}d}", text, None) for i, text in enumerate(lines)]
  else:
    return [Job(out=args.out, sheet=args.contact_sheet, seed=args.seed, prompt=args.prompt)]
  if len(entries) == 1:
    label, _, text, schedule = entries[0]
    return [Job(out=args.out, sheet=args.contact_sheet, seed=args.seed, prompt=text, schedule=schedule, label=label)]
  return [Job(out=_numbered(args.out, tag), sheet=_numbered(args.contact_sheet, tag), seed=args.seed + i,
              prompt=text, schedule=schedule, label=label) for i, (label, tag, text, schedule) in enumerate(entries)]


def _writable(path: str, what: str) -> str:
  """``media.check_writable`` (which creates a missing folder), saying so when it did."""
  folder = os.path.dirname(os.path.abspath(path))
  existed = os.path.isdir(folder)
  path = media.check_writable(path, what)
  if not existed:
    print(f"created folder {_show(folder)}", flush=True)
  return path


def _writable_jobs(jobs: list[Job], batch: bool, overwrite: bool) -> list[Job]:
  """Checks every output path can be written (absolute paths back); in a batch run (a prompt file or CSV) drops,
  with a message, the videos whose mp4 already exists unless ``overwrite``."""
  todo = []
  for job in jobs:
    out = _writable(job.out, "output video")
    sheet = _writable(job.sheet, "contact sheet") if job.sheet else None
    if batch and not overwrite and os.path.exists(out):
      print(f"skipping {job.label}: {out} exists (pass --overwrite to replace it)", flush=True)
      continue
    todo.append(dataclasses.replace(job, out=out, sheet=sheet))
  return todo
