"""The capacity study (issue 21): where merging stops working as tasks grow and rank shrinks.

Blocks: one per (rank r, arm), arm ∈ {lora, l_lora (shared A0), l_lora_a0 (per-task A0,
merged and measured in ΔW space)}, α = 2r, q and v targets. Each block fine-tunes every
task once per seed, then merges the subsets of one shared plan (``study.plan``; the same
subsets for every arm, rank and fusion of a seed) with task arithmetic, TIES, the
isolation merge and the isolation pipeline, trains the multi-task baseline on the first
subsets of each size, and (full form, r = 16) tunes the pipeline's merge with every core
frozen against the sequential control (``study.frozen_tuning``). ``llora_jax.report.capacity`` collects the blocks.

Forms (``python experiments/capacity/study.py FORM --out DIR [--set field=value ...]``):

  full  n ∈ {2, 4, 7, 10, 14, 20} of the 20 text tasks, r ∈ {4, 16, 64}, 3 seeds, S = 10
        subsets per n (make capacity; the GPU issue's run)
  cpu   the seven GLUE tasks, n ∈ {2, 4, 7}, r ∈ {4, 16}, seed 0, a small budget (40 steps
        at 32 tokens), 3 subsets per n: a smoke test of the whole pipeline, not evidence
  tiny  seconds-long form for the tests (pass a tiny backbone with --set config.backbone=…)

Re-running the same command resumes: finished runs and fusions are kept per block.
"""

from __future__ import annotations

import sys

from llora_jax.report.capacity import write_capacity_report
from llora_jax.study.blocks import Block, block_spec, blocks_main
from llora_jax.study.spec import base_study

GLUE7 = ["cola", "mnli", "mrpc", "qqp", "rte", "sst2", "stsb"]
TEXT20 = GLUE7 + [
    "ag_news",
    "dbpedia",
    "emotion",
    "qnli",
    "scitail",
    "sms_spam",
    "snli",
    "sst5",
    "trec",
    "tweet_emotion",
    "tweet_hate",
    "tweet_irony",
    "tweet_offensive",
]
# arm -> (fine-tuning method, lora.a0, merge space)
ARMS = {
    "lora": ("lora", "shared", "adapter"),
    "l_lora": ("l_lora", "shared", "adapter"),
    "l_lora_a0": ("l_lora", "per_task", "delta_w"),
}
FORMS = ("full", "cpu", "tiny")


def _lams(values):
    return [{"lam": float(x)} for x in values]


def _grids(lams, ks, ps, thresholds) -> dict:
    return {
        "task_arithmetic": _lams(lams),
        "ties": [{"k": k, "lam": lam} for k in ks for lam in lams],
        "isolation": [{"p": p, "lam": lam} for p in ps for lam in lams],
        "isolation_pipeline": [
            {"p": p, "threshold": t, "lam": lam} for p in ps for t in thresholds for lam in lams
        ],
    }


def _form(form: str) -> dict:
    if form == "full":
        lams = [round(0.1 * i, 1) for i in range(11)]
        return dict(
            tasks=TEXT20,
            sizes=[2, 4, 7, 10, 14, 20],
            ranks=[4, 16, 64],
            seeds=[0, 1, 2],
            per_size=10,
            overrides=(
                ("steps", 500),
                ("batch_size", 32),
                ("data.max_len", 128),
                ("data.val_max", 300),
                ("data.eval_limit", 1000),
                ("log_every", 100),
                ("ckpt_every", 0),
                ("eval_batch_size", 32),
            ),
            learning_rates=[3e-4, 1e-3, 3e-3],
            fusion=["task_arithmetic", "ties", "isolation", "isolation_pipeline"],
            grids=_grids(lams, [0.25, 0.5, 1.0], [0.05, 0.1, 0.2], [0.05, 0.1, 0.2, 0.3, 1.0]),
            multitask={"budgets": ["per_task", "total"], "per_size": 2, "full_rank": 16},
            frozen_tuning={"steps_per_task": 100, "lr_factor": 0.1, "per_size": 2, "ranks": [16]},
            eval_batch_size=32,
            eval_chunk=32,
            group_size=12,
        )
    if form == "cpu":
        lams = [0.4, 0.7, 1.0]
        return dict(
            tasks=GLUE7,
            sizes=[2, 4, 7],
            ranks=[4, 16],
            seeds=[0],
            per_size=3,
            overrides=(
                ("steps", 40),
                ("batch_size", 16),
                ("data.max_len", 32),
                ("data.train_limit", 640),
                ("data.val_size", 32),
                ("data.eval_limit", 64),
                ("log_every", 10),
                ("ckpt_every", 0),
                ("optim.warmup_steps", 4),
                ("eval_batch_size", 16),
            ),
            learning_rates=[1e-3],
            fusion=["task_arithmetic", "ties", "isolation_pipeline"],
            grids=_grids(lams, [0.5], [0.1], [0.1, 1.0]),
            multitask={"budgets": ["per_task"], "per_size": 1, "sizes": [7], "ranks": [16]},
            eval_batch_size=16,
            eval_chunk=8,
            group_size=1,
        )
    if form == "tiny":
        return dict(
            tasks=["sst2", "mrpc", "rte"],
            sizes=[2, 3],
            ranks=[2],
            seeds=[0],
            per_size=1,
            overrides=(("ckpt_every", 0),),
            learning_rates=[1e-2],
            fusion=["task_arithmetic", "isolation_pipeline"],
            grids=_grids([0.5, 1.0], [0.5], [0.2], [0.0, 1.0]),
            multitask={"budgets": ["per_task"], "per_size": 1, "sizes": [3]},
            frozen_tuning={"steps_per_task": 2, "per_size": 1, "sizes": [3]},
            eval_batch_size=8,
            eval_chunk=8,
            group_size=1,
        )
    raise ValueError(f"unknown capacity form {form!r}; use one of {', '.join(FORMS)}")


def blocks(form: str) -> list[Block]:
    """The blocks of a form, smallest rank first (an interrupted study has the ranks where
    the shared-A0 prediction is sharpest), the three arms of a rank together."""
    f = _form(form)
    out = []
    for r in f["ranks"]:
        for arm, (method, a0, space) in ARMS.items():
            s = base_study(f"{arm}_r{r}", "configs/minilm.py", "tiny" if form == "tiny" else "")
            s.tasks = list(f["tasks"])
            s.methods = [method]
            s.seeds = list(f["seeds"])
            s.learning_rates = list(f["learning_rates"])
            s.lr_sweep_seeds = [f["seeds"][0]]
            s.overrides = (
                *f["overrides"],
                ("lora.rank", r),
                ("lora.alpha", 2.0 * r),
                ("lora.a0", a0),
            )
            s.merge_space = space
            s.fusion = list(f["fusion"])
            s.fusion_grids = dict(f["grids"])
            s.subset_sizes = list(f["sizes"])
            s.exhaustive_up_to = 0
            s.subsets_per_size = int(f["per_size"])
            s.isolation_p = 0.1
            s.pairs = []
            mt = dict(f["multitask"])
            if mt.pop("full_rank", None) == r:
                mt["full"] = True  # one full fine-tune per subset, at this rank's blocks only
            # One adapter for n tasks has one A0: the multi-task baseline belongs to the
            # shared-A0 arms (and to the ranks the form names).
            if a0 == "shared" and r in mt.pop("ranks", [r]):
                s.multitask = mt
            ft = dict(f.get("frozen_tuning") or {})
            if ft and a0 == "shared" and r in ft.pop("ranks", [r]):
                s.frozen_tuning = (
                    ft  # the pipeline's merge tuned with cores frozen, and its control
                )
            s.eval_batch_size = int(f["eval_batch_size"])
            s.eval_chunk = int(f["eval_chunk"])
            s.group_size = int(f["group_size"])
            s.progress = form != "tiny"
            out.append(Block(spec=s, labels={"arm": arm, "rank": r, "method": method}))
    return out


def get_study(arg=None):
    """One block, for the generic runner: ``FORM/ARM/rRANK`` (e.g. ``cpu/l_lora_a0/r4``)."""
    form, arm, rank = (arg or "cpu/lora/r4").split("/")
    return block_spec(blocks(form), f"{arm}_{rank}", form)


def main(argv=None) -> None:
    blocks_main("capacity", __doc__, FORMS, blocks, write_capacity_report, argv)


if __name__ == "__main__":
    sys.exit(main())
