"""The benchmark suite (benchmarks/): structure on CPU with tiny models, no timing asserts.

* the whole suite runs in ``--tiny`` mode (a subprocess with 2 fake CPU devices, started
  when this module starts so that it overlaps the in-process tests) and writes the JSON
  with the documented fields;
* the analytic FLOP count agrees with XLA's count of the real ViT-B/16 and Flan-T5-base
  train steps (lowering only, nothing compiled or run) and of the tiny compiled steps;
* the PyTorch L-LoRA baseline (peft LoraLayer + torch.func.jvp) computes our l_lora
  outputs and gradients on identical weights, and its whole-model linearization our
  l_lora_model outputs;
* batched merge grids give exactly the predictions of one model at a time (the
  disentanglement grid too);
* plans: the gpu_t5_and_scaling preset's order and waves, its tiny twin; a time budget skips whole
  compile waves (recorded) instead of starting what cannot finish; results of several
  runs merge into one file with ratios recomputed across them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import flops, models, plans, report, train_bench
from benchmarks.common import MEASUREMENT_FIELDS, measurement
from llora_jax import adapters, forward
from llora_jax.backbones import clip
from llora_jax.types import METHODS, AdapterSpec

ROOT = Path(__file__).resolve().parents[2]
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.fixture(scope="module", autouse=True)
def tiny_run(tmp_path_factory):
    """Start ``python -m benchmarks.run --tiny`` now; tests that need its JSON wait for it."""
    out = tmp_path_factory.mktemp("bench")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {FAST_XLA}",
    }
    cmd = [sys.executable, "-m", "benchmarks.run", "--tiny", "--inprocess", "--out", str(out)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    box = {}

    def result() -> dict:
        if "json" not in box:
            log, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, log[-4000:]
            files = sorted(out.glob("*.json"))
            assert len(files) == 1, (files, log[-2000:])
            box["json"] = json.loads(files[0].read_text())
            box["log"] = log
        return box["json"]

    yield result
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


# ----------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize(
    "model,method", [("clip", "lora"), ("clip", "l_lora_model"), ("clip", "full"), ("t5", "lora")]
)
def test_analytic_flops_match_xla_at_real_widths(model, method):
    # The real ViT-B/16 / Flan-T5-base widths, sequence lengths and vocabulary, with fewer
    # layers (the count is per layer) to keep tracing short. Lowering needs shapes only:
    # nothing is allocated, compiled or run.
    cfg = models.hf_config(model, tiny=False)
    if model == "clip":
        cfg.num_hidden_layers = 4
    else:
        cfg.num_layers = cfg.num_decoder_layers = 2
    shapes = models.param_shapes(model, cfg)
    b = models.build(model, "fp32", method, tiny=False, params_f32=shapes, config=cfg)
    r = train_bench.Runner(train_bench.TrainCase(model, method, "fp32", 2), b, lora_dropout=0.1)
    xla = r.cost_lowered["flops"]
    analytic = r.analytic()["flops"]["total"]
    # Stated factor: within 5% (XLA also counts norms, softmax, activations and the loss).
    assert 0.97 < xla / analytic < 1.05, (xla, analytic)


def test_analytic_method_multipliers():
    cfg = models.hf_config("clip", tiny=False)
    desc = flops.vit_desc(clip.module_from_hf_config(cfg).vision, 10, 512)
    f = {m: flops.train_flops(desc, m, 1, 16, 0)["total"] for m in METHODS}
    fwd = flops.forward_flops(desc, 16)
    assert 1.9 < f["lora"] / fwd < 2.2  # frozen base: forward + activation gradients
    assert 2.8 < f["full"] / fwd < 3.1  # + weight gradients
    assert 1.4 < f["l_lora_model"] / f["lora"] < 1.6  # + tangent pass and its transpose
    assert 1.0 < f["l_lora"] / f["lora"] < 1.03  # the branch is a few percent at r = 16


# ----------------------------------------------------------------------------- torch parity


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _tiny_clip_pair(rank=4, alpha=8.0, attn=None):
    """A tiny HF CLIP vision tower + peft LoRA, and our module/params with the same weights."""
    pytest.importorskip("peft", reason="the PyTorch baseline needs peft (test extra)")
    import torch

    from benchmarks import torch_baseline

    cfg = models.hf_config("clip", tiny=True)
    torch.manual_seed(0)
    hf = torch_baseline.hf_model("clip", cfg, attn=attn).eval()
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    params = clip.params_from_hf(state, cfg)
    module = clip.module_from_hf_config(cfg)
    lcfg = adapters.LoraConfig(
        rank=rank, alpha=alpha, targets=clip.DEFAULT_LORA_TARGETS, init_b="normal", b0_std=0.3
    )
    phi0 = adapters.init_lora(jax.random.key(1), params, lcfg)
    leaves, tdef = jax.tree.flatten(phi0)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    phi = jax.tree.unflatten(
        tdef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    net = torch_baseline.add_lora(hf, "clip", rank=rank, alpha=alpha, dropout=0.0).eval()
    return cfg, module, params, lcfg, phi0, phi, net


def _load(net, phi, wrapped: bool):
    """Copy our adapter (A: (in, r), B: (r, out)) into the peft layers (transposed)."""
    import torch

    from benchmarks import torch_baseline

    with torch.no_grad():
        for path, layer in adapters.adapter_layers(phi).items():
            mod = net.get_submodule("base_model.model." + torch_baseline.hf_path(path))
            mod = mod.inner if wrapped else mod
            mod.lora_A["default"].weight.copy_(torch.from_numpy(np.array(layer["A"]).T))
            mod.lora_B["default"].weight.copy_(torch.from_numpy(np.array(layer["B"]).T))


def test_torch_l_lora_equals_ours_outputs_and_gradients():
    import torch

    from benchmarks import torch_baseline

    cfg, module, params, lcfg, phi0, phi, net = _tiny_clip_pair()
    _load(net, phi0, wrapped=False)
    n = torch_baseline.linearize_lora_layers(net)  # φ0 is captured here
    assert n == 2 * cfg.num_hidden_layers
    _load(net, phi, wrapped=True)
    x = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((3, cfg.projection_dim)).astype(np.float32)

    out_t = net(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).image_embeds
    (out_t * torch.from_numpy(w)).sum().backward()

    # Jitted: eager Flax dispatches (and compiles) every small op separately.
    @functools.partial(jax.jit, static_argnums=1)
    def ours(p, mode="l_lora"):
        return adapters.apply(
            module,
            params,
            p,
            jnp.asarray(x),
            mode=mode,
            phi0=phi0,
            scale=lcfg.scale,
            method="encode_image",
        )

    @jax.jit
    def closed_form(p):
        merged = adapters.merge_into_params(params, p, lcfg.scale, phi0, "l_lora")
        return module.apply({"params": merged}, x, method="encode_image")

    out_j = ours(phi)
    closed = closed_form(phi)
    assert _rel(out_t.detach().numpy(), out_j) < 1e-5
    assert _rel(out_j, closed) < 1e-5  # and both equal the closed form W0 + ΔW(φ)
    assert _rel(ours(phi, "lora"), out_j) > 1e-3  # not trivially plain LoRA

    grads = jax.jit(jax.grad(lambda p: jnp.sum(ours(p) * w)))(phi)
    for path, g in adapters.adapter_layers(grads).items():
        mod = net.get_submodule("base_model.model." + torch_baseline.hf_path(path)).inner
        np.testing.assert_allclose(
            mod.lora_A["default"].weight.grad.numpy().T, g["A"], rtol=2e-4, atol=1e-6
        )
        np.testing.assert_allclose(
            mod.lora_B["default"].weight.grad.numpy().T, g["B"], rtol=2e-4, atol=1e-6
        )


def test_torch_whole_model_linearization_equals_ours():
    import torch

    from benchmarks import torch_baseline

    cfg, module, params, lcfg, phi0, phi, net = _tiny_clip_pair(attn="eager")
    _load(net, phi0, wrapped=False)
    net._phi0 = {k: p.detach().clone() for k, p in net.named_parameters() if p.requires_grad}
    _load(net, phi, wrapped=False)
    arrays = models.synthetic_arrays("clip", 3, models.TINY_SHAPES, cfg)
    head = torch_baseline.clip_head(cfg, torch.device("cpu"))
    batch = torch_baseline.torch_batch("clip", arrays, cfg, torch.device("cpu"))
    with torch.no_grad():
        out_t = torch_baseline.linearized_readout(
            net, torch_baseline.clip_readout(head), batch
        ).numpy()

    tm = models.clip_task_model(module, params, 32)
    tm = dataclasses.replace(
        tm, head={"classes": jnp.asarray(head["classes"].numpy()), "logit_scale": jnp.log(100.0)}
    )
    spec = AdapterSpec("l_lora_model", lcfg)
    fwd = jax.jit(lambda p, p0, b: forward.forward(tm, spec, p, p0, b)["logits"])
    out_j = fwd(phi, phi0, models.with_weight(arrays))
    assert _rel(out_t, out_j) < 1e-4


def test_peft_layers_are_selected_by_lora_layer_type():
    pytest.importorskip("peft")
    import torch
    from peft.tuners.lora import LoraLayer

    from benchmarks import torch_baseline

    cfg = models.hf_config("t5", tiny=True)
    net = torch_baseline.add_lora(torch_baseline.hf_model("t5", cfg), "t5")
    n_lora = sum(isinstance(m, LoraLayer) for m in net.modules())
    # q and v of every encoder self-attention and decoder self- and cross-attention.
    assert n_lora == 2 * (cfg.num_layers + 2 * cfg.num_decoder_layers)
    assert torch_baseline.linearize_lora_layers(net) == n_lora
    wrapped = [m for m in net.modules() if isinstance(m, torch_baseline.Linearized)]
    assert len(wrapped) == n_lora and all(isinstance(w.inner, LoraLayer) for w in wrapped)
    # The trap the type test avoids: peft's lora.Linear is no nn.Linear.
    assert not any(isinstance(w.inner, torch.nn.Linear) for w in wrapped)


# ----------------------------------------------------------------------------- plans, report


def test_areas_and_presets():
    assert plans.resolve_areas("torch,grid") == ["torch_train", "torch_grid", "grid"]
    with pytest.raises(ValueError, match="unknown benchmark area 'trian'"):
        plans.resolve_areas("trian")
    default = plans.make_plan("default")
    names = {c.name for c in default.train}
    assert "train/clip/lora/bf16/b256" in names  # the MFU target's configuration
    assert {c.name for c in default.torch_train} <= names  # every torch case has our twin
    t5_only = plans.filter_models(plans.make_plan("full"), ["t5"])
    assert t5_only.grid_models == ("t5",) and {c.model for c in t5_only.train} == {"t5"}


def test_issue8_plan_order_waves_and_tiny_twin():
    plan = plans.make_plan("gpu_t5_and_scaling")
    sizes = train_bench.wave_sizes(len(plan.train), plan.train_waves)
    assert sum(sizes) == len(plan.train) and sizes[0] == 5
    first = {c.name for c in plan.train[: sizes[0]]}
    # The first wave: every method at T5's main config, and the step the pipeline reuses.
    assert {f"train/t5/{m}/bf16/b64" for m in plans.METHODS} | {
        "train/clip/lora/bf16/b128"
    } == first
    names = [c.name for c in plan.train]
    assert len(set(names)) == len(names) == 4 * 2 * 3 + 1  # the whole T5 matrix + CLIP
    assert {c.name for c in plan.torch_train} <= set(names)
    assert plan.grid.ks == (1, 21, 441) and plan.grid.n_examples == 1024
    assert plan.grid_models[0] == "t5" and plan.grid.dis_methods[0] == "l_lora_model"
    tiny = plans.shrink(plan)
    assert tiny.tiny and tiny.grid.ks == (1, 3, 9) and tiny.grid.big_k == 9
    assert [c.method for c in tiny.train] == [c.method for c in plan.train]
    assert len({c.name for c in tiny.train}) == len(names)  # batches stay distinct
    modes = {(s.model, s.mode) for s in plan.scaling}
    assert {("clip", "dp"), ("t5l", "fsdp"), ("t5l", "dp")} == modes
    assert train_bench.wave_sizes(10, ()) == [10] and train_bench.wave_sizes(0, (2,)) == []
    assert train_bench.wave_sizes(7, (2, 3)) == [2, 3, 2]


def test_attention_cases_get_their_own_names_builds_and_twins():
    plan = plans.make_plan("gpu_vit_attention")
    names = [c.name for c in plan.train]
    assert len(set(names)) == len(names)
    assert "train/clip/lora/bf16/b256" in names and "train/clip/lora/bf16/b256/attn-cudnn" in names
    assert not any(c.method == "l_lora_model" and c.attention == "cudnn" for c in plan.train)
    built = models.build("clip", "fp32", "lora", tiny=True, attention="reference")
    assert built.module.vision.attention_impl == "reference"
    t5 = models.build("t5", "fp32", "lora", tiny=True, attention="xla")
    assert t5.module.spec.attention_impl == "xla"
    # Every attention of ours meets the one PyTorch twin; l_lora meets lora of the same attention.
    case = {"model": "clip", "precision": "bf16", "batch": 256}
    ms = [
        _m("train/clip/lora/bf16/b256", "train", {**case, "method": "lora"}, 2.0),
        _m(
            "train/clip/lora/bf16/b256/attn-cudnn",
            "train",
            {**case, "method": "lora", "attention": "cudnn"},
            1.0,
        ),
        _m(
            "train/clip/l_lora/bf16/b256/attn-cudnn",
            "train",
            {**case, "method": "l_lora", "attention": "cudnn"},
            1.1,
        ),
        _m("torch_train/clip/lora/bf16/b256", "torch_train", {**case, "method": "lora"}, 3.0),
    ]
    report.finalize(ms)
    assert ms[0]["ratios"]["speedup_vs_torch"] == pytest.approx(1.5)
    assert ms[1]["ratios"]["speedup_vs_torch"] == pytest.approx(3.0)
    assert ms[2]["ratios"]["time_over_lora"] == pytest.approx(1.1)


def test_budget_skips_whole_waves_without_compiling(tmp_path):
    from benchmarks.common import Recorder

    rec = Recorder(tmp_path / "part.json", deadline=time.time() + 5.0)
    cases = [train_bench.TrainCase("t5", m, "bf16", 2) for m in ("lora", "l_lora")]
    kept = train_bench.run(cases, rec, tiny=True, waves=(1,), compile_workers=1)
    assert kept == {}
    assert [m["name"] for m in rec.items] == [c.name for c in cases]
    assert all(m["error"].startswith("skipped: time budget") for m in rec.items)
    assert json.loads((tmp_path / "part.json").read_text())["measurements"]  # written


def test_merge_keeps_measured_entries_and_recomputes_ratios(tmp_path):
    from benchmarks import merge

    case = {"model": "t5", "precision": "bf16", "batch": 64, "method": "lora"}
    gpu, cpu = {"kind": "H100"}, {"kind": "cpu"}

    def on(m, dev):
        return {**m, "device": dev}

    scaled = on(_m("scaling/clip/lora/bf16/n2", "scaling", {"n_devices": 2}, 0.1), gpu)
    scaled["ratios"] = {"scaling": 1.9}  # computed by the scaling benchmark itself
    run1 = {
        "measurements": [
            on(_m("peak/matmul/bf16", "peak", {}, 1.0, flop_per_s=100.0), gpu),
            on(_m("train/t5/lora/bf16/b64", "train", case, 0.03, flops_analytic=1.0), gpu),
            measurement("train/t5/full/bf16/b64", "train", case, error="skipped: time budget"),
            scaled,
        ]
    }
    part = {
        "measurements": [
            on(_m("peak/matmul/bf16", "peak", {}, 1.0, flop_per_s=1e3), cpu),  # another device
            on(_m("torch_train/t5/lora/bf16/b64", "torch_train", case, 0.18), gpu),
            on(measurement("train/t5/lora/bf16/b64", "train", case, error="skipped: budget"), gpu),
        ]
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "2026-11-23T000000Z-H100.json").write_text(json.dumps(run1))
    stopped = tmp_path / "b" / "parts-2026-11-23T010000Z"
    stopped.mkdir(parents=True)
    (stopped / "torch.json").write_text(json.dumps(part))
    # The parts of a finished run are inside its result file: not read twice.
    done = tmp_path / "a" / "parts-2026-11-23T000000Z"
    done.mkdir()
    (done / "jax.json").write_text(json.dumps({"measurements": [{"broken": True}]}))
    clip = {"model": "clip", "precision": "bf16", "batch": 8, "method": "lora"}
    run3 = {
        "measurements": [
            on(_m("peak/matmul/bf16", "peak", {}, 1.0, flop_per_s=50.0), gpu),
            on(_m("train/clip/lora/bf16/b8", "train", clip, 0.01, flops_analytic=1.0), gpu),
        ]
    }
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "2026-11-23T020000Z-H100.json").write_text(json.dumps(run3))
    res = merge.merge([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")])
    by = {m["name"]: m for m in res["measurements"]}
    # Each run's MFU divides by its own run's peak (100 and 50), not by the last one merged.
    assert by["train/clip/lora/bf16/b8"]["derived"]["mfu_analytic"] == pytest.approx(2.0)
    assert by["train/clip/lora/bf16/b8"]["run"] == "2026-11-23T020000Z"
    assert len(res["sources"]) == 3
    assert by["train/t5/lora/bf16/b64"]["median"] == pytest.approx(0.03)  # not the skip
    assert by["train/t5/lora/bf16/b64"]["ratios"]["speedup_vs_torch"] == pytest.approx(6.0)
    # MFU against the peak of the same device kind; both devices' peaks are kept.
    assert by["train/t5/lora/bf16/b64"]["derived"]["mfu_analytic"] == pytest.approx(1 / 3)
    assert sum(m["name"] == "peak/matmul/bf16" for m in res["measurements"]) == 3
    assert by["train/t5/full/bf16/b64"]["error"]
    assert by["scaling/clip/lora/bf16/n2"]["ratios"]["scaling"] == 1.9
    assert {t["target"]: t["pass"] for t in res["targets"]}["scaling"] is True


def _m(name, area, config, median, **derived):
    return measurement(name, area, config, [median], derived=derived)


def test_finalize_computes_ratios_and_targets():
    case = {"model": "clip", "precision": "bf16", "batch": 256}
    ms = [
        _m("peak/matmul/bf16", "peak", {}, 1.0, flop_per_s=100.0),
        _m(
            "train/clip/lora/bf16/b256",
            "train",
            {**case, "method": "lora"},
            1.0,
            flops_analytic=50.0,
            peak_bytes=100,
        ),
        _m(
            "train/clip/l_lora/bf16/b256",
            "train",
            {**case, "method": "l_lora"},
            1.2,
            flops_analytic=51.0,
            peak_bytes=105,
        ),
        _m("torch_train/clip/lora/bf16/b256", "torch_train", {**case, "method": "lora"}, 3.0),
        _m(
            "grid/clip/lora/batched/K21",
            "grid",
            {"model": "clip", "method": "lora", "K": 21, "path": "batched"},
            2.1,
            seconds_per_model=0.1,
        ),
        _m(
            "grid/clip/lora/one_at_a_time/K21",
            "grid",
            {"model": "clip", "method": "lora", "K": 21, "path": "one_at_a_time"},
            1.5,
            seconds_per_model=1.5,
        ),
        _m("disentangle/t5/l_lora/G21", "disentangle", {"G": 21}, 42.0),
    ]
    targets = {t["target"]: t for t in report.finalize(ms)}
    lora, l_lora = ms[1], ms[2]
    assert lora["derived"]["mfu_analytic"] == pytest.approx(0.5)
    assert l_lora["ratios"]["time_over_lora"] == pytest.approx(1.2)
    assert lora["ratios"]["speedup_vs_torch"] == pytest.approx(3.0)
    assert ms[4]["ratios"]["speedup_vs_one_at_a_time"] == pytest.approx(15.0)
    assert targets["l_lora_step"]["pass"] is False  # 1.2 > 1.15
    assert targets["l_lora_memory"]["pass"] is True  # 1.05 <= 1.1
    assert targets["vs_peft"]["pass"] is True
    assert targets["mfu"]["pass"] is True
    assert targets["batched_grid"]["pass"] is True
    assert targets["disentangle"]["pass"] is True
    assert targets["scaling"]["pass"] is None  # not measured
    assert "PASS" in report.table(ms, list(targets.values()))


# ----------------------------------------------------------------------------- the tiny run


def test_tiny_run_writes_every_area_with_the_documented_fields(tiny_run):
    res = tiny_run()
    for key in ("command", "date", "device", "versions", "measurements", "targets", "plan"):
        assert key in res
    assert res["versions"]["jax"] and res["versions"]["torch"]
    ms = res["measurements"]
    have_peft = res["versions"]["peft"] is not None
    for m in ms:
        assert set(MEASUREMENT_FIELDS) <= set(m), m["name"]
        assert m["device"] and m["versions"]["jax"]
        if m["error"]:
            assert m["area"].startswith("torch") and not have_peft, m["error"]
            continue
        assert 0 < m["p10"] <= m["median"] <= m["p90"], m["name"]
    areas = {m["area"] for m in ms}
    assert {
        "peak",
        "train",
        "pipeline",
        "scaling",
        "grid",
        "disentangle",
        "torch_train",
        "torch_grid",
    } <= areas
    by = {m["name"]: m for m in ms}
    lora = by["train/clip/lora/fp32/b2"]
    assert lora["derived"]["examples_per_s"] > 0 and lora["derived"]["peak_bytes"] > 0
    assert lora["derived"]["mfu_analytic"] > 0
    assert "time_over_lora" in by["train/clip/l_lora/fp32/b2"]["ratios"]
    if have_peft:
        assert lora["ratios"]["speedup_vs_torch"] > 0
        assert by["torch_train/clip/l_lora/fp32/b2"]["derived"]["linearized_layers"] == 4
    assert by["scaling/clip/lora/fp32/n2"]["ratios"]["scaling"] > 0
    fsdp = by["scaling/t5l/lora/fp32/fsdp/n2"]
    assert fsdp["config"]["mode"] == "fsdp" and fsdp["derived"]["peak_bytes_per_device"] > 0
    assert by["pipeline/clip/e2e"]["ratios"]["headroom_prefetch"] > 0
    dis = by["disentangle/t5/l_lora/G3"]
    assert dis["derived"]["xi_shape"] == [3, 3]
    assert dis["ratios"]["speedup_vs_one_at_a_time"] > 0
    one = by["disentangle/t5/l_lora/G3/one_at_a_time"]["derived"]
    assert one["agreement_with_batched"] == 1.0 and one["models_in_grid"] == 2 * (9 + 3)
    kinds = {t["target"] for t in res["targets"]}
    assert {"l_lora_step", "l_lora_memory", "batched_grid", "disentangle", "scaling"} <= kinds
    assert have_peft <= ("vs_peft" in kinds)


def test_tiny_flops_agree_with_xla(tiny_run):
    trains = [m for m in tiny_run()["measurements"] if m["area"] == "train"]
    assert len(trains) == 5
    for m in trains:
        # Tiny widths (32) make norms/softmax/loss a larger share than at real size.
        assert 0.95 < m["derived"]["flops_xla_over_analytic"] < 1.8, m["name"]


def test_batched_grid_predictions_equal_one_at_a_time(tiny_run):
    singles = [
        m
        for m in tiny_run()["measurements"]
        if m["area"] == "grid" and m["config"]["path"] == "one_at_a_time"
    ]
    assert {m["config"]["method"] for m in singles} == {"lora", "l_lora_model"}
    for m in singles:
        d = m["derived"]
        assert d["compared_models"] >= 1
        assert d["agreement_with_batched"] == 1.0, m["name"]
        assert d["distinct_prediction_rows"] > 1  # the merged models really differ
        assert d["extrapolated"] == (m["config"]["K"] > d["timed_models"])


def test_text_eval_bench_on_the_real_data(tmp_path):
    """The MiniLM text benchmark's tiny mode (tiny BERT, the shared data): every variant
    and both fine-tuning forms are measured; packed rows compute fewer tokens than trimmed
    ones and give the same predictions (float32 on a CPU)."""
    from benchmarks import text_eval_bench
    from tests.conftest import data_dir
    from tests.fixtures import tiny_models

    words = ["this", "is", "negative", "positive", "the", "two", "sentences", "mean", "a"]
    path = tiny_models.tiny_bert(tmp_path / "bert", words)
    out = text_eval_bench.main(
        [
            "--tiny",
            "--backbone",
            str(path),
            "--data",
            str(data_dir()),
            "--out",
            str(tmp_path / "r.json"),
            "--profile",
            str(tmp_path / "trace"),
        ]
    )
    got = {m["name"]: m for m in json.loads(out.read_text())["measurements"]}
    assert set(got) == {*text_eval_bench.TINY_VARIANTS, "train-single", "train-group-4"}
    assert len(list((tmp_path / "trace").rglob("*.xplane.pb"))) == 1  # the first variant's
    assert all(m["median"] is not None for m in got.values()), got
    trimmed, packed = got["trimmed-b160-c12"]["derived"], got["packed-r32-c32"]["derived"]
    assert packed["computed_tokens"] < trimmed["computed_tokens"]
    assert packed["real_tokens"] == trimmed["real_tokens"]
    assert packed["prediction_agreement_with_first_variant"] == 1.0
    assert got["train-group-4"]["config"]["runs"] == 4


def test_trace_summary_sums_device_kernels_only(tmp_path):
    import gzip

    from benchmarks import trace_summary

    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/host:CPU"}},
    ]
    kernels = [("gemm", 30.0), ("gelu", 50.0), ("gemm", 20.0), ("host_only", 999.0)]
    events = meta + [
        {"ph": "X", "pid": 7 if n == "host_only" else 1, "tid": 1, "name": n, "dur": d}
        for n, d in kernels
    ]
    run = tmp_path / "plugins" / "profile" / "x"
    run.mkdir(parents=True)
    with gzip.open(run / "vm.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    rows = trace_summary.kernel_table(tmp_path)
    assert [(n, c) for n, _, _, c in rows] == [("gemm", 2), ("gelu", 1)]
    assert rows[0][1] == pytest.approx(0.05) and rows[0][2] == pytest.approx(0.5)
    with pytest.raises(FileNotFoundError, match="no \\*.trace.json.gz"):
        trace_summary.kernel_table(tmp_path / "plugins" / "profile" / "none")


def test_activation_bench_forms_are_gelu_to_float32_rounding_except_tanh(tmp_path):
    from benchmarks import activation_bench

    out = activation_bench.main(
        ["--tokens", "64", "--repeats", "1", "--out", str(tmp_path / "a.json")]
    )
    err = {
        m["name"]: m["derived"]["max_abs_error_float32_vs_exact"]
        for m in json.loads(out.read_text())["measurements"]
    }
    assert set(err) == set(activation_bench.FORMS)
    assert err["erf by Abramowitz-Stegun 7.1.26 (activations.gelu_erf, MiniLM now)"] < 2e-6
    assert err["erf (jax.nn.gelu exact, XLA erf)"] < 2e-6
    assert 1e-4 < err["tanh approximation"] < 1e-3
