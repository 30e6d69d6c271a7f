"""Tokenizers of text backbones, refused when they cannot be right for the weights."""

from __future__ import annotations

import os
import pathlib
from typing import Any

from llora_jax.backbones import hf
from llora_jax.backbones.checks import (
    TokenizerError,
    check_tokenizer_files,
    check_vocab,
    embedding_rows,
)


def needs_tokenizer(path: str | os.PathLike) -> bool:
    """Whether the checkpoint at ``path`` reads text (every supported type but CLIP vision)."""
    return hf.raw_model_type(pathlib.Path(path)) != "clip_vision_model"


def load_tokenizer(source: str | os.PathLike) -> Any:
    """``transformers.AutoTokenizer`` from a checkpoint directory, alias or hub id.

    Refuses (``TokenizerError``) a directory without tokenizer files and a tokenizer whose
    vocabulary does not fit the embedding table (``checks``): both would train on
    wrong token ids without a word.
    """
    import transformers  # transformers is slow to import; tokenizers and configs only

    path = hf.resolve_source(source)
    check_tokenizer_files(path)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise TokenizerError(
            f"no usable tokenizer files in {path} (tokenizer.json, vocab.txt, spiece.model, "
            f"vocab.json + merges.txt): {err}"
        ) from err
    if (path / "config.json").is_file():
        check_vocab(path, len(tok), embedding_rows(hf.load_hf_config(path)))
    return tok
