"""Input pipeline: how many batches/s ``data.batches`` (+ ``prefetch_to_device``) delivers,
against how many the train step consumes.

Three rates per model, on synthetic arrays of the benchmark shapes (uint8 224² images;
128 + 8 token ids):

* ``host``:      ``data.batches`` alone (seeded shuffle, fancy-indexed host copies);
* ``prefetch``:  the same through ``prefetch_to_device`` (background thread, device
                 transfer), each batch waited for on the device;
* ``e2e``:       the compiled train step fed by that prefetch iterator, no per-step
                 synchronisation (the host pipeline overlaps the device), against the same
                 step fed from device-resident batches (``synthetic``).

``derived.headroom`` = pipeline batches/s ÷ step's steps/s (> 1: the step is not input bound).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from benchmarks import models as model_shapes
from benchmarks.common import Recorder, measurement
from llora_jax import data

AREA = "pipeline"


def _rate(it, n: int, sync=lambda b: b) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        sync(next(it))
        samples.append(time.perf_counter() - t0)
    return samples


def run(
    models: list[str],
    rec: Recorder,
    *,
    tiny: bool,
    batch: int,
    n_batches: int,
    runners: dict[str, Any] | None = None,
    num_workers: int = 0,
) -> None:
    runners = runners or {}
    shapes = model_shapes.TINY_SHAPES if tiny else model_shapes.REAL_SHAPES
    for model in models:
        config = model_shapes.hf_config(model, tiny)
        arrays = model_shapes.synthetic_arrays(model, 4 * batch, shapes, config, seed=7)
        cfg = {
            "model": model,
            "batch": batch,
            "n_batches": n_batches,
            "num_workers": num_workers,
            "rows": 4 * batch,
        }
        host: dict[str, float] = {}
        for stage in ("host", "prefetch"):
            rate = rec.guard(
                f"pipeline/{model}/{stage}",
                AREA,
                cfg,
                _stage_rate,
                stage,
                model,
                arrays,
                cfg,
                rec,
                batch,
                n_batches,
                num_workers,
            )
            if rate is not None:
                host[stage] = rate
        runner = next(
            (r for r in runners.values() if r.case.model == model and r.case.batch == batch), None
        )
        if runner is not None:
            rec.guard(
                f"pipeline/{model}/e2e",
                AREA,
                cfg,
                _e2e,
                model,
                arrays,
                cfg,
                runner,
                rec,
                batch,
                n_batches,
                host,
                num_workers,
            )


def _stage_rate(stage, model, arrays, cfg, rec, batch, n_batches, num_workers) -> float:
    it = data.batches(arrays, batch, seed=0, epochs=None, num_workers=num_workers)
    sync = lambda b: b  # noqa: E731
    if stage == "prefetch":
        it, sync = data.prefetch_to_device(it, 2), jax.block_until_ready
    next(it)
    s = _rate(it, n_batches, sync)
    rate = 1.0 / float(np.median(s))
    derived = {"batches_per_s": rate, "examples_per_s": batch * rate}
    rec.add(
        measurement(f"pipeline/{model}/{stage}", AREA, {**cfg, "stage": stage}, s, derived=derived)
    )
    return rate


def _e2e(model, arrays, cfg, runner, rec, batch, n_batches, host, num_workers):
    def timed(feed) -> float:
        state = runner.new_state()
        state, _ = runner.compiled(state, runner.frozen, next(feed), runner.rng)  # warm
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            state, metrics = runner.compiled(state, runner.frozen, next(feed), runner.rng)
        jax.block_until_ready(state)
        return (time.perf_counter() - t0) / n_batches

    def device_feed():
        i = 0
        while True:
            i ^= 1
            yield runner.batches[i]

    synthetic = timed(device_feed())
    fed = timed(
        data.prefetch_to_device(
            data.batches(arrays, batch, seed=0, epochs=None, num_workers=num_workers), 2
        )
    )
    step_rate = 1.0 / synthetic
    derived = {
        "step_s_synthetic": synthetic,
        "step_s_pipeline": fed,
        "steps_per_s_synthetic": step_rate,
        "steps_per_s_pipeline": 1.0 / fed,
        "examples_per_s": batch / fed,
        "train_case": runner.case.name,
    }
    m = measurement(
        f"pipeline/{model}/e2e",
        AREA,
        {**cfg, "stage": "e2e", "train_case": runner.case.name},
        [fed],
        derived=derived,
    )
    m["ratios"]["slowdown_vs_device_batches"] = fed / synthetic
    for k, v in host.items():
        m["ratios"][f"headroom_{k}"] = v / step_rate
    rec.add(m)
