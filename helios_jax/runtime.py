"""Process settings the entry points apply explicitly (``import helios_jax`` changes nothing of its host process).

* :func:`configure_xla`: the GPU compiler flags helios-jax is measured with (docs/benchmarks.md), added to
  ``XLA_FLAGS``. XLA reads that variable once, when JAX starts its backends, so this must run before the first
  computation (or ``jax.devices()``); called later it raises :class:`~helios_jax.errors.RuntimeSetupError`.
* :func:`quiet_gpu_plugin_errors`: turns the traceback that jax[cuda12] logs when its CUDA plugin fails to start
  (then runs on the CPU) into one INFO line.

``sample.py``, ``serve.py``, ``train.py`` and ``benchmarks/fps.py`` call both at start-up.
"""

from __future__ import annotations

import logging
import os
import sys

from helios_jax.errors import RuntimeSetupError

# name -> value, each measured on an H100 (docs/benchmarks.md):
# * xla_gpu_enable_triton_gemm=false: no Triton GEMM kernels (the GPU path is XLA + cuBLAS + cuDNN only); same
#   speed, faster compiles.
# * xla_gpu_force_conv_nhwc=true: channels-last convolutions; removes cuDNN's NCHW<->NHWC conversion kernels from
#   the VAE decode (0.239 -> 0.171 s per 33-frame chunk).
DEFAULT_XLA_FLAGS = {"xla_gpu_enable_triton_gemm": "false", "xla_gpu_force_conv_nhwc": "true"}
_PLUGIN_LOGGER = "jax._src.xla_bridge"


def _backends_started() -> bool:
  """True once JAX has created its backends (after which XLA_FLAGS is no longer read)."""
  bridge = sys.modules.get("jax._src.xla_bridge")
  return bool(bridge is not None and getattr(bridge, "_backends", None))


def configure_xla(flags: dict[str, str] | None = None, environ=None) -> str:
  """Adds ``--name=value`` to ``XLA_FLAGS`` for each flag the variable does not already name (the user's own
  setting wins). Idempotent. ``flags`` defaults to :data:`DEFAULT_XLA_FLAGS`.

  Returns:
    The resulting ``XLA_FLAGS``.
  Raises:
    RuntimeSetupError: JAX's backends have already started, so new flags would be silently ignored.
  """
  environ = os.environ if environ is None else environ
  flags = DEFAULT_XLA_FLAGS if flags is None else flags
  current = environ.get("XLA_FLAGS", "")
  missing = {k: v for k, v in flags.items() if f"--{k}=" not in current and f"--{k} " not in f"{current} "}
  if not missing:
    return current
  if _backends_started():
    raise RuntimeSetupError(
        "configure_xla must run before JAX starts its backends (before the first computation or jax.devices()): "
        "XLA has already read XLA_FLAGS, so " + ", ".join(f"--{k}" for k in missing) + " would have no effect")
  value = " ".join([current.strip()] + [f"--{k}={v}" for k, v in missing.items()]).strip()
  environ["XLA_FLAGS"] = value
  return value


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


def quiet_gpu_plugin_errors() -> None:
  """Installs the filter on JAX's backend logger (once; calling again changes nothing)."""
  logger = logging.getLogger(_PLUGIN_LOGGER)
  if not any(isinstance(f, _ShortPluginError) for f in logger.filters):
    logger.addFilter(_ShortPluginError())
