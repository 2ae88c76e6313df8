"""HeliosPipeline: chunked autoregressive sampling at full resolution (Helios-Base).

Each chunk runs ``num_inference_steps`` UniPC steps on the sigma grid ``linspace(0.999, 0, n+1)[:-1]`` with one
dynamic-shift ``mu`` from the full-resolution token count, and plain CFG (float timesteps, as diffusers feeds them).
The official unified pipeline also applies CFG-Zero* here when the folder's ``is_cfg_zero_star`` is set; so do we.
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
from helios_jax.pipelines.noise import NoiseSource


class HeliosPipeline(HeliosPipelineBase):
  """Helios-Base sampler. Build from components or with :meth:`from_pretrained`."""

  _class_names = ("HeliosPipeline",)

  def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
               height: int = 384, width: int = 640, num_frames: int | None = 132, num_inference_steps: int = 50,
               sigmas: Sequence[float] | None = None, guidance_scale: float = 5.0, prompt_embeds=None,
               negative_prompt_embeds=None, output_type: str = "np", max_sequence_length: int = 512, image=None,
               image_latents=None, fake_image_latents=None, add_noise_to_image_latents: bool = True,
               image_noise_sigma_min: float = IMAGE_NOISE_SIGMA[0], image_noise_sigma_max: float = IMAGE_NOISE_SIGMA[1],
               video=None, video_latents=None, add_noise_to_video_latents: bool = True,
               video_noise_sigma_min: float = VIDEO_NOISE_SIGMA[0], video_noise_sigma_max: float = VIDEO_NOISE_SIGMA[1],
               history_sizes: Sequence[int] = (16, 2, 1), num_latent_frames_per_chunk: int = 9,
               keep_first_frame: bool = True, is_skip_first_chunk: bool = False, use_zero_init: bool = True,
               zero_steps: int = 1, seed: int = 0, noise_source: NoiseSource | None = None, progress: bool = True,
               prompt_schedule: PromptSchedule | None = None, interpolation_steps: int = OFFICIAL_INTERPOLATION_STEPS,
               step_progress=None, return_dict: bool = True, _stream: dict | None = None):
    """Generates ``num_frames`` frames; arguments as :class:`HeliosPyramidPipeline` minus the pyramid ones."""
    common = {k: v for k, v in locals().items() if k in COMMON_CALL_ARGS}
    if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
      raise InputError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    if self.scheduler.config.stages != 1:
      raise InputError(f"HeliosPipeline needs a one-stage scheduler (stages=1), this one has "
                       f"{self.scheduler.config.stages}: use HeliosPyramidPipeline")
    patch = self.transformer.config.patch_size
    spatial = self.vae_scale_spatial
    seq_len = (num_latent_frames_per_chunk * (height // spatial) * (width // spatial)) // int(np.prod(patch))
    grid = np.linspace(0.999, 0.0, num_inference_steps + 1)[:-1] if sigmas is None else np.asarray(sigmas)
    mu = self.scheduler.calculate_shift(seq_len) if self.scheduler.config.use_dynamic_shifting else None
    graphdef, params = self._transformer_split()

    def chunk_fn(*, k, x, history, indices, prompt_embeds, negative_prompt_embeds, guidance_scale, noise_source,
                 do_cfg):
      tables = self.scheduler.set_timesteps(num_inference_steps, sigmas=grid, mu=mu)
      spec = StageSpec(scheduler_kind=tables.kind, upsample=False, do_cfg=do_cfg,
                       cfg_zero_star=self.is_cfg_zero_star and do_cfg, zero_init=bool(use_zero_init),
                       zero_steps=int(zero_steps), integer_timesteps=False,
                       report_steps=step_progress is not None)
      return run_stage(graphdef, params, spec, x, tables.to_jax(), history, indices, prompt_embeds,
                       negative_prompt_embeds, jnp.float32(guidance_scale))

    out = self._generate(**common, num_stages=1, chunk_fn=chunk_fn, steps_per_chunk=lambda k: num_inference_steps,
                         stream=_stream)
    if _stream is not None:
      return out
    return out if return_dict else (out.frames,)
