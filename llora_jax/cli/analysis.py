"""``fuse``, ``disentangle`` and ``report`` commands over fine-tuning run directories.

A run directory is what ``finetune`` writes: ``config.json`` (the exact config)
and ``task_vector/``. The config rebuilds each task's readout and data, so the
merged models are evaluated exactly as the single-task ones were; a task vector
scored on other validation or test rows than the data now loaded is refused
(``experiment.check_scored_data``), and so is a run or task given twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ml_collections import ConfigDict

from llora_jax import experiment, task_vectors
from llora_jax.errors import UsageError
from llora_jax.fusion import search
from llora_jax.interference.disentangle import DEFAULT_GRID, disentanglement_error
from llora_jax.report import summary as report
from llora_jax.study.runner import environment


def load_member(run_dir: str | os.PathLike, cache: experiment.BackboneCache) -> search.Member:

    run = Path(run_dir)
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise UsageError(
            f"{cfg_path} not found: pass run directories written by `finetune` "
            "(each holds config.json and task_vector/)"
        )
    tv = task_vectors.load(run / "task_vector")
    exp = experiment.build(ConfigDict(json.loads(cfg_path.read_text())), cache)
    experiment.check_scored_data(tv.meta, exp, recorded_by=f"the task vector of {run}")
    return search.Member(exp=exp, tv=tv)


def check_distinct(runs: Sequence[str]) -> None:
    """Refuse a run directory given twice (it would count one task twice)."""
    resolved = [Path(r).resolve() for r in runs]
    twice = sorted({str(r) for r in resolved if resolved.count(r) > 1})
    if twice:
        raise UsageError(f"--runs names {', '.join(twice)} more than once; give each run once")


def check_distinct_tasks(members: Sequence[search.Member], runs: Sequence[str]) -> None:
    """Refuse two runs of one task: fusion merges one task vector per task."""
    tasks = [m.task for m in members]
    twice = sorted({t for t in tasks if tasks.count(t) > 1})
    if twice:
        which = [f"{r} ({t})" for r, t in zip(runs, tasks) if t in twice]
        raise UsageError(
            f"--runs holds several runs of task(s) {twice}: {', '.join(which)}; fusion merges "
            "one task vector per task, so give one run per task"
        )


def _header(members: Sequence[search.Member]) -> dict:

    m0 = members[0].tv.meta
    return {
        "study": "fuse",
        "backbone": m0["base_model"],
        **environment(),
        "tasks": [m.task for m in members],
        "methods": [m0["mode"]],
        "seeds": [int(m0["seed"])],
        "primary_metric": {m.task: m.exp.primary_metric for m in members},
        "single": {
            m0["mode"]: {
                m.task: {
                    str(m0["seed"]): {
                        "val": {
                            k[4:]: v
                            for k, v in m.tv.meta["metrics"].items()
                            if k.startswith("val/")
                        },
                        "test": {
                            k[5:]: v
                            for k, v in m.tv.meta["metrics"].items()
                            if k.startswith("test/")
                        },
                    }
                }
                for m in members
            }
        },
    }


def fuse_runs(runs: Sequence[str], methods: Sequence[str], out: Path) -> Path:
    check_distinct(runs)
    cache = experiment.BackboneCache()
    members = [load_member(r, cache) for r in runs]
    check_distinct_tasks(members, runs)
    task_vectors.check_compatible([m.tv for m in members])
    res = _header(members)
    mode, seed = members[0].tv.meta["mode"], str(members[0].tv.meta["seed"])
    by_task = {m.task: m for m in members}
    res["fusion"] = {mode: {}}
    for name in methods:
        found = search.fuse_subsets(
            list(by_task.values()), name, search.subsets(list(by_task)), progress=True
        )
        for key, r in found.items():
            res["fusion"][mode].setdefault(name, {})[key] = {seed: r}
            print(
                f"{name:16s} {key:30s} avg test {r['avg_test']:.4f} "
                f"normalized {r['avg_normalized']:.4f}  {r['hparams']}"
            )
    return _write(res, out)


def disentangle_runs(runs: Sequence[str], out: Path, n_examples: int = 640) -> Path:

    if len(runs) != 2:
        raise UsageError(f"disentangle takes exactly 2 run directories, got {len(runs)}")
    check_distinct(runs)
    cache = experiment.BackboneCache()
    m1, m2 = (load_member(r, cache) for r in runs)
    xi = disentanglement_error(m1, m2, DEFAULT_GRID, n_examples=n_examples)
    res = _header([m1, m2])
    mode, seed = m1.tv.meta["mode"], str(m1.tv.meta["seed"])
    res["disentanglement"] = {
        mode: {
            f"{m1.task}+{m2.task}": {
                seed: {"grid": list(DEFAULT_GRID), "xi": xi.tolist(), "mean_xi": float(xi.mean())}
            }
        }
    }
    print(f"mean disentanglement error {m1.task}+{m2.task} ({mode}): {xi.mean():.4f}")
    return _write(res, out)


def _write(res: dict, out: Path) -> Path:

    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(res, indent=1, default=float))
    rep = report.write_report(res, out)
    print(f"results: {path}\nreport:  {rep}")
    return path


def run(
    cmd: str, *, runs: Sequence[str], fusion: Sequence[str], out: str | None, results: str | None
) -> None:
    if cmd == "report":
        if not results:
            raise UsageError("report needs --results=path/to/results.json")
        target = Path(out) if out else Path(results).parent
        print(f"report: {report.write_report(report.load_results(results), target)}")
        return
    if not runs:
        raise UsageError(f"{cmd} needs --runs=dir1,dir2,... (run directories of `finetune`)")
    target = Path(out or "runs/analysis")
    if cmd == "fuse":
        fuse_runs(runs, list(fusion) or ["task_arithmetic", "ties"], target)
    elif cmd == "disentangle":
        disentangle_runs(runs, target)
    else:
        raise ValueError(f"unknown analysis command {cmd!r}")
