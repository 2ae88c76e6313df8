"""JAX's persistent compilation cache, as the entry points (sample.py, serve.py) switch it on.

A later run with the same shapes loads its compiled programs from disk instead of compiling them again
(docs/benchmarks.md measures it on the demo). Off for a library import: only the entry points call
:func:`enable_compile_cache`.
"""

from __future__ import annotations

import os
import sys

ENV_VAR = "HELIOS_JAX_COMPILE_CACHE"  # a folder, or "none"
MIN_COMPILE_SECONDS = 0.5  # programs that compile faster than this are not worth a file


def default_cache_dir() -> str:
  """``$XDG_CACHE_HOME/helios_jax/xla`` (``~/.cache/helios_jax/xla`` by default)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "helios_jax", "xla")


def enable_compile_cache(choice: str | None) -> str | None:
  """Points JAX's persistent compilation cache at ``choice`` (default: ``$HELIOS_JAX_COMPILE_CACHE``, else
  ``$JAX_COMPILATION_CACHE_DIR`` when set, else :func:`default_cache_dir`; ``"none"`` turns it off). Returns the
  folder used, None when off. A folder that cannot be created is a warning on stderr, not an error: the run
  compiles as before."""
  choice = choice or os.environ.get(ENV_VAR) or ""
  if choice.lower() == "none":
    return None
  if not choice and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]  # JAX reads it itself
  path = os.path.abspath(os.path.expanduser(choice or default_cache_dir()))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    print(f"warning: compilation cache {path} unusable ({e.strerror}); compiling without it", file=sys.stderr)
    return None
  import jax
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  return path
