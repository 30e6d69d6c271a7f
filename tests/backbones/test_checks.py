"""Text backbones need their own tokenizer; same base weights at another path are accepted."""

import json

import numpy as np
import pytest

from llora_jax import task_vectors
from llora_jax.backbones import hf, tokenizers
from llora_jax.errors import UserError
from tests.fixtures import tiny_models

WORDS = [f"w{i}" for i in range(40)]
TOKENIZER_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tiny_models.tiny_bert(tmp_path_factory.mktemp("bert"), WORDS)


def _copy_weights_only(src, dst):
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_intact_tokenizer_loads(bert_dir):
    tok = tokenizers.load_tokenizer(bert_dir)
    rows = json.loads((bert_dir / "config.json").read_text())["vocab_size"]
    assert len(tok) == rows and tokenizers.needs_tokenizer(bert_dir)


def test_missing_tokenizer_files_are_refused(bert_dir, tmp_path):
    bare = _copy_weights_only(bert_dir, tmp_path / "bare")
    hf.load_backbone(bare)  # the weights alone still load: only the tokenizer is missing
    with pytest.raises(tokenizers.TokenizerError, match="no tokenizer files in .*bare") as exc:
        tokenizers.load_tokenizer(bare)
    assert isinstance(exc.value, UserError)


def test_tokenizer_of_another_model_is_refused(bert_dir, tmp_path):
    small = _copy_weights_only(bert_dir, tmp_path / "small")
    (small / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n")
    with pytest.raises(
        tokenizers.TokenizerError, match=r"has 5 tokens for an embedding table of 45 rows"
    ):
        tokenizers.load_tokenizer(small)
    big = _copy_weights_only(bert_dir, tmp_path / "big")
    vocab = (bert_dir / "vocab.txt").read_text().split("\n")[:-1]
    (big / "vocab.txt").write_text("\n".join(vocab + [f"x{i}" for i in range(10)]) + "\n")
    with pytest.raises(tokenizers.TokenizerError, match="index past the table"):
        tokenizers.load_tokenizer(big)


def test_vision_only_clip_needs_no_tokenizer(tmp_path):
    d = tmp_path / "vision"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    assert not tokenizers.needs_tokenizer(d)


def _meta(base_model, fingerprint, task):
    return task_vectors.make_meta(
        base_model=base_model,
        base_fingerprint=fingerprint,
        adapter_kind="lora",
        mode="lora",
        task=task,
        seed=0,
        steps=1,
        rank=2,
        alpha=4.0,
    )


def test_same_weights_at_another_path_are_accepted(tmp_path):
    tau = {"w": np.ones((3, 2), np.float32)}
    a = task_vectors.save(tmp_path / "a", tau, _meta("/home/me/minilm", "f" * 32, "a"))
    b = task_vectors.save(tmp_path / "b", tau, _meta("/scratch/copy/minilm", "f" * 32, "b"))
    assert [t.task for t in task_vectors.load_many([a, b])] == ["a", "b"]
    c = task_vectors.save(tmp_path / "c", tau, _meta("/home/me/minilm", "0" * 32, "c"))
    with pytest.raises(task_vectors.TaskVectorError, match="differ in base_fingerprint"):
        task_vectors.load_many([a, c])
    # Without a fingerprint the names must agree.
    d = task_vectors.save(tmp_path / "d", tau, _meta("/x", "", "d"))
    e = task_vectors.save(tmp_path / "e", tau, _meta("/y", "", "e"))
    with pytest.raises(task_vectors.TaskVectorError, match="differ in base_model"):
        task_vectors.load_many([d, e])


def test_checkpoint_errors_are_user_errors_with_their_old_bases(bert_dir, tmp_path):
    with pytest.raises(hf.BackboneNotFound, match="does not exist") as exc:
        hf.load_backbone(tmp_path / "nowhere" / "model")
    assert isinstance(exc.value, UserError) and isinstance(exc.value, FileNotFoundError)
    with pytest.raises(NotADirectoryError) as exc:
        hf.resolve_source(bert_dir / "config.json")
    assert isinstance(exc.value, UserError)
    broken = _copy_weights_only(bert_dir, tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(hf.BackboneError, match="truncated") as exc:
        hf.load_backbone(broken)
    assert isinstance(exc.value, UserError) and isinstance(exc.value, ValueError)
