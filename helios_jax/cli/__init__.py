"""Command-line programs: :mod:`helios_jax.cli.sample` (``python sample.py`` / ``python -m helios_jax.cli.sample``)."""
