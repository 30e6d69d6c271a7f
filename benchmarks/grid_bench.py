"""Merge-grid benchmarks (JAX): K merged models φ0 + λ1τ1 + λ2τ2 evaluated on N examples.

* batched:        ``evaluate.GridEvaluator`` (models vmapped in chunks under ``lax.map``;
                  ``l_lora_model`` takes the exact linear shortcut: one forward + one JVP
                  per task vector, then a contraction for all K);
* one at a time:  ``evaluate.predict`` per merged model with one jitted predict function,
                  the merge itself jitted once. For K larger than ``one_at_a_time`` models
                  the per-model median is measured on that many and multiplied by K
                  (``derived.extrapolated`` says so).
* disentanglement: the 21×21 grid of ``disentangle.disentanglement_error`` (G² joint
                  models + G single-task models on each of two datasets), through
                  GridEvaluator directly with the same λ grids (no task-vector files).

Compilation is kept out of the timings: each program is first run on one batch.
Predictions of the two paths are compared on the models that both evaluate.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import flops as FL
from benchmarks import models as MD
from benchmarks.common import Recorder, measurement
from llora_jax import evaluate as E
from llora_jax import model as M

AREA = "grid"
AREA_DIS = "disentangle"


@dataclasses.dataclass(frozen=True)
class GridSettings:
    ks: tuple[int, ...] = (1, 21, 441)
    n_examples: int = 1024
    eval_batch: int = 128
    chunk: int = 8
    one_at_a_time: int = 21  # models timed one at a time (then extrapolated)
    methods: tuple[str, ...] = ("lora", "l_lora_model")
    precision: str = "bf16"
    grid_size: int = 21  # λ values per axis (−2..2)
    dis_examples: int = 640  # per dataset, disentanglement
    dis_batch: int = 64
    dis_chunk: int = 21
    dis_methods: tuple[str, ...] = ("l_lora", "l_lora_model")
    tau_scale: float = 1.0  # task-vector size (tiny models need large ones to change predictions)


def lambda_grid(g: int) -> np.ndarray:
    return np.linspace(-2.0, 2.0, g).astype(np.float32)


def joint_lambdas(g: int) -> np.ndarray:
    v = lambda_grid(g)
    return np.stack(np.meshgrid(v, v, indexing="ij"), -1).reshape(-1, 2)


def pick_lambdas(k: int, g: int) -> np.ndarray:
    """K coefficient pairs spread over the G×G grid (all of it when K = G²)."""
    joint = joint_lambdas(g)
    if k >= len(joint):
        return joint
    return joint[np.linspace(0, len(joint) - 1, k).round().astype(int)]


def _take(arrays: dict, n: int) -> dict:
    return {k: v[:n] for k, v in arrays.items()}


def _eval_flops(b: MD.Built, rank: int, n_examples: int) -> float:
    if b.model == "clip":
        desc = FL.vit_desc(b.module.vision, MD.N_CLASSES, b.module.projection_dim)
    else:
        desc = FL.t5_desc(
            b.module.spec, b.shapes.input_len, b.shapes.target_len, candidates=len(MD.LABEL_WORDS)
        )
    return FL.forward_flops(desc, rank) * n_examples


def run(models: list[str], rec: Recorder, *, tiny: bool, settings: GridSettings) -> dict:
    """Batched vs one-at-a-time merge grids; returns {name: predictions} for the tests."""
    st = settings
    preds_out: dict[str, Any] = {}
    for model in models:
        b = MD.build(model, st.precision, "lora", tiny=tiny)
        arrays = MD.synthetic_arrays(model, st.n_examples, b.shapes, b.config, seed=3)
        for method in st.methods:
            spec = MD.lora_spec(model, method, dropout=0.0)
            phi0 = M.init_trainable(b.tm, spec, jax.random.key(0))[1]
            taus = MD.random_task_vectors(phi0, 2, seed=1, scale=st.tau_scale)
            base_cfg = {
                "model": model,
                "method": method,
                "precision": st.precision,
                "n_examples": st.n_examples,
                "eval_batch": st.eval_batch,
                "chunk": st.chunk,
                "n_task_vectors": 2,
            }
            flops_per_model = _eval_flops(b, spec.lora.rank, st.n_examples)
            batched: dict[int, np.ndarray] = {}
            ev = E.GridEvaluator(b.tm, spec, st.eval_batch, st.chunk)
            for k in st.ks:
                name = f"grid/{model}/{method}/batched/K{k}"
                cfg = {**base_cfg, "K": k, "path": "batched"}
                lam = pick_lambdas(k, st.grid_size)
                args = (ev, phi0, taus, lam, arrays, st, rec, name, cfg, flops_per_model)
                p = rec.guard(name, AREA, cfg, _time_batched, *args)
                if p is not None:
                    batched[k] = p
            args = (b, spec, phi0, taus, arrays, st, rec, base_cfg, batched, flops_per_model)
            single = rec.guard(
                f"grid/{model}/{method}/one_at_a_time", AREA, base_cfg, _time_single, *args
            )
            preds_out.update(single or {})
            for k, p in batched.items():
                preds_out[f"{model}/{method}/batched/K{k}"] = p
    return preds_out


def _time_batched(ev, phi0, taus, lam, arrays, st, rec, name, cfg, flops_per_model):
    t0 = time.perf_counter()
    ev.predict(phi0, phi0, taus, lam, _take(arrays, st.eval_batch))  # compile
    compile_s = time.perf_counter() - t0
    repeats = 3 if len(lam) <= 21 else 1
    samples, preds = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        preds = ev.predict(phi0, phi0, taus, lam, arrays)  # numpy result: synchronised
        samples.append(time.perf_counter() - t0)
    med = float(np.median(samples))
    k = len(lam)
    rec.add(
        measurement(
            name,
            AREA,
            cfg,
            samples,
            derived={
                "models_per_s": k / med,
                "seconds_per_model": med / k,
                "model_examples_per_s": k * st.n_examples / med,
                "flops_analytic": flops_per_model * k,
                "achieved_flop_per_s": flops_per_model * k / med,
                "compile_s": compile_s,
                "linear_shortcut": ev.linear,
            },
        )
    )
    return preds


def _time_single(b, spec, phi0, taus, arrays, st, rec, base_cfg, batched, flops_per_model):
    tm = b.tm
    fn = E.make_predict_fn(tm, spec)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *taus)
    merge = jax.jit(E.merged_trainable)
    n_sub = min(max(st.ks), st.one_at_a_time)
    sub = pick_lambdas(n_sub, st.grid_size)  # the same rows as batched K = n_sub
    t0 = time.perf_counter()
    E.predict(
        tm,
        spec,
        merge(phi0, stacked, jnp.asarray(sub[0])),
        phi0,
        _take(arrays, st.eval_batch),
        st.eval_batch,
        predict_fn=fn,
    )  # compile
    compile_s = time.perf_counter() - t0
    samples, preds = [], []
    for lam in sub:
        t0 = time.perf_counter()
        trainable = merge(phi0, stacked, jnp.asarray(lam))
        preds.append(E.predict(tm, spec, trainable, phi0, arrays, st.eval_batch, predict_fn=fn))
        samples.append(time.perf_counter() - t0)
    per_model = float(np.median(samples))
    preds = np.stack(preds)
    for k in st.ks:
        ref = batched.get(k)
        lam_k = pick_lambdas(k, st.grid_size)
        # Models of this K that were also evaluated one at a time (same λ rows).
        common = [i for i, lk in enumerate(lam_k) if any(np.array_equal(lk, s) for s in sub)]
        agree = None
        if ref is not None and common:
            mine = np.stack(
                [
                    preds[next(j for j, s in enumerate(sub) if np.array_equal(s, lam_k[i]))]
                    for i in common
                ]
            )
            agree = float(np.mean(mine == ref[common]))
        cfg = {**base_cfg, "K": k, "path": "one_at_a_time", "timed_models": n_sub}
        rec.add(
            measurement(
                f"grid/{b.model}/{spec.method}/one_at_a_time/K{k}",
                AREA,
                cfg,
                samples,
                derived={
                    "models_per_s": 1.0 / per_model,
                    "seconds_per_model": per_model,
                    "total_s_estimate": per_model * k,
                    "extrapolated": k > n_sub,
                    "timed_models": n_sub,
                    "compile_s": compile_s,
                    "achieved_flop_per_s": flops_per_model / per_model,
                    "agreement_with_batched": agree,
                    "compared_models": len(common),
                    # How much the merged models differ (a grid of identical models proves little).
                    "distinct_prediction_rows": int(len(np.unique(preds, axis=0))),
                    "distinct_predictions": int(len(np.unique(preds))),
                },
            )
        )
    return {
        f"{b.model}/{spec.method}/one_at_a_time": preds,
        f"{b.model}/{spec.method}/lambdas": sub,
    }


# ----------------------------------------------------------------------------- disentanglement


def run_disentangle(
    rec: Recorder, *, tiny: bool, settings: GridSettings, model: str = "t5"
) -> dict:
    """Wall time of the G×G disentanglement grid on two datasets of ``dis_examples`` each."""
    st = settings
    out = {}
    b = MD.build(model, st.precision, "lora", tiny=tiny)
    data = [
        MD.synthetic_arrays(model, st.dis_examples, b.shapes, b.config, seed=s) for s in (11, 12)
    ]
    G = st.grid_size
    for method in st.dis_methods:
        spec = MD.lora_spec(model, method, dropout=0.0)
        phi0 = M.init_trainable(b.tm, spec, jax.random.key(0))[1]
        taus = MD.random_task_vectors(phi0, 2, seed=2, scale=st.tau_scale)
        name = f"disentangle/{model}/{method}/G{G}"
        cfg = {
            "model": model,
            "method": method,
            "precision": st.precision,
            "G": G,
            "n_examples_per_dataset": st.dis_examples,
            "batch": st.dis_batch,
            "chunk": st.dis_chunk,
        }

        xi = rec.guard(
            name, AREA_DIS, cfg, _time_disentangle, b, spec, phi0, taus, data, st, rec, name, cfg
        )
        if xi is not None:
            out[name] = xi
    return out


def _time_disentangle(b, spec, phi0, taus, data, st, rec, name, cfg) -> np.ndarray:
    g = lambda_grid(st.grid_size)
    G = len(g)
    joint = joint_lambdas(G)
    zeros = np.zeros_like(g)
    singles = (np.stack([g, zeros], 1), np.stack([zeros, g], 1))
    ev = E.GridEvaluator(b.tm, spec, st.dis_batch, st.dis_chunk)
    t0 = time.perf_counter()
    for lam in (joint, singles[0]):  # compile both program shapes
        ev.predict(phi0, phi0, taus, lam, _take(data[0], st.dis_batch))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    xi = np.zeros((G, G))
    for axis, arr in enumerate(data):  # as disentangle.disentanglement_error does
        pj = ev.predict(phi0, phi0, taus, joint, arr).reshape(G, G, -1)
        ps = ev.predict(phi0, phi0, taus, singles[axis], arr)
        ref = ps[:, None, :] if axis == 0 else ps[None, :, :]
        xi += np.mean(pj != ref, axis=-1)
    wall = time.perf_counter() - t0
    n_models = 2 * (G * G + G)
    derived = {
        "wall_s": wall,
        "compile_s": compile_s,
        "models_evaluated": n_models,
        "models_per_s": n_models / wall,
        "xi_mean": float(xi.mean()),
        "xi_shape": list(xi.shape),
    }
    rec.add(measurement(name, AREA_DIS, cfg, [wall], derived=derived))
    return xi
