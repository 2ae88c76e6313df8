"""Checks a demo VAE before anything is encoded with it: held-out reconstruction PSNR per frame, and a contact sheet
of the bundled I2V start scene (top row: the rendered truth, bottom row: its reconstruction), with the start scene's
PSNR on its object pixels and on its background apart.

The PSNR alone hides what matters to the demo: the scenes are mostly muted background, so a VAE that loses the small
saturated objects still scores above a flat frame. Look at the sheet.

    python -m recipes.demo.demo_vae_check --model helios_jax/assets/demo/model --sheet vae_check.png
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from recipes.demo.records import print_and_write

DEMO = os.path.join(ROOT, "helios_jax", "assets", "demo")
SHEET_FRAMES = (0, 8, 16, 24, 32)  # frames of the 33-frame chunk shown on the sheet


def start_scene(prompts_path: str = os.path.join(DEMO, "prompts.json")):
  """(stacked params of one scene, caption) of the bundled I2V start scene (``prompts.json``)."""
  from recipes.demo import demo, scenes
  params, caption = demo.bundled_scene(prompts_path, "i2v")
  return scenes.stack_params([params]), caption


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default=os.path.join(DEMO, "model"), help="demo pipeline folder or a vae/ folder")
  p.add_argument("--sheet", help="write the truth / reconstruction contact sheet (PNG) here")
  p.add_argument("--clips", type=int, default=4, help="held-out clips of the PSNR check")
  p.add_argument("--out", help="write the numbers as JSON here")
  args = p.parse_args(argv)
  from helios_jax.io import media
  from helios_jax.models.vae import AutoencoderKLWan
  from recipes.demo import demo, scenes
  folder = os.path.join(args.model, "vae") if os.path.isdir(os.path.join(args.model, "vae")) else args.model
  vae = AutoencoderKLWan.from_pretrained(folder)
  cfg = scenes.SceneConfig()
  held_out = demo.reconstruction_psnr(vae, cfg, num_clips=args.clips)  # (clips, 33)
  params, caption = start_scene()
  truth = np.asarray(scenes.render(params, np.arange(demo.WINDOW), cfg), np.float64)[0]
  recon = demo.reconstruct(vae, truth[None])[0]
  start_psnr = demo.frame_psnr(recon, truth)
  objects = np.asarray(scenes.coverage(params, np.arange(demo.WINDOW), cfg))[0] > 0.5  # (33, H, W)
  parts = demo.psnr_parts(held_out)
  result = dict(model=os.path.relpath(folder, ROOT), held_out_clips=args.clips, held_out_psnr=parts.pop("mean"),
                **{f"held_out_{k}": v for k, v in parts.items()},
                start_scene_caption=caption, start_scene_psnr=float(start_psnr.mean()),
                start_scene_frame0=float(start_psnr[0]),
                start_scene_objects_psnr=demo.masked_psnr(recon, truth, objects),
                start_scene_background_psnr=demo.masked_psnr(recon, truth, ~objects))
  if args.sheet:
    idx = list(SHEET_FRAMES)
    media.write_contact_sheet(args.sheet, np.concatenate([truth[idx], recon[idx]]), num=2 * len(idx),
                              columns=len(idx))
    result["sheet"] = args.sheet
  return print_and_write(result, args.out)


if __name__ == "__main__":
  sys.exit(main())
