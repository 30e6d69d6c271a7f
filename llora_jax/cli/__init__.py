"""Thin command-line entry points (``llora …`` / ``python -m llora_jax.cli``)."""
