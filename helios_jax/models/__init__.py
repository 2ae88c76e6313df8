"""helios_jax.models."""
