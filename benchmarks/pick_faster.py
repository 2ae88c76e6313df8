"""Prints the tag of the faster component run: ``python benchmarks/pick_faster.py OUT TAG_A TAG_B``.

Reads ``OUT/components_<tag>.json`` (written by ``fps.py --components-only --tag <tag>``) and compares the summed
transformer forwards plus one VAE chunk decode. Used by the ``run_*.sh`` variant scripts.
"""

from __future__ import annotations

import json
import os
import sys


def total(out: str, tag: str) -> float:
  with open(os.path.join(out, f"components_{tag}.json"), encoding="utf-8") as f:
    r = json.load(f)
  return r["forward_sum_s"] + r["vae_decode_chunk_s"]


if __name__ == "__main__":
  out, a, b = sys.argv[1:4]
  print(b if total(out, b) < total(out, a) else a)
