"""Merge-grid benchmarks (JAX): K merged models φ0 + λ1τ1 + λ2τ2 evaluated on N examples.

* batched:        ``evaluate.GridEvaluator`` (models vmapped in chunks under ``lax.map``;
                  ``l_lora_model`` takes the exact linear shortcut: one forward + one JVP
                  per task vector, then a contraction for all K);
* one at a time:  ``evaluate.predict`` per merged model with one jitted predict function,
                  the merge itself jitted once. For K larger than ``one_at_a_time`` models
                  the per-model median is measured on that many and multiplied by K
                  (``derived.extrapolated`` says so);
* disentanglement: ``dis_bench.py`` (same evaluators, the 21×21 grid).

Order: per model, every method's cheap measurements first, the batched K ≥ 100 grids of
methods without the linear shortcut last (they are the long ones: ~K× a model's forward).
Under a time budget such a grid is skipped when its estimate (seconds per model of the
K = 21 grid × K) would end past the deadline.

Compilation stays out of the timings: every program is first run on one batch, all of a
model's programs concurrently in ``compile_workers`` threads (XLA compiles outside the
GIL). Predictions of the two paths are compared on the models that both evaluate.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import flops, models
from benchmarks.common import Recorder, measurement
from llora_jax import forward
from llora_jax.evaluation import grid as grid_eval
from llora_jax.types import AdapterSpec

AREA = "grid"


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
    dis_one_at_a_time: int = 21  # disentanglement models timed one at a time (extrapolated)
    tau_scale: float = 1.0  # task-vector size (tiny models need large ones to change predictions)
    compile_workers: int = 4
    big_k: int = 100  # nonlinear batched grids of at least this many models run last


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


def take(arrays: dict, n: int) -> dict:
    return {k: v[:n] for k, v in arrays.items()}


def _eval_flops(b: models.Built, rank: int, n_examples: int) -> float:
    if b.model == "clip":
        desc = flops.vit_desc(b.module.vision, models.N_CLASSES, b.module.projection_dim)
    else:
        desc = flops.t5_desc(
            b.module.spec,
            b.shapes.input_len,
            b.shapes.target_len,
            candidates=len(models.LABEL_WORDS),
        )
    return flops.forward_flops(desc, rank) * n_examples


def warm_all(jobs: list[Callable[[], Any]], workers: int) -> tuple[float, list[str]]:
    """Run every job once (compiling its program), concurrently; (wall s, error texts)."""

    def safe(job):
        try:
            job()
            return None
        except Exception:  # noqa: BLE001  (the timed call will fail and be recorded)
            return traceback.format_exc(limit=4)

    t0 = time.perf_counter()
    if workers <= 1:
        errors = [safe(j) for j in jobs]
    else:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            errors = list(pool.map(safe, jobs))
    return time.perf_counter() - t0, [e for e in errors if e]


@dataclasses.dataclass
class MethodCtx:
    """One (model, method): task vectors, evaluators and the jitted one-at-a-time path."""

    b: models.Built
    spec: AdapterSpec
    phi0: Any
    taus: list
    ev: grid_eval.GridEvaluator
    predict_fn: Callable
    merge: Callable
    stacked: Any

    @classmethod
    def make(
        cls, b: models.Built, method: str, st: GridSettings, batch: int, chunk: int, seed: int
    ):
        spec = models.lora_spec(b.model, method, dropout=0.0)
        phi0 = forward.init_trainable(b.tm, spec, jax.random.key(0))[1]
        taus = models.random_task_vectors(phi0, 2, seed=seed, scale=st.tau_scale)
        return cls(
            b,
            spec,
            phi0,
            taus,
            grid_eval.GridEvaluator(b.tm, spec, batch, chunk),
            grid_eval.make_predict_fn(b.tm, spec),
            jax.jit(grid_eval.merged_trainable),
            jax.tree.map(lambda *xs: jnp.stack(xs), *taus),
        )

    def batched(self, lam: np.ndarray, arrays: dict) -> np.ndarray:
        return self.ev.predict(self.phi0, self.phi0, self.taus, lam, arrays)

    def single(self, lam: np.ndarray, arrays: dict, batch: int) -> np.ndarray:
        trainable = self.merge(self.phi0, self.stacked, jnp.asarray(lam))
        return grid_eval.predict(
            self.b.tm, self.spec, trainable, self.phi0, arrays, batch, predict_fn=self.predict_fn
        )


def build_grid_model(model: str, st: GridSettings, tiny: bool, cache: dict | None) -> models.Built:
    cache = {} if cache is None else cache
    key = ("grid", model, st.precision, tiny)
    if key not in cache:
        cache[key] = models.build(model, st.precision, "lora", tiny=tiny)
    return cache[key]


def run(
    model_names: list[str],
    rec: Recorder,
    *,
    tiny: bool,
    settings: GridSettings,
    cache: dict | None = None,
) -> dict:
    """Batched vs one-at-a-time merge grids; returns {name: predictions}."""
    st = settings
    preds_out: dict[str, Any] = {}
    for model in model_names:  # (a parameter named ``models`` hid the module)
        b = build_grid_model(model, st, tiny, cache)
        arrays = models.synthetic_arrays(model, st.n_examples, b.shapes, b.config, seed=3)
        one = take(arrays, st.eval_batch)
        n_sub = min(max(st.ks), st.one_at_a_time)
        sub = pick_lambdas(n_sub, st.grid_size)  # the same rows as batched K = n_sub
        ctxs = {m: MethodCtx.make(b, m, st, st.eval_batch, st.chunk, seed=1) for m in st.methods}
        jobs = [
            functools.partial(c.batched, pick_lambdas(k, st.grid_size), one)
            for c in ctxs.values()
            for k in st.ks
        ]
        jobs += [functools.partial(c.single, sub[0], one, st.eval_batch) for c in ctxs.values()]
        compile_wall, errors = warm_all(jobs, st.compile_workers)
        deferred = []  # (method, K): long batched grids, run last
        singles: dict[str, tuple] = {}  # method -> (measurements, predictions, sub rows)
        batched_all: dict[str, dict[int, np.ndarray]] = {}
        per_model_k21: dict[str, float] = {}
        for method, ctx in ctxs.items():
            base_cfg = {
                "model": model,
                "method": method,
                "precision": st.precision,
                "n_examples": st.n_examples,
                "eval_batch": st.eval_batch,
                "chunk": st.chunk,
                "n_task_vectors": 2,
            }
            extra = {
                "flops_per_model": _eval_flops(b, ctx.spec.lora.rank, st.n_examples),
                "compile_wall_s_all": compile_wall,
                "warmup_errors": errors[:2],
            }
            batched = batched_all.setdefault(method, {})
            for k in st.ks:
                if k >= st.big_k and not ctx.ev.linear:
                    deferred.append((method, k, base_cfg, extra))
                    continue
                p = _guarded_batched(ctx, model, method, k, base_cfg, extra, arrays, st, rec)
                if p is not None:
                    batched[k] = p
                    preds_out[f"{model}/{method}/batched/K{k}"] = p
                    m = rec.items[-1]
                    if m["name"].endswith(f"/K{k}") and m.get("median") is not None:
                        per_model_k21[method] = m["derived"]["seconds_per_model"]
            single = rec.guard(
                f"grid/{model}/{method}/one_at_a_time",
                AREA,
                base_cfg,
                _time_single,
                ctx,
                sub,
                arrays,
                st,
                rec,
                base_cfg,
                batched,
                extra,
            )
            if single is not None:
                singles[method] = single
                preds_out[f"{model}/{method}/one_at_a_time"] = single[1]
        for method, k, base_cfg, extra in deferred:
            ctx = ctxs[method]
            est = per_model_k21.get(method)
            if est is not None and not rec.fits(1.1 * est * k):
                rec.add(
                    measurement(
                        f"grid/{model}/{method}/batched/K{k}",
                        AREA,
                        {**base_cfg, "K": k, "path": "batched"},
                        error=f"skipped: time budget (estimated {1.1 * est * k:.0f} s, "
                        f"{rec.seconds_left():.0f} s left)",
                    )
                )
                continue
            p = _guarded_batched(ctx, model, method, k, base_cfg, extra, arrays, st, rec)
            if p is None:
                continue
            batched_all[method][k] = p
            preds_out[f"{model}/{method}/batched/K{k}"] = p
            if method in singles:  # the one-at-a-time models of this K, now comparable
                _agreement(singles[method], k, p, st)
                rec.flush()
    return preds_out


def _guarded_batched(ctx, model, method, k, base_cfg, extra, arrays, st, rec):
    name = f"grid/{model}/{method}/batched/K{k}"
    cfg = {**base_cfg, "K": k, "path": "batched"}
    lam = pick_lambdas(k, st.grid_size)
    return rec.guard(name, AREA, cfg, _time_batched, ctx, lam, arrays, st, rec, name, cfg, extra)


def _agreement(single: tuple, k: int, ref: np.ndarray, st: GridSettings) -> None:
    """Fill agreement_with_batched of the one-at-a-time measurement of K from batched ``ref``."""
    measurements, preds, sub = single
    rows = {tuple(s): j for j, s in enumerate(sub.tolist())}
    lam_k = pick_lambdas(k, st.grid_size).tolist()
    common = [i for i, lk in enumerate(lam_k) if tuple(lk) in rows]
    m = measurements.get(k)
    if m is None or not common:
        return
    mine = preds[[rows[tuple(lam_k[i])] for i in common]]
    m["derived"]["agreement_with_batched"] = float(np.mean(mine == ref[common]))
    m["derived"]["compared_models"] = len(common)


def _time_batched(ctx, lam, arrays, st, rec, name, cfg, extra) -> np.ndarray:
    repeats = 3 if len(lam) <= 21 else 1
    samples, preds = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        preds = ctx.batched(lam, arrays)  # a numpy result: synchronised
        samples.append(time.perf_counter() - t0)
    med = float(np.median(samples))
    k = len(lam)
    derived = {
        "models_per_s": k / med,
        "seconds_per_model": med / k,
        "model_examples_per_s": k * st.n_examples / med,
        "flops_analytic": extra["flops_per_model"] * k,
        "achieved_flop_per_s": extra["flops_per_model"] * k / med,
        "compile_wall_s_all": extra["compile_wall_s_all"],
        "linear_shortcut": ctx.ev.linear,
    }
    if extra["warmup_errors"]:  # a failed warm-up compiles (and is timed) here instead
        derived["warmup_errors"] = extra["warmup_errors"]
    rec.add(measurement(name, AREA, cfg, samples, derived=derived))
    return preds


def _time_single(ctx, sub, arrays, st, rec, base_cfg, batched, extra) -> tuple:
    samples, preds = [], []
    for lam in sub:
        t0 = time.perf_counter()
        preds.append(ctx.single(lam, arrays, st.eval_batch))  # numpy: synchronised
        samples.append(time.perf_counter() - t0)
    per_model = float(np.median(samples))
    preds = np.stack(preds)
    out: dict[int, dict] = {}
    for k in st.ks:
        derived = {
            "models_per_s": 1.0 / per_model,
            "seconds_per_model": per_model,
            "total_s_estimate": per_model * k,
            "extrapolated": k > len(sub),
            "timed_models": len(sub),
            "compile_wall_s_all": extra["compile_wall_s_all"],
            "achieved_flop_per_s": extra["flops_per_model"] / per_model,
            "agreement_with_batched": None,  # filled from the batched grid of this K
            "compared_models": 0,
            # How much the merged models differ (a grid of identical models proves little).
            "distinct_prediction_rows": int(len(np.unique(preds, axis=0))),
            "distinct_predictions": int(len(np.unique(preds))),
        }
        cfg = {**base_cfg, "K": k, "path": "one_at_a_time", "timed_models": len(sub)}
        out[k] = measurement(
            f"grid/{ctx.b.model}/{ctx.spec.method}/one_at_a_time/K{k}",
            AREA,
            cfg,
            samples,
            derived=derived,
        )
    single = (out, preds, sub)
    for k, ref in batched.items():
        _agreement(single, k, ref, st)
    for m in out.values():
        rec.add(m)
    return single
