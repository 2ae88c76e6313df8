"""Regenerates the pipeline parity fixtures from diffusers 0.42.1 (PyTorch, CPU).

For each setting (Base = HeliosPipeline + UniPC, 50 steps, CFG 5; Mid = HeliosPyramidPipeline + UniPC [20, 20, 20],
CFG-Zero* 5 with zero-init; Distilled = HeliosPyramidPipeline + DMD [2, 2, 2], no CFG, amplified first chunk) and
each mode (t2v; i2v with image latents given; v2v with video latents given) it runs the reference pipeline on tiny
random models for 99 frames (3 chunks of 33) at 64x128 pixels and records:

* every random draw the pipeline makes (kind "normal"/"uniform", shape, values) in call order. The draws come from
  a seeded numpy generator that replaces torch's during the call, so a JAX ``noise_source`` can replay them;
* the latent output (``output_type="latent"``: the last ``total_generated`` history frames) and, replaying the same
  draws, the decoded frames (``output_type="np"``), so the end-to-end test can use them too.

Files: ``tests/reference/fixtures/pipeline/<setting>/`` (a diffusers pipeline folder: model_index.json, scheduler/,
transformer/, vae/; no text encoder) and ``tests/reference/fixtures/pipeline/<setting>_<mode>.npz``.

Run (needs ``pip install -r requirements-reference.txt``)::

    python tests/reference/make_pipeline_fixtures.py
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys

import numpy as np
import torch
from diffusers import (AutoencoderKLWan, HeliosDMDScheduler, HeliosPipeline, HeliosPyramidPipeline, HeliosScheduler)
from diffusers.pipelines.helios import pipeline_helios, pipeline_helios_pyramid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_transformer_fixtures import build as build_transformer  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "pipeline")
HEIGHT, WIDTH, NUM_FRAMES = 64, 128, 99
Z = 4  # latent channels of the tiny models

SETTINGS = {
    "base": dict(pipeline=HeliosPipeline, scheduler=lambda: HeliosScheduler(
        stages=1, use_dynamic_shifting=True, time_shift_type="exponential", scheduler_type="unipc"),
                 flags={}, call=dict(num_inference_steps=50, guidance_scale=5.0)),
    "mid": dict(pipeline=HeliosPyramidPipeline, scheduler=lambda: HeliosScheduler(
        stages=3, use_dynamic_shifting=True, time_shift_type="exponential", scheduler_type="unipc"),
                flags=dict(is_cfg_zero_star=True, is_distilled=False),
                call=dict(pyramid_num_inference_steps_list=[20, 20, 20], guidance_scale=5.0, use_zero_init=True,
                          zero_steps=1)),
    "distilled": dict(pipeline=HeliosPyramidPipeline, scheduler=lambda: HeliosDMDScheduler(
        stages=3, use_dynamic_shifting=True, time_shift_type="linear"),
                      flags=dict(is_cfg_zero_star=False, is_distilled=True),
                      call=dict(pyramid_num_inference_steps_list=[2, 2, 2], guidance_scale=1.0,
                                is_amplify_first_chunk=True)),
}


def tiny_vae(seed: int) -> AutoencoderKLWan:
  torch.manual_seed(seed)
  rng = np.random.default_rng(seed)
  vae = AutoencoderKLWan(base_dim=8, z_dim=Z, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                         temperal_downsample=[False, True, True], dropout=0.0,
                         latents_mean=[float(v) for v in rng.normal(0, 0.5, Z)],
                         latents_std=[float(v) for v in rng.uniform(0.5, 2.0, Z)]).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in vae.named_parameters():
      if name.endswith("gamma"):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
  return vae


# The block-noise covariance at gamma = 1/3 is singular: CPU LAPACK's float32 Cholesky refuses it, CUDA's returns
# this factor (H100, torch 2.11; inference-spec section 3.5). The reference pipeline runs on CUDA, so we use it here.
CUDA_BLOCK_NOISE_L = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                                   [-0.33333334, 0.94280899, 0.0, 0.0],
                                   [-0.33333334, -0.47140449, 0.81649655, 0.0],
                                   [-0.33333334, -0.47140449, -0.81649649, 4.0744789e-4]], dtype=torch.float32)
_cholesky = torch.linalg.cholesky


def cholesky(a, *args, **kwargs):
  if a.shape == (4, 4) and torch.allclose(a[0, 1], torch.tensor(-1 / 3)):
    return CUDA_BLOCK_NOISE_L.clone()
  return _cholesky(a, *args, **kwargs)


class Draws:
  """Replaces torch's random draws with a seeded numpy stream (recording) or a recorded list (replaying)."""

  def __init__(self, seed=0, replay=None):
    self.rng = np.random.default_rng(seed)
    self.replay = list(replay) if replay is not None else None
    self.log = []

  def draw(self, kind, shape):
    shape = tuple(int(s) for s in shape)
    if self.replay is not None:
      k, arr = self.replay.pop(0)
      assert k == kind and arr.shape == shape, (k, kind, arr.shape, shape)
    else:
      arr = (self.rng.standard_normal(shape) if kind == "normal" else self.rng.random(shape)).astype(np.float32)
    self.log.append((kind, arr))
    return torch.from_numpy(arr.copy())

  @contextlib.contextmanager
  def patch(self):
    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
      t = self.draw("normal", shape)
      return t.to(dtype) if dtype is not None else t

    def rand(*shape, generator=None, device=None, dtype=None, **kw):
      shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
      return self.draw("uniform", shape)

    def randn(*shape, generator=None, device=None, dtype=None, **kw):
      shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
      return self.draw("normal", shape)

    saved = (pipeline_helios.randn_tensor, pipeline_helios_pyramid.randn_tensor, torch.rand, torch.randn,
             torch.linalg.cholesky)
    pipeline_helios.randn_tensor = pipeline_helios_pyramid.randn_tensor = randn_tensor
    torch.rand, torch.randn = rand, randn
    torch.linalg.cholesky = cholesky
    try:
      yield self
    finally:
      (pipeline_helios.randn_tensor, pipeline_helios_pyramid.randn_tensor, torch.rand, torch.randn,
       torch.linalg.cholesky) = saved


def mode_inputs(mode: str, rng):
  h, w = HEIGHT // 8, WIDTH // 8
  out = {}
  if mode == "i2v":
    out["image_latents"] = rng.standard_normal((1, Z, 1, h, w)).astype(np.float32)
    out["fake_image_latents"] = rng.standard_normal((1, Z, 1, h, w)).astype(np.float32)
  elif mode == "v2v":
    out["image_latents"] = rng.standard_normal((1, Z, 1, h, w)).astype(np.float32)
    # With video latents given, the reference's image-noise block would also try to noise a fake image latent that
    # V2V does not have; with a real video that block is skipped (image_latents is still None there). Match that.
    out["add_noise_to_image_latents"] = np.array(False)
    out["video_latents"] = rng.standard_normal((1, Z, 18, h, w)).astype(np.float32)
  return out


def main():
  if os.path.isdir(OUT):
    shutil.rmtree(OUT)
  os.makedirs(OUT)
  transformer = build_transformer("base", seed=100)
  # diffusers' CFG-Zero* branch calls .view() on the transformer output, which the unpatchify permute can leave
  # non-contiguous (it raises for these tiny shapes). Making the output contiguous changes no value.
  transformer.register_forward_hook(
      lambda module, args, out: tuple(o.contiguous() for o in out) if isinstance(out, tuple) else out)
  vae = tiny_vae(seed=7)
  rng = np.random.default_rng(2024)
  text_dim = transformer.config.text_dim
  prompt_embeds = rng.standard_normal((1, 16, text_dim)).astype(np.float32)
  negative_prompt_embeds = rng.standard_normal((1, 16, text_dim)).astype(np.float32)
  manifest = {}
  for si, (setting, spec) in enumerate(SETTINGS.items()):
    pipe = spec["pipeline"](tokenizer=None, text_encoder=None, vae=vae, scheduler=spec["scheduler"](),
                            transformer=transformer, **spec["flags"])
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(os.path.join(OUT, setting))
    for mi, mode in enumerate(("t2v", "i2v", "v2v")):
      inputs = mode_inputs(mode, rng)
      kwargs = dict(prompt_embeds=torch.from_numpy(prompt_embeds),
                    negative_prompt_embeds=torch.from_numpy(negative_prompt_embeds),
                    height=HEIGHT, width=WIDTH, num_frames=NUM_FRAMES, **spec["call"],
                    **{k: (torch.from_numpy(v) if v.ndim else bool(v)) for k, v in inputs.items()})
      draws = Draws(seed=1000 + 10 * si + mi)
      with torch.no_grad(), draws.patch():
        latents = pipe(output_type="latent", **kwargs).frames
      extra = {}
      if setting == "distilled":  # decoded frames for the end-to-end test: uint8, plus float16 of the first 9
        replay = Draws(replay=draws.log)
        with torch.no_grad(), replay.patch():
          frames = pipe(output_type="np", **kwargs).frames
        assert not replay.replay, "the np run drew fewer numbers than the latent run"
        frames = np.asarray(frames, np.float32)
        extra["frames_uint8"] = np.round(frames * 255.0).astype(np.uint8)
        extra["frames_head_f16"] = frames[:, :9].astype(np.float16)
      record = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, **inputs,
                    latents=latents.float().numpy(), **extra,
                    draw_kinds=np.array([k for k, _ in draws.log]),
                    draw_shapes=np.array(json.dumps([list(a.shape) for _, a in draws.log])),
                    draw_values=np.concatenate([a.ravel() for _, a in draws.log]))
      np.savez_compressed(os.path.join(OUT, f"{setting}_{mode}.npz"), **record)
      manifest[f"{setting}_{mode}"] = dict(setting=setting, mode=mode, draws=len(draws.log),
                                           call={k: v for k, v in spec["call"].items()},
                                           height=HEIGHT, width=WIDTH, num_frames=NUM_FRAMES)
      print(setting, mode, "draws", len(draws.log), "latents", tuple(latents.shape))
  with open(os.path.join(OUT, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)


if __name__ == "__main__":
  main()
