"""Benchmarks of llora-jax (see benchmarks/NOTES.md; run ``python -m benchmarks.run``)."""
