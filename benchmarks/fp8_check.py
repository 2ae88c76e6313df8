"""FP8 transformer blocks at the released 14B config (random bf16 weights): error against bf16, speed, the HLO.

A benchmark, not a test. One process on the accelerator:

1. bf16: one full-resolution forward (history 16/2/1, t = 500) and the final latents of a 3-chunk 2-2-2+amp video
   (99 frames, fixed seed and prompt embeddings), then batch FPS at "1-1-1" and "2-2-2+amp" as benchmarks/fps.py
   measures it (VAE decode included, output left on the device);
2. fp8 with per-channel weight scales (``pipe.quantize_transformer("channel")``): the same forward and latents
   (relative error against bf16), whether the compiled forward calls cuBLASLt's FP8 GEMM (its HLO), FPS again;
3. fp8 with per-tensor scales on a fresh copy of the same weights: forward and latents error only.

    python benchmarks/fp8_check.py --out benchmarks/results          # on a GPU
    python benchmarks/fp8_check.py --layers 2 --height 128 --width 128 --no-fps   # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.fps import SETTINGS, build_on_device, distilled_scheduler, peak_gib, prompt_embeddings  # noqa: E402
from benchmarks.stream_fps import batch_run  # noqa: E402
from helios_jax.models.transformer import HeliosTransformer3DModel, HeliosTransformerConfig  # noqa: E402
from helios_jax.models.vae import AutoencoderKLWan  # noqa: E402
from helios_jax.pipelines import HeliosPyramidPipeline  # noqa: E402
from helios_jax.pipelines.history import HistoryLayout  # noqa: E402


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--height", type=int, default=384)
  p.add_argument("--width", type=int, default=640)
  p.add_argument("--layers", type=int, default=40)
  p.add_argument("--frames", type=int, default=264, help="frames of each FPS run (benchmarks/fps.py's 264)")
  p.add_argument("--no-fps", action="store_true")
  p.add_argument("--no-tensor", action="store_true",
                 help="skip the per-tensor variant (on random bf16 weights its scales equal the per-channel ones: "
                      "each column's largest |w| is the same bf16 number below the init's truncation bound)")
  p.add_argument("--variants", nargs="+", metavar="SCALING[:GEMM_OUTPUT[:ATTENTION[:unstack]]]",
                 help="instead of steps 1-3: for each variant (e.g. bf16, tensor:compute, channel:compute:fp8, "
                      "channel:compute:bf16:unstack; 'bf16' = not quantised) a fresh copy of the weights so set up: "
                      "its forward and 3-chunk latents error against bf16, forward time and FPS")
  p.add_argument("--attention-probe", action="store_true",
                 help="with --variants: first time cuDNN's bf16 and FP8 attention alone at the full stage's shape "
                      "and compare their outputs")
  p.add_argument("--tag", default="", help="suffix of the --variants record's file name")
  p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
  cfg = HeliosTransformerConfig(num_layers=a.layers, dtype="bfloat16")
  vae = build_on_device(AutoencoderKLWan, None, dtype=jnp.bfloat16)
  scheduler = distilled_scheduler()
  emb = prompt_embeddings(cfg.text_dim)
  h, w = a.height // 8, a.width // 8
  layout = HistoryLayout.make((16, 2, 1), 9, True)
  idx = {k: jnp.asarray(v) for k, v in layout.indices().items()}
  hist_full = jax.random.normal(jax.random.key(4), (1, 16, 19, h, w)).astype(jnp.bfloat16)
  hist = layout.split(hist_full, jax.random.normal(jax.random.key(5), (1, 16, 1, h, w)).astype(jnp.bfloat16))
  x = jax.random.normal(jax.random.key(2), (1, 16, 9, h, w)).astype(jnp.bfloat16)
  t = jnp.array([500], jnp.int32)

  def make_pipe():
    transformer = build_on_device(HeliosTransformer3DModel, cfg)  # seed 0: the same weights every time
    jax.block_until_ready(nnx.state(transformer))
    return HeliosPyramidPipeline(transformer, scheduler, vae, is_distilled=True)

  def forward(pipe):
    graphdef, params = pipe._transformer_split()
    def run(p_, x_, t_):
      p_, layer_states = p_ if isinstance(p_, tuple) else (p_, None)  # (state, per-layer states) once unstacked
      return nnx.merge(graphdef, p_).forward(x_, t_, emb, **idx, **hist, layer_states=layer_states)

    fwd = jax.jit(run)
    out = fwd(params, x, t)
    jax.block_until_ready(out)
    hlo = fwd.lower(params, x, t).compile().as_text()
    t0 = time.perf_counter()
    for _ in range(3):
      jax.block_until_ready(fwd(params, x, t))
    return np.asarray(out.astype(jnp.float32)), hlo, (time.perf_counter() - t0) / 3

  def latents(pipe):
    out = pipe(prompt_embeds=emb, num_frames=99, height=a.height, width=a.width, guidance_scale=1.0,
               pyramid_num_inference_steps_list=(2, 2, 2), is_amplify_first_chunk=True, output_type="latent",
               progress=False, seed=7)
    return np.asarray(out.frames, np.float32)

  def attention_probe():
    from helios_jax.models.attention import dot_product_attention
    # the full stage's tokens: 9 noisy frames of (h/2)(w/2) patches + the compressed history (2400 at 384x640)
    length = 9 * (h // 2) * (w // 2) + 2400 * h * w // (48 * 80)
    keys = jax.random.split(jax.random.key(11), 3)
    q, k, v = (jax.random.normal(kk, (1, length, cfg.num_attention_heads, cfg.attention_head_dim), jnp.bfloat16)
               for kk in keys)
    res = dict(tokens=length)
    outs = {}
    for impl in ("xla", "cudnn", "cudnn_fp8"):
      try:
        f = jax.jit(lambda q_, k_, v_, impl=impl: dot_product_attention(q_, k_, v_, impl))
        outs[impl] = np.asarray(f(q, k, v).astype(jnp.float32))
        t0 = time.perf_counter()
        for _ in range(10):
          jax.block_until_ready(f(q, k, v))
        res[f"{impl}_ms"] = round((time.perf_counter() - t0) / 10 * 1e3, 3)
        res[f"{impl}_rel_err_vs_xla"] = rel_err(outs[impl], outs["xla"])
      except Exception as e:  # noqa: BLE001
        res[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:1500]}"
    print("attention probe:", res, flush=True)
    return res

  def fps(pipe):
    res = {}
    for setting, (steps, amp) in SETTINGS.items():
      call = dict(prompt_embeds=emb, height=a.height, width=a.width, guidance_scale=1.0,
                  pyramid_num_inference_steps_list=steps, is_amplify_first_chunk=amp, seed=42)
      t0 = time.perf_counter()
      batch_run(pipe, call, 66)  # compiles every stage shape and the decode
      warm = time.perf_counter() - t0
      first = batch_run(pipe, call, 33)
      res[setting] = dict(batch_run(pipe, call, a.frames), first_chunk_s=first["seconds"], warmup_s=round(warm, 1))
      print(setting, res[setting], flush=True)
    return res

  rec = {"impl": "helios_jax", "device": dev.device_kind, "layers": a.layers, "height": a.height, "width": a.width,
         "jax": jax.__version__, "date": datetime.date.today().isoformat()}
  if a.variants:
    out_path = os.path.join(a.out, f"fp8_variants_{a.layers}l{a.tag}.json")

    def save():
      rec["peak_gib"] = round(peak_gib(), 1)
      with open(out_path, "w") as f:  # after every variant: a time-out still leaves what was measured
        json.dump(rec, f, indent=1)

    if a.attention_probe:
      rec["attention_probe"] = attention_probe()
      save()
    pipe, ref_fwd, ref_lat = None, None, None
    for variant in a.variants:
      scaling, gemm_output, attention, layers = (variant.split(":") + ["", "", "", ""])[:4]
      del pipe
      pipe = make_pipe()
      if ref_fwd is None:  # the bf16 reference of every variant's errors
        ref_fwd, _, rec["forward_bf16_s"] = forward(pipe)
        ref_lat = latents(pipe)
      entry = rec.setdefault(variant, {})
      try:
        if scaling != "bf16":
          pipe.quantize_transformer(scaling, gemm_output or "float32", attention or "bf16")
        if layers == "unstack":
          pipe.unstack_transformer_layers()
        out, hlo, fwd_s = forward(pipe)
        entry.update(forward_s=fwd_s, forward_rel_err=rel_err(out, ref_fwd),
                     latents_3chunks_rel_err=rel_err(latents(pipe), ref_lat),
                     cublaslt_fp8_gemms=len(re.findall(r'custom_call_target="__cublas\$lt\$matmul\$f8', hlo)),
                     cudnn_fp8_attention_calls=len(re.findall(r'custom_call_target="__cudnn\$fmha[^"]*[Ff]8', hlo)))
        print(variant, entry, flush=True)
        save()
        if not a.no_fps:
          entry["fps"] = fps(pipe)
      except Exception as e:  # noqa: BLE001  (a variant the stack cannot run is recorded, the others go on)
        entry["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
      print(variant, entry, flush=True)
      save()
    print(json.dumps(rec), flush=True)
    return
  pipe = make_pipe()
  ref_fwd, hlo_bf16, rec["forward_bf16_s"] = forward(pipe)
  ref_lat = latents(pipe)
  if not a.no_fps:
    rec["bf16"] = fps(pipe)
  count = pipe.quantize_transformer("channel")
  rec["fp8_parameters"] = count
  out, hlo, rec["forward_fp8_channel_s"] = forward(pipe)
  rec["fp8_channel"] = dict(forward_rel_err=rel_err(out, ref_fwd), latents_3chunks_rel_err=rel_err(latents(pipe),
                                                                                                     ref_lat))
  f8_calls = re.findall(r'custom_call_target="(__cublas\$lt\$matmul\$f8[^"]*)"', hlo)
  rec["hlo"] = dict(cublaslt_fp8_gemms=len(f8_calls), bf16_program_gemms=len(re.findall(r"__cublas\$gemm|"
                                                                                       r"__cublas\$lt\$matmul\"",
                                                                                       hlo_bf16)),
                    fp8_program_other_gemms=len(re.findall(r'custom_call_target="__cublas\$(gemm|lt\$matmul)"', hlo)),
                    f8_dtypes_in_hlo=len(re.findall(r"f8e4m3fn", hlo)))
  print("fp8 channel:", rec["fp8_channel"], rec["hlo"], flush=True)
  with open(os.path.join(a.out, "fp8_hlo_forward.txt"), "w") as f:
    f.write(hlo[:8_000_000])
  if not a.no_fps:
    rec["fp8"] = fps(pipe)
  rec["peak_gib"] = round(peak_gib(), 1)
  if a.no_tensor:
    print(json.dumps(rec), flush=True)
    with open(os.path.join(a.out, f"fp8_check_{a.layers}l.json"), "w") as f:
      json.dump(rec, f, indent=1)
    return
  del pipe
  pipe = make_pipe()
  pipe.quantize_transformer("tensor")
  out, _, rec["forward_fp8_tensor_s"] = forward(pipe)
  rec["fp8_tensor"] = dict(forward_rel_err=rel_err(out, ref_fwd), latents_3chunks_rel_err=rel_err(latents(pipe),
                                                                                                   ref_lat))
  print(json.dumps(rec), flush=True)
  with open(os.path.join(a.out, f"fp8_check_{a.layers}l.json"), "w") as f:
    json.dump(rec, f, indent=1)


if __name__ == "__main__":
  from helios_jax import runtime  # XLA flags (Triton GEMM off, NHWC convolutions): before any computation
  runtime.configure_xla()
  runtime.quiet_gpu_plugin_errors()
  main()
