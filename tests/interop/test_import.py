"""PEFT LoRA adapters imported onto llora-jax backbones give PeftModel's outputs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from peft import PeftModel

from llora_jax.interop.peft_import import read_peft_adapter
from tests.fixtures import interop_models as im

TOL = 1e-4

CASES = {
    # kind: (builder, kwargs of LoraConfig): attention and feed-forward targets
    "bert": (im.bert, dict(target_modules=["query", "value", "intermediate.dense"])),
    "t5_v10": (
        lambda p: im.t5(p, gated=False),
        dict(target_modules=["q", "v", "wi", "wo"]),
    ),
    "t5_v11": (
        lambda p: im.t5(p, gated=True),
        dict(target_modules=r".*(SelfAttention|EncDecAttention)\.(q|k|v|o)|.*wi_[01]"),
    ),
    "clip": (im.clip, dict(target_modules=["q_proj", "v_proj", "fc1"])),
}


def _kind(case: str) -> str:
    return "t5" if case.startswith("t5") else case


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_peft_model(case, tmp_path):
    build, lora = CASES[case]
    model, ckpt = build(tmp_path / "base")
    base_out = im.torch_outputs(_kind(case), model)
    pm = im.peft_adapter(copy.deepcopy(model), tmp_path / "adapter", r=4, lora_alpha=8, **lora)
    want = im.torch_outputs(_kind(case), pm)
    assert np.abs(want - base_out).max() > 1e-2  # the adapter changes the outputs
    bb = im.load(ckpt)
    got_base = im.jax_outputs(_kind(case), bb)
    np.testing.assert_allclose(got_base, base_out, atol=TOL)
    adapter = read_peft_adapter(tmp_path / "adapter", bb)
    assert adapter.scale == 2.0
    got = im.jax_outputs(_kind(case), bb, adapter.phi, adapter.scale)
    np.testing.assert_allclose(got, want, atol=TOL)


def test_rslora_and_rank_alpha_patterns(tmp_path):
    model, ckpt = im.bert(tmp_path / "base")
    pm = im.peft_adapter(
        copy.deepcopy(model),
        tmp_path / "adapter",
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["query", "value", "output.dense"],
        rank_pattern={"layer.1.attention.self.query": 2, "value": 6},
        alpha_pattern={"output.dense": 3.0},
    )
    want = im.torch_outputs("bert", pm)
    bb = im.load(ckpt)
    adapter = read_peft_adapter(tmp_path / "adapter", bb)
    ranks = adapter.ranks
    assert ranks["encoder/layer_1/attention/self/query"] == 2
    assert ranks["encoder/layer_0/attention/self/query"] == 4
    assert ranks["encoder/layer_0/attention/self/value"] == 6
    s = adapter.scale
    assert s["encoder/layer_0/attention/self/value"] == pytest.approx(8 / 6**0.5)
    assert s["encoder/layer_1/attention/self/query"] == pytest.approx(8 / 2**0.5)
    assert s["encoder/layer_0/attention/output/dense"] == pytest.approx(3 / 2)
    got = im.jax_outputs("bert", bb, adapter.phi, adapter.scale)
    np.testing.assert_allclose(got, want, atol=TOL)


def test_clip_vision_tower_adapters(tmp_path):
    """FusionBench's layout (a CLIPVisionModel adapter, keys without `vision_model.`) on a
    vision-only and on a full CLIP backbone; and a full-model adapter on a vision-only one."""
    full, full_dir = im.clip(tmp_path / "full")
    vision, vision_dir = im.clip_vision(tmp_path / "vision", full=full)
    pm = im.peft_adapter(
        copy.deepcopy(vision),
        tmp_path / "ad_v",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
    )
    want = im.torch_outputs("clip_vision", pm)
    with torch.no_grad():  # the full model's encode_image also projects
        want_projected = full.visual_projection(torch.from_numpy(want)).numpy()
    for ckpt, expected in ((vision_dir, want), (full_dir, want_projected)):
        bb = im.load(ckpt)
        adapter = read_peft_adapter(tmp_path / "ad_v", bb)
        got = im.jax_outputs("clip_vision", bb, adapter.phi, adapter.scale)
        np.testing.assert_allclose(got, expected, atol=TOL)
    pm_full = im.peft_adapter(
        copy.deepcopy(full),
        tmp_path / "ad_f",
        r=4,
        lora_alpha=8,
        target_modules=r"vision_model.*(q_proj|v_proj)",
    )
    with torch.no_grad():
        want = pm_full.base_model.model.vision_model(pixel_values=im.nchw(im.pixels()))
    bb = im.load(vision_dir)
    adapter = read_peft_adapter(tmp_path / "ad_f", bb)
    got = im.jax_outputs("clip_vision", bb, adapter.phi, adapter.scale)
    np.testing.assert_allclose(got, want.pooler_output.numpy(), atol=TOL)


def test_bin_weights_and_fan_in_fan_out(tmp_path):
    """adapter_model.bin (read through torch) and fan_in_fan_out=True (PEFT turns it off for
    nn.Linear layers, which all adapted layers here are: A and B keep their layout)."""
    model, ckpt = im.bert(tmp_path / "base")
    pm = im.peft_adapter(
        copy.deepcopy(model),
        tmp_path / "st",
        r=4,
        lora_alpha=8,
        target_modules=["key", "output.dense"],
    )
    pm.save_pretrained(tmp_path / "bin", safe_serialization=False)
    cfg = json.loads((tmp_path / "bin" / "adapter_config.json").read_text())
    (tmp_path / "bin" / "adapter_config.json").write_text(
        json.dumps(cfg | {"fan_in_fan_out": True})
    )
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    want = im.torch_outputs(
        "bert", PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "bin")
    )
    bb = im.load(ckpt)
    adapter = read_peft_adapter(tmp_path / "bin", bb)
    assert adapter.weights_file.name == "adapter_model.bin"
    np.testing.assert_allclose(
        im.jax_outputs("bert", bb, adapter.phi, adapter.scale), want, atol=TOL
    )
