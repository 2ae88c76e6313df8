"""helios_jax.training."""
