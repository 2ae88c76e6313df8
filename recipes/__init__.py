"""Recipes built on the helios_jax library (which never imports them); run from the repository root."""
