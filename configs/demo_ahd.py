"""Stage 3, phase 6 of the bundled demo model: the DMD loop (``configs/ahd.py``, no GAN) from the ODE-regressed
student (``--config.model.pretrained=<ode run>/merged``) against the demo Mid as real score
(``--config.teacher.pretrained=<mid run>/merged``). Result: the 3-step (1-1-1) distilled demo model.
``:tiny`` matches ``configs/demo_base.py:tiny``.
"""

from __future__ import annotations

import ml_collections

from configs import ahd
from configs import demo_ode


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "tiny"):
    raise ValueError(f"unknown config variant {arg!r} (use '' or 'tiny')")
  c = ahd.get_config("tiny" if arg == "tiny" else "")
  demo_ode.demo_stage3(c, arg)
  c.model.pretrained = ""  # the demo ODE run's merged transformer
  c.teacher.pretrained = ""  # the demo Mid's merged transformer
  c.critic.lora_rank = c.train.lora_rank
  c.critic.lora_alpha = c.train.lora_alpha
  # The 14B recipe's rates (2e-6 / 4e-7) are for a pretrained 14B trunk; the demo's small trunk moves faster.
  c.optim.learning_rate = 2e-5
  c.critic_optim.learning_rate = 2e-5
  c.dmd.real_guidance_scale = 2.0
  c.total_steps = 400 if arg != "tiny" else 4
  if arg == "tiny":
    c.dmd.update_ratio = 2
  return c
