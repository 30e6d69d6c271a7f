"""The adapter bank's device cache: a batch whose adapters are resident vs one that must
copy C adapters host→device first, and the host→device bandwidth, in one run.

An ``AdapterBank`` of N in-memory LoRA adapters (r, targets as multi_bench) and a device
cache of C slots. Each timed step = ``bank.resolve`` (LRU bookkeeping and the copy of
missing adapters) + one routed forward pass (gather). *resident*: every batch names the
same C adapters (all hits after the first); *copy*: every batch names C adapters not
resident (cycling through N ≥ 2C), so C adapters are copied per batch. Bandwidth: one
``jax.device_put`` of a host array of the size of C adapters, timed alone.

    python -m benchmarks.bank_bench [--model tiny|bert-base|minilm] [--adapters 256]
        [--capacity 32] [--batch 32] [--seq 64] [--dtype f32|bf16] [--repeats 10] [--out F]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.multi_bench import DTYPES, params_at
from benchmarks.multi_models import build_model
from llora_jax import adapters
from llora_jax.adapters import routed
from llora_jax.backbones import bert
from llora_jax.serving.bank import AdapterBank

ROOT = Path(__file__).resolve().parents[1]


def host_entries(params, n: int, rank: int, seed: int = 0) -> dict[str, dict]:
    """N random LoRA bank entries as host (numpy f32) arrays."""
    rng = np.random.default_rng(seed)
    mods = adapters.target_modules(params, bert.DEFAULT_LORA_TARGETS)
    shapes = {m: params_at(params, m).shape for m in mods}
    out = {}
    for i in range(n):
        out[f"a{i}"] = {
            m: {
                "A": rng.uniform(-1, 1, (d_in, rank)).astype(np.float32) / np.sqrt(d_in),
                "B": 0.02 * rng.standard_normal((rank, d_out)).astype(np.float32),
                "scale": 2.0,
            }
            for m, (d_in, d_out) in shapes.items()
        }
    return out


def _step(bank, fwd, params, names, x, mask):
    dev, ids = bank.resolve(names)
    return fwd(params, dev, jnp.asarray(ids), x, mask).block_until_ready()


def run(a: argparse.Namespace) -> dict:
    dtype = DTYPES[a.dtype]
    module, params = build_model(a.model, dtype, a.model_dir)
    entries = host_entries(params, a.adapters, a.rank)
    bank = AdapterBank(entries, capacity=a.capacity, dtype=dtype)
    fwd = jax.jit(lambda p, b, i, x, m: routed.apply(module, p, b, i, x, m, impl="gather"))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(5, 90, (a.batch, a.seq)), jnp.int32)
    mask = jnp.ones_like(x)
    names = list(entries)
    groups = [names[i : i + a.capacity] for i in range(0, len(names), a.capacity)]
    groups = [g for g in groups if len(g) == a.capacity]
    if len(groups) < 2:
        raise SystemExit("--adapters must be at least twice --capacity (copy case)")

    def batch_names(group):
        return [group[j % len(group)] for j in range(a.batch)]

    resident, copy = [], []
    _step(bank, fwd, params, batch_names(groups[0]), x, mask)  # compile, fill
    _step(bank, fwd, params, batch_names(groups[1]), x, mask)  # compile the scatter too
    for r in range(a.repeats):  # alternating: drift hits both cases
        t = time.perf_counter()
        _step(bank, fwd, params, batch_names(groups[(r + 2) % len(groups)]), x, mask)
        copy.append(time.perf_counter() - t)
        same = batch_names(groups[(r + 2) % len(groups)])
        t = time.perf_counter()
        _step(bank, fwd, params, same, x, mask)
        resident.append(time.perf_counter() - t)
    per = bank.bytes_per_adapter()
    host = np.ones(per * a.capacity // jnp.dtype(dtype).itemsize, dtype)
    jax.device_put(host).block_until_ready()
    bw = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        jax.device_put(host).block_until_ready()
        bw.append(time.perf_counter() - t)
    return {
        "date": common.now_iso(),
        "command": common.command_line("benchmarks.bank_bench"),
        "device": common.jax_device(),
        "versions": common.versions(),
        "config": vars(a),
        "bytes_per_adapter": per,
        "resident_s": resident,
        "copy_s": copy,
        "copy_over_resident_median": float(np.median(copy) / np.median(resident)),
        "h2d_bytes": int(host.nbytes),
        "h2d_s": bw,
        "h2d_GBps_median": float(host.nbytes / np.median(bw) / 1e9),
        "cache": vars(bank.stats),
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", choices=("tiny", "bert-base", "minilm"))
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--adapters", type=int, default=256)
    ap.add_argument("--capacity", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="f32", choices=tuple(DTYPES))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    a = parse(argv)
    body = run(a)
    dev = common.device_label(body["device"])
    out = Path(
        a.out
        or ROOT / "benchmarks/results" / f"{common.now_iso().replace(':', '')}-{dev}-bank.json"
    )
    common.dump(body, out)
    print(
        {
            k: body[k]
            for k in ("bytes_per_adapter", "copy_over_resident_median", "h2d_GBps_median", "cache")
        }
    )
    return out


if __name__ == "__main__":
    main()
