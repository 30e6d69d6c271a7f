"""Multi-device train steps: data-parallel scaling (N devices vs 1) and FSDP.

Weak scaling: a fixed batch per device (global batch = per-device batch × N) on a
``sharding.make_mesh`` over the first N devices; the step is the library's train step
jitted with in/out shardings, as ``llora_jax.train.finetune`` does:

* ``dp``:   mesh (data=N); batch split, frozen weights, adapter and optimizer state replicated;
* ``fsdp``: mesh (fsdp=N); batch split over fsdp too, frozen backbone weights sharded by the
            "fsdp" logical-axis rules (``sharding.RULES["fsdp"]``: the embedding dimension of
            every weight split over the devices), adapters and optimizer state replicated.

The cases of one model are lowered, compiled concurrently, then timed one after the other,
model after model (a time budget skips a model whose compiles would not end in time).
``ratios.scaling`` = examples/s ÷ examples/s of the same model's ``dp`` case on 1 device;
``ratios.efficiency`` = that ÷ N; for ``fsdp``, ``ratios.time_over_dp`` and
``memory_over_dp`` compare with ``dp`` on the same devices. Memory is the compiled
program's per-device buffers.
"""

from __future__ import annotations

import dataclasses
import time

from benchmarks import models, train_bench
from benchmarks.common import Recorder, measurement
from llora_jax.train import sharding

AREA = "scaling"


@dataclasses.dataclass(frozen=True)
class ScalingSpec:
    """One model/method/precision at a per-device batch, on ``counts`` devices (None: 1, 2, 4, …
    up to all of them)."""

    model: str
    method: str = "lora"
    precision: str = "bf16"
    per_device_batch: int = 128
    mode: str = "dp"  # "dp" | "fsdp"
    counts: tuple[int, ...] | None = None
    dropout: float | None = None  # None: as in training; else every dropout rate (LoRA's too)


@dataclasses.dataclass(frozen=True)
class ScalingCase:
    spec: ScalingSpec
    n: int

    @property
    def name(self) -> str:
        s = self.spec
        mode = "" if s.mode == "dp" else f"/{s.mode}"
        return f"scaling/{s.model}/{s.method}/{s.precision}{mode}/n{self.n}"

    @property
    def train_case(self) -> train_bench.TrainCase:
        s = self.spec
        return train_bench.TrainCase(s.model, s.method, s.precision, s.per_device_batch * self.n)

    def config(self) -> dict:
        s = self.spec
        return {
            **self.train_case.config(),
            "dropout": "as in training" if s.dropout is None else s.dropout,
            "mode": s.mode,
            "n_devices": self.n,
            "per_device_batch": s.per_device_batch,
            "global_batch": s.per_device_batch * self.n,
        }


def device_counts(n: int) -> list[int]:
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return [*out, n]


def expand(specs: list[ScalingSpec], n_devices: int) -> tuple[list[ScalingCase], list[ScalingCase]]:
    """(cases that fit ``n_devices``, cases that need more devices)."""
    fit, more = [], []
    for s in specs:
        for n in s.counts or device_counts(n_devices):
            (fit if n <= n_devices else more).append(ScalingCase(s, n))
    return fit, more


def run(
    specs: list[ScalingSpec],
    rec: Recorder,
    *,
    tiny: bool,
    warmup: int,
    repeats: int,
    lora_dropout: float = 0.1,
    rng_impl: str = "rbg",
    compile_workers: int = 4,
) -> None:
    import jax

    cases, too_big = expand(specs, jax.device_count())
    for c in too_big:
        rec.add(
            measurement(
                c.name,
                AREA,
                c.config(),
                error=f"skipped: needs {c.n} devices, have {jax.device_count()}",
            )
        )
    # One compile wave per model, in the order of the specs: what is compiled is timed
    # before the next wave compiles (XLA's autotuning runs on the GPUs and would disturb
    # timings), and a model whose wave would end past the budget is skipped.
    results: dict[ScalingCase, dict] = {}
    built: dict = {}
    for model in dict.fromkeys(c.spec.model for c in cases):
        group = [c for c in cases if c.spec.model == model]
        est = train_bench.estimate_wave_s([model], len(group), compile_workers, {}, tiny)
        if not rec.fits(est):
            reason = f"time budget ({len(group)} compiles estimated at {est:.0f} s, "
            rec.skip_all(group, AREA, reason + f"{rec.seconds_left():.0f} s left)")
            continue
        runners: list[tuple[ScalingCase, train_bench.Runner]] = []
        for c in group:
            r = rec.guard(c.name, AREA, c.config(), _lower, c, built, tiny, lora_dropout, rng_impl)
            if r is not None:
                runners.append((c, r))
        t0 = time.perf_counter()
        train_bench._compile_all([r for _, r in runners], compile_workers)
        compile_wall = time.perf_counter() - t0
        for c, r in runners:
            if r.compiled is None:
                rec.add(measurement(c.name, AREA, c.config(), error=f"compile: {r.compile_error}"))
                continue
            m = rec.guard(
                c.name, AREA, c.config(), _time, c, r, rec, warmup, repeats, compile_wall, est
            )
            r.compiled = r.lowered = r.batches = r.frozen = r.trainable0 = None
            if m is not None:
                results[c] = m
        _ratios(results)
        rec.flush()


def _lower(c: ScalingCase, built: dict, tiny: bool, lora_dropout: float, rng_impl: str):
    import jax

    s = c.spec
    key = (s.model, s.precision, s.method, s.dropout)
    if key not in built:
        config = models.hf_config(s.model, tiny)
        if s.dropout is not None:  # the backbone's own dropout too (T5: dropout_rate)
            for attr in ("dropout_rate", "dropout", "attention_dropout"):
                if hasattr(config, attr):
                    setattr(config, attr, s.dropout)
        built[key] = models.build(s.model, s.precision, s.method, tiny=tiny, config=config)
    b = built[key]
    lora_dropout = lora_dropout if s.dropout is None else s.dropout
    if s.mode == "dp":
        mesh, param_sh = sharding.make_mesh(devices=jax.devices()[: c.n]), None
    elif s.mode == "fsdp":
        mesh = sharding.make_mesh(data=1, fsdp=c.n, devices=jax.devices()[: c.n])
        specs = models.logical_specs(s.model, b.module, b.shapes)
        param_sh = sharding.param_shardings(specs, mesh, "fsdp", shapes=b.params)
    else:
        raise ValueError(f"unknown scaling mode {s.mode!r}; valid: dp, fsdp")
    return train_bench.Runner(
        c.train_case,
        b,
        lora_dropout,
        mesh=mesh,
        compiler_options=train_bench.FAST_COMPILE if tiny else None,
        rng_impl=rng_impl,
        param_shardings=param_sh,
    )


def _time(
    c: ScalingCase, r: train_bench.Runner, rec: Recorder, warmup, repeats, compile_wall, est
) -> dict:
    from benchmarks import flops

    samples, last = r.time(warmup, repeats)
    med = sorted(samples)[len(samples) // 2]
    mem = flops.compiled_memory(r.compiled)
    derived = {
        "examples_per_s": c.train_case.batch / med,
        "compile_s": r.compile_s,
        "compile_wall_s_all": compile_wall,
        "wave_estimate_s": est,
        "n_devices": c.n,
        "peak_bytes_per_device": mem.get("peak_estimate"),
        "memory_compiled": mem,
        "memory_source": "compiled.memory_analysis() of the SPMD program (per device)",
        "last_loss": last.get("loss"),
        "rng_impl": r.rng_impl,
    }
    return rec.add(measurement(c.name, AREA, c.config(), samples, derived=derived))


def _ratios(results: dict[ScalingCase, dict]) -> None:
    def find(model, mode, n):
        return next(
            (m for c, m in results.items() if (c.spec.model, c.spec.mode, c.n) == (model, mode, n)),
            None,
        )

    for c, m in results.items():
        base = find(c.spec.model, "dp", 1)
        if base is not None:
            x = m["derived"]["examples_per_s"] / base["derived"]["examples_per_s"]
            m["ratios"].update({"scaling": x, "efficiency": x / c.n})
        if c.spec.mode == "fsdp":
            dp = find(c.spec.model, "dp", c.n)
            if dp is not None:
                m["ratios"]["time_over_dp"] = m["median"] / dp["median"]
                pb, db = (
                    m["derived"]["peak_bytes_per_device"],
                    dp["derived"]["peak_bytes_per_device"],
                )
                if pb and db:
                    m["ratios"]["memory_over_dp"] = pb / db
