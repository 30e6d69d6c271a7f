"""Weight-space (delta_w) task vectors of imported PEFT adapters: merging, storage, checks."""

from __future__ import annotations

import copy
import hashlib

import jax
import numpy as np
import pytest
from peft import PeftModel

from llora_jax import fusion, task_vectors
from llora_jax import tree as tree_lib
from llora_jax.interop import delta_w as dw
from llora_jax.interop.peft_import import read_peft_adapter
from tests.fixtures import interop_models as im

TARGETS = ["query", "value", "intermediate.dense"]


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """A tiny BERT and two PEFT adapters of different rank and α on the same layers."""
    root = tmp_path_factory.mktemp("dw")
    model, ckpt = im.bert(root / "base")
    im.peft_adapter(
        copy.deepcopy(model), root / "a", seed=1, r=4, lora_alpha=8, target_modules=TARGETS
    )
    im.peft_adapter(
        copy.deepcopy(model), root / "b", seed=2, r=2, lora_alpha=3, target_modules=TARGETS
    )
    bb = im.load(ckpt)
    return model, bb, root


def test_weighted_delta_w_equals_peft_cat(two_adapters):
    model, bb, root = two_adapters
    weights = [0.7, -0.4]
    pm = PeftModel.from_pretrained(copy.deepcopy(model), root / "a", adapter_name="a")
    pm.load_adapter(root / "b", adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], weights, "m", combination_type="cat")
    pm.set_adapter("m")
    want = im.torch_outputs("bert", pm.eval())
    taus = [
        dw.delta_w_tree(ad.phi, ad.scale)
        for ad in (read_peft_adapter(root / n, bb) for n in ("a", "b"))
    ]
    merged = dw.merge_weighted(bb.params, taus, weights)
    got = np.asarray(bb.module.apply({"params": merged}, im.token_batch()))
    base = im.torch_outputs("bert", model)
    assert np.abs(want - base).max() > 1e-2
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_single_delta_w_equals_adapter_path(two_adapters):
    _, bb, root = two_adapters
    ad = read_peft_adapter(root / "a", bb)
    via_adapter = im.jax_outputs("bert", bb, ad.phi, ad.scale)
    merged = dw.merged_params(bb.params, dw.delta_w_tree(ad.phi, ad.scale))
    direct = np.asarray(bb.module.apply({"params": merged}, im.token_batch()))
    np.testing.assert_allclose(direct, via_adapter, atol=1e-5)


def test_fusion_methods_accept_delta_w_trees(two_adapters):
    _, bb, root = two_adapters
    taus = [dw.delta_w_tree(read_peft_adapter(root / n, bb).phi, 1.0) for n in ("a", "b")]
    for name in fusion.GRID_METHODS:
        hp = fusion.hparam_grid(name)[-1]
        out = fusion.get(name)(taus, **hp)
        assert tree_lib.structure_signature(out) == tree_lib.structure_signature(taus[0]), name
    ta = fusion.task_arithmetic(taus, 0.3)
    for k, v in tree_lib.flatten(ta).items():
        want = 0.3 * (tree_lib.flatten(taus[0])[k] + tree_lib.flatten(taus[1])[k])
        np.testing.assert_allclose(np.asarray(v), want, rtol=1e-6, atol=1e-7)


def test_save_load_provenance_and_compatibility(two_adapters, tmp_path):
    _, bb, root = two_adapters
    ads = [read_peft_adapter(root / n, bb) for n in ("a", "b")]
    paths = [dw.save_imported(tmp_path / n, ad, bb, task=n) for n, ad in zip("ab", ads)]
    loaded = task_vectors.load_many(paths)  # compatible: same base, kind and targets
    for ad, t in zip(ads, loaded):
        assert t.meta["adapter_kind"] == "delta_w" and t.phi0 is None
        want = dw.delta_w_tree(ad.phi, ad.scale)
        assert jax.tree.all(jax.tree.map(np.array_equal, t.tau, want))
        sha = hashlib.sha256((root / t.task / "adapter_model.safetensors").read_bytes()).hexdigest()
        assert t.meta["provenance"]["sha256"] == sha
        assert t.meta["provenance"]["source"].endswith(t.task)
        kept = read_peft_adapter(t.path / dw.ADAPTER_DIR, bb)  # A and B kept exactly
        assert jax.tree.all(jax.tree.map(np.array_equal, kept.phi, ad.phi))
    other_kind = dict(loaded[1].meta, adapter_kind="lora")
    with pytest.raises(task_vectors.TaskVectorError, match="adapter_kind"):
        task_vectors.check_compatible([loaded[0].meta, other_kind])
    other_base = dict(loaded[1].meta, base_fingerprint="0" * 16)
    with pytest.raises(task_vectors.TaskVectorError, match="base_fingerprint"):
        task_vectors.check_compatible([loaded[0].meta, other_base])
    other_targets = dict(loaded[1].meta, targets=loaded[1].meta["targets"][:1])
    with pytest.raises(task_vectors.TaskVectorError, match="targets"):
        task_vectors.check_compatible([loaded[0].meta, other_targets])
    with pytest.raises(task_vectors.TaskVectorError, match="phi0"):
        task_vectors.save(tmp_path / "x", loaded[0].tau, loaded[0].meta, phi0=loaded[0].tau)
    with pytest.raises(FileExistsError):
        dw.save_imported(paths[0], ads[0], bb, task="a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # nothing half-written


def test_merged_params_refuses_foreign_leaves(two_adapters):
    _, bb, _ = two_adapters
    with pytest.raises(ValueError, match="not a parameter"):
        dw.merged_params(bb.params, {"nope": {"kernel": np.zeros((2, 2))}})
