"""pytest configuration shared by the whole suite.

* The repository root is importable (pytest puts this file's folder on sys.path), so `helios_jax` resolves
  without installing the package.
* The suite checks correctness in float32 on the CPU: unless the caller chose a platform, JAX is pinned to the CPU
  (on a GPU machine XLA's default TF32 matmuls would blur fp32 parity, and CI has no GPU).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
