"""Model folders are untrusted input (issue #24 item 4): pickle-only weights refused unread, index entries leading
outside the folder refused, absurd config sizes refused before any allocation, truncated safetensors and non-JSON
configs one clear error."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from helios_jax.errors import CheckpointError
from helios_jax.io import checkpoint
from helios_jax.io.checkpoint import SafetensorsFolder, load_config, save_safetensors_folder

TINY_TRANSFORMER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helios_jax", "assets",
                                "demo", "model", "transformer")


class _Exploit:
  """Unpickling this writes a marker file: proof that a loader ran the pickle's code."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.bin", "model.pt", "weights.ckpt"])
def test_pickle_only_folder_is_refused_without_unpickling(tmp_path, name):
  folder = tmp_path / "transformer"
  folder.mkdir()
  marker = tmp_path / "unpickled"
  (folder / name).write_bytes(pickle.dumps(_Exploit(str(marker))))
  (folder / "config.json").write_text("{}")
  with pytest.raises(CheckpointError, match=r"pickle weights .*convert them to .*safetensors") as e:
    SafetensorsFolder(str(folder))
  assert name in str(e.value)
  assert not marker.exists()


def _sharded(tmp_path, weight_map_file):
  folder = tmp_path / "m"
  save_safetensors_folder(str(folder), {"a": np.ones(4, np.float32)}, {"num_layers": 2}, max_shard_bytes=1)
  index = folder / "diffusion_pytorch_model.safetensors.index.json"
  data = json.loads(index.read_text())
  data["weight_map"]["a"] = weight_map_file
  index.write_text(json.dumps(data))
  return folder


@pytest.mark.parametrize("entry", ["../outside.safetensors", "sub/../../outside.safetensors",
                                   "/etc/passwd"])
def test_index_pointing_outside_the_folder_is_refused(tmp_path, entry):
  save_safetensors_folder(str(tmp_path), {"a": np.ones(4, np.float32)}, None, weights_name="outside")
  folder = _sharded(tmp_path, entry)
  with pytest.raises(CheckpointError, match="outside the folder"):
    SafetensorsFolder(str(folder))


def test_symlink_out_of_the_folder_is_refused(tmp_path):
  outside = tmp_path / "elsewhere"
  save_safetensors_folder(str(outside), {"a": np.ones(4, np.float32)}, None)
  folder = tmp_path / "m"
  folder.mkdir()
  os.symlink(outside / "diffusion_pytorch_model.safetensors", folder / "diffusion_pytorch_model.safetensors")
  with pytest.raises(CheckpointError, match="link to .* outside the folder"):
    SafetensorsFolder(str(folder))
  sharded = _sharded(tmp_path / "s", "evil.safetensors")
  os.symlink(outside / "diffusion_pytorch_model.safetensors", sharded / "evil.safetensors")
  with pytest.raises(CheckpointError, match="outside the folder"):
    SafetensorsFolder(str(sharded))


def test_hugging_face_cache_symlinks_into_blobs_are_allowed(tmp_path):
  """snapshot_download's layout: snapshots/<rev>/transformer/<file> -> ../../../blobs/<sha>."""
  repo = tmp_path / "models--org--Helios"
  save_safetensors_folder(str(repo / "staging"), {"a": np.arange(4, dtype=np.float32)}, None)
  (repo / "blobs").mkdir()
  os.replace(repo / "staging" / "diffusion_pytorch_model.safetensors", repo / "blobs" / "0123abcd")
  folder = repo / "snapshots" / "rev1" / "transformer"
  folder.mkdir(parents=True)
  os.symlink("../../../blobs/0123abcd", folder / "diffusion_pytorch_model.safetensors")
  with SafetensorsFolder(str(folder)) as w:
    np.testing.assert_array_equal(w.get("a"), np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("field,value,match", [
    ("num_layers", 10 ** 9, r"num_layers=1000000000 is out of range"),
    ("attention_head_dim", -4, r"attention_head_dim=-4 is out of range"),
    ("num_attention_heads", 0, r"num_attention_heads=0 is out of range"),
    ("ffn_dim", "big", r"ffn_dim must be an integer"),
    ("patch_size", [1, -2, 2], r"patch_size=-2 is out of range"),
])
def test_absurd_config_sizes_are_refused_before_building(tmp_path, monkeypatch, field, value, match):
  config = json.loads(open(os.path.join(TINY_TRANSFORMER, "config.json")).read())
  config[field] = value
  folder = tmp_path / "transformer"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=match):
    load_config(str(folder))
  # the model loader stops there too, before it builds (allocates) anything
  from helios_jax.io import transformer_weights
  from helios_jax.models import transformer
  built = []
  monkeypatch.setattr(transformer.HeliosTransformer3DModel, "__init__",
                      lambda *a, **k: built.append(1) or (_ for _ in ()).throw(AssertionError("built")))
  with pytest.raises(CheckpointError, match=match):
    transformer.HeliosTransformer3DModel.from_pretrained(str(folder))
  assert not built
  del transformer_weights


def test_width_times_depth_bound(tmp_path):
  folder = tmp_path / "c"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({"num_layers": 9000, "num_attention_heads": 4000,
                                                  "attention_head_dim": 1000}))
  with pytest.raises(CheckpointError, match="parameters; this config is not a Helios model"):
    load_config(str(folder))


def test_bundled_configs_pass_the_size_checks():
  model = os.path.dirname(TINY_TRANSFORMER)
  for name in ("transformer", "vae", "text_encoder"):
    assert load_config(os.path.join(model, name))


def test_truncated_safetensors_is_one_clear_error(tmp_path):
  folder = tmp_path / "m"
  save_safetensors_folder(str(folder), {"a": np.ones((64, 64), np.float32)}, {"num_layers": 2})
  path = folder / "diffusion_pytorch_model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match=r"is truncated: \d+ bytes, its header describes \d+"):
    SafetensorsFolder(str(folder))
  path.write_bytes(data[:5])  # not even the header length
  with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
    SafetensorsFolder(str(folder))
  path.write_bytes(b"")
  with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
    SafetensorsFolder(str(folder))


@pytest.mark.parametrize("text", ["{not json", "\xff\xfe\x00binary", "[1, 2, 3]", ""])
def test_non_json_config_is_one_clear_error(tmp_path, text):
  folder = tmp_path / "transformer"
  folder.mkdir()
  (folder / "config.json").write_bytes(text.encode("latin-1"))
  with pytest.raises(CheckpointError, match=r"config.json .*(is not valid JSON|is not a JSON object)"):
    load_config(str(folder))


def test_model_folder_inspection_checks_sizes(tmp_path):
  import shutil
  from helios_jax.io.model_folder import inspect_model_folder
  model = tmp_path / "model"
  shutil.copytree(os.path.dirname(TINY_TRANSFORMER), model, ignore=shutil.ignore_patterns("*.safetensors"))
  cfg = json.loads((model / "transformer" / "config.json").read_text())
  cfg["patch_size"] = [1, 0, 2]
  (model / "transformer" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="patch_size=0 is out of range"):
    inspect_model_folder(str(model))


def test_module_constants_documented():
  assert ".bin" in checkpoint.PICKLE_SUFFIXES and ".pt" in checkpoint.PICKLE_SUFFIXES
