"""Fine-tunes the decoder of a demo VAE on posterior means of 33-frame clips (the encoder stays frozen).

The first demo VAE was trained on 17-frame clips and decodes the second half of every 33-frame chunk with a
colour drift. Re-training the whole VAE changes its latents, so the DiTs trained on them would have to be trained
again; fine-tuning only the decoder (``recipes.demo.vae_train.finetune_decoder``, ``configs/demo_vae.py:
decoder``) keeps every latent and DiT valid. Prints the held-out reconstruction PSNR
(``recipes.demo.demo.reconstruction_psnr``) before and after, and writes the new ``vae/`` folder.

    python -m recipes.demo.finetune_demo_vae --model helios_jax/assets/demo/model --seconds 1500 --out /tmp/vae_ft
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default=os.path.join(ROOT, "helios_jax", "assets", "demo", "model"),
                 help="demo pipeline folder (its vae/ is fine-tuned) or a vae/ folder")
  p.add_argument("--out", required=True, help="folder for the fine-tuned vae/ (config.json + safetensors)")
  p.add_argument("--seconds", type=float, default=0.0, help="wall-clock budget (0 = the config's step count)")
  p.add_argument("--steps", type=int, help="override total_steps")
  p.add_argument("--check-clips", type=int, default=4, help="held-out clips of the PSNR check")
  p.add_argument("--tiny", action="store_true", help="the :tiny config (tests, CPU smoke runs)")
  args = p.parse_args(argv)

  from configs import demo_vae
  from helios_jax.models.vae import AutoencoderKLWan
  from recipes.demo import demo, vae_train
  folder = os.path.join(args.model, "vae") if os.path.isdir(os.path.join(args.model, "vae")) else args.model
  vae = AutoencoderKLWan.from_pretrained(folder)
  config = demo_vae.get_config("tiny" if args.tiny else "decoder")
  config.max_seconds = args.seconds
  if args.steps:
    config.total_steps = args.steps
  scfg = vae_train.scene_config(config.data)
  frames = demo.WINDOW

  def check(model):
    parts = demo.psnr_parts(demo.reconstruction_psnr(model, scfg, num_clips=args.check_clips, frames=frames))
    return {k: round(v, 2) for k, v in parts.items()}

  before = check(vae)
  print(f"before: {before}", flush=True)
  t0 = time.perf_counter()
  vae, losses, steps = vae_train.finetune_decoder(vae, config, os.path.join(args.out, "run"), progress=True)
  seconds = time.perf_counter() - t0
  after = check(vae)
  print(f"after: {after}", flush=True)
  vae_train.save_vae(vae, os.path.join(args.out, "vae"))
  record = dict(source=os.path.relpath(os.path.abspath(folder), ROOT), before=before, after=after,
                steps=steps, seconds=round(seconds, 1),
                last_loss=losses[-1] if losses else None, batch=int(config.batch_size),
                frames=int(config.data.frames), learning_rate=float(config.optim.learning_rate))
  with open(os.path.join(args.out, "finetune.json"), "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
  print(json.dumps(record), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
