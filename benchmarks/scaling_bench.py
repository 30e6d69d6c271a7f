"""Data-parallel scaling: train-step throughput on N devices vs 1.

Weak scaling: a fixed batch per device (global batch = per-device batch × N) on a
``sharding.make_mesh`` over the first N devices; the step is the library's train step
jitted with in/out shardings (batch split over ("data", "fsdp"), frozen weights, adapter
and optimizer state replicated), as ``llora_jax.train.finetune`` does. ``ratios.scaling``
= examples/s on N devices ÷ examples/s on 1 device; ``ratios.efficiency`` = that ÷ N.
"""

from __future__ import annotations

from benchmarks import models as MD
from benchmarks import train_bench as TB
from benchmarks.common import Recorder, measurement
from llora_jax import sharding as S

AREA = "scaling"


def device_counts(n: int) -> list[int]:
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return [*out, n]


def run(
    rec: Recorder,
    *,
    tiny: bool,
    model: str,
    method: str,
    precision: str,
    per_device_batch: int,
    warmup: int,
    repeats: int,
    lora_dropout: float = 0.1,
) -> None:
    import jax

    config = MD.hf_config(model, tiny)
    built = MD.build(model, precision, method, tiny=tiny, config=config)
    results: dict[int, dict] = {}
    for n in device_counts(jax.device_count()):
        case = TB.TrainCase(model, method, precision, per_device_batch * n)
        name = f"scaling/{model}/{method}/{precision}/n{n}"
        cfg = {
            **case.config(),
            "n_devices": n,
            "per_device_batch": per_device_batch,
            "global_batch": case.batch,
        }

        m = rec.guard(
            name,
            AREA,
            cfg,
            _time_n,
            n,
            case,
            built,
            name,
            cfg,
            rec,
            tiny,
            warmup,
            repeats,
            lora_dropout,
        )
        if m is not None:
            results[n] = m
    base = results.get(1)
    if base is None:
        return
    for n, m in results.items():
        x = m["derived"]["examples_per_s"] / base["derived"]["examples_per_s"]
        m["ratios"].update({"scaling": x, "efficiency": x / n})
    rec.flush()


def _time_n(n, case, built, name, cfg, rec, tiny, warmup, repeats, lora_dropout) -> dict:
    import jax

    mesh = S.make_mesh(devices=jax.devices()[:n])
    r = TB.Runner(
        case, built, lora_dropout, mesh=mesh, compiler_options=TB.FAST_COMPILE if tiny else None
    ).compile()
    samples, _ = r.time(warmup, repeats)
    med = sorted(samples)[len(samples) // 2]
    derived = {
        "examples_per_s": case.batch / med,
        "compile_s": r.compile_s,
        "n_devices": n,
        "device_kinds": sorted({d.device_kind for d in mesh.devices.flat}),
    }
    return rec.add(measurement(name, AREA, cfg, samples, derived=derived))
