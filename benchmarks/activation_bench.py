"""What MiniLM's feed-forward activation costs in bf16, and which GELU forms cost less.

The profile of the text study's merge grid (benchmarks/NOTES.md, session 7) found the
exact-erf GELU of the feed-forward layers taking about 30% of a pass. This times the
feed-forward input layer, y = act(x W + b), at the grid's shape (32 models × 32 rows × 64
tokens = 65,536 tokens, 384 → 1536, bf16) with several forms of the activation, and measures
each form's largest error against the exact GELU computed in float64 on the host.

    python -m benchmarks.activation_bench [--tokens N] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from llora_jax.backbones import activations

ROOT = Path(__file__).resolve().parents[1]


def _exact_f32(y):
    y32 = y.astype(jnp.float32)
    return jax.nn.gelu(y32, approximate=False).astype(y.dtype)


FORMS = {
    "erf (jax.nn.gelu exact, XLA erf)": lambda y: jax.nn.gelu(y, approximate=False),
    "erf computed in float32": _exact_f32,
    "erf by Abramowitz-Stegun 7.1.26 (activations.gelu_erf, MiniLM now)": activations.gelu_erf,
    "tanh approximation": lambda y: jax.nn.gelu(y, approximate=True),
    "none (the layer alone)": lambda y: y,
}


def _exact64(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = common.jax_device()
    out = Path(
        a.out
        or ROOT / "benchmarks/results" / f"{common.now_iso()}-{common.device_label(dev)}-act.json"
    )
    rec = common.Recorder(out, dev)
    dtype = jnp.bfloat16 if dev["platform"] != "cpu" else jnp.float32
    key = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key[0], (a.tokens, 384), dtype)
    w = (jax.random.normal(key[1], (384, 1536), jnp.float32) / 20).astype(dtype)
    b = (jax.random.normal(key[2], (1536,), jnp.float32) / 10).astype(dtype)
    grid = np.linspace(-8, 8, 200001)
    want = _exact64(grid)
    for name, act in FORMS.items():
        fn = jax.jit(lambda x, w, b, act=act: act(x @ w + b))
        samples = common.time_repeated(
            lambda fn=fn: fn(x, w, b), jax.block_until_ready, warmup=3, repeats=a.repeats
        )
        got = np.asarray(jax.jit(act)(jnp.asarray(grid, jnp.float32)), np.float64)
        err = float(np.max(np.abs(got - want)))
        flops = 2 * a.tokens * 384 * 1536
        rec.add(
            common.measurement(
                name,
                "activation",
                {"tokens": a.tokens, "shape": "384->1536", "dtype": str(np.dtype(dtype))},
                samples,
                derived={"max_abs_error_float32_vs_exact": err, "matmul_flop": flops},
            )
        )
    meta = {"command": common.command_line("benchmarks.activation_bench"), "date": common.now_iso()}
    meta["device"] = dev
    common.dump({"meta": meta | {"versions": rec.versions}, "measurements": rec.items}, out)
    base = rec.items[-1]["median"]
    for m in rec.items:
        err = m["derived"]["max_abs_error_float32_vs_exact"]
        print(
            f"{m['name']:<36s} {m['median'] * 1e6:9.1f} us  (+{(m['median'] - base) * 1e6:7.1f})"
            f"  max |error| {err:.1e}"
        )
    return out


if __name__ == "__main__":
    main()
