"""How far fp8 moves the bundled demo's output: PSNR of ``sample.py --quantization fp8`` frames against the
unquantised ones, per chunk (a measurement, not a test).

    python -m recipes.demo.fp8_demo_psnr --mode i2v --out /tmp/fp8_demo      # CPU, about 2.5 minutes
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sample

WINDOW = 33


def psnr_db(mse) -> float:
  return float(10 * np.log10(255.0 ** 2 / max(float(mse), 1e-12)))


def frames_of(mode: str, quantization: str, out: str) -> np.ndarray:
  """The uint8 frames sample.py streams for the bundled demo at its defaults."""
  seen = []
  rc = sample.main(["--mode", mode, "--out", os.path.join(out, f"{mode}_{quantization}.mp4"), "--quantization",
                    quantization, "--compile-cache", "none"], on_chunk=lambda job, chunk: seen.append(chunk.frames))
  if rc != 0:
    raise SystemExit(rc)
  return np.concatenate(seen).astype(np.float64)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--mode", choices=("t2v", "i2v", "v2v"), default="i2v")
  p.add_argument("--out", default=os.environ.get("OUT", "/tmp/fp8_demo"))
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  plain, fp8 = frames_of(a.mode, "none", a.out), frames_of(a.mode, "fp8", a.out)
  mse = np.mean((plain - fp8) ** 2, axis=(1, 2, 3))
  rec = {"mode": a.mode, "psnr_mean_db": psnr_db(mse.mean()), "psnr_min_frame_db": min(psnr_db(m) for m in mse),
         "psnr_per_chunk_db": [psnr_db(mse[s:s + WINDOW].mean()) for s in range(0, len(mse), WINDOW)]}
  print(json.dumps(rec))
  with open(os.path.join(a.out, f"fp8_demo_psnr_{a.mode}.json"), "w") as f:
    json.dump(rec, f, indent=1)


if __name__ == "__main__":
  main()
