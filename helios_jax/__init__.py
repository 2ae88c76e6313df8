"""helios-jax: Helios (real-time long video generation) in JAX/Flax.

The public names mirror diffusers so users coming from there find them where they expect; they are imported
lazily so that ``import helios_jax`` stays cheap and a missing optional dependency only matters when used.
"""

from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"


def _triton_free_xla() -> None:
  """Keeps XLA's GPU compiler from emitting Triton GEMM kernels (the GPU path is XLA + cuBLAS + cuDNN only).

  Measured on an H100 (docs/benchmarks.md): the 14B forwards run at the same speed either way and compile faster
  without Triton. Set before JAX initialises its backends; a user's own ``triton_gemm`` setting in XLA_FLAGS wins.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "triton_gemm" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_gpu_enable_triton_gemm=false").strip()


_triton_free_xla()

_EXPORTS = {
    "HeliosTransformer3DModel": "helios_jax.models.transformer",
    "HeliosTransformerConfig": "helios_jax.models.transformer",
    "HeliosScheduler": "helios_jax.schedulers.helios",
    "HeliosDMDScheduler": "helios_jax.schedulers.dmd",
    "HeliosPipeline": "helios_jax.pipelines.plain",
    "HeliosPyramidPipeline": "helios_jax.pipelines.pyramid",
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
