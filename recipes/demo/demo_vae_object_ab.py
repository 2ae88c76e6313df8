"""Does weighting object pixels help a briefly trained demo VAE draw the objects? A small A/B that fits a CPU.

Trains the demo VAE (``configs/demo_vae.py``) on single frames only (its image phase, no wall-clock budget) at a
reduced size, with the given ``objective.object_weight``, then scores 32 held-out frames (scene stream 4242):
PSNR over all pixels, over object pixels (coverage > 0.5) and over the background.

    python -m recipes.demo.demo_vae_object_ab --object-weight 0 --steps 400 --out ow0.json
    python -m recipes.demo.demo_vae_object_ab --object-weight 4 --steps 400 --out ow4.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from recipes.demo.records import print_and_write

HELD_OUT_FRAMES = 32


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--object-weight", type=float, required=True)
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--size", type=int, default=64, help="frame height = width (a multiple of 64)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--out", help="write the result as JSON here")
  args = p.parse_args(argv)
  from configs import demo_vae
  from recipes.demo import demo, scenes, vae_train
  c = demo_vae.get_config("")
  c.image_steps, c.image_max_seconds, c.image_batch_size = args.steps, 0.0, args.batch
  c.total_steps, c.batch_size, c.stats_clips, c.log_every = 0, args.batch, args.batch, 50
  c.data.height = c.data.width = args.size
  c.data.frames = 1
  c.objective.object_weight = args.object_weight
  c.optim.warmup_steps = 20
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as work:
    vae, losses = vae_train.train_vae(c, work, progress=True)
  train_s = time.perf_counter() - t0
  cfg = vae_train.scene_config(c.data)
  params, _ = scenes.scene_batch(demo.RECON_SEED, range(HELD_OUT_FRAMES), cfg)
  truth = np.asarray(scenes.render(params, np.arange(1), cfg), np.float64)[:, 0]  # (N, H, W, 3)
  objects = np.asarray(scenes.coverage(params, np.arange(1), cfg))[:, 0] > 0.5  # (N, H, W)
  recon = demo.reconstruct(vae, truth[:, None])[:, 0]  # each frame a one-frame clip
  everything = np.ones(objects.shape, bool)
  result = dict(object_weight=args.object_weight, steps=args.steps, size=args.size, batch=args.batch,
                train_s=round(train_s, 1), last_loss=losses[-1] if losses else None,
                psnr=demo.masked_psnr(recon, truth, everything), psnr_objects=demo.masked_psnr(recon, truth, objects),
                psnr_background=demo.masked_psnr(recon, truth, ~objects))
  return print_and_write(result, args.out)


if __name__ == "__main__":
  sys.exit(main())
