"""Where one train step spends the GPU: a ``jax.profiler`` trace of a few steps, summed by kernel.

    python -m benchmarks.profile_step --model clip --method lora --batch 256 --out DIR

Builds the step as ``benchmarks.train_bench`` does (same case, same attention), compiles and
warms it, traces ``--steps`` steps into a temporary folder, and writes the per-kernel table
(``trace_summary.kernel_table``: ms, share of device busy time, launches) to
``DIR/profile-<case>.json``: the trace itself lies too deep for the device tool to return.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import jax

from benchmarks import models, trace_summary, train_bench


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step")
    p.add_argument("--model", default="clip", choices=("clip", "t5"))
    p.add_argument("--method", default="lora")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--attention", default="auto")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    case = train_bench.TrainCase(a.model, a.method, a.precision, a.batch, a.attention)
    built = models.build(a.model, a.precision, a.method, tiny=a.tiny, attention=a.attention)
    runner = train_bench.Runner(case, built, 0.1).compile()
    state = runner.new_state()
    for _ in range(2):  # warm
        state, _ = runner.compiled(state, runner.frozen, runner.batches[0], runner.rng)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as trace:
        with jax.profiler.trace(trace):
            for i in range(a.steps):
                state, _ = runner.compiled(state, runner.frozen, runner.batches[i % 2], runner.rng)
            jax.block_until_ready(state)
        rows = trace_summary.kernel_table(trace)
    busy = sum(r[1] for r in rows)
    result = {
        "case": case.name,
        "steps": a.steps,
        "device": jax.devices()[0].device_kind,
        "device_busy_ms_per_step": busy / a.steps,
        "kernels": [
            {"kernel": k, "ms_per_step": ms / a.steps, "share": share, "launches": n}
            for k, ms, share, n in rows[: a.top]
        ],
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "profile-" + re.sub(r"[^A-Za-z0-9_.-]", "_", case.name) + ".json"
    (out / name).write_text(json.dumps(result, indent=1))
    print(f"{case.name}: device busy {busy / a.steps:.1f} ms per step")
    for r in result["kernels"][:15]:
        print(f"{r['ms_per_step']:8.2f} ms {100 * r['share']:5.1f}%  {r['kernel'][:90]}")
    return result


if __name__ == "__main__":
    main()
