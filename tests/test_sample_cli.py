"""sample.py's command line over the stream API: streamed mp4s, --prompt-file, --interactive-prompts, outputs that
already exist, interruption, the prompt-file errors, --help; and helios_jax.io.model_folder.

Every generating test runs the bundled demo model (a plain Base) at 64x64 with 2 steps and no guidance, so all of
them share one set of compiled programs. The stream is checked against the batch call exactly: the frames the
stream yields equal ``to_uint8`` of the batch output, and the mp4 and contact sheet sample.py writes equal the ones
written from the batch output.
"""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import PIL.Image
import pytest

from helios_jax import __version__
from helios_jax.errors import CheckpointError, InputError
from helios_jax.io import media
from helios_jax.io.model_folder import bundled_demo, inspect_model_folder, load_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from helios_jax.cli import sample  # noqa: E402

DEMO = bundled_demo()
SMALL = ["--height", "64", "--width", "64", "--steps", "2", "--guidance", "1", "--compile-cache", "none"]


def run(argv, on_chunk=None):
  """sample.main on the bundled demo with the small settings; returns (rc, seen) where seen is {out: [chunks]}."""
  seen: dict[str, list] = {}

  def hook(job, chunk):
    seen.setdefault(job.out, []).append((job, chunk))
    if on_chunk is not None:
      on_chunk(job, chunk)

  return sample.main([*SMALL, *argv], on_chunk=hook), seen


def hidden_files(folder) -> list[str]:
  return [n for n in os.listdir(folder) if n.startswith(".")]


# ------------------------------------------------------------------------------------------------------------
# helios_jax.io.model_folder


def test_model_folder_plan_and_messages(tmp_path):
  plan = inspect_model_folder(DEMO.model)
  assert (plan.kind, plan.pyramid, plan.window, plan.temporal, plan.has_text_encoder) == ("Base", False, 33, 4, True)
  with open(os.path.join(DEMO.model, "model_index.json"), encoding="utf-8") as f:
    folder = json.load(f)["helios_jax_defaults"]
  assert (plan.height, plan.width, plan.dtype, list(plan.steps), plan.guidance, plan.num_frames) == (
      folder["height"], folder["width"], folder["dtype"], folder["steps"], folder["guidance"], folder["num_frames"])
  assert plan.pipeline_kwargs() == dict(height=plan.height, width=plan.width, num_frames=plan.num_frames,
                                        guidance_scale=plan.guidance, num_inference_steps=plan.steps[0])
  small = inspect_model_folder(DEMO.model, height=64, width=32, steps=[3], guidance=1, num_frames=40, dtype="bf16")
  assert (small.height, small.width, small.steps, small.guidance, small.num_frames, small.dtype) == (
      64, 32, (3,), 1.0, 40, "bf16")
  with pytest.raises(InputError, match=r"^steps needs 1 number for this model \(plain sampler\), got 2$"):
    inspect_model_folder(DEMO.model, steps=[2, 2])
  with pytest.raises(InputError, match=r"^--height and --width must be multiples of 16"):
    inspect_model_folder(DEMO.model, height=100, option_names={"height": "--height", "width": "--width"})
  with pytest.raises(InputError, match="dtype must be one of bf16, fp32, got 'fp16'"):
    inspect_model_folder(DEMO.model, dtype="fp16")
  with pytest.raises(CheckpointError, match="model folder not found"):
    inspect_model_folder(str(tmp_path / "nothing"))
  with pytest.raises(CheckpointError, match="bundled demo model is missing"):
    bundled_demo(str(tmp_path))
  assert set(DEMO.prompts) == {"t2v", "i2v", "v2v"} and os.path.isfile(DEMO.image) and os.path.isfile(DEMO.video)


def test_sheet_frames_pick_what_contact_sheet_picks():
  """The contact sheet built from frames picked as chunks pass equals media.contact_sheet of the whole video."""
  rng = np.random.default_rng(0)
  for total in (1, 5, 8, 33, 65, 97):
    video = rng.integers(0, 256, (total, 4, 6, 3), dtype=np.uint8)
    picker = sample._SheetFrames(total)
    for first in range(0, total, 33):
      picker.offer(first, video[first:first + 33])
    np.testing.assert_array_equal(media.contact_sheet(picker.frames()), media.contact_sheet(video))


# ------------------------------------------------------------------------------------------------------------
# Streaming = the batch call


@pytest.fixture(scope="module")
def batch_frames():
  """The batch call's uint8 frames for the bundled t2v prompt, seed 42, 66 frames requested (two chunks)."""
  plan = inspect_model_folder(DEMO.model, height=64, width=64, steps=[2], guidance=1, num_frames=66)
  pipe = load_pipeline(DEMO.model, plan)
  out = pipe(prompt=DEMO.prompts["t2v"], seed=42, progress=False, max_sequence_length=sample.MAX_SEQUENCE_LENGTH,
             **plan.pipeline_kwargs())
  return media.to_uint8(out.frames[0])


def test_streamed_video_equals_the_batch_call(tmp_path, capsys, batch_frames):
  out = tmp_path / "s.mp4"
  rc, seen = run(["--num-frames", "66", "--out", str(out)])
  text = capsys.readouterr()
  assert rc == 0, text.err
  chunks = [c for _, c in seen[str(out)]]
  assert [c.index for c in chunks] == [0, 1] and [c.first_frame for c in chunks] == [0, 33]
  streamed = np.concatenate([c.frames for c in chunks])
  assert streamed.shape == batch_frames.shape == (65, 64, 64, 3)
  np.testing.assert_array_equal(streamed, batch_frames)
  # the mp4 and contact sheet written chunk by chunk equal those written from the batch output
  media.write_video(str(tmp_path / "batch.mp4"), batch_frames)
  np.testing.assert_array_equal(media.read_video(str(out)), media.read_video(str(tmp_path / "batch.mp4")))
  np.testing.assert_array_equal(np.asarray(PIL.Image.open(tmp_path / "s.png")), media.contact_sheet(batch_frames))
  assert "chunk 1/2: frames 0-32, first chunk after" in text.out and "chunk 2/2: frames 33-64" in text.out
  assert f"wrote {out}: 65 frames, 64x64, 24 fps" in text.out and "frames/s" in text.out
  assert hidden_files(tmp_path) == []


def test_fps_sets_the_mp4_rate(tmp_path, capsys):
  out = tmp_path / "f.mp4"
  rc, _ = run(["--num-frames", "33", "--fps", "12", "--out", str(out)])
  assert rc == 0, capsys.readouterr().err
  info = media.video_info(str(out))
  assert info["fps"] == 12 and info["frames"] == 33


# ------------------------------------------------------------------------------------------------------------
# --interactive-prompts


def test_interactive_csv_one_video_per_id(tmp_path, capsys):
  csv = tmp_path / "story.csv"
  csv.write_text("id,prompt_index,prompt,refined_prompt\n"
                 "b,1,a white circle moves left,\n"
                 "a,1,a red square,a red square moves down on a grey background\n"
                 "b,0,a green triangle moves up,\n"
                 "a,0,a purple circle moves down,\n", encoding="utf-8")
  rc, seen = run(["--interactive-prompts", str(csv), "--interpolate-time", "1", "--interpolation-steps", "0",
                  "--out", str(tmp_path / "v.mp4"), "--contact-sheet", str(tmp_path / "v.png")])
  text = capsys.readouterr()
  assert rc == 0, text.err
  assert sorted(os.listdir(tmp_path)) == ["story.csv", "v_a.mp4", "v_a.png", "v_b.mp4", "v_b.png"]
  for name in ("v_a.mp4", "v_b.mp4"):
    assert media.video_info(str(tmp_path / name))["frames"] == 65  # 2 prompts x 1 chunk, trimmed to 4k + 1
  order = list(seen)
  assert [os.path.basename(p) for p in order] == ["v_a.mp4", "v_b.mp4"]  # ids in sorted order
  a, b = (seen[p] for p in order)
  assert [job.seed for job, _ in a + b] == [42, 42, 43, 43]
  assert [c.prompt["text"] for _, c in a] == ["a purple circle moves down",
                                                "a red square moves down on a grey background"]  # refined preferred
  assert [c.prompt["text"] for _, c in b] == ["a green triangle moves up", "a white circle moves left"]
  assert [c.prompt["weight"] for _, c in a + b] == [1.0] * 4  # --interpolation-steps 0: each switch at once
  assert "[1/2] id a: Helios-Base t2v: 65 frames (2 prompts, 2 chunks)" in text.out

  # --free-text-encoder encodes every prompt of the schedules up front (then frees UMT5): the same videos
  rc, again = run(["--interactive-prompts", str(csv), "--interpolate-time", "1", "--interpolation-steps", "0",
                   "--out", str(tmp_path / "v.mp4"), "--free-text-encoder", "--overwrite"])
  assert rc == 0, capsys.readouterr().err
  for path in order:
    np.testing.assert_array_equal(np.concatenate([c.frames for _, c in again[path]]),
                                  np.concatenate([c.frames for _, c in seen[path]]))


# ------------------------------------------------------------------------------------------------------------
# --prompt-file, interruption, outputs that exist


def test_prompt_file_interrupt_then_resume(tmp_path, capsys):
  prompts = tmp_path / "p.txt"
  prompts.write_text("a purple circle moves down\n\n   \na green square moves up  \n", encoding="utf-8")
  argv = ["--prompt-file", str(prompts), "--num-frames", "33", "--out", str(tmp_path / "v.mp4")]

  def interrupt_second(job, chunk):
    if job.out.endswith("v_001.mp4"):
      raise KeyboardInterrupt

  rc, seen = run(argv, interrupt_second)
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 130
  assert err == [f"error: interrupted; {tmp_path / 'v_001.mp4'} was not written; the 1 finished video before it "
                 "is kept"]
  assert sorted(os.listdir(tmp_path)) == ["p.txt", "v_000.mp4", "v_000.png"]  # nothing half-written
  first = media.read_video(str(tmp_path / "v_000.mp4"))
  mtime = os.path.getmtime(tmp_path / "v_000.mp4")

  rc, seen = run(argv)  # the rerun skips the finished video and makes the other one with its own seed
  text = capsys.readouterr()
  assert rc == 0, text.err
  assert f"skipping prompt 0: {tmp_path / 'v_000.mp4'} exists (pass --overwrite to replace it)" in text.out
  assert list(seen) == [str(tmp_path / "v_001.mp4")]
  job, chunk = seen[str(tmp_path / "v_001.mp4")][0]
  assert (job.seed, job.prompt, chunk.prompt["text"]) == (43, "a green square moves up", "a green square moves up")
  assert os.path.getmtime(tmp_path / "v_000.mp4") == mtime
  assert media.video_info(str(tmp_path / "v_001.mp4"))["frames"] == 33
  assert not np.array_equal(first, media.read_video(str(tmp_path / "v_001.mp4")))
  assert sorted(os.listdir(tmp_path)) == ["p.txt", "v_000.mp4", "v_000.png", "v_001.mp4", "v_001.png"]


def test_existing_outputs_skipped_or_replaced(tmp_path, capsys, monkeypatch):
  """Without --overwrite every existing output is skipped (no model is loaded); with it each is made again."""
  prompts = tmp_path / "p.txt"
  prompts.write_text("one\ntwo\n", encoding="utf-8")
  for name in ("v_000.mp4", "v_001.mp4"):
    (tmp_path / name).write_bytes(b"old")
  made = []
  monkeypatch.setattr(sample, "load_pipeline", lambda *a, **k: object())
  monkeypatch.setattr(sample, "_make_video", lambda pipe, call, job, *a, **k: made.append((job.out, call["seed"]))
                      or sample._VideoStats(frames=1, chunks=[1.0], total=1.0))
  argv = [*SMALL, "--prompt-file", str(prompts), "--out", str(tmp_path / "v.mp4")]
  assert sample.main(argv) == 0
  assert "nothing to do: every output exists" in capsys.readouterr().out and made == []
  assert sample.main([*argv, "--overwrite"]) == 0
  assert made == [(str(tmp_path / "v_000.mp4"), 42), (str(tmp_path / "v_001.mp4"), 43)]
  made.clear()
  assert sample.main([*argv, "--seed", "7", "--out", str(tmp_path / "one.mp4")]) == 0  # fresh names: both made
  assert made == [(str(tmp_path / "one_000.mp4"), 7), (str(tmp_path / "one_001.mp4"), 8)]
  made.clear()
  prompts.write_text("only one\n", encoding="utf-8")  # one line: --out itself
  assert sample.main([*argv, "--out", str(tmp_path / "single.mp4")]) == 0
  assert made == [(str(tmp_path / "single.mp4"), 42)]


# ------------------------------------------------------------------------------------------------------------
# Mistakes: one error line, exit 2, no model loaded, nothing written


@pytest.fixture
def files(tmp_path):
  def write(name, data):
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return str(path)

  (tmp_path / "folder.txt").mkdir()
  return dict(
      tmp=tmp_path, out=str(tmp_path / "o" / "v.mp4"), folder=str(tmp_path / "folder.txt"),
      txt=write("p.txt", "a cat\n"), blank_txt=write("blank.txt", "\n  \n\t\n"), latin1_txt=write("l.txt", b"caf\xe9\n"),
      nul_txt=write("nul.txt", b"a\x00b\n"),
      csv=write("s.csv", "id,prompt_index,prompt\n1,0,a cat\n"), empty_csv=write("e.csv", ""),
      header_csv=write("h.csv", "id,prompt_index,prompt\n"), latin1_csv=write("l.csv", b"id,prompt_index,prompt\n1,0,caf\xe9\n"),
      nocol_csv=write("n.csv", "id,prompt\n1,a cat\n"), badindex_csv=write("b.csv", "id,prompt_index,prompt\n1,first,a cat\n"),
      emptyprompt_csv=write("p.csv", "id,prompt_index,prompt\n1,0,  \n"),
      clash_csv=write("c.csv", "id,prompt_index,prompt\na/b,0,x\na_b,0,y\n"))


CLI_ERRORS = {
    "prompt_file_missing": (lambda f: ["--prompt-file", "/nonexistent/p.txt"], "prompt file not found: /nonexistent/p.txt"),
    "prompt_file_folder": (lambda f: ["--prompt-file", f["folder"]], r"prompt file .*folder.txt is a folder"),
    "prompt_file_blank": (lambda f: ["--prompt-file", f["blank_txt"]], r"blank.txt has no prompts"),
    "prompt_file_not_utf8": (lambda f: ["--prompt-file", f["latin1_txt"]], r"l.txt is not UTF-8 text"),
    "prompt_file_binary": (lambda f: ["--prompt-file", f["nul_txt"]], r"nul.txt is not a text file"),
    "csv_missing": (lambda f: ["--interactive-prompts", "/nonexistent/s.csv"],
                    "interactive prompt file not found: /nonexistent/s.csv"),
    "csv_empty": (lambda f: ["--interactive-prompts", f["empty_csv"]], r"e.csv has no prompt rows"),
    "csv_header_only": (lambda f: ["--interactive-prompts", f["header_csv"]], r"h.csv has no prompt rows"),
    "csv_not_utf8": (lambda f: ["--interactive-prompts", f["latin1_csv"]], r"l.csv is not UTF-8 text"),
    "csv_missing_column": (lambda f: ["--interactive-prompts", f["nocol_csv"]], r"n.csv lacks the column prompt_index"),
    "csv_bad_index": (lambda f: ["--interactive-prompts", f["badindex_csv"]],
                      r"b.csv line 2: prompt_index must be an integer, got 'first'"),
    "csv_empty_prompt": (lambda f: ["--interactive-prompts", f["emptyprompt_csv"]], r"p.csv line 2: empty prompt"),
    "csv_ids_same_file_name": (lambda f: ["--interactive-prompts", f["clash_csv"]],
                               r"id a/b and id a_b give the same output name .*v_a_b.mp4"),
    "csv_with_prompt": (lambda f: ["--interactive-prompts", f["csv"], "--prompt", "x"],
                        "pass --prompt or --interactive-prompts, not both"),
    "csv_with_prompt_file": (lambda f: ["--interactive-prompts", f["csv"], "--prompt-file", f["txt"]],
                             "pass --prompt-file or --interactive-prompts, not both"),
    "prompt_file_with_prompt": (lambda f: ["--prompt-file", f["txt"], "--prompt", "x"],
                                "pass --prompt or --prompt-file, not both"),
    "prompt_file_with_embeds": (lambda f: ["--prompt-file", f["txt"], "--prompt-embeds", "e.npy"],
                                "pass --prompt-embeds or --prompt-file, not both"),
    "interpolate_without_csv": (lambda f: ["--prompt-file", f["txt"], "--interpolate-time", "3"],
                                "--interpolate-time goes with --interactive-prompts"),
    "blend_longer_than_hold": (lambda f: ["--interactive-prompts", f["csv"], "--interpolate-time", "2"],
                               r"--interpolation-steps \(3\) must not exceed --interpolate-time \(2\)"),
    "hold_zero": (lambda f: ["--interactive-prompts", f["csv"], "--interpolate-time", "0"],
                  "--interpolate-time must be at least 1 chunk, got 0"),
    "bad_fps": (lambda f: ["--prompt", "x", "--fps", "0"], "--fps must be positive, got 0"),
    "bad_num_frames": (lambda f: ["--prompt", "x", "--num-frames", "0"], "--num-frames must be positive, got 0"),
}


@pytest.mark.parametrize("case", sorted(CLI_ERRORS))
def test_cli_mistakes(case, files, capsys, monkeypatch):
  def no_loading(*a, **k):
    raise AssertionError("a model was loaded before the arguments were checked")

  monkeypatch.setattr(sample, "load_pipeline", no_loading)
  argv, pattern = CLI_ERRORS[case]
  rc = sample.main([*SMALL, *argv(files), "--out", files["out"]])
  err = capsys.readouterr().err
  assert rc == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert re.search(pattern, lines[0]), lines[0]
  assert not os.path.exists(os.path.dirname(files["out"])) or os.listdir(os.path.dirname(files["out"])) == []


# ------------------------------------------------------------------------------------------------------------
# --help, --version


def test_help_and_version(capsys):
  assert sample.main(["--help"]) == 0
  text = capsys.readouterr().out
  assert "(default: None)" not in text and "(default: False)" not in text
  assert "(default: 42)" in text and "(default: 24)" in text and "seed + i" in text
  assert all(a.help for a in sample.build_parser()._actions), "every option has a help text"
  assert sample.main(["--version"]) == 0
  assert __version__ in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------------
# What a newcomer meets first: the length plan, long-video warning, ETA, flushed start-up lines, --resize,
# too-small inputs, created folders


def test_crop_and_pad_shapes_and_content():
  img = np.zeros((4, 8, 3), np.uint8)  # 8 wide, 4 high: columns numbered in channel 0, rows in channel 1
  img[..., 0] = np.arange(8)[None, :]
  img[..., 1] = np.arange(4)[:, None]
  crop = media.crop_to_aspect(img, 4, 4)  # too wide for 1:1: the centre 4 columns, all rows
  assert crop.shape == (4, 4, 3) and crop[0, :, 0].tolist() == [2, 3, 4, 5] and crop[:, 0, 1].tolist() == [0, 1, 2, 3]
  assert media.crop_to_aspect(img, 2, 8).shape == (4, 1, 3)  # too wide for 1:4: one column (centre, rounded down)
  assert media.crop_to_aspect(img, 80, 40).shape == (4, 8, 3)  # same aspect: untouched
  np.testing.assert_array_equal(media.crop_to_aspect(img.transpose(1, 0, 2), 4, 4), img.transpose(1, 0, 2)[2:6])
  pad = media.pad_to_aspect(img + 10, 4, 4)  # letterbox: 2 black rows above and below
  assert pad.shape == (8, 8, 3)
  assert (pad[:2] == 0).all() and (pad[6:] == 0).all()
  np.testing.assert_array_equal(pad[2:6], img + 10)
  edge = media.pad_to_aspect(img, 4, 4, fill="edge")
  np.testing.assert_array_equal(edge[:3], np.stack([img[0]] * 3))  # edge rows repeated
  np.testing.assert_array_equal(edge[6:], np.stack([img[3]] * 2))
  pillar = media.pad_to_aspect(np.full((8, 2, 3), 7, np.uint8), 4, 4)  # pillarbox: 3 black columns each side
  assert pillar.shape == (8, 8, 3) and (pillar[:, :3] == 0).all() and (pillar[:, 5:] == 0).all()
  assert (pillar[:, 3:5] == 7).all()
  assert media.crop_box(832, 480, 128, 128) == (176, 0, 656, 480) and media.pad_size(832, 480, 128, 128) == (
      832, 832, 0, 176)
  # fit_image: exactly the target size; stretch is the preprocessing's own resize (the default path unchanged)
  rng = np.random.default_rng(0)
  photo = PIL.Image.fromarray(rng.integers(0, 256, (30, 52, 3), dtype=np.uint8))
  for mode in media.RESIZE_MODES:
    assert media.fit_image(photo, 16, 24, mode).size == (16, 24)
  np.testing.assert_array_equal(media.preprocess_image(media.fit_image(photo, 16, 24, "stretch"), 24, 16),
                                media.preprocess_image(photo, 24, 16))
  np.testing.assert_array_equal(np.asarray(media.fit_image(photo, 16, 24, "crop")), np.asarray(
      PIL.Image.fromarray(np.asarray(photo)[:, 16:36]).resize((16, 24), PIL.Image.LANCZOS, reducing_gap=None)))
  with pytest.raises(InputError, match="resize must be one of stretch, crop, pad"):
    media.fit_image(photo, 16, 16, "zoom")


def test_resize_notes():
  note = media.resize_note
  assert note((128, 128), (128, 128)) is None
  assert note((1280, 768), (640, 384)) == "1280x768 is resized to 640x384"
  assert note((1280, 768), (640, 384), "crop") == "1280x768 is resized to 640x384"  # nothing to crop
  assert note((832, 480), (128, 128)) == "832x480 (1.73:1) is stretched to 128x128 (1:1)"
  assert note((832, 480), (128, 128), "crop") == \
      "832x480 (1.73:1) is centre-cropped to 480x480, then resized to 128x128 (1:1)"
  assert note((832, 480), (128, 128), "pad") == \
      "832x480 (1.73:1) is padded with black to 832x832, then resized to 128x128 (1:1)"
  assert note((1, 1), (640, 384)) == "1x1 (1:1) is stretched to 640x384 (1.67:1)"
  assert note((480, 832), (384, 640), "pad", "edge").startswith("480x832 (0.58:1) is padded with its edge pixels to")


def _no_generation(monkeypatch, calls=None):
  """load_pipeline and _make_video replaced: records each video's pipeline call, generates nothing."""
  monkeypatch.setattr(sample, "load_pipeline", lambda *a, **k: object())

  def fake(pipe, call, job, *a, **k):
    if calls is not None:
      calls.append(call)
    return sample._VideoStats(frames=1, chunks=[1.0], total=1.0, size=(64, 64))

  monkeypatch.setattr(sample, "_make_video", fake)


def test_resize_messages_and_modes(tmp_path, capsys, monkeypatch):
  calls = []
  _no_generation(monkeypatch, calls)
  wide = np.random.default_rng(1).integers(0, 256, (480, 832, 3), dtype=np.uint8)
  PIL.Image.fromarray(wide).save(tmp_path / "wide.png")
  base = [*SMALL, "--num-frames", "33", "--out", str(tmp_path / "v.mp4")]
  assert sample.main([*base, "--mode", "i2v", "--image", str(tmp_path / "wide.png")]) == 0
  out = capsys.readouterr().out
  assert "wide.png: 832x480 (1.73:1) is stretched to 64x64 (1:1) (--resize crop or pad keeps its aspect ratio)" in out
  original = calls[-1]["image"]  # stretch: the image as read, left to the pipeline's diffusers-identical resize
  assert original.size == (832, 480)
  np.testing.assert_array_equal(np.asarray(original), wide)
  assert sample.main([*base, "--mode", "i2v", "--image", str(tmp_path / "wide.png"), "--resize", "crop"]) == 0
  assert "wide.png: 832x480 (1.73:1) is centre-cropped to 480x480, then resized to 64x64 (1:1)\n" in \
      capsys.readouterr().out
  np.testing.assert_array_equal(np.asarray(calls[-1]["image"]), np.asarray(media.fit_image(original, 64, 64, "crop")))
  # a V2V video, letterboxed with black: bars above and below, the (grey) picture between them
  media.write_video(str(tmp_path / "wide.mp4"), np.full((33, 60, 104, 3), 200, np.uint8))
  assert sample.main([*base, "--mode", "v2v", "--video", str(tmp_path / "wide.mp4"), "--resize", "pad"]) == 0
  assert "wide.mp4: 104x60 (1.73:1) is padded with black to 104x104, then resized to 64x64 (1:1)" in \
      capsys.readouterr().out
  video = calls[-1]["video"]
  assert video.shape == (33, 64, 64, 3)
  assert video[:, :10].max() <= 2 and video[:, 54:].max() <= 2 and abs(int(video[:, 20:44].mean()) - 200) <= 3
  assert sample.main([*base, "--mode", "v2v", "--video", str(tmp_path / "wide.mp4")]) == 0
  assert "wide.mp4: 104x60 (1.73:1) is stretched to 64x64 (1:1)" in capsys.readouterr().out
  assert abs(int(calls[-1]["video"].mean()) - 200) <= 3
  # same aspect ratio: a plain "resized"; the right size: nothing
  assert sample.main([*base, "--mode", "i2v", "--image", DEMO.image]) == 0
  assert "start.png: 128x128 is resized to 64x64\n" in capsys.readouterr().out
  PIL.Image.fromarray(wide[:64, :64]).save(tmp_path / "exact.png")
  assert sample.main([*base, "--mode", "i2v", "--image", str(tmp_path / "exact.png")]) == 0
  assert "exact.png:" not in capsys.readouterr().out
  # --pad-fill only with --resize pad; --resize only with an input to fit
  assert sample.main([*base, "--mode", "i2v", "--image", DEMO.image, "--pad-fill", "edge"]) == 2
  assert capsys.readouterr().err.strip() == "error: --pad-fill goes with --resize pad"
  assert sample.main([*base, "--prompt", "x", "--resize", "crop"]) == 2
  assert "--resize crop fits an --image or --video" in capsys.readouterr().err


def test_too_small_inputs_are_refused(tmp_path, capsys, monkeypatch):
  def no_loading(*a, **k):
    raise AssertionError("a model was loaded")

  monkeypatch.setattr(sample, "load_pipeline", no_loading)
  PIL.Image.new("RGB", (1, 1), (255, 0, 0)).save(tmp_path / "dot.png")
  media.write_video(str(tmp_path / "tiny.mp4"), np.zeros((33, 6, 6, 3), np.uint8))
  base = [*SMALL, "--out", str(tmp_path / "v.mp4")]
  for argv, what in ((["--mode", "i2v", "--image", str(tmp_path / "dot.png")], "start image .*dot.png is 1x1"),
                     (["--mode", "v2v", "--video", str(tmp_path / "tiny.mp4")], "start video .*tiny.mp4 is 6x6")):
    assert sample.main([*base, *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(f"error: {what} pixels: too small to start a video from "
                                            r"\(at least 8x8 is needed\)", lines[0]), lines
  with pytest.raises(InputError, match="is 8x7 pixels"):
    media.check_input_size((8, 7), "image")
  media.check_input_size((8, 8), "image")


def test_long_video_plan_warning_and_created_folder(tmp_path, capsys, monkeypatch):
  _no_generation(monkeypatch)
  out = tmp_path / "new" / "deeper" / "v.mp4"
  assert sample.main([*SMALL, "--num-frames", "100000", "--out", str(out)]) == 0
  text = capsys.readouterr()
  assert f"created folder {out.parent}\n" in text.out and out.parent.is_dir()
  assert "  3031 chunks of 33 frames: 100021 frames (100000 asked for, in whole chunks trimmed to 4k+1), 1 h 09 min " \
         "of video at 24 fps; memory stays flat (each chunk is written to the mp4 as it is made)" in text.out
  warning = [line for line in text.err.splitlines() if line.startswith("warning:")]
  assert warning == ["warning: 100021 frames (3031 chunks) will take long on a CPU: every chunk runs the whole "
                     "model; each chunk's line says how long the rest takes"]
  assert text.out.index("created folder") < text.out.index("loading the model from")
  # a minute of video (44 chunks) passes without the warning; the folder now exists: no message
  assert sample.main([*SMALL, "--num-frames", "1452", "--fps", "12", "--out", str(out)]) == 0
  text = capsys.readouterr()
  assert "warning" not in text.err and "created folder" not in text.out
  assert "44 chunks of 33 frames: 1449 frames (1452 asked for, in whole chunks trimmed to 4k+1), 2 min 01 s of video " \
         "at 12 fps" in text.out


def test_eta_and_durations():
  assert sample._eta([30.0], 1) == ""
  assert sample._eta([30.0], 5) == "; ETA after the next chunk"  # the first chunk's time includes compilation
  assert sample._eta([30.0, 4.0], 5) == "; about 12 s left (3 chunks)"
  assert sample._eta([30.0, 4.0, 6.0, 100.0], 5) == "; about 6.0 s left (1 chunk)"  # median: one stall is ignored
  assert sample._eta([30.0, 4.2], 3031) == "; about 3 h 32 min left (3029 chunks)"
  assert [sample._duration(s) for s in (3.14, 42.4, 59.6, 245, 4167.5)] == [
      "3.1 s", "42 s", "1 min 00 s", "4 min 05 s", "1 h 09 min"]


class _FlushLog:
  """A stdout that keeps only what was flushed: what a log file shows while the run goes on."""

  def __init__(self):
    self.pending, self.flushed = "", ""

  def write(self, text):
    self.pending += text
    return len(text)

  def flush(self):
    self.flushed += self.pending
    self.pending = ""

  def isatty(self):
    return False


class _FakeStream:
  """A pipe.stream stand-in: 4 chunks of 33 black 64x64 frames with set intervals; checks what was flushed."""

  def __init__(self, log):
    self.log, self.num_chunks, self.num_frames, self.width, self.height = log, 4, 129, 64, 64
    self.intervals = [0.0, 4.0, 6.0, 5.0]

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass

  def __iter__(self):
    from helios_jax.pipelines.stream import StreamChunk
    for k in range(self.num_chunks):
      if k == 0:
        assert self.log.flushed.endswith("generating chunk 1/4 (it includes compiling the model) ...\n")
      else:
        assert self.log.flushed.splitlines()[-1].startswith(f"chunk {k}/4: ")
      n = 33 if k < 3 else 30
      yield StreamChunk(index=k, frames=np.zeros((n, 64, 64, 3), np.uint8), first_frame=33 * k,
                        timings={"interval_s": self.intervals[k]}, prompt={})


def test_start_up_and_chunk_lines_are_flushed_when_redirected(tmp_path, monkeypatch):
  log = _FlushLog()

  class Pipe:
    def stream(self, **call):
      assert log.flushed.endswith("encoding the prompt ...\n")
      return _FakeStream(log)

  def load(*a, **k):
    assert log.flushed.splitlines()[-1].startswith("loading the model from ")
    return Pipe()

  monkeypatch.setattr(sample, "load_pipeline", load)
  monkeypatch.setattr(sys, "stdout", log)
  assert sample.main([*SMALL, "--num-frames", "129", "--out", str(tmp_path / "v.mp4")]) == 0
  assert log.pending == ""
  lines = log.flushed.splitlines()
  chunks = [line for line in lines if line.startswith("chunk ")]
  assert [line.split(";", 1)[-1].strip() if ";" in line else "" for line in chunks] == [
      "ETA after the next chunk", "about 8.0 s left (2 chunks)", "about 5.0 s left (1 chunk)", ""]
  assert media.video_info(str(tmp_path / "v.mp4"))["frames"] == 129


def test_demo_i2v_into_a_new_folder(tmp_path, capsys):
  """A real run (bundled demo, 64x64, 2 steps, 33 frames): the folder, resize and start-up lines."""
  PIL.Image.open(DEMO.image).crop((0, 32, 128, 96)).save(tmp_path / "strip.png")  # 128x64, 2:1
  out = tmp_path / "made" / "v.mp4"
  rc, seen = run(["--mode", "i2v", "--image", str(tmp_path / "strip.png"), "--resize", "crop", "--num-frames", "33",
                  "--out", str(out)])
  text = capsys.readouterr()
  assert rc == 0, text.err
  lines = text.out.splitlines()
  order = [f"created folder {out.parent}", "start image ", "loading the model from ", "Helios-Base i2v: 33 frames",
           "  1 chunk of 33 frames: 33 frames, 1.4 s of video at 24 fps; memory stays flat",
           "encoding the prompt and the start image ...", "generating chunk 1/1 (it includes compiling the model) ...",
           "chunk 1/1: frames 0-32, first chunk after", f"wrote {out}: 33 frames, 64x64"]
  at = [next(i for i, line in enumerate(lines) if line.startswith(head)) for head in order]
  assert at == sorted(at), text.out
  assert "strip.png: 128x64 (2:1) is centre-cropped to 64x64 (1:1)" in text.out
  assert media.video_info(str(out))["frames"] == 33 and len(seen[str(out)]) == 1


def test_fp8_quantization_flag(tmp_path, capsys):
  """--quantization fp8 on the bundled demo: the same video to within the fp8 rounding (measured 2026-12-03 on the
  CPU: 53.9 dB PSNR against the unquantised frames at 64x64, --steps 2 --guidance 1), not the same frames."""
  rc, plain = run(["--mode", "t2v", "--out", str(tmp_path / "plain.mp4")])
  assert rc == 0
  rc, q = run(["--mode", "t2v", "--out", str(tmp_path / "fp8.mp4"), "--quantization", "fp8"])
  assert rc == 0
  a = np.concatenate([c.frames for _, c in plain[str(tmp_path / "plain.mp4")]]).astype(np.float64)
  b = np.concatenate([c.frames for _, c in q[str(tmp_path / "fp8.mp4")]]).astype(np.float64)
  assert a.shape == b.shape
  mse = float(np.mean((a - b) ** 2))
  psnr = 10 * np.log10(255.0 ** 2 / mse) if mse else float("inf")
  print(f"fp8 vs unquantised demo frames: PSNR {psnr:.1f} dB")
  assert 25.0 < psnr < float("inf")
