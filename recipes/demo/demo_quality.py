"""Quality of the demo models on held-out procedural scenes, where the ground truth is known exactly.

    python -m recipes.demo.demo_quality --model distilled=PATH:1,1,1 --model base=PATH:50 \
        --model base_nocorrupt=PATH:50 --clips 8 --chunks 10 --out results.json
    python -m recipes.demo.demo_quality --model mid=PATH:10,10,10 --model mid_cfg3=PATH:10,10,10@3 \
        --compare mid_cfg3:mid

For each model and each held-out clip (scene stream ``--seed``, never used in training) the model continues the
clip's first frame (I2V) with the clip's caption for ``--chunks`` chunks of 33 frames; with ``--condition video``
it continues the clip's first 33 frames instead (V2V: the full history of a chunk, not just one image) and is
scored on the frames after them. Measured against the
renderer's ground truth:

* object-position error: every object is located in every generated frame by its colour (centroid of the pixels
  within ``--colour-tol`` of its RGB colour) and compared with its true centre (pixels); a frame where the object
  is not found counts as a miss (``detect_rate``) and is left out of the error;
* on-target rate (``hit_rate``): the share of object-frames where an object of the right colour is found within
  the object's own circumradius of its true centre (the drawn object covers the true centre). It counts a miss as
  a miss, so a model that draws faint objects found only near the start image cannot look better than one that
  draws every object (the position error, over detected frames only, can);
* PSNR of the generated frames against the true continuation;
* drift: both per chunk index (how error grows along the video), with the slope of a least-squares line.

The locator is checked on the ground truth frames themselves (``locator_check``: error and miss rate of the
method with a perfect generator). Two baselines without a model put the numbers in scale (``baselines``): the
start image repeated (a model that draws the right objects and never moves them), and a uniformly random point
per object and frame (a model that draws the right objects anywhere: its position error, no PSNR).

Each clip is sampled with ``--seeds`` sampling seeds (``--seed``, ``--seed + 1``, ...); a clip-and-seed pair is one
sample. ``--compare A:B`` (repeatable; by default base:base_nocorrupt and distilled:base when those models are
given) reports the paired per-sample difference A - B of the mean position error, on-target rate and PSNR, with a 95%
bootstrap interval over the samples: an interval that contains 0 means these clips and seeds do not separate the
two models. A model's ``@G`` suffix sets its classifier-free guidance scale (default: its folder's default).

``--score-video OUT.mp4`` scores one output of ``python sample.py --mode MODE`` with the bundled inputs instead
(``--mode``, default i2v: the scene behind that mode's bundled prompt, start image or start video). It tracks every
object of the scene by its colour in every frame: found or not (``locate``'s rule), pixel count, centroid, number
of separate blobs (8-connected pieces of the colour of at least ``--min-blob`` pixels), frame-to-frame centroid
jump, and for i2v and v2v the distance to the true centre (v2v's output frame 0 is scene frame 33); then the events:
frames where an object is missing or split, the jumps above ``--jump-px`` and whether they sit on chunk boundaries
(frames 33, 66, ...), where a vanished object comes back, each chunk's net direction of motion beside the
caption's and the truth's, and the frame-to-frame change of the whole image. t2v's model never sees its scene (only
the caption), so t2v gets motion only. ``--per-frame FILE`` writes it all as JSON ({mode: tracks}). For i2v it also
prints (and ``--out`` writes) the per-chunk position error and on-target rate against the scene's ground truth,
beside the start image left standing.

Results: one JSON record per model with per-chunk curves, per-sample means and summaries, also appended to
``benchmarks/results/demo_quality.jsonl`` when ``--record`` is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipes.demo import demo, scenes

WINDOW = 33
HELD_OUT_SEED = 2024


def locate(frames: np.ndarray, colour: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
  """Centroids (x, y) of the pixels near ``colour``. frames (F, H, W, 3) in [0, 1]; -> (F, 2), found (F,) bool."""
  dist = np.linalg.norm(frames - np.asarray(colour)[None, None, None], axis=-1)
  mask = dist < tol
  count = mask.sum(axis=(1, 2))
  h, w = frames.shape[1:3]
  ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
  cx = (mask.sum(axis=1) * xs[None]).sum(axis=1) / np.maximum(count, 1)
  cy = (mask.sum(axis=2) * ys[None]).sum(axis=1) / np.maximum(count, 1)
  return np.stack([cx, cy], axis=-1), count >= 4  # fewer than 4 pixels: not found


psnr = demo.frame_psnr  # per-frame PSNR (dB) of (F, H, W, 3) images in [0, 1]


def clip_metrics(frames: np.ndarray, truth: np.ndarray, params: dict, positions: np.ndarray, tol: float) -> dict:
  """Per-frame position error (F, K) (NaN where missed or inactive), found (F, K), hit (F, K): found within the
  object's circumradius of its true centre, psnr (F,)."""
  f = min(len(frames), len(truth))
  err = np.full((f, scenes.MAX_OBJECTS), np.nan)
  found = np.zeros((f, scenes.MAX_OBJECTS), bool)
  for k in range(scenes.MAX_OBJECTS):
    if not params["active"][k]:
      continue
    c, ok = locate(frames[:f], params["colour"][k], tol)
    found[:, k] = ok
    e = np.linalg.norm(c - positions[:f, k], axis=-1)
    err[:, k] = np.where(ok, e, np.nan)
  return dict(err=err, found=found, hit=_hits(err, params), psnr=psnr(frames[:f], truth[:f]),
              active=params["active"].astype(bool))


def _hits(err: np.ndarray, params: dict) -> np.ndarray:
  """(F, K) bool: a position error (NaN = missed) below the object's circumradius."""
  radius = np.asarray(params["radius"], np.float64)[None]
  return np.nan_to_num(err, nan=np.inf) < radius


def per_chunk(records: list[dict], chunks: int, skip_first_frame: bool = True) -> dict:
  """Aggregates clip metrics by chunk index: mean position error, detection rate, PSNR."""
  out = dict(pos_err=[], detect_rate=[], hit_rate=[], psnr=[])
  for c in range(chunks):
    lo, hi = c * WINDOW + (1 if (c == 0 and skip_first_frame) else 0), (c + 1) * WINDOW
    errs, found, hits, ps = [], [], [], []
    for r in records:
      act = r["active"]
      errs.append(r["err"][lo:hi][:, act].ravel())
      found.append(r["found"][lo:hi][:, act].ravel())
      hits.append(r["hit"][lo:hi][:, act].ravel())
      ps.append(r["psnr"][lo:hi])
    out["pos_err"].append(_nanmean(np.concatenate(errs)))
    out["detect_rate"].append(float(np.concatenate(found).mean()))
    out["hit_rate"].append(float(np.concatenate(hits).mean()))
    out["psnr"].append(float(np.concatenate(ps).mean()))
  return out


def _nanmean(x) -> float:
  """Mean over the finite entries; NaN (without a warning) when there are none (nothing was detected)."""
  x = np.asarray(x, np.float64)
  ok = np.isfinite(x)
  return float(x[ok].mean()) if ok.any() else float("nan")


def slope(values: list[float]) -> float:
  y = np.asarray(values, np.float64)
  x = np.arange(len(y), dtype=np.float64)
  ok = np.isfinite(y)
  if ok.sum() < 2:
    return float("nan")
  return float(np.polyfit(x[ok], y[ok], 1)[0])


def per_sample(records: list[dict], skip_first_frame: bool = True) -> dict:
  """Whole-clip means of each sample (one generated clip): position error over its detected object-frames (NaN if
  none), detection rate, on-target rate, PSNR. -> dict of lists, one value per record."""
  out = dict(pos_err=[], detect_rate=[], hit_rate=[], psnr=[])
  lo = 1 if skip_first_frame else 0
  for r in records:
    act = r["active"]
    out["pos_err"].append(_nanmean(r["err"][lo:, act]))
    out["detect_rate"].append(float(r["found"][lo:, act].mean()))
    out["hit_rate"].append(float(r["hit"][lo:, act].mean()))
    out["psnr"].append(float(np.mean(r["psnr"][lo:])))
  return out


def paired_difference(a, b, boots: int = 2000, seed: int = 0) -> dict:
  """Mean of ``a - b`` over the samples where both are finite, and its 95% bootstrap interval (percentile, samples
  resampled with replacement). -> dict(mean, low, high, n); NaNs when fewer than 2 pairs."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  d = d[np.isfinite(d)]
  if len(d) < 2:
    return dict(mean=float("nan"), low=float("nan"), high=float("nan"), n=int(len(d)))
  rng = np.random.default_rng(seed)
  means = d[rng.integers(0, len(d), size=(boots, len(d)))].mean(axis=1)
  low, high = np.percentile(means, [2.5, 97.5])
  return dict(mean=float(d.mean()), low=float(low), high=float(high), n=int(len(d)))


def baselines(clips: list[dict], chunks: int, tol: float, seed: int = 0, skip_first_frame: bool = True) -> dict:
  """Model-free references: ``repeat_start`` (the last frame the model is given repeated: right objects, never
  moving) through the same metrics, and ``random_position`` (a uniformly random point per object and frame:
  position error only)."""
  rep = [clip_metrics(np.repeat(c["start"][None], len(c["truth"]), axis=0), c["truth"], c["params"], c["positions"],
                      tol) for c in clips]
  rng = np.random.default_rng(seed)
  rand = []
  for c in clips:
    f, (h, w) = len(c["truth"]), c["truth"].shape[1:3]
    guess = rng.uniform(0.0, 1.0, c["positions"].shape) * np.array([w, h], np.float64)
    act = c["params"]["active"].astype(bool)
    err = np.where(act[None], np.linalg.norm(guess - c["positions"], axis=-1), np.nan)
    rand.append(dict(err=err, found=np.broadcast_to(act[None], err.shape).copy(), hit=_hits(err, c["params"]),
                     psnr=np.full(f, np.nan), active=act))
  out = {}
  for name, recs in (("repeat_start", rep), ("random_position", rand)):
    curves = per_chunk(recs, chunks, skip_first_frame)
    out[name] = dict(per_chunk=curves, per_sample=per_sample(recs, skip_first_frame), **summarise(curves))
  return out


def summarise(curves: dict) -> dict:
  return dict(pos_err_mean=_nanmean(curves["pos_err"]), pos_err_first=curves["pos_err"][0],
              pos_err_last=curves["pos_err"][-1], pos_err_slope_per_chunk=slope(curves["pos_err"]),
              psnr_mean=float(np.mean(curves["psnr"])), psnr_first=curves["psnr"][0], psnr_last=curves["psnr"][-1],
              psnr_slope_per_chunk=slope(curves["psnr"]), detect_rate=float(np.mean(curves["detect_rate"])),
              hit_rate=float(np.mean(curves["hit_rate"])), hit_rate_first=curves["hit_rate"][0])


def parse_model(spec: str) -> tuple[str, str, list[int] | None, float | None]:
  """``name=PATH[:s1,s2,...][@guidance]`` -> (name, path, steps or None, guidance or None)."""
  if "=" not in spec:
    raise SystemExit(f"--model must be name=PATH[:steps][@guidance], got {spec!r}")
  name, rest = spec.split("=", 1)
  steps = guidance = None
  try:
    if "@" in rest:
      rest, g = rest.rsplit("@", 1)
      guidance = float(g)
    if ":" in rest:
      rest, s = rest.rsplit(":", 1)
      steps = [int(v) for v in s.split(",")]
  except ValueError:
    raise SystemExit(f"--model must be name=PATH[:steps][@guidance] (steps: integers, comma-separated; guidance: "
                     f"a number), got {spec!r}") from None
  return name, rest, steps, guidance


def shifted_grid(steps: int, shift: float) -> np.ndarray:
  """``HeliosPipeline``'s sigma grid (``linspace(0.999, 0, steps + 1)[:-1]``) under the linear time shift
  ``shift * s / (1 + (shift - 1) * s)``: shift > 1 spends more of the steps at high noise."""
  g = np.linspace(0.999, 0.0, steps + 1)[:-1]
  return shift * g / (1.0 + (shift - 1.0) * g)


def run_model(path: str, steps, clips: list, chunks: int, seeds: list[int], guidance: float | None = None,
              sigma_shift: float = 1.0) -> tuple[list[np.ndarray], float, list[int], float]:
  """Generates the I2V continuation of every clip with every seed (clip-major): (frames per sample (F, H, W, 3),
  median seconds per sample, steps, guidance). ``sigma_shift`` != 1: a shifted grid (:func:`shifted_grid`; one-stage
  ``HeliosPipeline`` folders only)."""
  import jax.numpy as jnp
  from PIL import Image
  from helios_jax.io.checkpoint import load_json
  from helios_jax.pipelines import HeliosPipeline, HeliosPyramidPipeline
  index = load_json(os.path.join(path, "model_index.json"), "model_index.json")
  defaults = index.get("helios_jax_defaults") or {}
  pyramid = index.get("_class_name") == "HeliosPyramidPipeline"
  cls = HeliosPyramidPipeline if pyramid else HeliosPipeline
  pipe = cls.from_pretrained(path, dtype=jnp.float32, text_encoder_dtype=jnp.float32)
  steps = steps or list(defaults.get("steps", [10, 10, 10] if pyramid else [50]))
  guidance = float(defaults.get("guidance", 1.0)) if guidance is None else float(guidance)
  outs, times = [], []
  for clip, seed in ((c, s) for c in clips for s in seeds):
    if clip["given"] is None:  # I2V: the clip's first frame
      cond = dict(image=Image.fromarray(np.round(clip["truth"][0] * 255).astype(np.uint8)))
    else:  # V2V: the frames before the scored part
      cond = dict(video=np.round(clip["given"] * 255).astype(np.uint8))
    kw = dict(prompt=clip["caption"], **cond, height=clip["truth"].shape[1], width=clip["truth"].shape[2],
              num_frames=chunks * WINDOW, guidance_scale=guidance, seed=seed, output_type="np", progress=False)
    if pyramid:
      kw.update(pyramid_num_inference_steps_list=tuple(steps),
                is_amplify_first_chunk=bool(index.get("is_distilled", False)))
    else:
      kw.update(num_inference_steps=steps[0])
      if sigma_shift != 1.0:
        kw.update(sigmas=shifted_grid(steps[0], sigma_shift))
    t0 = time.perf_counter()
    frames = np.asarray(pipe(**kw).frames[0], np.float32)
    times.append(time.perf_counter() - t0)
    outs.append(frames)
  return outs, float(np.median(times)), steps, guidance


def held_out_clips(n: int, chunks: int, cfg: scenes.SceneConfig, seed: int = HELD_OUT_SEED, lead: int = 0
                   ) -> list[dict]:
  """``n`` held-out scenes: ``truth`` (chunks * 33, H, W, 3) and ``positions`` of the scored frames, ``given`` (the
  ``lead`` frames before them, V2V's input; None when ``lead`` is 0: I2V is given ``truth[0]``) and ``start`` (the
  last frame the model is given, which ``repeat_start`` repeats)."""
  frames = np.arange(lead + chunks * WINDOW)
  clips = []
  for i in range(n):
    params, caption = scenes.sample_scene(seed, i, cfg)
    truth = np.asarray(scenes.render(scenes.stack_params([params]), frames, cfg))[0]
    positions = scenes.object_positions(params, frames, cfg)
    clips.append(dict(params=params, caption=caption, truth=truth[lead:], positions=positions[lead:],
                      given=truth[:lead] if lead else None, start=truth[lead - 1] if lead else truth[0]))
  return clips


def score_bundled_video(path: str, tol: float = 0.25,
                        prompts_path: str = os.path.join(ROOT, "helios_jax", "assets", "demo", "prompts.json")) -> dict:
  """Per object and 33-frame chunk: position error (px) and on-target rate of an I2V video of the bundled start
  scene (``prompts.json``: scene_seed, scene_index.i2v), and the same for the start image left standing. Frame 0
  (the given image) is not scored."""
  from helios_jax.io import media
  frames = np.asarray(media.read_video(path), np.float32) / 255.0
  if frames.ndim != 4 or frames.shape[0] < 2:
    raise ValueError(f"{path}: need a video of at least 2 frames, got shape {frames.shape}")
  cfg = scenes.SceneConfig(height=frames.shape[1], width=frames.shape[2])
  params, caption = demo.bundled_scene(prompts_path, "i2v", cfg)
  n = frames.shape[0]
  truth = np.asarray(scenes.render(scenes.stack_params([params]), np.arange(n), cfg))[0]
  positions = scenes.object_positions(params, np.arange(n), cfg)
  out = dict(video=path, caption=caption, frames=n, objects={})
  runs = dict(video=clip_metrics(frames, truth, params, positions, tol),
              start_standing=clip_metrics(np.repeat(truth[:1], n, 0), truth, params, positions, tol))
  starts = list(range(1, n, WINDOW))
  for k in range(scenes.MAX_OBJECTS):
    if not params["active"][k]:
      continue
    name = f"object {k} (rgb {', '.join(f'{c:.2f}' for c in params['colour'][k])})"
    out["objects"][name] = {
        which: dict(pos_err_per_chunk=[_nanmean(m["err"][a:a + WINDOW, k]) for a in starts],
                    hit_rate_per_chunk=[float(m["hit"][a:a + WINDOW, k].mean()) for a in starts],
                    detect_rate=float(m["found"][1:, k].mean()))
        for which, m in runs.items()}
  return out


# ----------------------------------------------------------------------------------------------------------------
# Per-frame object tracks of a bundled demo output (``--score-video MP4 --mode M --per-frame JSON``)

SCENE_OFFSET = dict(t2v=0, i2v=0, v2v=WINDOW)  # scene frame of an output's frame 0 (v2v continues frames 0-32)
MIN_BLOB = 10  # pixels: a connected piece of an object's colour smaller than this is not counted as a blob
JUMP_PX = 5.0  # a centroid step above this (5x the scenes' 1 px / frame) is a jump, not motion
STILL_PX = 5.0  # a chunk's net displacement below this has no direction ("still")


def colour_mask(frames: np.ndarray, colour, tol: float) -> np.ndarray:
  """(F, H, W) bool: pixels within RGB distance ``tol`` of ``colour`` (``locate``'s rule)."""
  return np.linalg.norm(frames - np.asarray(colour)[None, None, None], axis=-1) < tol


def find_blobs(mask: np.ndarray, min_pixels: int = MIN_BLOB) -> tuple[list[int], list[list[float]]]:
  """One frame's (H, W) mask -> sizes (largest first) and centroids (x, y) of its 8-connected components of at
  least ``min_pixels`` pixels (scipy comes with jax)."""
  from scipy import ndimage
  labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
  sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
  keep = [i + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] >= min_pixels]
  cents = ndimage.center_of_mass(mask, labels, keep) if keep else []
  return [int(sizes[i - 1]) for i in keep], [[float(x) + 0.5, float(y) + 0.5] for y, x in cents]


def track_colour(frames: np.ndarray, colour, tol: float = 0.25, min_blob: int = MIN_BLOB) -> dict:
  """Per frame of (F, H, W, 3) frames in [0, 1]: ``pixels`` of the colour, ``found`` (``locate``'s rule: >= 4
  pixels), ``centroid`` (F, 2) of all its pixels (NaN where not found), ``blobs`` (pieces of >= ``min_blob`` pixels),
  ``blob_pixels`` and ``blob_centroids`` (theirs, largest first), ``jump`` (F,): centroid distance to the previous
  frame (NaN at frame 0 and where either frame is not found)."""
  centroid, found = locate(frames, colour, tol)
  centroid = np.where(found[:, None], centroid, np.nan)
  masks = colour_mask(frames, colour, tol)
  pieces = [find_blobs(m, min_blob) for m in masks]
  jump = np.full(len(frames), np.nan)
  jump[1:] = np.linalg.norm(centroid[1:] - centroid[:-1], axis=-1)
  return dict(pixels=masks.sum(axis=(1, 2)).astype(int), found=found, centroid=centroid,
              blobs=np.array([len(p[0]) for p in pieces], int), blob_pixels=[p[0] for p in pieces],
              blob_centroids=[p[1] for p in pieces], jump=jump)


def frame_change(frames: np.ndarray) -> np.ndarray:
  """(F,) mean absolute change of every pixel from the previous frame, in 8-bit levels (NaN at frame 0)."""
  d = np.full(len(frames), np.nan)
  d[1:] = np.abs(np.diff(np.asarray(frames, np.float64), axis=0)).mean(axis=(1, 2, 3)) * 255.0
  return d


def ranges(frames) -> list[list[int]]:
  """Sorted frame indices -> runs of consecutive frames [[first, last], ...]."""
  out = []
  for f in sorted(int(v) for v in frames):
    if out and f == out[-1][1] + 1:
      out[-1][1] = f
    else:
      out.append([f, f])
  return out


def format_ranges(runs) -> str:
  """[[1, 47], [59, 59]] -> "1-47, 59" (the form the README and the model card quote)."""
  return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs) or "none"


def compass(dx: float, dy: float, still_px: float = STILL_PX) -> str:
  """The caption word (``scenes.DIRECTIONS``) nearest a displacement in image coordinates (y down); "still" when it
  is shorter than ``still_px``; "unknown" when it is NaN."""
  if not (np.isfinite(dx) and np.isfinite(dy)):
    return "unknown"
  if np.hypot(dx, dy) < still_px:
    return "still"
  return max(scenes.DIRECTIONS, key=lambda w: np.dot(scenes.DIRECTIONS[w], (dx, dy)))


def chunk_boundaries(n: int, window: int = WINDOW) -> list[int]:
  """The first frames of chunks 2, 3, ... of an n-frame output: 33, 66, ..."""
  return list(range(window, n, window))


def chunk_motion(centroid: np.ndarray, jump: np.ndarray, window: int = WINDOW, jump_px: float = JUMP_PX,
                 still_px: float = STILL_PX) -> list[dict]:
  """Per chunk (frames [33 c, 33 c + 32]): ``net`` displacement (x, y) from its first to its last frame where the
  object is found and its direction, and ``drift``: the sum of its frame-to-frame steps that are not jumps (> jump_px)
  and its direction (the motion without the relocations)."""
  out = []
  for a in range(0, len(centroid), window):
    b = min(a + window, len(centroid))
    seen = [f for f in range(a, b) if np.isfinite(centroid[f, 0])]
    net = centroid[seen[-1]] - centroid[seen[0]] if seen else np.full(2, np.nan)
    drift = np.zeros(2)
    for f in range(a + 1, b):
      if np.isfinite(jump[f]) and jump[f] <= jump_px:
        drift += centroid[f] - centroid[f - 1]
    out.append(dict(frames=[a, b - 1], found_frames=len(seen), net=_round(net), net_direction=compass(*net, still_px),
                    drift=_round(drift), drift_direction=compass(*drift, still_px)))
  return out


def _round(x, nd: int = 2):
  """JSON-ready: floats rounded, NaN -> None, arrays -> lists."""
  if isinstance(x, (list, tuple, np.ndarray)):
    return [_round(v, nd) for v in x]
  v = float(x)
  return round(v, nd) if np.isfinite(v) else None


def reappearances(found: np.ndarray, centroid: np.ndarray) -> list[dict]:
  """Every run of frames where the object is not found, between frames where it is: the run, the centroid before
  and after it and the distance between them."""
  out = []
  for a, b in ranges(np.flatnonzero(~found)):
    if a == 0 or b == len(found) - 1:
      continue
    before, after = centroid[a - 1], centroid[b + 1]
    out.append(dict(missing=[a, b], before=_round(before), after=_round(after),
                    distance=_round(np.linalg.norm(after - before))))
  return out


def summarise_track(track: dict, window: int = WINDOW, jump_px: float = JUMP_PX, top: int = 5,
                    still_px: float = STILL_PX) -> dict:
  """The events of one object's track: frames where it is missing, split (2 or more blobs), the jumps (> jump_px)
  and the ``top`` largest, which of them sit on chunk boundaries, reappearances, motion per chunk."""
  n, jump = len(track["found"]), track["jump"]
  bounds = chunk_boundaries(n, window)
  order = [int(f) for f in np.argsort(-np.nan_to_num(jump, nan=-1.0), kind="stable") if np.isfinite(jump[f])]
  steps = jump[np.isfinite(jump)]
  pixels, most = np.asarray(track["pixels"]), int(track["blobs"].max())
  return dict(
      pixels_first=int(pixels[0]), pixels_max=[int(pixels.max()), int(pixels.argmax())],
      missing=ranges(np.flatnonzero(~track["found"])),
      split=ranges(np.flatnonzero(track["blobs"] >= 2)),
      most_blobs=most, most_blobs_frames=ranges(np.flatnonzero(track["blobs"] == most)),
      jumps=[dict(frame=f, px=_round(jump[f]), on_boundary=f in bounds) for f in range(n) if jump[f] > jump_px],
      largest_jumps=[dict(frame=f, px=_round(jump[f]), on_boundary=f in bounds) for f in order[:top]],
      boundary_jumps={str(f): _round(jump[f]) for f in bounds},
      median_jump=_round(np.median(steps)) if len(steps) else None,
      reappearances=reappearances(track["found"], track["centroid"]),
      per_chunk=chunk_motion(track["centroid"], jump, window, jump_px, still_px))


def _caption_direction(vel) -> str:
  return compass(float(vel[0]), float(vel[1]), still_px=1e-6)


def track_bundled_video(path: str, mode: str = "i2v", tol: float = 0.25, min_blob: int = MIN_BLOB,
                        jump_px: float = JUMP_PX,
                        prompts_path: str = os.path.join(ROOT, "helios_jax", "assets", "demo", "prompts.json")) -> dict:
  """Per-frame tracks of every object of the bundled scene of ``mode`` in ``sample.py``'s output for that mode, and
  their summaries. i2v and v2v are compared with the scene's truth (v2v's output frame 0 is scene frame 33: it
  continues the bundled start video, frames 0-32): ``err`` per frame, ``on_target`` (within the object's
  circumradius), the true direction per chunk. t2v's model never sees its scene, only the caption: motion only."""
  from helios_jax.io import media
  frames = np.asarray(media.read_video(path), np.float32) / 255.0
  if frames.ndim != 4 or frames.shape[0] < 2:
    raise ValueError(f"{path}: need a video of at least 2 frames, got shape {frames.shape}")
  n = frames.shape[0]
  cfg = scenes.SceneConfig(height=frames.shape[1], width=frames.shape[2])
  params, caption = demo.bundled_scene(prompts_path, mode, cfg)
  truth = scenes.object_positions(params, np.arange(n) + SCENE_OFFSET[mode], cfg) if mode != "t2v" else None
  change = frame_change(frames)
  bounds = chunk_boundaries(n)
  big = [int(f) for f in np.argsort(-np.nan_to_num(change, nan=-1.0), kind="stable")[:len(bounds) + 3]]
  out = dict(video=path, mode=mode, caption=caption, frames=n, scene_frame_of_frame_0=SCENE_OFFSET[mode],
             colour_tol=tol, min_blob=min_blob, jump_px=jump_px, chunk_boundaries=bounds,
             frame_change=dict(per_frame=_round(change), median=_round(np.nanmedian(change)),
                               largest=[dict(frame=f, level=_round(change[f]), on_boundary=f in bounds) for f in big],
                               at_boundaries={str(f): _round(change[f]) for f in bounds}),
             objects={})
  for k in range(scenes.MAX_OBJECTS):
    if not params["active"][k]:
      continue
    colour = params["colour"][k]
    name = next(c for c, v in scenes.COLOURS.items() if np.allclose(v, colour, atol=1e-3))
    name = f"{name} {scenes.SHAPES[int(params['shape'][k])]}"
    tr = track_colour(frames, colour, tol, min_blob)
    obj = dict(colour=_round(colour, 3), radius=_round(params["radius"][k]),
               caption_direction=_caption_direction(params["vel"][k]),
               summary=summarise_track(tr, jump_px=jump_px),
               per_frame=dict(found=tr["found"].tolist(), pixels=tr["pixels"].tolist(), centroid=_round(tr["centroid"]),
                              blobs=tr["blobs"].tolist(), blob_pixels=tr["blob_pixels"],
                              blob_centroids=_round(tr["blob_centroids"]), jump=_round(tr["jump"])))
    if truth is not None:
      err = np.linalg.norm(tr["centroid"] - truth[:, k], axis=-1)
      hit = np.nan_to_num(err, nan=np.inf) < params["radius"][k]
      obj["per_frame"].update(true_centre=_round(truth[:, k]), err=_round(err))
      obj["summary"]["on_target"] = ranges(np.flatnonzero(hit))
      for c in obj["summary"]["per_chunk"]:
        a, b = c["frames"]
        c["true_net_direction"] = compass(*(truth[b, k] - truth[a, k]))
        c["err_median"] = _round(_nanmedian(err[a:b + 1]))
    out["objects"][name] = obj
  return out


def _nanmedian(x) -> float:
  x = np.asarray(x, np.float64)
  return float(np.median(x[np.isfinite(x)])) if np.isfinite(x).any() else float("nan")


def print_tracks(tracks: dict) -> None:
  """The summary of :func:`track_bundled_video`, a few lines per object."""
  fc = tracks["frame_change"]
  bound = lambda r: " (boundary)" if r["on_boundary"] else ""  # noqa: E731
  print(f"{tracks['mode']} {tracks['video']}: {tracks['frames']} frames, chunk boundaries at frames "
        f"{', '.join(map(str, tracks['chunk_boundaries']))}; largest frame-to-frame changes (8-bit levels, median "
        f"{fc['median']}): " + ", ".join(f"frame {r['frame']} {r['level']}{bound(r)}" for r in fc["largest"]))
  for name, o in tracks["objects"].items():
    s = o["summary"]
    line = (f"  {name} (caption: {o['caption_direction']}): missing in frames {format_ranges(s['missing'])}; "
            f"2+ blobs in {format_ranges(s['split'])} (most {s['most_blobs']}, in "
            f"{format_ranges(s['most_blobs_frames'])})")
    if "on_target" in s:
      line += f"; on target in {format_ranges(s['on_target'])}"
    print(line)
    jumps = ", ".join(f"{j['frame']} ({j['px']:.0f} px){bound(j)}" for j in s["jumps"]) or "none"
    print(f"    jumps > {tracks['jump_px']:g} px at frames {jumps}; median step {s['median_jump']} px")
    for r in s["reappearances"]:
      print(f"    gone in {format_ranges([r['missing']])}, back {r['distance']:.0f} px from where it went")
    for i, c in enumerate(s["per_chunk"]):
      line = (f"    chunk {i + 1} (frames {c['frames'][0]}-{c['frames'][1]}): net {c['net_direction']} {c['net']}, "
              f"drift {c['drift_direction']} {c['drift']}")
      if "true_net_direction" in c:
        line += f", truth {c['true_net_direction']}, median error {c['err_median']} px"
      print(line)


def write_tracks(path: str, tracks: dict) -> None:
  """Writes ``{mode: tracks}`` to ``path``; the other modes of an existing file of that form are kept."""
  record = {}
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    if isinstance(old, dict) and all(isinstance(v, dict) and v.get("mode") == k for k, v in old.items()):
      record = old
  record[tracks["mode"]] = dict(tracks, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  with open(path, "w", encoding="utf-8") as f:
    f.write(compact_json(dict(sorted(record.items()))) + "\n")


def compact_json(obj) -> str:
  """``json.dumps(obj, indent=1)`` with every innermost list of numbers, booleans and nulls on one line."""
  text = json.dumps(obj, indent=1)
  return re.sub(r'\[\n([^\[\]{}"]*?)\n *\]', lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--score-video", metavar="MP4",
                 help="score this output of `sample.py --mode MODE` with the bundled inputs (its default) and stop: "
                      "per-frame object tracks, and for i2v the per-chunk scores")
  p.add_argument("--mode", choices=("i2v", "t2v", "v2v"), default="i2v",
                 help="with --score-video: the mode that made the video (picks the bundled scene; default i2v)")
  p.add_argument("--per-frame", metavar="JSON",
                 help="with --score-video: write the per-frame tracks here as {mode: tracks} (an existing file of "
                      "that form keeps its other modes)")
  p.add_argument("--min-blob", type=int, default=MIN_BLOB,
                 help="with --score-video: smallest piece of an object's colour counted as a blob (pixels)")
  p.add_argument("--jump-px", type=float, default=JUMP_PX,
                 help="with --score-video: a centroid step above this many pixels is reported as a jump")
  p.add_argument("--model", action="append", default=[],
                 help="name=PATH[:steps][@guidance], repeatable (none: only the locator check and the baselines)")
  p.add_argument("--clips", type=int, default=8)
  p.add_argument("--chunks", type=int, default=10)
  p.add_argument("--seed", type=int, default=42, help="first sampling seed")
  p.add_argument("--seeds", type=int, default=1, help="sampling seeds per clip (--seed, --seed + 1, ...)")
  p.add_argument("--compare", action="append", metavar="A:B",
                 help="paired difference A - B with a bootstrap interval (repeatable; default: base:base_nocorrupt "
                      "and distilled:base when given)")
  p.add_argument("--condition", choices=("image", "video"), default="image",
                 help="image: I2V from each clip's first frame (scored from frame 1); video: V2V from its first 33 "
                      "frames (scored from frame 33, all generated)")
  p.add_argument("--colour-tol", type=float, default=0.25, help="RGB distance for the colour locator")
  p.add_argument("--sigma-shift", type=float, default=1.0,
                 help="sample the one-stage (Base) models on a linearly shifted sigma grid (> 1: more steps at high "
                      "noise; the scheduler's own shift does not reach HeliosPipeline's grid)")
  p.add_argument("--out", help="write the JSON results here")
  p.add_argument("--save-frames", help="folder: write each model's first clip as a contact-sheet PNG")
  p.add_argument("--record", action="store_true", help="append to benchmarks/results/demo_quality.jsonl")
  args = p.parse_args(argv)
  if args.score_video:
    if not os.path.isfile(args.score_video):
      p.error(f"--score-video: no file {args.score_video}")
    if args.min_blob < 1 or not args.jump_px > 0:
      p.error("--min-blob must be at least 1 and --jump-px > 0")
    if args.out and args.mode != "i2v":
      p.error("--score-video --out writes the per-chunk scores of an i2v video; for other modes use --per-frame")
    try:
      tracks = track_bundled_video(args.score_video, args.mode, args.colour_tol, args.min_blob, args.jump_px)
      scored = score_bundled_video(args.score_video, args.colour_tol) if args.mode == "i2v" else None
    except (ValueError, OSError) as e:  # media's InputError is a ValueError
      p.error(f"--score-video: {e}")
    print_tracks(tracks)
    for name, rows in (scored or {}).get("objects", {}).items():
      for which, r in rows.items():
        print(f"{name}, {which}: pos err per chunk " + " / ".join(f"{v:.1f}" for v in r["pos_err_per_chunk"])
              + " px, on target " + " / ".join(f"{v:.0%}" for v in r["hit_rate_per_chunk"])
              + f", detected {r['detect_rate']:.0%}")
    if args.out and scored is not None:
      with open(args.out, "w", encoding="utf-8") as f:
        json.dump(scored, f, indent=1)
    if args.per_frame:
      write_tracks(args.per_frame, tracks)
    return 0
  if args.clips < 1 or args.chunks < 1 or args.seeds < 1:
    p.error("--clips, --chunks and --seeds must be at least 1")
  models = [parse_model(m) for m in args.model]
  names = [m[0] for m in models]
  if len(set(names)) != len(names):
    p.error(f"model names must be distinct, got {names}")
  if args.compare:
    pairs = [tuple(c.split(":", 1)) for c in args.compare]
    bad = [c for c, pr in zip(args.compare, pairs) if len(pr) != 2 or not set(pr) <= set(names)]
    if bad:
      p.error(f"--compare takes A:B with A and B among the models ({', '.join(names)}), got {', '.join(bad)}")
  else:
    pairs = [pr for pr in (("base", "base_nocorrupt"), ("distilled", "base")) if set(pr) <= set(names)]
  if not args.sigma_shift > 0:
    p.error(f"--sigma-shift must be > 0, got {args.sigma_shift}")
  from helios_jax.io.checkpoint import load_json
  for _, path, _, _ in models:
    if not os.path.isfile(os.path.join(path, "model_index.json")):
      p.error(f"{path} is not a pipeline folder (no model_index.json)")
    if args.sigma_shift != 1.0 and load_json(os.path.join(path, "model_index.json")).get(
        "_class_name") == "HeliosPyramidPipeline":
      p.error(f"--sigma-shift applies to one-stage (Base) folders only; {path} is a pyramid pipeline")
  seeds = [args.seed + i for i in range(args.seeds)]
  defaults = (load_json(os.path.join(models[0][1], "model_index.json"), "model_index.json").get(
      "helios_jax_defaults") or {}) if models else {}
  cfg = scenes.SceneConfig(height=int(defaults.get("height", 128)), width=int(defaults.get("width", 128)))
  video = args.condition == "video"
  skip = not video  # I2V's frame 0 is the given image
  clips = held_out_clips(args.clips, args.chunks, cfg, lead=WINDOW if video else 0)
  check = [clip_metrics(c["truth"], c["truth"], c["params"], c["positions"], args.colour_tol) for c in clips]
  check_curves = per_chunk(check, args.chunks, skip)
  results = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 clips=args.clips, chunks=args.chunks, held_out_seed=HELD_OUT_SEED, sampling_seed=args.seed,
                 sampling_seeds=seeds, resolution=[cfg.height, cfg.width], condition=args.condition,
                 sigma_shift=args.sigma_shift,
                 locator_check=dict(pos_err_mean=_nanmean(check_curves["pos_err"]),
                                    detect_rate=float(np.mean(check_curves["detect_rate"])),
                                    hit_rate=float(np.mean(check_curves["hit_rate"]))),
                 baselines=baselines(clips, args.chunks, args.colour_tol, skip_first_frame=skip), models={},
                 comparisons={})
  import jax
  results["device"] = str(jax.devices()[0])

  def save():  # after the baselines and after every model: a run cut short keeps what it finished
    if args.out:
      with open(args.out, "w", encoding="utf-8") as f:
        f.write(json.dumps(results, indent=1))

  save()
  for name, path, steps, guidance in models:
    frames, sec, used, g = run_model(path, steps, clips, args.chunks, seeds, guidance, args.sigma_shift)
    samples = [c for c in clips for _ in seeds]  # clip-major, as run_model
    recs = [clip_metrics(f, c["truth"], c["params"], c["positions"], args.colour_tol)
            for f, c in zip(frames, samples)]
    curves = per_chunk(recs, args.chunks, skip)
    results["models"][name] = dict(path=os.path.relpath(path, ROOT), steps=used, guidance=g, seconds_per_clip=sec,
                                   per_chunk=curves, per_sample=per_sample(recs, skip), **summarise(curves))
    print(f"{name} (steps {used}): pos err {results['models'][name]['pos_err_mean']:.2f} px "
          f"(chunk 1 {curves['pos_err'][0]:.2f} -> chunk {args.chunks} {curves['pos_err'][-1]:.2f}), "
          f"PSNR {results['models'][name]['psnr_mean']:.2f} dB, detect {results['models'][name]['detect_rate']:.3f}, "
          f"on target {results['models'][name]['hit_rate']:.3f} (chunk 1 {curves['hit_rate'][0]:.3f}), "
          f"{sec:.1f} s/clip", flush=True)
    if args.save_frames:
      from helios_jax.io import media
      os.makedirs(args.save_frames, exist_ok=True)
      media.write_contact_sheet(os.path.join(args.save_frames, f"{name}.png"), frames[0])
    for a, b in pairs:
      if a in results["models"] and b in results["models"] and f"{a}-{b}" not in results["comparisons"]:
        ma, mb = results["models"][a]["per_sample"], results["models"][b]["per_sample"]
        cmp_ = {k: paired_difference(ma[k], mb[k]) for k in ("pos_err", "hit_rate", "psnr")}
        results["comparisons"][f"{a}-{b}"] = cmp_
        print(f"{a} - {b}: pos err {cmp_['pos_err']['mean']:+.2f} px [{cmp_['pos_err']['low']:+.2f}, "
              f"{cmp_['pos_err']['high']:+.2f}], on target {cmp_['hit_rate']['mean']:+.3f} "
              f"[{cmp_['hit_rate']['low']:+.3f}, {cmp_['hit_rate']['high']:+.3f}], "
              f"PSNR {cmp_['psnr']['mean']:+.2f} dB [{cmp_['psnr']['low']:+.2f}, "
              f"{cmp_['psnr']['high']:+.2f}] (95% bootstrap, {cmp_['pos_err']['n']} samples)", flush=True)
    save()
  if args.record:
    with open(os.path.join(ROOT, "benchmarks", "results", "demo_quality.jsonl"), "a", encoding="utf-8") as f:
      f.write(json.dumps(results) + "\n")
  print(json.dumps(results, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
