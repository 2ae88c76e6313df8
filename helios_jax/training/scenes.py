"""Old import path: the demo recipe left the library (issue #23); this module is now ``recipes.demo.scenes``."""

raise ImportError("helios_jax.training.scenes moved to recipes.demo.scenes (the demo recipe, a top-level package next "
                  "to helios_jax: run from the repository root and import recipes.demo.scenes)")
