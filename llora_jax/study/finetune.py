"""Fine-tuning part of a study: build every task's experiment, fine-tune every run.

``experiments`` builds one Experiment per task (text heads padded to one class count, so
every task shares compiled programs); ``finetune_all`` fine-tunes (or finds finished) every
(method, seed, task, learning rate) run, in two waves per method (the rates known up front,
then the rates the sweep chose), ``group_size`` runs at a time through one vmapped step
(``train_group``), and picks each run's learning rate on validation. ``load_config`` reads a
config file with dotted-key overrides.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from llora_jax import experiment, task_vectors
from llora_jax.tasks import text_encoder
from llora_jax.train import group as train_group


def load_module(path: str | Path, name: str):
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
    c = load_module(path, "llora_config").get_config(arg or None)
    for key, value in (overrides or {}).items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"config override {key!r}: no such field in {path}")
        node[leaf] = value
    return c


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[study {(time.perf_counter() - _T0) / 60:5.1f} min] {msg}", flush=True)


class Stopped(Exception):
    """Fine-tuning was asked to stop (``finetune_all(stop=...)``) before its next group."""


def finetune_all(
    s,
    out: Path,
    tasks: list[str],
    cache: experiment.BackboneCache,
    exps: dict,
    methods: list[str],
    stop: threading.Event | None = None,
) -> tuple[dict, dict]:
    """Fine-tune (or find finished) runs; pick the best learning rate per run on validation.
    Returns ({(method, seed, task): run dir}, {(method, task): learning rate}).

    Per method two waves: first every run whose rate is known up front (the sweep seeds
    try every rate; a given choice fixes it), then the other seeds' runs at the rate the
    first sweep seed chose. Unfinished runs of a wave train ``group_size`` at a time.
    ``stop``: when set, raise ``Stopped`` before the next group (finished runs stay)."""
    chosen: dict = {}
    given = s.learning_rate_choice or {}
    chosen_lr: dict = {
        (m, t): float(lr) for m, by_task in given.items() for t, lr in dict(by_task).items()
    }
    given_keys = set(chosen_lr)
    sweep_seeds = [int(x) for x in s.lr_sweep_seeds] or [int(x) for x in s.seeds]
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
            train_wave(s, out, method, plan, cache, exps, counter, total, stop)
            for (sd, t), lrs in plan.items():
                best = None
                for lr in lrs:
                    wd = run_dir(out, method, sd, t, lr)
                    metrics = json.loads((wd / "metrics.json").read_text())
                    score = val_score(metrics, exps[t].primary_metric)
                    if best is None or score > best[0]:  # ties: the first rate listed
                        best = (score, wd, lr)
                chosen[(method, sd, t)] = best[1]
                if wave == 1 and (method, t) not in given_keys and sd == sweep_seeds[0]:
                    chosen_lr[(method, t)] = best[2]
    return chosen, chosen_lr


def run_dir(out: Path, method: str, seed: int, task: str, lr: float) -> Path:
    return out / "runs" / f"seed{seed}" / task / f"{method}-lr{lr:g}"


def train_wave(
    s, out, method, plan: dict, cache, exps, counter: list, total: int, stop=None
) -> None:
    """Fine-tune the unfinished runs of ``plan`` {(seed, task): [rates]}, group_size at a time.

    Runs group only with runs whose task models share one compiled step (text heads are
    padded to one shape, so every task of the text study can; T5 and CLIP readouts are
    per task, so their groups hold one task's seeds and rates)."""

    todo: dict[tuple, list] = {}
    for (seed, task), lrs in plan.items():
        for lr in lrs:
            counter[0] += 1
            run = (f"({counter[0]}/{total})", seed, task, lr, run_dir(out, method, seed, task, lr))
            if task_vectors.is_task_vector(run[4] / "task_vector"):
                log(f"{run[0]} {method} seed {seed} {task} lr {lr:g}: done, skipping")
            else:
                # streamed training data trains one run at a time (groups need arrays)
                key = run if exps[task].streams_train else train_group.group_key(exps[task].tm)
                todo.setdefault(key, []).append(run)
    size = max(int(s.group_size), 1)
    progress = s.progress
    for runs in todo.values():
        for k in range(0, len(runs), size):
            if stop is not None and stop.is_set():
                raise Stopped(f"fine-tuning {method} stopped")
            group = runs[k : k + size]
            configs = []
            for _, seed, task, lr, _ in group:
                c = load_config(s.config, s.config_arg, dict(s.overrides))
                c.task, c.method, c.seed = task, method, int(seed)
                c.optim.learning_rate = float(lr)
                configs.append(c)
            if len(group) == 1:  # the one-run path (with its Orbax checkpoints, if any)
                n, seed, task, lr, wd = group[0]
                log(f"{n} fine-tuning {method} seed {seed} {task} lr {lr:g}")
                experiment.run_finetune(configs[0], wd, cache, progress=progress, exp=exps[task])
                continue
            log(f"fine-tuning {method}: {len(group)} runs at once ({describe(group)})")
            experiment.run_finetune_group(
                configs,
                [g[4] for g in group],
                cache,
                progress=progress,
                exps=[exps[g[2]] for g in group],
            )


def describe(group: list) -> str:
    """E.g. "seed 0: cola, mrpc at lr 0.0001, 0.001; seed 1: rte at lr 0.001" (a group's log)."""
    parts = []
    for seed in dict.fromkeys(g[1] for g in group):
        tasks = dict.fromkeys(g[2] for g in group if g[1] == seed)
        lrs = dict.fromkeys(f"{g[3]:g}" for g in group if g[1] == seed)
        parts.append(f"seed {seed}: {', '.join(tasks)} at lr {', '.join(lrs)}")
    return "; ".join(parts)


def val_score(metrics: dict, primary: str) -> float:
    value = float(metrics.get(f"val/{primary}", metrics.get("val/accuracy", float("nan"))))
    return value if value == value else float("-inf")  # NaN never wins


def experiments(
    s, tasks: list[str], cache: experiment.BackboneCache
) -> dict[str, experiment.Experiment]:

    exps = {}
    for task in tasks:
        c = load_config(s.config, s.config_arg, dict(s.overrides))
        c.task = task
        exps[task] = experiment.build(c, cache)
    # Label-description heads padded to one class count: one compiled step for all tasks.
    te = [t for t, e in exps.items() if e.tm.readout is text_encoder.readout]
    n = max((exps[t].tm.head["classes"].shape[0] for t in te), default=0)
    for t in te:
        exps[t] = dataclasses.replace(exps[t], tm=text_encoder.pad_classes(exps[t].tm, n))
    return exps


class BackgroundFinetuning:
    """Fine-tunes the methods one after another in a thread while the caller analyses the
    ones already finished: the accelerator then runs one method's merge grids between
    another's training steps, and each side's compiles and host work overlap the other's
    device work. ``result(method)`` waits for a method and returns
    ``(runs, learning rates, seconds)`` as ``finetune_all`` (an error in the thread is
    raised there); ``close()`` stops the thread before its next group and waits for it."""

    def __init__(self, s, out, tasks, cache, exps, methods: list[str]):
        self._done: dict[str, tuple] = {}
        self._ready = {m: threading.Event() for m in methods}
        self._stop = threading.Event()
        args = (s, out, tasks, cache, exps)
        self._thread = threading.Thread(
            target=self._run, args=(args, list(methods)), name="finetuning", daemon=True
        )
        self._thread.start()

    def _run(self, args, methods) -> None:
        try:
            for m in methods:
                t = time.perf_counter()
                runs, lrs = finetune_all(*args, [m], stop=self._stop)
                self._done[m] = (runs, lrs, time.perf_counter() - t)
                self._ready[m].set()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
            e.add_note(f"(raised by the study's fine-tuning thread, fine-tuning {m})")
            for x in methods:
                self._done.setdefault(x, e)
                self._ready[x].set()

    def result(self, method: str) -> tuple[dict, dict, float]:
        """``method``'s (runs, learning rates, seconds); re-raises the thread's error, with
        its own type and traceback, for the method that failed and every one after it."""
        self._ready[method].wait()
        got = self._done[method]
        if isinstance(got, BaseException):
            raise got
        return got

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
