"""Cross-measurement numbers (MFU, ratios), the targets (pass/miss) and the printed table."""

from __future__ import annotations

from typing import Any

TARGETS = {
    "l_lora_step": "l_lora step time <= 1.15 x lora step time (same model/precision/batch)",
    "l_lora_memory": "l_lora peak memory <= 1.1 x lora peak memory",
    "vs_peft": "lora >= 2x faster than HF PEFT at the same precision",
    "mfu": ">= 40% MFU, bf16 ViT-B/16 lora batch 256 (analytic FLOPs / measured bf16 peak)",
    "disentangle": "21x21 Flan-T5-base disentanglement grid <= 60 s",
    "batched_grid": "batched merge grid >= 10x faster than one model at a time",
    "scaling": "2-GPU data-parallel scaling >= 1.8x",
}


def _key(m: dict) -> tuple:
    c = m["config"]
    return c.get("model"), c.get("precision"), c.get("batch"), c.get("attention", "auto")


def _ok(m: dict | None) -> bool:
    return m is not None and m.get("median") is not None


def device_kind(m: dict) -> str:
    return str((m.get("device") or {}).get("kind", ""))


def _index(ms: list[dict]):
    """lookup(name, near): the measurement called ``name``, preferring one measured on the
    device kind of ``near`` (merged results can hold one name per device), then a successful one."""
    by: dict[str, list[dict]] = {}
    for m in ms:
        by.setdefault(m["name"], []).append(m)

    def lookup(name: str, near: dict | None = None) -> dict | None:
        cands = by.get(name, [])
        same = [c for c in cands if near is not None and device_kind(c) == device_kind(near)]
        pool = same or cands
        ok = [c for c in pool if _ok(c)]
        return (ok or pool or [None])[-1]

    return lookup


def finalize(ms: list[dict]) -> list[dict]:
    """Fill ``derived.mfu_*`` and ``ratios`` in place; return the target checks."""
    lookup = _index(ms)

    peaks = [m for m in ms if m["area"] == "peak" and _ok(m)]

    def peak_rate(near: dict) -> dict[str, float]:
        """The matmul peaks of ``near``'s run; without them, the median over its device kind."""
        out = {}
        for p in ("bf16", "fp32"):
            same = [m for m in peaks if m["name"] == f"peak/matmul/{p}"]
            same = [m for m in same if device_kind(m) == device_kind(near)] or same
            run = [m for m in same if near.get("run") and m.get("run") == near.get("run")]
            rates = sorted(m["derived"]["flop_per_s"] for m in (run or same))
            if rates:
                out[p] = rates[len(rates) // 2]
        return out

    targets: list[dict] = []

    def target(kind: str, name: str, value: float | None, threshold: float, higher: bool):
        ok = None if value is None else (value >= threshold if higher else value <= threshold)
        targets.append(
            {
                "target": kind,
                "text": TARGETS[kind],
                "name": name,
                "value": value,
                "threshold": threshold,
                "pass": ok,
            }
        )

    train = [m for m in ms if m["area"] in ("train", "torch_train") and _ok(m)]
    for m in train:
        d, med = m["derived"], m["median"]
        if m["area"] == "torch_train":  # same model, same FLOPs: borrow the analytic count
            twin = lookup(m["name"].removeprefix("torch_"), m)
            if twin is not None:
                d["flops_analytic"] = twin["derived"].get("flops_analytic")
        rate = peak_rate(m)
        for src in ("analytic", "xla"):
            f = d.get(f"flops_{src}")
            if f:
                d[f"achieved_flop_per_s_{src}"] = f / med
                if "bf16" in rate:
                    d[f"mfu_{src}"] = f / med / rate["bf16"]
                if "fp32" in rate and m["config"].get("precision") == "fp32":
                    d[f"mfu_{src}_vs_fp32_peak"] = f / med / rate["fp32"]

    for area in ("train", "torch_train"):
        lora = {_key(m): m for m in train if m["area"] == area and m["config"]["method"] == "lora"}
        for m in (m for m in train if m["area"] == area and m["config"]["method"] != "lora"):
            ref = lora.get(_key(m))
            if ref is None:
                continue
            m["ratios"]["time_over_lora"] = m["median"] / ref["median"]
            pb, rb = m["derived"].get("peak_bytes"), ref["derived"].get("peak_bytes")
            if pb and rb:
                m["ratios"]["memory_over_lora"] = pb / rb
            if area == "train" and m["config"]["method"] == "l_lora":
                target("l_lora_step", m["name"], m["ratios"]["time_over_lora"], 1.15, False)
                target("l_lora_memory", m["name"], m["ratios"].get("memory_over_lora"), 1.1, False)

    for m in (m for m in train if m["area"] == "train"):
        # PyTorch has one attention (SDPA): every attention_impl of ours meets the same twin.
        t = lookup("torch_" + m["name"].split("/attn-")[0], m)
        if _ok(t):
            m["ratios"]["speedup_vs_torch"] = t["median"] / m["median"]
            t["ratios"]["ours_speedup"] = t["median"] / m["median"]
            if m["config"]["method"] == "lora":
                target("vs_peft", m["name"], m["ratios"]["speedup_vs_torch"], 2.0, True)
        c = m["config"]
        if (c["model"], c["method"], c["precision"], c["batch"]) == ("clip", "lora", "bf16", 256):
            target("mfu", m["name"], m["derived"].get("mfu_analytic"), 0.40, True)

    grids = [m for m in ms if m["area"] in ("grid", "torch_grid") and _ok(m)]
    for m in (m for m in grids if m["config"].get("path") == "batched"):
        c = m["config"]
        single = lookup(f"grid/{c['model']}/{c['method']}/one_at_a_time/K{c['K']}", m)
        torch = lookup(f"torch_grid/{c['model']}/lora/one_at_a_time/K{c['K']}", m)
        spm = m["derived"]["seconds_per_model"]
        if _ok(single):
            m["ratios"]["speedup_vs_one_at_a_time"] = single["derived"]["seconds_per_model"] / spm
            if c["K"] > 1:
                target(
                    "batched_grid", m["name"], m["ratios"]["speedup_vs_one_at_a_time"], 10.0, True
                )
        if _ok(torch):
            m["ratios"]["speedup_vs_torch_one_at_a_time"] = (
                torch["derived"]["seconds_per_model"] / spm
            )
    for m in (
        m
        for m in grids
        if m["area"] == "grid"
        and m["config"].get("path") == "one_at_a_time"
        and m["config"]["method"] == "lora"
    ):
        c = m["config"]
        torch = lookup(f"torch_grid/{c['model']}/lora/one_at_a_time/K{c['K']}", m)
        if _ok(torch):
            m["ratios"]["speedup_vs_torch_one_at_a_time"] = (
                torch["derived"]["seconds_per_model"] / m["derived"]["seconds_per_model"]
            )

    for m in ms:
        c = m["config"]
        if m["area"] == "disentangle" and _ok(m) and c.get("path", "batched") == "batched":
            target("disentangle", m["name"], m["median"], 60.0, False)
        if (
            m["area"] == "scaling"
            and _ok(m)
            and c.get("n_devices") == 2
            and c.get("mode", "dp") == "dp"
        ):
            target("scaling", m["name"], m["ratios"].get("scaling"), 1.8, True)
    if not any(t["target"] == "scaling" for t in targets):
        targets.append(
            {
                "target": "scaling",
                "text": TARGETS["scaling"],
                "name": None,
                "value": None,
                "threshold": 1.8,
                "pass": None,
                "note": "not measured: fewer than 2 devices (or scaling not run)",
            }
        )
    return targets


# ----------------------------------------------------------------------------- table


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.2f} ms" if s < 10 else f"{s:.1f} s"


def _headline(m: dict) -> str:
    d, r = m["derived"], m["ratios"]
    parts = []
    for key, fmt in (
        ("examples_per_s", "{:.0f} ex/s"),
        ("models_per_s", "{:.2f} models/s"),
        ("batches_per_s", "{:.1f} batch/s"),
        ("flop_per_s", "{:.0f} TFLOP/s"),
        ("mfu_analytic", "MFU {:.1%}"),
        ("mfu_xla", "(xla {:.1%})"),
        ("peak_bytes", "{:.2f} GiB"),
        ("peak_bytes_per_device", "{:.2f} GiB/device"),
        ("compile_s", "compile {:.0f} s"),
    ):
        v = d.get(key)
        if v is None:
            continue
        if key == "flop_per_s":
            v = v / 1e12
        if key.startswith("peak_bytes"):
            v = v / 2**30
        parts.append(fmt.format(v))
    if d.get("extrapolated"):
        parts.append(f"extrapolated from {d.get('timed_models')}")
        if d.get("total_s_estimate") is not None:
            parts.append(f"total ~{d['total_s_estimate']:.1f} s")
    for k, v in r.items():
        if isinstance(v, float):
            parts.append(f"{k}={v:.2f}")
    return ", ".join(parts)


def table(ms: list[dict], targets: list[dict]) -> str:
    lines = [f"{'measurement':<50s} {'median':>10s} {'p10..p90':>21s}  details", "-" * 110]
    for m in ms:
        if m.get("error"):
            label = "skipped" if m["error"].startswith("skipped") else "FAILED"
            lines.append(
                f"{m['name']:<50s} {label:>10s} {'':>21s}  "
                f"{m['error'].strip().splitlines()[-1][:60]}"
            )
            continue
        spread = f"{_fmt_time(m['p10'])}..{_fmt_time(m['p90'])}"
        lines.append(
            f"{m['name']:<50s} {_fmt_time(m['median']):>10s} {spread:>21s}  {_headline(m)}"
        )
    lines += ["", "targets:"]
    for t in targets:
        mark = {True: "PASS", False: "MISS", None: "n/a "}[t["pass"]]
        val = "-" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(
            f"  [{mark}] {t['text']}: {t['name'] or t.get('note', '')} = {val}"
            f" (threshold {t['threshold']})"
        )
    return "\n".join(lines)


def summary(ms: list[dict]) -> dict[str, Any]:
    return {"n_measurements": len(ms), "failed": [m["name"] for m in ms if m.get("error")]}
