"""Disk full (issue #24 item 2) during a checkpoint, a metrics write, a tfds shard and an mp4 write: one clear error
naming the path and the free space, the previous checkpoint intact and loadable, no half-written file left.

Two kinds of test: a simulated ENOSPC (always run), and a real small tmpfs, mounted in a private mount namespace
(``unshare --user --map-root-user --mount``, no root needed where unprivileged user namespaces are enabled; skipped,
saying so, where they are not).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from helios_jax.errors import DiskFullError
from helios_jax.training import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_faults_kill as kill  # noqa: E402  (train.py runner)


def _tmpfs_available(probe_dir) -> str | None:
  """None when a tmpfs can be mounted in a private namespace here, else why not."""
  if shutil.which("unshare") is None:
    return "no unshare command"
  os.makedirs(probe_dir, exist_ok=True)
  r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                      f"mount -t tmpfs -o size=64k tmpfs '{probe_dir}'"], capture_output=True, text=True)
  return None if r.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {r.stderr.strip()}"


def on_tmpfs(tmp_path, size: str, body: str) -> subprocess.CompletedProcess:
  """Runs the Python ``body`` with a fresh ``size`` tmpfs mounted at the variable ``FULL`` (a folder)."""
  full = tmp_path / "tmpfs"
  why = _tmpfs_available(str(tmp_path / "probe"))
  if why:
    pytest.skip(f"real tmpfs test skipped ({why}); the simulated ENOSPC tests still run")
  full.mkdir()
  script = tmp_path / "body.py"
  script.write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\nFULL = {str(full)!r}\n" + textwrap.dedent(body))
  return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                         f"mount -t tmpfs -o size={size} tmpfs '{full}' && exec '{sys.executable}' '{script}'"],
                        capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints

def test_checkpoint_disk_full_in_a_run_keeps_the_previous_one(tmp_path):
  """train.py with ENOSPC inside the save of step 4: one error line naming the folder and the free space, exit 1,
  checkpoint 2 intact; the same command then resumes from 2 and finishes with the uninterrupted losses."""
  total = 6
  reference = kill._reference("base", tmp_path, total)
  args = kill._args("base", tmp_path, total)
  workdir = tmp_path / "full"
  out = kill._train(args, workdir, "enospc_during_save:4:2")
  assert out.returncode == 1, out.stderr[-3000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert f"disk full while writing checkpoint 4 to {workdir / 'checkpoints'}: " in errors[0]
  assert " free there" in errors[0]
  assert kill._complete_steps(workdir) == [2]
  assert os.listdir(workdir / "checkpoints") == ["2"]  # the partial save was removed
  before = len(kill._rows(workdir))
  out = kill._train(args, workdir)
  assert out.returncode == 0 and "steps 2 -> 6" in out.stdout, out.stderr[-3000:]
  kill._assert_rows_equal(kill._rows(workdir)[before:], reference, 3)


def test_checkpoint_disk_full_on_a_real_tmpfs(tmp_path):
  out = on_tmpfs(tmp_path, "1m", """
      import os
      import jax.numpy as jnp, numpy as np
      from helios_jax.errors import DiskFullError
      from helios_jax.training.checkpointing import Checkpointer
      ckpt = Checkpointer(FULL, keep=2)
      small = dict(step=jnp.int32(1), w=jnp.arange(1000, dtype=jnp.float32))
      ckpt.save(small, dict(seed=0))
      big = dict(step=jnp.int32(2), w=jnp.asarray(np.random.default_rng(0).normal(size=(600_000,)), jnp.float32))
      try:
        ckpt.save(big, dict(seed=0))
      except DiskFullError as e:
        print("ERROR:", e)
      else:
        raise SystemExit("no error")
      print("LEFT:", sorted(os.listdir(os.path.join(FULL, "checkpoints"))))
      state, meta = Checkpointer(FULL, keep=2).restore(small)
      assert int(state["step"]) == 1 and np.array_equal(np.asarray(state["w"]), np.arange(1000)), state
      print("RESTORED", meta)
      """)
  assert out.returncode == 0, out.stdout + out.stderr[-3000:]
  err = next(line for line in out.stdout.splitlines() if line.startswith("ERROR:"))
  assert "disk full while writing checkpoint 2 to " in err and "checkpoints:" in err and " free there" in err
  assert "LEFT: ['1']" in out.stdout and "RESTORED" in out.stdout


# ------------------------------------------------------------------------------------------------------------------
# Metrics

def test_metrics_disk_full_simulated_leaves_whole_rows(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
  w.write(1, {"loss": 1.0})
  real = w._file.write

  def half_then_enospc(data):  # the first call writes part of the row, the next fails: a torn row on disk
    if not hasattr(half_then_enospc, "done"):
      half_then_enospc.done = True
      return real(bytes(data)[:7])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  w._file = _Wrap(w._file, half_then_enospc)
  with pytest.raises(DiskFullError, match=f"disk full while writing metrics to {tmp_path / 'metrics.jsonl'}: "
                                          ".* free there"):
    w.write(2, {"loss": 2.0})
  w.close()
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1]


class _Wrap:
  def __init__(self, f, write):
    self._f, self.write = f, write

  def __getattr__(self, name):
    return getattr(self._f, name)


def test_metrics_row_torn_by_a_kill_is_cut_on_reopen(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1]  # a reader ignores the torn row
  w = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
  w.write(2, {"loss": 2.0})
  w.close()
  assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


def test_metrics_disk_full_on_a_real_tmpfs(tmp_path):
  out = on_tmpfs(tmp_path, "64k", """
      import os
      from helios_jax.errors import DiskFullError
      from helios_jax.training.metrics import MetricsWriter
      w = MetricsWriter(FULL, tensorboard=False)
      w.write(1, {"loss": 1.0})
      try:
        with open(os.path.join(FULL, "filler"), "wb") as f:
          while True:
            f.write(b"x" * 4096)
            f.flush()
      except OSError:
        pass
      try:
        for step in range(2, 10000):
          w.write(step, {"loss": float(step)})
      except DiskFullError as e:
        print("ERROR:", e)
      w.close()
      data = open(os.path.join(FULL, "metrics.jsonl")).read()
      assert data.endswith("\\n"), repr(data[-50:])
      print("ROWS:", len(data.splitlines()))
      """)
  assert out.returncode == 0, out.stdout + out.stderr[-3000:]
  assert "ERROR: disk full while writing metrics to " in out.stdout and " free there" in out.stdout
  assert "ROWS:" in out.stdout


# ------------------------------------------------------------------------------------------------------------------
# tfds preparation shards

def _encoded_folder(tmp_path, n=3, size=(4, 4, 9, 16, 16)):
  enc = tmp_path / "prep" / "encoded"
  enc.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in range(n):
    np.savez(enc / f"{i:06d}.npz", latents=rng.normal(size=size).astype(np.float32),
             prompt_embeds=rng.normal(size=(8, 16)).astype(np.float16), caption=np.array(f"c{i}"),
             path=np.array(f"v{i}.mp4"))
  return str(tmp_path / "prep")


def test_tfds_shard_disk_full_simulated(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  from helios_jax.training import prepare_data as prep
  prep_dir = _encoded_folder(tmp_path)

  def full(self, *a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "shard")
  monkeypatch.setattr(tfds.core.GeneratorBasedBuilder, "download_and_prepare", full)
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(DiskFullError, match=f"disk full while writing the tfds dataset shards to {data_dir}: "):
    prep.build_dataset(prep_dir, data_dir)


def test_tfds_shard_disk_full_on_a_real_tmpfs(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  prep_dir = _encoded_folder(tmp_path)  # 3 x 147 KiB of latents, to a 128 KiB tmpfs
  out = on_tmpfs(tmp_path, "128k", f"""
      from helios_jax.errors import DiskFullError
      from helios_jax.training import prepare_data as prep
      try:
        prep.build_dataset({prep_dir!r}, FULL)
      except DiskFullError as e:
        print("ERROR:", e)
      """)
  assert out.returncode == 0, out.stdout + out.stderr[-3000:]
  assert "ERROR: disk full while writing the tfds dataset shards to " in out.stdout, out.stdout + out.stderr[-2000:]
  assert " free there" in out.stdout


# ------------------------------------------------------------------------------------------------------------------
# mp4 (helios_jax.io.media, another engineer's module: tested, not changed here)

MP4_BODY = """
    import os
    import numpy as np
    from helios_jax.io.media import write_video
    frames = np.random.default_rng(0).integers(0, 255, (24, 128, 128, 3), np.uint8)  # noise: tens of KiB a frame
    target = os.path.join(FULL, "out.mp4")
    try:
      write_video(target, frames, fps=8)
    except Exception as e:
      print("ERROR:", type(e).__name__, e)
    print("LEFT:", sorted(os.listdir(FULL)), [os.path.getsize(os.path.join(FULL, n)) for n in os.listdir(FULL)])
    """


def test_mp4_disk_full_leaves_no_half_file(tmp_path):
  out = on_tmpfs(tmp_path, "128k", MP4_BODY)
  assert out.returncode == 0, out.stdout + out.stderr[-3000:]
  assert "ERROR:" in out.stdout and "out.mp4" in out.stdout, out.stdout
  assert "LEFT: [] []" in out.stdout  # neither the target nor the temporary file


@pytest.mark.xfail(strict=True, reason="media.py names the path but not the free space and raises InputError; "
                                       "fix proposed in the report of issue #24 (docs/reliability.md)")
def test_mp4_disk_full_names_the_free_space(tmp_path):
  out = on_tmpfs(tmp_path, "128k", MP4_BODY)
  assert "ERROR: DiskFullError disk full while writing video" in out.stdout and " free there" in out.stdout
