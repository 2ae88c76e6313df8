"""Writing a diffusers pipeline folder: ``model_index.json`` plus one subfolder per component.

The pipeline classes call :func:`save_pipeline_folder` from their ``save_pretrained``; every component writes
its own subfolder through its own ``save_pretrained(subfolder)`` (transformer, VAE, text encoder, scheduler), so
this module imports no model code. The layout is the one ``DiffusionPipeline.from_pretrained`` reads::

    model_index.json            {"_class_name": ..., "<name>": ["<library>", "<class>"], ...}
    transformer/  vae/  text_encoder/  scheduler/  tokenizer/
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

from helios_jax.errors import InputError

# The library that defines each component class in diffusers' model_index.json ("diffusers" otherwise).
_LIBRARIES = {"UMT5EncoderModel": "transformers", "T5Tokenizer": "transformers", "T5TokenizerFast": "transformers",
              "AutoTokenizer": "transformers"}
DIFFUSERS_VERSION = "0.42.1"  # the reference version whose layout this writes


def save_pipeline_folder(folder: str, pipeline_class: str, components: Mapping[str, Any],
                         tokenizer_folder: str | None = None, extra: Mapping[str, Any] | None = None,
                         **save_kwargs) -> str:
  """Writes ``folder/model_index.json`` and ``folder/<name>/`` for every component.

  Args:
    pipeline_class: the diffusers class name (``"HeliosPipeline"`` or ``"HeliosPyramidPipeline"``).
    components: name -> object with ``save_pretrained(subfolder, ...)`` (``None`` entries are written as
      ``[null, null]``, as diffusers does for a missing optional component).
    tokenizer_folder: a tokenizer folder to copy as ``tokenizer/`` (our tokenizer is read-only); listed as
      ``["transformers", <its tokenizer_class or "T5TokenizerFast">]``.
    extra: more ``model_index.json`` keys (pipeline flags such as ``is_distilled``, ``helios_jax_defaults``).
    save_kwargs: passed to the model components' ``save_pretrained`` (``dtype``, ``max_shard_size``).
  Returns:
    The path of ``model_index.json``.
  Raises:
    InputError: a component without ``save_pretrained``, or a missing tokenizer folder.
  """
  os.makedirs(folder, exist_ok=True)
  index: dict[str, Any] = {"_class_name": pipeline_class, "_diffusers_version": DIFFUSERS_VERSION}
  for name, component in components.items():
    if component is None:
      index[name] = [None, None]
      continue
    save = getattr(component, "save_pretrained", None)
    if save is None:
      raise InputError(f"pipeline component {name!r} ({type(component).__name__}) has no save_pretrained")
    sub = os.path.join(folder, name)
    if name == "scheduler":
      save(sub)
    else:
      save(sub, **save_kwargs)
    cls = type(component).__name__
    index[name] = [_LIBRARIES.get(cls, "diffusers"), cls]
  if tokenizer_folder is not None:
    if not os.path.isdir(tokenizer_folder):
      raise InputError(f"tokenizer folder not found: {tokenizer_folder}")
    target = os.path.join(folder, "tokenizer")
    if os.path.realpath(target) != os.path.realpath(tokenizer_folder):
      shutil.copytree(tokenizer_folder, target, dirs_exist_ok=True)
    tok_class = "T5TokenizerFast"
    config_path = os.path.join(tokenizer_folder, "tokenizer_config.json")
    if os.path.isfile(config_path):
      with open(config_path, encoding="utf-8") as f:
        tok_class = json.load(f).get("tokenizer_class", tok_class) or tok_class
    index["tokenizer"] = ["transformers", tok_class]
  index.update(extra or {})
  path = os.path.join(folder, "model_index.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(index, f, indent=2, sort_keys=True)
  return path
