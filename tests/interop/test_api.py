"""The CLI-facing functions: import several adapters, re-export them, round trips."""

from __future__ import annotations

import copy
import shutil

import jax
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from llora_jax import adapters, task_vectors
from llora_jax import tree as tree_lib
from llora_jax.interop import api
from llora_jax.interop.delta_w import merged_params
from llora_jax.interop.peft_export import export_peft
from tests.fixtures import interop_models as im


def test_import_export_round_trips(tmp_path):
    model, ckpt = im.bert(tmp_path / "base")
    bb = im.load(ckpt)
    im.peft_adapter(
        copy.deepcopy(model),
        tmp_path / "src" / "plain",
        r=2,
        lora_alpha=4,
        target_modules=["query"],
    )
    cfg = adapters.LoraConfig(rank=2, alpha=4.0, targets=("query",), init_b="normal")
    phi0 = jax.tree.map(np.asarray, adapters.init_lora(jax.random.key(0), bb.params, cfg))
    tau = jax.tree.map(lambda x: (0.1 * x[::-1]).astype(np.float32), phi0)
    meta = task_vectors.make_meta(
        base_model=str(ckpt),
        base_fingerprint=tree_lib.fingerprint(bb.params),
        adapter_kind="lora",
        mode="lora",
        task="mine",
        seed=7,
        steps=10,
        targets=cfg.targets,
        rank=2,
        alpha=4.0,
    )
    export_peft(
        task_vectors.TaskVector(tau=tau, meta=meta, phi0=phi0), bb, tmp_path / "src" / "mine"
    )

    paths = api.import_peft(
        [tmp_path / "src" / "plain", tmp_path / "src" / "mine"], ckpt, tmp_path / "tv"
    )
    plain, mine = (task_vectors.load(p) for p in paths)
    assert plain.meta["adapter_kind"] == "delta_w"
    assert mine.meta["adapter_kind"] == "lora" and mine.meta["seed"] == 7
    assert jax.tree.all(jax.tree.map(np.array_equal, mine.tau, tau))  # exact, adapter space
    assert jax.tree.all(jax.tree.map(np.array_equal, mine.phi0, phi0))

    again = api.export_peft(paths[0], tmp_path / "again")  # the PEFT files, byte for byte
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (again / name).read_bytes() == (tmp_path / "src" / "plain" / name).read_bytes()

    hf = api.export_hf(paths[0], tmp_path / "hf", backbone=bb)
    got = im.torch_outputs(
        "bert", transformers.BertModel.from_pretrained(hf, add_pooling_layer=False)
    )
    want = np.asarray(
        bb.module.apply({"params": merged_params(bb.params, plain.tau)}, im.token_batch())
    )
    np.testing.assert_allclose(got, want, atol=1e-5)

    edited = tmp_path / "src" / "edited"  # weights changed after export: side files refused
    shutil.copytree(tmp_path / "src" / "mine", edited)
    st = load_file(edited / "adapter_model.safetensors")
    save_file({k: v * 1.5 for k, v in st.items()}, edited / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="llora_task_vector.safetensors does not match"):
        api.import_peft([edited], bb, tmp_path / "tv3")

    with pytest.raises(FileExistsError):
        api.import_peft([tmp_path / "src" / "plain"], bb, tmp_path / "tv")
    with pytest.raises(ValueError, match="share a name"):
        api.import_peft([tmp_path / "src" / "plain", tmp_path / "plain"], bb, tmp_path / "tv2")
