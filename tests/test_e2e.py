"""End-to-end parity with diffusers' ``HeliosPyramidPipeline`` (issue 5, item 5): prompt strings and pixels in,
frames out, every component ours (tokenizer, UMT5, VAE encode, transformer, DMD scheduler, VAE decode).

Fixtures come from ``tests/reference/make_e2e_fixtures.py``: a tiny random Helios-Distilled folder in diffusers format
(transformer, VAE, UMT5 text encoder and the test tokenizer), and for t2v (66 frames, 2 chunks), i2v (CFG 2 with a
negative prompt) and v2v (40-frame video, a prompt that needs ftfy/HTML cleaning) the reference frames of
``output_type="np"`` with every random draw recorded (VAE posterior samples included). We replay the draws through
``noise_source``. No torch here.

Tolerances (fp32 everywhere). Measured on CPU (jax 0.10.2) when written, t2v / i2v / v2v:

* float frames: relative (Frobenius) error <= 1e-4 on the float32 last frame (measured 4.7e-7 / 4.4e-7 / 4.0e-7,
  max abs error 1.3e-6 / 1.5e-6 / 1.2e-6); against the float16-stored first and middle frames <= 5e-4 (measured
  2.1e-4 in each mode, max abs 2.45e-4: that is float16's own rounding of the reference, half a float16 step at
  values in [0.25, 0.5), not our error);
* uint8 frames (``round(255 x)`` on both sides): max abs difference <= 1 and at most 0.1% of the values differing
  (measured max diff 1 with 67 of 1.6M / 45 of 811k / 28 of 811k values differing, i.e. 4.2e-5 / 5.5e-5 / 3.5e-5:
  reference values within ~1e-6 of a rounding edge; all other values identical).

A different prompt with the same draws moves the last frame by 3.1e-3 relative (the tiny random model's frames are
dominated by its VAE and the noise), ~7000x the measured error, so the text path is checked too.
The file runs in 45-60 s on CPU (mostly compilation: t2v ~20 s, i2v ~16 s, v2v ~3 s reusing them).
"""

from __future__ import annotations

import json
import os
import time

import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from helios_jax import HeliosPyramidPipeline
from helios_jax.pipelines import ReplayNoiseSource

FIX = os.path.join(os.path.dirname(__file__), "reference", "fixtures", "e2e")
PIPE_DIR = os.path.join(FIX, "distilled")
MODES = ("t2v", "i2v", "v2v")
F32_RTOL = 1e-4  # relative error, float32 reference frame
F16_RTOL = 5e-4  # relative error against the float16-stored frames (their own rounding is ~2e-4)
UINT8_MAX_DIFF = 1
UINT8_MAX_FRACTION = 1e-3  # fraction of uint8 values that may differ (by at most 1)


@pytest.fixture(scope="module")
def pipe():
  t0 = time.perf_counter()
  p = HeliosPyramidPipeline.from_pretrained(PIPE_DIR, dtype=jnp.float32, vae_dtype=jnp.float32,
                                            text_encoder_dtype=jnp.float32)
  print(f"loaded {PIPE_DIR} in {time.perf_counter() - t0:.1f}s")
  assert p.text_encoder is not None and p.tokenizer is not None and p.vae is not None and p.is_distilled
  return p


def load(mode: str):
  data = dict(np.load(os.path.join(FIX, f"{mode}.npz")))
  call = json.loads(str(data["call_json"]))
  noise = ReplayNoiseSource.from_flat(list(data["draw_kinds"]), json.loads(str(data["draw_shapes"])),
                                      data["draw_values"])
  return data, call, noise


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("mode", MODES)
def test_frames_match_diffusers(pipe, mode, record_property):
  data, call, noise = load(mode)
  kw = dict(call)
  kw["pyramid_num_inference_steps_list"] = tuple(kw["pyramid_num_inference_steps_list"])
  if kw.get("negative_prompt") is None:
    kw.pop("negative_prompt", None)
  if "image" in data:
    kw["image"] = PIL.Image.fromarray(data["image"])
  if "video" in data:
    kw["video"] = data["video"]
  t0 = time.perf_counter()
  frames = pipe(**kw, noise_source=noise, output_type="np", progress=False).frames
  seconds = time.perf_counter() - t0
  assert noise.remaining == 0, f"{noise.remaining} recorded draws were not used"
  ref_u8 = data["frames_uint8"]
  assert frames.shape == ref_u8.shape and frames.dtype == np.float32
  assert np.isfinite(frames).all()

  err_f32 = rel_err(frames[:, -1], data["last_frame_f32"])
  abs_f32 = float(np.abs(frames[:, -1] - data["last_frame_f32"]).max())
  f16 = data["frames_f16"].astype(np.float32)
  picked = frames[:, data["frames_f16_index"]]
  err_f16 = rel_err(picked, f16)
  abs_f16 = float(np.abs(picked - f16).max())
  ours_u8 = np.round(frames * 255.0).astype(np.uint8)
  diff = np.abs(ours_u8.astype(np.int16) - ref_u8.astype(np.int16))
  max_diff, fraction = int(diff.max()), float((diff > 0).mean())
  stats = dict(seconds=round(seconds, 2), frames=int(frames.shape[1]), f32_rel=err_f32, f32_max_abs=abs_f32,
               f16_rel=err_f16, f16_max_abs=abs_f16, uint8_max_diff=max_diff, uint8_diff_fraction=fraction,
               uint8_diff_count=int((diff > 0).sum()))
  for k, v in stats.items():
    record_property(k, v)
  print(f"{mode}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
  assert err_f32 <= F32_RTOL
  assert err_f16 <= F16_RTOL
  assert max_diff <= UINT8_MAX_DIFF and fraction <= UINT8_MAX_FRACTION


def test_prompt_changes_frames(pipe):
  """The comparison above is sensitive to the text path: another prompt with the same draws changes the frames."""
  data, call, noise = load("v2v")
  kw = dict(call, pyramid_num_inference_steps_list=tuple(call["pyramid_num_inference_steps_list"]))
  kw.pop("negative_prompt", None)
  kw["prompt"] = "a dog"
  frames = pipe(**kw, video=data["video"], noise_source=noise, output_type="np", progress=False).frames
  err = rel_err(frames[:, -1], data["last_frame_f32"])
  print(f"v2v with another prompt: f32_rel={err:.3g}")
  assert err > 10 * F32_RTOL  # measured 3.1e-3: a tiny random model, frames dominated by the VAE and the noise
