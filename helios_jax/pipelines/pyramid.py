"""HeliosPyramidPipeline: chunked autoregressive sampling with the Pyramid Unified Predictor-Corrector.

Each 9-latent chunk starts from noise at 1/4 resolution (two per-frame 2x2 block means, x2 each), runs stage 0,
then for every later stage is upsampled (nearest x2) and re-noised with 2x2 block noise (``alpha x + beta n``)
before its steps. Helios-Mid uses UniPC with CFG-Zero*; Helios-Distilled the DMD scheduler without CFG (and twice
the steps on the first chunk with ``is_amplify_first_chunk``). Keyword names follow diffusers' ``__call__``.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from helios_jax.errors import InputError
from helios_jax.pipelines.base import (COMMON_CALL_ARGS, IMAGE_NOISE_SIGMA, VIDEO_NOISE_SIGMA,
                                       HeliosPipelineBase)
from helios_jax.pipelines.denoise import StageSpec, run_stage
from helios_jax.pipelines.prompts import OFFICIAL_INTERPOLATION_STEPS, PromptSchedule
from helios_jax.pipelines.history import block_noise_cholesky, downsample_2x
from helios_jax.pipelines.noise import NoiseSource, draw


class HeliosPyramidPipeline(HeliosPipelineBase):
  """Helios-Mid / Helios-Distilled sampler. Build from components or with :meth:`from_pretrained`."""

  _class_names = ("HeliosPyramidPipeline", "HeliosPipeline")

  def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
               height: int = 384, width: int = 640, num_frames: int | None = 132, guidance_scale: float = 5.0,
               prompt_embeds=None, negative_prompt_embeds=None, output_type: str = "np",
               max_sequence_length: int = 512, image=None, image_latents=None, fake_image_latents=None,
               add_noise_to_image_latents: bool = True, image_noise_sigma_min: float = IMAGE_NOISE_SIGMA[0],
               image_noise_sigma_max: float = IMAGE_NOISE_SIGMA[1], video=None, video_latents=None,
               add_noise_to_video_latents: bool = True, video_noise_sigma_min: float = VIDEO_NOISE_SIGMA[0],
               video_noise_sigma_max: float = VIDEO_NOISE_SIGMA[1], history_sizes: Sequence[int] = (16, 2, 1),
               num_latent_frames_per_chunk: int = 9, keep_first_frame: bool = True,
               is_skip_first_chunk: bool = False, pyramid_num_inference_steps_list: Sequence[int] = (10, 10, 10),
               use_zero_init: bool = True, zero_steps: int = 1, is_amplify_first_chunk: bool = False,
               seed: int = 0, noise_source: NoiseSource | None = None, progress: bool = True,
               prompt_schedule: PromptSchedule | None = None, interpolation_steps: int = OFFICIAL_INTERPOLATION_STEPS,
               step_progress=None, return_dict: bool = True, _stream: dict | None = None):
    """Generates ``num_frames`` frames (rounded up to whole 33-frame chunks, then trimmed to 4k+1).

    Mode follows the inputs: T2V (no image/video), I2V (``image`` or ``image_latents`` + ``fake_image_latents``),
    V2V (``video`` or ``image_latents`` + ``video_latents``). ``noise_source(kind, shape)`` receives every random
    draw (default: ``jax.random`` from ``seed``). ``prompt_schedule``: prompts that change from chunk to chunk
    (:class:`~helios_jax.pipelines.prompts.PromptSchedule`, instead of ``prompt``). ``step_progress(step,
    num_steps)``: called after every denoising step of every stage (a host callback compiled into the stage: use it
    where a chunk takes seconds, e.g. on a CPU). Returns :class:`HeliosPipelineOutput` (``.frames``).
    """
    common = {k: v for k, v in locals().items() if k in COMMON_CALL_ARGS}
    steps = [int(s) for s in pyramid_num_inference_steps_list]
    if not steps or min(steps) < 1:
      raise InputError(f"pyramid_num_inference_steps_list needs >= 1 step per stage, got {list(steps)}")
    num_stages = len(steps)
    if num_stages != self.scheduler.config.stages:
      raise InputError(f"{num_stages} pyramid stages requested, the scheduler has {self.scheduler.config.stages}")
    if getattr(self.scheduler.config, "scheduler_type", "dmd") == "dmd" and not self.is_distilled:
      raise InputError("a DMD scheduler needs a distilled pipeline (is_distilled in model_index.json)")
    gamma = self.scheduler.config.gamma
    lower = block_noise_cholesky(gamma)
    patch = self.transformer.config.patch_size
    graphdef, params = self._transformer_split()

    def chunk_fn(*, k, x, history, indices, prompt_embeds, negative_prompt_embeds, guidance_scale, noise_source,
                 do_cfg):
      for _ in range(num_stages - 1):
        x = downsample_2x(x)
      amplify = bool(is_amplify_first_chunk and self.is_distilled and k == 0)
      for i in range(num_stages):
        # mu from the latent as it is *before* this stage's upsample (diffusers; pitfall 10).
        seq_len = x.shape[2] * x.shape[3] * x.shape[4] // int(np.prod(patch))
        tables = self.scheduler.set_timesteps(steps[i], stage_index=i, mu=self.scheduler.calculate_shift(seq_len),
                                              is_amplify_first_chunk=amplify)
        block_noise = renoise = None
        if i > 0:
          b, c, t, hh, ww = x.shape
          block_noise = draw(noise_source, "normal", (b * c * t * hh * ww, 4))  # (2h/2)*(2w/2) blocks
          alpha, beta = self.scheduler.renoise_coefficients(i)
          renoise = jnp.asarray(np.concatenate([[alpha, beta], lower.ravel()]).astype(np.float32))
        spec = StageSpec(scheduler_kind=tables.kind, upsample=i > 0, do_cfg=do_cfg,
                         cfg_zero_star=self.is_cfg_zero_star and do_cfg,
                         zero_init=bool(use_zero_init and i == 0), zero_steps=int(zero_steps),
                         integer_timesteps=True, report_steps=step_progress is not None)
        x = run_stage(graphdef, params, spec, x, tables.to_jax(), history, indices, prompt_embeds,
                      negative_prompt_embeds, jnp.float32(guidance_scale), block_noise, renoise)
      return x

    amplified = lambda k: is_amplify_first_chunk and self.is_distilled and k == 0
    out = self._generate(**common, num_stages=num_stages, chunk_fn=chunk_fn,
                         steps_per_chunk=lambda k: sum(steps) * (2 if amplified(k) else 1), stream=_stream)
    if _stream is not None:
      return out
    return out if return_dict else (out.frames,)
