"""Parity of helios_jax.HeliosTransformer3DModel with diffusers 0.42.1 (fixtures made by
tests/reference/make_transformer_fixtures.py), loading, and input checking.

Tolerance: fp32 relative error ||out - ref|| / ||ref|| <= 1e-5 (target) and never above 1e-4. Both sides compute in
float32 with different summation orders (XLA vs ATen matmuls, fused vs unfused softmax); through 2 blocks of width 64
that leaves ~1e-7..1e-6 relative, so 1e-5 catches any real formula difference (a wrong sign, order or dtype is >1e-3).
"""

from __future__ import annotations

import json
import os
import shutil

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import helios_jax
from helios_jax import CheckpointError, HeliosTransformer3DModel, HeliosTransformerConfig, InputError
from helios_jax.io.transformer_weights import to_diffusers_state_dict
from helios_jax.models.transformer import _check_inputs

FIX = os.path.join(os.path.dirname(__file__), "reference", "fixtures", "transformer")
MANIFEST = json.load(open(os.path.join(FIX, "manifest.json")))["cases"]
FP32_TOL = 1e-5

_models = {}


def model(variant: str, dtype=jnp.float32):
  key = (variant, jnp.dtype(dtype).name)
  if key not in _models:
    _models[key] = HeliosTransformer3DModel.from_pretrained(os.path.join(FIX, "models", variant), dtype=dtype)
  return _models[key]


def load_case(name):
  data = dict(np.load(os.path.join(FIX, "cases", f"{name}.npz")))
  outs = {k: data.pop(k) for k in ("out", "out_bf16") if k in data}
  return data, outs


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


FP32_CASES = sorted(n for n, v in MANIFEST.items() if v != "base_bf16")


@pytest.mark.parametrize("case", FP32_CASES)
def test_fp32_parity(case, record_property):
  inputs, outs = load_case(case)
  out = model(MANIFEST[case])(**inputs)
  chex.assert_shape(out, outs["out"].shape)
  assert np.isfinite(np.asarray(out)).all()
  err = rel_err(out, outs["out"])
  record_property("rel_err", err)
  print(f"{case}: rel_err={err:.3e}")
  assert err <= FP32_TOL, f"{case}: relative error {err:.3e} > {FP32_TOL}"


def test_parity_fails_on_a_wrong_weight():
  """The parity check can fail: perturbing one block's scale_shift_table moves the output well past tolerance."""
  inputs, outs = load_case("full_history")
  g, s = nnx.split(model("base"))
  s = jax.tree.map(lambda x: x, s)  # a copy: the cached model stays intact
  s["blocks"]["scale_shift_table"][...] = s["blocks"]["scale_shift_table"][...] + 1e-2
  err = rel_err(nnx.merge(g, s)(**inputs), outs["out"])
  assert err > 100 * FP32_TOL


def test_bf16_load_keeps_fp32_islands_and_matches_reference():
  m = model("base_bf16", jnp.bfloat16)
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(m, nnx.Param))[0]
  dtypes = {jax.tree_util.keystr(p): v.dtype for p, v in flat}
  fp32 = {k for k, d in dtypes.items() if d == jnp.float32}
  expect_fp32 = ("time_embedder", "scale_shift_table", "norm2")
  assert fp32 == {k for k in dtypes if any(s in k for s in expect_fp32)}
  assert all(d == jnp.bfloat16 for k, d in dtypes.items() if k not in fp32)
  inputs, outs = load_case("bf16_full_history")
  out = m(**inputs)
  assert out.dtype == jnp.bfloat16
  # bf16 vs torch bf16: different rounding points (fused XLA ops vs ATen) -> a few bf16 ulps through 2 blocks.
  err_bf16 = rel_err(out, outs["out_bf16"])
  err_fp32 = rel_err(out, outs["out"])
  print(f"bf16: rel_err vs torch bf16 {err_bf16:.3e}, vs fp32 reference {err_fp32:.3e}")
  assert err_bf16 < 2e-2 and err_fp32 < 3e-2


def test_fp32_model_from_bf16_checkpoint():
  """A bf16-stored checkpoint loads in fp32 (upcast) and matches the fp32 run of the same (rounded) weights."""
  inputs, outs = load_case("bf16_full_history")
  out = model("base_bf16", jnp.float32)(**inputs)
  assert out.dtype == jnp.float32
  assert rel_err(out, outs["out"]) < 3e-2  # weights differ by bf16 rounding only


def test_14b_config_parameter_count_abstract():
  cfg = HeliosTransformerConfig()
  abstract = HeliosTransformer3DModel.abstract(cfg)
  leaves = jax.tree.leaves(abstract)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves if hasattr(x, "shape"))
  assert abstract.num_parameters() == 14_312_427_584
  amp = HeliosTransformer3DModel.abstract(HeliosTransformerConfig(is_amplify_history=True))
  assert amp.num_parameters() == 14_312_427_584 + 40 * 40


def test_round_trip_to_diffusers_state_dict(tmp_path):
  m = model("base")
  sd = to_diffusers_state_dict(m)
  ref = {}
  folder = os.path.join(FIX, "models", "base")
  idx = json.load(open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")))["weight_map"]
  for f in sorted(set(idx.values())):
    ref.update(load_file(os.path.join(folder, f)))
  assert set(sd) == set(ref)
  for k in ref:
    np.testing.assert_array_equal(sd[k], ref[k], err_msg=k)


def _copy_single_file(tmp_path, rename=None, drop=None, extra=None, reshape=None):
  """Writes the base checkpoint as one file with optional edits; returns the folder."""
  src = os.path.join(FIX, "models", "base")
  dst = tmp_path / "transformer"
  dst.mkdir()
  shutil.copy(os.path.join(src, "config.json"), dst / "config.json")
  sd = to_diffusers_state_dict(model("base"))
  for old, new in (rename or {}).items():
    sd[new] = sd.pop(old)
  for k in drop or ():
    sd.pop(k)
  sd.update(extra or {})
  for k, shape in (reshape or {}).items():
    sd[k] = np.zeros(shape, np.float32)
  save_file(sd, str(dst / "diffusion_pytorch_model.safetensors"))
  return str(dst)


def test_official_key_aliases_and_ignored_tensors(tmp_path):
  folder = _copy_single_file(
      tmp_path,
      rename={"norm_out.scale_shift_table": "scale_shift_table",
              "patch_long.weight": "clean_patch_embedding.proj_4x.weight",
              "patch_mid.bias": "multi_term_memory_patch.patch_mid.bias",
              "patch_short.weight": "clean_patch_embedding.proj.weight"},
      extra={"blocks.0.attn1.q_loras.down.weight": np.zeros((2, 64), np.float32),
             "gan_heads.0.weight": np.zeros((3,), np.float32),
             "blocks.1.attn2.norm_added_q.weight": np.zeros((64,), np.float32)})
  inputs, outs = load_case("full_history")
  out = HeliosTransformer3DModel.from_pretrained(folder)(**inputs)
  assert rel_err(out, outs["out"]) <= FP32_TOL


def test_pipeline_folder_is_accepted(tmp_path):
  root = tmp_path / "pipe"
  shutil.copytree(os.path.join(FIX, "models", "base"), root / "transformer")
  m = HeliosTransformer3DModel.from_pretrained(str(root))
  assert m.config.num_layers == 2


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one clear error each.

def test_missing_folder():
  with pytest.raises(CheckpointError, match="model folder not found"):
    HeliosTransformer3DModel.from_pretrained("/nonexistent/helios")


def test_missing_shard(tmp_path):
  dst = tmp_path / "t"
  shutil.copytree(os.path.join(FIX, "models", "base"), dst)
  os.remove(dst / "diffusion_pytorch_model-00002-of-00006.safetensors")
  with pytest.raises(CheckpointError, match="shard.*missing.*00002-of-00006"):
    HeliosTransformer3DModel.from_pretrained(str(dst))


def test_missing_key(tmp_path):
  folder = _copy_single_file(tmp_path, drop=["blocks.1.ffn.net.2.weight"])
  with pytest.raises(CheckpointError, match="1 missing.*blocks.1.ffn.net.2.weight"):
    HeliosTransformer3DModel.from_pretrained(folder)


def test_unexpected_key(tmp_path):
  folder = _copy_single_file(tmp_path, extra={"blocks.2.attn1.to_q.weight": np.zeros((64, 64), np.float32)})
  with pytest.raises(CheckpointError, match="unexpected.*blocks.2.attn1.to_q.weight"):
    HeliosTransformer3DModel.from_pretrained(folder)


def test_wrong_shape(tmp_path):
  folder = _copy_single_file(tmp_path, reshape={"blocks.0.attn1.to_k.weight": (32, 64)})
  with pytest.raises(CheckpointError, match=r"blocks.0.attn1.to_k.weight.*shape \(32, 64\).*\(64, 64\)"):
    HeliosTransformer3DModel.from_pretrained(folder)


def test_config_that_does_not_fit(tmp_path):
  dst = tmp_path / "t"
  shutil.copytree(os.path.join(FIX, "models", "base"), dst)
  cfg = json.load(open(dst / "config.json"))
  cfg["num_layers"] = 3
  json.dump(cfg, open(dst / "config.json", "w"))
  with pytest.raises(CheckpointError, match="does not fit its config.json.*missing.*blocks.2"):
    HeliosTransformer3DModel.from_pretrained(str(dst))


def test_unknown_config_field(tmp_path):
  dst = tmp_path / "t"
  shutil.copytree(os.path.join(FIX, "models", "base"), dst)
  cfg = json.load(open(dst / "config.json"))
  cfg["num_experts"] = 8
  json.dump(cfg, open(dst / "config.json", "w"))
  with pytest.raises(CheckpointError, match="unknown field.*num_experts"):
    HeliosTransformer3DModel.from_pretrained(str(dst))


def test_corrupt_config(tmp_path):
  dst = tmp_path / "t"
  shutil.copytree(os.path.join(FIX, "models", "base"), dst)
  (dst / "config.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="config.json .* is not valid JSON"):
    HeliosTransformer3DModel.from_pretrained(str(dst))


@pytest.mark.parametrize("edit, pattern", [
    (lambda a: a.update(hidden_states=a["hidden_states"][0]), r"hidden_states must be \(B, C, T, H, W\)"),
    (lambda a: a.update(hidden_states=a["hidden_states"][:, :3]), "3 channels, the model expects in_channels=4"),
    (lambda a: a.update(hidden_states=a["hidden_states"][..., :15]), "multiples of patch_size"),
    (lambda a: a.update(encoder_hidden_states=a["encoder_hidden_states"][..., :31]),
     r"encoder_hidden_states must be \(1, S, 32\)"),
    (lambda a: a.update(timestep=np.array([1.0, 2.0, 3.0])), r"timestep must be a scalar or shape \(1,\)"),
    (lambda a: a.update(indices_hidden_states=np.arange(5)[None]), r"indices_hidden_states must have shape"),
    (lambda a: a.pop("indices_latents_history_mid"), "latents_history_mid was given without indices_latents_history_mid"),
    (lambda a: [a.pop("latents_history_short"), a.pop("indices_latents_history_short")],
     "needs the short history"),
    (lambda a: a.update(latents_history_long=a["latents_history_long"][..., :8]),
     "latents_history_long spatial size"),
    (lambda a: a.update(indices_latents_history_long=np.arange(3)[None]), "indices_latents_history_long must have"),
    (lambda a: a.update(hidden_states="not an array"), "hidden_states must be a numpy or JAX array"),
])
def test_bad_inputs(edit, pattern):
  inputs, _ = load_case("full_history")
  edit(inputs)
  with pytest.raises(InputError, match=pattern):
    model("base")(**inputs)


def test_public_api_names():
  assert helios_jax.HeliosTransformer3DModel is HeliosTransformer3DModel
  out = model("base")(**load_case("no_history")[0], return_dict=True)
  assert "sample" in out


def test_scan_compiles_once_per_shape():
  """Calling twice with the same shapes reuses the compiled forward (no retrace)."""
  from helios_jax.models import transformer as tmod
  inputs, _ = load_case("no_history")
  m = model("base")
  m(**inputs)
  n = tmod._jitted_forward._cache_size()
  inputs["timestep"] = np.array([3.0], np.float32)
  m(**inputs)
  assert tmod._jitted_forward._cache_size() == n


def test_remat_gives_same_gradients():
  """remat_policy changes memory, not math: gradients match the non-remat model."""
  inputs, _ = load_case("full_history")
  m = model("base")
  args = _check_inputs(m.config, inputs)
  g, s = nnx.split(m)
  remat_model = nnx.merge(g, s)  # same weights; the config (static graph data) switches remat on
  remat_model.config = dataclasses.replace(m.config, remat_policy="full")
  g_r, _ = nnx.split(remat_model)

  def loss(state, graphdef):
    return jnp.mean(jnp.square(nnx.merge(graphdef, state).forward(**args)))

  grad_fn = jax.jit(jax.grad(loss), static_argnums=1)
  grads, grads_r = grad_fn(s, g), grad_fn(s, g_r)
  chex.assert_trees_all_close(grads, grads_r, rtol=1e-5, atol=1e-7)


def test_fused_qkv_matches_reference():
  inputs, outs = load_case("full_history")
  m = HeliosTransformer3DModel.from_pretrained(os.path.join(FIX, "models", "base"), fuse_qkv=True)
  assert rel_err(m(**inputs), outs["out"]) <= FP32_TOL


def test_unrolled_layers_and_layer_states_match_reference():
  """layer_loop="unrolled" and separately stored layers (``unstack_blocks``) compute the reference output, also
  with remat, a per-layer block adapter and hooked block outputs (the training / GAN paths)."""
  from helios_jax.models.transformer import unstack_blocks
  inputs, outs = load_case("full_history")
  m = model("base")
  args = _check_inputs(m.config, inputs)
  g, s = nnx.split(m)
  unrolled = nnx.merge(g, s)
  unrolled.config = dataclasses.replace(m.config, layer_loop="unrolled", remat_policy="full")
  assert rel_err(unrolled(**inputs), outs["out"]) <= FP32_TOL
  layers = unstack_blocks(m)
  assert len(layers) == m.config.num_layers
  out = jax.jit(lambda ls: m.forward(**args, layer_states=ls))(layers)
  assert rel_err(out, outs["out"]) <= FP32_TOL
  # a block adapter scaled per layer, and hooks: same result as the scan
  _, bstate = nnx.split(m.blocks)
  scale = jnp.linspace(0.9, 1.1, m.config.num_layers)
  adapter = (scale, lambda st, k: jax.tree.map(lambda a: a * k.astype(a.dtype), st))
  ref, ref_f = m.forward(**args, block_adapter=adapter, return_block_outputs=(0, 1))
  got, got_f = unrolled.forward(**args, block_adapter=adapter, return_block_outputs=(0, 1))
  chex.assert_trees_all_close((got, got_f), (ref, ref_f), rtol=1e-5, atol=1e-6)
  assert rel_err(ref, outs["out"]) > 1e-3  # the adapter does change the output (the check above can fail)
  with pytest.raises(InputError, match="layer_states has 1 layers"):
    m.forward(**args, layer_states=layers[:1])
  with pytest.raises(InputError, match="layer_loop"):
    dataclasses.replace(m.config, layer_loop="while")
