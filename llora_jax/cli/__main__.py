"""``python -m llora_jax.cli``: the same as the ``llora`` command."""

from llora_jax.cli.main import entry

entry()
