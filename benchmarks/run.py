"""Benchmark entry point: ``python -m benchmarks.run [--quick|--full|--preset P] [--tiny] …``.

Options: ``--only AREAS`` (comma list, run in that order), ``--models``, ``--budget-s``.

Areas: peak (bf16/fp32 matmul ceilings), train (JAX train steps), pipeline (input
pipeline vs step), scaling (data parallel), grid (merge grids), disentangle (21×21 grid),
torch_train and torch_grid (HF + peft baselines); aliases ``jax``, ``torch``, ``all``.

The PyTorch areas and the JAX areas run in two fresh subprocesses, one after the other
(torch first): JAX reserves most of the GPU's memory when it starts, and a fresh process
gives each framework the device to itself. ``--inprocess`` runs everything in this
process instead (the CPU tests do). Each worker rewrites its part file after every
measurement, so a run stopped by a time limit keeps what it measured; the merged result
goes to ``<out>/<date>-<device>.json`` and a table is printed last. With ``--budget-s``
nothing new starts after the budget, and a worker still running ``--grace-s`` later is
stopped (its part file keeps what it measured). ``python -m benchmarks.merge`` joins the
results of several runs (e.g. one per device call) into one file and table.

JAX areas run in the order given to ``--only`` (default: peak, train, pipeline, scaling,
disentangle, grid); when train and pipeline both run, the pipeline runs after the first
train wave (it reuses that wave's compiled steps), before the other waves.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import plans, report
from benchmarks.common import Recorder, command_line, device_label, dump, now_iso, versions


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument(
        "--tiny", action="store_true", help="tiny random models (CPU tests); with --preset: shrunk"
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="a few configs, ~4-5 minutes on one H100"
    )
    size.add_argument(
        "--full",
        action="store_true",
        help="the whole matrix (run it in parts with --only/--models)",
    )
    size.add_argument(
        "--preset",
        default=None,
        choices=[p for p in plans.PRESETS if p != "tiny"],
        help="a named plan (gpu_t5_and_scaling: what issue #8 still lacks); with --tiny: its tiny twin",
    )
    p.add_argument("--only", default=None, help=f"comma list of areas: {', '.join(plans.AREAS)}")
    p.add_argument("--models", default=None, help="comma list: clip,t5")
    p.add_argument(
        "--grid-models",
        default=None,
        help="comma list, in run order, of the merge-grid models (default: the plan's)",
    )
    p.add_argument("--out", default="benchmarks/results", help="output folder")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per config")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per config")
    p.add_argument(
        "--compile-workers",
        type=int,
        default=None,
        help="threads compiling train steps concurrently",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="skip what is left after this many seconds (the run still writes)",
    )
    p.add_argument(
        "--grace-s",
        type=float,
        default=120.0,
        help="with --budget-s: stop a worker this long after the budget ends",
    )
    p.add_argument("--inprocess", action="store_true", help="no subprocesses (tests, debugging)")
    p.add_argument("--worker", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def preset_name(args: argparse.Namespace) -> str:
    if args.preset:
        return args.preset
    if args.quick:
        return "quick"
    if args.full:
        return "full"
    return "tiny" if args.tiny else "default"


def make_plan(args: argparse.Namespace) -> plans.Plan:
    name = preset_name(args)
    plan = plans.make_plan(name)
    if args.tiny and name != "tiny":
        plan = plans.shrink(plan)
    plan = plans.filter_models(plan, args.models.split(",") if args.models else None)
    if args.grid_models:
        plan.grid_models = tuple(args.grid_models.split(","))
    if args.repeats:
        plan.repeats = plan.torch_repeats = args.repeats
    if args.warmup is not None:
        plan.warmup = args.warmup
    if args.compile_workers is not None:
        plan.compile_workers = args.compile_workers
    return plan


# ----------------------------------------------------------------------------- workers


def run_jax(plan: plans.Plan, areas: list[str], rec: Recorder) -> None:
    import jax

    from benchmarks import dis_bench, flops, grid_bench, pipeline_bench, scaling_bench, train_bench
    from benchmarks.common import jax_device, measurement

    rec.device = jax_device()
    area = rec.timed_area
    cache: dict = {}  # built models shared by the areas of this worker

    def peak():
        for dtype, label in (("bfloat16", "bf16"), ("float32", "fp32")):
            name = f"peak/matmul/{label}"
            cfg = {"n": plan.peak_n, "dtype": dtype, "precision": "default (TF32 for fp32 on GPU)"}

            def go(dtype=dtype, name=name, cfg=cfg):
                r = flops.matmul_peak(plan.peak_n, dtype, plan.peak_repeats)
                rec.add(
                    measurement(
                        name,
                        "peak",
                        cfg,
                        r["samples"],
                        derived={"flop_per_s": r["flop_per_s"], "flops": r["flops"]},
                    )
                )

            with area("peak"):
                rec.guard(name, "peak", cfg, go)

    # What every compiled train step of this plan is built and timed with.
    step_kw = dict(
        tiny=plan.tiny,
        warmup=plan.warmup,
        repeats=plan.repeats,
        compile_workers=plan.compile_workers,
        lora_dropout=plan.lora_dropout,
        rng_impl=plan.rng_impl,
    )

    def pipeline(kept: dict):
        for m in plan.models:
            with area("pipeline"):
                pipeline_bench.run(
                    [m],
                    rec,
                    tiny=plan.tiny,
                    batch=plan.pipeline_batch[m],
                    n_batches=plan.pipeline_batches,
                    runners=kept,
                )

    def train():
        keep: tuple[str, ...] = ()
        if "pipeline" in areas:  # the lora step at the pipeline's batch size feeds the e2e rate
            for m in plan.models:
                cands = sorted(
                    (
                        c
                        for c in plan.train
                        if c.model == m and c.method == "lora" and c.batch == plan.pipeline_batch[m]
                    ),
                    key=lambda c: c.precision,
                )
                keep += tuple(c.name for c in cands[:1])
        cases = plan.train
        sizes = train_bench.wave_sizes(len(cases), plan.train_waves)
        # The pipeline runs after the first waves that hold every step it reuses.
        n_waves = next(
            (
                i + 1
                for i in range(len(sizes))
                if {c.name for c in cases[: sum(sizes[: i + 1])]} >= set(keep)
            ),
            len(sizes),
        )
        n_first = sum(sizes[:n_waves])
        kw = dict(step_kw, cache=cache)
        with area("train"):
            kept = train_bench.run(
                cases[:n_first], rec, keep=keep, waves=tuple(sizes[:n_waves]), **kw
            )
        if "pipeline" in areas:
            pipeline(kept)
        kept.clear()
        if cases[n_first:]:
            with area("train"):
                train_bench.run(cases[n_first:], rec, waves=tuple(sizes[n_waves:]), **kw)

    def scaling():
        # Needs >= 2 devices; on one there is nothing to compare (the target says n/a).
        if jax.device_count() < 2:
            return
        with area("scaling"):
            scaling_bench.run(plan.scaling, rec, **step_kw)

    def disentangle():
        if "t5" in plan.models:
            with area("disentangle"):
                dis_bench.run(rec, tiny=plan.tiny, settings=plan.grid, cache=cache)

    def grid():
        with area("grid"):
            grid_bench.run(
                list(plan.grid_models), rec, tiny=plan.tiny, settings=plan.grid, cache=cache
            )

    # Areas run in the order asked for; the pipeline rides on the train area when both run.
    steps = {
        "peak": peak,
        "train": train if plan.train else lambda: None,
        "pipeline": (lambda: None) if "train" in areas and plan.train else lambda: pipeline({}),
        "scaling": scaling,
        "disentangle": disentangle,
        "grid": grid,
    }
    for a in areas:
        if a in steps:
            steps[a]()


def run_torch(plan: plans.Plan, areas: list[str], rec: Recorder) -> None:
    from benchmarks import torch_baseline

    try:
        import torch

        if plan.tiny:  # tiny CPU runs: one thread avoids fighting JAX's threads for cores
            torch.set_num_threads(1)
        rec.device = {
            "platform": "cuda" if torch.cuda.is_available() else "cpu",
            "kind": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "count": torch.cuda.device_count(),
            "backend": "torch",
        }
    except ImportError:
        pass
    if "torch_train" in areas and plan.torch_train:
        with rec.timed_area("torch_train"):
            torch_baseline.run_train(
                plan.torch_train,
                rec,
                tiny=plan.tiny,
                warmup=plan.warmup,
                repeats=plan.torch_repeats,
                lora_dropout=plan.lora_dropout,
            )
    if "torch_grid" in areas:
        from benchmarks import torch_grid  # imports torch (optional)

        with rec.timed_area("torch_grid"):
            torch_grid.run_grid(list(plan.grid_models), rec, tiny=plan.tiny, settings=plan.grid)


def worker_main(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    areas = plans.resolve_areas(args.only)
    rec = Recorder(args.part, deadline=args.deadline)
    (run_jax if args.worker == "jax" else run_torch)(plan, areas, rec)
    rec.flush()
    return 0


# ----------------------------------------------------------------------------- driver


def _spawn(argv: list[str], kind: str, part: Path, deadline: float | None, grace: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.run", *argv, "--worker", kind, "--part", str(part)]
    if deadline is not None:
        cmd += ["--deadline", str(deadline)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    timeout = None if deadline is None else max(30.0, deadline - time.time() + grace)
    try:
        rc = subprocess.run(cmd, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    return {"kind": kind, "rc": rc, "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        sys.exit(worker_main(args))
    areas = plans.resolve_areas(args.only)
    plan = make_plan(args)
    out = Path(args.out)
    stamp = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
    parts_dir = out / f"parts-{stamp}"
    deadline = time.time() + args.budget_s if args.budget_s else None
    kinds = [
        k
        for k, names in (("torch", plans.TORCH_AREAS), ("jax", plans.JAX_AREAS))
        if any(a in names for a in areas)
    ]
    workers = []
    for kind in kinds:
        part = parts_dir / f"{kind}.json"
        if args.inprocess:
            t0 = time.perf_counter()
            wargs = parse_args([*argv, "--worker", kind, "--part", str(part)])
            wargs.deadline = deadline
            worker_main(wargs)
            workers.append({"kind": kind, "rc": 0, "wall_s": time.perf_counter() - t0})
        else:
            workers.append(_spawn(argv, kind, part, deadline, args.grace_s))
    measurements, area_wall = [], {}
    for kind in kinds:
        part = parts_dir / f"{kind}.json"
        if part.exists():
            body = json.loads(part.read_text())
            measurements += body["measurements"]
            area_wall.update(body.get("area_wall_s", {}))
    targets = report.finalize(measurements)
    device = next(
        (
            m["device"]
            for m in measurements
            if m.get("device") and m["device"].get("backend") != "torch"
        ),
        None,
    ) or next((m["device"] for m in measurements if m.get("device")), {"kind": "unknown"})
    result = {
        "command": command_line()
        if argv == sys.argv[1:]
        else " ".join(["python", "-m", "benchmarks.run", *argv]),
        "date": now_iso(),
        "device": device,
        "versions": versions(),
        "preset": plan.preset,
        "areas": areas,
        "plan": plan.to_dict(),
        "workers": workers,
        "area_wall_s": area_wall,
        "measurements": measurements,
        "targets": targets,
        "summary": report.summary(measurements),
        "notes": {
            "timing": "median of per-call wall times after warm-up, each call synchronised "
            "with the device (jax.block_until_ready / torch.cuda.synchronize)",
            "memory": "JAX: compiled.memory_analysis() (argument + output - alias + temp); "
            "torch: torch.cuda.max_memory_allocated, reset per config",
            "mfu": "achieved FLOP/s / bf16 matmul peak measured in this run (peak/matmul/bf16)",
            "extrapolated": "one-at-a-time grids time a subset of models; total_s_estimate = "
            "per-model median x K",
        },
    }
    path = out / f"{stamp}-{device_label(device)}.json"
    dump(result, path)
    print(report.table(measurements, targets))
    print(
        "\nwall time per area (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in area_wall.items())
        + " | workers: "
        + ", ".join(f"{w['kind']} {w['wall_s']:.0f} s (rc {w['rc']})" for w in workers)
    )
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
