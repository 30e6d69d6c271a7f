"""Host-side cost of streaming variable-size JPEGs through ``data.streaming.make_batch_iterator``.

Measures, on generated JPEGs (sizes uniform in 200-600 x 150-450 px, mean 400 x 300,
smooth content so file sizes are photo-like, written under a temporary directory):

* ``decode_resize``: JPEG decode + RGB + CLIP resize/crop to 224 in one process, as
  images per second of wall time and per CPU-second (the latter does not depend on
  other load on the machine; cores needed = target rate / images per CPU-second);
* ``stream_rss``: one epoch of ``count`` images at batch 128 with ``workers`` worker
  processes, in a fresh subprocess per count; the peak of the summed RSS of the process
  tree (main + workers, sampled every 50 ms) minus the RSS after the iterator is built.

Usage::

    python -m benchmarks.data_bench --counts 5000 20000 --workers 2
    python -m benchmarks.data_bench --stream-one 5000 --workers 2 --root /tmp/jpegs  # (internal)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from PIL import Image

from benchmarks.common import Recorder, measurement

TARGET_IMAGES_PER_S = 2600  # ViT-B/16 LoRA training step on one H100, batch 128


def generate(root: pathlib.Path, count: int, classes: int = 10, seed: int = 0) -> None:
    """``count`` JPEGs in ``root/train/<class>/`` (skipped when already there)."""
    marker = root / f".done-{count}"
    if marker.exists():
        return
    rng = np.random.default_rng(seed)
    for i in range(count):
        d = root / "train" / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        w, h = int(rng.integers(200, 601)), int(rng.integers(150, 451))
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 13, (h, w, 3))
        arr = np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{i:06d}.jpg", quality=90)
    marker.touch()


def tree_rss(proc) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except Exception:  # a worker that just exited
            pass
    return total


def stream_one(root: pathlib.Path, count: int, workers: int, batch: int) -> dict:
    """One epoch over the first ``count`` images; RSS of this process tree."""
    import psutil

    from llora_jax import data
    from llora_jax.data import streaming

    task = data.load_task("bench", "train_full", source=f"folder:{root}")
    task = dataclasses.replace(task, indices=task.indices[:count])
    it = streaming.make_batch_iterator(
        task, batch, seed=0, num_epochs=1, image_size=224, worker_count=workers,
        shard_index=0, shard_count=1,
    )  # fmt: skip
    me = psutil.Process()
    base = tree_rss(me)
    peak, stop = [base], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(me))
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    n = len(next(it)["label"])
    t1, first_rss = time.perf_counter(), tree_rss(me)  # workers started, first batch out
    for b in it:
        n += len(b["label"])
    wall = time.perf_counter() - t0
    stop.set()
    t.join()
    return {
        "count": count,
        "images": n,
        "wall_s": wall,
        "first_batch_s": t1 - t0,
        "steady_images_per_s": (n - batch) / max(time.perf_counter() - t1, 1e-9),
        "base_rss": base,
        "first_batch_rss": first_rss,
        "peak_rss": peak[0],
    }


def decode_rate(root: pathlib.Path, n: int) -> dict:
    from llora_jax.data import images

    paths = sorted(str(p) for p in (root / "train").glob("*/*.jpg"))[:n]
    t0, c0 = time.perf_counter(), time.process_time()
    for p in paths:
        images.decode_resize(p, 224, "clip", "bench")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"n": len(paths), "wall_s": wall, "cpu_s": cpu}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", type=int, nargs="+", default=[5000, 20000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--decode-n", type=int, default=500)
    ap.add_argument("--root", default=None)
    ap.add_argument("--stream-one", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    root = pathlib.Path(a.root or tempfile.gettempdir()) / "llora_data_bench_jpegs"
    if a.stream_one is not None:
        print(json.dumps(stream_one(root, a.stream_one, a.workers, a.batch)))
        return
    generate(root, max(a.counts))
    stamp = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
    out = a.out or f"benchmarks/results/{stamp}-cpu-data.json"
    rec = Recorder(out, device={"platform": "cpu", "kind": "host", "count": os.cpu_count()})
    d = decode_rate(root, a.decode_n)
    per_cpu = d["n"] / d["cpu_s"]
    rec.add(
        measurement(
            "decode_resize_jpeg_224", "data", {"n": d["n"], "size": 224, "resize": "clip"},
            [d["wall_s"] / d["n"]], unit="s/image",
            derived={
                "images_per_wall_s": d["n"] / d["wall_s"],
                "images_per_cpu_s": per_cpu,
                "cores_for_target": TARGET_IMAGES_PER_S / per_cpu,
                "target_images_per_s": TARGET_IMAGES_PER_S,
            },
        )
    )  # fmt: skip
    for count in a.counts:
        cmd = [sys.executable, "-m", "benchmarks.data_bench", "--stream-one", str(count)]
        cmd += ["--workers", str(a.workers), "--batch", str(a.batch), "--root", str(root.parent)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        growth = (r["peak_rss"] - r["base_rss"]) / 2**20
        rec.add(
            measurement(
                f"stream_rss_{count}", "data",
                {"count": count, "workers": a.workers, "batch": a.batch, "size": 224},
                [r["wall_s"]], unit="s/epoch",
                derived={
                    "images": r["images"],
                    "images_per_wall_s": r["images"] / r["wall_s"],
                    "steady_images_per_wall_s": r["steady_images_per_s"],
                    "first_batch_s": r["first_batch_s"],
                    "base_rss_mib": r["base_rss"] / 2**20,
                    "first_batch_rss_mib": r["first_batch_rss"] / 2**20,
                    "peak_rss_mib": r["peak_rss"] / 2**20,
                    "peak_growth_mib": growth,
                    "growth_after_first_batch_mib": (r["peak_rss"] - r["first_batch_rss"]) / 2**20,
                },
            )
        )  # fmt: skip
    print(json.dumps([{m["name"]: m["derived"]} for m in rec.items], indent=1))


if __name__ == "__main__":
    main()
