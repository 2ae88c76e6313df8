"""helios-jax: Helios (real-time long video generation) in JAX/Flax.

The public names mirror diffusers so users coming from there find them where they expect; they are imported
lazily so that ``import helios_jax`` stays cheap and a missing optional dependency only matters when used.
"""

from __future__ import annotations

import importlib
import logging
import os

__version__ = "0.1.0"


def _default_xla_flags() -> None:
  """GPU compiler defaults, measured on an H100 (docs/benchmarks.md); a user's own setting in XLA_FLAGS wins.

  * ``--xla_gpu_enable_triton_gemm=false``: no Triton GEMM kernels (the GPU path is XLA + cuBLAS + cuDNN only);
    same speed, faster compiles.
  * ``--xla_gpu_force_conv_nhwc=true``: channels-last convolutions; removes cuDNN's NCHW<->NHWC conversion kernels
    from the VAE decode (0.239 -> 0.171 s per 33-frame chunk).
  Must run before JAX initialises its backends (importing jax alone does not).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  for name, value in (("xla_gpu_enable_triton_gemm", "false"), ("xla_gpu_force_conv_nhwc", "true")):
    if name not in flags:
      flags = f"{flags} --{name}={value}".strip()
  os.environ["XLA_FLAGS"] = flags


_default_xla_flags()


class _ShortPluginError(logging.Filter):
  """jax[cuda12] on a machine without a usable GPU logs a full traceback at error level when its CUDA plugin fails
  to start, then runs on the CPU. Keep the information, drop the traceback and the alarm: one INFO line (shown
  only when the user asks for INFO logs), since running on the CPU there is the expected outcome."""

  def filter(self, record: logging.LogRecord) -> bool:
    if str(record.msg).startswith("Jax plugin configuration error") and record.exc_info:
      err = record.exc_info[1]
      record.msg = "JAX GPU plugin unavailable (%s: %s); running on the CPU"
      record.args = (type(err).__name__, str(err).splitlines()[0] if str(err) else "")
      record.exc_info = None
      record.levelno, record.levelname = logging.INFO, "INFO"
      return logging.getLogger(record.name).isEnabledFor(logging.INFO)
    return True


logging.getLogger("jax._src.xla_bridge").addFilter(_ShortPluginError())

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
