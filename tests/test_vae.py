"""Parity and behaviour tests of the Wan2.1 VAE (``helios_jax.models.vae``); no torch needed.

References come from diffusers 0.42.1 (``tests/reference/make_vae_fixtures.py``): two tiny random models stored in
diffusers format and the real Wan2.1 config with synthetic weights that are rebuilt here from the same numpy
generator. Errors are relative: ||out - ref|| / ||ref||.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from helios_jax.errors import CheckpointError, InputError
from helios_jax.io.checkpoint import save_safetensors_folder
from helios_jax.models.vae import (NOISE_KIND, AutoencoderKLWan, DiagonalGaussianDistribution, WanVAEConfig,
                                   decode_chunk, denormalize_latents, encode_chunk, normalize_latents)

REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")
FIXTURES = os.path.join(REF, "fixtures")
TOL = 1e-4


def _load_fixture_script():
  spec = importlib.util.spec_from_file_location("make_vae_fixtures", os.path.join(REF, "make_vae_fixtures.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def rel_err(out, ref) -> float:
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  assert out.shape == ref.shape, (out.shape, ref.shape)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _cases(name: str) -> dict[str, dict[str, np.ndarray]]:
  data = np.load(os.path.join(FIXTURES, name, "cases.npz"))
  cases: dict[str, dict[str, np.ndarray]] = {}
  for key in data.files:
    case, field = key.split(".")
    cases.setdefault(case, {})[field] = data[key]
  return cases


@functools.lru_cache(maxsize=None)
def _model(name: str, dtype=jnp.float32) -> AutoencoderKLWan:
  return AutoencoderKLWan.from_pretrained(os.path.join(FIXTURES, name), dtype=dtype)


def _check_encode(model, case, label):
  dist = model.encode(case["video"]).latent_dist
  errs = {
      "mean": rel_err(dist.mean, case["mean"]),
      "logvar": rel_err(dist.logvar, case["logvar"]),
      "std": rel_err(dist.std, np.exp(0.5 * case["logvar"])),
      "sample": rel_err(dist.sample(case["noise"]), case["sample"]),
  }
  print(f"{label}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
  assert max(errs.values()) <= TOL, errs
  np.testing.assert_array_equal(np.asarray(dist.mode()), np.asarray(dist.mean))
  return dist


def _check_decode(model, case, label):
  video = model.decode(case["latents"]).sample
  t = case["latents"].shape[2]
  assert video.shape[2] == model.config.num_frames(t)
  err = rel_err(video, case["video"])
  print(f"{label}: video {tuple(video.shape)} rel err {err:.2e}")
  assert err <= TOL
  assert float(jnp.max(jnp.abs(video))) <= 1.0
  return video


# ------------------------------------------------------------------------------------------------------------
# Parity with diffusers


@pytest.mark.parametrize("case", ["encode_video", "encode_image"])
def test_tiny_encode_parity(case):
  c = _cases("vae_tiny")[case]
  dist = _check_encode(_model("vae_tiny"), c, f"tiny {case}")
  # 11 input frames: the 2 frames that do not complete a group of 4 are dropped -> 3 latents.
  assert dist.mean.shape[2] == 1 + (c["video"].shape[2] - 1) // 4


@pytest.mark.parametrize("case", ["decode_video", "decode_image", "decode_chunk"])
def test_tiny_decode_parity(case):
  _check_decode(_model("vae_tiny"), _cases("vae_tiny")[case], f"tiny {case}")


def test_tiny_alt_parity():
  """decoder_base_dim != base_dim, temporal downsampling at the first stage, 4x spatial, one res block."""
  model = _model("vae_tiny_alt")
  cases = _cases("vae_tiny_alt")
  _check_encode(model, cases["encode_video"], "tiny_alt encode_video")
  _check_decode(model, cases["decode_video"], "tiny_alt decode_video")


@pytest.fixture(scope="module")
def wan21_model() -> AutoencoderKLWan:
  make = _load_fixture_script()
  with open(os.path.join(FIXTURES, "vae_wan21", "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  shapes = AutoencoderKLWan.checkpoint_shapes(config)
  tensors = {k: make.synthetic_weight(k, s) for k, s in shapes.items()}
  return AutoencoderKLWan.from_state_dict(config, tensors)


def test_wan21_decode_chunk_parity(wan21_model):
  """The real config: 9 latents (2x2) -> 33 frames, the shape of a Helios chunk decode."""
  _check_decode(wan21_model, _cases("vae_wan21")["decode_chunk"], "wan21 decode_chunk")


def test_wan21_encode_parity(wan21_model):
  _check_encode(wan21_model, _cases("vae_wan21")["encode_video"], "wan21 encode_video")


def test_wan21_decode_parity(wan21_model):
  _check_decode(wan21_model, _cases("vae_wan21")["decode_video"], "wan21 decode_video")


def test_wan21_checkpoint_layout():
  """The default config is the Wan2.1 VAE: 194 tensors, 126,892,531 parameters, diffusers names."""
  shapes = AutoencoderKLWan.checkpoint_shapes(WanVAEConfig())
  assert len(shapes) == 194
  assert sum(int(np.prod(s)) for s in shapes.values()) == 126_892_531
  assert shapes["encoder.down_blocks.5.time_conv.weight"] == (192, 192, 3, 1, 1)
  assert shapes["encoder.down_blocks.2.resample.1.weight"] == (96, 96, 3, 3)
  assert shapes["decoder.up_blocks.0.upsamplers.0.time_conv.weight"] == (768, 384, 3, 1, 1)
  assert shapes["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"] == (384, 192, 1, 1, 1)
  assert shapes["decoder.mid_block.attentions.0.to_qkv.weight"] == (1152, 384, 1, 1)
  assert shapes["decoder.mid_block.attentions.0.norm.gamma"] == (384, 1, 1)
  assert shapes["decoder.norm_out.gamma"] == (96, 1, 1, 1)
  assert shapes["quant_conv.weight"] == (32, 32, 1, 1, 1)


# ------------------------------------------------------------------------------------------------------------
# Jitted chunk decode, shapes, latent normalisation, posterior sampling


def test_jitted_chunk_decode_equals_eager():
  model = _model("vae_tiny")
  latents = _cases("vae_tiny")["decode_chunk"]["latents"]
  graphdef, state = nnx.split(model)
  jitted = decode_chunk(graphdef, state, jnp.asarray(latents))
  eager = model.decode(latents, jit=False).sample
  assert jitted.shape == (1, 3, 33, 32, 32)
  # Equal up to fp32 rounding: XLA fuses and rewrites (e.g. x / broadcast(n) -> x * (1 / n)) inside one program.
  err = rel_err(jitted, eager)
  print(f"tiny decode_chunk jitted vs eager: rel err {err:.2e}, max abs {float(jnp.max(jnp.abs(jitted - eager))):.2e}")
  assert err <= 1e-5
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=0, atol=3e-5)


def test_decode_chunk_denormalizes():
  model = _model("vae_tiny")
  cfg = model.config
  latents = _cases("vae_tiny")["decode_video"]["latents"]
  z_norm = normalize_latents(latents, cfg.latents_mean, cfg.latents_std)
  graphdef, state = nnx.split(model)
  fused = decode_chunk(graphdef, state, z_norm, jnp.asarray(cfg.latents_mean), jnp.asarray(cfg.latents_std))
  plain = model.decode(denormalize_latents(z_norm, cfg.latents_mean, cfg.latents_std)).sample
  np.testing.assert_allclose(np.asarray(fused), np.asarray(plain), rtol=0, atol=3e-5)


def test_encode_chunk_is_pure():
  model = _model("vae_tiny")
  c = _cases("vae_tiny")["encode_image"]
  graphdef, state = nnx.split(model)
  dist = DiagonalGaussianDistribution(encode_chunk(graphdef, state, c["video"]))
  assert rel_err(dist.mean, c["mean"]) <= TOL


@pytest.mark.parametrize("num_latents", [1, 2, 9])
def test_output_frame_counts_real_config(num_latents):
  """1 + 4 (T - 1) frames and 8x space at the Helios resolution, checked abstractly (no compute)."""
  model = nnx.eval_shape(lambda: AutoencoderKLWan(WanVAEConfig(), rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(functools.partial(decode_chunk, graphdef), state,
                       jax.ShapeDtypeStruct((2, 16, num_latents, 48, 80), jnp.float32))
  assert out.shape == (2, 3, 1 + 4 * (num_latents - 1), 384, 640)
  num_frames = 1 + 4 * (num_latents - 1)
  moments = jax.eval_shape(functools.partial(encode_chunk, graphdef), state,
                           jax.ShapeDtypeStruct((1, 3, num_frames + 3, 64, 96), jnp.float32))
  assert moments.shape == (1, 32, num_latents, 8, 12)


def test_latent_normalisation_matches_pipeline_formula():
  cfg = WanVAEConfig()
  z = np.random.default_rng(0).standard_normal((2, 16, 3, 4, 5)).astype(np.float32)
  mean = np.asarray(cfg.latents_mean, np.float32).reshape(1, 16, 1, 1, 1)
  inv_std = (np.float32(1.0) / np.asarray(cfg.latents_std, np.float32)).reshape(1, 16, 1, 1, 1)
  z_norm = normalize_latents(z, cfg.latents_mean, cfg.latents_std)
  np.testing.assert_array_equal(np.asarray(z_norm), (z - mean) * inv_std)
  back = denormalize_latents(z_norm, cfg.latents_mean, cfg.latents_std)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(z_norm) / inv_std + mean)
  np.testing.assert_allclose(np.asarray(back), z, atol=1e-5)
  with pytest.raises(InputError):
    normalize_latents(z, cfg.latents_mean[:4], cfg.latents_std)


def test_posterior_sampling_noise_injection():
  c = _cases("vae_tiny")["encode_video"]
  params = np.concatenate([c["mean"], c["logvar"]], axis=1)
  dist = DiagonalGaussianDistribution(jnp.asarray(params))
  calls = []

  def noise_source(kind, shape):
    calls.append((kind, shape))
    return c["noise"]

  np.testing.assert_allclose(np.asarray(dist.sample(noise_source=noise_source)), c["sample"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dist.sample(noise_source)), c["sample"], rtol=1e-6, atol=1e-6)
  assert calls == [(NOISE_KIND, c["mean"].shape)] * 2
  drawn = dist.sample(key=jax.random.key(0))
  assert drawn.shape == c["mean"].shape
  with pytest.raises(InputError):
    dist.sample()
  with pytest.raises(InputError):
    dist.sample(c["noise"][:, :2])
  # logvar is clamped to [-30, 20] as in diffusers.
  clamped = DiagonalGaussianDistribution(jnp.concatenate([jnp.zeros((1, 2, 1, 1, 1)),
                                                          jnp.asarray([-50.0, 50.0]).reshape(1, 2, 1, 1, 1)], 1))
  np.testing.assert_array_equal(np.asarray(clamped.logvar).ravel(), [-30.0, 20.0])


def test_bf16_mode_close_to_reference():
  """bf16 params and activations: diffusers in bf16 is itself ~3e-2 away from its fp32 result on this model."""
  model = _model("vae_tiny", jnp.bfloat16)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  c = _cases("vae_tiny")["decode_image"]
  video = model.decode(c["latents"]).sample
  assert video.dtype == jnp.bfloat16
  err = rel_err(video.astype(jnp.float32), c["video"])
  print(f"tiny decode_image bf16 rel err {err:.2e}")
  assert err < 6e-2


# ------------------------------------------------------------------------------------------------------------
# Errors


def test_bad_inputs():
  model = _model("vae_tiny")
  with pytest.raises(InputError, match="channels"):
    model.encode(np.zeros((1, 4, 5, 16, 16), np.float32))
  with pytest.raises(InputError, match="rank"):
    model.encode(np.zeros((3, 5, 16, 16), np.float32))
  with pytest.raises(InputError, match="channels"):
    model.decode(np.zeros((1, 3, 2, 2, 2), np.float32))
  with pytest.raises(InputError, match="rank"):
    model.decode(np.zeros((1, 4, 2, 2, 2, 1), np.float32))
  with pytest.raises(InputError):
    model.decode([[1.0]])


def test_missing_folder(tmp_path):
  with pytest.raises(CheckpointError, match="not found"):
    AutoencoderKLWan.from_pretrained(str(tmp_path / "nope"))


def _copy_tiny(tmp_path, mutate=None, config_update=None):
  src = os.path.join(FIXTURES, "vae_tiny")
  dst = tmp_path / "vae"
  with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  config.update(config_update or {})
  tensors = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
  if mutate:
    mutate(tensors)
  save_safetensors_folder(str(dst), tensors, config)
  return str(dst)


def test_checkpoint_missing_key(tmp_path):
  folder = _copy_tiny(tmp_path, lambda t: t.pop("decoder.mid_block.attentions.0.proj.weight"))
  with pytest.raises(CheckpointError, match=r"missing key.*decoder\.mid_block\.attentions\.0\.proj\.weight"):
    AutoencoderKLWan.from_pretrained(folder)


def test_checkpoint_unexpected_key(tmp_path):
  folder = _copy_tiny(tmp_path, lambda t: t.update({"decoder.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(CheckpointError, match=r"unexpected key.*decoder\.extra\.weight"):
    AutoencoderKLWan.from_pretrained(folder)


def test_checkpoint_wrong_shape(tmp_path):
  folder = _copy_tiny(tmp_path, lambda t: t.update({"quant_conv.bias": np.zeros(7, np.float32)}))
  with pytest.raises(CheckpointError, match=r"quant_conv\.bias.*shape"):
    AutoencoderKLWan.from_pretrained(folder)


def test_checkpoint_missing_weights_and_unsupported_config(tmp_path):
  folder = tmp_path / "cfg_only"
  folder.mkdir()
  shutil.copy(os.path.join(FIXTURES, "vae_tiny", "config.json"), folder / "config.json")
  with pytest.raises(CheckpointError, match="no weights"):
    AutoencoderKLWan.from_pretrained(str(folder))
  with pytest.raises(CheckpointError, match="Wan2.2"):
    AutoencoderKLWan.from_pretrained(_copy_tiny(tmp_path, config_update={"is_residual": True}))


def test_sharded_checkpoint_loads(tmp_path):
  src = os.path.join(FIXTURES, "vae_tiny")
  with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  tensors = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
  save_safetensors_folder(str(tmp_path / "vae"), tensors, config, max_shard_bytes=1 << 20)
  assert os.path.isfile(tmp_path / "vae" / "diffusion_pytorch_model.safetensors.index.json")
  sharded = AutoencoderKLWan.from_pretrained(str(tmp_path / "vae"))
  for a, b in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(_model("vae_tiny")))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
