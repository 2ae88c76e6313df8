"""Stage 2 (Mid) of the bundled demo model: pyramid unified predictor-corrector training, initialised from the
demo Base (``--config.model.pretrained=<base run>/merged``). Full training, otherwise ``configs/mid.py``'s
objective (uniform timesteps, stage ratios 1:2:1). ``:tiny`` matches ``configs/demo_base.py:tiny``.
"""

from __future__ import annotations

import ml_collections

from configs import demo_base
from configs import mid


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "tiny"):
    raise ValueError(f"unknown config variant {arg!r} (use '' or 'tiny')")
  c = mid.get_config("")
  c.seed = 45
  c.total_steps = 3000
  c.batch_size = 32
  demo_base.demo_settings(c, arg)
  c.optim.learning_rate = 2e-4
  c.model.pretrained = ""  # the demo Base's merged transformer folder
  if arg == "tiny":
    c.batch_size = 2
  return c
