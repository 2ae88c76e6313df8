"""helios-jax: Helios (real-time long video generation) in JAX/Flax.

The public names mirror diffusers so users coming from there find them where they expect; they are imported
lazily so that ``import helios_jax`` stays cheap and a missing optional dependency only matters when used.

Importing the package changes nothing in its host process (no environment variables, no logging filters): the
XLA flags and the GPU-plugin log filter are applied by the entry points through :mod:`helios_jax.runtime`
(``configure_xla()``, ``quiet_gpu_plugin_errors()``), or by a user calling them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"


_EXPORTS = {
    "HeliosTransformer3DModel": "helios_jax.models.transformer",
    "HeliosTransformerConfig": "helios_jax.models.transformer",
    "HeliosScheduler": "helios_jax.schedulers.helios",
    "HeliosDMDScheduler": "helios_jax.schedulers.dmd",
    "HeliosPipeline": "helios_jax.pipelines.plain",
    "HeliosPyramidPipeline": "helios_jax.pipelines.pyramid",
    "PromptSchedule": "helios_jax.pipelines.prompts",
    "HeliosStream": "helios_jax.pipelines.stream",
    "AutoencoderKLWan": "helios_jax.models.vae",
    "UMT5EncoderModel": "helios_jax.models.umt5",
    "HeliosError": "helios_jax.errors",
    "CheckpointError": "helios_jax.errors",
    "InputError": "helios_jax.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'helios_jax' has no attribute {name!r}")
