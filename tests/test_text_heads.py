"""Label-description heads padded to a common class count change nothing but their shape."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llora_jax import model as M
from llora_jax.adapters import LoraConfig
from llora_jax.backbones import bert, hf
from llora_jax.data import get_task
from llora_jax.heads import text_encoder as TE
from tests import tiny_models as TM

SENTENCES = ["a fine film", "dull and slow", "the best of the year", "not good at all"]


def test_padded_head_gives_the_same_loss_gradients_and_predictions(tmp_path):
    path = TM.tiny_bert(tmp_path / "bert", TM.words_of(SENTENCES))
    bb = hf.load_backbone(path)
    tok = hf.load_tokenizer(path)
    spec = get_task("sst2")
    tm = TE.task_model(bb, tok, spec)
    padded = TE.pad_classes(tm, 5)
    assert padded.head["classes"].shape[0] == 5 and tm.head["classes"].shape[0] == 2
    assert TE.pad_classes(tm, 2) is tm  # nothing to pad
    batch = TE.encode_examples(
        tok, spec, {"sentence": SENTENCES, "label": [1, 0, 1, 0]}, max_len=16
    )
    ad = M.AdapterSpec("lora", LoraConfig(rank=2, alpha=4.0, targets=bert.DEFAULT_LORA_TARGETS))
    trainable, phi0 = M.init_trainable(tm, ad, jax.random.key(0))
    # A nonzero B, so the adapters change the outputs.
    trainable = jax.tree.map(
        lambda x: x + 0.3 * jnp.sin(jnp.arange(x.size)).reshape(x.shape), trainable
    )

    def loss(t, model):
        out = M.forward(model, ad, t, phi0, batch)
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
        np.asarray(M.argmax_predict({"logits": z1}, batch)),
        np.asarray(M.argmax_predict({"logits": z0}, batch)),
    )
