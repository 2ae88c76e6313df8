"""The diffusers 0.42.1 side of the FPS comparison: HeliosPyramidPipeline on the same random-weight 14B config,
384x640, prompt embeddings given, VAE decode included (fp32 VAE as the reference ships it, or --vae-dtype bf16),
eager or with torch.compile. Appends a JSON record per setting (same keys as benchmarks/fps.py) to --out.

    python benchmarks/diffusers_fps.py --settings 1-1-1 2-2-2+amp [--compile] --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch
from diffusers import AutoencoderKLWan, HeliosDMDScheduler, HeliosPyramidPipeline, HeliosTransformer3DModel

SETTINGS = {"1-1-1": ([1, 1, 1], False), "2-2-2+amp": ([2, 2, 2], True)}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--frames", type=int, default=264)
  p.add_argument("--layers", type=int, default=40)
  p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
  p.add_argument("--compile", action="store_true")
  p.add_argument("--vae-dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  torch.manual_seed(0)
  t0 = time.time()
  with torch.device("cuda"):
    torch.set_default_dtype(torch.bfloat16)
    transformer = HeliosTransformer3DModel(num_layers=a.layers).eval()
    torch.set_default_dtype(torch.float32)
    vae = AutoencoderKLWan().to(getattr(torch, a.vae_dtype)).eval()
  scheduler = HeliosDMDScheduler(stages=3, use_dynamic_shifting=True, time_shift_type="linear")
  pipe = HeliosPyramidPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler,
                               transformer=transformer, is_distilled=True)
  pipe.set_progress_bar_config(disable=True)
  impl = "diffusers"
  if a.compile:
    impl = "diffusers+compile"
    pipe.transformer.compile(dynamic=False)
    pipe.vae.compile(dynamic=False)
  print(f"built in {time.time() - t0:.1f}s on {torch.cuda.get_device_name()}", flush=True)
  emb = 0.1 * torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
  for setting in a.settings:
    steps, amp = SETTINGS[setting]

    def run(frames):
      torch.cuda.synchronize()
      t = time.time()
      out = pipe(prompt_embeds=emb, num_frames=frames, height=384, width=640, guidance_scale=1.0,
                 pyramid_num_inference_steps_list=steps, is_amplify_first_chunk=amp,
                 generator=torch.Generator("cuda").manual_seed(42), output_type="pt").frames
      torch.cuda.synchronize()
      return time.time() - t, out.shape

    torch.cuda.reset_peak_memory_stats()
    warm, _ = run(66)
    dt, shape = run(a.frames)
    first, _ = run(33)
    per_chunk = dt / max(1, -(-a.frames // 33))
    rec = {"impl": impl, "device": torch.cuda.get_device_name(), "setting": setting, "frames": int(shape[1]),
           "fps": round(shape[1] / dt, 2), "seconds": round(dt, 3), "first_chunk_s": round(first, 3),
           "compile_s": round(max(0.0, warm - 2 * per_chunk), 1), "warmup_run_s": round(warm, 1),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1), "layers": a.layers,
           "vae_dtype": a.vae_dtype, "torch": torch.__version__, "date": datetime.date.today().isoformat()}
    print(json.dumps(rec), flush=True)
    with open(os.path.join(a.out, f"fps_{impl.replace('+', '_')}_{setting.replace('+', '_')}_{a.layers}l.json"), "w") as f:
      json.dump(rec, f, indent=1)


if __name__ == "__main__":
  main()
