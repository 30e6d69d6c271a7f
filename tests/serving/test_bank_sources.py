"""Banks of imported PEFT adapters (delta_w task vectors) and of a fusion result, against
independent references (torch + peft; the fused adapter applied alone)."""

import copy

import jax
import numpy as np
from peft import PeftModel

from llora_jax import adapters, fusion, task_vectors
from llora_jax import tree as tree_lib
from llora_jax.adapters import routed
from llora_jax.interop import api as interop
from llora_jax.serving import entries
from llora_jax.serving.bank import AdapterBank
from tests.fixtures import interop_models as im

TOL = 1e-5


def _routed_rows(bb, bank, names):
    """Row i of the test batch through adapter names[i] (None = base)."""
    dev, ids = bank.resolve(names)
    return np.asarray(routed.apply(bb.module, bb.params, dev, ids, im.token_batch()))


def test_bank_of_imported_peft_adapters_equals_peft(tmp_path):
    model, ckpt = im.bert(tmp_path / "base")
    targets = ["query", "value"]
    im.peft_adapter(
        copy.deepcopy(model), tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=targets
    )
    im.peft_adapter(
        copy.deepcopy(model),
        tmp_path / "b",
        seed=2,
        r=2,
        lora_alpha=3,
        target_modules=targets,
        use_rslora=True,
    )
    interop.import_peft([tmp_path / "a", tmp_path / "b"], ckpt, tmp_path / "bank")
    bb = im.load(ckpt)
    bank = AdapterBank.from_directory(tmp_path / "bank", capacity=2)
    assert bank.kind == "dense" and bank.metas["a"]["adapter_kind"] == "delta_w"
    want = {
        n: im.torch_outputs("bert", PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / n))
        for n in "ab"
    }
    base = im.torch_outputs("bert", model)
    assert np.abs(want["a"] - base).max() > 1e-2  # the adapters change the outputs
    got = _routed_rows(bb, bank, ["a", "b"])
    np.testing.assert_allclose(got[0], want["a"][0], atol=TOL)
    np.testing.assert_allclose(got[1], want["b"][1], atol=TOL)
    got = _routed_rows(bb, bank, ["b", None])
    np.testing.assert_allclose(got[0], want["b"][0], atol=TOL)
    np.testing.assert_allclose(got[1], base[1], atol=TOL)


def _lora_tv(bb, seed, phi0):
    leaves, tdef = jax.tree.flatten(phi0)
    keys = jax.random.split(jax.random.key(100 + seed), len(leaves))
    tau = jax.tree.unflatten(
        tdef, [0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    meta = task_vectors.make_meta(
        base_model="tiny",
        base_fingerprint="x",
        adapter_kind="lora",
        mode="lora",
        task=f"t{seed}",
        seed=seed,
        steps=1,
        targets=["query", "value"],
        rank=2,
        alpha=4.0,
        phi0_fingerprint=tree_lib.fingerprint(phi0),
    )
    return task_vectors.TaskVector(tau=tau, meta=meta, phi0=phi0)


def test_bank_with_a_fusion_result_equals_the_fused_adapter_alone(tmp_path):
    _, ckpt = im.bert(tmp_path / "base")
    bb = im.load(ckpt)
    cfg = adapters.LoraConfig(rank=2, alpha=4.0, targets=("query", "value"))
    phi0 = adapters.init_lora(jax.random.key(0), bb.params, cfg)
    tvs = [_lora_tv(bb, s, phi0) for s in (1, 2)]
    fused = entries.fused_entry(tvs, "task_arithmetic", name="ta", lam=0.4)
    bank = AdapterBank({"ta": fused, "t1": entries.entry_from_task_vector(tvs[0])}, capacity=2)
    got = _routed_rows(bb, bank, ["ta", "t1"])
    merged_phi = tree_lib.add(phi0, fusion.get("task_arithmetic")([t.tau for t in tvs], lam=0.4))
    want_fused = im.jax_outputs("bert", bb, merged_phi, cfg.scale)
    want_one = im.jax_outputs("bert", bb, tree_lib.add(phi0, tvs[0].tau), cfg.scale)
    np.testing.assert_allclose(got[0], want_fused[0], atol=TOL)
    np.testing.assert_allclose(got[1], want_one[1], atol=TOL)
    assert np.abs(want_fused - want_one).max() > 1e-3
