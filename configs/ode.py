"""Stage 3 phase 5 (``stage_3_ode``): ODE-pair generation from the teacher, then ODE regression (training-spec 7.4).

``model.pretrained`` is Helios-Mid's transformer: it is both the teacher that writes the ODE pairs (adapters off,
CFG 5, Euler over the 20-step grid with the student's timesteps inserted) and the frozen base of the student LoRA.
Pairs go to ``ode.data_dir`` (one .npz per prompt, prompts taken from ``config.data``); existing files are reused,
so a second run (or a resumed one) trains straight away. ``ode.pairs_format``: ``"npz"`` trains from that folder
(needs only NumPy: the GPU machine without tensorflow-datasets); ``"tfds"`` packs the complete folder into the
tfds dataset ``helios_ode_pairs`` under ``ode.tfds_dir`` and trains from it (needs tensorflow-datasets; an existing
dataset is used as it is). Pairs made with "npz" are packed later by
``python -m helios_jax.training.ode --convert <data_dir>``; batches and losses are the same either way.
The merged result (EMA LoRA fused) is the generator base of configs/ahd.py. ``:tiny`` runs on a CPU on synthetic
latents.
"""

from __future__ import annotations

import ml_collections

from configs import ahd


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ahd.get_config("")
  c.stage = "ode"
  c.seed = 47
  c.optim.max_grad_norm = 10.0  # the YAML's value (phase 5 ran without the DeepSpeed engines of phase 6)
  c.ema.start_step = 250
  c.checkpoint.every = 250

  o = c.ode = ml_collections.ConfigDict()
  o.data_dir = ""  # folder of pair_*.npz (generated if fewer than num_prompts are there)
  o.pairs_format = "npz"  # "npz": train from data_dir; "tfds": pack data_dir into tfds_dir and train from that
  o.tfds_dir = ""  # tfds data_dir of the helios_ode_pairs dataset; "" = <data_dir>/tfds
  o.num_prompts = 64
  o.num_sections = 5  # chunks per prompt (165 frames)
  o.sections_per_step = 3  # ode_num_latent_sections_min = max
  o.regression_weight = 80.0
  o.teacher_steps = 20  # per pyramid stage
  o.teacher_guidance = 5.0
  o.seed = 42  # the reference seeds every prompt with 42

  if arg in ("", "post"):
    pass
  elif arg == "tiny":
    ahd.make_tiny(c)
    c.gan.enabled = False
    c.total_steps = 12
    c.checkpoint.every = 6
    c.ema.start_step = 2
    o.num_prompts = 2
    o.num_sections = 3
    o.sections_per_step = 2
    o.teacher_steps = 3
  else:
    raise ValueError(f"unknown config variant {arg!r} (use '' or 'tiny')")
  return c
