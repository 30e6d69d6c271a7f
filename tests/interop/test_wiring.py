"""Imported task vectors through the grid evaluator, the fusion search, the interference
measurements and disentanglement, each against a direct computation (float32, tiny BERT)."""

from __future__ import annotations

import copy
import types

import jax
import numpy as np
import pytest

from llora_jax import interference, task_vectors
from llora_jax import tree as tree_lib
from llora_jax.adapters import LoraConfig
from llora_jax.evaluation import grid as grid_eval
from llora_jax.fusion import programs, search
from llora_jax.interference.disentangle import disentanglement_error
from llora_jax.interop import api
from llora_jax.interop.delta_w import merged_params
from llora_jax.study.analysis import record_interference
from llora_jax.tasks import Experiment
from llora_jax.types import AdapterSpec, TaskModel
from tests.fixtures import interop_models

TARGETS = ["query", "value", "intermediate.dense"]
CLASSES = 3


def _readout(call, batch, head, train):
    return {"logits": call(batch["ids"]).mean(axis=1) @ head}


def _first_logit(outputs, batch):  # a float prediction: compares outputs, not only argmaxes
    return outputs["logits"][:, 0]


def _argmax(outputs, batch):
    return outputs["logits"].argmax(-1)


def _task_model(bb, predict, seed=0) -> TaskModel:
    head = np.random.default_rng(seed).normal(size=(32, CLASSES)).astype(np.float32)
    return TaskModel(
        module=bb.module,
        params=bb.params,
        readout=_readout,
        loss=lambda o, b: o["logits"][:, 0],
        predict=predict,
        head=head,
    )


def _arrays(seed, n=12):
    rng = np.random.default_rng(seed)
    return {
        "ids": rng.integers(2, interop_models.VOCAB - 2, (n, 7)).astype(np.int32),
        "label": rng.integers(0, CLASSES, n).astype(np.int32),
    }


def _combo(taus, lams):
    """Σ λ_i τ_i, leaf by leaf in float64 NumPy."""
    flats = [tree_lib.flatten(t) for t in taus]
    return tree_lib.unflatten(
        {
            k: sum(float(c) * np.asarray(f[k], np.float64) for f, c in zip(flats, lams))
            for k in flats[0]
        }
    )


def _direct_logits(tm, params, arrays):
    out = tm.module.apply({"params": params}, arrays["ids"]).mean(axis=1) @ tm.head
    return np.asarray(out, np.float32)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A tiny BERT, three PEFT adapters (different ranks and α) imported as delta_w vectors."""
    root = tmp_path_factory.mktemp("wiring")
    model, ckpt = interop_models.bert(root / "base")
    for i, (r, alpha) in enumerate([(4, 8), (2, 3), (3, 9)]):
        interop_models.peft_adapter(
            copy.deepcopy(model),
            root / "src" / f"task{i}",
            seed=i + 1,
            r=r,
            lora_alpha=alpha,
            target_modules=TARGETS,
        )
    bb = interop_models.load(ckpt)
    srcs = sorted((root / "src").iterdir())
    paths = api.import_peft(srcs, bb, root / "tv")
    tvs = [task_vectors.load(p) for p in paths]
    return bb, tvs


def test_grid_of_delta_w_merges_equals_direct_weights(imported):
    bb, tvs = imported
    tm = _task_model(bb, _first_logit)
    taus = [t.tau for t in tvs]
    lambdas = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.3, -0.7, 1.2], [0.5, 0.5, 0.5]])
    arrays = _arrays(1)
    zeros = jax.tree.map(np.zeros_like, taus[0])
    ev = grid_eval.GridEvaluator(tm, AdapterSpec("delta_w"), batch_size=5, chunk=2)
    got = ev.predict(zeros, None, taus, lambdas, arrays)
    for k, lam in enumerate(lambdas):
        merged = _combo(taus, lam)
        want = _direct_logits(tm, merged_params(bb.params, merged), arrays)[:, 0]
        np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-5)
    one = ev.predict(zeros, None, taus, lambdas[2:3], arrays)  # the K = 1 program
    np.testing.assert_allclose(one[0], got[2], rtol=1e-5, atol=1e-5)
    assert np.abs(got[2] - got[0]).max() > 1e-3  # the adapters change the outputs


def _members(bb, tvs):
    spec = AdapterSpec("lora", LoraConfig(rank=8, alpha=16.0, targets=("query",)))
    out = []
    for i, tv in enumerate(tvs):
        exp = Experiment(
            task=tv.task,
            tm=_task_model(bb, _argmax),
            spec=spec,
            arrays={"validation": _arrays(10 + i), "test": _arrays(20 + i)},
            metric_fn=lambda p, a: {"accuracy": grid_eval.accuracy(p, a["label"])},
            task_spec=None,
        )
        out.append(programs.make_member(exp, tv, batch_size=8))
    return out


def _accuracy(tm, params, arrays) -> float:
    return float(np.mean(_direct_logits(tm, params, arrays).argmax(-1) == arrays["label"]))


def test_fuse_imported_peft_adapters_equals_brute_force(imported):
    bb, tvs = imported
    members = _members(bb, tvs)
    assert all(m.exp.spec.method == "delta_w" for m in members)
    for m in members:  # single-task scores filled in by evaluating each vector alone
        for split, prefix in (("validation", "val"), ("test", "test")):
            params = merged_params(bb.params, m.tv.tau)
            want = _accuracy(m.exp.tm, params, m.exp.arrays[split])
            assert m.tv.meta["metrics"][f"{prefix}/accuracy"] == pytest.approx(want)
    grid = [{"lam": lam} for lam in (0.0, 0.4, 0.8, 1.2)]
    got = search.fuse_subset(members, "task_arithmetic", grid=grid, batch_size=8)
    best = None
    for hp in grid:
        tau = _combo([m.tv.tau for m in members], [hp["lam"]] * len(members))
        params = merged_params(bb.params, tau)
        val = [_accuracy(m.exp.tm, params, m.exp.arrays["validation"]) for m in members]
        if best is None or np.mean(val) > best[0]:
            test = [_accuracy(m.exp.tm, params, m.exp.arrays["test"]) for m in members]
            best = (np.mean(val), hp, test)
    assert got["hparams"] == best[1]
    assert got["test"] == pytest.approx({m.task: t for m, t in zip(members, best[2])})
    norm = [t / m.single_score("test") for m, t in zip(members, best[2])]
    assert got["avg_normalized"] == pytest.approx(np.mean(norm))
    for name in ("ties", "isolation", "dare", "average"):  # every method runs on ΔW trees
        rec = search.fuse_subsets(members, name, [[m.task for m in members[:2]]], batch_size=8)
        assert len(rec) == 1


def test_interference_of_delta_w_equals_numpy(imported):
    bb, tvs = imported
    members = {m.task: m for m in _members(bb, tvs)}
    tasks = sorted(members)
    flat = [
        np.concatenate([np.ravel(v) for _, v in sorted(tree_lib.flatten(t.tau).items())])
        for t in tvs
    ]
    x = np.stack(flat).astype(np.float64)
    want = (x @ x.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(x, axis=1))
    results = {"cosine": {}, "isolation_overlap": {}}
    record_interference(
        types.SimpleNamespace(isolation_p=0.2), results, "delta_w", -1, members, tasks
    )
    entry = results["cosine"]["delta_w"]["-1"]
    np.testing.assert_allclose(entry["matrix"], want, atol=1e-6)
    assert entry["delta_w_matrix"] == entry["matrix"]
    overlap = np.asarray(results["isolation_overlap"]["delta_w"]["-1"]["matrix"])
    np.testing.assert_allclose(overlap, interference.core_overlap([t.tau for t in tvs], 0.2))
    # core overlap directly: top-20% elements by |ΔW| of each task, Jaccard index
    k = int(np.ceil(0.2 * x.shape[1]))
    cores = [set(np.argsort(-np.abs(r), kind="stable")[:k]) for r in x]
    jac = np.array([[len(a & b) / len(a | b) for b in cores] for a in cores])
    np.testing.assert_allclose(overlap, jac, atol=0.02)


def test_disentanglement_of_delta_w_equals_direct_loop(imported):
    bb, tvs = imported
    m1, m2 = _members(bb, tvs[:2])
    grid = (-1.0, 0.0, 0.5)
    xi = disentanglement_error(m1, m2, grid, n_examples=12, batch_size=8, chunk=4)
    want = np.zeros((3, 3))
    for a, l1 in enumerate(grid):
        for b, l2 in enumerate(grid):
            joint = _combo([m1.tv.tau, m2.tv.tau], [l1, l2])
            for m, alone in (
                (m1, tree_lib.scale(m1.tv.tau, l1)),
                (m2, tree_lib.scale(m2.tv.tau, l2)),
            ):
                arr = m.exp.arrays["test"]
                pj = _direct_logits(m.exp.tm, merged_params(bb.params, joint), arr).argmax(-1)
                ps = _direct_logits(m.exp.tm, merged_params(bb.params, alone), arr).argmax(-1)
                want[a, b] += np.mean(pj != ps)
    np.testing.assert_allclose(xi, want, atol=1e-9)


def test_spec_for_reads_the_vectors_own_scale():
    spec = AdapterSpec("lora", LoraConfig(rank=4, alpha=8.0))
    meta = {"adapter_kind": "lora", "mode": "l_lora", "rank": 16, "alpha": 32.0, "scale": 0.5}
    got = programs.spec_for(spec, meta)
    assert got.method == "l_lora" and got.lora.scale == pytest.approx(0.5)
    same = programs.spec_for(
        spec, {"adapter_kind": "lora", "mode": "lora", "rank": 4, "alpha": 8.0}
    )
    assert same == spec
    uniform = programs.spec_for(spec, {**meta, "scale": {"a/query": 0.25, "a/value": 0.25}})
    assert uniform.lora.scale == pytest.approx(0.25)
    with pytest.raises(task_vectors.TaskVectorError, match="scale per layer.*delta_w"):
        programs.spec_for(spec, {**meta, "scale": {"a/query": 0.25, "a/value": 0.5}})
    assert programs.spec_for(spec, {"adapter_kind": "delta_w"}).method == "delta_w"
