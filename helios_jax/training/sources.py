"""Where a run's inputs come from: the clip source named by ``config.data.source`` and the negative prompt
embeddings of the distillation stages.

``data.source`` is one of the library's own sources (``"synthetic"``, ``"tfds"``), a name registered with
:func:`register_source`, or an import path ``"package.module:factory"``; ``factory(config.data)`` returns the
source (a sequence of clip dicts, as :class:`helios_jax.training.synthetic.SyntheticClips`). This keeps the library
free of any recipe: the demo's config (``configs/demo_base.py``) registers ``"demo"`` as the import path
``"recipes.demo.demo:source"`` when it is loaded, so its runs keep ``data.source = "demo"`` (and old demo runs
still resume), the recipe is imported only when the source is built, and the library never names it.
"""

from __future__ import annotations

import importlib
import os

import numpy as np

from helios_jax.errors import InputError
from helios_jax.training.synthetic import SyntheticClips

BUILT_IN = ("synthetic", "tfds")
_REGISTRY: dict = {}  # name -> factory or "package.module:factory"


def register_source(name: str, factory) -> None:
  """Makes ``data.source = name`` build ``factory(config.data)``; ``factory`` is a callable or an import path
  ``"package.module:factory"`` (imported only when a source is built). Registering a name again replaces it."""
  if name in BUILT_IN:
    raise InputError(f"data.source {name!r} is built in and cannot be registered again")
  _REGISTRY[name] = factory


def load_factory(path: str):
  """The object named by ``"package.module:attribute"``; a bad path is one :class:`InputError`."""
  module_name, _, attr = path.partition(":")
  if not module_name or not attr:
    names = ", ".join(map(repr, sorted(_REGISTRY))) or "none"
    raise InputError(f"data.source {path!r} is not {', '.join(map(repr, BUILT_IN))}, a registered name ({names}) "
                     "or an import path 'package.module:factory'")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise InputError(f"data.source {path!r}: cannot import {module_name} ({e}); run from the repository root or "
                     "install the package that holds it") from e
  if not hasattr(module, attr):
    raise InputError(f"data.source {path!r}: {module_name} has no attribute {attr!r}")
  return getattr(module, attr)


def make_source(config):
  """The clip source of ``config.data``: ``synthetic``, a prepared ``tfds`` dataset, or ``factory(config.data)``
  of a registered name or an import path (module docstring)."""
  d = config.data
  if d.source == "synthetic":
    return SyntheticClips(num_clips=d.num_clips, num_chunks=d.num_chunks, channels=d.channels, height=d.height,
                          width=d.width, text_len=d.text_len, text_dim=d.text_dim, seed=d.seed)
  if d.source == "tfds":
    from helios_jax.training import prepare_data  # optional dependency (tensorflow-datasets)
    return prepare_data.open_source(d.data_dir, d.name)
  factory = _REGISTRY.get(d.source, d.source)
  if d.source == "demo" and d.source not in _REGISTRY:
    raise InputError("data.source 'demo' is the demo recipe's and is registered by configs/demo_base.py; load that "
                     "config (or call helios_jax.training.sources.register_source('demo', 'recipes.demo.demo:source'))")
  if isinstance(factory, str):
    factory = load_factory(factory)
  return factory(d)


def negative_embeds(config) -> np.ndarray:
  """(S, D) float32 negative-prompt embeddings (``dmd.negative_prompt_embeds`` .npy, or zeros)."""
  path = config.dmd.negative_prompt_embeds
  if not path:
    return np.zeros((int(config.data.text_len), int(config.data.text_dim)), np.float32)
  if not os.path.exists(path):
    raise InputError(f"dmd.negative_prompt_embeds {path} does not exist")
  arr = np.load(path).astype(np.float32)
  return arr[0] if arr.ndim == 3 else arr
