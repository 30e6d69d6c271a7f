"""Adapter bank (disk → host → device LRU) and routed batch prediction."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llora_jax import adapters, task_vectors
from llora_jax import tree as tree_lib
from llora_jax.adapters import routed
from llora_jax.backbones import bert, pooling
from llora_jax.serving import bank as bank_lib
from llora_jax.serving import predict as predict_lib
from llora_jax.types import TaskModel

TOL = 1e-5
VOCAB = 40
MAXLEN = 16


@functools.cache
def _model():
    s = bert.BertSettings(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=MAXLEN,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    m = bert.BertModel(s)
    return m, bert.init_params(m, jax.random.key(0))


def _adapter(seed, rank=2, l_lora=False, phi0_seed=None):
    m, params = _model()
    cfg = adapters.LoraConfig(rank=rank, alpha=2.0 * rank + seed, targets=bert.DEFAULT_LORA_TARGETS)
    phi0 = adapters.init_lora(jax.random.key(seed if phi0_seed is None else phi0_seed), params, cfg)
    leaves, tdef = jax.tree.flatten(phi0)
    keys = jax.random.split(jax.random.key(1000 + seed), len(leaves))
    tau = jax.tree.unflatten(
        tdef, [0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    return tau, phi0, cfg


def _save(path, seed, rank=2, mode="lora", phi0_seed=None, overwrite=False):
    tau, phi0, cfg = _adapter(seed, rank, phi0_seed=phi0_seed)
    meta = task_vectors.make_meta(
        base_model="tiny-bert",
        base_fingerprint="x",
        adapter_kind="lora",
        mode=mode,
        task=f"t{seed}",
        seed=seed,
        steps=1,
        targets=cfg.targets,
        rank=rank,
        alpha=cfg.alpha,
    )
    task_vectors.save(path, tau, meta, phi0=phi0, overwrite=overwrite)
    return tree_lib.add(phi0, tau), phi0, cfg


def _embed(phi=None, scale=None, phi0=None, mode="lora"):
    """Reference: the tiny encoder run alone (jitted) on a fixed token batch."""
    m, params = _model()
    x = _tokens()
    if phi is None:
        return np.asarray(m.apply({"params": params}, x))
    return np.asarray(adapters.apply(m, params, phi, x, scale=scale, mode=mode, phi0=phi0))


def _tokens():
    return jax.random.randint(jax.random.key(3), (1, 6), 5, VOCAB)


def _routed(bank, names):
    m, params = _model()
    dev, ids = bank.resolve(names)
    x = jnp.repeat(_tokens(), len(names), axis=0)
    return np.asarray(routed.apply(m, params, dev, ids, x))


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank")
    saved = {
        n: _save(root / n, seed, rank) for n, seed, rank in (("a", 1, 2), ("b", 2, 3), ("c", 3, 2))
    }
    return root, saved


def test_bank_lru_capacity_and_outputs(three):
    root, saved = three
    bank = bank_lib.AdapterBank.from_task_vectors([root / n for n in "abc"], capacity=2)
    assert bank.kind == "factors" and bank.max_rank == 3
    np.testing.assert_allclose(_routed(bank, [None, None]), np.repeat(_embed(), 2, 0), atol=TOL)
    got = _routed(bank, ["a", None, "b"])
    for row, n in zip(got, ["a", None, "b"]):
        want = _embed() if n is None else _embed(saved[n][0], saved[n][2].scale)
        np.testing.assert_allclose(row[None], want, rtol=TOL, atol=TOL)
    assert (bank.stats.misses, bank.stats.hits) == (2, 0)
    bank.resolve(["b"])  # b is now the most recent
    got = _routed(bank, ["c"])  # evicts a, the least recently used
    assert bank.stats.evictions == 1 and set(bank._slots) == {"b", "c"}
    np.testing.assert_allclose(got, _embed(saved["c"][0], saved["c"][2].scale), rtol=TOL, atol=TOL)
    with pytest.raises(bank_lib.BankCapacityError, match="needs 3 distinct adapters.*holds 2"):
        bank.resolve(["a", "b", "c"])
    with pytest.raises(KeyError, match="zzz"):
        bank.resolve(["zzz"])
    with pytest.raises(ValueError, match="share the names"):
        bank_lib.AdapterBank.from_task_vectors([root / "a", root / "b" / ".." / "a"], capacity=1)


def test_stale_adapter_on_disk_is_detected_and_reloaded(tmp_path):
    _save(tmp_path / "a", 1)
    _save(tmp_path / "b", 2)
    bank = bank_lib.AdapterBank.from_task_vectors([tmp_path / "a", tmp_path / "b"], capacity=2)
    bank.resolve(["a", "b"])
    old_fp = bank._slots["a"][1]
    phi_new, _, cfg = _save(tmp_path / "a", 7, overwrite=True)  # new weights, same name
    got = _routed(bank, ["a"])
    assert bank.stats.stale_reloads == 1
    assert bank._slots["a"][1] != old_fp
    np.testing.assert_allclose(got, _embed(phi_new, cfg.scale), rtol=TOL, atol=TOL)
    bank.resolve(["a", "b"])  # unchanged files: hits, no reload
    assert bank.stats.stale_reloads == 1 and bank.stats.hits >= 2


def test_memory_per_adapter_and_shared_a0_bank(tmp_path):
    for n, seed in (("x", 1), ("y", 2)):
        _save(tmp_path / n, seed, rank=4, mode="l_lora", phi0_seed=9)
    shared = bank_lib.AdapterBank.from_task_vectors([tmp_path / "x", tmp_path / "y"], capacity=2)
    assert shared.kind == "shared_a"
    factors = bank_lib.AdapterBank.from_task_vectors(
        [tmp_path / "x", tmp_path / "y"], capacity=2, kind="factors"
    )
    # 1 layer × (query, value), d = 16, r = 4, float32: A and B = 2·(16·4 + 4·16)·4 bytes.
    assert factors.memory_report()["bytes_per_adapter"] == 2 * (16 * 4 + 4 * 16) * 4
    assert shared.memory_report()["bytes_per_adapter"] == 2 * (4 * 16) * 4  # B only: half
    bf16 = bank_lib.AdapterBank.from_task_vectors([tmp_path / "x"], capacity=1, dtype=jnp.bfloat16)
    assert bf16.memory_report()["bytes_per_adapter"] == 2 * (4 * 16) * 2
    tau, phi0, cfg = _adapter(2, 4, phi0_seed=9)
    want = _embed(tree_lib.add(phi0, tau), cfg.scale, phi0, "l_lora")
    np.testing.assert_allclose(_routed(shared, ["y"]), want, rtol=TOL, atol=TOL)


# ----------------------------------------------------------------------------- predict


def _tokenizer(text):
    return [2] + [5 + (sum(map(ord, w)) % (VOCAB - 5)) for w in text.split()] + [3]


def _task():
    m, params = _model()

    def readout(call, batch, head, train):
        h = call(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        return {"logits": pooling.mean_pool(h, batch["attention_mask"]) @ head}

    head = jax.random.normal(jax.random.key(5), (16, 3))
    tm = TaskModel(m, params, readout, None, lambda out, batch: out["logits"], head=head)
    return predict_lib.text_task(tm, _tokenizer, ["sentence"], max_length=MAXLEN)


def _rows():
    words = "the cat sat on a mat while dogs ran far away".split()
    rng = np.random.default_rng(0)
    names = ["a", "b", None, "c", "a", "c", "b", None, "a"]
    return [
        {"id": i, "adapter": n, "sentence": " ".join(rng.choice(words, 2 + (i * 3) % 11))}
        for i, n in enumerate(names)
    ]


def _alone_logits(task, row, saved):
    m, params = _model()
    arr = task.encode([row])
    n = row["adapter"]
    tm = task.task_model

    def call(*args, **kw):
        if n is None:
            return m.apply({"params": params}, *args, **kw)
        return adapters.apply(m, params, saved[n][0], *args, scale=saved[n][2].scale, **kw)

    return np.asarray(tm.readout(call, arr, tm.head, False)["logits"][0])


def test_predict_rows_in_input_order_equal_each_alone(three):
    root, saved = three
    bank = bank_lib.AdapterBank.from_task_vectors([root / n for n in "abc"], capacity=2)
    task, rows = _task(), _rows()
    preds = predict_lib.predict_rows(bank, task, rows, batch_size=4, progress=False)
    for row, p in zip(rows, preds):
        np.testing.assert_allclose(p, _alone_logits(task, row, saved), rtol=TOL, atol=TOL)


def test_plan_batches_respects_buckets_and_capacity():
    names = ["a", "b", "c", None, "a", "d", "b", "c"]
    buckets = [8, 8, 8, 8, 16, 16, 16, 8]
    batches = predict_lib.plan_batches(names, buckets, batch_size=3, capacity=2)
    assert sorted(i for b in batches for i in b) == list(range(len(names)))
    for b in batches:
        assert len(b) <= 3 and len({buckets[i] for i in b}) == 1
        assert len({names[i] for i in b} - {None}) <= 2


def test_predict_file_validates_first_and_writes_atomically(three, tmp_path):
    root, saved = three
    bank = bank_lib.AdapterBank.from_directory(root, capacity=2)
    assert bank.names == ("a", "b", "c")
    task, rows = _task(), _rows()
    src, out = tmp_path / "in.jsonl", tmp_path / "preds.jsonl"
    out.write_text("old\n")
    bad = [*rows[:2], {"adapter": "nope", "sentence": "x"}, rows[3]]
    src.write_text("\n".join(json.dumps(r) for r in bad) + "\n")
    with pytest.raises(ValueError, match=r"row 3: adapter 'nope' is not in the bank"):
        predict_lib.predict_file(bank, task, src, out, progress=False)
    src.write_text(json.dumps(rows[0]) + "\n{not json\n" + json.dumps({"adapter": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"row 2: not valid JSON.*row 3 \(adapter 'a'\): missing"):
        predict_lib.predict_file(bank, task, src, out, progress=False)
    assert out.read_text() == "old\n"  # untouched by the failures
    assert bank.stats.misses == 0  # validation came before any work
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = predict_lib.predict_file(bank, task, src, out, batch_size=4, progress=False)
    got = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert summary["rows"] == len(rows) == len(got)
    assert [g["id"] for g in got] == [r["id"] for r in rows]
    assert [g["adapter"] for g in got] == [r["adapter"] for r in rows]
    np.testing.assert_allclose(got[2]["prediction"], _alone_logits(task, rows[2], saved), atol=TOL)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_bank_of_in_memory_entries_merged_and_dense():
    """A fusion result is one more entry; dense ΔW entries make a dense bank."""
    tau1, phi0, cfg = _adapter(1, phi0_seed=4)
    tau2, _, _ = _adapter(2, phi0_seed=4)
    phi1 = tree_lib.add(phi0, tau1)
    merged = tree_lib.add(phi0, tree_lib.add(tree_lib.scale(tau1, 0.5), tree_lib.scale(tau2, 0.5)))
    bank = bank_lib.AdapterBank(
        {
            "merged": routed.entry(merged, mode="lora", scale=cfg.scale),
            "one": routed.entry(phi1, mode="lora", scale=cfg.scale),
        },
        capacity=2,
    )
    got = _routed(bank, ["merged", "one"])
    np.testing.assert_allclose(got[:1], _embed(merged, cfg.scale), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(got[1:], _embed(phi1, cfg.scale), rtol=TOL, atol=TOL)
    dense = bank_lib.AdapterBank(
        {"d": routed.delta_w_entry(adapters.delta_w(phi1, cfg.scale))}, capacity=1
    )
    assert dense.kind == "dense"
    np.testing.assert_allclose(_routed(dense, ["d", None])[:1], _embed(phi1, cfg.scale), atol=TOL)
