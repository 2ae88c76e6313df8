"""save_pretrained of the transformer, VAE, UMT5 encoder, schedulers and the pipeline-folder writer: our own round
trip (save -> from_pretrained bit-exact, fp32 and bf16), single file vs shards + index, and the tensor names
against the reference fixtures written by diffusers / transformers (tests/reference/fixtures)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helios_jax.errors import InputError
from helios_jax.io.checkpoint import SafetensorsFolder, parse_shard_size
from helios_jax.io.pipeline_writer import save_pipeline_folder
from helios_jax.models.transformer import HeliosTransformer3DModel
from helios_jax.models.umt5 import UMT5EncoderModel
from helios_jax.models.vae import AutoencoderKLWan
from helios_jax.schedulers import HeliosDMDScheduler, HeliosScheduler, scheduler_from_pretrained

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference", "fixtures")
TRANSFORMER = os.path.join(FIX, "transformer", "models", "base")
VAE = os.path.join(FIX, "vae_tiny")
UMT5 = os.path.join(FIX, "umt5_tiny")


def _leaves(model) -> list[np.ndarray]:
  return [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(nnx.state(model))]


def _assert_same_params(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))  # bit-exact


def _keys(folder: str, stem: str) -> set[str]:
  with SafetensorsFolder(folder, stem) as f:
    return set(f.keys())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_transformer_round_trip_and_reference_keys(tmp_path, dtype):
  model = HeliosTransformer3DModel.from_pretrained(TRANSFORMER, dtype=dtype)
  files = model.save_pretrained(str(tmp_path / "t"))
  assert files == ["diffusion_pytorch_model.safetensors"]  # the tiny model fits one 10GB shard
  assert not os.path.exists(tmp_path / "t" / "diffusion_pytorch_model.safetensors.index.json")
  _assert_same_params(model, HeliosTransformer3DModel.from_pretrained(str(tmp_path / "t"), dtype=dtype))
  assert _keys(str(tmp_path / "t"), "diffusion_pytorch_model") == _keys(TRANSFORMER, "diffusion_pytorch_model")
  saved = json.loads((tmp_path / "t" / "config.json").read_text())
  reference = json.loads(open(os.path.join(TRANSFORMER, "config.json"), encoding="utf-8").read())
  assert saved["_class_name"] == "HeliosTransformer3DModel"
  assert {k: v for k, v in saved.items() if not k.startswith("_")} == {
      k: v for k, v in reference.items() if not k.startswith("_") and k in saved}


def test_transformer_shards_with_an_index_and_overwrites_an_earlier_save(tmp_path):
  model = HeliosTransformer3DModel.from_pretrained(TRANSFORMER)
  folder = str(tmp_path / "t")
  biggest = max(x.nbytes for x in _leaves(model))
  files = model.save_pretrained(folder, max_shard_size=biggest)
  assert len(files) > 1 and files[0] == f"diffusion_pytorch_model-00001-of-{len(files):05d}.safetensors"
  index = json.loads(open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")).read())
  assert sorted(set(index["weight_map"].values())) == files
  assert index["metadata"]["total_size"] == sum(x.nbytes for x in _leaves(model))
  _assert_same_params(model, HeliosTransformer3DModel.from_pretrained(folder))
  model.save_pretrained(folder)  # one file again: the old shards and index must go
  assert sorted(os.listdir(folder)) == ["config.json", "diffusion_pytorch_model.safetensors"]
  _assert_same_params(model, HeliosTransformer3DModel.from_pretrained(folder))


def test_fp8_transformer_refuses_to_save(tmp_path):
  model = HeliosTransformer3DModel.from_pretrained(TRANSFORMER, quantization="fp8")
  with pytest.raises(InputError, match="FP8-quantised"):
    model.save_pretrained(str(tmp_path / "t"))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_vae_round_trip_and_reference_keys(tmp_path, dtype):
  vae = AutoencoderKLWan.from_pretrained(VAE, dtype=dtype)
  vae.save_pretrained(str(tmp_path / "v"))
  _assert_same_params(vae, AutoencoderKLWan.from_pretrained(str(tmp_path / "v"), dtype=dtype))
  assert _keys(str(tmp_path / "v"), "diffusion_pytorch_model") == _keys(VAE, "diffusion_pytorch_model")
  cfg = json.loads((tmp_path / "v" / "config.json").read_text())
  assert cfg["_class_name"] == "AutoencoderKLWan" and cfg["z_dim"] == vae.config.z_dim


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_umt5_round_trip_sharded_and_reference_keys(tmp_path, dtype):
  enc = UMT5EncoderModel.from_pretrained(UMT5, dtype=dtype)
  files = enc.save_pretrained(str(tmp_path / "e"), max_shard_size="2KB")
  assert len(files) > 1 and os.path.isfile(tmp_path / "e" / "model.safetensors.index.json")
  _assert_same_params(enc, UMT5EncoderModel.from_pretrained(str(tmp_path / "e"), dtype=dtype))
  ref = _keys(UMT5, "model")
  ours = _keys(str(tmp_path / "e"), "model")
  assert ours <= ref and ref - ours <= {"encoder.embed_tokens.weight"}  # the tied copy of shared.weight
  cfg = json.loads((tmp_path / "e" / "config.json").read_text())
  assert cfg["model_type"] == "umt5" and cfg["architectures"] == ["UMT5EncoderModel"]


def test_schedulers_and_pipeline_folder(tmp_path):
  unipc = HeliosScheduler.from_config({"use_dynamic_shifting": True, "base_shift": 0.5})
  dmd = HeliosDMDScheduler.from_config({"use_dynamic_shifting": True})
  for sched in (unipc, dmd):
    folder = str(tmp_path / type(sched).__name__)
    sched.save_pretrained(folder)
    back = scheduler_from_pretrained(folder)
    assert type(back) is type(sched)
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}
    assert strip(back.config.to_dict()) == strip(sched.config.to_dict())
    assert back.config.get("_class_name") == type(sched).__name__
  model = HeliosTransformer3DModel.from_pretrained(TRANSFORMER)
  vae = AutoencoderKLWan.from_pretrained(VAE)
  path = save_pipeline_folder(str(tmp_path / "pipe"), "HeliosPipeline",
                              {"transformer": model, "vae": vae, "scheduler": unipc, "text_encoder": None},
                              extra={"is_distilled": False})
  index = json.loads(open(path).read())
  assert index["_class_name"] == "HeliosPipeline" and index["is_distilled"] is False
  assert index["transformer"] == ["diffusers", "HeliosTransformer3DModel"]
  assert index["vae"] == ["diffusers", "AutoencoderKLWan"] and index["text_encoder"] == [None, None]
  assert index["scheduler"] == ["diffusers", "HeliosScheduler"]
  _assert_same_params(model, HeliosTransformer3DModel.from_pretrained(str(tmp_path / "pipe")))
  with pytest.raises(InputError, match="has no save_pretrained"):
    save_pipeline_folder(str(tmp_path / "bad"), "HeliosPipeline", {"vae": object()})


def test_shard_sizes():
  assert parse_shard_size("10GB") == 10 ** 10 and parse_shard_size("2GiB") == 2 ** 31
  assert parse_shard_size(" 500 mb ") == 5 * 10 ** 8 and parse_shard_size(123) == 123
  for bad in (0, -1, "GB", "ten GB", True, 1.5, "0MB"):
    with pytest.raises(InputError):
      parse_shard_size(bad)
