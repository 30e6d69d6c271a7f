"""FusionBench's L-LoRA layout imports as an exact l_lora task vector with its φ0.

The file is written here from the layout FusionBench's converter produces (each
LoRA layer wrapped, φ under ``<M>.model.lora_A/B.default.weight``, φ0 under
``<M>.params0_values.<i>`` at the parameter's position among the layer's base
weight, base bias, lora_A and lora_B). The reference output is the closed form of a
LoRA layer linearized around φ0: W0 + s·[A0 B0 + A0 (B − B0) + (A − A0) B0].
"""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.numpy import load_file, save_file

from llora_jax import adapters, task_vectors
from llora_jax import tree as tree_lib
from llora_jax.interop import fusionbench as fb
from llora_jax.interop.peft_config import PeftImportError
from tests.fixtures import interop_models as im

R, ALPHA = 4, 8


def _write_l_lora(model, out, zero_b0: bool, seed: int = 0, targets=("q_proj", "v_proj")) -> dict:
    """FusionBench-layout directory for ``model``; returns {torch module name: factors}."""
    pm = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(targets))
    )
    pm.peft_config["default"].save_pretrained(out)
    rng = np.random.default_rng(seed)
    tensors, factors = {}, {}
    for name, mod in pm.named_modules():
        if not hasattr(mod, "lora_A") or "default" not in getattr(mod, "lora_A", {}):
            continue
        d_out, d_in = mod.base_layer.weight.shape
        f = {
            "A": rng.normal(size=(R, d_in)).astype(np.float32) * 0.3,
            "B": rng.normal(size=(d_out, R)).astype(np.float32) * 0.3,
            "A0": rng.normal(size=(R, d_in)).astype(np.float32) * 0.3,
            "B0": np.zeros((d_out, R), np.float32)
            if zero_b0
            else rng.normal(size=(d_out, R)).astype(np.float32) * 0.3,
        }
        first = 2 if mod.base_layer.bias is not None else 1  # after base weight (and bias)
        tensors[f"{name}.model.lora_A.default.weight"] = f["A"]
        tensors[f"{name}.model.lora_B.default.weight"] = f["B"]
        tensors[f"{name}.params0_values.{first}"] = f["A0"]
        tensors[f"{name}.params0_values.{first + 1}"] = f["B0"]
        factors[name.removeprefix("base_model.model.")] = f
    save_file(tensors, out / fb.L_LORA_FILE)
    return factors


def _reference(model, factors, kind: str = "clip_vision") -> np.ndarray:
    ref = copy.deepcopy(model)
    s = ALPHA / R
    with torch.no_grad():
        for name, f in factors.items():
            lin = ref.get_submodule(name)
            a, b, a0, b0 = (f[k].astype(np.float64) for k in ("A", "B", "A0", "B0"))
            dw = s * (b0 @ a0 + (b - b0) @ a0 + b0 @ (a - a0))  # torch (out, in)
            lin.weight += torch.from_numpy(dw).float()
    return im.torch_outputs(kind, ref)


@pytest.mark.parametrize("zero_b0", [True, False])
def test_l_lora_file_imports_with_phi0_and_outputs(tmp_path, zero_b0):
    full, _ = im.clip(tmp_path / "full")
    vision, vision_dir = im.clip_vision(tmp_path / "vision", full=full)
    factors = _write_l_lora(vision, tmp_path / "ll", zero_b0)
    bb = im.load(vision_dir)
    adapter = fb.read_l_lora(tmp_path / "ll", bb)
    mod = "encoder.layers.1.self_attn.v_proj"
    path = adapter.modules[mod]
    np.testing.assert_array_equal(tree_lib.flatten(adapter.phi0)[path + "/A"], factors[mod]["A0"].T)
    np.testing.assert_array_equal(tree_lib.flatten(adapter.phi0)[path + "/B"], factors[mod]["B0"].T)
    got = np.asarray(
        adapters.apply(
            bb.module,
            bb.params,
            adapter.phi,
            im.pixels(),
            mode="l_lora",
            phi0=adapter.phi0,
            scale=adapter.scale,
            method="encode_image",
        )
    )
    want = _reference(vision, factors)
    assert np.abs(want - im.torch_outputs("clip_vision", vision)).max() > 1e-2
    np.testing.assert_allclose(got, want, atol=1e-4)
    saved = task_vectors.load(fb.save_l_lora(tmp_path / "tv", adapter, bb, task="t"))
    assert saved.meta["mode"] == "l_lora" and saved.meta["adapter_kind"] == "lora"
    assert jax.tree.all(jax.tree.map(np.array_equal, saved.phi0, adapter.phi0))
    tau = tree_lib.sub(adapter.phi, adapter.phi0)
    assert jax.tree.all(jax.tree.map(np.array_equal, saved.tau, tau))


def test_l_lora_file_with_a_missing_point_is_refused(tmp_path):
    _, vision_dir = im.clip_vision(tmp_path / "vision")
    vision = transformers.CLIPVisionModel.from_pretrained(vision_dir)
    _write_l_lora(vision, tmp_path / "ll", zero_b0=True)

    file = tmp_path / "ll" / fb.L_LORA_FILE
    state = {k: v for k, v in load_file(file).items() if not k.endswith("params0_values.3")}
    save_file(state, file)
    with pytest.raises(PeftImportError, match="params0_values"):
        fb.read_l_lora(tmp_path / "ll", im.load(vision_dir))


def test_l_lora_file_of_a_t5_without_biases(tmp_path):
    """Flan-T5 layers have no bias: φ0 sits at params0_values.1 and .2."""
    model, ckpt = im.t5(tmp_path / "t5", gated=True)
    factors = _write_l_lora(model, tmp_path / "ll", zero_b0=False, targets=("q", "v", "wi_0"))
    assert any(k.endswith("params0_values.1") for k in load_file(tmp_path / "ll" / fb.L_LORA_FILE))
    bb = im.load(ckpt)
    adapter = fb.read_l_lora(tmp_path / "ll", bb)
    got = im.jax_outputs("t5", bb, adapter.phi, adapter.scale, mode="l_lora", phi0=adapter.phi0)
    want = _reference(model, factors, "t5")
    assert np.abs(want - im.torch_outputs("t5", model)).max() > 1e-2
    np.testing.assert_allclose(got, want, atol=1e-4)
