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
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
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


def _load_module(path: str | Path, name: str):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study file {path} does not exist")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_config(path: str, arg: str = "", overrides: dict | None = None) -> Any:
    """get_config(arg) of a config file, with dotted-key overrides applied."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # configs import configs.common
    c = _load_module(path, "llora_config").get_config(arg or None)
    for key, value in (overrides or {}).items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"config override {key!r}: no such field in {path}")
        node[leaf] = value
    return c


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


_T0 = time.perf_counter()


def _log(msg: str) -> None:
    print(f"[study {(time.perf_counter() - _T0) / 60:5.1f} min] {msg}", flush=True)


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


def _finetune_all(
    s, out: Path, tasks: list[str], cache: X.BackboneCache, exps: dict, methods: list[str]
) -> tuple[dict, dict]:
    """Fine-tune (or find finished) runs; pick the best learning rate per run on validation.
    Returns ({(method, seed, task): run dir}, {(method, task): learning rate}).

    Per method two waves: first every run whose rate is known up front (the sweep seeds
    try every rate; a given choice fixes it), then the other seeds' runs at the rate the
    first sweep seed chose. Unfinished runs of a wave train ``group_size`` at a time."""
    chosen: dict = {}
    given = s.get("learning_rate_choice", {}) or {}
    chosen_lr: dict = {
        (m, t): float(lr) for m, by_task in given.items() for t, lr in dict(by_task).items()
    }
    given_keys = set(chosen_lr)
    sweep_seeds = [int(x) for x in s.get("lr_sweep_seeds", [])] or [int(x) for x in s.seeds]
    # A sweep seed outside s.seeds is fine-tuned only to choose rates that are not given.
    need_sweep = any((m, t) not in given_keys for m in methods for t in tasks)
    study_seeds = [int(x) for x in s.seeds]
    first = [x for x in sweep_seeds if need_sweep or x in study_seeds]
    seeds = first + [x for x in study_seeds if x not in first]
    lrs_all = [float(x) for x in s.learning_rates]

    def known(method, seed, task):  # the rate(s) of this run need no other run's result
        return (method, task) in given_keys or seed in sweep_seeds

    total = sum(
        len(lrs_all) if known(m, sd, t) and (m, t) not in given_keys else 1
        for m in methods
        for sd in seeds
        for t in tasks
    )
    counter = [0]
    for method in methods:
        for wave in (1, 2):  # 1: rates known up front; 2: rates chosen in wave 1
            cells = [(sd, t) for sd in seeds for t in tasks if known(method, sd, t) == (wave == 1)]
            plan = {
                (sd, t): (
                    [chosen_lr[(method, t)]] if wave == 2 or (method, t) in given_keys else lrs_all
                )
                for sd, t in cells
            }
            _train_wave(s, out, method, plan, cache, exps, counter, total)
            for (sd, t), lrs in plan.items():
                best = None
                for lr in lrs:
                    wd = _run_dir(out, method, sd, t, lr)
                    metrics = json.loads((wd / "metrics.json").read_text())
                    score = _val_score(metrics, exps[t].primary_metric)
                    if best is None or score > best[0]:  # ties: the first rate listed
                        best = (score, wd, lr)
                chosen[(method, sd, t)] = best[1]
                if wave == 1 and (method, t) not in given_keys and sd == sweep_seeds[0]:
                    chosen_lr[(method, t)] = best[2]
    return chosen, chosen_lr


def _run_dir(out: Path, method: str, seed: int, task: str, lr: float) -> Path:
    return out / "runs" / f"seed{seed}" / task / f"{method}-lr{lr:g}"


def _train_wave(s, out, method, plan: dict, cache, exps, counter: list, total: int) -> None:
    """Fine-tune the unfinished runs of ``plan`` {(seed, task): [rates]}, group_size at a time.

    Runs group only with runs whose task models share one compiled step (text heads are
    padded to one shape, so every task of the text study can; T5 and CLIP readouts are
    per task, so their groups hold one task's seeds and rates)."""
    from llora_jax import train_group as TG

    todo: dict[tuple, list] = {}
    for (seed, task), lrs in plan.items():
        for lr in lrs:
            counter[0] += 1
            run = (f"({counter[0]}/{total})", seed, task, lr, _run_dir(out, method, seed, task, lr))
            if tv.is_task_vector(run[4] / "task_vector"):
                _log(f"{run[0]} {method} seed {seed} {task} lr {lr:g}: done, skipping")
            else:
                todo.setdefault(TG.group_key(exps[task].tm), []).append(run)
    size = max(int(s.get("group_size", 1)), 1)
    progress = s.get("progress", True)
    for runs in todo.values():
        for k in range(0, len(runs), size):
            group = runs[k : k + size]
            configs = []
            for _, seed, task, lr, _ in group:
                c = load_config(s.config, s.get("config_arg", ""), dict(s.overrides))
                c.task, c.method, c.seed = task, method, int(seed)
                c.optim.learning_rate = float(lr)
                configs.append(c)
            if len(group) == 1:  # the one-run path (with its Orbax checkpoints, if any)
                n, seed, task, lr, wd = group[0]
                _log(f"{n} fine-tuning {method} seed {seed} {task} lr {lr:g}")
                X.run_finetune(configs[0], wd, cache, progress=progress, exp=exps[task])
                continue
            _log(f"fine-tuning {method}: {len(group)} runs at once ({_describe(group)})")
            X.run_finetune_group(
                configs,
                [g[4] for g in group],
                cache,
                progress=progress,
                exps=[exps[g[2]] for g in group],
            )


def _describe(group: list) -> str:
    """E.g. "seed 0: cola, mrpc at lr 0.0001, 0.001; seed 1: rte at lr 0.001" (a group's log)."""
    parts = []
    for seed in dict.fromkeys(g[1] for g in group):
        tasks = dict.fromkeys(g[2] for g in group if g[1] == seed)
        lrs = dict.fromkeys(f"{g[3]:g}" for g in group if g[1] == seed)
        parts.append(f"seed {seed}: {', '.join(tasks)} at lr {', '.join(lrs)}")
    return "; ".join(parts)


def _val_score(metrics: dict, primary: str) -> float:
    value = float(metrics.get(f"val/{primary}", metrics.get("val/accuracy", float("nan"))))
    return value if value == value else float("-inf")  # NaN never wins


def _experiments(s, tasks: list[str], cache: X.BackboneCache) -> dict[str, X.Experiment]:
    from llora_jax.heads import text_encoder as TE

    exps = {}
    for task in tasks:
        c = load_config(s.config, s.get("config_arg", ""), dict(s.overrides))
        c.task = task
        exps[task] = X.build(c, cache)
    # Label-description heads padded to one class count: one compiled step for all tasks.
    te = [t for t, e in exps.items() if e.tm.readout is TE.readout]
    n = max((exps[t].tm.head["classes"].shape[0] for t in te), default=0)
    for t in te:
        exps[t] = dataclasses.replace(exps[t], tm=TE.pad_classes(exps[t].tm, n))
    return exps


def run_study(s: Any, out: Path) -> Path:
    """Run a whole study; returns the path of results.json."""
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    _compile_cache(out / ".jax_cache")
    data_dir = load_config(s.config, s.get("config_arg", ""), dict(s.overrides)).data.data_dir
    tasks = list(s.tasks) or discover_text_tasks(data_dir)
    _log(f"{s.name}: tasks {tasks}, methods {list(s.methods)}, seeds {list(s.seeds)} -> {out}")
    cache = X.BackboneCache()
    exps = _experiments(s, tasks, cache)  # fails early on missing data

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
    for method, seed, analyse in order:
        if not any(k[0] == method for k in chosen):
            t = time.perf_counter()
            runs, lrs = _finetune_all(s, out, tasks, cache, exps, [method])
            chosen.update(runs)
            for (m, task), lr in lrs.items():
                if m == method:
                    results["learning_rate"].setdefault(m, {})[task] = lr
            results["timings_s"][f"finetune/{method}"] = time.perf_counter() - t
        t = time.perf_counter()
        members = {}
        for task in tasks:
            wd = chosen[(method, seed, task)]
            exp = dataclasses.replace(exps[task])
            exp.spec = X.M.AdapterSpec(method, exp.spec.lora)
            # On the device once: every merge of the block reuses these arrays.
            members[task] = F.Member(exp=exp, tv=tv.on_device(tv.load(wd / "task_vector")))
            m = members[task].tv.meta["metrics"]
            results["single"].setdefault(method, {}).setdefault(task, {})[str(seed)] = {
                "val": {k[4:]: v for k, v in m.items() if k.startswith("val/")},
                "test": {k[5:]: v for k, v in m.items() if k.startswith("test/")},
            }
            results["runs"].setdefault(method, {}).setdefault(task, {})[str(seed)] = str(
                wd.relative_to(out)
            )
        _interference(s, results, method, seed, members, tasks)
        compute = analyse and seed in analysis
        _fusion(s, results, method, seed, members, tasks, done, cache_path, compute)
        _disentangle(s, results, method, seed, members, done, cache_path, compute)
        if compute:
            results["timings_s"][f"analysis/{method}/seed{seed}"] = time.perf_counter() - t
            _log(f"{method} seed {seed}: analysis done in {time.perf_counter() - t:.0f} s")
        # After every block (the report, with its figures, at the end): an interrupted
        # study keeps it.
        _write_results(results, out, report=False)
    path, rep = _write_results(results, out)
    _log(f"results: {path}")
    _log(f"report:  {rep}")
    return path


def _write_results(results: dict, out: Path, report: bool = True) -> tuple[Path, Path | None]:
    from llora_jax import report as R

    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=float))
    os.replace(tmp, path)
    return path, (R.write_report(results, out) if report else None)


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


def _fusion(s, results, method, seed, members, tasks, done, cache_path, compute=True) -> None:
    max_size = int(s.get("max_subset", 0)) or None
    which = dict(s.get("fusion_subsets", {}))
    grids = dict(s.get("fusion_grids", {}))
    spent: dict[str, float] = {}
    for name in s.fusion:
        kind = which.get(name, "all")
        subs = [
            sub
            for sub in F.subsets(tasks, 2, max_size)
            if kind == "all" or len(sub) == len(tasks) or (kind == "pairs+full" and len(sub) == 2)
        ]
        keys = {sub: f"fusion|{method}|{seed}|{name}|{F.subset_key(sub)}" for sub in subs}
        todo = [sub for sub in subs if keys[sub] not in done]
        if todo and compute:
            t0 = time.perf_counter()
            grid = grids.get(name)
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
            )
            for sub in todo:
                done[keys[sub]] = found[F.subset_key(sub)]
            _save_cache(done, cache_path)
            spent[name] = time.perf_counter() - t0
        for sub in subs:
            if keys[sub] in done:
                results["fusion"].setdefault(method, {}).setdefault(name, {}).setdefault(
                    F.subset_key(sub), {}
                )[str(seed)] = done[keys[sub]]
    for name, sec in spent.items():
        results["timings_s"][f"fusion/{method}/seed{seed}/{name}"] = sec
    if spent:
        _log(
            f"{method} seed {seed} fusion: " + ", ".join(f"{k} {v:.0f} s" for k, v in spent.items())
        )


def _disentangle(s, results, method, seed, members, done, cache_path, compute=True) -> None:
    from llora_jax.disentangle import disentanglement_error

    grid = [float(x) for x in s.disentangle_grid]
    for pair in s.pairs:
        if not all(t in members for t in pair):
            _log(f"disentanglement pair {pair}: task not in this study, skipped")
            continue
        pk = "+".join(pair)
        key = f"xi|{method}|{seed}|{pk}"
        if key not in done and not compute:
            continue
        if key not in done:
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
            done[key] = {"grid": grid, "xi": xi.tolist(), "mean_xi": float(np.mean(xi))}
            _save_cache(done, cache_path)
        results["disentanglement"].setdefault(method, {}).setdefault(pk, {})[str(seed)] = done[key]
