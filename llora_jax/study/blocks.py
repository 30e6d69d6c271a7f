"""A study of several blocks: one ``StudySpec`` per block (e.g. per rank and adapter arm),
each run by the ordinary runner into its own folder, then collected into one results file.

Blocks that differ in their fine-tuning config (rank, per-task A0) cannot share one spec,
so a grid study (``experiments/capacity``) is a list of blocks. Each block resumes on its
own (finished runs are skipped, finished fusions come from its cache), and the collected
``results.json`` is rewritten after every block, so an interrupted study keeps every
finished block; re-running the same command finishes the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from llora_jax.study import spec as spec_lib
from llora_jax.study.finetune import log
from llora_jax.study.runner import environment, run_study


@dataclasses.dataclass
class Block:
    """One block: its spec, and the labels that place it in the grid (e.g. arm, rank)."""

    spec: spec_lib.StudySpec
    labels: dict

    @property
    def name(self) -> str:
        return self.spec.name


def run_blocks(
    name: str,
    blocks: Sequence[Block],
    out: str | os.PathLike,
    sets: Sequence[str] = (),
    report: Callable[[dict, Path], Path] | None = None,
) -> Path:
    """Run every block (``--set`` items applied to each) into ``out/<block name>``; write
    ``out/results.json`` {"study", environment, "blocks": {name: {"labels", "results"}}}
    after each block and ``report(collected, out)`` at the end. Returns results.json."""
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    names = [b.name for b in blocks]
    if len(set(names)) != len(names):
        raise spec_lib.StudySpecError(f"block names must be distinct, got {names}")
    for b in blocks:  # every spec checked before the first block starts
        spec_lib.set_fields(b.spec, list(sets))
    collected = {"study": name, **environment(), "blocks": {}, "timings_s": {}}
    path = out / "results.json"
    for i, b in enumerate(blocks):
        log(f"block {i + 1}/{len(blocks)}: {b.name} {b.labels}")
        t0 = time.perf_counter()
        got = json.loads(run_study(b.spec, out / b.name).read_text())
        collected["blocks"][b.name] = {"labels": dict(b.labels), "results": got}
        collected["timings_s"][b.name] = time.perf_counter() - t0
        write_json(path, collected)
    if report is not None:
        log(f"report: {report(collected, out)}")
    return path


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON atomically (a temporary sibling, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":"), default=float))
    os.replace(tmp, path)


def block_spec(blocks: Sequence[Block], name: str, form: str) -> spec_lib.StudySpec:
    """The spec of the block called ``name`` (for a study file's ``get_study``)."""
    for b in blocks:
        if b.name == name:
            return b.spec
    raise ValueError(f"no block {name!r} in form {form!r}")


def blocks_main(
    name: str,
    doc: str,
    forms: Sequence[str],
    blocks_of: Callable[[str], list[Block]],
    report: Callable,
    argv: Sequence[str] | None = None,
) -> None:
    """The command line of a block study file: ``FORM --out DIR [--set field=value …]``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("form", choices=forms)
    p.add_argument("--out", required=True, help="output folder (resumes what is there)")
    p.add_argument("--set", action="append", default=[], dest="sets", help="field=value")
    a = p.parse_args(argv)
    run_blocks(f"{name}_{a.form}", blocks_of(a.form), a.out, a.sets, report)
