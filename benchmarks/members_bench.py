"""A study's single-task evaluation: per-task evaluation vs one routed pass over all members.

Builds the demo study's experiments (``experiments/text_minilm/study.py:demo``: the real
all-MiniLM-L6-v2, the local test splits of its tasks), gives every task a random LoRA
adapter (the weights do not change the cost), and times, for the test split of every
task: (a) the per-task evaluation the fine-tuning run does (``evaluation.grid.predict``,
task by task, packed where the task model allows) and (b) ``serving.members.predict_members``
(one bank, one routed pass). Both are timed cold (first call, compiling) and warm
(median of ``--repeats``), alternating, with the load average in the JSON; their
predictions are checked equal first.

    python -m benchmarks.members_bench [--study-arg demo] [--eval-limit N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from llora_jax import experiment, forward, task_vectors
from llora_jax import tree as tree_lib
from llora_jax.evaluation import grid as grid_eval
from llora_jax.fusion.programs import Member
from llora_jax.serving.members import predict_members
from llora_jax.study.finetune import experiments
from llora_jax.study.finetune import load_module as load_study_module
from llora_jax.types import AdapterSpec

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "experiments" / "text_minilm" / "study.py"


def _member(exp, seed: int, method: str) -> Member:
    spec = AdapterSpec(method, exp.spec.lora)
    phi, phi0 = forward.init_trainable(exp.tm, spec, jax.random.key(seed))
    tau = jax.tree.map(lambda x: 0.05 * jnp.sin(seed + jnp.arange(x.size)).reshape(x.shape), phi)
    meta = task_vectors.make_meta(
        base_model=exp.tm.base_model,
        base_fingerprint="bench",
        adapter_kind="lora",
        mode=method,
        task=exp.task,
        seed=seed,
        steps=0,
        targets=list(spec.lora.targets),
        rank=spec.lora.rank,
        alpha=spec.lora.alpha,
    )
    exp = dataclasses.replace(exp, spec=spec)
    return Member(exp=exp, tv=task_vectors.TaskVector(tau=tau, meta=meta, phi0=phi0))


def per_task(members: list[Member], bs: int) -> dict[str, np.ndarray]:
    out = {}
    for m in members:
        phi = tree_lib.add(m.tv.phi0, m.tv.tau)
        out[m.task] = grid_eval.predict(
            m.exp.tm, m.exp.spec, phi, m.tv.phi0, m.exp.arrays["test"], bs
        )
    return out


def _timed(fn) -> tuple[float, dict]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study-arg", default="demo")
    p.add_argument("--method", default="lora", choices=["lora", "l_lora"])
    p.add_argument("--eval-limit", type=int, default=0, help="test rows per task (0: the study's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    s = load_study_module(STUDY, "bench_study").get_study(a.study_arg)
    if a.eval_limit:
        s.overrides = (*s.overrides, ("data.eval_limit", a.eval_limit))
    exps = experiments(s, list(s.tasks), experiment.BackboneCache())
    members = [_member(e, i, a.method) for i, e in enumerate(exps.values())]
    bs = int(s.eval_batch_size)
    load = {"before": os.getloadavg()}
    cold_task, ref = _timed(lambda: per_task(members, bs))
    cold_routed, got = _timed(lambda: predict_members(members, "test", batch_size=bs))
    for t in ref:  # the same predictions (class ids) before any timing counts
        np.testing.assert_array_equal(np.asarray(got[t]), np.asarray(ref[t]))
    warm_task, warm_routed = [], []
    for _ in range(a.repeats):  # alternating: the shared machine's drift hits both
        warm_task.append(_timed(lambda: per_task(members, bs))[0])
        warm_routed.append(_timed(lambda: predict_members(members, "test", batch_size=bs))[0])
    load["after"] = os.getloadavg()
    rows = sum(len(m.exp.arrays["test"]["label"]) for m in members)
    body = {
        "date": common.now_iso(),
        "command": common.command_line("benchmarks.members_bench"),
        "device": common.jax_device(),
        "versions": common.versions(),
        "load_average": load,
        "tasks": list(s.tasks),
        "test_rows": rows,
        "batch_size": bs,
        "method": a.method,
        "per_task_s": {"cold": cold_task, "warm": warm_task},
        "routed_s": {"cold": cold_routed, "warm": warm_routed},
        "speedup_warm_median": float(np.median(warm_task) / np.median(warm_routed)),
        "speedup_cold": cold_task / cold_routed,
    }
    out = (
        a.out
        or ROOT / "benchmarks" / "results" / f"{common.now_iso().replace(':', '')}-cpu-members.json"
    )
    common.dump(body, out)
    print(
        {
            k: body[k]
            for k in (
                "test_rows",
                "per_task_s",
                "routed_s",
                "speedup_warm_median",
                "speedup_cold",
                "load_average",
            )
        }
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
