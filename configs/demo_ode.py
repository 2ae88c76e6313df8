"""Stage 3, phase 5 of the bundled demo model: ODE pairs from the demo Mid (the teacher) and ODE regression of a
LoRA student (``configs/ode.py`` on the demo data and sizes). ``--config.model.pretrained=<mid run>/merged``.

The teacher samples as the bundled Mid does (guidance 1.0, 10 steps per pyramid stage); the student learns the
1-1-1 pyramid rollout (3 steps). ``:tiny`` matches ``configs/demo_base.py:tiny``.
"""

from __future__ import annotations

import ml_collections

from configs import demo_base
from configs import ode

DEMO_LORA_RANK = 64  # the demo DiT is 192 wide; the 14B recipe's 256 would exceed it


def demo_stage3(c: ml_collections.ConfigDict, arg: str) -> None:
  """Sizes shared by demo_ode and demo_ahd."""
  demo_base.demo_model_and_data(c, arg)
  c.train.mode = "lora"
  c.train.lora_rank = DEMO_LORA_RANK if arg != "tiny" else 8
  c.train.lora_alpha = float(c.train.lora_rank)
  c.dmd.rollout_steps = (1, 1, 1)  # the demo's distilled model samples with 3 steps
  c.gan.enabled = False
  c.ema.start_step = 50 if arg != "tiny" else 2


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "tiny"):
    raise ValueError(f"unknown config variant {arg!r} (use '' or 'tiny')")
  c = ode.get_config("tiny" if arg == "tiny" else "")
  demo_stage3(c, arg)
  c.seed = 47
  c.model.pretrained = ""  # the demo Mid's merged transformer folder
  c.optim.learning_rate = 1e-4 if arg != "tiny" else 1e-3
  o = c.ode
  o.data_dir = ""  # set by recipes/demo/train_demo.py
  o.teacher_guidance = 1.0  # as the bundled Mid samples
  if arg == "tiny":
    c.total_steps = 3
  else:
    c.total_steps = 600
    o.num_prompts = 48
    o.num_sections = 3
    o.sections_per_step = 2
    o.teacher_steps = 10
  return c
