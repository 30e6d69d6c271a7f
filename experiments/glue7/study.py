"""The seven-task cosine test (issue 21): is L-LoRA's mean off-diagonal task-vector cosine
lower than LoRA's on the paper's seven GLUE tasks, under matched rank, seed, data and budget?

Blocks (each LoRA vs L-LoRA at r = 16, α = 32, the same seeds, data and budget):

  main   the test itself, 5 seeds
  a0     ablation: a per-task A0 (seed key folded with the task name), merged and measured
         in ΔW space (adapter coordinates of different A0 live in different bases)
  b0     ablation: B0 ≠ 0 (lora.init_b = "normal"): A then gets gradients under L-LoRA
  long   ablation: a 4× budget (2,000 steps, same warm-up fraction and rates)

Every block reports both cosines (flattened adapter parameters and ΔW), task arithmetic on
every subset (normalized scores), ξ on four pairs, and each task's majority-class baseline.
``llora_jax.report.cosine_test`` writes the paired comparison over seeds and the verdict.

Forms (``python experiments/glue7/study.py FORM --out DIR [--set field=value ...]``):
  full (make reproduce-glue7; a GPU run), cpu (seed 0-1, 40 steps at 32 tokens, main and
  a0 only: a smoke test), tiny (tests).
"""

from __future__ import annotations

import sys

from llora_jax.report.cosine_test import write_cosine_report
from llora_jax.study.blocks import Block, block_spec, blocks_main
from llora_jax.study.spec import base_study

GLUE7 = ["cola", "mnli", "mrpc", "qqp", "rte", "sst2", "stsb"]
PAIRS = [("cola", "mnli"), ("mrpc", "qqp"), ("rte", "mnli"), ("sst2", "stsb")]
FORMS = ("full", "cpu", "tiny")
# block -> (extra config overrides, merge space, steps multiplier)
ABLATIONS = {
    "main": ((), "adapter", 1),
    "a0": ((("lora.a0", "per_task"),), "delta_w", 1),
    "b0": ((("lora.init_b", "normal"),), "adapter", 1),
    "long": ((), "adapter", 4),
}


def _form(form: str) -> dict:
    lams = [round(0.1 * i, 1) for i in range(11)]
    if form == "full":
        return dict(
            tasks=GLUE7,
            seeds=[0, 1, 2, 3, 4],
            steps=500,
            warmup=50,
            blocks=list(ABLATIONS),
            overrides=(
                ("batch_size", 32),
                ("data.max_len", 128),
                ("data.val_max", 300),
                ("data.eval_limit", 1000),
                ("log_every", 100),
                ("ckpt_every", 0),
                ("eval_batch_size", 32),
            ),
            learning_rates=[3e-4, 1e-3, 3e-3],
            lams=lams,
            pairs=PAIRS,
            eval_batch_size=32,
            eval_chunk=32,
            group_size=12,
            config_arg="",
        )
    if form == "cpu":
        return dict(
            tasks=GLUE7,
            seeds=[0, 1],
            steps=40,
            warmup=4,
            blocks=["main", "a0"],
            overrides=(
                ("batch_size", 16),
                ("data.max_len", 32),
                ("data.train_limit", 640),
                ("data.val_size", 32),
                ("data.eval_limit", 64),
                ("log_every", 10),
                ("ckpt_every", 0),
                ("eval_batch_size", 16),
            ),
            learning_rates=[1e-3],
            lams=[0.4, 0.7, 1.0],
            pairs=[],
            eval_batch_size=16,
            eval_chunk=8,
            group_size=1,
            config_arg="",
        )
    if form == "tiny":
        return dict(
            tasks=["sst2", "mrpc"],
            seeds=[0, 1],
            steps=6,
            warmup=1,
            blocks=["main", "a0"],
            overrides=(("ckpt_every", 0),),
            learning_rates=[1e-2],
            lams=[0.5, 1.0],
            pairs=[("sst2", "mrpc")],
            eval_batch_size=8,
            eval_chunk=8,
            group_size=1,
            config_arg="tiny",
        )
    raise ValueError(f"unknown glue7 form {form!r}; use one of {', '.join(FORMS)}")


def blocks(form: str) -> list[Block]:
    f = _form(form)
    out = []
    for name in f["blocks"]:
        extra, space, mult = ABLATIONS[name]
        s = base_study(name, "configs/minilm.py", f["config_arg"])
        s.tasks = list(f["tasks"])
        s.methods = ["lora", "l_lora"]
        s.seeds = list(f["seeds"])
        s.learning_rates = list(f["learning_rates"])
        s.lr_sweep_seeds = [f["seeds"][0]]
        s.overrides = (
            *f["overrides"],
            ("steps", f["steps"] * mult),
            ("optim.warmup_steps", f["warmup"] * mult),
            ("lora.rank", 16),
            ("lora.alpha", 32.0),
            *extra,
        )
        s.merge_space = space
        s.fusion = ["task_arithmetic"]
        s.fusion_grids = {"task_arithmetic": [{"lam": x} for x in f["lams"]]}
        s.pairs = list(f["pairs"])
        s.eval_batch_size = int(f["eval_batch_size"])
        s.eval_chunk = int(f["eval_chunk"])
        s.group_size = int(f["group_size"])
        s.progress = form != "tiny"
        if form == "tiny":
            s.disentangle_grid = [-1.0, 0.0, 1.0]
            s.disentangle_examples = 8
        out.append(Block(spec=s, labels={"ablation": name, "rank": 16}))
    return out


def get_study(arg=None):
    """One block for the generic runner: ``FORM/BLOCK`` (e.g. ``full/main``)."""
    form, name = (arg or "full/main").split("/")
    return block_spec(blocks(form), name, form)


def main(argv=None) -> None:
    blocks_main("glue7", __doc__, FORMS, blocks, write_cosine_report, argv)


if __name__ == "__main__":
    sys.exit(main())
