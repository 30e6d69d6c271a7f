"""Analysis part of a study: interference, fusion of every subset, disentanglement, per block.

A block is one (method, seed): its members' task vectors are measured (cosines, core
overlap), fused with every method on every subset (``fusion.search``), and pairs are
disentangled. Finished results are cached in ``fusion_cache.json``, each tied to the
task vectors it was computed from (``ResultCache``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from llora_jax import interference
from llora_jax.fusion import search
from llora_jax.interference.disentangle import disentanglement_error
from llora_jax.interop.delta_w import KIND as DELTA_W
from llora_jax.interop.peft_export import meta_scale
from llora_jax.study.finetune import log
from llora_jax.study.plan import study_subsets
from llora_jax.study.spec import StudySpec


def record_interference(s: StudySpec, results, method, seed, members, tasks) -> None:
    taus = [members[t].tv.tau for t in tasks]
    m = interference.cosine_matrix(taus)
    entry = {
        "tasks": tasks,
        "matrix": m.tolist(),
        "mean_off_diagonal": interference.mean_off_diagonal(m),
        "delta_w_matrix": None,
        "delta_w_mean_off_diagonal": None,
    }
    phi0 = members[tasks[0]].tv.phi0
    delta_w = members[tasks[0]].tv.meta.get("adapter_kind") == DELTA_W
    if delta_w or s.merge_space == "delta_w":  # the members' vectors are ΔW already
        entry["delta_w_matrix"] = entry["matrix"]
        entry["delta_w_mean_off_diagonal"] = entry["mean_off_diagonal"]
    elif phi0 is not None:
        # The vector's own scale (one float, or per layer for imported adapters).
        scale = meta_scale(members[tasks[0]].tv.meta)
        # L-LoRA (and the whole-model linearization, to first order) changes W by the
        # linear part of s·A B around (A0, B0); LoRA by the full product.
        lin = method in ("l_lora", "l_lora_model")
        dws = [interference.lora_delta_w(t, phi0, scale, linearized=lin) for t in taus]
        dm = interference.cosine_matrix(dws)
        entry["delta_w_matrix"] = dm.tolist()
        entry["delta_w_mean_off_diagonal"] = interference.mean_off_diagonal(dm)
    results["cosine"].setdefault(method, {})[str(seed)] = entry
    p = float(s.isolation_p)
    results["isolation_overlap"].setdefault(method, {})[str(seed)] = {
        "tasks": tasks,
        "p": p,
        "matrix": np.asarray(interference.core_overlap(taus, p)).tolist(),
    }


def save_cache(done: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(done, default=float))
    os.replace(tmp, path)


class ResultCache:
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
        save_cache(self.done, self.path)


def record_fusion(
    s: StudySpec, results, method, seed, members, tasks, cache: ResultCache, compute=True
) -> None:
    plan = study_subsets(s, tasks, int(seed))
    which = dict(s.fusion_subsets)
    grids = dict(s.fusion_grids)
    spent: dict[str, float] = {}
    merging: dict[str, float] = {}  # of which building the merged vectors (compiles included)
    for name in s.fusion:
        kind = which.get(name, "all")
        subs = [
            sub
            for sub in plan
            if kind == "all" or len(sub) == len(tasks) or (kind == "pairs+full" and len(sub) == 2)
        ]
        keys = {sub: f"fusion|{method}|{seed}|{name}|{search.subset_key(sub)}" for sub in subs}
        todo = [sub for sub in subs if cache.get(keys[sub], sub) is None]
        stale = cache.stale((keys[sub], sub) for sub in todo)
        if stale:
            log(f"{method} seed {seed} {name}: {stale} cached results are of other task vectors")
        if todo and compute:
            t0 = time.perf_counter()
            grid, split = grids.get(name), {}
            # Every subset of the method at once (one grid per task and setting group).
            found = search.fuse_subsets(
                [members[t] for t in tasks],
                name,
                todo,
                grid=list(grid) if grid is not None else None,
                batch_size=int(s.eval_batch_size),
                chunk=int(s.eval_chunk),
                lorahub_budget=int(s.lorahub_budget),
                seed=int(seed),
                progress=bool(s.progress),
                timings=split,
            )
            cache.put((keys[sub], sub, found[search.subset_key(sub)]) for sub in todo)
            spent[name] = time.perf_counter() - t0
            if split.get("merging_s", 0.0) >= 0.5:
                merging[name] = split["merging_s"]
        for sub in subs:
            entry = cache.get(keys[sub], sub)
            if entry is not None:
                results["fusion"].setdefault(method, {}).setdefault(name, {}).setdefault(
                    search.subset_key(sub), {}
                )[str(seed)] = entry
    for name, sec in spent.items():
        results["timings_s"][f"fusion/{method}/seed{seed}/{name}"] = sec
    for name, sec in merging.items():
        results["timings_s"][f"fusion/{method}/seed{seed}/{name}/merging"] = sec
    if spent:
        log(
            f"{method} seed {seed} fusion: "
            + ", ".join(
                f"{k} {v:.0f} s" + (f" (merging {merging[k]:.0f} s)" if k in merging else "")
                for k, v in spent.items()
            )
        )


def record_disentanglement(
    s: StudySpec, results, method, seed, members, cache: ResultCache, compute=True
) -> None:

    grid = [float(x) for x in s.disentangle_grid]
    for pair in s.pairs:
        if not all(t in members for t in pair):
            log(f"disentanglement pair {pair}: task not in this study, skipped")
            continue
        pk = "+".join(pair)
        key = f"xi|{method}|{seed}|{pk}"
        entry = cache.get(key, pair)
        if entry is None and not compute:
            continue
        if entry is None:
            log(f"disentanglement {method} seed {seed} {pk} ({len(grid)}x{len(grid)})")
            xi = disentanglement_error(
                members[pair[0]],
                members[pair[1]],
                grid,
                n_examples=int(s.disentangle_examples),
                batch_size=int(s.eval_batch_size),
                # The fusion search's chunk: its compiled grid programs serve here too.
                chunk=int(s.eval_chunk),
            )
            value = {"grid": grid, "xi": xi.tolist(), "mean_xi": float(np.mean(xi))}
            cache.put([(key, pair, value)])
            entry = cache.get(key, pair)
        results["disentanglement"].setdefault(method, {}).setdefault(pk, {})[str(seed)] = entry
