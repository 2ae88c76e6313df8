"""Regenerates the scheduler parity fixtures from diffusers 0.42.1 (PyTorch, CPU).

What it writes (all under ``tests/reference/fixtures/schedulers/``, compressed ``.npz``, ~0.5 MB in total):

* ``geometry_<name>.npz`` -- the tables a scheduler builds at construction for one config: global ``sigmas`` /
  ``timesteps``, per stage ``ori_start_sigmas``, ``start_sigmas``, ``end_sigmas``, ``timestep_ratios``,
  ``timesteps_per_stage``, ``sigmas_per_stage``, and the pyramid pipeline's renoise ``alpha``/``beta`` per stage.
* ``mu.npz`` -- ``calculate_shift`` of the pipelines for several token counts, once with the default keys and once
  with a config that carries its own ``base_shift``/``max_shift``/``base_image_seq_len``/``max_image_seq_len``
  (read through ``scheduler.config.get`` as the pipelines do).
* ``case_<name>.npz`` -- one schedule run per pyramid stage ("call" j): ``timesteps_j`` / ``sigmas_j`` after
  ``set_timesteps`` and, for stepped cases, the start latent ``x_init_j``, the fed model outputs ``v_j``
  (steps, *shape), and every intermediate result ``out_j`` (steps, *shape). Model outputs are random normals
  (seeded numpy), in float32 or rounded to bfloat16 (``model_dtype``); bf16 values are stored as float32.
  ``meta`` is a JSON string: scheduler class, config dict, and per call its ``set_timesteps`` arguments and dtypes.

Run (needs ``pip install -r requirements-reference.txt``)::

    /work/venv/bin/python tests/reference/make_scheduler_fixtures.py

It is seeded: re-running re-creates identical arrays.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from diffusers import HeliosDMDScheduler, HeliosScheduler
from diffusers.pipelines.helios.pipeline_helios import calculate_shift

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "schedulers")
SHAPE = (2, 2, 2, 4, 4)  # (B, C, T, H, W), small on purpose
CLASSES = {"HeliosScheduler": HeliosScheduler, "HeliosDMDScheduler": HeliosDMDScheduler}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pipeline_mu(scheduler, image_seq_len):
  """mu exactly as the Helios pipelines compute it (defaults through ``scheduler.config.get``)."""
  cfg = scheduler.config
  return calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))


def renoise_alpha_beta(scheduler, stage):
  """The pyramid pipeline's stage-start renoise constants (from ``ori_start_sigmas``)."""
  signal = 1 - scheduler.ori_start_sigmas[stage]
  gamma = scheduler.config.gamma
  alpha = 1 / (math.sqrt(1 + (1 / gamma)) * (1 - signal) + signal)
  beta = alpha * (1 - signal) / math.sqrt(gamma)
  return alpha, beta


def save(name, arrays):
  os.makedirs(OUT, exist_ok=True)
  np.savez_compressed(os.path.join(OUT, name + ".npz"), **arrays)


def write_geometry(name, config):
  s = HeliosScheduler.from_config(config)
  stages = s.config.stages
  arrays = {
      "config": np.array(json.dumps(config)),
      "sigmas": s.sigmas.numpy(), "timesteps": s.timesteps.numpy(),
      "ori_start_sigmas": np.array([s.ori_start_sigmas[i] for i in range(stages)]),
      "start_sigmas": np.array([s.start_sigmas[i] for i in range(stages)]),
      "end_sigmas": np.array([s.end_sigmas[i] for i in range(stages)]),
      "timestep_ratios": np.array([s.timestep_ratios[i] for i in range(stages)]),
      "timesteps_per_stage": np.stack([s.timesteps_per_stage[i].numpy() for i in range(stages)]),
      "sigmas_per_stage": np.stack([s.sigmas_per_stage[i].numpy() for i in range(stages)]),
      "renoise": np.array([renoise_alpha_beta(s, i) if i > 0 else (np.nan, np.nan) for i in range(stages)]),
  }
  save("geometry_" + name, arrays)


def write_mu():
  lens = np.array([256, 540, 1000, 2160, 4096, 8640], np.float64)
  plain = HeliosScheduler.from_config({})
  custom_cfg = {"base_shift": 0.3, "max_shift": 1.4, "base_image_seq_len": 128, "max_image_seq_len": 8192,
                "stages": 3}
  custom = HeliosScheduler.from_config(custom_cfg)
  save("mu", {"lens": lens, "mu_default": np.array([pipeline_mu(plain, int(n)) for n in lens]),
              "custom_config": np.array(json.dumps(custom_cfg)),
              "mu_custom": np.array([pipeline_mu(custom, int(n)) for n in lens])})


def write_case(name, cls_name, config, calls, seed, stepped=True):
  """Runs each call (one ``set_timesteps`` + its steps) through diffusers and saves tables and trajectories.

  ``calls``: list of dicts with ``steps``, ``stage`` (or None), ``tokens`` (for mu, or None), ``amplify``,
  ``sigmas`` ("plain" for the plain pipeline's grid, or None), ``model_dtype``, ``sample_dtype``.
  """
  rng = np.random.default_rng(seed)
  sched = CLASSES[cls_name].from_config(config)
  is_dmd = cls_name == "HeliosDMDScheduler"
  arrays = {}
  meta_calls = []
  for j, call in enumerate(calls):
    mu = pipeline_mu(sched, call["tokens"]) if call.get("tokens") is not None else None
    sigmas = None
    if call.get("sigmas") == "plain":
      sigmas = np.linspace(0.999, 0.0, call["steps"] + 1)[:-1]
    kwargs = dict(mu=mu, is_amplify_first_chunk=call.get("amplify", False))
    if sigmas is not None:
      kwargs["sigmas"] = sigmas
    sched.set_timesteps(call["steps"], call.get("stage"), **kwargs)
    timesteps = sched.timesteps.clone()
    arrays[f"timesteps_{j}"] = timesteps.numpy().astype(np.float64)
    arrays[f"sigmas_{j}"] = sched.sigmas.numpy().astype(np.float64)
    meta_calls.append({**{k: v for k, v in call.items()}, "mu": mu})
    if not stepped:
      continue
    mdt = TORCH_DTYPES[call.get("model_dtype", "float32")]
    sdt = TORCH_DTYPES[call.get("sample_dtype", "float32")]
    n = len(timesteps)
    x_init = torch.from_numpy(rng.standard_normal(SHAPE).astype(np.float32)).to(sdt)
    v_all = torch.from_numpy(rng.standard_normal((n,) + SHAPE).astype(np.float32)).to(mdt)
    x = x_init
    outs = []
    for k, t in enumerate(timesteps):
      if is_dmd:
        x = sched.step(v_all[k], t, x, cur_sampling_step=k, dmd_noisy_tensor=x_init, dmd_sigmas=sched.sigmas,
                       dmd_timesteps=sched.timesteps, all_timesteps=timesteps, return_dict=False)[0]
      else:
        x = sched.step(v_all[k], t, x, return_dict=False)[0]
      outs.append(x)
    arrays[f"x_init_{j}"] = x_init.float().numpy()
    arrays[f"v_{j}"] = v_all.float().numpy()
    arrays[f"out_{j}"] = torch.stack([o.float() for o in outs]).numpy()
    meta_calls[-1]["out_dtypes"] = [str(o.dtype).replace("torch.", "") for o in outs]
  meta = {"class": cls_name, "config": config, "calls": meta_calls, "stepped": stepped}
  arrays["meta"] = np.array(json.dumps(meta))
  save("case_" + name, arrays)


PYRAMID_TOKENS = [540, 540, 2160]  # 384x640: stage 0 and 1 from the 12x20 latent, stage 2 from 24x40 (spec 3.5)


def pyramid(steps, **extra):
  return [dict(steps=s, stage=i, tokens=PYRAMID_TOKENS[i], **extra) for i, s in enumerate(steps)]


def main():
  torch.manual_seed(0)
  write_geometry("default", {})
  write_geometry("custom3", {"stage_range": [0, 0.25, 0.6, 1], "gamma": 0.25, "num_train_timesteps": 1000})
  write_geometry("custom2", {"stages": 2, "stage_range": [0, 0.4, 1], "gamma": 0.5, "shift": 2.0,
                             "num_train_timesteps": 800})
  write_mu()

  dyn_exp = {"stages": 3, "use_dynamic_shifting": True, "time_shift_type": "exponential"}
  # Helios-Base: plain pipeline, one stage, 50 steps, grid linspace(0.999, 0, n+1)[:-1], mu(9*48*80/4).
  write_case("base", "HeliosScheduler",
             {"stages": 1, "use_dynamic_shifting": True, "time_shift_type": "exponential"},
             [dict(steps=50, stage=None, tokens=9 * 48 * 80 // 4, sigmas="plain")], seed=1)
  # Helios-Mid: pyramid UniPC [20, 20, 20], exponential shift.
  write_case("mid", "HeliosScheduler", dyn_exp, pyramid([20, 20, 20]), seed=2)
  write_case("mid_bf16", "HeliosScheduler", dyn_exp, pyramid([10, 10, 10], model_dtype="bfloat16"), seed=3)
  write_case("bh1_static", "HeliosScheduler", {"stages": 3, "solver_type": "bh1"}, pyramid([8, 8, 8]), seed=4)
  write_case("bh2_linear", "HeliosScheduler",
             {"stages": 3, "use_dynamic_shifting": True, "time_shift_type": "linear", "solver_type": "bh2",
              "lower_order_final": False},
             pyramid([6, 6, 6]), seed=5)
  write_case("disable_corrector", "HeliosScheduler", {**dyn_exp, "disable_corrector": [0, 3, 5]},
             pyramid([10, 10, 10]), seed=6)
  write_case("euler", "HeliosScheduler", {**dyn_exp, "scheduler_type": "euler"}, pyramid([10, 10, 10]), seed=7)
  write_case("euler_bf16", "HeliosScheduler", {**dyn_exp, "scheduler_type": "euler"},
             pyramid([6, 6, 6], model_dtype="bfloat16"), seed=8)
  # stages == 1 without custom sigmas: the reference's float32 grid, a static shift, and the non-flow
  # alpha/sigma of UniPC (this grid starts at sigma = 1, which the flow alpha/sigma cannot take).
  write_case("plain_static_shift", "HeliosScheduler",
             {"stages": 1, "shift": 3.0, "use_flow_sigmas": False}, [dict(steps=12, stage=None)], seed=9)
  write_case("plain_dynamic_f32", "HeliosScheduler",
             {"stages": 1, "use_dynamic_shifting": True, "time_shift_type": "linear", "stage_range": [0, 1],
              "solver_order": 1}, [dict(steps=8, stage=None, tokens=2000)], seed=10)
  # Helios-Distilled: DMD, linear shift.
  dmd = {"stages": 3, "use_dynamic_shifting": True, "time_shift_type": "linear"}
  write_case("dmd_222", "HeliosDMDScheduler", dmd, pyramid([2, 2, 2]), seed=11)
  write_case("dmd_222_amp", "HeliosDMDScheduler", dmd, pyramid([2, 2, 2], amplify=True), seed=12)
  write_case("dmd_111", "HeliosDMDScheduler", dmd, pyramid([1, 1, 1]), seed=13)
  write_case("dmd_111_amp", "HeliosDMDScheduler", dmd, pyramid([1, 1, 1], amplify=True), seed=14)
  write_case("dmd_333_exp", "HeliosDMDScheduler", {"stages": 3, "use_dynamic_shifting": True,
                                                    "time_shift_type": "exponential"}, pyramid([3, 3, 3]), seed=15)
  # bf16 as the distilled pipeline runs: stage 0 float32 latents, stages 1-2 bf16 latents; bf16 model outputs.
  write_case("dmd_222_amp_bf16", "HeliosDMDScheduler", dmd,
             [dict(steps=2, stage=0, tokens=540, amplify=True, model_dtype="bfloat16", sample_dtype="float32"),
              dict(steps=2, stage=1, tokens=540, amplify=True, model_dtype="bfloat16", sample_dtype="bfloat16"),
              dict(steps=2, stage=2, tokens=2160, amplify=True, model_dtype="bfloat16", sample_dtype="bfloat16")],
             seed=16)
  # The official HeliosScheduler's "dmd" type: same tables as HeliosDMDScheduler (diffusers cannot step it).
  write_case("helios_dmd_type_tables", "HeliosScheduler", {**dmd, "scheduler_type": "dmd"},
             pyramid([2, 2, 2], amplify=True), seed=17, stepped=False)
  total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
  print(f"wrote {len(os.listdir(OUT))} files, {total / 1e6:.2f} MB, to {OUT}")


if __name__ == "__main__":
  main()
