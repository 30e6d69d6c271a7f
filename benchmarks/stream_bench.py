"""The streaming image pipeline feeding the ViT-B/16 LoRA train step (issue 22's last target).

Generated variable-size JPEGs (``data_bench.generate``'s kind: 200-600 x 150-450 px) in an
image folder; ``data.streaming.make_batch_iterator`` decodes and resizes them in grain worker
processes on this host's cores, ``data.prefetch_to_device`` moves each batch to the GPU, and
the compiled CLIP ViT-B/16 LoRA bf16 step consumes it. Measured in alternating rounds:

* ``device``: the same step fed from two device-resident batches (the reference);
* ``stream``: the step fed by the pipeline (no per-step synchronisation);
* ``pipeline``: the pipeline alone (images/s, and per worker process = per host core).

Target: stream / device ≤ 1.02. Needs grain (not in the GPU image: carry its wheels, see
``benchmarks/NOTES.md``, "Issue 22").

    python -m benchmarks.stream_bench --out DIR [--workers 14] [--steps 30] [--rounds 3]
    python -m benchmarks.stream_bench --tiny --out DIR      # CPU smoke test (tiny model)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import tempfile
import time

import jax
import numpy as np

from benchmarks import data_bench, models, train_bench
from benchmarks.common import Recorder, jax_device, measurement
from llora_jax import data
from llora_jax.data import streaming

AREA = "stream"


def _generate_part(root: str, start: int, stop: int, step: int) -> None:
    # data_bench.generate writes ``count`` images from index 0; a strided part per process.
    data_bench.generate(
        pathlib.Path(root) / f"part{start}", len(range(start, stop, step)), seed=start
    )


def generate(root: pathlib.Path, count: int, procs: int) -> pathlib.Path:
    """``count`` JPEGs as ``root/train/<class>/...`` made by ``procs`` processes."""
    marker = root / f".done-{count}"
    if not marker.exists():
        with concurrent.futures.ProcessPoolExecutor(procs) as pool:
            list(
                pool.map(
                    _generate_part,
                    [str(root)] * procs,
                    range(procs),
                    [count] * procs,
                    [procs] * procs,
                )
            )
        for part in sorted(root.glob("part*")):  # one image folder: train/<class>/<part>_<name>
            for f in part.glob("train/*/*.jpg"):
                dest = root / "train" / f.parent.name
                dest.mkdir(parents=True, exist_ok=True)
                f.rename(dest / f"{part.name}_{f.name}")
        marker.touch()
    return root


def _timed_steps(runner, feed, steps: int) -> float:
    """Seconds per step over ``steps`` steps after one warm step, no per-step sync."""
    state = runner.new_state()
    state, _ = runner.compiled(state, runner.frozen, next(feed), runner.rng)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, _ = runner.compiled(state, runner.frozen, next(feed), runner.rng)
    jax.block_until_ready(state)
    return (time.perf_counter() - t0) / steps


def _device_feed(runner):
    i = 0
    while True:
        i ^= 1
        yield runner.batches[i]


def _stream(task, runner, batch: int, workers: int, image_size: int):
    keys = tuple(runner.batches[0])
    it = streaming.make_batch_iterator(
        task,
        batch,
        seed=0,
        image_size=image_size,
        worker_count=workers,
        shard_index=0,
        shard_count=1,
    )
    return it, ({k: b[k] for k in keys} for b in it)


def run(args: argparse.Namespace) -> dict:
    tiny = args.tiny
    batch = 2 if tiny else args.batch
    workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) - 2)
    root = generate(pathlib.Path(args.root), args.images, max(1, min(workers, 16)))
    task = data.load_task("bench", "train_full", source=f"folder:{root}")
    case = train_bench.TrainCase("clip", "lora", "bf16" if not tiny else "fp32", batch)
    runner = train_bench.Runner(case, models.build("clip", case.precision, "lora", tiny=tiny), 0.1)
    runner.compile()
    image_size = int(runner.batches[0]["image"].shape[1])
    rec = Recorder(str(pathlib.Path(args.out) / "stream_bench.json"))
    rec.device = jax_device()
    cfg = {"batch": batch, "workers": workers, "images": args.images, "steps": args.steps,
           "train_case": case.name, "host_cores": os.cpu_count()}  # fmt: skip
    it, feed = _stream(task, runner, batch, workers, image_size)
    # One prefetch thread for everything: two threads must never pull from one generator.
    fed_to_device = data.prefetch_to_device(feed, 2)
    for _ in range(3):  # workers started, buffers filled
        jax.block_until_ready(next(fed_to_device))
    dev, fed, pipe = [], [], []
    for _ in range(args.rounds):
        dev.append(_timed_steps(runner, _device_feed(runner), args.steps))
        fed.append(_timed_steps(runner, fed_to_device, args.steps))
        t0 = time.perf_counter()  # the pipeline alone, batches on the device
        for _ in range(args.steps):
            jax.block_until_ready(next(fed_to_device))
        pipe.append(batch * args.steps / (time.perf_counter() - t0))
    d, s, p = float(np.median(dev)), float(np.median(fed)), float(np.median(pipe))
    derived = {
        "step_s_device": d,
        "step_s_stream": s,
        "rounds_device": dev,
        "rounds_stream": fed,
        "pipeline_images_per_s": p,
        "pipeline_images_per_s_per_worker": p / workers,
        "step_images_per_s_device": batch / d,
        "skipped_corrupt": int(it.skipped),
    }
    m = measurement(f"stream/clip/lora/b{batch}/w{workers}", AREA, cfg, fed, derived=derived)
    m["ratios"]["slowdown_vs_device_batches"] = s / d
    m["ratios"]["headroom_pipeline"] = p / (batch / d)
    rec.add(m)
    rec.flush()
    print(
        json.dumps({"slowdown": s / d, **{k: v for k, v in derived.items() if "rounds" not in k}})
    )
    return m


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stream_bench")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument(
        "--root", default=str(pathlib.Path(tempfile.gettempdir()) / "llora_stream_jpegs")
    )
    p.add_argument("--images", type=int, default=6000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=None, help="default: host cores - 2")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.images, args.steps, args.rounds = min(args.images, 24), min(args.steps, 3), 1
    return run(args)


if __name__ == "__main__":
    main()
