"""Routed many-adapter throughput against the bare base model and one merged adapter.

For a bank of N adapters (N in --adapters), a batch composition (distinct: every example
its own adapter; uniform: √b groups; skewed: Zipf 1.5 over the bank; identical) and each
routed implementation, time one jitted forward pass of the encoder; in the same run time
the bare base model, one merged adapter (W0 + ΔW folded: the upper bound) and one unmerged
adapter through ``adapters.apply`` (the single-adapter path). Before timing, every routed
implementation's output is checked against the gather form.

    python -m benchmarks.multi_bench [--model tiny|minilm] [--adapters 1,16,256,1024,10000]
        [--batch 32] [--seq 64] [--rank 16] [--repeats 5] [--out FILE]

Results: JSON under benchmarks/results/ (device, versions, command, date per file).
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.multi_models import MODELS, build_case
from llora_jax import adapters
from llora_jax.adapters import routed

ROOT = Path(__file__).resolve().parents[1]
AREA = "multi_adapter"
COMPOSITIONS = ("distinct", "uniform", "skewed", "identical")
IMPLS = ("gather", "ragged", "onehot", "shared_a", "dense")
# Where a form's cost makes a case pointless (N× the FLOPs: one-hot, and ragged_dot, which
# XLA:CPU lowers to a dense masked product; or a dense ΔW bank too large).
MAX_N = {"onehot": 256, "dense": 16, "ragged": 256}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def compose(kind: str, n: int, b: int, rng: np.random.Generator) -> np.ndarray:
    """Adapter ids (b,) for a batch composition over a bank of n adapters."""
    if kind == "distinct":  # every example its own adapter (as far as the bank allows)
        return (rng.permutation(n)[:b] if n >= b else np.arange(b) % n).astype(np.int32)
    if kind == "uniform":  # √b groups of equal size
        g = min(n, max(1, round(math.sqrt(b))))
        return rng.choice(n, g, replace=False)[np.arange(b) % g].astype(np.int32)
    if kind == "skewed":  # Zipf(1.5) popularity over the bank
        p = np.arange(1, n + 1, dtype=np.float64) ** -1.5
        return rng.choice(n, b, p=p / p.sum()).astype(np.int32)
    if kind == "identical":
        return np.zeros(b, np.int32)
    raise ValueError(f"unknown composition {kind!r}; valid: {', '.join(COMPOSITIONS)}")


def make_banks(
    params, targets, n: int, rank: int, with_dense: bool, dtype=jnp.float32
) -> dict[str, routed.RoutedBank]:
    """Random banks of n adapters built on device: factors, shared_a (and dense)."""
    mods = adapters.target_modules(params, targets)
    flat = {m: params_at(params, m) for m in mods}
    key = jax.random.key(n)
    factors, shared, dense = {}, {}, {}
    for i, m in enumerate(mods):
        d_in, d_out = flat[m].shape
        ka, kb, k0 = jax.random.split(jax.random.fold_in(key, i), 3)
        a = (jax.random.uniform(ka, (n, d_in, rank), jnp.float32, -1, 1) / math.sqrt(d_in)).astype(
            dtype
        )
        b = (0.02 * jax.random.normal(kb, (n, rank, d_out), jnp.float32)).astype(dtype)
        scale = jnp.full((n,), 2.0, jnp.float32)
        factors[m] = {"A": a, "B": b, "scale": scale}
        shared[m] = {"A0": a[0], "B": b, "scale": scale}
        if with_dense:
            dense[m] = {"W": jnp.einsum("nik,nko->nio", a, b), "scale": scale}
    banks = {
        "factors": routed.RoutedBank(factors, "factors"),
        "shared_a": routed.RoutedBank(shared, "shared_a"),
    }
    if with_dense:
        banks["dense"] = routed.RoutedBank(dense, "dense")
    return banks


def params_at(params, module_path: str):
    node = params
    for k in module_path.split("/"):
        node = node[k]
    return node["kernel"]


@functools.cache
def _routed_fn(module, impl, method=None):
    return jax.jit(
        lambda p, bank, ids, *xs: routed.apply(module, p, bank, ids, *xs, impl=impl, method=method)
    )


@functools.cache
def _base_fn(module, method=None):
    return jax.jit(lambda p, *xs: module.apply({"params": p}, *xs, method=method))


@functools.cache
def _single_fn(module, scale, method=None):
    return jax.jit(
        lambda p, phi, *xs: adapters.apply(module, p, phi, *xs, scale=scale, method=method)
    )


def _bank_of(impl: str) -> str:
    return {"shared_a": "shared_a", "dense": "dense"}.get(impl, "factors")


def adapter_cost(impl: str, params, targets, n: int, rows: int, tokens: int, rank: int) -> dict:
    """Analytic adapter FLOPs and extra bytes (at 4 bytes a value) per batch, from the table
    in routed_kernels."""
    flops = gathered = 0
    for m in adapters.target_modules(params, targets):
        d_in, d_out = params_at(params, m).shape
        branch = 2 * rank * (d_in + d_out) * rows * tokens
        flops += {"onehot": n * branch, "dense": 2 * d_in * d_out * rows * tokens}.get(impl, branch)
        gathered += {
            "gather": rows * rank * (d_in + d_out),
            "shared_a": rows * rank * d_out,
            "onehot": n * rank * (d_in + d_out),
            "ragged": min(n, rows) * rank * (d_in + d_out),
            "dense": rows * d_in * d_out,
        }[impl] * 4
    return {"adapter_flops": flops, "adapter_bytes": gathered}


def _time(rec, name, cfg, fn, args, a, n_tokens, base_call=None):
    """Median wall time of ``fn(*args)``; with ``base_call``, base and case alternate each
    repeat and ``time_over_base_paired`` is the median of their ratios (robust to a CPU
    whose load changes during the run)."""
    sync = jax.block_until_ready
    sync(fn(*args))  # compile and warm up
    samples, ratios = [], []
    for _ in range(a.repeats):
        if base_call is not None:
            t0 = time.perf_counter()
            sync(base_call())
            t_base = time.perf_counter() - t0
        t0 = time.perf_counter()
        sync(fn(*args))
        samples.append(time.perf_counter() - t0)
        if base_call is not None:
            ratios.append(samples[-1] / t_base)
    med = float(np.median(samples))
    derived = {"examples_per_s": a.batch / med, "tokens_per_s": n_tokens / med}
    if ratios:
        derived["time_over_base_paired"] = float(np.median(ratios))
    return rec.add(common.measurement(name, AREA, cfg, samples, derived=derived))


def run_baselines(rec, bm, a, targets, n_tokens):
    """The bare base model, one merged adapter (folded) and one unmerged adapter."""
    cfg0 = dict(
        model=a.model,
        batch=a.batch,
        seq=a.seq,
        rank=a.rank,
        dtype=a.dtype,
        ragged_pallas=a.ragged_pallas,
        targets=a.targets or "default",
    )
    module, params, xs = bm.module, bm.params, bm.inputs
    base_fn = _base_fn(module, bm.method)
    out = {
        "base": _time(
            rec, "base model", cfg0 | {"impl": "base"}, base_fn, (params, *xs), a, n_tokens
        )
    }
    base_call = functools.partial(base_fn, params, *xs)
    cfg = adapters.LoraConfig(rank=a.rank, alpha=2.0 * a.rank, targets=targets, init_b="normal")
    phi = adapters.init_lora(jax.random.key(1), params, cfg)
    merged = adapters.merge_into_params(params, phi, cfg.scale)
    cases = {
        "merged": ("one merged adapter (folded)", base_fn, (merged, *xs)),
        "single": ("one unmerged adapter (attach.apply)", _single_fn(module, cfg.scale, bm.method), (params, phi, *xs)),
    }  # fmt: skip
    for key, (name, fn, args) in cases.items():
        out[key] = _time(rec, name, cfg0 | {"impl": key}, fn, args, a, n_tokens, base_call)
    return out, base_call


def _routed_cases(rec, bm, banks, ids, a, case_cfg, base_call, n_tokens):
    """Every implementation on one bank and batch composition; outputs checked against gather."""
    ref, measured = None, []
    for impl in [i for i in a.impls if case_cfg["n_adapters"] <= MAX_N.get(i, 10**9)]:
        name = f"N={case_cfg['n_adapters']} {case_cfg['composition']} {impl}"
        cfg = case_cfg | {"impl": impl}
        args = (bm.params, banks[_bank_of(impl)], ids, *bm.inputs)
        fn = _routed_fn(bm.module, impl, bm.method)
        got = rec.guard(name, AREA, cfg, fn, *args)
        if got is None:
            continue
        if impl in ("gather", "ragged", "onehot"):  # the same bank: outputs must agree
            ref = got if ref is None else ref
            cfg["max_abs_diff_vs_gather"] = float(jnp.max(jnp.abs(got - ref)))
        m = rec.guard(name, AREA, cfg, _time, rec, name, cfg, fn, args, a, n_tokens, base_call)
        if m is not None:
            measured.append((impl, m))
    return measured


def run(a: argparse.Namespace) -> Path:
    dev = common.jax_device()
    stamp = common.now_iso().replace(":", "")  # like the other result files: no colons
    label = f"{stamp}-{common.device_label(dev)}-multi-{a.model}.json"
    out = Path(a.out or ROOT / "benchmarks/results" / label)
    rec = common.Recorder(out, dev)
    if a.ragged_pallas:  # GPU: the Pallas Triton lowering of ragged_dot (issue 23)
        jax.config.update("jax_ragged_dot_use_gpu_pallas_triton_lowering", True)
    bm = build_case(a.model, a.batch, a.seq, DTYPES[a.dtype], a.model_dir)
    params = bm.params
    targets = tuple(a.targets.split(",")) if a.targets else bm.targets
    rng = np.random.default_rng(0)
    n_tokens = a.batch * bm.tokens
    base, base_call = run_baselines(rec, bm, a, targets, n_tokens)
    for m in base.values():
        m["ratios"] = {k: m["median"] / v["median"] for k, v in base.items()}
    for n in a.adapters:
        with_dense = n <= MAX_N["dense"]
        banks = make_banks(params, targets, n, a.rank, with_dense, DTYPES[a.dtype])
        for comp in a.compositions:
            ids = compose(comp, n, a.batch, rng)
            distinct = int(len(np.unique(ids)))
            case_cfg = dict(
                model=a.model, batch=a.batch, seq=a.seq, rank=a.rank, dtype=a.dtype, n_adapters=n,
                composition=comp, distinct=distinct,
                auto_choice=routed.choose_impl(banks["factors"], a.batch, distinct=distinct),
            )  # fmt: skip
            cases = _routed_cases(
                rec, bm, banks, jnp.asarray(ids), a, case_cfg, base_call, n_tokens
            )
            for impl, m in cases:
                m["derived"] |= adapter_cost(impl, params, targets, n, a.batch, bm.tokens, a.rank)
                m["ratios"] = {k: m["median"] / v["median"] for k, v in base.items()}
        del banks
    body = {"command": common.command_line("benchmarks.multi_bench"), "date": common.now_iso(),
            "device": dev, "versions": rec.versions, "measurements": rec.items}  # fmt: skip
    common.dump(body, out)
    print(table(rec.items))
    print(summary_table(rec.items))
    return out


def table(items: list[dict]) -> str:
    """Markdown: examples/s per case and its ratio of time to the base model's."""
    lines = [
        "| case | examples/s | tokens/s | time / base | time / merged |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for m in items:
        if m.get("median") is None:
            lines.append(f"| {m['name']} | skipped or failed | | | |")
            continue
        r = m.get("ratios") or {}
        d = m["derived"]
        lines.append(
            f"| {m['name']} | {d['examples_per_s']:.1f} | {d['tokens_per_s']:.0f} | "
            f"{d.get('time_over_base_paired', r.get('base', 1.0)):.3f} | "
            f"{r.get('merged', float('nan')):.3f} |"
        )
    return "\n".join(lines)


def summary_table(items: list[dict]) -> str:
    """Markdown: routed time / base time (paired medians), one row per bank size and
    composition, one column per implementation; "–" where a case was not run."""
    cells: dict[tuple, dict[str, str]] = {}
    for m in items:
        c = m["config"]
        if "n_adapters" not in c:
            continue
        v = m["derived"].get("time_over_base_paired") if m.get("median") is not None else None
        row = cells.setdefault((c["n_adapters"], c["composition"]), {"auto": c["auto_choice"]})
        row[c["impl"]] = "–" if v is None else f"{v:.2f}"
    head = "| N | composition | " + " | ".join(IMPLS) + " | auto picks |"
    lines = [head, "| ---: | --- | " + " | ".join("---:" for _ in IMPLS) + " | --- |"]
    for (n, comp), row in cells.items():
        vals = " | ".join(row.get(i, "–") for i in IMPLS)
        lines.append(f"| {n} | {comp} | {vals} | {row['auto']} |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", choices=MODELS)
    ap.add_argument("--model-dir", default=None, help="minilm: a local checkpoint directory")
    ap.add_argument(
        "--ragged-pallas", action="store_true", help="GPU: Pallas Triton lowering of ragged_dot"
    )
    ap.add_argument("--adapters", default="1,16,256,1024,10000")
    ap.add_argument("--compositions", default=",".join(COMPOSITIONS))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument(
        "--targets", default="", help="adapted layers (regexes, comma-separated; default q,v)"
    )
    ap.add_argument("--dtype", default="f32", choices=tuple(DTYPES), help="weights, bank, compute")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    a.adapters = [int(v) for v in a.adapters.split(",")]
    a.compositions = a.compositions.split(",")
    a.impls = a.impls.split(",")
    for c in a.compositions:
        if c not in COMPOSITIONS:
            ap.error(f"unknown composition {c!r}; valid: {', '.join(COMPOSITIONS)}")
    for i in a.impls:
        if i not in IMPLS:
            ap.error(f"unknown implementation {i!r}; valid: {', '.join(IMPLS)}")
    return a


def main(argv: list[str] | None = None) -> Path:
    return run(parse(argv))


if __name__ == "__main__":
    main()
