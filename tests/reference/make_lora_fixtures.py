"""Regenerates the LoRA-at-inference parity fixtures with diffusers 0.42.1 + PEFT (PyTorch, CPU).

Base model: the tiny random ``tests/reference/fixtures/transformer/models/base`` checkpoint (the config of
``make_transformer_fixtures.py``; not copied). What it writes under ``tests/reference/fixtures/lora/``:

* ``lora_a/pytorch_lora_weights.safetensors`` -- a PEFT LoRA (rank 4, lora_alpha 8, one module at rank 2 through
  ``rank_pattern``) on every attention and FFN linear, ``proj_out`` and the ``patch_embedding`` Conv3d; A and B
  random (B non-zero), saved as ``HeliosPipeline.save_lora_weights`` does (``get_peft_model_state_dict`` keys with
  the ``transformer.`` prefix, the LoraConfig in the ``lora_adapter_metadata`` header).
* ``lora_b_kohya.safetensors`` -- a second adapter in the original Wan key style diffusers also reads
  (``diffusion_model.blocks.N.self_attn.q.lora_down.weight`` / ``lora_up.weight`` / ``.alpha``), on self-attention
  q / v and the cross-attention output only.
* ``case.npz`` -- inputs (history streams included, so the memory patches run) and the reference outputs:
  ``out_base`` (no LoRA), ``out_a`` (a at 1.0), ``out_a_half`` (``set_adapters("a", 0.5)``), ``out_ab``
  (``set_adapters(["a", "b"], [1.0, 0.7])``), ``out_b`` (b alone at 1.0), all float32.

Run: ``/work/refvenv/bin/python tests/reference/make_lora_fixtures.py`` (seeded; re-running rewrites the same data).
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import torch
from diffusers import HeliosPipeline, HeliosTransformer3DModel
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_transformer_fixtures import KFF, TINY, history, run  # noqa: E402  (same tiny config and helpers)

BASE = os.path.join(HERE, "fixtures", "transformer", "models", "base")
OUT = os.path.join(HERE, "fixtures", "lora")
SEED = 20261203
TARGETS_A = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2", "proj_out", "patch_embedding"]
RANK_A, ALPHA_A = 4, 8.0
RANK_PATTERN_A = {"blocks.1.ffn.net.2": 2}  # one module at another rank, as rank_pattern allows
RANK_B, ALPHA_B = 2, 3.0
B_STD = 0.3  # random lora_B (PEFT initialises it to zero, which would make the adapter a no-op)


def randomise(model, gen, adapter):
  with torch.no_grad():
    for name, p in model.named_parameters():
      if f"lora_A.{adapter}." in name or f"lora_B.{adapter}." in name:
        p.copy_(B_STD * torch.randn(p.shape, generator=gen))


def main():
  if os.path.isdir(OUT):
    shutil.rmtree(OUT)
  os.makedirs(OUT)
  rng = np.random.default_rng(SEED)
  gen = torch.Generator().manual_seed(SEED)
  c = TINY["in_channels"]
  inputs = dict(hidden_states=rng.standard_normal((1, c, 9, 8, 8)).astype(np.float32),
                timestep=np.array([640], np.int64),
                encoder_hidden_states=rng.standard_normal((1, 7, TINY["text_dim"])).astype(np.float32),
                indices_hidden_states=np.arange(20, 29)[None], **history(rng, 1, c, 8, 8), **KFF)

  model = HeliosTransformer3DModel.from_pretrained(BASE, torch_dtype=torch.float32).eval()
  out = {"out_base": run(model, inputs)}

  # adapter a: PEFT, saved the way pipe.save_lora_weights does
  config = LoraConfig(r=RANK_A, lora_alpha=ALPHA_A, target_modules=TARGETS_A, rank_pattern=RANK_PATTERN_A,
                      init_lora_weights="gaussian")
  model.add_adapter(config, adapter_name="a")
  randomise(model, gen, "a")
  layers = get_peft_model_state_dict(model, adapter_name="a")
  meta = config.to_dict()
  for k, v in meta.items():
    if isinstance(v, set):
      meta[k] = sorted(v)
  HeliosPipeline.save_lora_weights(os.path.join(OUT, "lora_a"), transformer_lora_layers=layers,
                                   transformer_lora_adapter_metadata=meta)

  # adapter b: original Wan key names, kohya lora_down / lora_up + alpha
  kohya = {}
  for i in range(TINY["num_layers"]):
    for theirs in (f"blocks.{i}.self_attn.q", f"blocks.{i}.self_attn.v", f"blocks.{i}.cross_attn.o"):
      dim = TINY["num_attention_heads"] * TINY["attention_head_dim"]
      kohya[f"diffusion_model.{theirs}.lora_down.weight"] = B_STD * torch.randn((RANK_B, dim), generator=gen)
      kohya[f"diffusion_model.{theirs}.lora_up.weight"] = B_STD * torch.randn((dim, RANK_B), generator=gen)
      kohya[f"diffusion_model.{theirs}.alpha"] = torch.tensor(ALPHA_B)
  save_file(kohya, os.path.join(OUT, "lora_b_kohya.safetensors"))

  # reference outputs through diffusers' own loader (fresh model, both files)
  model = HeliosTransformer3DModel.from_pretrained(BASE, torch_dtype=torch.float32).eval()
  for name, file in (("a", os.path.join(OUT, "lora_a")), ("b", os.path.join(OUT, "lora_b_kohya.safetensors"))):
    state_dict, metadata = HeliosPipeline.lora_state_dict(file, return_lora_metadata=True)
    HeliosPipeline.load_lora_into_transformer(state_dict, transformer=model, adapter_name=name, metadata=metadata)
  model.set_adapters(["a"], [1.0])
  out["out_a"] = run(model, inputs)
  model.set_adapters(["a"], [0.5])
  out["out_a_half"] = run(model, inputs)
  model.set_adapters(["a", "b"], [1.0, 0.7])
  out["out_ab"] = run(model, inputs)
  model.set_adapters(["b"], [1.0])
  out["out_b"] = run(model, inputs)
  for k, v in out.items():
    print(k, float(np.abs(v - out["out_base"]).mean()) if k != "out_base" else "")
  np.savez_compressed(os.path.join(OUT, "case.npz"), **inputs, **out)


if __name__ == "__main__":
  main()
