"""helios_jax.pipelines."""
