"""Stage 1 (Helios-Base): autoregressive flow matching with Easy Anti-Drifting (training-spec section 5).

Defaults are ``stage_1_init`` of the reference (spec section 11). ``--config configs/base.py:tiny`` is a 2-layer
model on synthetic latents that trains on a CPU in seconds. ``--config configs/base.py:post`` is ``stage_1_post``.
"""

from __future__ import annotations

import ml_collections

from helios_jax.parallel.mesh import add_mesh_config
from helios_jax.training.lora import ALL_LINEAR


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "base"
  c.seed = 43
  c.total_steps = 1_000_000
  c.batch_size = 2  # global batch (the reference's per-GPU 2 on one GPU), split over mesh.data x mesh.fsdp
  add_mesh_config(c)  # c.mesh.{data,fsdp,sequence}: one device by default (docs/scaling.md)

  c.model = ml_collections.ConfigDict()
  c.model.arch = "14b"  # "14b" or "tiny" (used when pretrained is empty)
  c.model.pretrained = ""  # diffusers transformer folder of the frozen base; empty = random init
  c.model.init_seed = 0
  c.model.dtype = "bfloat16"  # frozen base; trainables are always float32
  c.model.remat_policy = "full"  # none / full / dots / dots_no_batch (per block)
  c.model.attention_implementation = "auto"

  c.train = ml_collections.ConfigDict()
  c.train.mode = "lora"  # "lora" (frozen base) or "full" (full fine-tuning)
  c.train.lora_rank = 128
  c.train.lora_alpha = 128.0
  c.train.lora_targets = ALL_LINEAR  # regexes over dotted parameter names ("all-linear")
  c.train.lora_patch_embedding = True
  c.train.memory_patches = "full"  # patch_short/mid/long: full / lora / frozen

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 5e-5
  c.optim.schedule = "constant"  # constant / constant_with_warmup / warmup_stable_decay
  c.optim.warmup_steps = 500  # ignored by "constant", as in the reference
  c.optim.decay_steps = 0  # warmup_stable_decay: linear to 0 over the last decay_steps of total_steps (0: all)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 1e-4
  c.optim.max_grad_norm = 1.0

  o = c.objective = ml_collections.ConfigDict()
  o.weighting_scheme = "logit_normal"  # logit_normal / mode / none
  o.logit_mean = 0.0
  o.logit_std = 1.0
  o.use_dynamic_shifting = False  # training-time shift is off in every shipped stage-1/2 config
  o.time_shift_type = "linear"
  o.caption_dropout_p = 0.0
  o.random_drop = True
  o.random_drop_t2v = 0.4
  o.random_drop_i2v = 0.0  # correct.yaml: 0.1
  o.random_drop_v2v = 0.4
  o.corrupt_history = True
  o.corrupt_mode = "noise"  # noise / downsample / random (correct.yaml: random)
  o.corrupt_noise_prob = 0.9  # P(noise) in "random" mode
  o.frame_independent = True
  o.noise_ratio_short = 1 / 3
  o.noise_ratio_mid = 1 / 3
  o.noise_ratio_long = 1 / 3
  o.corrupt_clean_prob = 0.1
  o.blur_min = 0.9
  o.blur_max = 1.0
  # Saturation augmentation: an option only. The released trainer never applies it in stages 1/2 (spec 5.2),
  # even with correct.yaml's is_add_saturation: true.
  o.add_saturation = False
  o.saturation_clean_prob = 0.1
  o.saturation_min = 0.3
  o.saturation_max = 1.7
  # pyramid (stage 2 only; kept here so both stages share one schema)
  o.pyramid_stages = 3
  o.pyramid_stage_range = (0.0, 1 / 3, 2 / 3, 1.0)
  o.pyramid_gamma = 1 / 3
  o.pyramid_shift = 1.0
  o.stage2_sample_ratios = (1, 2, 1)

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"  # synthetic / tfds
  c.data.data_dir = ""  # tfds data_dir of a prepared dataset
  c.data.name = "helios_latents"
  c.data.seed = 0
  c.data.num_clips = 256  # synthetic only
  c.data.num_chunks = 4
  c.data.height = 48  # latent size (384x640 pixels)
  c.data.width = 80
  c.data.channels = 16
  c.data.text_len = 512
  c.data.text_dim = 4096

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 500
  c.checkpoint.keep = 3
  c.log_every = 1
  c.export_merged = True  # write WORKDIR/merged (diffusers layout) at the end of the run

  # Validation sampling with the real pipeline (helios_jax.training.validation): WORKDIR/samples/step_N/*.mp4.
  # Reference (spec 9): every 500 steps, one prompt, stage 1 = 50 steps CFG 5, 99 frames at 384x640. Off until
  # `vae` is set.
  v = c.validation = ml_collections.ConfigDict()
  v.every = 500  # optimiser steps between samples; 0 = only at the end
  v.at_end = True  # also after the last step
  v.prompts = ("A red fox runs through fresh snow in a quiet pine forest, soft morning light.",)
  v.negative_prompt = ""  # the reference uses Wan's default negative prompt; set it here for CFG
  v.vae = ""  # diffusers Wan VAE folder (e.g. Helios-Base/vae); "random:tiny" = random tiny VAE (smoke runs)
  v.vae_dtype = "float32"
  v.text_encoder = ""  # UMT5 folder (e.g. Helios-Base/text_encoder); encoded once at start, then freed
  v.tokenizer = ""  # tokenizer folder (default: text_encoder)
  v.text_encoder_dtype = "bfloat16"
  v.max_sequence_length = 512
  v.prompt_embeds = ()  # instead of a text encoder: one .npy (L, text_dim) per prompt
  v.negative_prompt_embeds = ""  # .npy, needed with prompt_embeds when guidance_scale > 1
  v.random_prompt_embeds = False  # seeded random embeddings (smoke runs, :tiny)
  v.pipeline = "plain"  # plain (HeliosPipeline, stage 1) / pyramid (HeliosPyramidPipeline)
  v.scheduler = "unipc"  # unipc / euler / dmd
  v.steps = (50,)  # plain: one count; pyramid: one per stage
  v.guidance_scale = 5.0
  v.cfg_zero_star = False
  v.amplify_first_chunk = False
  v.use_dynamic_shifting = True
  v.time_shift_type = "exponential"  # spec 4.3: stages 1/2 validation
  v.num_frames = 99
  v.height = 384
  v.width = 640
  v.seed = 42
  v.fps = 24

  if arg in ("", "init"):
    pass
  elif arg == "post":
    c.seed = 44
    c.optim.learning_rate = 3e-5
  elif arg == "tiny":
    make_tiny(c)
  else:
    raise ValueError(f"unknown config variant {arg!r} (use '', 'post' or 'tiny')")
  return c


def make_tiny(c: ml_collections.ConfigDict) -> None:
  """2-layer model, 16x16 latents with 4 channels, synthetic clips: seconds per 60 steps on a CPU."""
  c.total_steps = 60
  c.model.arch = "tiny"
  c.model.dtype = "float32"
  c.model.remat_policy = "none"
  c.train.lora_rank = 8
  c.train.lora_alpha = 8.0
  c.optim.learning_rate = 2e-3
  c.data.num_clips = 32
  c.data.num_chunks = 3
  c.data.height = 16
  c.data.width = 16
  c.data.channels = 4
  c.data.text_len = 8
  c.data.text_dim = 32
  c.checkpoint.every = 20
  c.checkpoint.keep = 2
  # Validation: random tiny VAE and random prompt embeddings, one 33-frame chunk at 64x64; off by default (it
  # costs more than the tiny run), on with --config.validation.at_end=True or --config.validation.every=N.
  c.validation.every = 0
  c.validation.at_end = False
  c.validation.vae = "random:tiny"
  c.validation.random_prompt_embeds = True
  c.validation.steps = (2,)
  c.validation.num_frames = 33
  c.validation.height = 64
  c.validation.width = 64
  c.mesh.fsdp_min_size = 0  # shard even the tiny tensors, so a tiny run on a mesh exercises every rule
