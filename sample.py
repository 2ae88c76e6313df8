#!/usr/bin/env python
"""Generate videos with Helios from the command line: ``python sample.py --help``.

The program lives in :mod:`helios_jax.cli.sample` (also ``python -m helios_jax.cli.sample``); this file only runs
it, so ``python sample.py ...`` works from a checkout as documented in README.md and docs/sample.md.
"""

import sys

from helios_jax.cli.sample import DEMO_DIR, main  # noqa: F401  (DEMO_DIR: read by tests/test_demo.py)

if __name__ == "__main__":
  from helios_jax import runtime  # XLA flags (Triton GEMM off, NHWC convolutions): before any computation
  runtime.configure_xla()
  runtime.quiet_gpu_plugin_errors()
  sys.exit(main())
