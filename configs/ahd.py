"""Stage 3 (Helios-Distilled): Adversarial Hierarchical Distillation, the DMD loop (training-spec 7.5, 7.7, 7.8).

Defaults are ``stage_3_post`` (DMD without GAN); ``:gan`` is ``stage_3_post_gan_version`` (heads on blocks
5/15/25/35 + output, GAN from step 1000); ``:tiny`` / ``:tiny_gan`` run on a CPU on synthetic latents.

Point it at real weights with ``--config.model.pretrained=<generator transformer folder>`` (Helios-Distilled's
``transformer_ode``, the output of configs/ode.py) and ``--config.teacher.pretrained=<Helios-Base transformer>``;
an empty teacher path means "the same base as the generator" (one frozen trunk serves every role).

Deliberate differences from the released trainer (see docs/architecture.md, "Stage 3"):
* clipping: both optimisers clip at 1.0 (what DeepSpeed's zero2.json did; the YAML's 10 never acted);
* critic + discriminator + R1 take ONE optimiser step per step (DeepSpeed took two in the GAN low-VRAM path);
* the discriminator's real chunk is shown with its own history (the reference paired the primary chunk with the
  secondary history) and the R1-perturbed copy uses the same crop as the unperturbed one;
* the GAN path runs (the reference crashes at step 1000 on the missing ``is_gan_aprox_grad`` key).
"""

from __future__ import annotations

import ml_collections

from configs import base

from helios_jax.training.lora import ALL_LINEAR


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = base.get_config("")
  c.stage = "ahd"
  c.seed = 49
  c.batch_size = 1
  c.export_merged = True  # WORKDIR/merged = generator base + EMA LoRA (the released model was merged from EMA)

  # generator (student): LoRA r256 on all linears + LoRA on patch_short/mid/long; no patch_embedding LoRA
  c.train.lora_rank = 256
  c.train.lora_alpha = 256.0
  c.train.lora_patch_embedding = False
  c.train.memory_patches = "lora"

  # real score = teacher with adapters off; fake score / discriminator = teacher + critic LoRA (+ heads)
  c.teacher = ml_collections.ConfigDict()
  c.teacher.pretrained = ""  # Helios-Base transformer folder; "" = the generator's base (model.pretrained)
  c.teacher.init_seed = -1  # random init only: -1 = model.init_seed (shared trunk)

  c.critic = ml_collections.ConfigDict()
  c.critic.mode = "lora"
  c.critic.lora_rank = 256
  c.critic.lora_alpha = 256.0
  c.critic.lora_targets = ALL_LINEAR
  c.critic.lora_patch_embedding = False
  c.critic.memory_patches = "frozen"

  c.optim.learning_rate = 2e-6
  c.optim.schedule = "constant"
  c.optim.b1 = 0.0
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 1e-3
  c.optim.max_grad_norm = 1.0  # DeepSpeed gradient_clipping (spec 7.9)

  c.critic_optim = ml_collections.ConfigDict(c.optim.to_dict())
  c.critic_optim.learning_rate = 4e-7

  o = c.objective
  o.random_drop_t2v = 0.4
  o.random_drop_i2v = 0.0
  o.random_drop_v2v = 0.5
  o.corrupt_mode = "noise"
  o.add_saturation = True  # generator's history only (spec 7.3)

  d = c.dmd = ml_collections.ConfigDict()
  d.update_ratio = 5  # generator step every 5th step (dfake_gen_update_ratio)
  d.real_guidance_scale = 3.0  # real = cond + 3 (cond - uncond)
  d.rollout_steps = (2, 2, 2)  # stage2_simulated_inference_steps
  d.amplify_first_chunk = True  # 2x steps when the history is all zero
  d.gen_beta_alpha = 4.0  # generator timestep ~ Beta(alpha_k, beta_k), annealed to uniform
  d.gen_beta_beta = 1.5
  d.gen_beta_steps = 500  # generator_dynamic_step
  d.min_timestep = 20.0  # 2 % of 1000 (min_step)
  d.max_timestep = 980.0  # 98 % of 1000 (max_step)
  d.negative_prompt_embeds = ""  # .npy (S, D) of the UMT5 negative prompt; "" = zeros

  g = c.gan = ml_collections.ConfigDict()
  g.enabled = False
  g.start_step = 1000
  g.hooks = (5, 15, 25, 35)
  g.use_hooks = True
  g.use_final = True
  g.head_width = 768  # gan_cond_map_dim
  g.head_groups = 32  # GroupNorm groups of the heads
  g.crop_scale = 0.5
  g.g_weight = 0.05
  g.d_weight = 0.01
  g.r1_weight = 100.0
  g.r1_sigma = 0.1
  g.r2_weight = 0.0
  g.r2_sigma = 0.1
  g.approximate = True  # aprox_r1: mean((D(x) - D(x + sigma n))^2)

  e = c.ema = ml_collections.ConfigDict()
  e.enabled = True
  e.decay = 0.99
  e.start_step = 750

  f = c.offload = ml_collections.ConfigDict()
  f.optimizer_on_host = False  # keep Adam moments in pinned host memory between updates (14B on 80 GB)
  f.ema_on_host = False
  f.idle_trunk_on_host = False  # with two trunks: only the trunk of the running phase stays on the device

  c.checkpoint.every = 250

  if arg in ("", "post"):
    pass
  elif arg == "gan":
    g.enabled = True
  elif arg in ("tiny", "tiny_gan"):
    make_tiny(c)
    g.enabled = arg == "tiny_gan"
  else:
    raise ValueError(f"unknown config variant {arg!r} (use '', 'gan', 'tiny' or 'tiny_gan')")
  return c


def make_tiny(c: ml_collections.ConfigDict) -> None:
  """2-layer model on 16x16 synthetic latents; GAN from step 2 with heads on both blocks."""
  base.make_tiny(c)
  c.batch_size = 1
  c.total_steps = 30
  c.checkpoint.every = 10
  c.critic.lora_rank = 8
  c.critic.lora_alpha = 8.0
  c.optim.learning_rate = 1e-3
  c.critic_optim.learning_rate = 1e-3
  c.dmd.update_ratio = 2
  c.dmd.gen_beta_steps = 10
  c.gan.start_step = 2
  c.gan.hooks = (0, 1)
  c.gan.head_width = 16
  c.gan.head_groups = 4
  c.ema.start_step = 4
