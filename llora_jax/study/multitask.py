"""The multi-task fine-tuning baseline of a study block: one adapter for n tasks.

For the first ``per_size`` subsets of each size of the block's plan (the subsets the
fusions merge, so scores pair), one run per budget trains the block's method on
``mixture_batches`` of the subset's tasks, each example scored by its own task's frozen
head (``tasks.multitask``), through the same loop as the single runs (``train.loop.fit``)
with the same config: ``per_task`` trains n × steps steps (each task sees its single
run's rows), ``total`` trains steps steps (the single run's cost). The warm-up keeps its
fraction of the run. ``multitask`` spec keys: budgets (["per_task"]), per_size (2),
sizes (default: every size of the plan), full (also one full fine-tune), learning_rate
(default: the rate the block chose most often for the subset's tasks).
Runs are skipped when their metrics.json exists (a re-run resumes).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import numpy as np

from llora_jax import experiment
from llora_jax.data.mixture import BUDGETS, mixture_batches, mixture_steps
from llora_jax.fusion.search import subset_key
from llora_jax.study.finetune import load_config, log
from llora_jax.study.plan import first_per_size, study_subsets
from llora_jax.study.spec import StudySpec, StudySpecError
from llora_jax.tasks.multitask import multitask_model, shared_fields
from llora_jax.train import loop as train_loop
from llora_jax.types import AdapterSpec

KEYS = ("budgets", "per_size", "sizes", "full", "learning_rate")


def check(cfg: dict) -> dict:
    unknown = sorted(set(cfg) - set(KEYS))
    if unknown:
        raise StudySpecError(f"study field 'multitask': unknown keys {unknown}; valid: {KEYS}")
    budgets = list(cfg.get("budgets", ["per_task"]))
    bad = [b for b in budgets if b not in BUDGETS]
    if bad:
        raise StudySpecError(f"multitask budgets must be among {BUDGETS}, got {bad}")
    return {
        "budgets": budgets,
        "per_size": int(cfg.get("per_size", 2)),
        "sizes": cfg.get("sizes"),
        "full": bool(cfg.get("full", False)),
        "learning_rate": cfg.get("learning_rate"),
    }


def record_multitask(s: StudySpec, results: dict, method: str, seed: int, exps, out: Path):
    """Train (or find) the block's multi-task runs for (method, seed); record their scores
    in ``results["multitask"][method or "full"][budget][subset][seed]``."""
    if not s.multitask:
        return
    cfg = check(dict(s.multitask))
    tasks = list(s.tasks)
    plan = study_subsets(s, tasks, seed)
    sizes = cfg["sizes"] or sorted({len(x) for x in plan})
    subs = first_per_size([x for x in plan if len(x) in sizes], cfg["per_size"])
    methods = [method] + (["full"] if cfg["full"] else [])
    for m in methods:
        for budget in cfg["budgets"]:
            for sub in subs:
                lr = _rate(cfg, results, method, sub, s)
                wd = out / "multitask" / f"seed{seed}" / budget / subset_key(sub) / f"{m}-lr{lr:g}"
                done = wd / "metrics.json"
                if done.is_file():
                    metrics = json.loads(done.read_text())
                else:
                    log(f"multi-task {m} {budget} seed {seed} on {'+'.join(sub)} (lr {lr:g})")
                    metrics = train(s, exps, sub, m, seed, lr, budget, wd)
                entry = score_record(results, method, seed, sub, exps, metrics)
                entry.update(budget=budget, learning_rate=lr, workdir=str(wd.relative_to(out)))
                table = results.setdefault("multitask", {}).setdefault(m, {}).setdefault(budget, {})
                table.setdefault(subset_key(sub), {})[str(seed)] = entry


def _rate(cfg, results, method, sub, s) -> float:
    if cfg["learning_rate"] is not None:
        return float(cfg["learning_rate"])
    chosen = results.get("learning_rate", {}).get(method, {})
    rates = [chosen[t] for t in sub if t in chosen] or [float(s.learning_rates[0])]
    return float(collections.Counter(rates).most_common(1)[0][0])


def train(s: StudySpec, exps, sub, method, seed, lr, budget, wd: Path) -> dict:
    """One multi-task run through ``train.loop.fit``; returns its final metrics
    ({"val/<task>/<metric>": ..., "test/<task>/<metric>": ...})."""
    steps = int(load_config(s.config, s.config_arg, dict(s.overrides)).steps)
    total = mixture_steps(len(sub), steps, budget)

    def batches(arrays, batch_size: int, start: int):
        return mixture_batches(
            arrays, batch_size, steps, budget=budget, seed=seed, start_step=start
        )

    meta = {"task": f"multitask:{'+'.join(sub)}", "tasks": list(sub), "budget": budget}
    return fit_mixture(s, exps, sub, method, seed, lr, wd, total, batches, meta)


def fit_mixture(
    s: StudySpec,
    exps,
    sub,
    method,
    seed,
    lr,
    wd,
    total,
    batches,
    meta,
    *,
    start=None,
    frozen=None,
    warmup_fraction: float | None = None,
) -> dict:
    """Train one adapter on the tasks ``sub`` (stacked heads, routed by task id) for
    ``total`` steps of ``batches(arrays per task, batch_size, start_step)``; optionally from
    ``start`` with ``frozen`` elements held fixed. Other settings are the block config's
    (warm-up: its fraction of the single run, or ``warmup_fraction``)."""
    c = load_config(s.config, s.config_arg, dict(s.overrides))
    c.task, c.method, c.seed = "+".join(sub), method, int(seed)
    c.optim.learning_rate = float(lr)
    fraction = (
        int(c.optim.warmup_steps) / int(c.steps) if warmup_fraction is None else warmup_fraction
    )
    oc = dataclasses.replace(experiment.optim_config(c), warmup_steps=int(round(fraction * total)))
    lc = dataclasses.replace(experiment.loop_config(c, bool(s.progress)), total_steps=total)
    members = [exps[t] for t in sub]
    spec = AdapterSpec(method, members[0].spec.lora)
    tm = multitask_model(members[0].tm, [e.tm.head for e in members])
    fields = shared_fields([e.arrays["train"] for e in members])
    arrays = [{k: e.arrays["train"][k] for k in fields} for e in members]

    def final_eval(trainable, phi0) -> dict:
        out = {}
        for e in members:
            single = dataclasses.replace(e, spec=spec)
            for split, prefix in (("validation", "val"), ("test", "test")):
                got = experiment.evaluate_split(single, trainable, phi0, split, c.eval_batch_size)
                out.update({f"{prefix}/{e.task}/{k}": v for k, v in got.items()})
        return out

    run = train_loop.Run(
        workdir=wd,
        seed=int(seed),
        learning_rate=float(lr),
        head=tm.head,
        train_arrays=arrays[0],
        final_eval=final_eval,
        meta=meta,
        batch_fn=lambda batch_size, start_step: batches(arrays, batch_size, start_step),
        start=start,
        frozen=frozen,
    )
    return train_loop.fit(tm, spec, oc, lc, [run], group_step=False)[0]


def score_record(results, method, seed, sub, exps, metrics) -> dict:
    """Per task: test score (primary metric), ÷ its single run's, and (− majority) ÷
    (single − majority); means over the subset."""
    test, norm, above = {}, {}, {}
    for t in sub:
        primary = exps[t].primary_metric
        score = float(metrics[f"test/{t}/{primary}"])
        single = results["single"][method][t][str(seed)]["test"][primary]
        base = results.get("baseline", {}).get(t, {}).get(primary, float("nan"))
        test[t] = score
        norm[t] = score / max(single, 1e-12)
        above[t] = (score - base) / (single - base) if single - base > 1e-12 else float("nan")
    return {
        "test": test,
        "test_normalized": norm,
        "test_baseline_normalized": above,
        "avg_test": float(np.mean(list(test.values()))),
        "avg_normalized": float(np.mean(list(norm.values()))),
    }
