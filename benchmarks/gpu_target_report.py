"""Issue 22's targets, pass or miss, from the JSON files that ``benchmarks.gpu_targets`` wrote.

    python -m benchmarks.gpu_target_report DIR [DIR ...]     # folders searched recursively

Reads every ``*.json`` below the folders (the merged ``benchmarks.run`` results of the
targets vit / dis / clip_grid / t5, ``attention_check.json``, ``stream_bench.json``) and
prints one markdown row per target: value, threshold, pass / miss / not measured. MFU is
against the bf16 matmul peak measured in the same run (``peak/matmul/bf16``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import gpu_target_floors

DIS_NAME = "T5 21x21 l_lora disentanglement, 2 x 640"


def load(folders: list[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(measurements by name, special files by name); later files win."""
    by_name: dict[str, dict] = {}
    special: dict[str, dict] = {}
    for folder in folders:
        for f in sorted(Path(folder).rglob("*.json")):
            d = json.loads(f.read_text())
            if f.name in ("attention_check.json",):
                special[f.name] = d
                continue
            for m in d.get("measurements", []):
                if m.get("error") is None and m.get("median") is not None:
                    m = {**m, "peak": _peak(d)}
                    by_name[m["name"]] = m
    return by_name, special


def _peak(doc: dict) -> float | None:
    for m in doc.get("measurements", []):
        if m["name"] == "peak/matmul/bf16" and m.get("median"):
            return m["derived"]["flop_per_s"]
    return None


def _ratio(ms, a, b, key="median"):
    if a in ms and b in ms:
        get = (lambda m: m["median"]) if key == "median" else (lambda m: m["derived"][key])
        return get(ms[a]) / get(ms[b])
    return None


def targets(ms: dict, special: dict) -> list[tuple[str, float | None, str, float]]:
    """(target, value, comparison, threshold)."""
    clip = "train/clip/{}/bf16/b{}"
    out = [
        ("ViT-B/16 lora b128: PEFT step / ours", _ratio(ms, "torch_train/clip/lora/bf16/b128", clip.format("lora", 128)), ">=", 2.0),
        ("ViT-B/16 lora b256: MFU", ms.get(clip.format("lora", 256), {}).get("derived", {}).get("mfu_analytic"), ">=", 0.5),
    ]  # fmt: skip
    for b in (128, 256):
        ll, lo = clip.format("l_lora", b), clip.format("lora", b)
        out.append((f"ViT-B/16 b{b}: l_lora / lora time", _ratio(ms, ll, lo), "<=", 1.05))
        out.append(
            (f"ViT-B/16 b{b}: l_lora / lora memory", _ratio(ms, ll, lo, "peak_bytes"), "<=", 1.05)
        )
    t5 = "train/t5/{}/bf16/b64"
    out += [
        ("Flan-T5-base lora b64: PEFT step / ours", _ratio(ms, "torch_train/t5/lora/bf16/b64", t5.format("lora")), ">=", 6.0),
        ("Flan-T5-base b64: l_lora / lora time", _ratio(ms, t5.format("l_lora"), t5.format("lora")), "<=", 1.05),
    ]  # fmt: skip
    dis = ms.get("disentangle/t5/l_lora/G21")
    out.append(("T5 21x21 l_lora disentanglement: seconds", dis and dis["median"], "<=", 60.0))
    if dis and dis.get("peak"):
        fl = next(r["flops"] for r in gpu_target_floors.rows() if r["what"] == DIS_NAME)
        out.append(
            ("T5 disentanglement: MFU (reported)", fl / dis["median"] / dis["peak"], ">=", 0.0)
        )
    ours, peft = "grid/clip/lora/one_at_a_time/K21", "torch_grid/clip/lora/one_at_a_time/K21"
    out.append(
        (
            "CLIP grid one at a time: PEFT s/model / ours",
            _ratio(ms, peft, ours, "seconds_per_model"),
            ">=",
            1.0,
        )
    )
    for k in (21, 441):
        m = ms.get(f"grid/clip/lora/batched/K{k}")
        mfu = m and m.get("peak") and m["derived"]["achieved_flop_per_s"] / m["peak"]
        out.append((f"CLIP grid batched K={k}: MFU (reported)", mfu or None, ">=", 0.0))
    stream = next((m for n, m in ms.items() if n.startswith("stream/clip/")), None)
    out.append(
        (
            "stream pipeline: step / device-resident step",
            stream and stream["ratios"]["slowdown_vs_device_batches"],
            "<=",
            1.02,
        )
    )
    if stream:
        out.append(
            (
                "stream pipeline: images/s per worker core (reported)",
                stream["derived"]["pipeline_images_per_s_per_worker"],
                ">=",
                0.0,
            )
        )
    check = special.get("attention_check.json")
    out.append(
        (
            "attention check: auto is cudnn and equals XLA",
            check and float(check["all_pass"] and check["auto_resolves_to"] == "cudnn"),
            ">=",
            1.0,
        )
    )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_target_report")
    p.add_argument("folders", nargs="+")
    ms, special = load(p.parse_args(argv).folders)
    print("| target | value | threshold | result |\n| --- | --- | --- | --- |")
    for name, value, cmp, thr in targets(ms, special):
        if value is None:
            verdict, shown = "not measured", "-"
        else:
            ok = value >= thr if cmp == ">=" else value <= thr
            verdict, shown = ("pass" if ok else "miss"), f"{value:.3g}"
            if "(reported)" in name:
                verdict = "reported"
        print(f"| {name} | {shown} | {cmp} {thr:g} | {verdict} |")


if __name__ == "__main__":
    main()
