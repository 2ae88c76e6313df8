"""Package-level behaviour: importing the package changes nothing in its process; the explicit runtime settings
(XLA flags, the CUDA-plugin failure message on machines without a usable GPU); a CPU install that pulls no CUDA
wheels."""

from __future__ import annotations

import logging
import json
import os
import subprocess
import sys

import pytest

from helios_jax import runtime
from helios_jax.errors import HeliosError, RuntimeSetupError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    assert not runtime._ShortPluginError().filter(rec)
    logger.setLevel(logging.INFO)  # asked for: shown as one INFO line
    assert runtime._ShortPluginError().filter(rec)
  finally:
    logger.setLevel(level)
  assert rec.exc_info is None and rec.levelno == logging.INFO
  assert rec.getMessage() == ("JAX GPU plugin unavailable (RuntimeError: operation cuInit(0) failed: Unknown CUDA "
                              "error 303); running on the CPU")
  other = logging.LogRecord("jax._src.xla_bridge", logging.WARNING, __file__, 1, "something else", (), None)
  assert runtime._ShortPluginError().filter(other) and other.getMessage() == "something else"


def test_cpu_requirements_pull_no_cuda():
  """requirements.txt (the README's install) names no CUDA package; requirements-gpu.txt adds JAX's plugin."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  lines = [ln.split("#")[0].strip() for ln in open(os.path.join(root, "requirements.txt"), encoding="utf-8")]
  reqs = [ln for ln in lines if ln]
  assert reqs and not [r for r in reqs if "cuda" in r.lower() or "nvidia" in r.lower()]
  gpu = open(os.path.join(root, "requirements-gpu.txt"), encoding="utf-8").read()
  assert "-r requirements.txt" in gpu and "jax[cuda12]" in gpu


# jax itself sets a few variables on import (TF_CPP_MIN_LOG_LEVEL, TPU_SKIP_MDS_QUERY): it is imported before the
# first snapshot, so the comparison sees only what helios_jax does.
_SNAPSHOT = """
import json, logging, os, sys
import jax, flax.nnx
def snap():
  loggers = {n: [type(f).__name__ for f in l.filters] for n, l in logging.Logger.manager.loggerDict.items()
             if isinstance(l, logging.Logger)}
  return {"env": dict(os.environ), "root": [type(f).__name__ for f in logging.getLogger().filters],
          "root_handlers": len(logging.getLogger().handlers), "root_level": logging.getLogger().level,
          "filters": {n: f for n, f in loggers.items() if f}}
before = snap()
import helios_jax
for name in ("HeliosScheduler", "HeliosTransformer3DModel", "AutoencoderKLWan", "HeliosPyramidPipeline"):
  getattr(helios_jax, name)
after = snap()
print(json.dumps({"before": before, "after": after, "jax": "jax" in sys.modules}))
"""


def test_import_leaves_environment_and_logging_alone():
  """A fresh interpreter: importing helios_jax (and its main classes) changes no environment variable, no logger
  filter, handler or level (beyond what importing jax does)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", _SNAPSHOT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["jax"]  # the classes were really imported (so their modules' import-time code ran)
  assert result["after"]["env"] == result["before"]["env"]
  assert "XLA_FLAGS" not in result["after"]["env"]
  for key in ("root", "root_handlers", "root_level", "filters"):
    assert result["after"][key] == result["before"][key], key


def test_configure_xla_adds_missing_flags_once_and_keeps_the_users(monkeypatch):
  monkeypatch.setattr(runtime, "_backends_started", lambda: False)  # earlier tests in this process started JAX
  environ = {"XLA_FLAGS": "--xla_gpu_force_conv_nhwc=false --xla_dump_to=/tmp/x"}
  first = runtime.configure_xla(environ=environ)
  assert first == "--xla_gpu_force_conv_nhwc=false --xla_dump_to=/tmp/x --xla_gpu_enable_triton_gemm=false"
  assert runtime.configure_xla(environ=environ) == first == environ["XLA_FLAGS"]  # idempotent
  empty = {}
  assert runtime.configure_xla(environ=empty) == ("--xla_gpu_enable_triton_gemm=false "
                                                  "--xla_gpu_force_conv_nhwc=true")


def test_configure_xla_after_the_backend_started_says_so():
  import jax  # pylint: disable=import-outside-toplevel
  jax.devices()  # the backends start here
  with pytest.raises(RuntimeSetupError, match="before JAX starts its backends") as err:
    runtime.configure_xla(environ={})
  assert isinstance(err.value, HeliosError)
  # flags already present need no change, so the late call is harmless then
  done = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false --xla_gpu_force_conv_nhwc=true"}
  assert runtime.configure_xla(environ=done) == done["XLA_FLAGS"]


def test_configure_xla_in_a_fresh_process_reaches_the_backend():
  code = ("import os\nfrom helios_jax import runtime\nruntime.configure_xla()\nruntime.quiet_gpu_plugin_errors()\n"
          "runtime.quiet_gpu_plugin_errors()\nimport logging, jax\njax.devices()\n"
          "print(os.environ['XLA_FLAGS'])\n"
          "print(len(logging.getLogger('jax._src.xla_bridge').filters))\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300, check=True).stdout.split("\n")
  assert out[0] == "--xla_gpu_enable_triton_gemm=false --xla_gpu_force_conv_nhwc=true"
  assert out[1] == "1"  # installed once however often it is called
