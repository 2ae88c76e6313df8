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
import sample  # noqa: E402

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
  monkeypatch.setattr(sample, "_make_video", lambda pipe, call, job, *a: made.append((job.out, call["seed"]))
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
