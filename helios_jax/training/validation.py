"""Validation sampling during training: the real pipeline on the current adapted model, one mp4 per prompt.

Every ``config.validation.every`` optimiser steps (and at the end of the run) the adapters are fused into the base
(:func:`helios_jax.training.lora.merge_into_model`), a :class:`~helios_jax.pipelines.HeliosPipeline` (``plain``,
stage 1) or :class:`~helios_jax.pipelines.HeliosPyramidPipeline` (``pyramid``, stage 2) is built around it and each
prompt is written to ``WORKDIR/samples/step_XXXXXX/NN_<slug>.mp4``. Defaults follow the reference's validation
(training-spec 9: stage 1 50 steps CFG 5, stage 2 pyramid 20/20/20 CFG 5 with CFG-Zero*, 99 frames at 384x640,
dynamic exponential shift).

Prompt embeddings are computed once at start-up (UMT5 is then freed: it is ~11 GB in bf16 at full size) or read
from ``.npy`` files; the VAE is loaded once and kept. A failure while sampling is logged as a warning and the run
goes on: validation never costs the training run.

Memory: the fused copy of the transformer exists only while sampling (at 14B ~28 GB in bf16 on top of the
training state).
"""

from __future__ import annotations

import gc
import logging
import os
import re
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.errors import InputError
from helios_jax.training import lora

logger = logging.getLogger(__name__)

RANDOM_TINY_VAE = "random:tiny"  # config.validation.vae value: a random-weight tiny Wan VAE (tests, :tiny runs)


def tiny_vae_config(z_dim: int):
  """A 4-wide Wan VAE with the real 4x temporal / 8x spatial compression (tiny runs and tests)."""
  from helios_jax.models.vae import WanVAEConfig
  return WanVAEConfig(base_dim=4, z_dim=z_dim, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                      latents_mean=(0.0,) * z_dim, latents_std=(1.0,) * z_dim)


def slug(text: str, index: int, max_len: int = 48) -> str:
  """``NN_words-of-the-prompt`` (file-system safe, unique per prompt index)."""
  s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].strip("-")
  return f"{index:02d}_{s or 'prompt'}"


def enabled(v) -> bool:
  """Validation runs when a VAE is configured and it has a step to run at."""
  return bool(v.vae) and (int(v.every) > 0 or bool(v.at_end))


def _check_paths(v) -> None:
  """User mistakes in ``config.validation`` become one InputError before training starts."""
  if not v.prompts:
    raise InputError("config.validation.prompts is empty: give at least one prompt (it also names the file)")
  if v.vae != RANDOM_TINY_VAE and not os.path.isdir(v.vae or ""):
    raise InputError(f"config.validation.vae must be a diffusers VAE folder (or {RANDOM_TINY_VAE!r}), "
                     f"got {v.vae!r}")
  if v.prompt_embeds:
    if len(v.prompt_embeds) != len(v.prompts):
      raise InputError(f"config.validation.prompt_embeds has {len(v.prompt_embeds)} files for "
                       f"{len(v.prompts)} prompts")
    missing = [p for p in (*v.prompt_embeds, v.negative_prompt_embeds) if p and not os.path.isfile(p)]
    if missing:
      raise InputError(f"config.validation prompt embedding file(s) not found: {', '.join(missing)}")
  elif not v.random_prompt_embeds and not os.path.isdir(v.text_encoder or ""):
    raise InputError("config.validation needs prompt embeddings: a UMT5 folder in text_encoder (with tokenizer), "
                     ".npy files in prompt_embeds, or random_prompt_embeds=True (smoke runs)")
  if v.pipeline not in ("plain", "pyramid"):
    raise InputError(f"config.validation.pipeline must be 'plain' or 'pyramid', got {v.pipeline!r}")
  if v.pipeline == "plain" and len(v.steps) != 1:
    raise InputError(f"config.validation.steps for the plain pipeline is one count, got {tuple(v.steps)}")


def _load_npy(path: str, text_dim: int) -> np.ndarray:
  a = np.load(path)
  a = a[0] if a.ndim == 3 and a.shape[0] == 1 else a
  if a.ndim != 2 or a.shape[-1] != text_dim:
    raise InputError(f"{path}: prompt embeddings must be (L, {text_dim}), got shape {a.shape}")
  return a.astype(np.float32)


def prompt_embeddings(v, text_dim: int, text_len: int) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
  """(one (L, text_dim) array per prompt, negatives or None when guidance is off), on the host."""
  cfg = float(v.guidance_scale) > 1.0
  n = len(v.prompts)
  if v.prompt_embeds:
    pos = [_load_npy(p, text_dim) for p in v.prompt_embeds]
    if not cfg:
      return pos, None
    if not v.negative_prompt_embeds:
      raise InputError("config.validation.guidance_scale > 1 needs negative_prompt_embeds (a .npy file) when "
                       "prompt_embeds are given")
    return pos, [_load_npy(v.negative_prompt_embeds, text_dim)] * n
  if v.random_prompt_embeds:
    keys = jax.random.split(jax.random.key(int(v.seed)), 2 * n)
    draw = lambda k: np.asarray(jax.random.normal(k, (text_len, text_dim), jnp.float32))
    return [draw(k) for k in keys[:n]], ([draw(k) for k in keys[n:]] if cfg else None)
  from helios_jax.models.tokenizer import encode_prompt, load_tokenizer
  from helios_jax.models.umt5 import UMT5EncoderModel
  encoder = UMT5EncoderModel.from_pretrained(v.text_encoder, dtype=jnp.dtype(v.text_encoder_dtype))
  tokenizer = load_tokenizer(v.tokenizer or v.text_encoder)
  length = int(v.max_sequence_length)
  pos = [np.asarray(e, np.float32) for e in encode_prompt(encoder, tokenizer, list(v.prompts), length)]
  neg = None
  if cfg:
    neg = [np.asarray(e, np.float32) for e in encode_prompt(encoder, tokenizer, [v.negative_prompt] * n, length)]
  return pos, neg  # the encoder is dropped here (the caller collects)


class Validator:
  """Holds the VAE and the prompt embeddings; :meth:`run` samples the current model."""

  def __init__(self, config, workdir: str):
    v = config.validation
    _check_paths(v)
    self.v = v
    self.dir = os.path.join(workdir, "samples")
    self.scale = float(config.train.lora_alpha) / float(config.train.lora_rank)
    self._vae = None
    self._embeds = None
    self._text_dim = None
    self._text_len = int(config.data.text_len)
    self._in_channels = None

  def due(self, step: int, total: int) -> bool:
    """Sample after optimiser step ``step`` (1-based) of ``total``?"""
    every = int(self.v.every)
    return (every > 0 and step % every == 0) or (bool(self.v.at_end) and step == total)

  def _setup(self, model_config) -> None:
    """Loads the VAE and the prompt embeddings once (on first use: the model config is known then)."""
    from helios_jax.models.vae import AutoencoderKLWan
    from flax import nnx
    v = self.v
    if v.vae == RANDOM_TINY_VAE:
      self._vae = AutoencoderKLWan(tiny_vae_config(model_config.in_channels), dtype=jnp.dtype(v.vae_dtype),
                                   rngs=nnx.Rngs(int(v.seed)))
    else:
      self._vae = AutoencoderKLWan.from_pretrained(v.vae, dtype=jnp.dtype(v.vae_dtype))
    self._embeds = prompt_embeddings(v, model_config.text_dim, self._text_len)
    gc.collect()  # frees UMT5 when it was loaded

  def pipeline(self, transformer):
    """The configured pipeline around ``transformer`` with this validator's VAE."""
    from helios_jax.pipelines import HeliosPipeline, HeliosPyramidPipeline
    from helios_jax.schedulers import HeliosDMDScheduler, HeliosScheduler
    v = self.v
    shift = dict(use_dynamic_shifting=bool(v.use_dynamic_shifting), time_shift_type=v.time_shift_type)
    if v.pipeline == "plain":
      return HeliosPipeline(transformer, HeliosScheduler.from_config(dict(stages=1, **shift)), self._vae)
    if v.scheduler == "dmd":
      sched = HeliosDMDScheduler.from_config(dict(stages=len(v.steps), **shift))
    else:
      sched = HeliosScheduler.from_config(dict(stages=len(v.steps), scheduler_type=v.scheduler, **shift))
    return HeliosPyramidPipeline(transformer, sched, self._vae, is_cfg_zero_star=bool(v.cfg_zero_star),
                                 is_distilled=v.scheduler == "dmd")

  def run(self, step: int, graphdef, frozen, trainable: dict) -> list[str]:
    """Samples every prompt with the adapters fused in; returns the mp4 paths."""
    from helios_jax.io.media import write_video
    v = self.v
    t0 = time.perf_counter()
    model = lora.merge_into_model(graphdef, frozen, trainable, self.scale)
    if self._vae is None:
      self._setup(model.config)
    pipe = self.pipeline(model)
    steps = {"num_inference_steps": int(v.steps[0])} if v.pipeline == "plain" else dict(
        pyramid_num_inference_steps_list=tuple(int(s) for s in v.steps),
        is_amplify_first_chunk=bool(v.amplify_first_chunk))
    pos, neg = self._embeds
    folder = os.path.join(self.dir, f"step_{step:06d}")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, prompt in enumerate(v.prompts):
      out = pipe(prompt_embeds=pos[i][None], negative_prompt_embeds=None if neg is None else neg[i][None],
                 num_frames=int(v.num_frames), height=int(v.height), width=int(v.width),
                 guidance_scale=float(v.guidance_scale), seed=int(v.seed), output_type="np", progress=False,
                 **steps)
      paths.append(write_video(os.path.join(folder, slug(prompt, i) + ".mp4"), out.frames[0], fps=int(v.fps)))
    del pipe, model
    gc.collect()
    logger.info("validation samples of step %d written to %s in %.1fs", step, folder, time.perf_counter() - t0)
    return paths

  def run_safely(self, step: int, graphdef, frozen, trainable: dict) -> list[str]:
    """:meth:`run`, but any failure is a warning: the training run goes on."""
    try:
      return self.run(step, graphdef, frozen, trainable)
    except Exception as e:  # noqa: BLE001 (sampling must never end the training run)
      msg = f"validation sampling at step {step} failed ({type(e).__name__}: {e}); training continues"
      logger.warning(msg)
      warnings.warn(msg)
      return []


def make_validator(config, workdir: str) -> Validator | None:
  """A :class:`Validator` for ``config.validation``, or None when it is switched off."""
  if "validation" not in config or not enabled(config.validation):
    return None
  return Validator(config, workdir)
