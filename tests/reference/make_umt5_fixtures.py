"""Regenerates the UMT5 text-encoder / tokenizer parity fixtures with the PyTorch reference.

Run from the repository root with the reference environment (``requirements-reference.txt``; torch, transformers
>= 5, diffusers 0.42.1, sentencepiece, protobuf) and, for the prompt-cleaning reference, ``ftfy``::

    python tests/reference/make_umt5_fixtures.py

ftfy is needed because diffusers' Helios prompt cleaning calls ``ftfy.fix_text`` unconditionally (without ftfy the
reference pipeline fails with a NameError on every text prompt). It may live outside the environment, e.g.
``pip install --target /tmp/ftfy_site ftfy`` then ``PYTHONPATH=/tmp/ftfy_site python tests/reference/...``.

Everything is seeded; the script writes

* ``tests/reference/fixtures/umt5_tokenizer/``: a small SentencePiece unigram model trained here on a generated
  corpus, laid out like google/umt5-xxl's (0 ``<pad>``, 1 ``</s>``, 2 ``<s>``, 3 ``<unk>``, then pieces, then
  ``<extra_id_N>`` sentinels counting down), saved as ``spiece.model`` + ``tokenizer.json`` (written in the layout
  of the tokenizer.json files shipped with Wan/Helios checkpoints: Unigram model with its own unk id, normalizer
  Precompiled + space collapsing, Metaspace pre-tokenizer, ``$A </s>`` template) + ``tokenizer_config.json`` +
  ``special_tokens_map.json``.
* ``tests/reference/fixtures/umt5_tiny/``: a tiny random ``UMT5EncoderModel`` (``save_pretrained`` with a small
  shard size, so it is sharded with an index file and holds ``shared.weight`` only).
* ``tests/reference/fixtures/umt5_tiny_io.npz``: encoder inputs/outputs (fp32 and bf16), the relative-position
  buckets of transformers for a range of offsets.
* ``tests/reference/fixtures/umt5_prompts.json`` + ``umt5_prompts.npz``: prompts, their cleaned text, the token ids
  and masks of ``T5TokenizerFast.from_pretrained(tokenizer folder)`` as the Helios pipelines call it, and the
  prompt embeddings of diffusers' ``HeliosPyramidPipeline._get_t5_prompt_embeds`` through the tiny encoder.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import sys
import types

import numpy as np
import sentencepiece as spm
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
TOK_DIR = os.path.join(FIXTURES, "umt5_tokenizer")
MODEL_DIR = os.path.join(FIXTURES, "umt5_tiny")
NUM_EXTRA_IDS = 300
MAX_SEQ = 512
SEED = 0

# Vocabulary of the generated corpus: English words, syllable soup, and the non-ASCII words the test prompts use
# (unknown characters such as emoji are deliberately left out so that they map to the unk id).
_WORDS = ("a the cat dog sat on mat video of running in park sunset over ocean waves crash beach camera pans slowly "
          "across city street night neon lights rain reflections close-up portrait woman smiling man walking forest "
          "trees leaves wind blowing snow mountain river flowing bright colors cinematic shot drone aerial view and "
          "with double escaped quotes fine full width extra whitespace tab newline literal tokens snowman party "
          "unicode mojibake").split()
_FOREIGN = ["café", "naïve", "Straße", "東京", "の", "夜景", "日本語", "русский", "текст", "émigré", "über", "niño",
            "100%", "3.5", "&", "<", ">", "\"", "'", "(", ")", "-", ":", ";", "fi", "a"]
_SYLLABLES = ["ka", "ri", "to", "men", "sa", "lo", "qu", "ex", "bra", "ston", "ing", "er", "ly", "tion", "pre", "un",
              "de", "ver", "al", "ous"]


def _train_sentencepiece() -> bytes:
  rng = random.Random(SEED)
  words = _WORDS + ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(600)]
  lines = []
  for _ in range(6000):
    n = rng.randint(3, 15)
    lines.append(" ".join(rng.choice(words + _FOREIGN) for _ in range(n)) + rng.choice([".", ",", "!", "?", ""]))
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=500, model_type="unigram",
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="</s>", bos_piece="<s>",
      unk_piece="<unk>", character_coverage=1.0, normalization_rule_name="nmt_nfkc", num_threads=1,
      minloglevel=2)
  return model.getvalue()


def _build_tokenizer_folder(spiece: bytes) -> None:
  """Writes spiece.model, an old-style tokenizer.json and the transformers config files."""
  from sentencepiece import sentencepiece_model_pb2

  os.makedirs(TOK_DIR, exist_ok=True)
  with open(os.path.join(TOK_DIR, "spiece.model"), "wb") as f:
    f.write(spiece)
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(spiece)
  vocab = [(p.piece, p.score) for p in proto.pieces]
  vocab += [(f"<extra_id_{i}>", 0.0) for i in range(NUM_EXTRA_IDS - 1, -1, -1)]
  tok = Tokenizer(Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=False))
  tok.normalizer = normalizers.Sequence([normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
                                         normalizers.Replace(Regex(" {2,}"), " ")])
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
  tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
  # Control pieces (pad, eos, bos) and the sentinels are special added tokens, as in the shipped files.
  specials = [p.piece for p in proto.pieces if p.type == 3]
  tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
  tok.add_special_tokens([AddedToken(f"<extra_id_{i}>", normalized=False, special=True)
                          for i in range(NUM_EXTRA_IDS - 1, -1, -1)])
  tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                     special_tokens=[("</s>", 1)])
  tok.save(os.path.join(TOK_DIR, "tokenizer.json"))
  extra = [f"<extra_id_{i}>" for i in range(NUM_EXTRA_IDS)]
  added_ids = [i for i, p in enumerate(proto.pieces) if p.type in (2, 3)]
  added_ids += list(range(len(proto.pieces), len(vocab)))
  added = {str(i): {"content": vocab[i][0], "lstrip": False, "normalized": False, "rstrip": False,
                    "single_word": False, "special": True} for i in added_ids}
  config = {"tokenizer_class": "T5Tokenizer", "extra_ids": NUM_EXTRA_IDS, "legacy": True,
            "model_max_length": 1000000000000000019884624838656, "eos_token": "</s>", "unk_token": "<unk>",
            "pad_token": "<pad>", "additional_special_tokens": extra, "added_tokens_decoder": added,
            "sp_model_kwargs": {}, "clean_up_tokenization_spaces": False}
  with open(os.path.join(TOK_DIR, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)
  with open(os.path.join(TOK_DIR, "special_tokens_map.json"), "w", encoding="utf-8") as f:
    json.dump({"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
               "additional_special_tokens": extra}, f, indent=2)


def _prompts(hf_tok) -> list[str]:
  # A word that is one piece, to build prompts of exactly 511 / 512 content tokens (the edge of truncation).
  one = next(w for w in ["cat", "dog", "the", "a"] if len(hf_tok(w, add_special_tokens=False).input_ids) == 1)
  rng = random.Random(SEED + 1)
  long_prompt = " ".join(rng.choice(_WORDS) for _ in range(900))
  return [
      "A cat sat on the mat.",
      "  extra   whitespace\tand\ttab\nnewline\r\n  end  ",
      "Q&amp;A: &lt;b&gt;bold&lt;/b&gt; &amp;amp; double escaped &quot;quotes&quot;",
      "café naïve Straße émigré über niño 東京の夜景 日本語 русский текст 100% 3.5",
      "“curly quotes” and mojibake cafÃ© naÃ¯ve and the ﬁne ｆｕｌｌ width",
      "snowman ☃ party 🎉 unknown",
      "",
      "literal tokens <extra_id_0> and </s> and <s> and <pad> in text",
      "no\u00a0break\u3000ideographic\u2003em\u200bzero width\x1cfile separator",
      " ".join([one] * (MAX_SEQ - 1)),
      " ".join([one] * MAX_SEQ),
      long_prompt,
  ]


def main() -> None:
  try:
    import ftfy
  except ImportError:
    sys.exit("ftfy is needed for the reference prompt cleaning (see the module docstring)")
  torch.manual_seed(SEED)
  np.random.seed(SEED)
  from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel
  import diffusers.pipelines.helios.pipeline_helios_pyramid as helios_pyramid

  for d in (TOK_DIR, MODEL_DIR):
    shutil.rmtree(d, ignore_errors=True)
  _build_tokenizer_folder(_train_sentencepiece())
  hf_tok = T5TokenizerFast.from_pretrained(TOK_DIR)  # how the Helios pipelines load tokenizer/

  # Tiny random encoder. The embedding has a few padding rows past the tokenizer's size, like umt5-xxl's.
  config = UMT5Config(vocab_size=len(hf_tok) + 32, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.1,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)
  model = UMT5EncoderModel(config).eval()
  with torch.no_grad():
    g = torch.Generator().manual_seed(SEED)
    for name, p in model.named_parameters():
      if name.endswith("layer_norm.weight"):  # constant-initialised (ones): perturb so that they are tested
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif name.endswith("relative_attention_bias.weight"):  # make the position bias matter
        p.copy_(torch.randn(p.shape, generator=g))
  model.save_pretrained(MODEL_DIR, max_shard_size="40KB")

  # Encoder parity inputs: right-padded batch with a length > max_distance (log buckets and the far bucket).
  lengths = [160, 97, 5]
  seq = max(lengths)
  ids = np.zeros((len(lengths), seq), np.int64)
  mask = np.zeros((len(lengths), seq), np.int64)
  rng = np.random.default_rng(SEED)
  for b, n in enumerate(lengths):
    ids[b, :n - 1] = rng.integers(4, config.vocab_size, n - 1)
    ids[b, n - 1] = 1
    mask[b, :n] = 1
  with torch.no_grad():
    out32 = model(torch.from_numpy(ids), torch.from_numpy(mask)).last_hidden_state.numpy()
    model_bf16 = UMT5EncoderModel.from_pretrained(MODEL_DIR, dtype=torch.bfloat16).eval()
    out16 = model_bf16(torch.from_numpy(ids), torch.from_numpy(mask)).last_hidden_state.float().numpy()
    attn = model.encoder.block[0].layer[0].SelfAttention
    offsets = torch.arange(-1100, 1101)
    buckets = attn._relative_position_bucket(offsets).numpy()
  np.savez_compressed(os.path.join(FIXTURES, "umt5_tiny_io.npz"), input_ids=ids.astype(np.int32),
                      attention_mask=mask.astype(np.int32), last_hidden_state_fp32=out32,
                      last_hidden_state_bf16=out16, bucket_offsets=offsets.numpy().astype(np.int32),
                      buckets=buckets.astype(np.int32))

  # Prompt path: cleaning, tokenisation, and the pipeline's embedding helper (fp32).
  prompts = _prompts(hf_tok)
  cleaned = [helios_pyramid.prompt_clean(p) for p in prompts]
  tok = hf_tok(cleaned, padding="max_length", max_length=MAX_SEQ, truncation=True, add_special_tokens=True,
               return_attention_mask=True, return_tensors="np")
  untruncated = [len(hf_tok(c, add_special_tokens=True).input_ids) for c in cleaned]
  fake_pipe = types.SimpleNamespace(text_encoder=model, tokenizer=hf_tok, _execution_device=torch.device("cpu"))
  with torch.no_grad():
    embeds, emb_mask = helios_pyramid.HeliosPyramidPipeline._get_t5_prompt_embeds(
        fake_pipe, prompt=prompts, num_videos_per_prompt=1, max_sequence_length=MAX_SEQ,
        device=torch.device("cpu"), dtype=torch.float32)
  with open(os.path.join(FIXTURES, "umt5_prompts.json"), "w", encoding="utf-8") as f:
    json.dump({"max_sequence_length": MAX_SEQ, "prompts": prompts, "cleaned": cleaned,
               "ftfy_changes": [ftfy.fix_text(p) != p for p in prompts],
               "untruncated_lengths": untruncated, "ftfy_version": ftfy.__version__,
               "transformers_tokenizer_ids": [row[:m.sum()].tolist() for row, m in
                                              zip(tok["input_ids"], tok["attention_mask"])]},
              f, indent=1, ensure_ascii=False)
  np.savez_compressed(os.path.join(FIXTURES, "umt5_prompts.npz"), input_ids=tok["input_ids"].astype(np.int32),
                      attention_mask=tok["attention_mask"].astype(np.int32), prompt_embeds=embeds.numpy(),
                      embeds_mask=emb_mask.numpy())
  print("wrote", FIXTURES, file=sys.stderr)


if __name__ == "__main__":
  main()
