"""Regenerates the end-to-end parity fixtures (issue 5, item 5) from diffusers 0.42.1 (PyTorch, CPU).

A tiny random Helios-Distilled pipeline is saved in diffusers format with every component, text side included:

* ``transformer/``: the tiny random ``HeliosTransformer3DModel`` of ``make_transformer_fixtures.build("base", 100)``
  (the same weights as ``fixtures/pipeline/distilled``), text_dim 32;
* ``vae/``: ``make_pipeline_fixtures.tiny_vae(7)`` (4 latent channels, random latents_mean/std);
* ``scheduler/``: ``HeliosDMDScheduler(stages=3, use_dynamic_shifting=True, time_shift_type="linear")``;
* ``text_encoder/``: the tiny random ``UMT5EncoderModel`` of ``fixtures/umt5_tiny`` (d_model 32 = the transformer's
  text_dim), copied verbatim (sharded safetensors with an index, as the real checkpoints ship it);
* ``tokenizer/``: the test SentencePiece tokenizer of ``fixtures/umt5_tokenizer`` copied verbatim (spiece.model +
  old-style tokenizer.json + configs, the layout of the Wan/Helios checkpoints);
* ``model_index.json`` written by ``HeliosPyramidPipeline.save_pretrained`` (is_distilled, no CFG-Zero*).

The reference pipeline is then loaded back from that folder with ``HeliosPyramidPipeline.from_pretrained`` (so both
sides read the same files) and run from prompt strings and pixels, 64x128, distilled settings
(``pyramid_num_inference_steps_list=[2, 2, 2]``, ``is_amplify_first_chunk=True``) for

* ``t2v``: 66 frames (2 chunks: history, per-chunk decode and the final 4k+1 trim to 65 frames), no CFG;
* ``i2v``: a 64x128 picture, 33 frames, ``guidance_scale=2.0`` with a negative prompt (diffusers warns that a
  distilled model ignores guidance but still applies CFG, and so do we): exercises the negative-prompt text path;
* ``v2v``: a blocky, noise-free 40-frame 64x128 video (one 33-frame window, the first 7 frames dropped), 33 frames, no CFG, a prompt
  with HTML entities, curly quotes, mojibake and non-ASCII text (exercises ftfy + html unescaping + whitespace
  cleaning).

Every random draw (pipeline noise, block noise, image/video latent noise and the VAE posterior samples of the
image/video encodes) comes from a seeded numpy stream (``make_pipeline_fixtures.Draws`` +
``make_media_fixtures.record_vae``) and is recorded, so the JAX pipeline can replay it.

Files: ``tests/reference/fixtures/e2e/distilled/`` (the pipeline folder) and ``tests/reference/fixtures/e2e/<mode>.npz``
holding the call (``call_json``: prompts and arguments), the input pixels (``image`` (H, W, 3) / ``video``
(F, H, W, 3) uint8), the recorded draws, the reference frames of ``output_type="np"`` rounded to uint8
(``frames_uint8``, (1, F, H, W, 3), ``round(255 x)``), the first and the middle frame in float16 (``frames_f16`` at
``frames_f16_index``) and the last frame in float32 (``last_frame_f32``, to measure float errors below float16's
resolution).

Reference-side patches (minimal; values unchanged):

* diffusers' ``prompt_clean`` calls ``ftfy.fix_text`` unconditionally: ftfy must be installed (this script checks).
* The block-noise Cholesky factor at gamma = 1/3 is CUDA's (``make_pipeline_fixtures.cholesky``, applied by
  ``Draws.patch``), because CPU LAPACK refuses the singular matrix and the reference pipeline runs on CUDA.

Run from the repository root (needs ``pip install -r requirements-reference.txt`` and ftfy)::

    python tests/reference/make_e2e_fixtures.py

It is seeded: re-running re-creates the same numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import PIL.Image
import torch
from diffusers import HeliosDMDScheduler, HeliosPyramidPipeline

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_media_fixtures import record_vae, smooth_image  # noqa: E402
from make_pipeline_fixtures import Draws, tiny_vae  # noqa: E402
from make_transformer_fixtures import build as build_transformer  # noqa: E402

FIXTURES = os.path.join(HERE, "fixtures")
OUT = os.path.join(FIXTURES, "e2e")
PIPE_DIR = os.path.join(OUT, "distilled")
UMT5_DIR = os.path.join(FIXTURES, "umt5_tiny")
TOKENIZER_DIR = os.path.join(FIXTURES, "umt5_tokenizer")
HEIGHT, WIDTH = 64, 128
STEPS = [2, 2, 2]

MODES = {
    "t2v": dict(prompt="A cat sat on the mat, camera pans slowly across the city street at night.",
                negative_prompt=None, guidance_scale=1.0, num_frames=66),
    "i2v": dict(prompt="close-up portrait woman smiling in park sunset, cinematic shot",
                negative_prompt="blurred details, static, worst quality, overall gray, rain",
                guidance_scale=2.0, num_frames=33),
    "v2v": dict(prompt="  Q&amp;A: “drone aerial view” of the  ocean\twaves &lt;crash&gt; — café naïve cafÃ© "
                       "東京の夜景 100%  ",
                negative_prompt=None, guidance_scale=1.0, num_frames=33),
}
VIDEO_FRAMES = 40


def blocky_video(frames: int) -> np.ndarray:
  """(F, H, W, 3) uint8: moving colour gradients sampled on an 8x8-pixel grid, plus a moving red square; no noise,
  so that it compresses well (the noisy test picture of make_media_fixtures is used for the I2V image)."""
  t, y, x = np.meshgrid(np.arange(frames, dtype=np.float32), np.arange(HEIGHT, dtype=np.float32) // 8 * 8,
                        np.arange(WIDTH, dtype=np.float32) // 8 * 8, indexing="ij")
  rgb = np.stack([np.sin(x / 9 + t * 0.25), np.cos(y / 7 - t * 0.15), np.sin((x - y) / 13 + t * 0.1)], -1)
  video = 127.5 + 100 * rgb
  for f in range(frames):
    x0 = 10 + 2 * f
    video[f, 20:36, x0:x0 + 16] = (240, 40, 40)
  return np.clip(np.round(video), 0, 255).astype(np.uint8)


def build_folder():
  """Writes the tiny pipeline folder (see the module docstring)."""
  from transformers import T5TokenizerFast, UMT5EncoderModel

  shutil.rmtree(OUT, ignore_errors=True)
  os.makedirs(OUT)
  text_encoder = UMT5EncoderModel.from_pretrained(UMT5_DIR).eval()
  tokenizer = T5TokenizerFast.from_pretrained(TOKENIZER_DIR)
  assert text_encoder.config.d_model == 32
  transformer = build_transformer("base", seed=100)
  assert transformer.config.text_dim == text_encoder.config.d_model
  pipe = HeliosPyramidPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(seed=7),
                               scheduler=HeliosDMDScheduler(stages=3, use_dynamic_shifting=True,
                                                            time_shift_type="linear"),
                               transformer=transformer, is_cfg_zero_star=False, is_distilled=True)
  pipe.save_pretrained(PIPE_DIR)
  # The text side as the checkpoints ship it: the fixture files verbatim instead of transformers' re-serialisation.
  for name, src in (("text_encoder", UMT5_DIR), ("tokenizer", TOKENIZER_DIR)):
    shutil.rmtree(os.path.join(PIPE_DIR, name))
    shutil.copytree(src, os.path.join(PIPE_DIR, name))


def flat_draws(draws: Draws) -> dict:
  return dict(draw_kinds=np.array([k for k, _ in draws.log]),
              draw_shapes=np.array(json.dumps([list(a.shape) for _, a in draws.log])),
              draw_values=np.concatenate([a.ravel() for _, a in draws.log]))


def main():
  try:
    import ftfy  # noqa: F401  (diffusers' prompt_clean needs it)
  except ImportError:
    sys.exit("ftfy is needed for the reference prompt cleaning: pip install ftfy")
  build_folder()
  pipe = HeliosPyramidPipeline.from_pretrained(PIPE_DIR, torch_dtype=torch.float32)
  pipe.set_progress_bar_config(disable=True)
  rng = np.random.default_rng(55)
  image = smooth_image(rng, HEIGHT, WIDTH)
  video = blocky_video(VIDEO_FRAMES)
  summary = {}
  for mi, (mode, spec) in enumerate(MODES.items()):
    call = dict(spec, height=HEIGHT, width=WIDTH, pyramid_num_inference_steps_list=STEPS,
                is_amplify_first_chunk=True)
    extra, record = {}, {}
    if mode == "i2v":
      extra["image"] = PIL.Image.fromarray(image)
      record["image"] = image
    elif mode == "v2v":
      extra["video"] = [PIL.Image.fromarray(f) for f in video]
      record["video"] = video
    draws = Draws(seed=3000 + mi)
    with torch.no_grad(), draws.patch(), record_vae(draws):
      frames = pipe(output_type="np", **call, **extra).frames
    frames = np.asarray(frames, np.float32)
    assert frames.ndim == 5 and frames.shape[0] == 1 and frames.shape[-1] == 3, frames.shape
    num = frames.shape[1]
    f16_index = np.array([0, num // 2], np.int32)  # the last frame is stored in float32
    record.update(call_json=np.array(json.dumps(call, ensure_ascii=False)),
                  frames_uint8=np.round(frames * 255.0).astype(np.uint8),
                  frames_f16=frames[:, f16_index].astype(np.float16), frames_f16_index=f16_index,
                  last_frame_f32=frames[:, -1], **flat_draws(draws))
    path = os.path.join(OUT, f"{mode}.npz")
    np.savez_compressed(path, **record)
    summary[mode] = dict(frames=num, draws=len(draws.log), mean=float(frames.mean()), std=float(frames.std()),
                         size_kb=round(os.path.getsize(path) / 1024))
    print(mode, summary[mode])
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
  print(f"wrote {OUT}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
  main()
