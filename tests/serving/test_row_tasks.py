"""RowTasks beyond text encoders: T5 label scoring and CLIP images, routed through a bank,
equal to the per-task evaluation (``evaluation.grid.predict``) of the same examples."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from configs import clip as clip_config
from configs import t5 as t5_config
from llora_jax import experiment, forward
from llora_jax import tree as tree_lib
from llora_jax.adapters import routed
from llora_jax.data import get_task
from llora_jax.evaluation import grid as grid_eval
from llora_jax.serving import predict as predict_lib
from llora_jax.serving import row_tasks
from llora_jax.serving.bank import AdapterBank
from llora_jax.tasks import DEFAULT_LORA_TARGETS, t5_text
from llora_jax.types import AdapterSpec
from tests.fixtures import tiny_models

SENTENCES = ["a fine film", "dull and slow", "the best of the year", "not good at all"]
TOL = 1e-5


def _two_scores(out, batch):
    return out["logits"][..., 0] - 0.5 * out["logits"][..., 1]


def _continuous(rt):
    """The RowTask predicting a continuous function of two class scores (not an argmax)."""
    tm = dataclasses.replace(rt.task_model, predict=_two_scores, packable=False)
    return dataclasses.replace(rt, task_model=tm, decode=float)


def _adapter(rt, c, seed):
    spec = AdapterSpec(c.method, experiment.lora_config(c, DEFAULT_LORA_TARGETS[c.kind]))
    phi, phi0 = forward.init_trainable(rt.task_model, spec, jax.random.key(seed))
    tau = jax.tree.map(lambda x: 0.4 * jnp.sin(seed + jnp.arange(x.size)).reshape(x.shape), phi)
    phi = tree_lib.add(phi0, tau)
    return spec, phi, phi0, routed.entry(phi, mode="lora", scale=spec.lora.scale)


def _check(rt, c, rows, arrays):
    """Two adapters and the base through one routed pass vs per-task evaluation."""
    one, two = _adapter(rt, c, 1), _adapter(rt, c, 2)
    bank = AdapterBank({"one": one[3], "two": two[3]}, capacity=2)
    got = predict_lib.predict_rows(bank, rt, rows, batch_size=4, progress=False)
    tm = rt.task_model
    refs = {
        n: grid_eval.predict(tm, a[0], a[1], a[2], arrays, batch_size=2)
        for n, a in (("one", one), ("two", two))
    }
    # The base model: φ = φ0 with B0 = 0 adds nothing.
    refs[None] = grid_eval.predict(tm, one[0], one[2], one[2], arrays, batch_size=2)
    assert np.abs(refs["one"] - refs[None]).max() > 1e-4
    for i, (row, g) in enumerate(zip(rows, got)):
        np.testing.assert_allclose(g, refs[row["adapter"]][i], rtol=TOL, atol=TOL)


def test_t5_label_scoring_rows(tmp_path):
    words = tiny_models.words_of(SENTENCES + ["sst2 sentence:", "negative positive"])
    path = tiny_models.tiny_t5(tmp_path / "t5", words)
    c = t5_config.get_config()
    c.backbone, c.task, c.data.max_len = str(path), "sst2", 16
    c.lora.rank, c.lora.alpha = 2, 4.0
    rt = _continuous(row_tasks.row_task_from_config(c, experiment.BackboneCache()))
    names = ["one", None, "two", "one"]
    rows = [{"adapter": n, "sentence": s} for n, s in zip(names, SENTENCES)]
    tok = experiment.BackboneCache().get(str(path), jnp.float32, jnp.float32)[1]
    arrays = t5_text.encode_examples(
        tok, get_task("sst2"), {"sentence": SENTENCES, "label": [0] * 4}, 16, 8
    )
    _check(rt, c, rows, arrays)
    labels = row_tasks.row_task_from_config(c, experiment.BackboneCache())
    assert labels.decode(np.int32(1)) == "positive"


def test_clip_image_rows_from_files_and_arrays(tmp_path):
    path = tiny_models.tiny_clip(tmp_path / "clip", ["a photo of a"] + list("0123456789"))
    c = clip_config.get_config()
    c.backbone, c.task, c.data.image_size = str(path), "mnist", 32
    c.lora.rank, c.lora.alpha = 2, 4.0
    rt = _continuous(row_tasks.row_task_from_config(c, experiment.BackboneCache()))
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    Image.fromarray(images[0]).save(tmp_path / "x.png")
    rows = [
        {"adapter": "one", "image": str(tmp_path / "x.png")},
        {"adapter": None, "image": images[1].tolist()},
        {"adapter": "two", "image": images[2].tolist()},
        {"adapter": "one", "image": images[3].tolist()},
    ]
    _check(rt, c, rows, {"image": images})
    labels = row_tasks.row_task_from_config(c, experiment.BackboneCache())
    assert labels.fields == ("image",)
