"""Task-vector store: bit-exact round trip, atomic writes, refusal of unsafe merges."""

import json

import jax
import numpy as np
import pytest

from llora_jax import adapters, task_vectors
from llora_jax import tree as tree_lib
from tests.fixtures import toy


def _tv(seed=0, task="a", fingerprint=None):
    _, params, _ = toy.make()
    cfg = adapters.LoraConfig(rank=2, alpha=4.0, targets=("query", "value"))
    phi0 = adapters.init_lora(jax.random.key(0), params, cfg)
    leaves, treedef = jax.tree.flatten(phi0)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    tau = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    meta = task_vectors.make_meta(
        base_model="toy",
        base_fingerprint=fingerprint or tree_lib.fingerprint(params),
        adapter_kind="lora",
        mode="l_lora",
        task=task,
        seed=seed,
        steps=10,
        targets=cfg.targets,
        rank=cfg.rank,
        alpha=cfg.alpha,
        metrics={"val/accuracy": 0.5},
    )
    return tau, phi0, meta


def test_round_trip_is_bit_exact(tmp_path):
    tau, phi0, meta = _tv()
    path = task_vectors.save(tmp_path / "tv", tau, meta, phi0=phi0)
    got = task_vectors.load(path)
    for a, b in zip(jax.tree.leaves(tau), jax.tree.leaves(got.tau)):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert tree_lib.flatten(got.phi0).keys() == tree_lib.flatten(phi0).keys()
    assert got.meta["task"] == "a" and got.meta["metrics"] == {"val/accuracy": 0.5}
    assert got.meta["phi0_fingerprint"] == tree_lib.fingerprint(phi0)
    assert got.meta["num_params"] == tree_lib.num_params(tau)


def test_interrupted_save_leaves_nothing_loadable(tmp_path, monkeypatch):
    tau, phi0, meta = _tv()
    calls = []
    real = task_vectors._orbax_save

    def crash_on_second(path, tree):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash during the write")
        real(path, tree)

    monkeypatch.setattr(task_vectors, "_orbax_save", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        task_vectors.save(tmp_path / "tv", tau, meta, phi0=phi0)
    assert not (tmp_path / "tv").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory was removed too
    with pytest.raises(task_vectors.TaskVectorError, match="does not exist"):
        task_vectors.load(tmp_path / "tv")


def test_directory_without_meta_is_not_a_task_vector(tmp_path):
    tau, phi0, meta = _tv()
    path = task_vectors.save(tmp_path / "tv", tau, meta)
    (path / "meta.json").unlink()  # as after a crash mid-write of an older layout
    with pytest.raises(task_vectors.TaskVectorError, match="meta.json is missing"):
        task_vectors.load(path)


def test_existing_directory_needs_overwrite(tmp_path):
    tau, phi0, meta = _tv()
    task_vectors.save(tmp_path / "tv", tau, meta)
    with pytest.raises(task_vectors.TaskVectorError, match="already exists"):
        task_vectors.save(tmp_path / "tv", tau, meta)
    tau2, _, meta2 = _tv(seed=5)
    task_vectors.save(tmp_path / "tv", tau2, meta2, overwrite=True)
    got = task_vectors.load(tmp_path / "tv")
    np.testing.assert_array_equal(
        np.asarray(jax.tree.leaves(got.tau)[0]), np.asarray(jax.tree.leaves(tau2)[0])
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tv"]


def test_tampered_shapes_are_refused(tmp_path):
    tau, phi0, meta = _tv()
    path = task_vectors.save(tmp_path / "tv", tau, meta)
    m = json.loads((path / "meta.json").read_text())
    first = sorted(m["structure"])[0]
    m["structure"][first][0] += 1
    (path / "meta.json").write_text(json.dumps(m))
    with pytest.raises(task_vectors.TaskVectorError, match="does not match the structure"):
        task_vectors.load(path)


def test_mismatched_fingerprints_are_refused(tmp_path):
    a = task_vectors.save(tmp_path / "a", *_tv(task="a")[::2], phi0=_tv()[1])
    tau, phi0, meta = _tv(task="b", fingerprint="0" * 32)
    b = task_vectors.save(tmp_path / "b", tau, meta, phi0=phi0)
    with pytest.raises(task_vectors.TaskVectorError, match="differ in base_fingerprint"):
        task_vectors.load_many([a, b])
    # Same base, different adapter mode: also refused, naming the field.
    tau, phi0, meta = _tv(task="c")
    meta["mode"] = "lora"
    c = task_vectors.save(tmp_path / "c", tau, meta, phi0=phi0)
    with pytest.raises(task_vectors.TaskVectorError, match="differ in mode"):
        task_vectors.load_many([a, c])
    tau, phi0, meta = _tv(task="d")
    d = task_vectors.save(tmp_path / "d", tau, meta, phi0=phi0)
    assert [t.task for t in task_vectors.load_many([a, d])] == ["a", "d"]
