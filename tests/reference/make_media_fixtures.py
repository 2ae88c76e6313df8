"""Regenerates ``tests/reference/fixtures/media.npz`` from diffusers 0.42.1 (PyTorch, CPU).

Records, for small images and videos made here from a seeded generator:

* ``VideoProcessor(vae_scale_factor=8).preprocess`` / ``preprocess_video`` outputs (what the Helios pipelines call
  with ``height`` and ``width``): PIL images (Lanczos resize), float arrays in [0, 1] (nearest resize), a float
  array already in [-1, 1], a list of PIL frames and a float (F, H, W, 3) video;
* ``HeliosPyramidPipeline.prepare_image_latents`` / ``prepare_video_latents`` with the tiny VAE of the pipeline
  fixture folder ``fixtures/pipeline/distilled`` (64x128 pixels; the VAE posterior draws are recorded);
* a whole I2V and a whole V2V call of that tiny distilled pipeline from pixels (image / 70-frame video, one chunk,
  ``output_type="latent"``), with every random draw recorded (VAE posterior draws included) so the JAX pipeline can
  replay them.

Run (needs ``pip install -r requirements-reference.txt``)::

    python tests/reference/make_media_fixtures.py
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import numpy as np
import PIL.Image
import torch
from diffusers import HeliosPyramidPipeline
from diffusers.models.autoencoders import vae as diffusers_vae
from diffusers.video_processor import VideoProcessor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_pipeline_fixtures import Draws  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures", "media.npz")
PIPE = os.path.join(HERE, "fixtures", "pipeline", "distilled")
HEIGHT, WIDTH = 64, 128


def smooth_image(rng, h, w, frames=None):
  """uint8 test picture: smooth gradients plus a little noise (so resampling filters have something to do)."""
  n = 1 if frames is None else frames
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  out = []
  for t in range(n):
    base = np.stack([np.sin(x / 5 + t * 0.3), np.cos(y / 4 - t * 0.2), np.sin((x + y) / 7 + t * 0.1)], -1)
    img = 127.5 + 100 * base + rng.normal(0, 12, (h, w, 3))
    out.append(np.clip(np.round(img), 0, 255).astype(np.uint8))
  return out[0] if frames is None else np.stack(out)


@contextlib.contextmanager
def record_vae(draws: Draws):
  """Routes the VAE posterior's ``randn_tensor`` through ``draws`` too."""
  saved = diffusers_vae.randn_tensor

  def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
    t = draws.draw("normal", shape)
    return t.to(dtype) if dtype is not None else t

  diffusers_vae.randn_tensor = randn_tensor
  try:
    yield
  finally:
    diffusers_vae.randn_tensor = saved


def flat(draws: Draws, prefix: str) -> dict:
  return {f"{prefix}_draw_kinds": np.array([k for k, _ in draws.log]),
          f"{prefix}_draw_shapes": np.array(json.dumps([list(a.shape) for _, a in draws.log])),
          f"{prefix}_draw_values": np.concatenate([a.ravel() for _, a in draws.log])}


def main():
  rng = np.random.default_rng(31)
  vp = VideoProcessor(vae_scale_factor=8)
  rec = {}

  # -- preprocessing --------------------------------------------------------------------------------------------
  img_up = smooth_image(rng, 37, 53)      # upscaled to 48x80
  img_down = smooth_image(rng, 70, 90)    # downscaled to 32x64
  rec["img_up"], rec["img_down"] = img_up, img_down
  rec["pre_pil_up"] = vp.preprocess(PIL.Image.fromarray(img_up), height=48, width=80).numpy()
  rec["pre_pil_down"] = vp.preprocess(PIL.Image.fromarray(img_down), height=32, width=64).numpy()
  f_up = (img_up.astype(np.float32) / 255.0)
  f_down = (img_down.astype(np.float32) / 255.0)
  rec["pre_float_up"] = vp.preprocess(f_up, height=48, width=80).numpy()
  rec["pre_float_down"] = vp.preprocess(f_down, height=32, width=64).numpy()
  rec["pre_float_odd"] = vp.preprocess(f_up, height=41, width=77).numpy()  # non-integer ratios
  signed = f_down * 2.0 - 1.0
  rec["pre_signed"] = vp.preprocess(signed, height=32, width=64).numpy()
  vid = smooth_image(rng, 30, 50, frames=9)
  rec["vid"] = vid
  rec["pre_vid_pil"] = vp.preprocess_video([PIL.Image.fromarray(f) for f in vid], height=32, width=64).numpy()
  rec["pre_vid_float"] = vp.preprocess_video(vid.astype(np.float32) / 255.0, height=32, width=64).numpy()

  # -- VAE encodes of the tiny distilled pipeline -----------------------------------------------------------------
  pipe = HeliosPyramidPipeline.from_pretrained(PIPE, text_encoder=None, tokenizer=None)
  pipe.set_progress_bar_config(disable=True)
  vae = pipe.vae
  mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(vae.dtype)
  inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(vae.dtype)

  i2v_img = smooth_image(rng, 50, 90)
  rec["i2v_image"] = i2v_img
  draws = Draws(seed=5)
  with torch.no_grad(), draws.patch(), record_vae(draws):
    image = pipe.video_processor.preprocess(PIL.Image.fromarray(i2v_img), height=HEIGHT, width=WIDTH)
    il, fl = pipe.prepare_image_latents(image, mean, inv_std, 9, dtype=torch.float32, device="cpu",
                                        generator=None)
  rec["prep_image_latents"], rec["prep_fake_image_latents"] = il.numpy(), fl.numpy()
  rec.update(flat(draws, "prep_i2v"))

  v2v_vid = smooth_image(rng, 48, 80, frames=70)  # 70 frames: 2 windows of 33, the first 4 frames dropped
  rec["v2v_video"] = v2v_vid
  draws = Draws(seed=6)
  with torch.no_grad(), draws.patch(), record_vae(draws):
    video = pipe.video_processor.preprocess_video([PIL.Image.fromarray(f) for f in v2v_vid], height=HEIGHT,
                                                  width=WIDTH)
    first, vl = pipe.prepare_video_latents(video, mean, inv_std, 9, dtype=torch.float32, device="cpu",
                                           generator=None)
  rec["prep_first_latents"], rec["prep_video_latents"] = first.numpy(), vl.numpy()
  rec.update(flat(draws, "prep_v2v"))

  # -- whole pipeline calls from pixels ---------------------------------------------------------------------------
  text_dim = pipe.transformer.config.text_dim
  prompt_embeds = rng.standard_normal((1, 16, text_dim)).astype(np.float32)
  rec["prompt_embeds"] = prompt_embeds
  call = dict(prompt_embeds=torch.from_numpy(prompt_embeds), height=HEIGHT, width=WIDTH, num_frames=33,
              guidance_scale=1.0, pyramid_num_inference_steps_list=[2, 2, 2], is_amplify_first_chunk=True,
              output_type="latent")
  for mode, extra in (("i2v", dict(image=PIL.Image.fromarray(i2v_img))),
                      ("v2v", dict(video=[PIL.Image.fromarray(f) for f in v2v_vid]))):
    draws = Draws(seed=7 if mode == "i2v" else 8)
    with torch.no_grad(), draws.patch(), record_vae(draws):
      latents = pipe(**call, **extra).frames
    rec[f"{mode}_latents"] = latents.float().numpy()
    rec.update(flat(draws, mode))
    print(mode, "draws", len(draws.log), "latents", tuple(latents.shape))

  np.savez_compressed(OUT, **rec)
  print("wrote", OUT, f"{os.path.getsize(OUT) / 1e6:.2f} MB")


if __name__ == "__main__":
  main()
