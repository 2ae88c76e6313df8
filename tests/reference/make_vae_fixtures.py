"""Reference fixtures for the Wan2.1 VAE port (``helios_jax/models/vae.py``), computed with diffusers 0.42.1.

Run (CPU, about a minute; needs torch and diffusers, e.g. the /work/venv environment)::

    /work/venv/bin/python tests/reference/make_vae_fixtures.py

Writes, under ``tests/reference/fixtures/``:

* ``vae_tiny/``: a tiny random-init ``AutoencoderKLWan`` (base_dim 8, z_dim 4, the Wan2.1 block structure) saved
  with ``save_pretrained`` (config.json + diffusion_pytorch_model.safetensors, 3.6 MB), plus ``cases.npz``.
* ``vae_tiny_alt/``: a second tiny model with other structural choices (decoder_base_dim != base_dim, temporal
  downsampling at the first stage, one res block per stage, 4x spatial), same files (1.1 MB of weights).
* ``vae_wan21/``: the real Wan2.1 config (base_dim 96, z_dim 16; 127M parameters). Its ~500 MB of weights are NOT
  written: every tensor is drawn by :func:`synthetic_weight` from a numpy generator seeded with
  ``(WAN21_WEIGHT_SEED, crc32(key))`` and copied into the torch model, so the JAX test rebuilds identical weights
  without torch. Only ``config.json`` and ``cases.npz`` (inputs and outputs) are written.

Random-init parameters that start as constants (RMS-norm gammas = 1, and for the synthetic model all biases) are
perturbed so they are exercised. Every case in ``cases.npz`` is stored as ``<case>.<name>`` arrays:

* encode cases: ``video`` (B, 3, F, H, W) in [-1, 1]; ``mean`` and ``logvar`` of the posterior (logvar clamped as
  diffusers does); ``noise``, the standard-normal draw of ``latent_dist.sample(generator)``; ``sample``.
* decode cases: ``latents`` (B, z, T, h, w); ``video``, the clamped decode (B, 3, 1 + 4 (T - 1), H, W).

Everything is float32 and computed with torch in float32 on CPU, through the public ``encode`` / ``decode`` (the
per-frame cached loop). Nothing here is imported by the package; ``synthetic_weight`` is imported by
``tests/test_vae.py`` (this module only imports torch inside :func:`main`).
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
WAN21_WEIGHT_SEED = 2024

TINY_CONFIG = dict(
    base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, -0.4], latents_std=[1.5, 0.7, 2.0, 1.1])
TINY_ALT_CONFIG = dict(
    base_dim=8, decoder_base_dim=12, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
    temperal_downsample=[True, False], latents_mean=[0.0, 0.0, 0.0, 0.0], latents_std=[1.0, 1.0, 1.0, 1.0],
    scale_factor_temporal=2, scale_factor_spatial=4)
WAN21_CONFIG: dict = {}  # the diffusers defaults are the Wan2.1 VAE


def synthetic_weight(key: str, shape: tuple[int, ...], seed: int = WAN21_WEIGHT_SEED) -> np.ndarray:
  """The deterministic float32 value of diffusers state-dict entry ``key`` (torch layout) for the wan21 fixture.

  Each tensor has its own generator ``np.random.default_rng([seed, crc32(key)])``, so the order in which keys
  are visited does not matter. Conv / linear weights: uniform(+-1/sqrt(fan_in)) (torch's default scale);
  biases: uniform(+-0.1); RMS-norm gammas: 1 + 0.25 * N(0, 1).
  """
  rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
  if key.endswith(".gamma"):
    return (1.0 + 0.25 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
  u = rng.random(shape, dtype=np.float32) * np.float32(2.0) - np.float32(1.0)
  if key.endswith(".bias"):
    return (u * np.float32(0.1)).astype(np.float32)
  fan_in = int(np.prod(shape[1:]))
  return (u * np.float32(1.0 / np.sqrt(fan_in))).astype(np.float32)


def main() -> None:
  import torch
  from diffusers import AutoencoderKLWan

  torch.set_grad_enabled(False)

  def encode_case(model, video, noise_seed):
    x = torch.from_numpy(video)
    dist = model.encode(x).latent_dist
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(noise_seed), dtype=torch.float32)
    sample = dist.sample(generator=torch.Generator().manual_seed(noise_seed))
    torch.testing.assert_close(sample, dist.mean + dist.std * noise, rtol=0, atol=0)
    return dict(video=video, mean=dist.mean.numpy(), logvar=dist.logvar.numpy(), noise=noise.numpy(),
                sample=sample.numpy())

  def decode_case(model, latents):
    return dict(latents=latents, video=model.decode(torch.from_numpy(latents)).sample.numpy())

  def save(folder, cases):
    arrays = {f"{case}.{name}": np.ascontiguousarray(v, dtype=np.float32)
              for case, d in cases.items() for name, v in d.items()}
    np.savez_compressed(os.path.join(folder, "cases.npz"), **arrays)
    for case, d in cases.items():
      out = d.get("sample", d.get("video"))
      print(f"  {case}: " + ", ".join(f"{k}{tuple(v.shape)}" for k, v in d.items())
            + f"; |out| max {np.abs(out).max():.3f}, std {out.std():.3f}, saturated {np.mean(np.abs(out) >= 1):.3f}")

  def perturb_constants(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
      if name.endswith(".gamma"):
        p.copy_(1.0 + 0.25 * torch.randn(p.shape, generator=gen))

  rng = np.random.default_rng(0)

  def video(*shape):
    return rng.uniform(-1.0, 1.0, shape).astype(np.float32)

  def latents(*shape):
    return rng.standard_normal(shape).astype(np.float32)

  # (a) tiny model, saved in diffusers format.
  for name, config, seed in (("vae_tiny", TINY_CONFIG, 1), ("vae_tiny_alt", TINY_ALT_CONFIG, 2)):
    torch.manual_seed(seed)
    model = AutoencoderKLWan(**config).eval()
    perturb_constants(model, seed)
    folder = os.path.join(FIXTURES, name)
    model.save_pretrained(folder, safe_serialization=True)
    print(name, sum(p.numel() for p in model.parameters()), "parameters")
    if name == "vae_tiny":
      cases = {
          "encode_video": encode_case(model, video(2, 3, 11, 32, 24), 10),  # 11 frames: the last 2 are dropped
          "encode_image": encode_case(model, video(1, 3, 1, 32, 32), 11),
          "decode_video": decode_case(model, latents(2, 4, 3, 4, 3)),
          "decode_image": decode_case(model, latents(1, 4, 1, 4, 4)),
          "decode_chunk": decode_case(model, latents(1, 4, 9, 4, 4)),  # 9 latents -> 33 frames
      }
    else:
      cases = {
          "encode_video": encode_case(model, video(1, 3, 9, 16, 12), 12),
          "decode_video": decode_case(model, latents(1, 4, 3, 4, 3)),
      }
    save(folder, cases)

  # (b) the real Wan2.1 config with synthetic weights (not saved: rebuilt from the numpy generator).
  model = AutoencoderKLWan(**WAN21_CONFIG).eval()
  state = {k: torch.from_numpy(synthetic_weight(k, tuple(v.shape))) for k, v in model.state_dict().items()}
  model.load_state_dict(state, strict=True)
  folder = os.path.join(FIXTURES, "vae_wan21")
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
    config = {k: v for k, v in model.config.items() if k != "_use_default_values"}  # a set: random order
    json.dump({"_class_name": "AutoencoderKLWan", **config}, f, indent=2, sort_keys=True)
  print("vae_wan21", sum(p.numel() for p in model.parameters()), "parameters")
  cases = {
      "encode_video": encode_case(model, video(1, 3, 9, 32, 32), 13),
      "decode_video": decode_case(model, latents(1, 16, 3, 4, 4)),
      "decode_chunk": decode_case(model, latents(1, 16, 9, 2, 2)),  # 9 latents -> 33 frames of 16x16
  }
  save(folder, cases)


if __name__ == "__main__":
  main()
