"""The generic study runner: fine-tune every (method, seed, task), fuse every subset, measure.

A study file (``experiments/<study>/study.py``) defines ``get_study(arg)``
returning a ``StudySpec`` (``study.spec``): the fine-tuning config file and overrides,
the tasks (named explicitly), methods, seeds, learning rates (the same sweep for every
method; the best per run on validation), fusion methods and grids, pairs for
disentanglement. The runner skips
finished fine-tuning runs (re-running resumes), caches finished fusion
results, and writes ``results.json`` + ``report.md`` + figures.

Fine-tuning runs of one method train ``group_size`` at a time (train_group: one
vmapped step over the runs, R batches per step): a small run alone leaves an
accelerator idle between kernel launches. ``group_size`` 1 trains one run at a time.
Fine-tuning runs in a thread, method after method, while the methods already trained are
analysed: the device interleaves both, and compiles and host work overlap device work.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np
import optax

from llora_jax import experiment, task_vectors
from llora_jax import tree as tree_lib
from llora_jax.data.baselines import majority_baseline
from llora_jax.fusion import programs, weight_space
from llora_jax.report import write_report
from llora_jax.study import frozen_tuning, multitask, spec
from llora_jax.study.analysis import (
    ResultCache,
    record_disentanglement,
    record_fusion,
    record_interference,
)
from llora_jax.study.finetune import BackgroundFinetuning, experiments, load_config, load_module
from llora_jax.study.finetune import log as _log
from llora_jax.study.frozen_tuning import record_frozen_tuning
from llora_jax.study.multitask import record_multitask
from llora_jax.types import AdapterSpec


def environment() -> dict:
    dev = jax.devices()[0]
    return {
        "device": f"{jax.device_count()} x {getattr(dev, 'device_kind', dev.platform)}",
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "numpy": np.__version__,
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(),
    }


def _command() -> str:
    """The command line, without this machine's paths (results are committed and shared)."""
    args = list(sys.argv)
    if args and args[0].endswith(("main.py", "__main__.py")):
        args[0] = "python -m llora_jax.cli"
    cwd = os.getcwd() + os.sep
    return " ".join(a.replace(cwd, "") for a in args)


def _compile_cache(path: Path) -> None:
    """Persist compiled programs: a study compiles the same step for many (task, seed) runs."""
    if jax.config.jax_compilation_cache_dir:
        return
    try:
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except Exception as e:  # an old jax without the cache: only slower
        _log(f"compilation cache unavailable ({e})")


def run_study_file(
    path: str, arg: str = "", out: str | None = None, sets: list[str] | None = None
) -> Path:
    """Run the study of ``path``'s ``get_study(arg)`` with ``--set`` items applied."""
    s = load_module(path, "llora_study").get_study(arg or None)
    spec.set_fields(s, list(sets or []))
    return run_study(s, Path(out or s.out or f"runs/{s.name}"))


def run_study(s: spec.StudySpec, out: Path) -> Path:
    """Run a whole study; returns the path of results.json."""
    spec.check(s)  # before anything loads
    if s.multitask:
        multitask.check(dict(s.multitask))
    if s.frozen_tuning:
        frozen_tuning.check(dict(s.frozen_tuning))
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    _compile_cache(out / ".jax_cache")
    tasks = list(s.tasks)
    _log(
        f"{s.name}: tasks {tasks}, methods {list(s.methods)}, seeds {list(s.seeds)} -> {_shown(out)}"
    )
    cache = experiment.BackboneCache()
    exps = experiments(s, tasks, cache)  # fails early on missing data
    own_a0 = [t for t, e in exps.items() if e.spec.lora.a0 == "per_task"]
    if own_a0 and s.merge_space != weight_space.SPACE:
        raise spec.StudySpecError(
            f"study {s.name!r}: tasks {own_a0} get a per-task A0 (lora.a0='per_task'), whose "
            "adapters live in different bases; merge them as dense ΔW: --set merge_space=delta_w"
        )

    results: dict = {
        "study": s.name,
        "backbone": load_config(s.config, s.config_arg).backbone,
        **environment(),
        "tasks": tasks,
        "methods": list(s.methods),
        "merge_space": s.merge_space,
        "seeds": [int(x) for x in s.seeds],
        "primary_metric": {t: e.primary_metric for t, e in exps.items()},
        # Each task's majority-class predictor on the rows it is scored on (test split).
        "baseline": {t: task_baseline(e) for t, e in exps.items()},
        "single": {},
        "fusion": {},
        "cosine": {},
        "isolation_overlap": {},
        "disentanglement": {},
        "multitask": {},
        "runs": {},
        # method -> task -> the rate every seed used (chosen on the sweep seed's validation)
        "learning_rate": {},
        # Wall seconds of this invocation per block (a resumed study reports ~0 for work it
        # found finished): fine-tuning per method, analysis per (method, seed).
        "timings_s": {},
    }
    cache_path = out / "fusion_cache.json"
    done = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    # Fusion and disentanglement (the expensive part) run for analysis_seeds (default: all);
    # results already in the cache are reported for every seed.
    analysis = [int(x) for x in s.analysis_seeds] or [int(x) for x in s.seeds]
    # One method at a time, fine-tuning then its first seed's analysis; then the single-task
    # scores and cosines of every other seed (cheap); then the other seeds' analyses, seed
    # by seed. An interrupted study has whole blocks finished (results are written after
    # every block), every method measured at least once, and every seed's single scores.
    seeds = [int(x) for x in s.seeds]
    rest = [(m, sd) for sd in seeds[1:] for m in s.methods]
    order = [(m, seeds[0], True) for m in s.methods] + [(m, sd, False) for m, sd in rest]
    order += [(m, sd, True) for m, sd in rest if sd in analysis]
    chosen: dict = {}
    # Fine-tuning runs ahead in a thread (the next methods train while this one is analysed).
    tuner = BackgroundFinetuning(s, out, tasks, cache, exps, list(s.methods))
    try:
        for method, seed, analyse in order:
            if not any(k[0] == method for k in chosen):
                runs, lrs, secs = tuner.result(method)
                chosen.update(runs)
                for (m, task), lr in lrs.items():
                    if m == method:
                        results["learning_rate"].setdefault(m, {})[task] = lr
                # Wall seconds of the method's fine-tuning thread (overlapping other analyses).
                results["timings_s"][f"finetune/{method}"] = secs
            t = time.perf_counter()
            members, fps = _members(out, tasks, exps, results, method, seed, chosen)
            if s.merge_space == weight_space.SPACE:
                # Merged and measured as dense ΔW per layer (a per-task A0 needs it); the
                # cached results are tied to the space as well as to the vectors.
                members = {t: weight_space.delta_w_member(m) for t, m in members.items()}
                fps = {t: f"{fp}|{weight_space.SPACE}" for t, fp in fps.items()}
            record_interference(s, results, method, seed, members, tasks)
            compute = analyse and seed in analysis
            cached = ResultCache(done, cache_path, fps)
            record_fusion(s, results, method, seed, members, tasks, cached, compute)
            record_disentanglement(s, results, method, seed, members, cached, compute)
            if compute:
                record_multitask(s, results, method, seed, exps, out)
                record_frozen_tuning(s, results, method, seed, exps, members, out)
            if compute:
                results["timings_s"][f"analysis/{method}/seed{seed}"] = time.perf_counter() - t
                _log(f"{method} seed {seed}: analysis done in {time.perf_counter() - t:.0f} s")
            # After every block (the report, with its figures, at the end): an interrupted
            # study keeps it.
            _write_results(results, out, with_report=False)
    finally:
        tuner.close()
    path, rep = _write_results(results, out)
    _log(f"results: {_shown(path)}")
    _log(f"report:  {_shown(rep)}")
    return path


def task_baseline(exp) -> dict:
    """The majority-class baseline of an experiment's test rows (its task's metrics)."""
    regression = bool(getattr(exp.task_spec, "is_regression", False))
    train = exp.arrays.get("train")
    if train is None:  # a streamed training split: its labels, read without decoding images
        train = {"label": exp.train_batches.split.labels}
    field = "score" if regression and "score" in train else "label"
    return majority_baseline(exp.task_spec, train[field], exp.arrays["test"][field])


def _members(out, tasks, exps, results, method, seed, chosen) -> tuple[dict, dict]:
    """The (method, seed) block's members {task: Member} and their task vectors' fingerprints;
    records their single-task scores and run directories in ``results``."""
    members, fps = {}, {}
    for task in tasks:
        wd = chosen[(method, seed, task)]
        exp = dataclasses.replace(exps[task])
        exp.spec = AdapterSpec(method, exp.spec.lora)
        loaded = task_vectors.load(wd / "task_vector")
        # Scores are normalised by this vector's own test score: refuse other data.
        experiment.check_scored_data(loaded.meta, exp, recorded_by=f"the task vector of {wd}")
        fps[task] = tree_lib.fingerprint(loaded.tau)
        # On the device once: every merge of the block reuses these arrays.
        members[task] = programs.make_member(exp, task_vectors.on_device(loaded))
        m = members[task].tv.meta["metrics"]
        results["single"].setdefault(method, {}).setdefault(task, {})[str(seed)] = {
            "val": {k[4:]: v for k, v in m.items() if k.startswith("val/")},
            "test": {k[5:]: v for k, v in m.items() if k.startswith("test/")},
        }
        results["runs"].setdefault(method, {}).setdefault(task, {})[str(seed)] = str(
            wd.relative_to(out)
        )
    return members, fps


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when inside it: logs are shared and
    committed, so they carry no machine paths."""
    return str(path).replace(os.getcwd() + os.sep, "")


def _write_results(results: dict, out: Path, with_report: bool = True) -> tuple[Path, Path | None]:

    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    # Compact, floats to 7 significant digits (float32's; scores are computed no finer): a
    # full study's file is 1.6 MB instead of 3.1. report.md and results_summary.json are
    # the readable forms.
    tmp.write_text(json.dumps(_significant(results), separators=(",", ":"), default=float))
    os.replace(tmp, path)
    return path, (write_report(results, out) if with_report else None)


def _significant(x: Any) -> Any:
    """``x`` with every float rounded to 7 significant digits (for results.json)."""
    if isinstance(x, float):
        return float(f"{x:.7g}")
    if isinstance(x, dict):
        return {k: _significant(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_significant(v) for v in x]
    return x
