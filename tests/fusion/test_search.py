"""Validation-selected fusion and disentanglement grids equal direct one-by-one loops."""

import jax
import numpy as np
import pytest

from llora_jax import forward
from llora_jax import tree as tree_lib
from llora_jax.adapters import LoraConfig
from llora_jax.evaluation import grid as grid_eval
from llora_jax.experiment import Experiment
from llora_jax.fusion import programs, search
from llora_jax.interference.disentangle import disentanglement_error
from llora_jax.task_vectors import TaskVector, TaskVectorError
from llora_jax.tasks import text_encoder
from llora_jax.types import AdapterSpec
from tests.fixtures import toy

LORA = LoraConfig(rank=3, alpha=6.0, targets=("query", "value"))


def _members(method="lora", n=2, fingerprint="fp"):
    tm = toy.toy_task_model()
    spec = AdapterSpec(method, LORA)
    base, phi0 = forward.init_trainable(tm, spec, jax.random.key(0))
    out = []
    for i in range(n):
        d = toy.toy_task(seed=i + 1, n=48)
        arrays = {
            s: {k: v[j::3] for k, v in d.items()}
            for j, s in enumerate(["train", "validation", "test"])
        }
        exp = Experiment(
            task=f"t{i}",
            tm=tm,
            spec=spec,
            arrays=arrays,
            metric_fn=lambda p, a: {"accuracy": grid_eval.accuracy(p, a["label"])},
            task_spec=None,
        )
        leaves, treedef = jax.tree.flatten(base)
        keys = jax.random.split(jax.random.key(100 + i), len(leaves))
        tau = jax.tree.unflatten(
            treedef, [0.8 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
        )
        meta = {
            "task": f"t{i}",
            "base_model": "toy",
            "base_fingerprint": fingerprint if i == 0 else "fp",
            "adapter_kind": "lora",
            "mode": method,
            "targets": ["query", "value"],
            "rank": 3,
            "alpha": 6.0,
            "phi0_fingerprint": "x",
            "structure": tree_lib.structure_signature(tau),
            "metrics": {"test/accuracy": 0.5, "val/accuracy": 0.5},
        }
        out.append(search.Member(exp=exp, tv=TaskVector(tau=tau, meta=meta, phi0=phi0)))
    return out


@pytest.mark.parametrize("method", ["lora", "l_lora_model"])
def test_task_arithmetic_selection_equals_brute_force(method):
    members = _members(method)
    grid = [{"lam": lam} for lam in (0.0, 0.3, 0.7, 1.0)]
    got = search.fuse_subset(members, "task_arithmetic", grid=grid, batch_size=8)
    phi0 = members[0].tv.phi0
    fn = grid_eval.make_predict_fn(members[0].exp.tm, members[0].exp.spec)
    best = None
    for hp in grid:
        merged = tree_lib.add(
            phi0, tree_lib.scale(tree_lib.add(members[0].tv.tau, members[1].tv.tau), hp["lam"])
        )
        val = [
            grid_eval.accuracy(
                grid_eval.predict(
                    m.exp.tm, m.exp.spec, merged, phi0, m.exp.arrays["validation"], 8, fn
                ),
                m.exp.arrays["validation"]["label"],
            )
            for m in members
        ]
        if best is None or np.mean(val) > best[0]:
            test = [
                grid_eval.accuracy(
                    grid_eval.predict(
                        m.exp.tm, m.exp.spec, merged, phi0, m.exp.arrays["test"], 8, fn
                    ),
                    m.exp.arrays["test"]["label"],
                )
                for m in members
            ]
            best = (np.mean(val), hp, test)
    assert got["hparams"] == best[1]
    assert got["test"] == pytest.approx(dict(t0=best[2][0], t1=best[2][1]))
    assert got["avg_normalized"] == pytest.approx(np.mean(best[2]) / 0.5)


def test_every_grid_method_runs_and_records_choice():
    members = _members()
    for name, grid in [
        ("average", None),
        ("ties", [{"k": 0.5, "lam": 0.5}, {"k": 1.0, "lam": 1.0}]),
        ("dare", [{"p": 0.3, "lam": 0.5, "base": "task_arithmetic", "key": 0}]),
        ("isolation", [{"p": 0.1, "lam": 0.2}, {"p": 0.1, "lam": 0.9}]),
    ]:
        got = search.fuse_subset(members, name, grid=grid, batch_size=8)
        assert set(got["test"]) == {"t0", "t1"}, name
        if grid:
            assert got["hparams"] in grid, name


def _row_vector(vecs, coef):
    return jax.tree.map(lambda v: sum(c * v[j] for j, c in coef.items()), vecs)


@pytest.mark.parametrize(
    "name,fixed,entries",
    [
        ("average", {}, [{}]),
        ("task_arithmetic", {}, [{"lam": 0.3}, {"lam": 0.9}]),
        ("ties", {"k": 0.4}, [{"k": 0.4, "lam": 0.6}]),
        ("isolation", {"p": 0.2}, [{"p": 0.2, "lam": 0.35}]),
        (
            "dare",
            {"p": 0.3, "key": 1, "base": "ties", "k": 0.5},
            [{"p": 0.3, "key": 1, "base": "ties", "k": 0.5}],
        ),
    ],
)
def test_candidates_of_every_subset_equal_the_direct_merge(name, fixed, entries):
    """Each subset's candidate rows over the shared stack are the method's merge of it."""
    from llora_jax import fusion

    taus = [m.tv.tau for m in _members(n=3)]
    index = [[0, 1], [0, 2], [1, 2], [0, 1, 2], [2]]
    for vecs, rows in search.candidates(name, taus, index, fixed, entries):
        for ix, subset_rows in zip(index, rows):
            assert [hp for hp, _ in subset_rows] == entries
            for hp, coef in subset_rows:
                got = _row_vector(vecs, coef)
                want = fusion.get(name)([taus[i] for i in ix], **hp)
                for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_ties_candidates_share_one_program_for_every_k():
    """The keep count is traced: every k (1.0 included, which keeps every nonzero element)
    merges with one compiled program, and each equals ``fusion.ties`` of the subset."""
    from llora_jax import fusion

    taus = [m.tv.tau for m in _members(n=3)]
    index = [[0, 1], [0, 1, 2]]
    program = programs.program(programs.ties_of_count)
    before = program._cache_size()
    for k in (0.25, 0.5, 1.0):
        entry = {"k": k, "lam": 0.7}
        ((vecs, rows),) = search.candidates("ties", taus, index, {"k": k}, [entry])
        for ix, ((_, coef),) in zip(index, rows):
            want = fusion.ties([taus[i] for i in ix], k=k, lam=0.7)
            for a, b in zip(jax.tree.leaves(_row_vector(vecs, coef)), jax.tree.leaves(want)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert program._cache_size() - before <= 1


def test_dare_candidates_draw_each_tasks_mask_once_for_all_subsets():
    from llora_jax import fusion

    taus = [m.tv.tau for m in _members(n=3)]
    hp = {"p": 0.5, "key": 3, "base": "task_arithmetic", "lam": 0.8}
    fixed = {k: v for k, v in hp.items() if k != "lam"}
    ((vecs, rows),) = search.candidates("dare", taus, [[0, 1, 2], [0, 2]], fixed, [hp])
    dropped = fusion.drop_and_rescale(taus, fusion.random_masks(taus, 0.5, 3), 0.5)
    for ix, ((_, coef),) in zip([[0, 1, 2], [0, 2]], rows):
        got = _row_vector(vecs, coef)
        want = fusion.task_arithmetic([dropped[i] for i in ix], 0.8)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    full = fusion.dare(taus, 0.5, 3, lam=0.8)  # the full set: exactly fusion.dare
    got = _row_vector(vecs, rows[0][0][1])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(full)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "name,grid",
    [
        ("average", None),
        ("task_arithmetic", [{"lam": lam} for lam in (0.2, 0.6, 1.0)]),
        ("ties", [{"k": k, "lam": lam} for k in (0.3, 1.0) for lam in (0.5, 1.0)]),
        ("isolation", [{"p": 0.2, "lam": lam} for lam in (0.0, 0.5)]),
        ("lorahub", None),
    ],
)
def test_all_subsets_at_once_equal_one_subset_at_a_time(name, grid):
    """The batched search over every subset chooses and scores as subset-by-subset runs."""
    members = _members(n=3)
    subs = search.subsets([m.task for m in members])
    kw = dict(grid=grid, batch_size=8, lorahub_budget=6)
    together = search.fuse_subsets(members, name, subs, **kw)
    assert set(together) == {search.subset_key(s) for s in subs}
    for sub in subs:
        alone = search.fuse_subset([m for m in members if m.task in sub], name, **kw)
        got = together[search.subset_key(sub)]
        assert got["hparams"] == pytest.approx(alone["hparams"]), sub
        assert got["val"] == pytest.approx(alone["val"]), sub
        assert got["test"] == pytest.approx(alone["test"]), sub


def test_identical_candidates_are_evaluated_once(monkeypatch):
    """λ = 0 is the base model in every subset: each task's grid evaluates it once (and
    the search still equals the subset-by-subset one, above)."""
    members = _members(n=3)
    asked = []
    start = grid_eval.GridEvaluator.start

    def spy(self, base, phi0, taus, lambdas, *a, **k):
        asked.append(np.asarray(lambdas))
        return start(self, base, phi0, taus, lambdas, *a, **k)

    monkeypatch.setattr(grid_eval.GridEvaluator, "start", spy)
    grid = [{"lam": lam} for lam in (0.0, 0.5, 1.0)]
    search.fuse_subsets(members, "task_arithmetic", search.subsets(["t0", "t1", "t2"]), grid=grid)
    validation = asked[:3]  # one grid per task; each task is in 3 subsets × 3 λ = 9 rows
    assert [len(lam) for lam in validation] == [7, 7, 7]  # 3 subsets' λ = 0 rows: one
    assert all(len(np.unique(lam, axis=0)) == len(lam) for lam in validation)


def test_fuse_subsets_refuses_a_subset_with_an_unknown_task():
    with pytest.raises(ValueError, match="unknown: \\['t9'\\]"):
        search.fuse_subsets(_members(n=2), "average", [["t0", "t9"]])


def test_incompatible_vectors_are_refused():
    with pytest.raises(TaskVectorError, match="base_fingerprint"):
        search.fuse_subset(_members(fingerprint="other"), "average")


@pytest.mark.parametrize("method", ["lora", "l_lora_model"])
@pytest.mark.parametrize("grid", [(-1.0, 0.0, 1.5), (-1.0, 0.5, 1.5)])
def test_disentanglement_grid_equals_direct_loop(method, grid):
    """With 0 in the grid the single models come from the joint grid; without, apart."""
    m1, m2 = _members(method)
    xi = disentanglement_error(m1, m2, grid, n_examples=16, batch_size=8, chunk=4)
    assert xi.shape == (3, 3)
    if 0.0 in grid:
        assert xi[1, 1] == 0.0  # ξ(0, 0) = 0
    phi0 = m1.tv.phi0
    fn = grid_eval.make_predict_fn(m1.exp.tm, m1.exp.spec)

    def pred(m, l1, l2):
        merged = tree_lib.add(
            phi0, tree_lib.add(tree_lib.scale(m1.tv.tau, l1), tree_lib.scale(m2.tv.tau, l2))
        )
        arr = {k: v[:16] for k, v in m.exp.arrays["test"].items()}
        return grid_eval.predict(m.exp.tm, m.exp.spec, merged, phi0, arr, 8, fn)

    for i, l1 in enumerate(grid):
        for j, l2 in enumerate(grid):
            ref = np.mean(pred(m1, l1, 0) != pred(m1, l1, l2)) + np.mean(
                pred(m2, 0, l2) != pred(m2, l1, l2)
            )
            assert xi[i, j] == pytest.approx(ref), (l1, l2)
    assert xi.max() > 0


def test_subsets_cover_all_combinations():
    s = search.subsets(["a", "b", "c"])
    assert s == [("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c")]
    assert search.subset_key(("b", "a")) == "a+b"


def _scaled_readout(call, batch, head, train):
    return {"logits": call(batch["x"]) * head["w"]}


def test_shared_evaluator_uses_each_members_own_head():
    import dataclasses

    members = _members()
    for i, m in enumerate(members):
        tm = dataclasses.replace(
            m.exp.tm,
            readout=_scaled_readout,
            head={"w": np.asarray([1.0, -1.0, 0.5]) * (i * 2 - 1)},
        )
        m.exp = dataclasses.replace(m.exp, tm=tm)
    ev0, ev1 = (m.grid(8, 4) for m in members)
    assert ev0 is ev1  # one compiled program for both tasks
    phi0 = members[0].tv.phi0
    lam = np.array([[1.0, 0.5]], np.float32)
    taus = [m.tv.tau for m in members]
    merged = tree_lib.add(phi0, tree_lib.weighted_sum(taus, lam[0]))
    for m in members:
        got = m.grid(8, 4).predict(phi0, phi0, taus, lam, m.exp.arrays["test"], m.exp.tm)[0]
        ref = grid_eval.predict(m.exp.tm, m.exp.spec, merged, phi0, m.exp.arrays["test"], 8)
        np.testing.assert_array_equal(got, ref)


def test_an_undefined_validation_score_never_wins_the_selection(monkeypatch):
    """A setting whose validation score is NaN (e.g. a correlation of constant predictions)
    must not be chosen: np.argmax alone would pick it."""
    members = _members(n=2)
    grid = [{"lam": 0.0}, {"lam": 0.5}, {"lam": 1.0}]
    calls = []
    orig = search._evaluate

    def spy(*args, **kw):
        out = orig(*args, **kw)
        if args[-1] == "validation":
            out = [v.copy() for v in out]
            out[0][0] = np.nan  # the first grid row (λ = 0) has an undefined score
            calls.append(out)
        return out

    monkeypatch.setattr(search, "_evaluate", spy)
    got = search.fuse_subset(members, "task_arithmetic", grid=grid, batch_size=8)
    assert calls and got["hparams"]["lam"] != 0.0


def test_stsb_constant_predictions_score_zero_correlation():

    from llora_jax.data import get_task

    spec = get_task("stsb")
    n = len(text_encoder.bin_centres(spec))
    arrays = {"score": np.linspace(0.0, 5.0, 12), "label": np.zeros(12, np.int32)}
    const = text_encoder.metrics(spec, np.full(12, n // 2), arrays)
    assert const["pearson"] == 0.0 and const["spearman"] == 0.0
    varied = text_encoder.metrics(spec, np.arange(12) % n, arrays)
    ref = np.corrcoef(text_encoder.bin_centres(spec)[np.arange(12) % n], arrays["score"])[0, 1]
    assert varied["pearson"] == pytest.approx(ref)


@pytest.mark.parametrize(
    "name,hp",
    [
        ("average", {}),
        ("task_arithmetic", {"lam": 0.7}),
        ("ties", {"k": 0.5, "lam": 1.0}),
        ("dare", {"p": 0.3, "lam": 1.0, "base": "task_arithmetic", "key": 0}),
        ("isolation", {"p": 0.1, "lam": 0.4}),
    ],
)
def test_compiled_merge_equals_the_eager_fusion_function(name, hp):
    from llora_jax import fusion

    taus = [m.tv.tau for m in _members(n=3)]
    got = programs.merge(name, taus, **hp)
    want = fusion.get(name)(taus, **hp)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert programs.merge(name, taus[:2], **hp) is not None  # another task count: its own program
