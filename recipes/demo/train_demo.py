#!/usr/bin/env python
"""Trains the bundled demo model in one command per GPU call: VAE -> encoded scenes -> Base -> Mid, then (a second
call) stage 3 (ODE regression + DMD: the 3-step distilled model) and the Base without anti-drifting (ablation),
each stage through the project's own trainers, under one wall-clock budget.

    python -m recipes.demo.train_demo --out OUT                # GPU, stages 1-2 (about 8 minutes on one H200)
    python -m recipes.demo.train_demo --out OUT --stages ode,ahd,base_nocorrupt --quality   # GPU, second call
    python -m recipes.demo.train_demo --out /tmp/demo --quick  # CPU dry run with the :tiny configs (minutes)
    python -m recipes.demo.train_demo --assemble OUT           # unpack a run's outputs into helios_jax/assets/demo
    python -m recipes.demo.train_demo --out OUT --stages base,base_nocorrupt --continue base --continue base_nocorrupt
                                                             # more steps for assembled models (runs/demo/<stage>)
    python -m recipes.demo.train_demo --out OUT --stages base --set base:objective.random_drop_i2v=0.5
                                                             # a config key overridden for one stage

Writes to OUT (at most 8 files, each well under 16 MiB, so the GPU tool returns them):
  components.tar.gz          vae/ text_encoder/ tokenizer/ (shared by every pipeline folder)
  transformer_<name>.tar.gz  the merged transformer of each trained stage (base, mid, base_nocorrupt, distilled),
                             bfloat16
  demo_quality.json, sheets/ with --quality: recipes/demo/demo_quality.py on every model at hand
  train_log.json             losses and timings of every stage (one record per logged step) and the summary
Each stage has its own budget (seconds); a stage that reaches it saves, stops and exports what it has (the
record says so), so the command always finishes in time. Latents are encoded once per --work folder and reused by
later calls on the same folder; each transformer stage starts a fresh run there (an earlier call's run of that stage
in --work is removed: its config may differ, e.g. another --continue folder or --set).

``--assemble`` turns those files into diffusers-layout pipeline folders: the default bundled model
``helios_jax/assets/demo/model`` (the Base, or the stage named by --default; ``--default none`` bundles nothing) and
``runs/demo/<name>`` for the others (``recipes/demo/demo_quality.py`` compares them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tarfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ASSETS = os.path.join(ROOT, "helios_jax", "assets", "demo")
DEFAULT_MODEL = os.path.join(ASSETS, "model")
# Wall-clock budgets (seconds) of the training stages on the GPU; with start-up, data encoding (about 40 s) and the
# exports they stay under the 9-minute command limit. --total caps the whole run: a transformer stage gets at most
# what is left of it minus a safety margin (and is skipped when too little is left).
# vae_images / vae: the VAE's image and video phases, each counted after its first (compiling) step.
BUDGETS = dict(vae_images=90.0, vae=100.0, base=140.0, mid=100.0, base_nocorrupt=140.0,
               ode=100.0, ahd=130.0)  # ode: teacher pair generation included
QUICK_BUDGETS = dict(vae_images=0.0, vae=0.0, base=0.0, mid=0.0, base_nocorrupt=0.0, ode=0.0, ahd=0.0)  # 0 = none
TOTAL_BUDGET = 510.0
MARGIN = 35.0  # export + tar of a stage after its budget, and the interpreter's exit
# Sampling defaults written into each folder's model_index.json ("helios_jax_defaults", read by sample.py).
# The Bases sample with classifier-free guidance 2 (trained with 10% caption dropout): on 8 held-out clips it puts
# 7 points more object-frames on target than guidance 1 at 1.2 dB less PSNR, and 0.7 dB more PSNR than guidance 3 at
# the same rate (benchmarks/results/demo_quality_guidance_cpu_run6.json).
SAMPLE_DEFAULTS = dict(base=dict(steps=[30], guidance=2.0, dtype="fp32"),
                       mid=dict(steps=[10, 10, 10], guidance=1.0, dtype="fp32"),
                       base_nocorrupt=dict(steps=[30], guidance=2.0, dtype="fp32"),
                       distilled=dict(steps=[1, 1, 1], guidance=1.0, dtype="fp32"))


def _log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_with_budget(config, workdir: str, seconds: float) -> dict:
  """``trainer.train`` with a wall-clock budget: SIGTERM at the deadline makes it save and stop; the run is then
  closed at the step it reached (total_steps lowered, which exports the merged model)."""
  from helios_jax.training.dispatch import train
  done = threading.Event()

  def alarm():  # SIGTERM once a second from the deadline on: the loop stops at its next step boundary
    if not done.wait(seconds):
      while not done.wait(1.0):
        os.kill(os.getpid(), signal.SIGTERM)

  # Outside the training loop (model build, export) a SIGTERM from the alarm is ignored instead of killing us.
  previous = signal.signal(signal.SIGTERM, lambda *_: None)
  if seconds > 0:
    threading.Thread(target=alarm, daemon=True).start()
  try:
    out = train(config, workdir, progress=False)
  finally:
    done.set()
    signal.signal(signal.SIGTERM, previous)
  if out["stopped_by"]:
    _log(f"budget of {seconds:.0f} s reached at step {out['final_step']}; exporting that step")
    requested = int(config.total_steps)
    config.total_steps = int(out["final_step"])
    again = train(config, workdir, progress=False)
    out = dict(out, requested_steps=requested, exported_step=again["final_step"])
  return out


def _bf16_copy(folder: str, workdir: str) -> str:
  """A bfloat16 copy of a merged transformer folder (half the bundle size; loaders cast to their dtype)."""
  import ml_dtypes
  import numpy as np
  from helios_jax.io.checkpoint import DIFFUSERS_WEIGHTS_NAME, SafetensorsFolder, load_config, save_safetensors_folder
  out = os.path.join(workdir, "merged_bf16")
  with SafetensorsFolder(folder, DIFFUSERS_WEIGHTS_NAME) as w:
    tensors = {k: np.asarray(w.get(k)).astype(ml_dtypes.bfloat16) for k in w.keys()}
  save_safetensors_folder(out, tensors, load_config(folder))
  return out


TAR_NAME = dict(ahd="distilled")  # the stage-3 result is the "distilled" pipeline
# The stage --assemble bundles by default: the Base places the start image's objects best in the first chunk
# (benchmarks/results/demo_quality_run5.json; helios_jax/assets/demo/README.md).
BUNDLED_STAGE = "base"


def _reusable(folder: str, name: str) -> str:
  """``folder/transformer`` when ``folder`` is a demo pipeline folder of stage ``name``, else ""."""
  idx = os.path.join(folder or "", "model_index.json")
  if not os.path.isfile(idx):
    return ""
  with open(idx, encoding="utf-8") as f:
    return os.path.join(folder, "transformer") if json.load(f).get("helios_jax_demo") == name else ""


CONTINUABLE = ("base", "base_nocorrupt", "mid")


def _continue_folders(specs: list[str], reuse: str) -> dict[str, str]:
  """``--continue STAGE[=FOLDER]`` values -> {stage: pipeline folder}; the default folder of ``mid`` is ``reuse``,
  of the others ``runs/demo/<stage>`` (where ``--assemble`` puts them). Raises ValueError on a bad value."""
  out = {}
  for spec in specs:
    name, _, folder = spec.partition("=")
    if name not in CONTINUABLE:
      raise ValueError(f"--continue {spec!r}: the stage must be one of {', '.join(CONTINUABLE)}")
    out[name] = folder or (reuse if name == "mid" else os.path.join(ROOT, "runs", "demo", name))
  return out


STAGES = ("vae", "base", "mid", "base_nocorrupt", "ode", "ahd")


def _parse_sets(specs: list[str]) -> list[tuple[str, str, object]]:
  """``--set STAGE:KEY=VALUE`` values -> [(stage, dotted key, value)]; VALUE is a Python literal (number, bool,
  string, tuple) or else a plain string. Raises ValueError on a malformed value or an unknown stage or key."""
  import ast
  out = []
  for spec in specs:
    stage, colon, rest = spec.partition(":")
    key, eq, raw = rest.partition("=")
    if not colon or not eq or not key:
      raise ValueError(f"--set {spec!r}: expected STAGE:KEY=VALUE, e.g. base:objective.random_drop_i2v=0.5")
    if stage not in STAGES:
      raise ValueError(f"--set {spec!r}: the stage must be one of {', '.join(STAGES)}")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    _apply_set(_stage_config(stage, ""), key, value, spec)  # fails here, before any device time, on a bad key
    out.append((stage, key, value))
  return out


def _stage_config(name: str, variant: str):
  """The config module's ConfigDict of stage ``name`` (``variant`` "" or "tiny"), before the run's own settings:
  the one place that maps a stage to its config (``run`` and ``--set``'s checks)."""
  from configs import demo_ahd
  from configs import demo_base
  from configs import demo_mid
  from configs import demo_ode
  from configs import demo_vae
  if name in ("base", "base_nocorrupt"):
    return demo_base.get_config(",".join(v for v in (variant, "nocorrupt" if name == "base_nocorrupt" else "") if v))
  return dict(vae=demo_vae, mid=demo_mid, ode=demo_ode, ahd=demo_ahd)[name].get_config(variant)


def _apply_set(cfg, key: str, value, spec: str = "") -> None:
  """Sets dotted ``key`` of ConfigDict ``cfg`` to ``value`` (an existing key only; ConfigDict checks the type)."""
  *parents, leaf = key.split(".")
  node = cfg
  for part in parents:
    if part not in node:
      raise ValueError(f"--set {spec or key!r}: the config has no {part!r} in {key!r}")
    node = node[part]
  if not hasattr(node, "keys") or leaf not in node:
    raise ValueError(f"--set {spec or key!r}: the config has no key {key!r}")
  try:
    node[leaf] = value
  except TypeError as e:
    raise ValueError(f"--set {spec or key!r}: {e}") from None


def _apply_sets(cfg, name: str, sets) -> None:
  for stage, key, value in sets:
    if stage == name:
      _apply_set(cfg, key, value)


def _metrics(workdir: str) -> list[dict]:
  from helios_jax.training.metrics import read_metrics
  return read_metrics(workdir)


def _tar(path: str, members: dict[str, str]) -> None:
  with tarfile.open(path, "w:gz") as tar:
    for arcname, src in members.items():
      tar.add(src, arcname=arcname)


def run(args) -> dict:
  import jax
  from recipes.demo import demo, vae_train
  quick = args.quick
  budgets = dict(QUICK_BUDGETS if quick else BUDGETS)
  for item in args.budget or []:
    k, v = item.split("=")
    budgets[k] = float(v)
  stages = args.stages.split(",")
  work = args.work
  comp = os.path.join(work, "components")
  os.makedirs(args.out, exist_ok=True)
  os.makedirs(comp, exist_ok=True)
  args.sets = getattr(args, "sets", [])
  log = dict(device=str(jax.devices()[0]), quick=quick, stages={}, budgets=budgets, started=time.time(),
             posterior=args.posterior, sets=[f"{st}:{k}={v!r}" for st, k, v in args.sets])
  t_all = time.perf_counter()

  def save_log():
    log["elapsed_s"] = time.perf_counter() - t_all
    with open(os.path.join(args.out, "train_log.json"), "w", encoding="utf-8") as f:
      json.dump(log, f, indent=1)

  variant = "tiny" if quick else ""
  # 1. VAE (or reuse the bundled one)
  vae_folder = os.path.join(comp, "vae")
  if "vae" in stages:
    t0 = time.perf_counter()
    cfg = _stage_config("vae", variant)
    cfg.max_seconds = budgets["vae"]
    cfg.image_max_seconds = budgets["vae_images"]
    _apply_sets(cfg, "vae", args.sets)
    if args.vae_steps:
      cfg.total_steps = args.vae_steps
    if args.batch:
      cfg.batch_size = args.batch
      cfg.stats_clips = args.batch
    vae, losses = vae_train.train_vae(cfg, os.path.join(work, "vae_run"), progress=True)
    vae_train.save_vae(vae, vae_folder)
    train_s = time.perf_counter() - t0
    recon = demo.reconstruction_psnr(vae, vae_train.scene_config(cfg.data), num_clips=2 if quick else 4)
    log["stages"]["vae"] = dict(seconds=train_s, metrics=_metrics(os.path.join(work, "vae_run")),
                                latents_mean=list(vae.config.latents_mean),
                                latents_std=list(vae.config.latents_std),
                                recon_psnr_per_frame=[round(float(v), 2) for v in recon.mean(axis=0)])
    parts = demo.psnr_parts(recon)
    _log(f"vae done in {train_s:.0f} s, last loss {losses[-1]:.4f}; held-out 33-frame reconstruction PSNR "
         f"{parts['mean']:.2f} dB (frame 0: {parts['frame0']:.2f}, frames 1-16: {parts['frames_1_16']:.2f}, "
         f"17-32: {parts['frames_17_32']:.2f})")
    save_log()
  elif not os.path.isdir(vae_folder):
    shutil.copytree(os.path.join(args.reuse, "vae"), vae_folder)
  # 2. text side (random, frozen; deterministic from the seed)
  if not os.path.isdir(os.path.join(comp, "text_encoder")):
    if args.reuse and os.path.isdir(os.path.join(args.reuse, "text_encoder")):
      for name in ("text_encoder", "tokenizer"):
        shutil.copytree(os.path.join(args.reuse, name), os.path.join(comp, name))
    else:
      vocab = demo.write_tokenizer(os.path.join(comp, "tokenizer"))
      demo.write_text_encoder(os.path.join(comp, "text_encoder"), vocab, seed=0)
  _tar(os.path.join(args.out, "components.tar.gz"), {n: os.path.join(comp, n) for n in
                                                     ("vae", "text_encoder", "tokenizer")})
  # 3. encoded scenes
  data_dir = os.path.join(work, "data")
  needs_data = any(n in stages for n in ("base", "mid", "base_nocorrupt", "ode", "ahd"))
  meta_path = os.path.join(data_dir, "meta.json")
  if needs_data and os.path.isfile(meta_path):
    with open(meta_path, encoding="utf-8") as f:
      cached = json.load(f).get("posterior", "sample")  # folders from before the option hold samples
    if cached != args.posterior:
      _log(f"{data_dir} holds posterior {cached}s, --posterior is {args.posterior}: re-encoding")
      shutil.rmtree(data_dir)
  if needs_data and not os.path.isfile(meta_path):
    from helios_jax.models.vae import AutoencoderKLWan
    t0 = time.perf_counter()
    vae = AutoencoderKLWan.from_pretrained(vae_folder)
    embed = demo.caption_embedder(os.path.join(comp, "text_encoder"), os.path.join(comp, "tokenizer"))
    vcfg = _stage_config("vae", variant)
    meta = demo.encode_dataset(data_dir, vae, embed, num_clips=args.clips or (8 if quick else 3072),
                               num_chunks=_stage_config("base", variant).data.num_chunks, seed=0,
                               scene_cfg=vae_train.scene_config(vcfg.data), batch=4 if quick else 16,
                               progress=True, posterior=args.posterior)
    log["stages"]["data"] = dict(seconds=time.perf_counter() - t0, meta=meta)
    _log(f"encoded {meta['num_clips']} clips in {time.perf_counter() - t0:.0f} s")
    save_log()
  # 4. transformer stages
  trained = {}
  continued = getattr(args, "continued", {})
  reused_mid = _reusable(args.reuse, "mid")
  reused_base = _reusable(args.reuse, "base")  # lets Mid train in a later call than its Base
  for name in ("base", "mid", "base_nocorrupt", "ode", "ahd"):
    if name not in stages:
      continue
    mid = trained.get("mid") or reused_mid
    start = ""  # --continue: the transformer this stage resumes from
    if name in continued:
      start = _reusable(continued[name], name)
      if not start:
        _log(f"--continue {name} needs a {name} pipeline folder, {continued[name]!r} is not; {name} skipped")
        continue
    if name == "mid":
      base = start or trained.get("base") or reused_base
      if not base:
        _log("mid needs a Base: add 'base' to --stages or --reuse an assembled Base folder; skipped")
        continue
      cfg = _stage_config(name, variant)
      cfg.model.pretrained = base
    elif name in ("ode", "ahd"):
      if not mid or (name == "ahd" and "ode" not in trained):
        _log(f"{name} needs {'the ode stage and ' if name == 'ahd' else ''}a Mid transformer; skipped")
        continue
      cfg = _stage_config(name, variant)
      if name == "ode":
        cfg.model.pretrained = mid
        cfg.ode.data_dir = os.path.join(work, "ode_pairs")
      else:
        cfg.model.pretrained = trained["ode"]
        cfg.teacher.pretrained = mid
    else:
      cfg = _stage_config(name, variant)
      cfg.model.pretrained = start  # "" = from scratch
    cfg.data.data_dir = data_dir
    _apply_sets(cfg, name, args.sets)
    if args.steps:
      cfg.total_steps = args.steps
    if args.batch:
      cfg.batch_size = args.batch
    budget = budgets.get(name, 0.0)
    if args.total > 0:
      left = args.total - (time.perf_counter() - t_all) - MARGIN
      if left < 30:
        _log(f"{name}: skipped, only {left:.0f} s of the total budget left")
        log["stages"][name] = dict(skipped=True)
        continue
      budget = min(budget, left) if budget > 0 else left
    t0 = time.perf_counter()
    wd = os.path.join(work, f"{name}_continued" if start else name)  # not the run it continues
    if os.path.isdir(wd):  # an earlier call's run: resuming it would fail (or skip training) on another config
      _log(f"{name}: removing the earlier run in {wd}; this call starts a fresh one")
      shutil.rmtree(wd)
    out = train_with_budget(cfg, wd, budget)
    merged = os.path.join(wd, "merged")
    trained[name] = merged
    if name != "ode":  # the ODE-regressed student is only the start of the DMD loop
      _tar(os.path.join(args.out, f"transformer_{TAR_NAME.get(name, name)}.tar.gz"),
           {"transformer": _bf16_copy(merged, wd)})
    log["stages"][name] = dict(seconds=time.perf_counter() - t0, final_step=out["final_step"],
                               requested_steps=out.get("requested_steps", int(cfg.total_steps)),
                               num_trainable=out["num_trainable"], metrics=_metrics(wd))
    _log(f"{name}: {out['final_step']} steps in {time.perf_counter() - t0:.0f} s, "
         f"last loss {out['losses'][-1] if out['losses'] else float('nan'):.4f}")
    save_log()
  if args.quality:
    quality(args, comp, trained, log)
  save_log()
  return log


QUALITY_STEPS = dict(base="50", base_nocorrupt="50", mid="10,10,10", distilled="1,1,1")


def quality(args, comp: str, trained: dict, log: dict) -> None:
  """Runs recipes/demo/demo_quality.py on every model at hand: the ones trained now (assembled from ``comp``), the
  bundled default and ``runs/demo/*`` from an earlier run. Writes OUT/demo_quality.json and contact sheets."""
  from recipes.demo import demo_quality
  from helios_jax.io.checkpoint import load_json
  from recipes.demo import demo
  folders = {}
  for name in ("base", "base_nocorrupt", "mid", "distilled"):
    for cand in (os.path.join(ROOT, "runs", "demo", name), DEFAULT_MODEL):
      idx = os.path.join(cand, "model_index.json")
      if os.path.isfile(idx) and load_json(idx).get("helios_jax_demo", name) == name:
        folders[name] = cand
        break
  scene = log["stages"].get("data", {}).get("meta", {})
  for stage, merged in trained.items():
    if stage == "ode":
      continue
    name = TAR_NAME.get(stage, stage)
    out = os.path.join(args.work, "pipelines", name)
    defaults = dict(height=scene.get("pixel_height", 128), width=scene.get("pixel_width", 128), num_frames=99,
                    latents_posterior=scene.get("posterior", log.get("posterior", "sample")),
                    **SAMPLE_DEFAULTS[name])
    demo.write_pipeline_folder(out, "base" if name.startswith("base") else name, merged, os.path.join(comp, "vae"),
                               os.path.join(comp, "text_encoder"), os.path.join(comp, "tokenizer"),
                               extra={"helios_jax_defaults": defaults, "helios_jax_demo": name})
    folders[name] = out
  if args.quality_models:
    folders = {n: p for n, p in folders.items() if n in args.quality_models.split(",")}
  specs = [f"{n}={p}:{QUALITY_STEPS[n]}" for n, p in folders.items()]
  _log(f"quality benchmark on {', '.join(folders)}")
  t0 = time.perf_counter()
  argv = sum((["--model", sp] for sp in specs), []) + [
      "--clips", str(args.quality_clips), "--chunks", str(args.quality_chunks),
      "--out", os.path.join(args.out, "demo_quality.json"), "--save-frames", os.path.join(args.out, "sheets")]
  demo_quality.main(argv)
  log["quality_seconds"] = time.perf_counter() - t0


def _extract(tar_path: str, dest: str) -> None:
  with tarfile.open(tar_path) as tar:
    tar.extractall(dest, filter="data") if sys.version_info >= (3, 12) else tar.extractall(dest)


def assemble(src: str, default_kind: str = "", runs: str = os.path.join(ROOT, "runs", "demo")) -> dict:
  """Unpacks a run's outputs (``src``) into pipeline folders; returns {name: folder}."""
  import tempfile
  from recipes.demo import demo
  with open(os.path.join(src, "train_log.json"), encoding="utf-8") as f:
    log = json.load(f)
  tmp = tempfile.mkdtemp(prefix="demo_assemble_")
  _extract(os.path.join(src, "components.tar.gz"), tmp)
  names = [n for n in ("mid", "base", "base_nocorrupt", "distilled")
           if os.path.isfile(os.path.join(src, f"transformer_{n}.tar.gz"))]
  if not names:
    raise SystemExit(f"no transformer_*.tar.gz in {src}")
  # The bundled stage is the Base (the model card says why); a run without it leaves the bundled model alone.
  default = default_kind or (BUNDLED_STAGE if BUNDLED_STAGE in names else "")
  scene = log["stages"].get("data", {}).get("meta", {})
  folders = {}
  for name in names:
    t = os.path.join(tmp, name)
    _extract(os.path.join(src, f"transformer_{name}.tar.gz"), t)
    kind = "base" if name.startswith("base") else name
    out = DEFAULT_MODEL if name == default else os.path.join(runs, name)
    shutil.rmtree(out, ignore_errors=True)
    defaults = dict(height=scene.get("pixel_height", 128), width=scene.get("pixel_width", 128), num_frames=99,
                    latents_posterior=scene.get("posterior", log.get("posterior", "sample")),
                    **SAMPLE_DEFAULTS[name])
    demo.write_pipeline_folder(out, kind, os.path.join(t, "transformer"), os.path.join(tmp, "vae"),
                               os.path.join(tmp, "text_encoder"), os.path.join(tmp, "tokenizer"),
                               extra={"helios_jax_defaults": defaults, "helios_jax_demo": name})
    folders[name] = out
    print(f"{name} -> {out}")
  shutil.rmtree(tmp, ignore_errors=True)
  return folders


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", help="output folder ($OUT on the GPU machine)")
  p.add_argument("--work", default="/tmp/helios_demo_work", help="scratch folder (runs, encoded data)")
  p.add_argument("--quick", action="store_true", help="CPU dry run: :tiny configs, a few steps")
  p.add_argument("--stages", default="vae,base,mid",
                 help="comma list of vae, base, mid, base_nocorrupt, ode, ahd (ode + ahd = the distilled model; "
                      "without mid in the run they distil the --reuse folder's Mid; mid without base starts from "
                      "the --reuse folder's Base)")
  p.add_argument("--reuse", default=DEFAULT_MODEL,
                 help="pipeline folder whose vae/ text_encoder/ tokenizer/ are reused when 'vae' is not a stage")
  p.add_argument("--budget", action="append", metavar="STAGE=SECONDS",
                 help="override a stage's budget (vae_images: the VAE's image phase)")
  p.add_argument("--total", type=float, help=f"whole-run budget in seconds (default {TOTAL_BUDGET:.0f}; 0 = none; "
                                             "--quick: none)")
  p.add_argument("--steps", type=int, help="override total_steps of the transformer stages")
  p.add_argument("--continue", dest="continue_from", action="append", metavar="STAGE[=FOLDER]", default=[],
                 help="more steps for an already trained base, base_nocorrupt or mid: the stage starts from "
                      "FOLDER's transformer (a demo pipeline folder of that stage; default: runs/demo/STAGE, for "
                      "mid the --reuse folder) instead of from scratch or from a Base")
  p.add_argument("--continue-mid", action="store_true", help="the same as --continue mid")
  p.add_argument("--set", dest="set_specs", action="append", metavar="STAGE:KEY=VALUE", default=[],
                 help="override a key of one stage's config, e.g. base:objective.random_drop_i2v=0.5 (repeatable; "
                      "applied after the script's own settings, before --steps / --batch; recorded in train_log)")
  p.add_argument("--vae-steps", type=int, help="override total_steps of the VAE")
  p.add_argument("--clips", type=int, help="number of encoded training clips")
  p.add_argument("--posterior", default="mean", choices=("mean", "sample"),
                 help="latents stored for the transformer stages: the VAE posterior mean (default) or a sample "
                      "(see recipes.demo.demo: sampled latents made the first Base ignore its history)")
  p.add_argument("--batch", type=int, help="override every stage's batch size (a CPU dry run of the full configs)")
  p.add_argument("--quality", action="store_true",
                 help="afterwards run recipes/demo/demo_quality.py on the trained, bundled and runs/demo/* models")
  p.add_argument("--quality-models", help="comma list: benchmark only these (base, base_nocorrupt, mid, distilled)")
  p.add_argument("--quality-clips", type=int, default=8)
  p.add_argument("--quality-chunks", type=int, default=10)
  p.add_argument("--assemble", metavar="SRC", help="unpack SRC (a run's --out) into helios_jax/assets/demo")
  p.add_argument("--default", default="",
                 help="with --assemble: which stage becomes the bundled default (default: base when the run has it; "
                      "'none': keep the bundled model)")
  args = p.parse_args(argv)
  if args.assemble:
    assemble(args.assemble, args.default)
    return 0
  if not args.out:
    p.error("--out is required")
  if args.total is None:
    args.total = 0.0 if args.quick else TOTAL_BUDGET
  try:
    args.continued = _continue_folders(args.continue_from + (["mid"] if args.continue_mid else []), args.reuse)
    args.sets = _parse_sets(args.set_specs)
  except ValueError as e:
    p.error(str(e))
  unused = sorted({st for st, _, _ in args.sets} - set(args.stages.split(",")))
  if unused:
    p.error(f"--set names stage(s) {', '.join(unused)} that --stages ({args.stages}) does not run")
  log = run(args)
  print(json.dumps({k: v for k, v in log.items() if k != "stages"}, indent=1))
  for name, rec in log["stages"].items():
    m = rec.get("metrics") or []
    if rec.get("skipped") or "seconds" not in rec:
      print(f"{name}: skipped")
      continue
    print(f"{name}: {rec['seconds']:.0f} s" + (f", final loss {m[-1].get('loss')}" if m else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
