"""helios_jax.io."""
