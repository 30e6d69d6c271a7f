"""Step d) of the isolation pipeline in a study block: short multi-task tuning of the fused
adapter with every core region frozen, against the control the claim names (the same
tuning without isolation, tasks in sequence).

For the first ``per_size`` subsets of each size of the block's plan, the isolation
pipeline's merge at the hyper-parameters validation chose for that subset (the block's
``isolation_pipeline`` fusion result) is rebuilt; both runs start from φ0 + τ_merged and
train ``steps_per_task`` × n steps at the block's rate × ``lr_factor``, with the same
optimizer and no warm-up:

* ``frozen``: mixture batches (``per_task``: each task its single run's first rows),
  every element of any task's core held fixed bit for bit (``fusion.frozen_cores``);
* ``sequential``: nothing frozen, tasks one after another (``sequential_batches``).

Adapter space only (a ΔW block has no adapter to tune). Spec field ``frozen_tuning``:
{"steps_per_task": 100, "lr_factor": 0.1, "per_size": 2, "sizes": None}; {} = off.
"""

from __future__ import annotations

import json
from pathlib import Path

from llora_jax import tree as tree_lib
from llora_jax.data.mixture import mixture_batches
from llora_jax.fusion.frozen_cores import frozen_fraction, frozen_union
from llora_jax.fusion.isolation_pipeline import NAME, isolation_pipeline
from llora_jax.fusion.search import subset_key
from llora_jax.study.finetune import log
from llora_jax.study.multitask import fit_mixture, score_record
from llora_jax.study.plan import first_per_size, study_subsets
from llora_jax.study.spec import StudySpec, StudySpecError
from llora_jax.tasks.multitask import sequential_batches

VARIANTS = ("frozen", "sequential")
DEFAULTS = {"steps_per_task": 100, "lr_factor": 0.1, "per_size": 2, "sizes": None}


def check(cfg: dict) -> dict:
    """The ``frozen_tuning`` settings with defaults; unknown keys refused."""
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise StudySpecError(
            f"study field 'frozen_tuning': unknown keys {unknown}; valid: {sorted(DEFAULTS)}"
        )
    return DEFAULTS | dict(cfg)


def record_frozen_tuning(s: StudySpec, results, method, seed, exps, members, out: Path):
    if not s.frozen_tuning or s.merge_space != "adapter":
        return
    cfg = check(dict(s.frozen_tuning))
    chosen = ((results.get("fusion") or {}).get(method) or {}).get(NAME) or {}
    plan = study_subsets(s, list(s.tasks), seed)
    sizes = cfg["sizes"] or sorted({len(x) for x in plan})
    steps = int(cfg["steps_per_task"])
    for sub in first_per_size([x for x in plan if len(x) in sizes], int(cfg["per_size"])):
        entry = (chosen.get(subset_key(sub)) or {}).get(str(seed))
        if entry is None:
            log(f"frozen-core tuning {'+'.join(sub)}: no {NAME} result for it, skipped")
            continue
        hp = entry["hparams"]
        taus = [members[t].tv.tau for t in sub]
        merged, info = isolation_pipeline(taus, hp["p"], hp["threshold"], hp["lam"])
        phi0 = members[sub[0]].tv.phi0
        start = tree_lib.add(phi0, merged)
        frozen = frozen_union(info["masks"])
        rates = results.get("learning_rate", {}).get(method, {})
        lr = float(cfg["lr_factor"]) * max(rates.get(t, float(s.learning_rates[0])) for t in sub)
        for variant in VARIANTS:
            wd = out / "frozen_tuning" / f"seed{seed}" / subset_key(sub) / f"{method}-{variant}"
            done = wd / "metrics.json"
            if done.is_file():
                metrics = json.loads(done.read_text())
            else:
                log(f"frozen-core tuning ({variant}) {method} seed {seed} on {'+'.join(sub)}")
                if variant == "frozen":

                    def batches(arrays, bs, first):
                        return mixture_batches(arrays, bs, steps, seed=seed, start_step=first)
                else:

                    def batches(arrays, bs, first):
                        return sequential_batches(arrays, bs, steps, seed=seed, start_step=first)

                meta = {"task": f"{variant}:{'+'.join(sub)}", "tasks": list(sub)}
                metrics = fit_mixture(
                    s,
                    exps,
                    sub,
                    method,
                    seed,
                    lr,
                    wd,
                    steps * len(sub),
                    batches,
                    meta,
                    start=start,
                    frozen=frozen if variant == "frozen" else None,
                    warmup_fraction=0.0,
                )
            rec = score_record(results, method, seed, sub, exps, metrics)
            rec.update(
                hparams=hp,
                clusters=[int(c) for c in info["clusters"]],
                frozen_fraction=frozen_fraction(frozen),
                learning_rate=lr,
            )
            table = results.setdefault("frozen_tuning", {}).setdefault(method, {})
            table.setdefault(variant, {}).setdefault(subset_key(sub), {})[str(seed)] = rec
