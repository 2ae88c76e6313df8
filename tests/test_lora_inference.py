"""LoRA at inference: parity with diffusers + PEFT, several adapters, fuse / unfuse exactness, formats, errors.

Fixture: ``tests/reference/make_lora_fixtures.py`` (diffusers 0.42.1 + PEFT on the tiny random transformer).

Tolerance: relative L2 error <= 5e-6 in float32. The base transformer matches diffusers at ~2e-7; with a LoRA we
compute ``x (W + A B s)`` where PEFT computes ``x W + ((x A) B) s``: the same sums in another order, so each of the
~20 adapted matmuls (inner sizes 16..96) adds rounding of order sqrt(K) * 6e-8 relative; the observed error is
6.5e-7. The LoRA changes the output by ~30-100 % relative, so the bound is five orders of magnitude tighter than
the effect tested.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from helios_jax.errors import CheckpointError, InputError
from helios_jax.io.lora_weights import convert_lora, param_name, read_lora_file, save_lora_weights
from helios_jax.models.transformer import HeliosTransformer3DModel
from helios_jax.pipelines import HeliosPipeline
from helios_jax.pipelines.lora import LoraMixin, parse_lora_arg

REF = os.path.join(os.path.dirname(__file__), "reference", "fixtures")
FIX = os.path.join(REF, "lora")
BASE = os.path.join(REF, "transformer", "models", "base")
TOL = 5e-6


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


class _Holder(LoraMixin):
  """The mixin on a bare transformer (the pipelines add nothing the transformer-level tests need)."""

  def __init__(self, transformer):
    self.transformer = transformer
    self._split = None


@pytest.fixture(scope="module")
def case():
  data = dict(np.load(os.path.join(FIX, "case.npz")))
  outs = {k: data.pop(k) for k in list(data) if k.startswith("out_")}
  return data, outs


def fresh(dtype=jnp.float32):
  return _Holder(HeliosTransformer3DModel.from_pretrained(BASE, dtype=dtype))


def params(model) -> dict:
  state = nnx.state(model, nnx.Param)
  return {param_name(p): np.asarray(jax.device_get(x)) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


@pytest.mark.parametrize("text,expected", [
    ("a.safetensors", ("a.safetensors", 1.0)), ("a.safetensors:0.5", ("a.safetensors", 0.5)),
    ("C:\\loras\\x.safetensors", ("C:\\loras\\x.safetensors", 1.0)), ("C:\\x.st:-1.5e-1", ("C:\\x.st", -0.15)),
    ("dir:v2/lora", ("dir:v2/lora", 1.0)), ("weights:v2.safetensors", ("weights:v2.safetensors", 1.0)),
    ("x:.5", ("x", 0.5)), ("x:2", ("x", 2.0))])
def test_parse_lora_arg(text, expected):
  assert parse_lora_arg(text) == expected


@pytest.mark.parametrize("text", ["", "  ", ":0.5"])
def test_parse_lora_arg_refuses(text):
  if text == ":0.5":  # nothing before the scale: the whole text is the path
    assert parse_lora_arg(text) == (":0.5", 1.0)
    return
  with pytest.raises(InputError):
    parse_lora_arg(text)


def test_parity_with_diffusers_peft(case):
  inputs, outs = case
  pipe = fresh()
  m = pipe.transformer
  assert rel(m(**inputs), outs["out_base"]) < TOL
  assert pipe.load_lora_weights(os.path.join(FIX, "lora_a"), adapter_name="a") == "a"
  assert rel(m(**inputs), outs["out_a"]) < TOL
  assert rel(outs["out_a"], outs["out_base"]) > 0.1  # the adapter matters far beyond the tolerance
  pipe.set_adapters("a", 0.5)
  assert rel(m(**inputs), outs["out_a_half"]) < TOL
  name = pipe.load_lora_weights(os.path.join(FIX, "lora_b_kohya.safetensors"), scale=0.7)
  assert name == "default_1" and pipe.get_active_adapters() == ["a", name]
  pipe.set_adapters(["a", name], [1.0, 0.7])
  assert rel(m(**inputs), outs["out_ab"]) < TOL
  pipe.set_adapters([name])
  assert rel(m(**inputs), outs["out_b"]) < TOL
  pipe.unload_lora_weights()
  assert pipe.get_active_adapters() == [] and rel(m(**inputs), outs["out_base"]) < TOL


def test_load_scale_equals_set_adapters(case):
  inputs, outs = case
  pipe = fresh()
  pipe.load_lora_weights(os.path.join(FIX, "lora_a"), scale=0.5)
  assert rel(pipe.transformer(**inputs), outs["out_a_half"]) < TOL


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fuse_unfuse_restores_exactly(case, dtype):
  inputs, outs = case
  pipe = fresh(dtype)
  before = params(pipe.transformer)
  pipe.load_lora_weights(os.path.join(FIX, "lora_a"), adapter_name="a")
  pipe.load_lora_weights(os.path.join(FIX, "lora_b_kohya.safetensors"), adapter_name="b", scale=0.7)
  unfused = np.asarray(pipe.transformer(**inputs), np.float32)
  pipe.fuse_lora()
  fused_params = params(pipe.transformer)
  changed = [n for n in before if not np.array_equal(before[n], fused_params[n])]
  assert "blocks.attn1.to_q.kernel" in changed and "patch_embedding.proj.kernel" in changed
  fused = np.asarray(pipe.transformer(**inputs), np.float32)
  assert rel(fused, unfused) < (TOL if dtype == jnp.float32 else 3e-2)  # bf16: one rounding of W + D
  if dtype == jnp.float32:
    assert rel(fused, outs["out_ab"]) < TOL
  assert pipe.get_active_adapters() == ["a", "b"]
  with pytest.raises(InputError, match="already fused"):
    pipe.fuse_lora()
  with pytest.raises(InputError, match="unfuse_lora"):
    pipe.load_lora_weights(os.path.join(FIX, "lora_a"), adapter_name="c")
  pipe.unfuse_lora()
  after = params(pipe.transformer)
  assert all(np.array_equal(before[n], after[n]) and before[n].dtype == after[n].dtype for n in before)
  np.testing.assert_array_equal(np.asarray(pipe.transformer(**inputs), np.float32), unfused)
  pipe.fuse_lora(lora_scale=0.5, adapter_names=["a"])
  if dtype == jnp.float32:
    assert rel(pipe.transformer(**inputs), outs["out_a_half"]) < TOL
  pipe.unload_lora_weights()  # after fusing: the fused weights stay, as in diffusers
  if dtype == jnp.float32:
    assert rel(pipe.transformer(**inputs), outs["out_a_half"]) < TOL


def test_key_styles_give_the_same_adapter():
  model = HeliosTransformer3DModel.from_pretrained(BASE)
  tensors, meta = read_lora_file(os.path.join(FIX, "lora_a"))
  ref = convert_lora(tensors, model, meta)
  alpha, rank = meta["transformer.lora_alpha"], meta["transformer.r"]
  for prefix in ("", "diffusion_model.", "base_model.model."):
    other = convert_lora({prefix + k[len("transformer."):]: v for k, v in tensors.items()}, model, meta)
    assert other.names() == ref.names()
    for n in ref.factors:
      np.testing.assert_array_equal(other.factors[n]["b"], ref.factors[n]["b"])
  # kohya lora_down / lora_up on diffusers names, alpha per module
  kohya = {}
  for k, v in tensors.items():
    k = k.replace("lora_A.weight", "lora_down.weight").replace("lora_B.weight", "lora_up.weight")
    kohya[k] = v
    if k.endswith("lora_down.weight"):
      kohya[k.replace("lora_down.weight", "alpha")] = np.float32(alpha)
  other = convert_lora(kohya, model)
  for n in ref.factors:  # (the rank_pattern module too: alpha over its own rank either way)
    np.testing.assert_allclose(other.factors[n]["b"], ref.factors[n]["b"], rtol=1e-6)
  # no metadata, no alpha: scale 1 (diffusers' alpha = rank convention)
  plain = convert_lora(tensors, model)
  n = "blocks.attn1.to_q.kernel"
  np.testing.assert_allclose(plain.factors[n]["b"] * alpha / rank, ref.factors[n]["b"], rtol=1e-6)


def test_official_names_and_full_tensors(case):
  """Older official module names (multi_term_memory_patch.*) and full ``transformer.<param>`` tensors."""
  inputs, _ = case
  pipe = fresh()
  sd = {"transformer.multi_term_memory_patch.patch_short.lora_A.weight": np.full((2, 4, 1, 2, 2), 0.1, np.float32),
        "transformer.multi_term_memory_patch.patch_short.lora_B.weight": np.full((64, 2, 1, 1, 1), 0.2, np.float32),
        "transformer.norm_out.scale_shift_table": np.zeros((1, 2, 64), np.float32)}
  base = np.asarray(pipe.transformer(**inputs))
  pipe.load_lora_weights(sd)
  out = np.asarray(pipe.transformer(**inputs))
  assert rel(out, base) > 1e-3
  pipe.fuse_lora()
  np.testing.assert_array_equal(np.asarray(pipe.transformer.norm_out.scale_shift_table[...]), 0.0)
  assert rel(pipe.transformer(**inputs), out) < TOL


def test_trainer_adapters_round_trip(tmp_path, case):
  """Our trainer's adapter pytree, written by save_lora_weights (diffusers format), equals training's bind."""
  from helios_jax.training import lora as train_lora
  inputs, _ = case
  pipe = fresh()
  graphdef, state = nnx.split(pipe.transformer)
  trainable = train_lora.init_trainable(state, jax.random.key(0), mode="lora", rank=3,
                                        lora_targets=train_lora.ALL_LINEAR + train_lora.PATCH_EMBEDDING,
                                        full_targets=())
  for i, ab in enumerate(trainable["lora"].values()):
    ab["b"] = 0.3 * jax.random.normal(jax.random.key(i + 1), ab["b"].shape)
  alpha = 6.0
  path = save_lora_weights(str(tmp_path / "ours"), trainable, pipe.transformer, rank=3, alpha=alpha)
  assert os.path.basename(path) == "pytorch_lora_weights.safetensors"
  from helios_jax.models.transformer import _check_inputs
  checked = _check_inputs(pipe.transformer.config, inputs)
  expected = jax.jit(lambda s, t: train_lora.bind(graphdef, s, t, alpha / 3)(**checked))(state, trainable)
  pipe.load_lora_weights(str(tmp_path / "ours"))
  assert rel(pipe.transformer(**inputs), expected) < TOL


def _sd():
  tensors, _ = read_lora_file(os.path.join(FIX, "lora_a"))
  return dict(tensors)


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.update({"transformer.blocks.0.attn3.to_q.lora_A.weight": np.zeros((4, 64), np.float32)}),
     "name no module.*attn3"),
    (lambda sd: sd.update({"transformer.blocks.7.attn1.to_q.lora_A.weight": np.zeros((4, 64), np.float32),
                           "transformer.blocks.7.attn1.to_q.lora_B.weight": np.zeros((64, 4), np.float32)}),
     "name no module.*blocks.7"),
    (lambda sd: sd.update({"transformer.blocks.0.attn1.to_q.lora_B.weight": np.zeros((64, 3), np.float32)}),
     "does not fit.*blocks.0.attn1.to_q"),
    (lambda sd: sd.update({"transformer.blocks.0.attn1.to_k.lora_A.weight": np.zeros((4, 65), np.float32)}),
     "does not fit.*blocks.0.attn1.to_k"),
    (lambda sd: sd.pop("transformer.proj_out.lora_B.weight"), "only one of lora_A / lora_B: proj_out"),
    (lambda sd: sd.update({"transformer.blocks.0.attn1.to_q.lora_magnitude_vector": np.zeros(64, np.float32)}),
     "DoRA"),
])
def test_errors_name_the_offending_keys(edit, message):
  sd = _sd()
  edit(sd)
  with pytest.raises(CheckpointError, match=message):
    fresh().load_lora_weights(sd)


def test_errors_files_and_names(tmp_path):
  pipe = fresh()
  with pytest.raises(CheckpointError, match="not found"):
    pipe.load_lora_weights(str(tmp_path / "missing.safetensors"))
  (tmp_path / "p").mkdir()
  (tmp_path / "p" / "adapter_model.bin").write_bytes(b"x")
  with pytest.raises(CheckpointError, match="pickle"):
    pipe.load_lora_weights(str(tmp_path / "p"))
  with pytest.raises(CheckpointError, match="pickle"):
    pipe.load_lora_weights(str(tmp_path / "p" / "adapter_model.bin"))
  save_file({"transformer.blocks.0.norm2.weight_oops": np.zeros(3, np.float32)}, str(tmp_path / "bad.safetensors"))
  with pytest.raises(CheckpointError, match="name no module"):
    pipe.load_lora_weights(str(tmp_path / "bad.safetensors"))
  pipe.load_lora_weights(_sd(), adapter_name="x")
  with pytest.raises(InputError, match="already loaded"):
    pipe.load_lora_weights(_sd(), adapter_name="x")
  with pytest.raises(InputError, match="no adapter named 'y'"):
    pipe.set_adapters(["y"])
  with pytest.raises(InputError, match="1 adapters but 2 weights"):
    pipe.set_adapters(["x"], [1.0, 2.0])
  with pytest.raises(InputError, match="must be a number"):
    pipe.set_adapters(["x"], ["big"])
  with pytest.raises(InputError, match="no LoRA is fused"):
    pipe.unfuse_lora()
  pipe.set_adapters([])
  with pytest.raises(InputError, match="no active adapter"):
    pipe.fuse_lora()


def test_pipeline_unfused_fused_and_merged_weights_agree(tmp_path):
  """A tiny HeliosPipeline: LoRA unfused == fused == a pipeline built on pre-merged weights; != no LoRA."""
  from helios_jax.training import lora as train_lora
  folder = os.path.join(REF, "pipeline", "base")
  pipe = HeliosPipeline.from_pretrained(folder, dtype=jnp.float32, load_vae=False)
  graphdef, state = nnx.split(pipe.transformer)
  trainable = train_lora.init_trainable(state, jax.random.key(0), mode="lora", rank=2,
                                        lora_targets=train_lora.ALL_LINEAR, full_targets=())
  for i, ab in enumerate(trainable["lora"].values()):
    ab["b"] = 0.2 * jax.random.normal(jax.random.key(i + 1), ab["b"].shape)
  save_lora_weights(str(tmp_path / "l"), trainable, pipe.transformer, rank=2, alpha=2.0)
  cfg = pipe.transformer.config
  text = np.random.default_rng(0).standard_normal((1, 8, cfg.text_dim)).astype(np.float32)
  kw = dict(prompt_embeds=text, negative_prompt_embeds=text * 0.5, height=64, width=128, num_frames=33,
            num_inference_steps=2, guidance_scale=3.0, output_type="latent", progress=False, seed=3)
  plain = np.asarray(pipe(**kw).frames)
  pipe.load_lora_weights(str(tmp_path / "l"), adapter_name="l", scale=0.8)
  unfused = np.asarray(pipe(**kw).frames)
  merged = HeliosPipeline(train_lora.merge_into_model(graphdef, state, trainable, 0.8), pipe.scheduler)
  reference = np.asarray(merged(**kw).frames)
  assert rel(unfused, reference) < TOL and rel(unfused, plain) > 1e-3
  pipe.fuse_lora()
  assert rel(pipe(**kw).frames, reference) < TOL
  pipe.unfuse_lora()
  np.testing.assert_array_equal(np.asarray(pipe(**kw).frames), unfused)
