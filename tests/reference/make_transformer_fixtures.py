"""Regenerates the HeliosTransformer3DModel parity fixtures from diffusers 0.42.1 (PyTorch, CPU).

What it writes (all under ``tests/reference/fixtures/transformer/``):

* ``models/<variant>/`` -- tiny random-initialised diffusers checkpoints (``config.json`` + safetensors), one per
  config flag combination. Parameters that diffusers initialises as constants (RMSNorm / LayerNorm weights and biases,
  ``history_key_scale``) are perturbed so they are exercised. ``base`` is saved sharded (index + 3 shards);
  ``base_bf16`` is the same weights stored in bfloat16 (sharded too).
* ``cases/<case>.npz`` -- fixed random inputs in diffusers' layout and the reference output (``out``), computed in
  float32; ``out_bf16`` too for the bf16 case (model loaded with ``torch_dtype=torch.bfloat16``).
* ``manifest.json`` -- which model each case uses.

Run (needs ``pip install -r requirements-reference.txt``)::

    python tests/reference/make_transformer_fixtures.py

It is seeded: re-running re-creates the same files (up to safetensors' metadata).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
from diffusers import HeliosTransformer3DModel

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "transformer")

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_dim=(4, 6, 6), rope_theta=10000.0,
            guidance_cross_attn=True, zero_history_timestep=True, has_multi_term_memory_patch=True,
            is_amplify_history=False, history_scale_mode="per_head")

VARIANTS = {
    "base": {},
    "amplify_per_head": dict(is_amplify_history=True, history_scale_mode="per_head"),
    "amplify_scalar": dict(is_amplify_history=True, history_scale_mode="scalar"),
    "no_guidance_cross_attn": dict(guidance_cross_attn=False),
    "no_zero_history_timestep": dict(zero_history_timestep=False),
    "no_cross_attn_norm": dict(cross_attn_norm=False),
    "no_memory_patch": dict(has_multi_term_memory_patch=False),
}


def build(variant: str, seed: int) -> HeliosTransformer3DModel:
  torch.manual_seed(seed)
  model = HeliosTransformer3DModel(**{**TINY, **VARIANTS[variant]}).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("norm_q.weight", "norm_k.weight", "norm2.weight")):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith("norm2.bias") or name.endswith("history_key_scale"):
        p.copy_(0.5 * torch.randn(p.shape, generator=gen))
      elif name.endswith(".bias"):  # default bias init is tiny; make biases matter
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
  return model


def history(rng, b, c, h, w, t_short=2, t_mid=2, t_long=16):
  return dict(
      latents_history_short=rng.standard_normal((b, c, t_short, h, w)).astype(np.float32),
      latents_history_mid=rng.standard_normal((b, c, t_mid, h, w)).astype(np.float32),
      latents_history_long=rng.standard_normal((b, c, t_long, h, w)).astype(np.float32),
  )


# keep_first_frame indices the pipelines use: prefix 0 | long 1..16 | mid 17,18 | 1x 19 | noisy 20..28
KFF = dict(indices_latents_history_short=np.array([[0, 19]]), indices_latents_history_mid=np.array([[17, 18]]),
           indices_latents_history_long=np.arange(1, 17)[None])


def cases(rng):
  c = TINY["in_channels"]
  text = lambda b, s=7: rng.standard_normal((b, s, TINY["text_dim"])).astype(np.float32)
  noisy = lambda b, t, h, w: rng.standard_normal((b, c, t, h, w)).astype(np.float32)
  out = {}
  out["no_history"] = ("base", dict(hidden_states=noisy(1, 3, 8, 12), timestep=np.array([731.5], np.float32),
                                    encoder_hidden_states=text(1)))
  out["no_history_default_indices"] = ("base", dict(hidden_states=noisy(1, 2, 4, 6),
                                                    timestep=np.array([12], np.int64), encoder_hidden_states=text(1)))
  full = dict(hidden_states=noisy(1, 9, 16, 16), timestep=np.array([998], np.int64), encoder_hidden_states=text(1),
              indices_hidden_states=np.arange(20, 29)[None], **history(rng, 1, c, 16, 16), **KFF)
  out["full_history"] = ("base", full)
  # Pyramid stage 0: the noisy chunk at quarter resolution, history at full resolution.
  out["full_history_pyramid_quarter"] = ("base", dict(full, hidden_states=noisy(1, 9, 4, 4)))
  # Sizes that need replicate padding: spatial 10x14 (mid pads to 12x16, long to 16x16), 3 mid and 14 long frames.
  out["replicate_padding"] = ("base", dict(
      hidden_states=noisy(1, 3, 10, 14), timestep=np.array([400.25], np.float32), encoder_hidden_states=text(1),
      indices_hidden_states=np.array([[20, 21, 22]]), **history(rng, 1, c, 10, 14, t_mid=3, t_long=14),
      indices_latents_history_short=np.array([[0, 19]]), indices_latents_history_mid=np.array([[16, 17, 18]]),
      indices_latents_history_long=np.arange(2, 16)[None]))
  out["batch2_different_timesteps"] = ("base", dict(
      hidden_states=noisy(2, 9, 8, 8), timestep=np.array([998, 385], np.int64), encoder_hidden_states=text(2),
      indices_hidden_states=np.arange(20, 29)[None], **history(rng, 2, c, 8, 8), **KFF))
  for v in VARIANTS:
    if v in ("base", "no_memory_patch"):
      continue
    out[f"{v}_full_history"] = (v, dict(full, hidden_states=noisy(1, 9, 8, 8), **history(rng, 1, c, 8, 8)))
  out["no_memory_patch_no_history"] = ("no_memory_patch", dict(
      hidden_states=noisy(1, 9, 8, 8), timestep=np.array([500], np.int64), encoder_hidden_states=text(1),
      indices_hidden_states=np.arange(20, 29)[None]))
  out["bf16_full_history"] = ("base_bf16", dict(full, hidden_states=noisy(1, 9, 8, 8), **history(rng, 1, c, 8, 8)))
  return out


def run(model, inputs, dtype=torch.float32):
  kw = {}
  for k, v in inputs.items():
    t = torch.from_numpy(np.asarray(v))
    if t.is_floating_point() and k != "timestep":
      t = t.to(dtype)
    kw[k] = t
  with torch.no_grad():
    return model(**kw, return_dict=False)[0].float().numpy()


def main():
  if os.path.isdir(OUT):
    shutil.rmtree(OUT)
  os.makedirs(os.path.join(OUT, "models"))
  os.makedirs(os.path.join(OUT, "cases"))
  models = {}
  for i, v in enumerate(VARIANTS):
    models[v] = build(v, seed=100 + i)
    shard = "150KB" if v == "base" else None
    kwargs = {"max_shard_size": shard} if shard else {}
    models[v].save_pretrained(os.path.join(OUT, "models", v), safe_serialization=True, **kwargs)
  # The same weights stored in bf16 (and sharded), loaded back by diffusers in bf16 for the reference output.
  bf16_dir = os.path.join(OUT, "models", "base_bf16")
  models["base"].to(torch.bfloat16).save_pretrained(bf16_dir, safe_serialization=True, max_shard_size="150KB")
  models["base"] = build("base", seed=100)  # back to fp32
  models["base_bf16"] = HeliosTransformer3DModel.from_pretrained(bf16_dir, torch_dtype=torch.bfloat16).eval()

  rng = np.random.default_rng(1234)
  manifest = {}
  for name, (variant, inputs) in cases(rng).items():
    arrays = {k: np.asarray(v) for k, v in inputs.items()}
    if variant == "base_bf16":
      arrays["out_bf16"] = run(models[variant], inputs, torch.bfloat16)
      arrays["out"] = run(models["base"], inputs)
    else:
      arrays["out"] = run(models[variant], inputs)
    np.savez_compressed(os.path.join(OUT, "cases", f"{name}.npz"), **arrays)
    manifest[name] = variant if variant != "base_bf16" else "base_bf16"
  with open(os.path.join(OUT, "manifest.json"), "w") as f:
    json.dump({"diffusers": __import__("diffusers").__version__, "torch": torch.__version__, "cases": manifest}, f,
              indent=2, sort_keys=True)
  print("wrote", OUT)


if __name__ == "__main__":
  main()
