"""What ``jax.lax.ragged_dot`` compiles to on this backend: a grouped kernel, or a dense
masked product (N× the FLOPs)?

Compiles ``ragged_dot(x (rows, d_in), A (n, d_in, r), group_sizes)`` (the routed LoRA
down-projection after sorting by adapter) with and without the GPU Pallas Triton
lowering flag, writes each optimized HLO text, and a JSON summary: the dot / custom-call
instructions, whether an operand of n·d_in columns (the masked form) appears, XLA's FLOP
estimate against the grouped FLOPs 2·rows·d_in·r, and the median time.

    python -m benchmarks.ragged_hlo [--rows 2048] [--d-in 768] [--rank 16] [--n 256] --out DIR
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common

FLAG = "jax_ragged_dot_use_gpu_pallas_triton_lowering"


def _compile(rows: int, d_in: int, rank: int, n: int, dtype) -> tuple:
    x = jnp.ones((rows, d_in), dtype)
    a = jnp.ones((n, d_in, rank), dtype)
    sizes = jnp.full((n,), rows // n, jnp.int32).at[0].add(rows - n * (rows // n))
    fn = jax.jit(lambda x, a, s: jax.lax.ragged_dot(x, a, s))
    compiled = fn.lower(x, a, sizes).compile()
    return fn, compiled, (x, a, sizes)


def _summary(text: str, compiled, n: int, d_in: int, rows: int, rank: int) -> dict:
    ops = re.findall(r"=\s*\S+\s+(dot|custom-call|fusion)\(", text)
    targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))
    try:
        flops = float((compiled.cost_analysis() or {}).get("flops", float("nan")))
    except Exception:  # cost_analysis is not available on every backend
        flops = float("nan")
    return {
        "ops": {k: ops.count(k) for k in set(ops)},
        "custom_call_targets": targets,
        "masked_operand_seen": bool(re.search(rf"\b{n * d_in}\b", text)),
        "xla_flops": flops,
        "grouped_flops": 2.0 * rows * d_in * rank,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--dtype", default="bf16", choices=("f32", "bf16"))
    p.add_argument("--out", required=True)
    a = p.parse_args()
    dtype = jnp.bfloat16 if a.dtype == "bf16" else jnp.float32
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    body = {"date": common.now_iso(), "device": common.jax_device(), "versions": common.versions()}
    body["command"] = common.command_line("benchmarks.ragged_hlo")
    for pallas in (False, True):
        jax.config.update(FLAG, pallas)
        fn, compiled, args = _compile(a.rows, a.d_in, a.rank, a.n, dtype)
        text = compiled.as_text()
        (out / f"ragged_hlo_pallas{int(pallas)}.txt").write_text(text)
        fn(*args).block_until_ready()
        times = []
        for _ in range(20):
            t = time.perf_counter()
            fn(*args).block_until_ready()
            times.append(time.perf_counter() - t)
        body[f"pallas={pallas}"] = _summary(text, compiled, a.n, a.d_in, a.rows, a.rank) | {
            "median_s": float(np.median(times))
        }
    (out / "ragged_hlo.json").write_text(json.dumps(body, indent=1))
    print(json.dumps(body, indent=1))


if __name__ == "__main__":
    main()
