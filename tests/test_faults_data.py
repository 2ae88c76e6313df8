"""Dirty data in preparation (issue #24 item 3): corrupt, zero-byte, too-short, missing and non-UTF-8-captioned
rows are skipped and counted by reason in report.json; SIGTERM or kill -9 midway and a rerun give the same dataset
as one uninterrupted run; paths with spaces and non-ASCII names work. The VAE is a stand-in with the real
encoder's interface (posterior sample from a key), so the tests check the key derivation, not the VAE."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from helios_jax.training import prepare_data as prep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW = 5  # frames per chunk (1 + 4: two latent frames)
SIZE = 16


class FakeVAE:
  """``encode(x (1, 3, F, H, W)).latent_dist.sample(key)``: the frame means plus unit noise from ``key``."""

  config = types.SimpleNamespace(latents_mean=(0.0, 0.0), latents_std=(1.0, 1.0))

  def encode(self, x):
    import jax
    import jax.numpy as jnp
    t = 1 + (x.shape[2] - 1) // 4
    mean = jnp.broadcast_to(x.mean(), (1, 2, t, x.shape[3] // 8, x.shape[4] // 8))
    return types.SimpleNamespace(latent_dist=types.SimpleNamespace(
        sample=lambda key: mean + jax.random.normal(key, mean.shape)))


def text_encoder(delay: float = 0.0):
  def encode(caption: str) -> np.ndarray:
    time.sleep(delay)  # the slow run of the interruption tests: time to send a signal midway
    return np.frombuffer(caption.encode("utf-8").ljust(8, b" ")[:8], np.uint8).astype(np.float32)[None]
  return encode


def make_folder(root: str, n_good: int = 4) -> tuple[str, str]:
  """Videos (names with spaces and non-ASCII) and captions.csv with one row of each kind of bad input."""
  from helios_jax.io.media import write_video
  folder = os.path.join(root, "my videos ü")
  os.makedirs(folder)
  rng = np.random.default_rng(0)
  rows = []
  for i in range(n_good):
    name = f"clip {i} – café.mp4"
    write_video(os.path.join(folder, name), rng.integers(0, 255, (2 * WINDOW, SIZE, SIZE, 3), np.uint8), fps=8)
    rows.append((name, f"clip {i}: a red ball ✓"))
  write_video(os.path.join(folder, "short.mp4"), rng.integers(0, 255, (WINDOW - 2, SIZE, SIZE, 3), np.uint8), fps=8)
  with open(os.path.join(folder, "corrupt.mp4"), "wb") as f:
    f.write(b"\x00\x00\x00\x18ftypmp42" + rng.bytes(300))
  open(os.path.join(folder, "empty.mp4"), "wb").close()
  rows[2:2] = [("short.mp4", "too short"), ("corrupt.mp4", "corrupt"), ("empty.mp4", "empty"),
               ("gone.mp4", "missing")]
  lines = [b"path,caption"] + [f'"{p}","{c}"'.encode("utf-8") for p, c in rows]
  lines.insert(3, "clip 0 – café.mp4".encode("utf-8") + b',"caf\xe9 in latin-1"')  # not UTF-8
  captions = os.path.join(folder, "captions.csv")
  with open(captions, "wb") as f:
    f.write(b"\n".join(lines) + b"\n")
  return folder, captions


def run_prepare(folder: str, captions: str, out: str, delay: float = 0.0, build: bool = True):
  items = prep.read_captions(folder, captions)
  kw = dict(height=SIZE, width=SIZE, window=WINDOW, progress=False)
  if not build:
    return prep.encode_folder(items, out, prep.vae_chunk_encoder(FakeVAE(), seed=3), text_encoder(delay), **kw)
  return prep.prepare(items, out, prep.vae_chunk_encoder(FakeVAE(), seed=3), text_encoder(delay), **kw)


def encoded(out: str) -> dict[str, dict]:
  enc = os.path.join(out, "encoded")
  res = {}
  for name in sorted(os.listdir(enc)):
    if name.endswith(".npz") and not name.endswith(".tmp.npz"):
      with np.load(os.path.join(enc, name)) as z:
        res[name] = {k: z[k] for k in z.files if k != "path"}
  return res


def test_bad_rows_are_skipped_and_counted_by_reason(tmp_path):
  folder, captions = make_folder(str(tmp_path))
  out = str(tmp_path / "out")
  counts = run_prepare(folder, captions, out, build=False)
  assert counts == dict(encoded=4, skipped_existing=0, failed=5)
  report = json.load(open(os.path.join(out, prep.REPORT_NAME)))
  assert report["skipped"] == dict(missing=1, empty=1, caption_not_utf8=1, corrupt=1, too_short=1,
                                   encode_failed=0)
  assert report["rows"] == 9 and report["encoded"] == 4 and not report["interrupted"]
  by_reason = {r["reason"]: r for r in report["skipped_rows"]}
  assert by_reason["too_short"]["error"] == f"{WINDOW - 2} frames, fewer than {WINDOW}"
  assert by_reason["missing"]["path"].endswith("gone.mp4") and "UTF-8" in by_reason["caption_not_utf8"]["error"]
  assert len(open(os.path.join(out, "failures.jsonl")).readlines()) == 5
  got = encoded(out)
  assert [str(v["caption"]) for v in got.values()] == [f"clip {i}: a red ball ✓" for i in range(4)]
  # a rerun skips what is done and lists every bad row once (the report is rewritten, not appended to)
  assert run_prepare(folder, captions, out, build=False) == dict(encoded=0, skipped_existing=4, failed=5)
  assert len(open(os.path.join(out, "failures.jsonl")).readlines()) == 5
  assert json.load(open(os.path.join(out, prep.REPORT_NAME)))["skipped_total"] == 5


def test_latents_do_not_depend_on_what_else_the_process_encoded(tmp_path):
  """Row i's VAE noise comes from i: encoding row 5 alone gives the bytes it gets in a full run."""
  folder, captions = make_folder(str(tmp_path))
  full = str(tmp_path / "full")
  run_prepare(folder, captions, full, build=False)
  items = prep.read_captions(folder, captions)
  only = [(p, c) if i == 7 else (os.path.join(folder, "gone.mp4"), c) for i, (p, c) in enumerate(items)]
  part = str(tmp_path / "part")
  prep.encode_folder(only, part, prep.vae_chunk_encoder(FakeVAE(), seed=3), text_encoder(),
                     height=SIZE, width=SIZE, window=WINDOW, progress=False)
  np.testing.assert_array_equal(encoded(part)["000007.npz"]["latents"], encoded(full)["000007.npz"]["latents"])


SCRIPT = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import test_faults_data as t
counts, path, signum = t.run_prepare({folder!r}, {captions!r}, {out!r}, delay=0.4)
raise SystemExit(128 + signum if signum else 0)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_and_rerun_equals_one_run(tmp_path, sig):
  pytest.importorskip("tensorflow_datasets")
  folder, captions = make_folder(str(tmp_path))
  ref = str(tmp_path / "ref")
  _, ref_path, _ = run_prepare(folder, captions, ref)
  out = str(tmp_path / "out")
  script = SCRIPT.format(root=ROOT, tests=os.path.dirname(__file__), folder=folder, captions=captions, out=out)
  proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  enc = os.path.join(out, "encoded")
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None and not (
      os.path.isdir(enc) and any(n.endswith(".npz") and ".tmp" not in n for n in os.listdir(enc))):
    time.sleep(0.02)
  assert proc.poll() is None, proc.communicate()
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == (128 + sig if sig == signal.SIGTERM else -sig), err[-2000:]
  assert 0 < len(encoded(out)) < 4  # stopped midway
  if sig == signal.SIGTERM:
    assert json.load(open(os.path.join(out, prep.REPORT_NAME)))["interrupted"]
  counts, path, _ = run_prepare(folder, captions, out)
  assert counts["skipped_existing"] + counts["encoded"] == 4
  a, b = encoded(ref), encoded(out)
  assert sorted(a) == sorted(b) == ["000000.npz", "000001.npz", "000007.npz", "000008.npz"]
  for name in a:
    for k in a[name]:
      np.testing.assert_array_equal(a[name][k], b[name][k], err_msg=f"{name} {k}")
  src_a, src_b = prep.open_source(os.path.dirname(os.path.dirname(ref_path))), \
      prep.open_source(os.path.dirname(os.path.dirname(path)))
  assert len(src_a) == len(src_b) == 4  # no duplicates, no gaps
  for i in range(4):
    for k in ("latents", "prompt_embeds"):
      np.testing.assert_array_equal(src_a[i][k], src_b[i][k])
