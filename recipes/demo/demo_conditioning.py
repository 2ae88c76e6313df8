#!/usr/bin/env python
"""Does a demo model use its conditioning? Stage-1 loss on held-out scenes with and without it.

    python -m recipes.demo.demo_conditioning --model helios_jax/assets/demo/model --clips 8 --out results.json

Held-out clips (scene stream ``--scene-seed``, never used in training) are rendered and encoded with the model's
own VAE and text encoder exactly as the training set is (``recipes.demo.demo.encode_dataset``). For each
target chunk index the stage-1 flow-matching loss (``helios_jax.training.losses``, corruption and drops off) is
averaged over ``--draws`` noise draws for four variants of the same batch (same noise, same noise levels):

* ``true``: the clip's history and caption;
* ``no_history``: anchor and history latents zeroed (a model that reads its history does worse here);
* ``i2v_history``: what an I2V continuation gives the model, the anchor and the most recent history frame kept and
  the 18 older frames zeroed (the I2V drop pattern of training, ``corruption.drop_keep_mask``): a model that can
  continue an image does better here than with ``no_history``;
* ``other_caption``: the caption embedding of another clip of the batch;
* ``zero_caption``: the caption embedding zeroed (what caption dropout trains).

A model that continues motion has ``no_history`` clearly above ``true`` for chunks after the first (chunk 0 has
no history in training: its anchor is zero). Equal losses mean the model ignores that input.

The training noise levels (logit-normal) sit mostly in the middle, where the noisy chunk itself shows where the
objects are; ``--sigmas 0.95,0.7,0.3`` also scores each variant at those fixed noise levels (``loss_by_sigma``):
at a high level only the history and the caption can tell the model where the objects are.

``--posterior`` (``mean`` / ``sample``) picks the latents the clips are encoded to; by default the one the model
was trained on (``latents_posterior`` in its ``model_index.json`` defaults; ``sample`` for folders without it, the
first bundled model among them).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from recipes.demo.records import print_and_write

VARIANTS = ("true", "no_history", "i2v_history", "other_caption", "zero_caption")


def variant_batch(batch: dict, name: str) -> dict:
  """The batch with one conditioning input removed or swapped (``name`` in VARIANTS)."""
  import jax.numpy as jnp
  b = dict(batch)
  if name == "no_history":
    b["x0"] = jnp.zeros_like(b["x0"])
    b["history"] = jnp.zeros_like(b["history"])
  elif name == "i2v_history":  # (B, C, 19, h, w), oldest first: keep the newest frame
    b["history"] = b["history"].at[:, :, :-1].set(0.0)
  elif name == "other_caption":
    b["prompt_embeds"] = jnp.roll(b["prompt_embeds"], 1, axis=0)
  elif name == "zero_caption":
    b["prompt_embeds"] = jnp.zeros_like(b["prompt_embeds"])
  elif name != "true":
    raise ValueError(f"unknown variant {name!r}")
  return b


def fixed_sigma_u(sigma: float, n: int) -> np.ndarray:
  """(n,) uniform draws that ``losses.stage1_sigma`` (no dynamic shift) maps to the noise level ``sigma``
  (a multiple of 1e-3 in (0, 1]): ``s = 1 - floor(1000 u) / 1000``."""
  if not 0.0 < sigma <= 1.0:
    raise ValueError(f"a noise level must be in (0, 1], got {sigma}")
  return np.full((n,), 1.0 - round(sigma, 3) + 5e-4, np.float32)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default=os.path.join(ROOT, "helios_jax", "assets", "demo", "model"),
                 help="demo pipeline folder (transformer/, vae/, text_encoder/, tokenizer/)")
  p.add_argument("--clips", type=int, default=8)
  p.add_argument("--chunks", default="0,1,3", help="comma list of target chunk indices (of 4 per clip)")
  p.add_argument("--draws", type=int, default=3, help="noise draws averaged per variant")
  p.add_argument("--scene-seed", type=int, default=2024, help="held-out scene stream (training used 0)")
  p.add_argument("--posterior", choices=("mean", "sample"),
                 help="encode the clips to the VAE posterior mean or a sample (default: as the model was trained)")
  p.add_argument("--sigmas", default="", help="comma list of fixed noise levels in (0, 1] to score as well")
  p.add_argument("--out", help="write the JSON results here")
  args = p.parse_args(argv)
  try:
    sigmas = [float(v) for v in args.sigmas.split(",") if v.strip()]
    for v in sigmas:
      fixed_sigma_u(v, 1)
  except ValueError as e:
    p.error(f"--sigmas: {e}")

  import jax
  import jax.numpy as jnp
  from configs import demo_base
  from helios_jax.models.transformer import HeliosTransformer3DModel
  from helios_jax.models.vae import AutoencoderKLWan
  from helios_jax.training import corruption, losses
  from recipes.demo import demo, scenes
  from helios_jax.training.data import assemble_sample

  chunks = [int(c) for c in args.chunks.split(",")]
  num_chunks = max(chunks) + 1
  vae = AutoencoderKLWan.from_pretrained(os.path.join(args.model, "vae"))
  embed = demo.caption_embedder(os.path.join(args.model, "text_encoder"), os.path.join(args.model, "tokenizer"))
  with open(os.path.join(args.model, "model_index.json"), encoding="utf-8") as f:
    defaults = json.load(f).get("helios_jax_defaults") or {}
  scene_cfg = scenes.SceneConfig(height=int(defaults.get("height", 128)), width=int(defaults.get("width", 128)))
  posterior = args.posterior or defaults.get("latents_posterior", "sample")
  model = HeliosTransformer3DModel.from_pretrained(os.path.join(args.model, "transformer"), dtype=jnp.float32)
  obj = demo_base.get_config("").objective
  obj.corrupt_history = False  # the clean conditioning, as at sampling time
  results = dict(model=os.path.relpath(os.path.abspath(args.model), ROOT), clips=args.clips, draws=args.draws,
                 scene_seed=args.scene_seed, posterior=posterior, device=str(jax.devices()[0]), loss={})
  with tempfile.TemporaryDirectory() as data_dir:
    demo.encode_dataset(data_dir, vae, embed, num_clips=args.clips, num_chunks=num_chunks, seed=args.scene_seed,
                        scene_cfg=scene_cfg, batch=4, posterior=posterior)
    source = demo.DemoLatents(data_dir)
    for chunk in chunks:
      items = [assemble_sample(source[i]["latents"], chunk) for i in range(args.clips)]
      batch = {k: jnp.asarray(np.stack([s[k] for s in items])) for k in items[0]}
      batch["prompt_embeds"] = jnp.asarray(np.stack([source[i]["prompt_embeds"] for i in range(args.clips)]))
      indices = {k: jnp.asarray(v) for k, v in losses.history_indices(batch["target"].shape[2]).items()}
      for sigma in [None] + sigmas:  # None: the training distribution of noise levels
        row = {}
        for name in VARIANTS:
          b = variant_batch(batch, name)
          vals = []
          for r in range(args.draws):
            draws = losses.draw_stage1(jax.random.key(r), b, obj)
            draws["drop_mode"] = jnp.asarray(corruption.DROP_NONE, jnp.int32)
            draws["caption_drop"] = jnp.zeros_like(draws["caption_drop"])
            if sigma is not None:
              draws["u"] = jnp.asarray(fixed_sigma_u(sigma, args.clips))
            pieces = losses.stage1_pieces(b, draws, obj)
            vals.append(float(losses.loss_from_pieces(model.forward, pieces, indices)))
          row[name] = float(np.mean(vals))
        if sigma is None:
          results["loss"][str(chunk)] = row
        else:
          results.setdefault("loss_by_sigma", {}).setdefault(str(chunk), {})[f"{sigma:g}"] = row
        at = "" if sigma is None else f" at sigma {sigma:g}"
        print(f"chunk {chunk}{at}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
  return print_and_write(results, args.out)


if __name__ == "__main__":
  sys.exit(main())
