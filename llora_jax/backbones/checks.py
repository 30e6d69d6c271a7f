"""Backbone errors a user can cause, and the check that a tokenizer is the model's own.

Every error raised by ``hf`` for a checkpoint the user points at (missing, truncated,
another architecture, a missing optional package) is a ``UserError``, and keeps the
builtin base it had (``FileNotFoundError``, ``ValueError``, ...) for existing callers.

transformers 5 does not fail on a checkpoint directory without tokenizer files: it
builds a vocabulary of 4-5 special tokens, every word becomes unknown, and training
runs on it without a word. A tokenizer copied from another model indexes past (or far
short of) the embedding table. Both are refused here.
"""

from __future__ import annotations

import pathlib
from typing import Any

from llora_jax.errors import UserError

__all__ = [
    "BackboneError",
    "BackboneNotADirectory",
    "BackboneNotFound",
    "MIN_VOCAB_COVERAGE",
    "MissingPackage",
    "TOKENIZER_FILES",
    "TokenizerError",
    "check_tokenizer_files",
    "check_vocab",
    "embedding_rows",
]

# Files from which transformers can build a real tokenizer (vocab.json needs merges.txt).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "vocab.json")
# A tokenizer must cover at least this share of the embedding table (T5 pads its table:
# 32100 tokens for 32128 rows; the fallback vocabulary covers almost nothing).
MIN_VOCAB_COVERAGE = 0.9


class BackboneError(UserError, ValueError):
    """A checkpoint that cannot be used: corrupt, truncated, another architecture."""


class BackboneNotFound(UserError, FileNotFoundError):
    """A checkpoint directory, file or hub id that does not exist or cannot be fetched."""


class BackboneNotADirectory(BackboneNotFound, NotADirectoryError):
    """A file given where a checkpoint directory is expected."""


class MissingPackage(UserError, ModuleNotFoundError):
    """An optional package needed for this checkpoint is not installed."""


class TokenizerError(UserError, FileNotFoundError):
    """A text backbone whose tokenizer is missing or does not fit its embedding table."""


def check_tokenizer_files(path: pathlib.Path) -> None:
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise TokenizerError(
            f"no tokenizer files in {path} (one of {', '.join(TOKENIZER_FILES)}); copy the "
            "tokenizer of the model into that directory (e.g. from the hub repository it "
            "came from)"
        )


def embedding_rows(config: Any) -> int | None:
    """Rows of the token-embedding table of an HF config (CLIP: its text tower's)."""
    text = getattr(config, "text_config", None) or config
    return getattr(text, "vocab_size", None)


def check_vocab(path: pathlib.Path, tokens: int, rows: int | None) -> None:
    """Refuse ``tokens`` > ``rows`` and ``tokens`` < ``MIN_VOCAB_COVERAGE`` x ``rows``."""
    if rows is None:
        return
    if tokens > rows:
        raise TokenizerError(
            f"the tokenizer in {path} has {tokens} tokens but the embedding table has {rows} "
            "rows: ids above it would index past the table; the tokenizer belongs to another "
            "model"
        )
    if tokens < MIN_VOCAB_COVERAGE * rows:
        raise TokenizerError(
            f"the tokenizer in {path} has {tokens} tokens for an embedding table of {rows} "
            "rows: it is not this model's tokenizer (transformers builds a tiny vocabulary "
            "when tokenizer files are missing or unreadable); copy the model's tokenizer files "
            "there"
        )
