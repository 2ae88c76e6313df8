"""Makes the repository root importable for the tests (so `helios_jax` resolves without installing)."""
