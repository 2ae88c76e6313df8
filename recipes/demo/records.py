"""The demo studies' JSON records: printed, and written to a file when one is given."""

from __future__ import annotations

import json


def print_and_write(result: dict, out: str | None) -> int:
  """Prints ``result`` as indented JSON (one space) and writes the same text to ``out`` when given; returns 0."""
  text = json.dumps(result, indent=1)
  if out:
    with open(out, "w", encoding="utf-8") as f:
      f.write(text)
  print(text)
  return 0
