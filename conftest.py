"""pytest configuration shared by the whole suite.

* The repository root is importable (pytest puts this file's folder on sys.path), so `helios_jax` resolves
  without installing the package.
* The suite checks correctness in float32 on the CPU: unless the caller chose a platform, JAX is pinned to the CPU
  (on a GPU machine XLA's default TF32 matmuls would blur fp32 parity, and CI has no GPU).
* sample.py's persistent compilation cache (in ~/.cache by default) is off unless a test asks for one.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# sample.py keeps a persistent compilation cache in ~/.cache by default; tests that want one pass --compile-cache
os.environ.setdefault("HELIOS_JAX_COMPILE_CACHE", "none")
