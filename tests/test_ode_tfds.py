"""ODE pairs stored as a tfds dataset (``ode.pairs_format='tfds'``): the same records, batches and loss as the npz
folder; conversion of an npz folder; errors when tfds is missing or the pairs disagree."""

from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from configs import ode as ode_config  # noqa: E402

from helios_jax.errors import InputError  # noqa: E402
from helios_jax.training import ahd, ode  # noqa: E402

pytest.importorskip("tensorflow_datasets")


def _tiny():
  c = ode_config.get_config("tiny")
  c.ode.num_prompts = 3
  return c


def _fake_record(c, seed: int) -> dict:
  """A pair record with the keys and shapes ``generate_pairs`` writes for ``c`` (random values, no teacher)."""
  rng = np.random.default_rng(seed)
  d, o = c.data, c.ode
  n_stages = int(c.objective.pyramid_stages)
  rec = {"prompt_embeds": rng.normal(size=(int(d.text_len), int(d.text_dim))).astype(np.float32)}
  for k in range(int(o.num_sections)):
    sched = ahd.rollout_schedule(tuple(c.dmd.rollout_steps), (int(d.height), int(d.width)), 9, amplify=k == 0,
                                 gamma=float(c.objective.pyramid_gamma))
    for i in range(n_stages):
      f = 2 ** (n_stages - 1 - i)
      n = len(sched.timesteps[i])
      shape = (n + 1, int(d.channels), 9, int(d.height) // f, int(d.width) // f)
      rec[f"s{k}_p{i}_latents"] = rng.normal(size=shape).astype(np.float32)
      rec[f"s{k}_p{i}_timesteps"] = np.asarray(sched.timesteps[i], np.float32)
      rec[f"s{k}_p{i}_sigmas"] = np.asarray(sched.step_sigma[i], np.float32)
  return rec


def _write_folder(c, folder: str) -> list[dict]:
  recs = [_fake_record(c, s) for s in range(int(c.ode.num_prompts))]
  for i, r in enumerate(recs):
    ode.write_pairs(folder, i, r)
  return recs


def test_convert_round_trip_and_identical_batches(tmp_path):
  c = _tiny()
  folder = str(tmp_path / "pairs")
  recs = _write_folder(c, folder)
  path = ode.convert_pairs(folder)
  assert path.startswith(os.path.join(folder, "tfds", ode.DATASET_NAME))
  ds = ode.open_pairs(os.path.join(folder, "tfds"))
  assert len(ds) == len(recs)
  shapes = {k: v.shape for k, v in recs[0].items()}
  assert len({shapes["s0_p0_latents"], shapes["s1_p0_latents"], shapes["s1_p2_latents"]}) == 3  # ragged keys
  for r, got in zip(recs, (ds[i] for i in range(len(ds)))):  # same order as the files, bit-exact
    assert set(got) == set(r)
    for k in r:
      assert got[k].dtype == np.float32 and got[k].shape == r[k].shape
      np.testing.assert_array_equal(got[k], r[k])
  files = ode.list_pairs(folder)
  seen = set()
  for step in range(6):
    a, b = ode.ode_batch(files, step, c), ode.ode_batch(ds, step, c)
    assert set(a) == set(b)
    for k in a:
      assert a[k].dtype == b[k].dtype
      np.testing.assert_array_equal(a[k], b[k])
    seen.add(float(a["prompt_embeds"][0, 0, 0]))
  assert len(seen) > 1  # the steps visit several prompts, so the order of the records matters

  # re-conversion replaces the dataset (a folder that grew)
  ode.write_pairs(folder, 3, _fake_record(c, 99))
  ode.convert_pairs(folder)
  ds4 = ode.open_pairs(os.path.join(folder, "tfds"))
  assert len(ds4) == 4
  np.testing.assert_array_equal(ds4[3]["s2_p1_latents"], _fake_record(c, 99)["s2_p1_latents"])


def test_identical_loss_from_npz_and_tfds(tmp_path):
  from flax import nnx
  from helios_jax.training import stages
  c = _tiny()
  c.ode.num_prompts = 1
  folder = str(tmp_path / "pairs")
  _write_folder(c, folder)
  ode.convert_pairs(folder, str(tmp_path / "elsewhere"))
  ds = ode.open_pairs(str(tmp_path / "elsewhere"))
  model = stages.build_model(c.model)
  fwd = nnx.merge(*nnx.split(model)).forward
  to_jnp = lambda b: {k: jnp.asarray(v) for k, v in b.items()}
  l_npz = float(ode.ode_loss(fwd, to_jnp(ode.ode_batch(ode.list_pairs(folder), 2, c)), c))
  l_tfds = float(ode.ode_loss(fwd, to_jnp(ode.ode_batch(ds, 2, c)), c))
  assert np.isfinite(l_npz) and l_npz > 0
  assert l_npz == l_tfds


def test_ensure_pairs_tfds_packs_then_reuses(tmp_path):
  c = _tiny()
  c.ode.data_dir = str(tmp_path / "pairs")
  c.ode.pairs_format = "tfds"
  recs = _write_folder(c, c.ode.data_dir)
  # enough npz pairs: nothing generated (no model needed), the folder is packed and read back from tfds
  ds = ode.ensure_pairs(c, None, None, None)
  assert not isinstance(ds[0], str) and len(ds) == 3
  np.testing.assert_array_equal(ds[1]["prompt_embeds"], recs[1]["prompt_embeds"])
  # a packed dataset is used as it is, without the npz files
  for f in ode.list_pairs(c.ode.data_dir):
    os.remove(f)
  ds = ode.ensure_pairs(c, None, None, None)
  assert len(ds) == 3
  np.testing.assert_array_equal(ds[2]["s1_p1_sigmas"], recs[2]["s1_p1_sigmas"])
  # npz (default) still returns the file list
  c.ode.pairs_format = "npz"
  _write_folder(c, c.ode.data_dir)
  assert ode.ensure_pairs(c, None, None, None) == ode.list_pairs(c.ode.data_dir)
  c.ode.pairs_format = "parquet"
  with pytest.raises(InputError, match="pairs_format"):
    ode.ensure_pairs(c, None, None, None)


def test_tfds_missing_is_an_input_error(tmp_path, monkeypatch):
  c = _tiny()
  c.ode.data_dir = str(tmp_path / "pairs")
  c.ode.pairs_format = "tfds"
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
  with pytest.raises(InputError, match="tensorflow-datasets"):
    ode.ensure_pairs(c, None, None, None)
  assert not os.path.exists(c.ode.data_dir)  # failed before generating anything
  _write_folder(c, c.ode.data_dir)
  with pytest.raises(InputError, match="--convert"):
    ode.convert_pairs(c.ode.data_dir)


def test_convert_rejects_mixed_pairs_and_empty_folder(tmp_path):
  c = _tiny()
  folder = str(tmp_path / "pairs")
  with pytest.raises(InputError, match="no pair"):
    ode.convert_pairs(str(tmp_path / "empty"))
  _write_folder(c, folder)
  other = _fake_record(c, 7)
  other["s0_p0_latents"] = other["s0_p0_latents"][:2]  # another config's step count
  ode.write_pairs(folder, 5, other)
  with pytest.raises(InputError, match="does not match"):
    ode.convert_pairs(folder)


def test_list_pairs_skips_interrupted_writes(tmp_path):
  c = _tiny()
  c.ode.num_prompts = 1
  folder = str(tmp_path / "pairs")
  _write_folder(c, folder)
  np.savez(os.path.join(folder, "pair_00001.npz.tmp.npz"), x=np.zeros(1))  # what a killed write_pairs leaves
  assert [os.path.basename(p) for p in ode.list_pairs(folder)] == ["pair_00000.npz"]


@pytest.mark.slow
def test_tiny_ode_training_same_losses_from_tfds_and_npz(tmp_path):
  from helios_jax.training import dispatch
  runs = {}
  for fmt in ("tfds", "npz"):  # tfds first: generates the npz pairs, packs them and trains from the dataset
    c = ode_config.get_config("tiny")
    c.ode.data_dir = str(tmp_path / "pairs")
    c.ode.num_prompts = 1
    c.ode.pairs_format = fmt
    c.total_steps = 3
    c.checkpoint.every = 3
    runs[fmt] = dispatch.train(c, str(tmp_path / f"run_{fmt}"), progress=False)
  assert os.path.isdir(tmp_path / "pairs" / "tfds" / ode.DATASET_NAME)
  assert runs["tfds"]["num_pairs"] == runs["npz"]["num_pairs"] == 1
  assert all(np.isfinite(runs["tfds"]["losses"])) and len(runs["tfds"]["losses"]) == 3
  np.testing.assert_array_equal(runs["tfds"]["losses"], runs["npz"]["losses"])
