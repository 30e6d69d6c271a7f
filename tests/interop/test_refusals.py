"""What a PEFT adapter holds that llora-jax cannot represent is refused, naming field and adapter."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import huggingface_hub
import numpy as np
import pytest
from peft import LoraConfig
from safetensors.numpy import load_file, save_file

from llora_jax.interop.peft_config import REFUSED, PeftImportError
from llora_jax.interop.peft_import import read_peft_adapter
from tests.fixtures import interop_models as im


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("refuse")
    model, ckpt = im.bert(root / "base")
    im.peft_adapter(
        copy.deepcopy(model), root / "good", r=4, lora_alpha=8, target_modules=["query"]
    )
    return im.load(ckpt), root


def _variant(root, name, tmp_path, edit_config=None, edit_weights=None):
    out = tmp_path / name
    shutil.copytree(root / "good", out)
    if edit_config:
        cfg = json.loads((out / "adapter_config.json").read_text())
        edit_config(cfg)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    if edit_weights:
        file = out / "adapter_model.safetensors"
        save_file(edit_weights(load_file(file)), file)
    return out


@pytest.mark.parametrize(
    "field, value",
    [
        ("peft_type", "IA3"),
        ("peft_type", "LOHA"),
        ("use_dora", True),
        ("bias", "all"),
        ("bias", "lora_only"),
        ("modules_to_save", ["classifier"]),
        ("lora_bias", True),
        ("init_lora_weights", "pissa"),
        ("layer_replication", [[0, 2]]),
    ],
)
def test_unrepresentable_fields_are_refused(setup, tmp_path, field, value):
    bb, root = setup
    src = _variant(root, "bad", tmp_path, edit_config=lambda c: c.update({field: value}))
    with pytest.raises(PeftImportError, match=field) as err:
        read_peft_adapter(src, bb)
    assert str(src) in str(err.value)


def test_base_model_name_mismatch_is_refused_unless_forced(setup, tmp_path):
    bb, root = setup
    src = _variant(
        root, "other", tmp_path, edit_config=lambda c: c.update(base_model_name_or_path="x/y-large")
    )
    with pytest.raises(PeftImportError, match="base_model_name_or_path") as err:
        read_peft_adapter(src, bb)
    assert "force" in str(err.value) and str(src) in str(err.value)
    assert read_peft_adapter(src, bb, force=True).phi  # the name check only


def test_shape_mismatch_is_refused_even_when_forced(setup, tmp_path):
    bb, root = setup

    def widen(state):
        return {
            k: (np.zeros((v.shape[0], v.shape[1] + 1), v.dtype) if "lora_A" in k else v)
            for k, v in state.items()
        }

    src = _variant(root, "wide", tmp_path, edit_weights=widen)
    with pytest.raises(PeftImportError, match="shape mismatch") as err:
        read_peft_adapter(src, bb, force=True)
    assert "query" in str(err.value)


def test_rank_disagreeing_with_config_is_refused(setup, tmp_path):
    bb, root = setup
    src = _variant(root, "rank", tmp_path, edit_config=lambda c: c.update(r=8))
    with pytest.raises(PeftImportError, match="rank_pattern"):
        read_peft_adapter(src, bb)


def test_foreign_tensors_and_missing_files_are_named(setup, tmp_path):
    bb, root = setup
    src = _variant(
        root,
        "dora",
        tmp_path,
        edit_weights=lambda s: (
            s | {"base_model.model.x.lora_magnitude_vector": np.ones(3, np.float32)}
        ),
    )
    with pytest.raises(PeftImportError, match="lora_magnitude_vector"):
        read_peft_adapter(src, bb)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        read_peft_adapter(empty, bb)
    (empty / "adapter_config.json").write_text((root / "good" / "adapter_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        read_peft_adapter(empty, bb)


def test_adapter_for_other_layers_is_refused(setup, tmp_path):
    bb, root = setup

    def rename(state):
        return {k.replace("attention.self.query", "attn.q_proj"): v for k, v in state.items()}

    src = _variant(root, "names", tmp_path, edit_weights=rename)
    with pytest.raises(ValueError, match="q_proj"):
        read_peft_adapter(src, bb)


def test_every_lora_variant_peft_declares_is_refused():
    """PEFT tags the config fields that turn on a LoRA variant; each must be refused here."""
    for field in dataclasses.fields(LoraConfig):
        if field.metadata.get("is_lora_variant"):
            assert field.name in REFUSED, field.name
        for variant in field.metadata.get("lora_variants", ()):
            assert variant not in REFUSED[field.name][0], (field.name, variant)


def test_hub_id_offline_says_how_to_pass_a_directory(setup, monkeypatch):
    bb, _ = setup
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="hf download tanganke/no-such-adapter"):
        read_peft_adapter("tanganke/no-such-adapter", bb)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        read_peft_adapter("./missing/adapter", bb)
