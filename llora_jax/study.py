"""The generic study runner: fine-tune every (method, seed, task), fuse every subset, measure.

A study file (``experiments/<study>/study.py``) defines ``get_study(arg)``
returning a ConfigDict: the fine-tuning config file and overrides, tasks
(empty = every text task of the data directory), methods, seeds, learning
rates (the same sweep for every method; the best per run on validation),
fusion methods and grids, pairs for disentanglement. The runner skips
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
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from llora_jax import experiment as X
from llora_jax import fuse as F
from llora_jax import fusion
from llora_jax import task_vectors as tv
from llora_jax import tree as T
from llora_jax.study_finetune import BackgroundFinetuning, _load_module, experiments, load_config
from llora_jax.study_finetune import log as _log

DEFAULT_FUSION = ("average", "task_arithmetic", "ties", "dare", "lorahub", "isolation")
DEFAULT_GRID = tuple(round(-2.0 + 0.2 * i, 1) for i in range(21))


def base_study(name: str, config: str, config_arg: str = "") -> Any:
    """A study with the paper's defaults; a study file changes what differs.

    Fields: name, config (+ config_arg, overrides as (dotted key, value) pairs), tasks
    ([] = every text task of the data directory), methods, seeds, learning_rates,
    lr_sweep_seeds (sweep the learning rates on these seeds only and reuse the choice per
    (method, task) for the other seeds; [] = every seed), learning_rate_choice (method ->
    task -> rate: no sweep for these, every seed uses the rate; e.g. a finished study's
    results.json "learning_rate"), fusion (+ fusion_grids: name ->
    list of hparam dicts, absent = the method's default grid; fusion_subsets: name -> "all",
    "pairs+full" or "full"), max_subset (0 = all sizes), lorahub_budget, isolation_p, pairs,
    disentangle_grid, disentangle_examples, eval_batch_size, eval_chunk (merged models per
    vmapped step when evaluating merge grids), group_size (fine-tuning runs of one method
    trained at once by one vmapped step, 12 = the text study's 6 tasks x 2 rates of its
    sweep seed; 1 = one run at a time, the only path with Orbax mid-run checkpoints),
    progress.
    """
    from ml_collections import ConfigDict

    s = ConfigDict()
    s.name = name
    s.config = config
    s.config_arg = config_arg
    s.overrides = ()
    s.tasks = []
    s.methods = ["full", "lora", "l_lora", "l_lora_model"]
    s.seeds = [0, 1, 2]
    s.learning_rates = [1e-4]
    s.lr_sweep_seeds = []  # [] = sweep every seed; else sweep these, reuse their choice
    s.learning_rate_choice = {}  # method -> task -> rate, chosen before (no sweep)
    s.analysis_seeds = []  # [] = fuse and disentangle every seed; else only these
    s.fusion = list(DEFAULT_FUSION)
    s.fusion_subsets = {}  # name -> "all" (default) | "pairs+full" | "full"
    s.fusion_grids = {}
    s.max_subset = 0
    s.lorahub_budget = 40
    s.isolation_p = 0.1
    s.pairs = []
    s.disentangle_grid = list(DEFAULT_GRID)
    s.disentangle_examples = 640
    s.eval_batch_size = 128
    s.eval_chunk = 8
    s.group_size = 12  # fine-tuning runs trained at once (train_group); 1 = one at a time
    s.progress = True
    return s


def tiny_study(s: Any, tasks: list[str], method: str, fusion: str, grid: list[dict]) -> Any:
    """Shrink a study to a seconds-long smoke test (used by the tests)."""
    s.name = f"{s.name}_tiny"
    s.config_arg = ",".join(a for a in (s.config_arg, "tiny") if a)
    s.overrides = ()
    s.tasks = tasks
    s.methods = [method]
    s.seeds = [0]
    s.learning_rates = [1e-3]
    s.fusion = [fusion]
    s.fusion_grids = {fusion: grid}
    s.pairs = [tuple(tasks[:2])]
    s.disentangle_grid = [0.0, 1.0]
    s.disentangle_examples = 8
    s.eval_batch_size = 8
    s.progress = False
    return s


def discover_text_tasks(data_dir: str | os.PathLike | None) -> list[str]:
    """Every task with a text/<task>/train.jsonl in the data directory."""
    from llora_jax.data.sources import resolve_data_dir

    root = resolve_data_dir(data_dir or None)
    if root is None or not (root / "text").is_dir():
        raise FileNotFoundError(
            "no local text data: set LLORA_DATA_DIR to a directory holding "
            "text/<task>/{train,test}.jsonl (tfds GLUE field names), e.g. "
            "`export LLORA_DATA_DIR=/path/to/shared/data`, or list the tasks explicitly "
            "(study.tasks) to read them from tensorflow-datasets on a machine with internet"
        )
    return sorted(p.parent.name for p in (root / "text").glob("*/train.jsonl"))


def environment() -> dict:
    import flax
    import optax

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
    if args and args[0].endswith("main.py"):
        args[0] = "python -m llora_jax.main"
    cwd = os.getcwd() + os.sep
    return " ".join(a.replace(cwd, "") for a in args)


def parse_overrides(items: list[str]) -> tuple:
    """["steps=10", "backbone=/x"] -> (("steps", 10), ("backbone", "/x"))."""
    import ast

    out = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out.append((key.strip(), value))
    return tuple(out)


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
    path: str,
    arg: str = "",
    out: str | None = None,
    overrides: list[str] | None = None,
    study_set: list[str] | None = None,
) -> Path:
    """``overrides``: config fields ("key=value"); ``study_set``: study fields ("key=JSON")."""
    s = _load_module(path, "llora_study").get_study(arg or None)
    if overrides:
        s.overrides = tuple(s.overrides) + parse_overrides(overrides)
    for item in study_set or []:
        key, sep, value = item.partition("=")
        if not sep or key not in s:
            raise KeyError(
                f"--study_set {item!r}: expected key=JSON with key one of {sorted(s.keys())}"
            )
        try:
            s[key] = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"--study_set {key}: {value!r} is not JSON ({e})") from e
    return run_study(s, Path(out or s.get("out", f"runs/{s.name}")))


def run_study(s: Any, out: Path) -> Path:
    """Run a whole study; returns the path of results.json."""
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    _compile_cache(out / ".jax_cache")
    data_dir = load_config(s.config, s.get("config_arg", ""), dict(s.overrides)).data.data_dir
    tasks = list(s.tasks) or discover_text_tasks(data_dir)
    _log(
        f"{s.name}: tasks {tasks}, methods {list(s.methods)}, seeds {list(s.seeds)} -> {_shown(out)}"
    )
    cache = X.BackboneCache()
    exps = experiments(s, tasks, cache)  # fails early on missing data

    results: dict = {
        "study": s.name,
        "backbone": load_config(s.config, s.get("config_arg", "")).backbone,
        **environment(),
        "tasks": tasks,
        "methods": list(s.methods),
        "seeds": [int(x) for x in s.seeds],
        "primary_metric": {t: e.primary_metric for t, e in exps.items()},
        "single": {},
        "fusion": {},
        "cosine": {},
        "isolation_overlap": {},
        "disentanglement": {},
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
    analysis = [int(x) for x in s.get("analysis_seeds", [])] or [int(x) for x in s.seeds]
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
            _interference(s, results, method, seed, members, tasks)
            compute = analyse and seed in analysis
            cached = _Cache(done, cache_path, fps)
            _fusion(s, results, method, seed, members, tasks, cached, compute)
            _disentangle(s, results, method, seed, members, cached, compute)
            if compute:
                results["timings_s"][f"analysis/{method}/seed{seed}"] = time.perf_counter() - t
                _log(f"{method} seed {seed}: analysis done in {time.perf_counter() - t:.0f} s")
            # After every block (the report, with its figures, at the end): an interrupted
            # study keeps it.
            _write_results(results, out, report=False)
    finally:
        tuner.close()
    path, rep = _write_results(results, out)
    _log(f"results: {_shown(path)}")
    _log(f"report:  {_shown(rep)}")
    return path


def _members(out, tasks, exps, results, method, seed, chosen) -> tuple[dict, dict]:
    """The (method, seed) block's members {task: Member} and their task vectors' fingerprints;
    records their single-task scores and run directories in ``results``."""
    members, fps = {}, {}
    for task in tasks:
        wd = chosen[(method, seed, task)]
        exp = dataclasses.replace(exps[task])
        exp.spec = X.M.AdapterSpec(method, exp.spec.lora)
        loaded = tv.load(wd / "task_vector")
        fps[task] = T.fingerprint(loaded.tau)
        # On the device once: every merge of the block reuses these arrays.
        members[task] = F.Member(exp=exp, tv=tv.on_device(loaded))
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


def _write_results(results: dict, out: Path, report: bool = True) -> tuple[Path, Path | None]:
    from llora_jax import report as R

    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    # Compact, floats to 7 significant digits (float32's; scores are computed no finer): a
    # full study's file is 1.6 MB instead of 3.1. report.md and results_summary.json are
    # the readable forms.
    tmp.write_text(json.dumps(_significant(results), separators=(",", ":"), default=float))
    os.replace(tmp, path)
    return path, (R.write_report(results, out) if report else None)


def _significant(x: Any) -> Any:
    """``x`` with every float rounded to 7 significant digits (for results.json)."""
    if isinstance(x, float):
        return float(f"{x:.7g}")
    if isinstance(x, dict):
        return {k: _significant(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_significant(v) for v in x]
    return x


def _interference(s, results, method, seed, members, tasks) -> None:
    taus = [members[t].tv.tau for t in tasks]
    m = fusion.cosine_matrix(taus)
    entry = {
        "tasks": tasks,
        "matrix": m.tolist(),
        "mean_off_diagonal": fusion.mean_off_diagonal(m),
        "delta_w_matrix": None,
        "delta_w_mean_off_diagonal": None,
    }
    phi0 = members[tasks[0]].tv.phi0
    if phi0 is not None:
        scale = members[tasks[0]].exp.spec.lora.scale
        # L-LoRA (and the whole-model linearization, to first order) changes W by the
        # linear part of s·A B around (A0, B0); LoRA by the full product.
        lin = method in ("l_lora", "l_lora_model")
        dws = [fusion.lora_delta_w(t, phi0, scale, linearized=lin) for t in taus]
        dm = fusion.cosine_matrix(dws)
        entry["delta_w_matrix"] = dm.tolist()
        entry["delta_w_mean_off_diagonal"] = fusion.mean_off_diagonal(dm)
    results["cosine"].setdefault(method, {})[str(seed)] = entry
    p = float(s.get("isolation_p", 0.1))
    results["isolation_overlap"].setdefault(method, {})[str(seed)] = {
        "tasks": tasks,
        "p": p,
        "matrix": np.asarray(fusion.core_overlap(taus, p)).tolist(),
    }


def _save_cache(done: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(done, default=float))
    os.replace(tmp, path)


class _Cache:
    """Finished fusion and ξ results (``fusion_cache.json``), each tied to the task vectors it
    was computed from: an entry of other vectors (e.g. runs fine-tuned again on another
    machine after an interrupted study) is stale and computed again, never mixed in."""

    def __init__(self, done: dict, path: Path, fingerprints: dict[str, str]):
        self.done, self.path, self.fps = done, path, fingerprints

    def vectors(self, tasks) -> str:
        joined = "|".join(f"{t}={self.fps[t]}" for t in sorted(tasks))
        return hashlib.sha256(joined.encode()).hexdigest()[:32]

    def get(self, key: str, tasks) -> dict | None:
        entry = self.done.get(key)
        return entry if entry is not None and entry.get("vectors") == self.vectors(tasks) else None

    def stale(self, keys_tasks) -> int:
        return sum(k in self.done and self.get(k, ts) is None for k, ts in keys_tasks)

    def put(self, items) -> None:
        for key, tasks, entry in items:
            self.done[key] = {**entry, "vectors": self.vectors(tasks)}
        _save_cache(self.done, self.path)


def _fusion(s, results, method, seed, members, tasks, cache: _Cache, compute=True) -> None:
    max_size = int(s.get("max_subset", 0)) or None
    which = dict(s.get("fusion_subsets", {}))
    grids = dict(s.get("fusion_grids", {}))
    spent: dict[str, float] = {}
    merging: dict[str, float] = {}  # of which building the merged vectors (compiles included)
    for name in s.fusion:
        kind = which.get(name, "all")
        subs = [
            sub
            for sub in F.subsets(tasks, 2, max_size)
            if kind == "all" or len(sub) == len(tasks) or (kind == "pairs+full" and len(sub) == 2)
        ]
        keys = {sub: f"fusion|{method}|{seed}|{name}|{F.subset_key(sub)}" for sub in subs}
        todo = [sub for sub in subs if cache.get(keys[sub], sub) is None]
        stale = cache.stale((keys[sub], sub) for sub in todo)
        if stale:
            _log(f"{method} seed {seed} {name}: {stale} cached results are of other task vectors")
        if todo and compute:
            t0 = time.perf_counter()
            grid, split = grids.get(name), {}
            # Every subset of the method at once (one grid per task and setting group).
            found = F.fuse_subsets(
                [members[t] for t in tasks],
                name,
                todo,
                grid=list(grid) if grid is not None else None,
                batch_size=int(s.get("eval_batch_size", 64)),
                chunk=int(s.get("eval_chunk", 8)),
                lorahub_budget=int(s.get("lorahub_budget", 40)),
                seed=int(seed),
                progress=bool(s.get("progress", True)),
                timings=split,
            )
            cache.put((keys[sub], sub, found[F.subset_key(sub)]) for sub in todo)
            spent[name] = time.perf_counter() - t0
            if split.get("merging_s", 0.0) >= 0.5:
                merging[name] = split["merging_s"]
        for sub in subs:
            entry = cache.get(keys[sub], sub)
            if entry is not None:
                results["fusion"].setdefault(method, {}).setdefault(name, {}).setdefault(
                    F.subset_key(sub), {}
                )[str(seed)] = entry
    for name, sec in spent.items():
        results["timings_s"][f"fusion/{method}/seed{seed}/{name}"] = sec
    for name, sec in merging.items():
        results["timings_s"][f"fusion/{method}/seed{seed}/{name}/merging"] = sec
    if spent:
        _log(
            f"{method} seed {seed} fusion: "
            + ", ".join(
                f"{k} {v:.0f} s" + (f" (merging {merging[k]:.0f} s)" if k in merging else "")
                for k, v in spent.items()
            )
        )


def _disentangle(s, results, method, seed, members, cache: _Cache, compute=True) -> None:
    from llora_jax.disentangle import disentanglement_error

    grid = [float(x) for x in s.disentangle_grid]
    for pair in s.pairs:
        if not all(t in members for t in pair):
            _log(f"disentanglement pair {pair}: task not in this study, skipped")
            continue
        pk = "+".join(pair)
        key = f"xi|{method}|{seed}|{pk}"
        entry = cache.get(key, pair)
        if entry is None and not compute:
            continue
        if entry is None:
            _log(f"disentanglement {method} seed {seed} {pk} ({len(grid)}x{len(grid)})")
            xi = disentanglement_error(
                members[pair[0]],
                members[pair[1]],
                grid,
                n_examples=int(s.disentangle_examples),
                batch_size=int(s.get("eval_batch_size", 64)),
                # The fusion search's chunk: its compiled grid programs serve here too.
                chunk=int(s.get("eval_chunk", 8)),
            )
            value = {"grid": grid, "xi": xi.tolist(), "mean_xi": float(np.mean(xi))}
            cache.put([(key, pair, value)])
            entry = cache.get(key, pair)
        results["disentanglement"].setdefault(method, {}).setdefault(pk, {})[str(seed)] = entry
