"""Stage 2 (Helios-Mid): pyramid unified predictor-corrector training (training-spec section 6).

Defaults are ``stage_2_init``; ``:post`` is ``stage_2_post``; ``:tiny`` runs on a CPU on synthetic latents.
"""

from __future__ import annotations

import ml_collections

from configs import base


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = base.get_config("")
  c.stage = "mid"
  c.seed = 45
  c.batch_size = 1
  c.train.lora_rank = 256
  c.train.lora_alpha = 256.0
  c.train.lora_patch_embedding = False
  c.train.memory_patches = "frozen"
  c.optim.learning_rate = 1e-4
  c.optim.schedule = "constant_with_warmup"
  c.optim.warmup_steps = 1000
  c.objective.weighting_scheme = "none"
  c.objective.stage2_sample_ratios = (1, 2, 1)
  c.validation.pipeline = "pyramid"  # spec 9: stage 2 validates with pyramid 20/20/20, CFG 5 (CFG-Zero*)
  c.validation.steps = (20, 20, 20)
  c.validation.cfg_zero_star = True
  if arg in ("", "init"):
    pass
  elif arg == "post":
    c.seed = 46
    c.optim.learning_rate = 3e-5
    c.optim.warmup_steps = 500
    c.train.lora_patch_embedding = True
    c.train.memory_patches = "lora"
    c.objective.stage2_sample_ratios = (1, 1, 1)
  elif arg == "tiny":
    base.make_tiny(c)
    c.validation.steps = (1, 1, 1)
    c.batch_size = 2
    c.optim.warmup_steps = 5
  else:
    raise ValueError(f"unknown config variant {arg!r} (use '', 'post' or 'tiny')")
  return c
