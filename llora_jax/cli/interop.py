"""``llora import-peft / export-peft / export-hf``: adapters in and out of llora-jax.

  llora import-peft SRC... --backbone B --out DIR [--force] [--tower vision_model]
                    [--config configs/clip.py[:arg] [--tasks t1,...] [--set k=v ...]]
                    [--overwrite]
      one task vector per adapter (PEFT LoRA -> delta_w; FusionBench L-LoRA -> l_lora;
      an adapter exported by llora-jax -> its own task vector). With --config, each lands
      in a run directory DIR/<task>/{config.json, task_vector/} that `llora fuse` (and
      `make fuse RUNS=...`) evaluates: the config names the task's data and readout.
  llora export-peft TV... --out DIR [--fusion NAME [--hparam k=v ...]] [--backbone B]
  llora export-hf   TV... --out DIR [--fusion NAME [--hparam k=v ...]] [--backbone B]
      a task vector (task-vector or run directory) or, with several and --fusion, their
      merge, as a PEFT adapter directory / an HF checkpoint directory.

Thin: parsing only; the work is ``llora_jax.interop.api``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

from llora_jax.backbones.hf import load_backbone
from llora_jax.errors import UserError
from llora_jax.interop import api
from llora_jax.interop.peft_config import PeftImportError
from llora_jax.interop.peft_export import ExportError
from llora_jax.study.finetune import load_config
from llora_jax.task_vectors import TaskVectorError
from llora_jax.types import METHODS

COMMANDS = ("import-peft", "export-peft", "export-hf")
# Errors a user can cause and fix; their message says how: one line, no traceback.
USER_ERRORS = (
    UserError,
    PeftImportError,
    ExportError,
    TaskVectorError,
    FileExistsError,
    FileNotFoundError,
    ValueError,  # the interop functions' checks (names, shapes, kinds) say what to change
)


def _parser(cmd: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"llora {cmd}")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    if cmd == "import-peft":
        p.add_argument("srcs", nargs="+", metavar="SRC", help="adapter directories or hub ids")
        p.add_argument("--backbone", required=True, help="HF model directory or hub id")
        p.add_argument(
            "--force", action="store_true", help="accept another base_model_name_or_path"
        )
        p.add_argument("--tower", default="vision_model", help="CLIP tower of prefix-less keys")
        p.add_argument("--config", help="configs/<model>.py[:arg]: write run directories")
        p.add_argument("--tasks", default="", help="task names, one per SRC (default: dir names)")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            help="with --config: a config field, key=value (e.g. data.source=hf); repeatable",
        )
    else:
        p.add_argument("tvs", nargs="+", metavar="TV", help="task-vector or run directories")
        p.add_argument("--backbone", help="default: the task vector's base_model")
        p.add_argument("--fusion", help="merge several task vectors with this fusion method")
        p.add_argument(
            "--hparam", action="append", default=[], help="fusion hyper-parameter k=v (JSON v)"
        )
    return p


def _key_values(items: Sequence[str], flag: str = "--hparam") -> dict:
    """{key: value} of ``key=value`` items; values are JSON where they parse, else strings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} {item!r}: expected key=value, e.g. {flag} lam=0.3")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _write_configs(args: argparse.Namespace, names: list[str], paths: list[Path]) -> None:
    """config.json of each imported run: the config file with this backbone and task."""
    path, _, arg = args.config.partition(":")
    overrides = _key_values(args.set, "--set")
    for name, tv_path in zip(names, paths):
        c = load_config(path, arg, overrides)
        c.backbone = args.backbone
        c.task = name
        mode = json.loads((tv_path / "meta.json").read_text()).get("mode")
        # Evaluation follows the task vector's kind (fusion.programs.spec_for); the method
        # only has to be one that builds an experiment.
        c.method = mode if mode in METHODS else "lora"
        target = tv_path.parent / "config.json"
        tmp = target.with_name(f".config-{uuid.uuid4().hex[:8]}.json")
        tmp.write_text(c.to_json_best_effort(indent=2, sort_keys=True))
        os.replace(tmp, target)


def import_peft(args: argparse.Namespace) -> list[Path]:
    names = [t for t in args.tasks.split(",") if t] or None
    if names is not None and len(names) != len(args.srcs):
        raise UserError(f"--tasks names {len(names)} tasks for {len(args.srcs)} adapters")
    if args.config:  # the config (and its --set fields) is checked before any import
        path, _, arg = args.config.partition(":")
        if not Path(path).is_file():
            raise UserError(f"--config {args.config}: no such config file (e.g. configs/clip.py)")
        try:
            load_config(path, arg, _key_values(args.set, "--set"))
        except KeyError as e:
            raise UserError(f"--set: {e.args[0]}") from None
    elif args.set:
        raise UserError("--set sets fields of --config; pass --config=configs/<model>.py")
    bb = load_backbone(args.backbone)
    paths = api.import_peft(
        args.srcs,
        bb,
        args.out,
        force=args.force,
        tower=args.tower,
        overwrite=args.overwrite,
        names=names,
        leaf="task_vector" if args.config else "",
    )
    if args.config:
        _write_configs(args, [p.parent.name for p in paths], paths)
    for p in paths:
        print(f"task vector: {p}")
    return paths


def export(cmd: str, args: argparse.Namespace) -> Path:
    if len(args.tvs) > 1 and not args.fusion:
        raise UserError(f"{cmd}: {len(args.tvs)} task vectors need --fusion NAME to merge them")
    if args.fusion:
        tv = api.merge_task_vectors(args.tvs, args.fusion, _key_values(args.hparam))
    else:
        tv = api.resolve_task_vector(args.tvs[0])
    fn = api.export_peft if cmd == "export-peft" else api.export_hf
    out = fn(tv, args.out, backbone=args.backbone, overwrite=args.overwrite)
    print(f"{cmd}: {out}")
    return out


def main(argv: Sequence[str]) -> int:
    """``argv``: the command and its arguments (``sys.argv[1:]``). Returns the exit status."""
    cmd, rest = argv[0], list(argv[1:])
    if cmd not in COMMANDS:
        raise SystemExit(f"unknown command {cmd!r}; interop commands: {', '.join(COMMANDS)}")
    args = _parser(cmd).parse_args(rest)
    try:
        if cmd == "import-peft":
            import_peft(args)
        else:
            export(cmd, args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
