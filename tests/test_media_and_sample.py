"""Media I/O (helios_jax.io.media), the I2V / V2V encode path of the pipelines, and the sample.py command line.

* Preprocessing parity with diffusers' ``VideoProcessor`` (numbers recorded by
  tests/reference/make_media_fixtures.py): exact, since the Lanczos path is Pillow itself and the nearest path
  reproduces torch's index rule.
* ``_encode_image`` / ``_encode_video`` against diffusers' ``prepare_image_latents`` / ``prepare_video_latents``, and
  whole I2V / V2V calls from pixels against the reference pipeline, with the recorded draws replayed (tiny VAE and
  transformer of ``fixtures/pipeline/distilled``).
* mp4 round trip, atomic writes, and the command line: every user mistake is one ``error:`` line and exit 2 before
  any model is loaded; an end-to-end run on the tiny distilled folder (no text encoder: ``--prompt-embeds``).
"""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import PIL.Image
import pytest

from helios_jax.errors import InputError
from helios_jax.io import media

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "reference", "fixtures")
TINY = os.path.join(FIX, "pipeline", "distilled")
sys.path.insert(0, ROOT)
from helios_jax.cli import sample  # noqa: E402

DATA = dict(np.load(os.path.join(FIX, "media.npz")))
LATENT_TOL = 1e-5  # absolute, on latents of magnitude ~1..8
PIPE_TOL = 1e-4  # relative, as tests/test_pipelines.py


# ------------------------------------------------------------------------------------------------------------
# Preprocessing parity


def _f(a):
  return a.astype(np.float32) / 255.0


PREPROCESS_CASES = {
    "pil_up": (lambda: media.preprocess_image(PIL.Image.fromarray(DATA["img_up"]), 48, 80), "pre_pil_up"),
    "uint8_down": (lambda: media.preprocess_image(DATA["img_down"], 32, 64), "pre_pil_down"),
    "float_up": (lambda: media.preprocess_image(_f(DATA["img_up"]), 48, 80), "pre_float_up"),
    "float_down": (lambda: media.preprocess_image(_f(DATA["img_down"]), 32, 64), "pre_float_down"),
    "float_odd_rounded_to_8": (lambda: media.preprocess_image(_f(DATA["img_up"]), 41, 77), "pre_float_odd"),
    "signed_float": (lambda: media.preprocess_image(_f(DATA["img_down"]) * 2 - 1, 32, 64), "pre_signed"),
    "video_pil_list": (lambda: media.preprocess_video([PIL.Image.fromarray(f) for f in DATA["vid"]], 32, 64),
                       "pre_vid_pil"),
    "video_uint8": (lambda: media.preprocess_video(DATA["vid"], 32, 64), "pre_vid_pil"),
    "video_float": (lambda: media.preprocess_video(_f(DATA["vid"]), 32, 64), "pre_vid_float"),
}


@pytest.mark.parametrize("case", sorted(PREPROCESS_CASES))
def test_preprocess_matches_diffusers(case):
  fn, key = PREPROCESS_CASES[case]
  out = fn()
  assert out.dtype == np.float32 and out.shape == DATA[key].shape
  np.testing.assert_array_equal(out, DATA[key])


def test_preprocess_from_files(tmp_path):
  path = str(tmp_path / "img.png")
  PIL.Image.fromarray(DATA["img_down"]).convert("RGBA").save(path)  # alpha is dropped
  np.testing.assert_array_equal(media.preprocess_image(path, 32, 64), DATA["pre_pil_down"])
  vid = str(tmp_path / "v.mp4")
  media.write_video(vid, DATA["vid"])
  out = media.preprocess_video(vid, 32, 64)
  assert out.shape == (1, 3, 9, 32, 64)
  assert np.abs(out - DATA["pre_vid_pil"]).mean() < 0.1  # H.264 is lossy


@pytest.mark.parametrize("value, pattern", [
    (np.zeros((8, 8, 3), np.int32), "uint8 .* or floating point"),
    (np.zeros((8, 8, 5), np.uint8), r"must be an \(H, W, 3\) image"),
    (np.full((8, 8, 3), 3.0, np.float32), r"values must lie in \[0, 1\]"),
    (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
    (np.zeros((8, 8), np.float32), r"must be an \(H, W, 3\) array"),
    ("/nonexistent/x.png", "image file not found: /nonexistent/x.png"),
    (object(), "must be a file path, a PIL image"),
])
def test_preprocess_bad_image(value, pattern):
  with pytest.raises(InputError, match=pattern):
    media.preprocess_image(value, 32, 64)


def test_corrupt_files_name_the_file(tmp_path):
  bad_img = tmp_path / "broken.png"
  bad_img.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
  with pytest.raises(InputError, match=f"cannot read image {bad_img}"):
    media.load_image(bad_img)
  bad_vid = tmp_path / "broken.mp4"
  bad_vid.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(200))
  with pytest.raises(InputError, match=f"cannot read video {bad_vid}"):
    media.read_video(bad_vid)
  with pytest.raises(InputError, match="video file not found"):
    media.read_video(tmp_path / "missing.mp4")


# ------------------------------------------------------------------------------------------------------------
# Writing


def _gradient_video(f=10, h=32, w=48):
  t, y, x = np.meshgrid(np.linspace(0, 1, f), np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  return np.stack([x, y, 0.5 + 0.4 * np.sin(6 * t + 0 * x)], -1).astype(np.float32)


def test_mp4_round_trip(tmp_path):
  frames = _gradient_video()
  path = media.write_video(str(tmp_path / "a.mp4"), frames)
  info = media.video_info(path)
  assert info == dict(frames=10, width=48, height=32, fps=24.0, codec="h264")
  back = media.read_video(path).astype(np.float32) / 255.0
  assert back.shape == frames.shape
  assert np.abs(back - frames).mean() < 0.02
  assert os.listdir(tmp_path) == ["a.mp4"]
  # odd sizes are padded to even (yuv420p), uint8 input is taken as is
  path = media.write_video(str(tmp_path / "odd.mp4"), media.to_uint8(frames[:, :31, :47]))
  assert media.video_info(path)["frames"] == 10


def test_failed_write_leaves_no_file(tmp_path):
  def frames_then_crash():
    for i, f in enumerate(_gradient_video()):
      if i == 3:
        raise RuntimeError("generator died")
      yield f

  final = tmp_path / "out.mp4"
  with pytest.raises(RuntimeError, match="generator died"):
    media.write_video(str(final), frames_then_crash())
  assert os.listdir(tmp_path) == []
  # an existing file with the final name is left as it was
  final.write_bytes(b"previous")
  with pytest.raises(RuntimeError):
    media.write_video(str(final), frames_then_crash())
  assert final.read_bytes() == b"previous" and os.listdir(tmp_path) == ["out.mp4"]
  with pytest.raises(InputError, match="no frames to write"):
    media.write_video(str(tmp_path / "empty.mp4"), iter([]))
  assert os.listdir(tmp_path) == ["out.mp4"]


def test_contact_sheet(tmp_path):
  frames = _gradient_video(f=33)
  sheet = media.contact_sheet(frames, num=8, columns=4)
  assert sheet.shape == (2 * 32 + 2, 4 * 48 + 6, 3) and sheet.dtype == np.uint8
  np.testing.assert_array_equal(sheet[:32, :48], media.to_uint8(frames[0]))
  np.testing.assert_array_equal(sheet[34:, 150:], media.to_uint8(frames[-1]))
  path = media.write_contact_sheet(str(tmp_path / "s.png"), frames)
  assert PIL.Image.open(path).size == (4 * 48 + 6, 2 * 32 + 2)


def test_check_writable(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(InputError, match="cannot write output"):
    media.check_writable(str(blocker / "out.mp4"))
  with pytest.raises(InputError, match="is a folder"):
    media.check_writable(str(tmp_path))
  assert media.check_writable(str(tmp_path / "new" / "o.mp4")).endswith("o.mp4")
  assert os.listdir(tmp_path / "new") == []


# ------------------------------------------------------------------------------------------------------------
# I2V / V2V encode parity with the reference (tiny VAE and transformer)


@pytest.fixture(scope="module")
def pipe():
  import jax.numpy as jnp
  from helios_jax.pipelines import HeliosPyramidPipeline
  return HeliosPyramidPipeline.from_pretrained(TINY, dtype=jnp.float32)


def _replay(prefix):
  from helios_jax.pipelines import ReplayNoiseSource
  shapes = json.loads(str(DATA[f"{prefix}_draw_shapes"]))
  return ReplayNoiseSource.from_flat(list(DATA[f"{prefix}_draw_kinds"]), shapes, DATA[f"{prefix}_draw_values"])


def _layout():
  from helios_jax.pipelines.history import HistoryLayout
  return HistoryLayout.make((16, 2, 1), 9, True)


def test_encode_image_matches_prepare_image_latents(pipe):
  noise = _replay("prep_i2v")
  il, fl = pipe._encode_image(PIL.Image.fromarray(DATA["i2v_image"]), 64, 128, _layout(), noise, None, None)
  assert noise.remaining == 0 and il.dtype == fl.dtype == np.float32
  np.testing.assert_allclose(np.asarray(il), DATA["prep_image_latents"], atol=LATENT_TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(fl), DATA["prep_fake_image_latents"], atol=LATENT_TOL, rtol=0)


def test_encode_video_matches_prepare_video_latents(pipe):
  noise = _replay("prep_v2v")
  first, vl = pipe._encode_video(DATA["v2v_video"], 64, 128, _layout(), noise)
  assert noise.remaining == 0 and vl.shape == (1, 4, 18, 8, 16) and vl.dtype == np.float32
  np.testing.assert_allclose(np.asarray(first), DATA["prep_first_latents"], atol=LATENT_TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(vl), DATA["prep_video_latents"], atol=LATENT_TOL, rtol=0)


@pytest.mark.parametrize("mode", ["i2v", "v2v"])
def test_pipeline_from_pixels_matches_reference(pipe, mode):
  noise = _replay(mode)
  extra = dict(image=PIL.Image.fromarray(DATA["i2v_image"])) if mode == "i2v" else dict(video=DATA["v2v_video"])
  out = pipe(prompt_embeds=DATA["prompt_embeds"], height=64, width=128, num_frames=33, guidance_scale=1.0,
             pyramid_num_inference_steps_list=(2, 2, 2), is_amplify_first_chunk=True, output_type="latent",
             noise_source=noise, progress=False, **extra).frames
  ref = DATA[f"{mode}_latents"]
  assert noise.remaining == 0 and out.shape == ref.shape
  err = float(np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref))
  assert err <= PIPE_TOL, err


def test_video_shorter_than_a_chunk(pipe):
  with pytest.raises(InputError, match="the video has 32 frames; V2V needs at least 33"):
    pipe._encode_video(DATA["v2v_video"][:32], 64, 128, _layout(), None)


# ------------------------------------------------------------------------------------------------------------
# sample.py


@pytest.fixture
def cli_files(tmp_path):
  emb = tmp_path / "pe.npy"
  np.save(emb, np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32))
  img = tmp_path / "img.png"
  PIL.Image.fromarray(DATA["i2v_image"]).save(img)
  short = tmp_path / "short.mp4"
  media.write_video(str(short), DATA["v2v_video"][:20])
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  badvid = tmp_path / "bad.mp4"
  badvid.write_bytes(b"garbage" * 50)
  no_vae = tmp_path / "no_vae"
  no_vae.mkdir()
  for name in ("model_index.json", "transformer", "scheduler"):
    os.symlink(os.path.join(TINY, name), no_vae / name)
  blocker = tmp_path / "blocker"
  blocker.write_text("x")
  (tmp_path / "dir.mp4").mkdir()
  return dict(dir_mp4=str(tmp_path / "dir.mp4"), emb=str(emb), img=str(img), short=str(short), bad=str(bad), badvid=str(badvid), no_vae=str(no_vae),
              blocker=str(blocker), out=str(tmp_path / "o" / "out.mp4"), tmp=tmp_path)


def _base(f, *extra):
  return ["--model", TINY, "--prompt-embeds", f["emb"], "--height", "64", "--width", "128", "--num-frames", "33",
          "--dtype", "fp32", "--out", f["out"], *extra]


ERROR_CASES = {
    "missing_model_folder": (lambda f: ["--model", "/nonexistent/helios", "--prompt", "x"],
                             "model folder not found: /nonexistent/helios"),
    "missing_component": (lambda f: ["--model", f["no_vae"], "--prompt-embeds", f["emb"], "--out", f["out"]],
                          "has no vae/ folder"),
    "prompt_without_text_encoder": (lambda f: ["--model", TINY, "--prompt", "a cat", "--out", f["out"]],
                                    "has no text_encoder/ folder to encode --prompt"),
    "image_with_t2v": (lambda f: _base(f, "--image", f["img"]), "--mode t2v takes no --image"),
    "video_with_i2v": (lambda f: _base(f, "--mode", "i2v", "--video", f["short"]), "--mode i2v takes --image, not"),
    "i2v_without_image": (lambda f: _base(f, "--mode", "i2v"), "--mode i2v needs --image"),
    "image_with_v2v": (lambda f: _base(f, "--mode", "v2v", "--image", f["img"]), "--mode v2v takes --video, not"),
    "v2v_without_video": (lambda f: _base(f, "--mode", "v2v"), "--mode v2v needs --video"),
    "prompt_and_embeds": (lambda f: _base(f, "--prompt", "x"), "--prompt or --prompt-embeds, not both"),
    "no_prompt": (lambda f: ["--model", TINY], "pass --prompt"),
    "corrupt_image": (lambda f: _base(f, "--mode", "i2v", "--image", f["bad"]), "cannot read image .*bad.jpg"),
    "missing_image": (lambda f: _base(f, "--mode", "i2v", "--image", "/nonexistent/i.png"),
                      "image file not found: /nonexistent/i.png"),
    "corrupt_video": (lambda f: _base(f, "--mode", "v2v", "--video", f["badvid"]), "cannot read video .*bad.mp4"),
    "short_video": (lambda f: _base(f, "--mode", "v2v", "--video", f["short"]),
                    "short.mp4 has 20 frames; V2V needs at least 33"),
    "unwritable_out": (lambda f: _base(f) + ["--out", os.path.join(f["blocker"], "x.mp4")],
                       "cannot write output video .*blocker/x.mp4"),
    "out_is_folder": (lambda f: _base(f) + ["--out", f["dir_mp4"]], "output video path .*dir.mp4 is a folder"),
    "out_not_mp4": (lambda f: _base(f) + ["--out", str(f["tmp"] / "x.avi")], "--out must name an .mp4 file"),
    "unwritable_sheet": (lambda f: _base(f, "--contact-sheet", os.path.join(f["blocker"], "s.png")),
                         "cannot write contact sheet"),
    "bad_dtype": (lambda f: _base(f) + ["--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'"),
    "bad_steps_count": (lambda f: _base(f, "--steps", "2", "2"), "--steps needs 3 numbers"),
    "bad_size": (lambda f: _base(f) + ["--height", "100"], "must be multiples of 64"),
    "bad_embeds_width": (lambda f: _base(f) + ["--prompt-embeds", f["img"]], "cannot read prompt embeddings"),
    "cfg_without_negative": (lambda f: _base(f, "--guidance", "3"), "needs --negative-prompt-embeds"),
    "unstack_with_mesh": (lambda f: _base(f, "--unstack-layers", "--mesh", "data=1"),
                          "--unstack-layers is a one-device option"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_cli_user_mistakes(case, cli_files, capsys, monkeypatch):
  from helios_jax.pipelines import HeliosPipeline, HeliosPyramidPipeline

  def no_loading(*a, **k):
    raise AssertionError("a model was loaded before the arguments were checked")

  monkeypatch.setattr(HeliosPyramidPipeline, "from_pretrained", no_loading)
  monkeypatch.setattr(HeliosPipeline, "from_pretrained", no_loading)
  argv, pattern = ERROR_CASES[case]
  rc = sample.main(argv(cli_files))
  err = capsys.readouterr().err
  assert rc == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert re.search(pattern, lines[0]), lines[0]
  assert not os.path.exists(cli_files["out"])


def test_cli_without_model_and_without_bundled_demo_points_to_weights(tmp_path, monkeypatch, capsys):
  """No --model uses the bundled demo model (tests/test_demo.py); an installation without it says where the real
  weights are."""
  monkeypatch.setattr(sample, "DEMO_DIR", str(tmp_path / "missing"))
  assert sample.main(["--prompt", "x", "--out", str(tmp_path / "x.mp4")]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ")
  assert "bundled demo model is missing" in lines[0] and "BestWishYsh/Helios-Distilled" in lines[0]


def test_cli_end_to_end(cli_files, capsys):
  """T2V, then I2V from an image file and V2V from an mp4 (compiled functions are shared between the runs)."""
  sheet = str(cli_files["tmp"] / "sheet.png")
  assert sample.main(_base(cli_files, "--contact-sheet", sheet)) == 0
  out = capsys.readouterr().out
  assert media.video_info(cli_files["out"])["frames"] == 33
  assert os.path.isfile(sheet)
  assert "wrote " + cli_files["out"] in out and "frames/s" in out and "Helios-Distilled t2v" in out
  i2v = str(cli_files["tmp"] / "i2v.mp4")
  assert sample.main(_base(cli_files, "--mode", "i2v", "--image", cli_files["img"]) + ["--out", i2v]) == 0
  assert media.video_info(i2v)["frames"] == 33
  src = str(cli_files["tmp"] / "src.mp4")
  media.write_video(src, DATA["v2v_video"][:40])
  v2v = str(cli_files["tmp"] / "v2v.mp4")
  assert sample.main(_base(cli_files, "--mode", "v2v", "--video", src, "--unstack-layers") + ["--out", v2v]) == 0
  info = media.video_info(v2v)
  assert info["frames"] == 33 and (info["width"], info["height"]) == (128, 64)
  leftovers = [n for n in os.listdir(cli_files["tmp"]) + os.listdir(cli_files["tmp"] / "o") if n.startswith(".")]
  assert leftovers == []
