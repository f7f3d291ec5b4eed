"""Command-line tools: `python -m dig_jax.tools.<name> --help`."""
