"""Package-level behaviour: the CUDA-plugin failure message on machines without a usable GPU; a CPU install that
pulls no CUDA wheels."""

from __future__ import annotations

import logging
import os
import sys

import helios_jax


def test_plugin_failure_is_one_line():
  try:
    raise RuntimeError("operation cuInit(0) failed: Unknown CUDA error 303\nmore detail")
  except RuntimeError:
    rec = logging.LogRecord("jax._src.xla_bridge", logging.WARNING, __file__, 1,
                            "Jax plugin configuration error: Exception when calling %s.initialize()",
                            ("jax_plugins.xla_cuda12",), sys.exc_info())
  logger = logging.getLogger("jax._src.xla_bridge")
  level = logger.level
  try:
    logger.setLevel(logging.WARNING)  # the default: the line is dropped
    assert not helios_jax._ShortPluginError().filter(rec)
    logger.setLevel(logging.INFO)  # asked for: shown as one INFO line
    assert helios_jax._ShortPluginError().filter(rec)
  finally:
    logger.setLevel(level)
  assert rec.exc_info is None and rec.levelno == logging.INFO
  assert rec.getMessage() == ("JAX GPU plugin unavailable (RuntimeError: operation cuInit(0) failed: Unknown CUDA "
                              "error 303); running on the CPU")
  other = logging.LogRecord("jax._src.xla_bridge", logging.WARNING, __file__, 1, "something else", (), None)
  assert helios_jax._ShortPluginError().filter(other) and other.getMessage() == "something else"


def test_cpu_requirements_pull_no_cuda():
  """requirements.txt (the README's install) names no CUDA package; requirements-gpu.txt adds JAX's plugin."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  lines = [ln.split("#")[0].strip() for ln in open(os.path.join(root, "requirements.txt"), encoding="utf-8")]
  reqs = [ln for ln in lines if ln]
  assert reqs and not [r for r in reqs if "cuda" in r.lower() or "nvidia" in r.lower()]
  gpu = open(os.path.join(root, "requirements-gpu.txt"), encoding="utf-8").read()
  assert "-r requirements.txt" in gpu and "jax[cuda12]" in gpu
