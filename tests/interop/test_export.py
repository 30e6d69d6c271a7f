"""Exports: task vectors -> PEFT adapters (PeftModel gives llora-jax's outputs), -> HF checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import json

import jax
import numpy as np
import pytest
import transformers
from peft import PeftModel

from llora_jax import adapters, fusion, task_vectors
from llora_jax import tree as tree_lib
from llora_jax.interop import delta_w as dw
from llora_jax.interop.hf_export import export_hf
from llora_jax.interop.peft_export import ExportError, export_peft, read_exported
from llora_jax.interop.peft_import import read_peft_adapter
from tests.fixtures import interop_models as im

TARGETS = ("query", "value", "intermediate/dense")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model, ckpt = im.bert(root / "base")
    return model, im.load(ckpt), root


def _lora_tv(bb, mode: str, b0: str, seed: int = 0) -> task_vectors.TaskVector:
    cfg = adapters.LoraConfig(rank=4, alpha=6.0, targets=TARGETS, init_b=b0, b0_std=0.1)
    phi0 = adapters.init_lora(jax.random.key(seed), bb.params, cfg)
    leaves, treedef = jax.tree.flatten(phi0)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    tau = jax.tree.unflatten(
        treedef, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    )
    meta = task_vectors.make_meta(
        base_model=str(bb.path),
        base_fingerprint=tree_lib.fingerprint(bb.params),
        adapter_kind="lora",
        mode=mode,
        task="t",
        seed=seed,
        steps=3,
        targets=TARGETS,
        rank=cfg.rank,
        alpha=cfg.alpha,
        phi0_fingerprint=tree_lib.fingerprint(phi0),
        recipe={"method": "task_arithmetic", "lam": 0.3},
    )
    to_np = lambda t: jax.tree.map(np.asarray, t)  # noqa: E731
    return task_vectors.TaskVector(tau=to_np(tau), meta=meta, phi0=to_np(phi0))


def _jax_out(bb, t: task_vectors.TaskVector) -> np.ndarray:
    phi = tree_lib.add(t.phi0, t.tau)
    s = t.meta["alpha"] / t.meta["rank"]
    ids = im.token_batch()
    return np.asarray(
        adapters.apply(bb.module, bb.params, phi, ids, mode=t.meta["mode"], phi0=t.phi0, scale=s)
    )


def _peft_out(model, adapter_dir) -> np.ndarray:
    return im.torch_outputs(
        "bert", PeftModel.from_pretrained(copy.deepcopy(model), adapter_dir).eval()
    )


@pytest.mark.parametrize(
    "mode, b0, rank", [("lora", "normal", 4), ("l_lora", "zero", 4), ("l_lora", "normal", 8)]
)
def test_export_peft_gives_the_same_outputs(bert, tmp_path, mode, b0, rank):
    model, bb, _ = bert
    t = _lora_tv(bb, mode, b0)
    out = export_peft(t, bb, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == rank  # l_lora with B0 != 0 needs [A0 | A], [B - B0; B0]
    want = _jax_out(bb, t)
    assert np.abs(want - im.torch_outputs("bert", model)).max() > 1e-2
    np.testing.assert_allclose(_peft_out(model, out), want, atol=1e-4)
    back = read_exported(out)  # round trip, bit for bit
    assert back.meta == json.loads(json.dumps(t.meta))
    for a, b in ((back.tau, t.tau), (back.phi0, t.phi0)):
        assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
    assert jax.tree.all(jax.tree.map(lambda x, y: x.dtype == y.dtype, back.tau, t.tau))


def test_l_lora_model_is_refused_saying_why(bert, tmp_path):
    _, bb, _ = bert
    t = _lora_tv(bb, "l_lora_model", "zero")
    for fn in (export_peft, export_hf):
        with pytest.raises(ExportError, match="l_lora_model.*whole network"):
            fn(t, bb, tmp_path / "x")
    assert not list(tmp_path.iterdir())


def _imported(bb, root, model):
    for name, kw in (
        ("a", dict(r=4, lora_alpha=8)),
        ("b", dict(r=2, lora_alpha=3, rank_pattern={"value": 1})),
    ):
        if not (root / name).exists():
            im.peft_adapter(
                copy.deepcopy(model),
                root / name,
                seed=len(name) + ord(name),
                target_modules=["query", "value"],
                **kw,
            )
    ads = [read_peft_adapter(root / n, bb) for n in ("a", "b")]
    return [dw.delta_w_tree(a.phi, a.scale) for a in ads]


def test_delta_w_merge_exports_to_peft_by_svd(bert, tmp_path):
    model, bb, root = bert
    taus = _imported(bb, root, model)
    lams = [0.6, 0.5]
    merged = tree_lib.add(tree_lib.scale(taus[0], lams[0]), tree_lib.scale(taus[1], lams[1]))
    meta = task_vectors.make_meta(
        base_model=str(bb.path),
        base_fingerprint="x",
        adapter_kind="delta_w",
        mode="delta_w",
        task="m",
        seed=0,
        steps=0,
    )
    out = export_peft(task_vectors.TaskVector(tau=merged, meta=meta), bb, tmp_path / "svd")
    cfg = json.loads((out / "adapter_config.json").read_text())
    # query layers: rank 4 + 2, value layers 4 + 1 (the exact rank of the merged ΔW)
    assert {cfg["r"], *cfg["rank_pattern"].values()} == {5, 6} and len(cfg["rank_pattern"]) == 2
    want = np.asarray(
        bb.module.apply({"params": dw.merge_weighted(bb.params, taus, lams)}, im.token_batch())
    )
    np.testing.assert_allclose(_peft_out(model, out), want, atol=1e-4)


def test_export_hf_loads_in_transformers_with_the_merged_outputs(bert, tmp_path):
    model, bb, root = bert
    taus = _imported(bb, root, model)
    merged = dw.merge_weighted(bb.params, taus, [1.0, -0.7])
    tau = tree_lib.add(taus[0], tree_lib.scale(taus[1], -0.7))
    meta = task_vectors.make_meta(
        base_model=str(bb.path),
        base_fingerprint="x",
        adapter_kind="delta_w",
        mode="delta_w",
        task="m",
        seed=0,
        steps=0,
    )
    out = export_hf(task_vectors.TaskVector(tau=tau, meta=meta), bb, tmp_path / "hf")
    got = im.torch_outputs(
        "bert", transformers.BertModel.from_pretrained(out, add_pooling_layer=False).eval()
    )
    want = np.asarray(bb.module.apply({"params": merged}, im.token_batch()))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_export_hf_of_a_t5_lora_task_vector(tmp_path):
    model, ckpt = im.t5(tmp_path / "t5", gated=True)
    bb = im.load(ckpt)
    cfg = adapters.LoraConfig(
        rank=2, alpha=4.0, targets=("SelfAttention/(q|v)", "wi_0"), init_b="normal"
    )
    phi = adapters.init_lora(jax.random.key(0), bb.params, cfg)
    t = task_vectors.TaskVector(
        tau=jax.tree.map(np.asarray, phi),
        meta=dict(adapter_kind="lora", mode="lora", rank=2, alpha=4.0, task="t"),
        phi0=jax.tree.map(np.zeros_like, phi),
    )
    out = export_hf(t, bb, tmp_path / "hf")
    ids = im.token_batch()
    want = np.asarray(
        adapters.apply(
            bb.module,
            bb.params,
            phi,
            ids,
            np.ones_like(ids),
            im.token_batch(1, length=5),
            scale=2.0,
        )
    )
    got = im.torch_outputs(
        "t5", transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    )
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_mixed_rank_adapter_exports_and_fuses(bert, tmp_path):
    """Layers of different rank and scale (rank_pattern / alpha_pattern) through fusion and export."""
    model, bb, root = bert
    im.peft_adapter(
        copy.deepcopy(model),
        tmp_path / "mixed",
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        rank_pattern={"value": 2},
        alpha_pattern={"query": 3.0},
    )
    imported = read_peft_adapter(tmp_path / "mixed", bb)
    assert isinstance(imported.scale, dict)
    zeros = jax.tree.map(np.zeros_like, imported.phi)
    meta = dict(adapter_kind="lora", mode="lora", task="mixed", scale=imported.scale)
    merged = fusion.task_arithmetic([imported.phi, imported.phi], 0.5)  # = φ, mixed shapes
    for name in fusion.GRID_METHODS:
        out = fusion.get(name)([imported.phi, zeros], **fusion.hparam_grid(name)[-1])
        assert tree_lib.structure_signature(out) == tree_lib.structure_signature(imported.phi), name
    t = task_vectors.TaskVector(tau=jax.tree.map(np.asarray, merged), meta=meta, phi0=zeros)
    out = export_peft(t, bb, tmp_path / "peft")
    want = im.torch_outputs(
        "bert", PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "mixed")
    )
    np.testing.assert_allclose(_peft_out(model, out), want, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "t5", "clip"])
def test_export_hf_of_a_full_task_vector(tmp_path, kind):
    """Every parameter changed (embeddings, norms, biases, conv): the HF names and layouts."""
    build = {"bert": im.bert, "t5": lambda p: im.t5(p, gated=False), "clip": im.clip}[kind]
    _, ckpt = build(tmp_path / "base")
    bb = im.load(ckpt)
    leaves, treedef = jax.tree.flatten(bb.params)
    rng = np.random.default_rng(0)
    tau = jax.tree.unflatten(
        treedef, [(0.02 * rng.normal(size=np.shape(x))).astype(np.float32) for x in leaves]
    )
    meta = dict(adapter_kind="full", mode="full", task="f")
    out = export_hf(task_vectors.TaskVector(tau=tau, meta=meta), bb, tmp_path / "hf")
    changed = dw.merged_params(bb.params, tau)
    want = im.jax_outputs(kind, dataclasses.replace(bb, params=changed))
    cls = {
        "bert": lambda p: transformers.BertModel.from_pretrained(p, add_pooling_layer=False),
        "t5": transformers.T5ForConditionalGeneration.from_pretrained,
        "clip": transformers.CLIPModel.from_pretrained,
    }[kind]
    got = im.torch_outputs(kind, cls(out).eval())
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(want - im.jax_outputs(kind, bb)).max() > 1e-3
