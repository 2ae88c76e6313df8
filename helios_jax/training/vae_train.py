"""Old import path: the demo recipe left the library (issue #23); this module is now ``recipes.demo.vae_train``."""

raise ImportError("helios_jax.training.vae_train moved to recipes.demo.vae_train (the demo recipe, a top-level package next "
                  "to helios_jax: run from the repository root and import recipes.demo.vae_train)")
