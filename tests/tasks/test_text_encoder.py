"""Label-description heads padded to a common class count change nothing but their shape."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llora_jax import forward
from llora_jax.adapters import LoraConfig
from llora_jax.backbones import bert, hf, tokenizers
from llora_jax.data import get_task
from llora_jax.tasks import text_encoder
from llora_jax.types import AdapterSpec
from tests.fixtures import tiny_models

SENTENCES = ["a fine film", "dull and slow", "the best of the year", "not good at all"]


def test_padded_head_gives_the_same_loss_gradients_and_predictions(tmp_path):
    path = tiny_models.tiny_bert(tmp_path / "bert", tiny_models.words_of(SENTENCES))
    bb = hf.load_backbone(path)
    tok = tokenizers.load_tokenizer(path)
    spec = get_task("sst2")
    tm = text_encoder.task_model(bb, tok, spec)
    padded = text_encoder.pad_classes(tm, 5)
    assert padded.head["classes"].shape[0] == 5 and tm.head["classes"].shape[0] == 2
    assert text_encoder.pad_classes(tm, 2) is tm  # nothing to pad
    batch = text_encoder.encode_examples(
        tok, spec, {"sentence": SENTENCES, "label": [1, 0, 1, 0]}, max_len=16
    )
    ad = AdapterSpec("lora", LoraConfig(rank=2, alpha=4.0, targets=bert.DEFAULT_LORA_TARGETS))
    trainable, phi0 = forward.init_trainable(tm, ad, jax.random.key(0))
    # A nonzero B, so the adapters change the outputs.
    trainable = jax.tree.map(
        lambda x: x + 0.3 * jnp.sin(jnp.arange(x.size)).reshape(x.shape), trainable
    )

    def loss(t, model):
        out = forward.forward(model, ad, t, phi0, batch)
        per = optax.softmax_cross_entropy_with_integer_labels(
            out["logits"].astype(jnp.float32), batch["label"]
        )
        return per.mean(), out["logits"]

    (l0, z0), g0 = jax.value_and_grad(loss, has_aux=True)(trainable, tm)
    (l1, z1), g1 = jax.value_and_grad(loss, has_aux=True)(trainable, padded)
    np.testing.assert_array_equal(np.asarray(z1[:, :2]), np.asarray(z0))
    assert np.all(np.asarray(z1[:, 2:]) == -1e9)
    assert float(l1) == float(l0)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(
        np.asarray(forward.argmax_predict({"logits": z1}, batch)),
        np.asarray(forward.argmax_predict({"logits": z0}, batch)),
    )


def test_length_sorted_trimmed_evaluation_equals_full_width(tmp_path):
    """Evaluation sorts token inputs by length and trims each batch to its longest row
    (a power of two ≥ 16): the logits of every row equal the full-width (64) forward's,
    and predictions come back in the dataset's order."""
    from llora_jax.evaluation import batches as eval_batches
    from llora_jax.evaluation import grid as grid_eval

    words = "a fine film dull and slow the best of year not good at all".split()
    rng = np.random.default_rng(0)
    # Lengths from 1 to 40 words in a shuffled order: batches of 4 need widths 16..64.
    sents = [" ".join(rng.choice(words, size=n)) for n in rng.permutation(np.arange(1, 41))]
    path = tiny_models.tiny_bert(tmp_path / "bert", words)
    bb, tok = hf.load_backbone(path), tokenizers.load_tokenizer(path)
    spec = get_task("sst2")
    tm = text_encoder.task_model(bb, tok, spec)
    arrays = text_encoder.encode_examples(
        tok, spec, {"sentence": sents, "label": [i % 2 for i in range(len(sents))]}, max_len=64
    )
    ad = AdapterSpec("lora", LoraConfig(rank=2, alpha=4.0, targets=bert.DEFAULT_LORA_TARGETS))
    trainable, phi0 = forward.init_trainable(tm, ad, jax.random.key(0))
    trainable = jax.tree.map(
        lambda x: x + 0.3 * jnp.sin(jnp.arange(x.size)).reshape(x.shape), trainable
    )
    logits = jax.jit(lambda b: forward.forward(tm, ad, trainable, phi0, b)["logits"])
    full = np.asarray(logits(arrays))
    ordered, inverse = eval_batches.by_length(arrays)
    lengths = ordered["attention_mask"].sum(1)
    assert np.all(np.diff(lengths) >= 0) and lengths[-1] > 32
    widths = []
    for b, _ in eval_batches.iterate_batches(ordered, 4, trim=True):
        w = b["input_ids"].shape[1]
        widths.append(w)
        assert b["attention_mask"].shape[1] == b["token_type_ids"].shape[1] == w
        assert w >= b["attention_mask"].sum(1).max() and w in (16, 32, 64)
    assert widths[0] == 16 and widths[-1] == 64  # trimmed, and never beyond the stored 64
    trimmed = np.concatenate(
        [np.asarray(logits(b))[:n] for b, n in eval_batches.iterate_batches(ordered, 4, trim=True)]
    )[inverse]
    np.testing.assert_allclose(trimmed, full, rtol=1e-5, atol=1e-5)
    unpacked = dataclasses.replace(tm, packable=False)  # text heads pack by default
    preds = grid_eval.predict(unpacked, ad, trainable, phi0, arrays, batch_size=4)
    np.testing.assert_array_equal(preds, full.argmax(-1))
    # A dataset evaluated again reuses its sorted, trimmed batches already on the device.
    first, n = eval_batches.device_batches(arrays, 4)
    again, n2 = eval_batches.device_batches(arrays, 4)
    assert again is first and n == n2 == 40 and len(first) == 10
    assert [b["input_ids"].shape[1] for b, _ in first] == widths
    assert sorted(np.concatenate([s for _, s in first]).tolist()) == list(range(40))
    # Without an attention mask nothing is sorted or trimmed.
    plain = {"x": np.arange(6)}
    assert eval_batches.by_length(plain)[1] is None
    assert [b["x"].tolist() for b, _ in eval_batches.iterate_batches(plain, 4, trim=True)] == [
        [0, 1, 2, 3],
        [4, 5, 5, 5],
    ]
