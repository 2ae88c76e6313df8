"""Package-level behaviour: the CUDA-plugin failure message on machines without a usable GPU."""

from __future__ import annotations

import logging
import sys

import helios_jax


def test_plugin_failure_is_one_line():
  try:
    raise RuntimeError("operation cuInit(0) failed: Unknown CUDA error 303\nmore detail")
  except RuntimeError:
    rec = logging.LogRecord("jax._src.xla_bridge", logging.WARNING, __file__, 1,
                            "Jax plugin configuration error: Exception when calling %s.initialize()",
                            ("jax_plugins.xla_cuda12",), sys.exc_info())
  assert helios_jax._ShortPluginError().filter(rec)
  assert rec.exc_info is None
  assert rec.getMessage() == ("JAX GPU plugin unavailable (RuntimeError: operation cuInit(0) failed: Unknown CUDA "
                              "error 303); running on the CPU")
  other = logging.LogRecord("jax._src.xla_bridge", logging.WARNING, __file__, 1, "something else", (), None)
  assert helios_jax._ShortPluginError().filter(other) and other.getMessage() == "something else"
