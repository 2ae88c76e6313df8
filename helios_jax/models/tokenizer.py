"""UMT5 tokenizer and the prompt path of the Helios pipelines, without torch or transformers.

The Helios (and Wan) checkpoints ship a ``tokenizer/`` folder holding ``spiece.model`` (SentencePiece),
``tokenizer.json`` (the `tokenizers` serialisation of the same unigram model), ``tokenizer_config.json`` and
``special_tokens_map.json``. The reference pipelines load it with transformers' ``T5TokenizerFast`` and, per prompt:

1. clean the text (:func:`prompt_clean`): ``ftfy.fix_text``, ``html.unescape`` twice, strip, then collapse every
   whitespace run to one space;
2. tokenise with the ``</s>`` (id 1) suffix, truncating to ``max_sequence_length`` (512) tokens including ``</s>``
   and right-padding with ``<pad>`` (id 0);
3. run the encoder with the attention mask and zero every row past the prompt's real tokens (:func:`encode_prompt`).

transformers >= 5 (the reference environment) does not use ``tokenizer.json`` verbatim for ``T5Tokenizer``: it
keeps the vocabulary and the SentencePiece ``Precompiled`` normaliser of the file but rebuilds the rest — the
pre-tokeniser becomes whitespace-split + Metaspace, multiple-space collapsing is dropped, and the unigram model's
unknown-token id is fixed at **2** (T5's layout) although UMT5's vocabulary has ``<s>`` at 2 and ``<unk>`` at 3. So
under transformers 5 a character that the vocabulary lacks becomes id 2. :func:`load_tokenizer` reproduces that by
default (``compat="transformers"``); ``compat="file"`` uses ``tokenizer.json`` exactly as written (the transformers 4
behaviour, unknown -> 3).

Without ``tokenizer.json`` the folder's ``spiece.model`` is used through ``sentencepiece``. That backend differs from
the transformers tokenizer for characters outside the vocabulary (``<unk>``/byte pieces instead of id 2) and does not
treat literal special-token strings such as ``"</s>"`` in the text as single tokens; otherwise the ids agree.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
from typing import Any, Callable, Literal, NamedTuple, Sequence

import numpy as np

from helios_jax.errors import CheckpointError, InputError

logger = logging.getLogger(__name__)

try:  # optional, as in the reference (which, however, fails on any prompt without it)
  import ftfy as _ftfy
except ImportError:  # pragma: no cover - depends on the environment
  _ftfy = None

DEFAULT_MAX_SEQUENCE_LENGTH = 512
PAD_ID = 0
EOS_ID = 1
# transformers' T5Tokenizer (>= 5) builds its unigram model with this unknown id whatever the vocabulary says.
_TRANSFORMERS_T5_UNK_ID = 2

# The whitespace class of the `regex` module's `\s`, which the reference uses to collapse whitespace: the Unicode
# White_Space characters. Python's `re` `\s` also matches U+001C..U+001F, which the reference leaves alone.
_WHITESPACE_RUN = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_warned_no_ftfy = False


# ----------------------------------------------------------------------------------------------------------------
# Prompt cleaning
# ----------------------------------------------------------------------------------------------------------------


def basic_clean(text: str) -> str:
  """``ftfy.fix_text`` (when installed), HTML-unescape twice, strip."""
  global _warned_no_ftfy
  if _ftfy is not None:
    text = _ftfy.fix_text(text)
  elif not _warned_no_ftfy:
    _warned_no_ftfy = True
    logger.warning("ftfy is not installed: prompts are cleaned without ftfy.fix_text (the reference pipeline "
                   "requires ftfy; install it for identical cleaning of mojibake, curly quotes and control "
                   "characters)")
  text = html.unescape(html.unescape(text))
  return text.strip()


def whitespace_clean(text: str) -> str:
  """Collapses every run of Unicode whitespace to one space and strips the ends."""
  return _WHITESPACE_RUN.sub(" ", text).strip()


def prompt_clean(text: str) -> str:
  """The reference's prompt cleaning: :func:`basic_clean` then :func:`whitespace_clean`."""
  return whitespace_clean(basic_clean(text))


def has_ftfy() -> bool:
  """Whether ``ftfy`` is importable (prompt cleaning then matches the reference exactly)."""
  return _ftfy is not None


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------


class TokenizedPrompts(NamedTuple):
  """Padded token ids of a batch of prompts.

  Attributes:
    input_ids: (B, L) int32, ``</s>``-terminated ids right-padded with ``pad_id``.
    attention_mask: (B, L) int32, 1 on real tokens (including ``</s>``), 0 on padding.
    truncated: per prompt, whether tokens were cut to fit ``L``.
  """

  input_ids: np.ndarray
  attention_mask: np.ndarray
  truncated: list[bool]


class UMT5Tokenizer:
  """Tokenises prompts the way the Helios pipelines call ``T5TokenizerFast``.

  Args:
    encode_batch: maps a list of texts to lists of content ids (no special tokens added).
    decode: maps ids back to text (used in warnings).
    pad_id: id used for padding (``<pad>``).
    eos_id: id appended to every prompt (``</s>``).
    vocab_size: number of ids the tokenizer can produce.
    backend: a short description of the backend ("tokenizers" or "sentencepiece").
  """

  def __init__(self, encode_batch: Callable[[list[str]], list[list[int]]], decode: Callable[[list[int]], str], *,
               pad_id: int = PAD_ID, eos_id: int = EOS_ID, vocab_size: int, backend: str):
    self._encode_batch = encode_batch
    self._decode = decode
    self.pad_id = pad_id
    self.eos_id = eos_id
    self.vocab_size = vocab_size
    self.backend = backend

  def encode(self, text: str) -> list[int]:
    """Ids of one text with the trailing ``</s>``, untruncated."""
    return self._encode_batch([text])[0] + [self.eos_id]

  def __call__(self, texts: str | Sequence[str], max_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
               warn_truncation: bool = True) -> TokenizedPrompts:
    """Tokenises, truncates and pads like ``tokenizer(texts, padding="max_length", truncation=True, ...)``.

    A prompt longer than ``max_length`` tokens keeps its first ``max_length - 1`` tokens followed by ``</s>``
    (truncation leaves room for the special token, as transformers does), and a warning is logged.

    Args:
      texts: one prompt or a list of B prompts (already cleaned; see :func:`prompt_clean`).
      max_length: L, the padded length.
      warn_truncation: log a warning naming the cut-off text of each truncated prompt.

    Returns:
      :class:`TokenizedPrompts` with (B, L) int32 arrays.
    """
    if isinstance(texts, str):
      texts = [texts]
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
      raise InputError("prompts must be strings")
    if max_length < 1:
      raise InputError(f"max_length must be at least 1, got {max_length}")
    ids = np.full((len(texts), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), max_length), np.int32)
    truncated = []
    for b, content in enumerate(self._encode_batch(texts) if texts else []):
      cut = len(content) + 1 > max_length
      if cut:
        kept = content[:max_length - 1]
        if warn_truncation:
          dropped = self.decode(content[max_length - 1:])
          if len(dropped) > 80:
            dropped = dropped[:77] + "..."
          logger.warning("prompt %d has %d tokens (with </s>), more than max_sequence_length=%d: the last %d "
                         "were dropped (%r)", b, len(content) + 1, max_length, len(content) + 1 - max_length,
                         dropped)
        content = kept
      row = list(content) + [self.eos_id]
      ids[b, :len(row)] = row
      mask[b, :len(row)] = 1
      truncated.append(cut)
    return TokenizedPrompts(ids, mask, truncated)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of ``ids`` (special tokens kept)."""
    return self._decode([int(i) for i in ids])


def _precompiled_charsmap(normalizer: dict | None) -> str | None:
  """The base64 SentencePiece charsmap of a tokenizer.json normaliser (plain or inside a Sequence), if any."""
  if not normalizer:
    return None
  parts = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
  for part in parts:
    if part.get("type") == "Precompiled" and part.get("precompiled_charsmap"):
      return part["precompiled_charsmap"]
  return None


def _transformers_compatible_json(spec: dict, path: str) -> dict:
  """Rewrites a T5/UMT5 tokenizer.json so that `tokenizers` encodes like transformers 5's ``T5Tokenizer``.

  Keeps the unigram vocabulary, the Precompiled normaliser and the added tokens; replaces the rest the way
  transformers rebuilds it (see the module docstring).
  """
  model = spec.get("model") or {}
  if model.get("type") != "Unigram":
    raise CheckpointError(f"{path}: expected a Unigram (SentencePiece) tokenizer, found model type "
                          f"{model.get('type')!r}")
  spec = dict(spec)
  spec["model"] = {**model, "unk_id": _TRANSFORMERS_T5_UNK_ID, "byte_fallback": False}
  charsmap = _precompiled_charsmap(spec.get("normalizer"))
  spec["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": charsmap} if charsmap else None
  spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
      {"type": "WhitespaceSplit"},
      {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}]}
  spec["post_processor"] = None  # </s> is appended by UMT5Tokenizer
  spec["truncation"] = None
  spec["padding"] = None
  return spec


def _load_tokenizers_backend(path: str, compat: str) -> UMT5Tokenizer:
  try:
    from tokenizers import Tokenizer
  except ImportError as e:  # pragma: no cover - tokenizers is a runtime requirement
    raise CheckpointError(f"reading {path} needs the 'tokenizers' package: {e}") from None
  try:
    with open(path, encoding="utf-8") as f:
      spec = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read tokenizer file {path}: {e}") from None
  if compat == "transformers":
    spec = _transformers_compatible_json(spec, path)
  try:
    tok = Tokenizer.from_str(json.dumps(spec))
  except Exception as e:  # tokenizers raises a plain Exception for malformed files
    raise CheckpointError(f"cannot load tokenizer file {path}: {e}") from None
  tok.no_truncation()
  tok.no_padding()
  vocab = tok.get_vocab(with_added_tokens=True)
  pad_id = vocab.get("<pad>", PAD_ID)
  eos_id = vocab.get("</s>", EOS_ID)

  def encode_batch(texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

  def decode(ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False)

  return UMT5Tokenizer(encode_batch, decode, pad_id=pad_id, eos_id=eos_id, vocab_size=tok.get_vocab_size(True),
                       backend="tokenizers")


def _load_sentencepiece_backend(path: str) -> UMT5Tokenizer:
  try:
    import sentencepiece as spm
  except ImportError as e:  # pragma: no cover - sentencepiece is a runtime requirement
    raise CheckpointError(f"reading {path} needs the 'sentencepiece' package: {e}") from None
  try:
    sp = spm.SentencePieceProcessor(model_file=path)
  except Exception as e:  # sentencepiece raises RuntimeError/OSError for bad files
    raise CheckpointError(f"cannot load SentencePiece model {path}: {e}") from None
  pad_id = sp.pad_id() if sp.pad_id() >= 0 else PAD_ID
  eos_id = sp.eos_id() if sp.eos_id() >= 0 else EOS_ID

  def encode_batch(texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in sp.encode(texts)]

  def decode(ids: list[int]) -> str:
    return sp.decode(ids)

  return UMT5Tokenizer(encode_batch, decode, pad_id=pad_id, eos_id=eos_id, vocab_size=sp.get_piece_size(),
                       backend="sentencepiece")


def load_tokenizer(folder: str, compat: Literal["transformers", "file"] = "transformers") -> UMT5Tokenizer:
  """Loads a UMT5 tokenizer offline from a checkpoint's ``tokenizer/`` folder (or the checkpoint root).

  ``tokenizer.json`` is preferred (through `tokenizers`); a folder with only ``spiece.model`` uses
  `sentencepiece` (see the module docstring for how that backend differs).

  Args:
    folder: the tokenizer folder, or a pipeline folder that has a ``tokenizer/`` sub-folder.
    compat: ``"transformers"`` (default) encodes like transformers >= 5's ``T5TokenizerFast.from_pretrained``, the
      reference; ``"file"`` uses tokenizer.json as written.

  Raises:
    CheckpointError: the folder or its tokenizer files are missing or unreadable.
  """
  if compat not in ("transformers", "file"):
    raise InputError(f"compat must be 'transformers' or 'file', got {compat!r}")
  if not os.path.isdir(folder):
    raise CheckpointError(f"tokenizer folder not found: {folder}")
  sub = os.path.join(folder, "tokenizer")
  has_files = any(os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "spiece.model"))
  if not has_files and os.path.isdir(sub):
    folder = sub
  tokenizer_json = os.path.join(folder, "tokenizer.json")
  spiece = os.path.join(folder, "spiece.model")
  if os.path.isfile(tokenizer_json):
    return _load_tokenizers_backend(tokenizer_json, compat)
  if os.path.isfile(spiece):
    return _load_sentencepiece_backend(spiece)
  raise CheckpointError(f"no tokenizer in {folder}: expected tokenizer.json or spiece.model")


# ----------------------------------------------------------------------------------------------------------------
# Prompt embeddings
# ----------------------------------------------------------------------------------------------------------------


def tokenize_prompts(tokenizer: UMT5Tokenizer, prompts: str | Sequence[str],
                     max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> TokenizedPrompts:
  """Cleans (:func:`prompt_clean`) and tokenises prompts to (B, max_sequence_length) ids and mask."""
  if isinstance(prompts, str):
    prompts = [prompts]
  prompts = list(prompts)
  if not prompts:
    raise InputError("no prompts given")
  if not all(isinstance(p, str) for p in prompts):
    raise InputError("prompts must be strings")
  return tokenizer([prompt_clean(p) for p in prompts], max_length=max_sequence_length)


def encode_prompt(text_encoder: Any, tokenizer: UMT5Tokenizer, prompts: str | Sequence[str],
                  max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, dtype: Any = None,
                  num_videos_per_prompt: int = 1):
  """Text embeddings as the Helios pipelines' ``_get_t5_prompt_embeds`` produces them.

  Args:
    text_encoder: a :class:`helios_jax.models.umt5.UMT5EncoderModel` (any callable
      ``(input_ids, attention_mask) -> object with .last_hidden_state`` works, unjitted).
    tokenizer: from :func:`load_tokenizer`.
    prompts: one prompt or B prompts (raw; cleaned here).
    max_sequence_length: L, 512 in the pipelines.
    dtype: dtype of the result (default: the encoder's output dtype).
    num_videos_per_prompt: repeats each prompt's embedding consecutively (p0, p0, p1, p1, ...), as the reference.

  Returns:
    (B * num_videos_per_prompt, L, d_model) embeddings whose rows past each prompt's real tokens (its ``</s>``
    included) are exactly zero. The DiT attends to all L rows without a mask.
  """
  import jax.numpy as jnp

  if num_videos_per_prompt < 1:
    raise InputError(f"num_videos_per_prompt must be >= 1, got {num_videos_per_prompt}")
  tokens = tokenize_prompts(tokenizer, prompts, max_sequence_length)
  ids = jnp.asarray(tokens.input_ids)
  mask = jnp.asarray(tokens.attention_mask)
  encode = getattr(text_encoder, "encode_masked", None)
  if encode is not None:
    embeds = encode(ids, mask)
  else:
    embeds = text_encoder(ids, mask).last_hidden_state
    embeds = jnp.where(mask[:, :, None] > 0, embeds, jnp.zeros((), embeds.dtype))
  if dtype is not None:
    embeds = embeds.astype(dtype)
  if num_videos_per_prompt > 1:
    embeds = jnp.repeat(embeds, num_videos_per_prompt, axis=0)
  return embeds
