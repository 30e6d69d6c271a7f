"""Packed evaluation: several inputs per row give every input its unpacked prediction."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llora_jax import forward
from llora_jax.adapters import LoraConfig
from llora_jax.backbones import bert, hf, pooling, tokenizers
from llora_jax.data import get_task
from llora_jax.evaluation import batches as eval_batches
from llora_jax.evaluation import grid as grid_eval
from llora_jax.evaluation import packing
from llora_jax.tasks import text_encoder
from llora_jax.types import AdapterSpec
from tests.fixtures import tiny_models

WORDS = "a fine film dull and slow the best of year not good at all".split()


def test_assign_places_every_input_once_within_rows_and_slots():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=300)
    where = packing.assign(lengths, 64, max_segments=4)
    rows = where[:, 0].max() + 1
    assert len({(r, s) for r, s, _ in where}) == len(lengths)  # one slot per input
    for r in range(rows):
        mine = where[:, 0] == r
        assert 1 <= mine.sum() <= 4
        starts, ends = where[mine, 2], where[mine, 2] + lengths[mine]
        order = np.argsort(starts)
        assert ends.max() <= 64 and np.all(starts[order][1:] >= ends[order][:-1])  # no overlap
    # First-fit decreasing packs these nearly full: within 5% of the lower bound.
    assert rows <= 1.05 * max(lengths.sum() / 64, len(lengths) / 4) + 1
    with pytest.raises(ValueError, match="does not fit"):
        packing.assign(np.array([65]), 64)


def test_only_right_padded_token_inputs_are_packable():
    ok = {"input_ids": np.ones((2, 4), int), "attention_mask": np.array([[1, 1, 0, 0]] * 2)}
    np.testing.assert_array_equal(packing.lengths_if_packable(ok), [2, 2])
    holes = dict(ok, attention_mask=np.array([[1, 0, 1, 0], [1, 1, 0, 0]]))
    assert packing.lengths_if_packable(holes) is None  # left padding / holes: not packed
    assert packing.lengths_if_packable({"image": np.zeros((2, 4, 4, 3))}) is None


def _setup(tmp_path, n=45, pairs=False):
    rng = np.random.default_rng(1)
    path = tiny_models.tiny_bert(tmp_path / "bert", WORDS)
    bb, tok = hf.load_backbone(path), tokenizers.load_tokenizer(path)
    spec = get_task("mrpc" if pairs else "sst2")
    sent = lambda: " ".join(rng.choice(WORDS, size=int(rng.integers(1, 25))))  # noqa: E731
    ex = {"label": [i % 2 for i in range(n)]}
    if pairs:
        ex.update(sentence1=[sent() for _ in range(n)], sentence2=[sent() for _ in range(n)])
    else:
        ex["sentence"] = [sent() for _ in range(n)]
    arrays = text_encoder.encode_examples(tok, spec, ex, max_len=64)
    tm = _discriminating_head(text_encoder.task_model(bb, tok, spec), arrays)
    ad = AdapterSpec("lora", LoraConfig(rank=2, alpha=4.0, targets=bert.DEFAULT_LORA_TARGETS))
    trainable, phi0 = forward.init_trainable(tm, ad, jax.random.key(0))
    trainable = jax.tree.map(
        lambda x: x + 0.3 * jnp.sin(jnp.arange(x.size)).reshape(x.shape), trainable
    )
    return tm, ad, trainable, phi0, arrays


def _discriminating_head(tm, arrays):
    """Class directions ±d, d the main direction in which the (nearly parallel) embeddings
    of a tiny random encoder differ, made orthogonal to their mean: about half the inputs
    go to each class, so predictions can tell models apart."""
    emb = np.asarray(
        pooling.sentence_embedding(
            tm.module,
            tm.params,
            arrays["input_ids"],
            arrays["attention_mask"],
            arrays["token_type_ids"],
        )
    )
    centre = emb.mean(0)
    d = np.linalg.svd(emb - centre, full_matrices=False)[2][0]
    d -= centre * (centre @ d) / (centre @ centre)
    d /= np.linalg.norm(d)
    return dataclasses.replace(tm, head=dict(tm.head, classes=jnp.asarray(np.stack([d, -d]))))


@pytest.mark.parametrize("pairs", [False, True])
def test_packed_logits_equal_each_input_alone(tmp_path, pairs):
    """Segment-masked attention, per-segment positions and per-segment pooling: every
    packed input's logits equal its own full-width forward's (float32)."""
    tm, ad, trainable, phi0, arrays = _setup(tmp_path, pairs=pairs)
    assert tm.packable
    logits = jax.jit(lambda b: forward.forward(tm, ad, trainable, phi0, b)["logits"])
    full = np.asarray(logits(arrays))  # (N, C), unpacked, width 64
    packed = packing.pack(arrays, packing.lengths_if_packable(arrays))
    n_rows = len(packed["slots"])
    assert n_rows <= len(full) / 2  # short inputs: several per row
    seen = []
    for batch, slots in packing.packed_batches(packed, rows=4):
        out = np.asarray(logits(batch))  # (4, S, C)
        assert out.shape[:2] == slots.shape
        for r, s in zip(*np.nonzero(slots >= 0)):
            np.testing.assert_allclose(out[r, s], full[slots[r, s]], rtol=2e-5, atol=2e-5)
            seen.append(slots[r, s])
    assert sorted(seen) == list(range(len(full)))


def test_packed_predictions_and_grids_equal_unpacked(tmp_path):
    """predict and merge grids pack text inputs; predictions equal the sorted-and-trimmed
    path's, in the dataset's order, for single models and vmapped grids."""
    tm, ad, trainable, phi0, arrays = _setup(tmp_path, n=70)
    plain = dataclasses.replace(tm, packable=False)
    np.testing.assert_array_equal(
        grid_eval.predict(tm, ad, trainable, phi0, arrays, batch_size=4),
        grid_eval.predict(plain, ad, trainable, phi0, arrays, batch_size=4),
    )
    taus = [jax.tree.map(lambda x, k=k: jnp.cos(k * x), trainable) for k in (1.0, 2.0)]
    lam = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 1.5], [-1.0, 2.0], [2.0, 2.0]], np.float32)
    got = grid_eval.GridEvaluator(tm, ad, batch_size=4, chunk=2).predict(
        phi0, phi0, taus, lam, arrays
    )
    ref = grid_eval.GridEvaluator(plain, ad, batch_size=4, chunk=2).predict(
        phi0, phi0, taus, lam, arrays
    )
    assert got.shape == (5, 70)
    np.testing.assert_array_equal(got, ref)
    assert len({tuple(r) for r in got}) > 1  # the merges differ: the test can tell them apart
    batches, n = eval_batches.device_batches(arrays, 4, pack=True)
    assert n == 70 and all(b["input_ids"].shape == (4, 64) for b, _ in batches)
