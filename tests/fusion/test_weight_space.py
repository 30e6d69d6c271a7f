"""Per-task A0 and ΔW-space members: the ΔW model is the adapter's model; ΔW merges add."""

import dataclasses
import zlib

import jax
import numpy as np
import pytest

from llora_jax import forward
from llora_jax import tree as tree_lib
from llora_jax.adapters import LoraConfig
from llora_jax.evaluation import grid as grid_eval
from llora_jax.fusion import search, weight_space
from llora_jax.task_vectors import TaskVector
from llora_jax.tasks import Experiment
from llora_jax.types import AdapterSpec
from tests.fixtures import toy

LORA = LoraConfig(rank=3, alpha=6.0, targets=("query", "value"))


def test_per_task_a0_key_is_the_seed_folded_with_the_task_crc():
    shared = AdapterSpec("l_lora", LORA)
    own = AdapterSpec("l_lora", dataclasses.replace(LORA, a0="per_task"))
    k0 = jax.random.key_data(jax.random.key(3))
    assert np.array_equal(jax.random.key_data(forward.init_key(3, "cola", shared)), k0)
    want = jax.random.fold_in(jax.random.key(3), zlib.crc32(b"cola") & 0x7FFFFFFF)
    got = forward.init_key(3, "cola", own)
    assert np.array_equal(jax.random.key_data(got), jax.random.key_data(want))
    tm = toy.toy_task_model()
    a = [forward.init_trainable(tm, own, forward.init_key(3, t, own))[1] for t in ("cola", "rte")]
    assert not np.allclose(a[0]["layer_0"]["query"]["A"], a[1]["layer_0"]["query"]["A"])
    with pytest.raises(ValueError, match="task name"):
        forward.init_key(3, None, own)
    with pytest.raises(ValueError, match="a0 must be"):
        LoraConfig(a0="each")


def toy_member(method, task, a0="per_task", seed=0):
    tm = toy.toy_task_model()
    spec = AdapterSpec(method, dataclasses.replace(LORA, a0=a0))
    _, phi0 = forward.init_trainable(tm, spec, forward.init_key(seed, task, spec))
    leaves, treedef = jax.tree.flatten(phi0)
    keys = jax.random.split(jax.random.key(zlib.crc32(task.encode())), len(leaves))
    tau = jax.tree.unflatten(
        treedef, [0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    if method == "l_lora":  # A never trains under L-LoRA with B0 = 0
        tau = {k: v for k, v in tree_lib.flatten(tau).items()}
        tau = tree_lib.unflatten({k: (0 * v if k.endswith("/A") else v) for k, v in tau.items()})
    d = toy.toy_task(seed=zlib.crc32(task.encode()) % 100, n=48)
    arrays = {
        s: {k: v[j::3] for k, v in d.items()} for j, s in enumerate(["train", "validation", "test"])
    }
    exp = Experiment(
        task=task,
        tm=tm,
        spec=spec,
        arrays=arrays,
        metric_fn=lambda p, a: {"accuracy": grid_eval.accuracy(p, a["label"])},
        task_spec=None,
    )
    meta = {
        "task": task,
        "base_model": "toy",
        "base_fingerprint": "fp",
        "adapter_kind": "lora",
        "mode": method,
        "targets": ["query", "value"],
        "rank": 3,
        "alpha": 6.0,
        "phi0_fingerprint": tree_lib.fingerprint(phi0),
        "metrics": {"test/accuracy": 0.5, "val/accuracy": 0.5},
    }
    return search.Member(exp=exp, tv=TaskVector(tau=tau, meta=meta, phi0=phi0))


@pytest.mark.parametrize("method", ["lora", "l_lora"])
def test_delta_w_member_is_the_adapted_model(method):
    m = toy_member(method, "cola")
    dw = weight_space.delta_w_member(m)
    assert dw.exp.spec.method == "full" and dw.tv.phi0 is None
    assert sorted(tree_lib.flatten(dw.tv.tau)) == sorted(
        f"layer_{i}/{n}/kernel" for i in range(2) for n in ("query", "value")
    )
    x = m.exp.arrays["test"]
    phi = tree_lib.add(m.tv.phi0, m.tv.tau)
    want = forward.forward(m.exp.tm, m.exp.spec, phi, m.tv.phi0, x)["logits"]
    base = forward.full_trainable(dw.exp.tm)
    trainable = tree_lib.add(base, dw.tv.tau)
    got = forward.forward(dw.exp.tm, dw.exp.spec, trainable, None, x)["logits"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # Float64 reference of one layer's ΔW.
    a0 = np.asarray(m.tv.phi0["layer_1"]["value"]["A"], np.float64)
    ta = np.asarray(m.tv.tau["layer_1"]["value"]["A"], np.float64)
    tb = np.asarray(m.tv.tau["layer_1"]["value"]["B"], np.float64)
    ref = 2.0 * (a0 @ tb + (ta @ tb if method == "lora" else 0))
    np.testing.assert_allclose(
        np.asarray(dw.tv.tau["layer_1"]["value"]["kernel"]), ref, rtol=1e-5, atol=1e-6
    )


def test_per_task_a0_members_merge_only_as_delta_w():
    members = [toy_member("l_lora", t) for t in ("cola", "rte")]
    grid = [{"lam": lam} for lam in (0.5, 1.0)]
    with pytest.raises(ValueError, match="phi0"):
        search.fuse_subset(members, "task_arithmetic", grid=grid, batch_size=8)
    dws = [weight_space.delta_w_member(m) for m in members]
    got = search.fuse_subset(dws, "task_arithmetic", grid=grid, batch_size=8)
    # The chosen λ's merged model, by hand: θ0 + λ Σ ΔW in every adapted kernel.
    lam = got["hparams"]["lam"]
    base = forward.full_trainable(dws[0].exp.tm)  # θ0's adapted kernels
    kernels = jax.tree.map(lambda w, a, b: w + lam * (a + b), base, dws[0].tv.tau, dws[1].tv.tau)
    merged = forward.merge_full(members[0].exp.tm.params, kernels)
    for m in members:
        tm = dataclasses.replace(m.exp.tm, params=merged)
        out = forward.forward(
            tm, AdapterSpec("full"), forward.full_trainable(tm), None, m.exp.arrays["test"]
        )
        acc = grid_eval.accuracy(
            np.asarray(forward.argmax_predict(out, None)), m.exp.arrays["test"]["label"]
        )
        assert got["test"][m.task] == pytest.approx(acc)


def test_shared_a0_task_arithmetic_is_the_same_in_both_spaces():
    members = [toy_member("l_lora", t, a0="shared") for t in ("cola", "rte")]
    grid = [{"lam": lam} for lam in (0.3, 0.6, 1.0)]
    adapter = search.fuse_subset(members, "task_arithmetic", grid=grid, batch_size=8)
    dw = search.fuse_subset(
        [weight_space.delta_w_member(m) for m in members],
        "task_arithmetic",
        grid=grid,
        batch_size=8,
    )
    assert adapter["hparams"] == dw["hparams"]
    assert adapter["val"] == pytest.approx(dw["val"]) and adapter["test"] == pytest.approx(
        dw["test"]
    )


def test_delta_w_refuses_what_it_cannot_represent():
    m = toy_member("lora", "cola")
    nonzero_b = dataclasses.replace(m.exp.spec.lora, init_b="normal")
    with pytest.raises(ValueError, match="B0 = 0"):
        weight_space.delta_w_tree(m.tv, AdapterSpec("lora", nonzero_b))
    with pytest.raises(ValueError, match="lora or l_lora"):
        weight_space.delta_w_tree(m.tv, AdapterSpec("l_lora_model", LORA))
