"""Stage 1 (Base) of the bundled demo model: a small Helios trained from scratch on encoded procedural scenes.

Same architecture as the 14B model (memory patches, zero-history timestep, guidance cross-attention, 3D RoPE),
6 blocks of width 192 (6 heads of 32) instead of 40 of 5120, text width 64 (the demo UMT5 encoder), 16 latent
channels (the demo VAE). Full training (``train.mode = "full"``: there is no pretrained base to adapt), Easy
Anti-Drifting on as in the paper. Data: ``data.source = "demo"`` (registered below, the recipe's
:func:`recipes.demo.demo.source`), a folder written by
``recipes.demo.demo.encode_dataset`` (``recipes/demo/train_demo.py`` builds it).

Variants: ``:nocorrupt`` turns the history corruption off (the anti-drifting ablation of
``recipes/demo/demo_quality.py``); ``:tiny`` is a 2-block model for CPU dry runs and tests.
"""

from __future__ import annotations

import ml_collections

from configs import base

from helios_jax.training.sources import register_source

# data.source = "demo": the recipe's encoded scenes, imported only when a run builds its source
register_source("demo", "recipes.demo.demo:source")

# The demo DiT (HeliosTransformerConfig fields over the "tiny" arch).
DEMO_ARCH = dict(num_attention_heads=6, attention_head_dim=32, rope_dim=(8, 12, 12), ffn_dim=768, num_layers=6,
                 text_dim=64, freq_dim=64, in_channels=16, out_channels=16)
TINY_ARCH = dict(num_attention_heads=2, attention_head_dim=16, rope_dim=(4, 6, 6), ffn_dim=64, num_layers=2,
                 text_dim=64, freq_dim=32, in_channels=4, out_channels=4)


def demo_settings(c: ml_collections.ConfigDict, arg: str) -> None:
  """The demo overrides shared by demo_base and demo_mid (full training from scratch)."""
  demo_model_and_data(c, arg)
  c.train.mode = "full"  # trained from scratch
  c.optim.learning_rate = 3e-4
  c.optim.schedule = "constant_with_warmup"
  c.optim.warmup_steps = 200 if arg != "tiny" else 1
  c.optim.weight_decay = 0.01
  c.objective.caption_dropout_p = 0.1  # lets the demo model also run with classifier-free guidance
  # The demo's headline is I2V: show the I2V history pattern (anchor + one recent frame) in training too
  # (released configs: 0.0; the maintainers' correct.yaml: 0.1).
  c.objective.random_drop_i2v = 0.2
  # Fewer all-history-dropped (T2V) batches than the released 0.4: the demo's headline is continuing an image, and
  # a small model learns to read its history slowly (docs/benchmarks.md, demo section); 0.2 still trains T2V.
  c.objective.random_drop_t2v = 0.2


def demo_model_and_data(c: ml_collections.ConfigDict, arg: str) -> None:
  """Model size / dtype and the encoded-scene data of every demo stage (1, 2 and 3)."""
  c.model.arch = "tiny"
  c.model.overrides = dict(DEMO_ARCH)
  c.model.dtype = "float32"
  c.model.remat_policy = "none"
  c.data.source = "demo"
  c.data.data_dir = ""  # the encoded scene folder (set on the command line or by recipes/demo/train_demo.py)
  c.data.num_chunks = 4
  c.data.height = 16  # latent size of 128x128 frames
  c.data.width = 16
  c.data.channels = 16
  c.data.text_len = 512
  c.data.text_dim = 64
  c.checkpoint.every = 1_000_000  # the GPU script saves at the end (and on its wall-clock budget)
  c.checkpoint.keep = 1
  c.log_every = 10
  if arg == "tiny":
    c.total_steps = 3
    c.model.overrides = dict(TINY_ARCH)
    c.data.height = 8
    c.data.width = 8
    c.data.channels = 4
    c.data.num_chunks = 2
    c.log_every = 1


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = base.get_config("")
  c.seed = 43
  c.total_steps = 4000
  c.batch_size = 32
  variant = set(arg.split(",")) - {""}
  if not variant <= {"tiny", "nocorrupt"}:
    raise ValueError(f"unknown config variant {arg!r} (use '', 'nocorrupt', 'tiny' or 'tiny,nocorrupt')")
  demo_settings(c, "tiny" if "tiny" in variant else "")
  if "tiny" in variant:
    c.batch_size = 2
  if "nocorrupt" in variant:
    c.objective.corrupt_history = False
  return c
