"""Parity of the UMT5 text encoder, tokenizer and prompt path with transformers / diffusers.

Fixtures come from ``tests/reference/make_umt5_fixtures.py`` (torch, transformers 5.24, diffusers 0.42.1, ftfy 6.3.1):
a tiny random UMT5 encoder saved in shards, a small SentencePiece tokenizer with UMT5's special-id layout, and the
reference outputs. No torch here.

Measured when written (CPU, jax 0.10.2): encoder fp32 relative error 2.7e-7 (max abs 2.0e-6); bf16 vs the fp32
reference 7.8e-3 relative (torch's own bf16 run is 8.0e-3 from it); prompt embeddings 2.4e-6 relative overall,
padded rows exactly zero.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helios_jax.errors import CheckpointError, InputError
from helios_jax.io.checkpoint import SafetensorsFolder, save_safetensors_folder
from helios_jax.models import tokenizer as text
from helios_jax.models.umt5 import UMT5Config, UMT5EncoderModel, relative_position_buckets

FIXTURES = os.path.join(os.path.dirname(__file__), "reference", "fixtures")
MODEL_DIR = os.path.join(FIXTURES, "umt5_tiny")
TOKENIZER_DIR = os.path.join(FIXTURES, "umt5_tokenizer")
FP32_RTOL = 1e-5  # relative (Frobenius) error bound for fp32 runs
BF16_RTOL = 2e-2  # relative error bound for the bf16 run (bf16 has ~3 significant digits; torch bf16 is at 8e-3)


@nnx.jit
def forward(model, input_ids, attention_mask):
  """Jitted ``model(input_ids, attention_mask).last_hidden_state`` (compiled once per shape and dtype)."""
  return model(input_ids, attention_mask).last_hidden_state


def rel_err(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def io_ref():
  return dict(np.load(os.path.join(FIXTURES, "umt5_tiny_io.npz")))


@pytest.fixture(scope="module")
def prompt_ref():
  with open(os.path.join(FIXTURES, "umt5_prompts.json"), encoding="utf-8") as f:
    meta = json.load(f)
  return meta, dict(np.load(os.path.join(FIXTURES, "umt5_prompts.npz")))


@pytest.fixture(scope="module")
def model32():
  return UMT5EncoderModel.from_pretrained(MODEL_DIR, dtype=jnp.float32)


@pytest.fixture(scope="module")
def out32(model32, io_ref):
  return forward(model32, io_ref["input_ids"], io_ref["attention_mask"])


@pytest.fixture(scope="module")
def tok():
  return text.load_tokenizer(TOKENIZER_DIR)


def comparable_prompts(meta) -> list[int]:
  """Indices of prompts whose cleaning is reproducible here: all with ftfy, else those ftfy leaves unchanged."""
  return [i for i, changed in enumerate(meta["ftfy_changes"]) if text.has_ftfy() or not changed]


# ---------------------------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------------------------


def test_relative_position_buckets_match_transformers(io_ref):
  offsets = io_ref["bucket_offsets"]
  n = int(offsets.max())
  # Row 0 of a (1, n+1) table holds offsets 0..n; column 0 of an (n+1, 1) table holds 0..-n.
  pos = relative_position_buckets(1, n + 1)[0]
  neg = relative_position_buckets(n + 1, 1)[:, 0]
  ours = np.concatenate([neg[::-1], pos[1:]])
  np.testing.assert_array_equal(ours, io_ref["buckets"])
  # Spot checks of the spec's table (B.3).
  table = dict(zip(offsets.tolist(), io_ref["buckets"].tolist()))
  assert [table[d] for d in (-91, -90, -16, -8, -1, 0, 1, 8, 16, 90, 91)] == [15, 14, 10, 8, 1, 0, 17, 24, 26, 30, 31]


def test_encoder_fp32_parity(out32, io_ref):
  out = out32
  assert out.shape == (3, 160, 32) and out.dtype == jnp.float32
  ref = io_ref["last_hidden_state_fp32"]
  err = rel_err(out, ref)
  assert err <= FP32_RTOL, err  # measured 2.7e-7
  np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=2e-5)


def test_encoder_bf16_finite_and_close(io_ref):
  model = UMT5EncoderModel.from_pretrained(MODEL_DIR, dtype=jnp.bfloat16)
  assert model.shared.embedding[...].dtype == jnp.bfloat16
  out = forward(model, io_ref["input_ids"], io_ref["attention_mask"])
  assert out.dtype == jnp.bfloat16
  out = np.asarray(out.astype(jnp.float32))
  assert np.isfinite(out).all()
  real = io_ref["attention_mask"].astype(bool)
  assert rel_err(out[real], io_ref["last_hidden_state_fp32"][real]) <= BF16_RTOL  # measured 7.8e-3
  assert rel_err(out[real], io_ref["last_hidden_state_bf16"][real]) <= BF16_RTOL  # measured 7.6e-3


def test_real_tokens_do_not_depend_on_padding(model32, out32, io_ref):
  n = int(io_ref["attention_mask"][1].sum())
  padded = np.asarray(out32)[1, :n]
  alone = np.asarray(forward(model32, io_ref["input_ids"][1:2, :n], io_ref["attention_mask"][1:2, :n]))[0]
  np.testing.assert_allclose(padded, alone, rtol=0, atol=1e-5)


def test_encoder_rejects_bad_inputs(model32):
  ids = np.ones((2, 5), np.int32)
  with pytest.raises(InputError):
    model32(ids, np.ones((2, 4), np.int32))
  with pytest.raises(InputError):
    model32(ids.astype(np.float32))
  with pytest.raises(InputError):
    model32(ids[0])


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint loading
# ---------------------------------------------------------------------------------------------------------------


def test_loads_sharded_checkpoint_with_shared_embedding_only():
  files = os.listdir(MODEL_DIR)
  assert "model.safetensors.index.json" in files
  assert len([f for f in files if f.startswith("model-0000") and f.endswith(".safetensors")]) > 1
  with SafetensorsFolder(MODEL_DIR, "model") as weights:
    assert "shared.weight" in weights and "encoder.embed_tokens.weight" not in weights
    shared = weights.get("shared.weight")
  model = UMT5EncoderModel.from_pretrained(MODEL_DIR, dtype=jnp.float32)
  assert model.config == UMT5Config(vocab_size=832, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
  np.testing.assert_array_equal(np.asarray(model.shared.embedding[...]), shared)
  assert model.blocks.q.kernel[...].shape == (2, 32, 32)  # stacked (num_layers, in, out)


def _copy_model(tmp_path) -> str:
  dst = str(tmp_path / "text_encoder")
  shutil.copytree(MODEL_DIR, dst)
  return dst


def test_embed_tokens_alias_single_file(tmp_path, model32, io_ref):
  with SafetensorsFolder(MODEL_DIR, "model") as weights:
    tensors = {k: weights.get(k) for k in weights.keys()}
  tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
  with open(os.path.join(MODEL_DIR, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  folder = str(tmp_path / "single")
  save_safetensors_folder(folder, tensors, config, weights_name="model")
  model = UMT5EncoderModel.from_pretrained(folder, dtype=jnp.float32)
  n = int(io_ref["attention_mask"][1].sum())  # the shape of the padding test: no new compilation
  ids, mask = io_ref["input_ids"][1:2, :n], io_ref["attention_mask"][1:2, :n]
  np.testing.assert_array_equal(np.asarray(forward(model, ids, mask)), np.asarray(forward(model32, ids, mask)))


def test_missing_folder():
  with pytest.raises(CheckpointError, match="not found"):
    UMT5EncoderModel.from_pretrained("/nonexistent/text_encoder")


def test_missing_config(tmp_path):
  folder = _copy_model(tmp_path)
  os.remove(os.path.join(folder, "config.json"))
  with pytest.raises(CheckpointError, match="config.json"):
    UMT5EncoderModel.from_pretrained(folder)


def test_missing_shard(tmp_path):
  folder = _copy_model(tmp_path)
  os.remove(os.path.join(folder, "model-00002-of-00004.safetensors"))
  with pytest.raises(CheckpointError, match="model-00002-of-00004.safetensors"):
    UMT5EncoderModel.from_pretrained(folder)


def test_wrong_key(tmp_path):
  folder = _copy_model(tmp_path)
  with SafetensorsFolder(folder, "model") as weights:
    tensors = {k: weights.get(k) for k in weights.keys()}
  key = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
  tensors[key.replace("relative_attention_bias", "relative_bias")] = tensors.pop(key)
  for name in os.listdir(folder):
    if name.startswith("model"):
      os.remove(os.path.join(folder, name))
  save_safetensors_folder(folder, tensors, None, weights_name="model", max_shard_bytes=40_000)
  with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
    UMT5EncoderModel.from_pretrained(folder)


def test_wrong_shape(tmp_path):
  folder = _copy_model(tmp_path)
  path = os.path.join(folder, "config.json")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  config["d_ff"] = 48
  with open(path, "w", encoding="utf-8") as f:
    json.dump(config, f)
  with pytest.raises(CheckpointError, match=r"wrong shape: encoder\.block\.0\.layer\.1\.DenseReluDense"):
    UMT5EncoderModel.from_pretrained(folder)


def test_unsupported_activation(tmp_path):
  folder = _copy_model(tmp_path)
  path = os.path.join(folder, "config.json")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  config["feed_forward_proj"] = "gated-unknown"
  with open(path, "w", encoding="utf-8") as f:
    json.dump(config, f)
  with pytest.raises(CheckpointError, match="feed_forward_proj"):
    UMT5EncoderModel.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and prompt cleaning
# ---------------------------------------------------------------------------------------------------------------


def test_prompt_clean_matches_reference(prompt_ref):
  meta, _ = prompt_ref
  for i in comparable_prompts(meta):
    assert text.prompt_clean(meta["prompts"][i]) == meta["cleaned"][i], i


@pytest.mark.skipif(not text.has_ftfy(), reason="ftfy is not installed")
def test_prompt_clean_with_ftfy_matches_reference_everywhere(prompt_ref):
  meta, _ = prompt_ref
  assert [text.prompt_clean(p) for p in meta["prompts"]] == meta["cleaned"]


def test_whitespace_clean_uses_unicode_whitespace():
  assert text.whitespace_clean(" a\u00a0\u3000b\t\nc\u2003 ") == "a b c"
  # \x1c..\x1f are whitespace to Python's `re` but not to the reference's `regex` \s.
  assert text.whitespace_clean("a\x1cb") == "a\x1cb"
  assert text.basic_clean("&amp;amp; &lt;x&gt; ") == "& <x>"


def test_token_ids_match_transformers(tok, prompt_ref):
  meta, ref = prompt_ref
  out = tok(meta["cleaned"], max_length=meta["max_sequence_length"], warn_truncation=False)
  np.testing.assert_array_equal(out.input_ids, ref["input_ids"])
  np.testing.assert_array_equal(out.attention_mask, ref["attention_mask"])
  assert out.input_ids.dtype == np.int32
  for row, ids in zip(out.input_ids, meta["transformers_tokenizer_ids"]):
    assert row[:len(ids)].tolist() == ids and (row[len(ids):] == 0).all()
  assert out.truncated == [n > meta["max_sequence_length"] for n in meta["untruncated_lengths"]]
  assert [len(tok.encode(c)) for c in meta["cleaned"]] == meta["untruncated_lengths"]


def test_token_ids_from_raw_prompts(tok, prompt_ref):
  meta, ref = prompt_ref
  idx = comparable_prompts(meta)
  out = text.tokenize_prompts(tok, [meta["prompts"][i] for i in idx])
  np.testing.assert_array_equal(out.input_ids, ref["input_ids"][idx])


def test_truncation_warning(tok, prompt_ref, caplog):
  meta, _ = prompt_ref
  exact, over = meta["cleaned"][9], meta["cleaned"][10]  # 511 and 512 content tokens (+ </s>)
  with caplog.at_level(logging.WARNING, logger=text.logger.name):
    out = tok([exact], max_length=512)
  assert out.truncated == [False] and out.attention_mask.sum() == 512 and not caplog.records
  with caplog.at_level(logging.WARNING, logger=text.logger.name):
    out = tok([exact, over], max_length=512)
  assert out.truncated == [False, True]
  assert out.input_ids[1, -1] == 1 and out.attention_mask[1].sum() == 512
  assert len(caplog.records) == 1 and "max_sequence_length=512" in caplog.text
  assert "prompt 1 has 513 tokens" in caplog.text


def test_sentencepiece_backend(tmp_path, prompt_ref):
  meta, ref = prompt_ref
  shutil.copy(os.path.join(TOKENIZER_DIR, "spiece.model"), tmp_path / "spiece.model")
  sp = text.load_tokenizer(str(tmp_path))
  assert sp.backend == "sentencepiece"
  out = sp(meta["cleaned"], max_length=512, warn_truncation=False)
  # Same ids wherever the text has no character outside the vocabulary and no literal special-token string.
  same = [i for i, ids in enumerate(meta["transformers_tokenizer_ids"]) if 2 not in ids and 0 not in ids]
  assert len(same) >= 5
  np.testing.assert_array_equal(out.input_ids[same], ref["input_ids"][same])


def test_file_compat_differs_only_in_unknown_id(prompt_ref):
  meta, ref = prompt_ref
  raw = text.load_tokenizer(TOKENIZER_DIR, compat="file")
  out = raw(meta["cleaned"], max_length=512, warn_truncation=False)
  for i, prompt in enumerate(meta["cleaned"]):
    if "<" in prompt:  # literal special tokens are split differently by the file's pre-tokenizer
      continue
    a, b = out.input_ids[i], ref["input_ids"][i]
    assert set(zip(a[a != b].tolist(), b[a != b].tolist())) <= {(3, 2)}, i


def test_tokenizer_folder_errors(tmp_path):
  with pytest.raises(CheckpointError, match="not found"):
    text.load_tokenizer(str(tmp_path / "missing"))
  with pytest.raises(CheckpointError, match="no tokenizer"):
    text.load_tokenizer(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="tokenizer.json"):
    text.load_tokenizer(str(tmp_path))
  with pytest.raises(InputError):
    text.load_tokenizer(TOKENIZER_DIR, compat="v4")


def test_pipeline_root_with_tokenizer_subfolder(tmp_path, tok):
  shutil.copytree(TOKENIZER_DIR, tmp_path / "tokenizer")
  other = text.load_tokenizer(str(tmp_path))
  assert other.encode("a cat on the mat") == tok.encode("a cat on the mat")


# ---------------------------------------------------------------------------------------------------------------
# Prompt embeddings
# ---------------------------------------------------------------------------------------------------------------


def test_prompt_embeddings_match_diffusers(model32, tok, prompt_ref):
  meta, ref = prompt_ref
  idx = comparable_prompts(meta)
  out = text.encode_prompt(model32, tok, [meta["prompts"][i] for i in idx],
                           max_sequence_length=meta["max_sequence_length"])
  assert out.shape == (len(idx), 512, 32) and out.dtype == jnp.float32
  out = np.asarray(out)
  expected = ref["prompt_embeds"][idx]
  pad = ~ref["attention_mask"][idx].astype(bool)
  assert (out[pad] == 0).all() and (expected[pad] == 0).all()
  assert (np.abs(out[~pad]).sum(-1) > 0).all()
  assert rel_err(out, expected) <= FP32_RTOL  # measured 2.4e-6
  for i in range(len(idx)):
    assert rel_err(out[i], expected[i]) <= FP32_RTOL, idx[i]


def test_encode_prompt_repeats_and_casts(model32, tok):
  prompts = ["a cat on the mat", ""]
  base = np.asarray(text.encode_prompt(model32, tok, prompts, max_sequence_length=16))
  out = text.encode_prompt(model32, tok, prompts, max_sequence_length=16, dtype=jnp.bfloat16,
                           num_videos_per_prompt=2)
  assert out.shape == (4, 16, 32) and out.dtype == jnp.bfloat16
  out = np.asarray(out.astype(jnp.float32))
  np.testing.assert_array_equal(out[0], out[1])
  np.testing.assert_allclose(out[2], base[1], rtol=1e-2, atol=1e-2)
  assert (base[1, 1:] == 0).all() and (base[1, 0] != 0).any()  # "" -> only </s> is real
  with pytest.raises(InputError):
    text.encode_prompt(model32, tok, [], max_sequence_length=16)
  with pytest.raises(InputError):
    text.encode_prompt(model32, tok, ["x"], max_sequence_length=16, num_videos_per_prompt=0)
