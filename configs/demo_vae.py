"""The bundled demo model's VAE: a small Wan2.1-architecture ``AutoencoderKLWan`` trained on procedural scenes.

Same architecture as the Wan2.1 VAE Helios uses (8x spatial / 4x temporal compression, 16 latent channels), with
base width 16 instead of 96 and one residual block per level instead of two (2.6M parameters, 10 MB in float32;
decoding a 33-frame 128x128 chunk costs about 2x less CPU time than base width 32 with multipliers (1, 2, 2, 2)).
``:tiny`` trains in seconds on a CPU (tests and ``recipes/demo/train_demo.py --quick``). ``:decoder`` is the
decoder-only fine-tune of a trained VAE on posterior means of 33-frame clips (``vae_train.finetune_decoder``,
``recipes/demo/finetune_demo_vae.py``): it keeps the encoder, so encoded data and the DiTs trained on them stay valid.

Training (``vae_train.train_vae``): an image phase (``image_steps`` single frames, batch ``image_batch_size``,
budget ``image_max_seconds``) then the video phase (``total_steps`` 33-frame clips, batch ``batch_size``, budget
``max_seconds``), with object pixels weighted ``1 + objective.object_weight * coverage`` in the reconstruction loss.
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 4000  # H200: 0.092 s/step (2400 steps took 222 s); the GPU script's budget may stop it earlier
  c.max_seconds = 0.0  # wall-clock budget (0 = none); the GPU script sets it
  c.batch_size = 8
  c.log_every = 25
  c.stats_clips = 64  # clips for the latents mean / std written into vae/config.json
  # Image phase before the video phase: single frames (the causal VAE's first-frame path, the image I2V conditions
  # on) cost about 30x less than a 33-frame clip, so thousands of steps fit in a minute on a GPU. After 2400 video
  # steps alone the VAE reached 22-23 dB held-out but drew the objects as faint blobs of the wrong colour, frame 0
  # worst; the GPU budget allows only a few thousand video steps.
  c.image_steps = 6000  # the image phase's wall-clock budget may stop it earlier
  c.image_batch_size = 32
  c.image_max_seconds = 90.0  # wall-clock budget (0 = none); recipes/demo/train_demo.py sets it (budget vae_images)

  c.model = ml_collections.ConfigDict()
  c.model.base_dim = 16  # Wan2.1: 96; the full-resolution convolutions dominate CPU decoding time
  c.model.z_dim = 16  # as Wan2.1
  c.model.dim_mult = (1, 2, 4, 4)  # as Wan2.1: 8x spatial compression
  c.model.num_res_blocks = 1  # Wan2.1: 2

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 50
  c.optim.final_lr_fraction = 0.05
  c.optim.max_grad_norm = 1.0

  c.objective = ml_collections.ConfigDict()
  # Tiny: the first VAE (1e-4, per-element means) kept a posterior std of 0.68 against a spread of the means of
  # 1.85, so its decoder learnt from noisy latents and drew flat frames (held-out 18.7 dB, below a flat frame's
  # 21.3 dB). The pipelines encode to the posterior mean, and latents_std rescales whatever spread the means reach.
  c.objective.kl_weight = 1e-6
  c.objective.mse_weight = 1.0
  # Frame 0 is encoded alone (the image I2V conditions on): weigh it like 8 of the 32 later frames (vae_train).
  c.objective.first_frame_weight = 8.0
  # Object pixels weigh 1 + 4 * coverage (scenes.coverage): the saturated shapes are a small fraction of the pixels,
  # and with plain means the VAE spent its few thousand steps on the textured backgrounds (a green square decoded to
  # a dark faint blob, a white triangle to a purple smear). With it (and the image phase), the fourth run's VAE:
  # held-out 31.0 dB, the start scene's object pixels 24.6 dB (was 10.5; docs/benchmarks.md, demo section).
  c.objective.object_weight = 4.0

  c.data = ml_collections.ConfigDict()
  c.data.seed = 1000  # scene stream of the VAE (the diffusion data uses other streams)
  c.data.height = 128
  c.data.width = 128
  # Whole 33-frame chunks, as the pipelines decode them. The first bundled VAE, trained on 17-frame clips (5
  # latents), decodes frames 17-32 of a chunk with a blue colour drift: held-out PSNR 16.0 dB there, 21.3 dB on
  # frames 1-16 (docs/benchmarks.md, demo section).
  c.data.frames = 33
  c.data.max_start = 200  # clips start at a random frame in [0, max_start]

  if arg == "decoder":  # recipes.demo.vae_train.finetune_decoder (recipes/demo/finetune_demo_vae.py)
    c.total_steps = 400
    c.batch_size = 2
    c.log_every = 10
    c.optim.learning_rate = 2e-4
    c.objective.mse_weight = 1.0
    c.image_steps = 0  # (finetune_decoder has no image phase)
  if arg == "tiny":
    c.total_steps = 4
    c.batch_size = 2
    c.image_steps = 2
    c.image_batch_size = 2
    c.log_every = 1
    c.stats_clips = 2
    c.model.base_dim = 4
    c.model.z_dim = 4
    c.model.dim_mult = (1, 2, 2, 2)
    c.data.height = 64
    c.data.width = 64
    c.data.frames = 5
    c.data.max_start = 10
  elif arg not in ("", "decoder"):
    raise ValueError(f"unknown config variant {arg!r} (use '', 'decoder' or 'tiny')")
  return c
