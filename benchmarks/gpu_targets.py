"""One command per target of issue 22, each self-contained, each writing JSON under ``--out``.

    python -m benchmarks.gpu_targets TARGET [--out DIR] [--tiny]

Targets, in the order a GPU session runs them (``benchmarks/NOTES.md``, "Issue 22", has the
predictions and the device commands):

* ``check``: "auto" is cuDNN's kernel here and equals XLA's result (``attention_check``);
* ``vit``: ViT-B/16 LoRA train steps vs PEFT, MFU, l_lora / lora (preset ``target_vit``);
* ``dis``: the T5 21×21 ``l_lora`` disentanglement grid (preset ``target_dis``);
* ``clip_grid``: CLIP merge grids vs PEFT one at a time, batched MFU (``target_clip_grid``);
* ``t5``: Flan-T5-base LoRA train steps vs PEFT (preset ``target_t5``);
* ``stream``: the streaming JPEG pipeline feeding the ViT step (``stream_bench``; grain).

A target that failed or ran out of time is rerun alone: targets share nothing but the code.
``--tiny`` runs a target on tiny random models (a CPU smoke test of the same code path).
"""

from __future__ import annotations

import argparse
import os

from benchmarks import attention_check, run
from benchmarks.gpu_target_plans import TARGETS

ALL = ("check", *TARGETS, "stream")


def command(target: str, out: str, tiny: bool) -> list[str]:
    """The ``benchmarks.run`` arguments of a preset target."""
    preset, areas, budget = TARGETS[target]
    argv = ["--preset", preset, "--only", areas, "--budget-s", str(budget), "--out", out]
    return argv + (["--tiny", "--inprocess"] if tiny else [])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_targets", description=__doc__)
    p.add_argument("target", choices=ALL)
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    p.add_argument("--tiny", action="store_true", help="tiny models: a CPU smoke test")
    args = p.parse_args(argv)
    if args.target == "check":
        attention_check.main(["--out", args.out] + (["--no-timing"] if args.tiny else []))
    elif args.target == "stream":
        from benchmarks import stream_bench  # imports grain, which only this target needs

        stream_bench.main(["--out", args.out] + (["--tiny", "--workers", "1"] if args.tiny else []))
    else:
        run.main(command(args.target, args.out, args.tiny))


if __name__ == "__main__":
    main()
