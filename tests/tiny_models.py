"""Tiny random HF checkpoints *with tokenizers*, saved to a directory, for end-to-end tests.

Each builder writes what a hub snapshot holds (config.json, model.safetensors,
tokenizer files), so the project loads it exactly as it would load a real
checkpoint. Vocabularies are made from the words the test will feed in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

SPECIAL_BERT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def words_of(texts: Iterable[str], limit: int = 2000) -> list[str]:
    seen: dict[str, None] = {}
    for t in texts:
        for w in re.findall(r"\w+|[^\w\s]", str(t).lower()):
            seen.setdefault(w, None)
            if len(seen) >= limit:
                return list(seen)
    return list(seen)


def tiny_bert(path: Path, words: list[str], seed: int = 0, dropout: float = 0.1) -> Path:
    """``dropout``: hidden and attention-probability dropout (HF's default 0.1; 0 = none)."""
    import torch
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL_BERT + [w for w in words if w not in SPECIAL_BERT]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 ignores vocab_file= (every word became [UNK]); it takes the vocabulary.
    tok = transformers.BertTokenizerFast(
        vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True
    )
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(path)
    return path


def _wordlevel_fast(vocab: list[str], post: str | None, **special) -> object:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if post:
        tk.post_processor = processors.TemplateProcessing(
            single=f"$A {post}", pair=f"$A $B {post}", special_tokens=[(post, vocab.index(post))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tk, **special)


def tiny_t5(path: Path, words: list[str], seed: int = 0) -> Path:
    """A Flan-style (gated-GELU, untied) tiny T5 whose tokenizer appends </s> like T5's."""
    import torch
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["<pad>", "</s>", "<unk>"] + [w for w in words if w not in ("<pad>", "</s>", "<unk>")]
    tok = _wordlevel_fast(vocab, "</s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = transformers.T5Config(
        vocab_size=len(vocab),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    model = transformers.T5ForConditionalGeneration(cfg)
    # Untied like Flan-T5 (transformers 5 ties lm_head unless it gets its own parameter).
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.05)
    model.config.tie_word_embeddings = False
    model.save_pretrained(path)
    return path


def tiny_clip(path: Path, words: list[str], seed: int = 0, image_size: int = 32) -> Path:
    """A tiny CLIPModel + CLIPTokenizer (character-level BPE vocabulary, no merges)."""
    import torch
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    letters = sorted({c for w in words for c in w.lower() if c.isalnum()} | set("aphotof."))
    toks = letters + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(toks)}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer.from_pretrained(str(path))
    tok.save_pretrained(path)
    eos = vocab["<|endoftext|>"]
    cfg = transformers.CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=len(vocab),
            max_position_embeddings=77,
            eos_token_id=eos,
            bos_token_id=vocab["<|startoftext|>"],
            pad_token_id=eos,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    transformers.CLIPModel(cfg).save_pretrained(path)
    return path
