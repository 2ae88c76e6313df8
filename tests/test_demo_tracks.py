"""recipes/demo/demo_quality.py's per-frame object tracker (``--score-video --per-frame``): events on synthetic frames
built for the purpose, the bundled scene's own frames, and the README / model card against the recorded tracks."""

from __future__ import annotations

import importlib
import json
import os
import re

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEN, WHITE, GREY = (0.15, 0.80, 0.25), (0.97, 0.97, 0.97), (0.40, 0.40, 0.42)
RECORD = os.path.join(ROOT, "benchmarks", "results", "demo_tracks_bundled.json")


def _dq():
  return importlib.import_module("recipes.demo.demo_quality")


def _synthetic(n: int = 40) -> np.ndarray:
  """64x64 frames: a green 8x8 square moving right 1 px / frame (x = 10 + t), gone in frames 10-12, cut into two
  4x8 halves 6 px apart in frames 20-24 (the centroid stays on the path), 20 px lower from frame 33 on (a jump on
  the chunk boundary); a white 6x6 square standing still."""
  frames = np.broadcast_to(np.asarray(GREY, np.float32), (n, 64, 64, 3)).copy()
  for t in range(n):
    frames[t, 50:56, 50:56] = WHITE
    if 10 <= t <= 12:
      continue
    x, y = 10 + t, 20 + (20 if t >= 33 else 0)
    if 20 <= t <= 24:
      frames[t, y:y + 8, x - 3:x + 1] = GREEN
      frames[t, y:y + 8, x + 7:x + 11] = GREEN
    else:
      frames[t, y:y + 8, x:x + 8] = GREEN
  return frames


def test_tracker_finds_exactly_the_built_events():
  dq = _dq()
  frames = _synthetic()
  tr = dq.track_colour(frames, GREEN)
  assert tr["found"].tolist() == [not 10 <= t <= 12 for t in range(40)]
  assert tr["pixels"].tolist() == [0 if 10 <= t <= 12 else 64 for t in range(40)]
  assert tr["blobs"].tolist() == [0 if 10 <= t <= 12 else 2 if 20 <= t <= 24 else 1 for t in range(40)]
  assert tr["blob_pixels"][22] == [32, 32] and tr["blob_pixels"][5] == [64]
  np.testing.assert_allclose(tr["centroid"][5], [19.0, 24.0])  # pixel centres: x 15..22, y 20..27
  np.testing.assert_allclose(tr["centroid"][22], [36.0, 24.0])  # split halves: the centroid stays on the path
  assert sorted(c[0] for c in tr["blob_centroids"][22]) == [31.0, 41.0]
  assert np.isnan(tr["centroid"][11]).all() and np.isnan(tr["jump"][[0, 10, 11, 12, 13]]).all()

  s = dq.summarise_track(tr)
  assert s["missing"] == [[10, 12]] and s["split"] == [[20, 24]]
  assert s["most_blobs"] == 2 and s["most_blobs_frames"] == [[20, 24]]
  assert [j["frame"] for j in s["jumps"]] == [33] and s["jumps"][0]["on_boundary"]
  assert s["jumps"][0]["px"] == pytest.approx(20.02)  # 1 px right, 20 down
  assert s["largest_jumps"][0] == dict(frame=33, px=20.02, on_boundary=True)
  assert not any(j["on_boundary"] for j in s["largest_jumps"][1:])
  assert s["boundary_jumps"] == {"33": 20.02} and s["median_jump"] == pytest.approx(1.0)
  assert s["reappearances"] == [dict(missing=[10, 12], before=[23.0, 24.0], after=[27.0, 24.0], distance=4.0)]
  c1, c2 = s["per_chunk"]
  assert c1["frames"] == [0, 32] and c1["found_frames"] == 30 and c1["net"] == [32.0, 0.0]
  assert c1["net_direction"] == c1["drift_direction"] == "right"
  assert c2["frames"] == [33, 39] and c2["net_direction"] == "right" and c2["drift"] == [6.0, 0.0]

  still = dq.summarise_track(dq.track_colour(frames, WHITE))
  assert still["missing"] == still["split"] == still["jumps"] == still["reappearances"] == []
  assert [c["net_direction"] for c in still["per_chunk"]] == ["still", "still"]

  change = dq.frame_change(frames)
  assert np.isnan(change[0]) and int(np.nanargmax(change)) == 33


def test_jump_through_the_chunk_shows_in_net_but_not_in_drift():
  """A relocation inside a chunk (a cross-fade to a new place) moves the net displacement, not the drift."""
  dq = _dq()
  n = 33
  c = np.stack([10.0 + np.arange(n), np.where(np.arange(n) >= 15, 60.0, 20.0)], axis=-1)  # right, 40 px down at 15
  jump = np.full(n, np.nan)
  jump[1:] = np.linalg.norm(np.diff(c, axis=0), axis=-1)
  (m,) = dq.chunk_motion(c, jump)
  assert m["net_direction"] == "down and right" and m["drift_direction"] == "right" and m["drift"] == [31.0, 0.0]


def test_tracker_helpers():
  dq = _dq()
  assert dq.ranges([5, 1, 2, 3, 9]) == [[1, 3], [5, 5], [9, 9]] and dq.ranges([]) == []
  assert dq.format_ranges([[1, 47], [59, 59]]) == "1-47, 59" and dq.format_ranges([]) == "none"
  assert dq.compass(0, -10) == "up" and dq.compass(7, -7) == "up and right" and dq.compass(-9, 1) == "left"
  assert dq.compass(2, 2) == "still" and dq.compass(float("nan"), 0) == "unknown"
  assert dq.chunk_boundaries(97) == [33, 66] and dq.chunk_boundaries(33) == []
  sizes, cents = dq.find_blobs(np.eye(6, dtype=bool) | np.eye(6, dtype=bool)[::-1], min_pixels=1)
  assert sizes == [12] and cents == [[3.0, 3.0]]  # diagonal neighbours are one 8-connected blob
  assert dq.find_blobs(np.pad(np.ones((2, 2), bool), 3), min_pixels=5) == ([], [])
  obj = dict(c=[[1.5, None], [2, True]], s="a [  b ] c", names=["x  y"], e=[])
  text = dq.compact_json(obj)
  assert json.loads(text) == obj and "[1.5, null]" in text and '"a [  b ] c"' in text and '"x  y"' in text


def test_tracks_of_the_bundled_scenes_own_frames(tmp_path, capsys):
  """The true frames of the v2v scene after its start video (scene frames 33-72) track to the truth: found,
  one blob, on target, no jumps, the caption's direction; t2v gets motion only; --per-frame keeps both modes."""
  dq = _dq()
  from helios_jax.io import media
  from recipes.demo import demo, scenes
  prompts = os.path.join(ROOT, "helios_jax", "assets", "demo", "prompts.json")
  cfg = scenes.SceneConfig(height=128, width=128)
  out = tmp_path / "tracks.json"
  for mode, first in (("v2v", 33), ("t2v", 0)):
    params, _ = demo.bundled_scene(prompts, mode, cfg)
    truth = np.asarray(scenes.render(scenes.stack_params([params]), np.arange(first, first + 40), cfg))[0]
    path = media.write_video(str(tmp_path / f"{mode}.mp4"), truth)
    assert dq.main(["--score-video", path, "--mode", mode, "--per-frame", str(out)]) == 0
  assert "purple circle (caption: down)" in capsys.readouterr().out
  record = json.loads(out.read_text())
  assert sorted(record) == ["t2v", "v2v"] and record["v2v"]["scene_frame_of_frame_0"] == 33
  for name, o in record["v2v"]["objects"].items():
    s = o["summary"]
    assert s["missing"] == s["split"] == s["jumps"] == [] and s["on_target"] == [[0, 39]], name
    assert max(o["per_frame"]["err"]) < 1.5, name
  assert record["v2v"]["objects"]["white circle"]["summary"]["per_chunk"][0]["net_direction"] == "up and right"
  (purple,) = record["t2v"]["objects"].values()
  assert "err" not in purple["per_frame"] and "on_target" not in purple["summary"]
  assert purple["summary"]["per_chunk"][0]["net_direction"] == "down"
  with pytest.raises(SystemExit):
    dq.main(["--score-video", path, "--mode", "t2v", "--out", str(tmp_path / "s.json")])  # --out: i2v only


# ----------------------------------------------------------------------------------------------------------------
# The texts against the recorded tracks of the bundled outputs


def _caption_paragraph() -> str:
  text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  after = text.split("![demo i2v contact sheet](docs/images/demo_i2v.png)", 1)[1].lstrip("\n")
  return after.split("\n\n", 1)[0]


def _model_card_tracks() -> str:
  """The model card's status paragraph and its section on the bundled outputs."""
  text = open(os.path.join(ROOT, "helios_jax", "assets", "demo", "README.md"), encoding="utf-8").read()
  status = text.split("> **Status:", 1)[1].split("\n\n", 1)[0]
  return status + text.split("## What the bundled outputs show, frame by frame", 1)[1].split("\n## ", 1)[0]


def _facts(record: dict) -> list[str]:
  """The frame ranges and directions the texts must quote, formatted from the record."""
  dq = _dq()
  i2v, t2v, v2v = (record[m]["objects"] for m in ("i2v", "t2v", "v2v"))
  green, white = i2v["green square"]["summary"], i2v["white triangle"]["summary"]
  jumps = [j["frame"] for j in green["jumps"] if not j["on_boundary"]]
  facts = [f"{jumps[0]}-{jumps[-1]}", dq.format_ranges(green["missing"]), dq.format_ranges(white["missing"]),
           f"from frame {green['split'][-1][0]}", dq.format_ranges(green["most_blobs_frames"]),
           dq.format_ranges(v2v["white circle"]["summary"]["missing"])]
  facts += [f"{c['net_direction']} in frames {c['frames'][0]}-{c['frames'][1]}"
            for c in t2v["purple circle"]["summary"]["per_chunk"][:2]]
  return facts


def test_record_holds_the_three_bundled_outputs():
  record = json.load(open(RECORD, encoding="utf-8"))
  assert sorted(record) == ["i2v", "t2v", "v2v"]
  prompts = json.load(open(os.path.join(ROOT, "helios_jax", "assets", "demo", "prompts.json"), encoding="utf-8"))
  for mode, r in record.items():
    assert r["caption"] == prompts[mode] and r["frames"] == 97 and r["chunk_boundaries"] == [33, 66]
    assert {f["frame"] for f in r["frame_change"]["largest"][:2]} == {33, 66}  # the two largest image changes


@pytest.mark.parametrize("where", ["README caption", "model card"])
def test_texts_quote_the_recorded_tracks(where):
  text = _caption_paragraph() if where == "README caption" else _model_card_tracks()
  text = re.sub(r"\s+", " ", text).lower()
  missing = [f for f in _facts(json.load(open(RECORD, encoding="utf-8"))) if f.lower() not in text]
  assert not missing, f"{where} does not quote {missing}"
  assert "stays drawn through the 97 frames" not in text and "staying drawn" not in text
