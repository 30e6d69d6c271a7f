"""Disentanglement-grid benchmark (JAX): the G×G grid of ``disentangle.disentanglement_error``.

G² joint models + G single-task models on each of two datasets, through
``evaluate.GridEvaluator`` directly with the same λ grids (no task-vector files): the
wall time of the whole grid (target: 21×21 Flan-T5-base on 2×640 examples ≤ 60 s); then
``dis_one_at_a_time`` of its joint models one at a time (``evaluate.predict`` per merged
model), whose median is extrapolated to all 2·(G² + G) models, with their agreement with
the batched predictions. Programs are compiled (run once on one batch) before timing.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from benchmarks import grid_bench, models
from benchmarks.common import Recorder, measurement

AREA_DIS = "disentangle"


def run(
    rec: Recorder,
    *,
    tiny: bool,
    settings: grid_bench.GridSettings,
    model: str = "t5",
    cache: dict | None = None,
) -> dict:
    """Wall time of the G×G disentanglement grid on two datasets of ``dis_examples`` each,
    batched, and (a sample of its models, extrapolated) one model at a time."""
    st = settings
    b = grid_bench.build_grid_model(model, st, tiny, cache)
    data = [
        models.synthetic_arrays(model, st.dis_examples, b.shapes, b.config, seed=s)
        for s in (11, 12)
    ]
    g = grid_bench.lambda_grid(st.grid_size)
    G = len(g)
    zeros = np.zeros_like(g)
    lams = {
        "joint": grid_bench.joint_lambdas(G),
        "single1": np.stack([g, zeros], 1),
        "single2": np.stack([zeros, g], 1),
    }
    sample = grid_bench.pick_lambdas(min(st.dis_one_at_a_time, G * G), G)  # rows of the joint grid
    ctxs = {
        m: grid_bench.MethodCtx.make(b, m, st, st.dis_batch, st.dis_chunk, seed=2)
        for m in st.dis_methods
    }
    one = grid_bench.take(data[0], st.dis_batch)
    jobs = [
        functools.partial(c.batched, lams[k], one)
        for c in ctxs.values()
        for k in ("joint", "single1")
    ]
    if len(sample):
        jobs += [functools.partial(c.single, sample[0], one, st.dis_batch) for c in ctxs.values()]
    compile_wall, errors = grid_bench.warm_all(jobs, st.compile_workers)
    out = {}
    for method, ctx in ctxs.items():
        name = f"disentangle/{model}/{method}/G{G}"
        cfg = {
            "model": model,
            "method": method,
            "precision": st.precision,
            "G": G,
            "n_examples_per_dataset": st.dis_examples,
            "batch": st.dis_batch,
            "chunk": st.dis_chunk,
            "path": "batched",
        }
        res = rec.guard(
            name,
            AREA_DIS,
            cfg,
            _time_disentangle,
            ctx,
            lams,
            data,
            rec,
            name,
            cfg,
            compile_wall,
            errors,
        )
        if res is None:
            continue
        xi, joint0 = res
        out[name] = xi
        if len(sample):
            one_cfg = {**cfg, "path": "one_at_a_time", "timed_models": len(sample)}
            del one_cfg["chunk"]
            rec.guard(
                f"{name}/one_at_a_time",
                AREA_DIS,
                one_cfg,
                _time_disentangle_single,
                ctx,
                sample,
                data[0],
                joint0,
                rec,
                f"{name}/one_at_a_time",
                one_cfg,
                rec.items[-1],
            )
    return out


def _time_disentangle(ctx, lams, data, rec, name, cfg, compile_wall, errors) -> tuple:
    G = cfg["G"]
    t0 = time.perf_counter()
    xi = np.zeros((G, G))
    joint0 = None
    for axis, arr in enumerate(data):  # as disentangle.disentanglement_error does
        pj = ctx.batched(lams["joint"], arr)
        joint0 = pj if axis == 0 else joint0
        pj = pj.reshape(G, G, -1)
        ps = ctx.batched(lams["single1" if axis == 0 else "single2"], arr)
        ref = ps[:, None, :] if axis == 0 else ps[None, :, :]
        xi += np.mean(pj != ref, axis=-1)
    wall = time.perf_counter() - t0
    n_models = 2 * (G * G + G)
    derived = {
        "wall_s": wall,
        "compile_wall_s_all": compile_wall,
        "models_evaluated": n_models,
        "models_per_s": n_models / wall,
        "seconds_per_model": wall / n_models,
        "linear_shortcut": ctx.ev.linear,
        "xi_mean": float(xi.mean()),
        "xi_shape": list(xi.shape),
    }
    if errors:
        derived["warmup_errors"] = errors[:2]
    rec.add(measurement(name, AREA_DIS, cfg, [wall], derived=derived))
    return xi, joint0


def _time_disentangle_single(ctx, sample, arrays, joint0, rec, name, cfg, batched_m) -> None:
    """Models of the joint grid one at a time on the first dataset; extrapolated to the grid."""
    G = batched_m["config"]["G"]
    samples, preds = [], []
    for lam in sample:
        t0 = time.perf_counter()
        preds.append(ctx.single(lam, arrays, cfg["batch"]))  # numpy: synchronised
        samples.append(time.perf_counter() - t0)
    per_model = float(np.median(samples))
    n_models = 2 * (G * G + G)
    rows = {tuple(r): i for i, r in enumerate(grid_bench.joint_lambdas(G).tolist())}
    ref = joint0[[rows[tuple(r)] for r in sample.tolist()]]
    derived = {
        "seconds_per_model": per_model,
        "models_per_s": 1.0 / per_model,
        "total_s_estimate": per_model * n_models,
        "extrapolated": True,
        "timed_models": len(sample),
        "models_in_grid": n_models,
        "agreement_with_batched": float(np.mean(np.stack(preds) == ref)),
        "distinct_prediction_rows": int(len(np.unique(np.stack(preds), axis=0))),
    }
    m = measurement(name, AREA_DIS, cfg, samples, derived=derived)
    batched_m["ratios"]["speedup_vs_one_at_a_time"] = (
        derived["total_s_estimate"] / (batched_m["median"])
    )
    rec.add(m)
