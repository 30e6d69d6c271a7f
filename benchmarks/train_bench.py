"""Train-step benchmarks (JAX): step time, throughput, FLOPs, compiled memory.

Cases (model, method, precision, batch) go in compile waves, in plan order (the first
cases matter most): each wave is lowered in the main thread (tracing is Python),
compiled in a small thread pool (XLA compiles outside the GIL), then timed one case
after the other: ``warmup`` steps, then ``repeats`` steps each synchronised with
``jax.block_until_ready`` on the whole new train state. The state is donated, as in
``llora_jax.train``; inputs rotate between two random batches already on the device.
Before a wave starts, its compile time is estimated (from the last wave of the same
model, else ``compile_guess_s``); a wave that would end past the time budget is
skipped and recorded as such, so a run under ``--budget-s`` keeps what it measured.

Dropout bits come from the ``rng_impl`` PRNG ("rbg" by default, as ``llora_jax.train``'s
loop: threefry's bit generation was most of a T5-base step's compile time).

Memory is XLA's buffer assignment of the compiled step (``compiled.memory_analysis()``:
arguments + outputs − donated aliases + temporaries, per device), not a run-time
reading: JAX cannot reset the device's peak counter between configurations in one process.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import flops, models
from benchmarks.common import Recorder, measurement, time_repeated
from llora_jax import forward
from llora_jax.train import optim, sharding
from llora_jax.train import step as train_step

AREA = "train"
# Tiny (CPU test) mode: compile fast, run slow; the programs are small anyway.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# Seconds one train step of a model takes to compile alone on an H100 (rbg dropout), the
# first estimate before a wave of that model has been compiled (seen: CLIP ~30-55 s
# (threefry), T5-base ~104 s with threefry dropout, about 2/3 of it the RNG).
COMPILE_GUESS_S = {"clip": 50.0, "t5": 80.0, "t5l": 150.0}
TINY_COMPILE_GUESS_S = 10.0
CONCURRENCY_SLOWDOWN = 0.1  # each extra concurrent compile lengthens a wave by this fraction
PER_CASE_S = 8.0  # lowering + timing of one case, on top of its compile


@dataclasses.dataclass(frozen=True)
class TrainCase:
    model: str
    method: str
    precision: str
    batch: int
    attention: str = "auto"  # the backbone's attention_impl (see backbones.attention)

    @property
    def name(self) -> str:
        attn = "" if self.attention == "auto" else f"/attn-{self.attention}"
        return f"train/{self.model}/{self.method}/{self.precision}/b{self.batch}{attn}"

    def config(self) -> dict:
        return dataclasses.asdict(self)


def optim_config() -> optim.OptimConfig:
    # The paper's CLIP recipe (AdamW, lr 1e-5, wd 0.1, warm-up, clipping).
    return optim.OptimConfig(
        optimizer="adamw",
        learning_rate=1e-5,
        weight_decay=0.1,
        warmup_steps=10,
        total_steps=10_000,
        clip_norm=1.0,
    )


class Runner:
    """One case: built model, lowered and compiled step, and what it needs to run."""

    def __init__(
        self,
        case: TrainCase,
        built: models.Built,
        lora_dropout: float,
        mesh: Any = None,
        compiler_options: dict | None = None,
        rng_impl: str = "rbg",
        param_shardings: Any = None,
    ):
        """``mesh``: data-parallel over its devices (batch split, everything else replicated);
        ``param_shardings``: the frozen backbone weights' shardings on that mesh (FSDP),
        default replicated."""
        self.case, self.built, self.compiler_options = case, built, compiler_options
        tm = built.tm
        self.spec = models.lora_spec(case.model, case.method, dropout=lora_dropout)
        self.optimizer = optim.make_optimizer(optim_config())
        self.trainable0, phi0 = forward.init_trainable(tm, self.spec, jax.random.key(0))
        self.frozen = {"params": built.params, "head": tm.head, "phi0": phi0}
        arrays = models.synthetic_arrays(case.model, 2 * case.batch, built.shapes, built.config)
        arrays = models.with_weight(arrays)
        batch_sh = sharding.batch_sharding(mesh) if mesh is not None else None
        self.batches = [
            jax.device_put(
                {k: v[i * case.batch : (i + 1) * case.batch] for k, v in arrays.items()}, batch_sh
            )
            for i in range(2)
        ]
        self.rng = jax.random.key(1, impl=rng_impl)
        self.rng_impl = rng_impl
        step = train_step.make_train_step(tm, self.spec, self.optimizer)
        state_shape = jax.eval_shape(
            lambda t: train_step.init_state(t, self.optimizer), self.trainable0
        )
        jit_kw: dict[str, Any] = {"donate_argnums": 0}
        self.state_sh = None
        if mesh is not None:
            repl = sharding.replicated(mesh)
            frozen_sh = jax.tree.map(lambda _: repl, self.frozen)
            if param_shardings is not None:
                frozen_sh["params"] = param_shardings
            self.frozen = jax.device_put(self.frozen, frozen_sh)
            self.state_sh = jax.tree.map(lambda _: repl, state_shape)
            jit_kw.update(
                in_shardings=(self.state_sh, frozen_sh, batch_sh, repl),
                out_shardings=(self.state_sh, repl),
            )
        t0 = time.perf_counter()
        self.lowered = jax.jit(step, **jit_kw).lower(
            state_shape, self.frozen, self.batches[0], self.rng
        )
        self.lower_s = time.perf_counter() - t0
        # FLOPs of the program before optimisation: on GPU the compiled module's cost
        # analysis does not count the cuBLAS custom calls that do the matmuls.
        self.cost_lowered = flops.xla_cost(self.lowered)
        self.compiled = None
        self.compile_s = None
        self.compile_error: str | None = None

    def compile(self) -> Runner:
        t0 = time.perf_counter()
        opts = self.compiler_options
        self.compiled = (
            self.lowered.compile(compiler_options=opts) if opts else (self.lowered.compile())
        )
        self.compile_s = time.perf_counter() - t0
        return self

    def new_state(self) -> dict:
        # Fresh buffers: the step donates its state, and for full fine-tuning the initial
        # trainable tree is the frozen backbone itself.
        fresh = jax.tree.map(lambda x: jnp.array(x, copy=True), self.trainable0)
        return jax.jit(
            lambda t: train_step.init_state(t, self.optimizer), out_shardings=self.state_sh
        )(fresh)

    def time(self, warmup: int, repeats: int) -> tuple[list[float], dict]:
        box = {"state": self.new_state(), "i": 0}

        def once():
            box["i"] ^= 1
            state, metrics = self.compiled(
                box["state"], self.frozen, self.batches[box["i"]], self.rng
            )
            box["state"] = state
            return state, metrics

        samples = time_repeated(once, jax.block_until_ready, warmup=warmup, repeats=repeats)
        _, metrics = once()
        last = jax.device_get(metrics)
        return samples, {k: float(v) for k, v in last.items()}

    def analytic(self) -> dict:
        b = self.built
        n_train = flops.num_params(self.trainable0)
        n_all = flops.num_params(b.params)
        desc = describe(b)
        fl = flops.train_flops(
            desc, self.case.method, self.case.batch, self.spec.lora.rank, n_train
        )
        compute_bytes = 2 if self.case.precision == "bf16" else 4
        frozen_bytes = jnp.dtype(jax.tree.leaves(b.params)[0].dtype).itemsize
        n_frozen = n_all - (n_train if self.case.method == "full" else 0)
        by = flops.train_bytes(
            desc, self.case.batch, n_frozen, frozen_bytes, n_train, compute_bytes
        )
        return {"flops": fl, "bytes_floor": by, "n_trainable": n_train, "n_params": n_all}


def describe(b: models.Built) -> flops.Desc:
    if b.model == "clip":
        return flops.vit_desc(b.module.vision, models.N_CLASSES, b.module.projection_dim)
    return flops.t5_desc(b.module.spec, b.shapes.input_len, b.shapes.target_len)


def _safe_compile(r: Runner) -> Runner:
    try:
        r.compile()
    except Exception:  # noqa: BLE001  (recorded as this case's failure)
        r.compile_error = traceback.format_exc(limit=4)
    return r


def _compile_all(runners: list[Runner], workers: int) -> list[Runner]:
    if workers <= 1 or len(runners) <= 1:
        return [_safe_compile(r) for r in runners]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(_safe_compile, runners))


def wave_sizes(n: int, waves: tuple[int, ...]) -> list[int]:
    """Sizes of the compile waves for ``n`` cases: ``waves`` in order, its last size repeated
    (no waves given: one wave of everything)."""
    if not waves:
        return [n] if n else []
    out, i = [], 0
    while sum(out) < n:
        out.append(min(waves[min(i, len(waves) - 1)], n - sum(out)))
        i += 1
    return out


def estimate_wave_s(
    models: list[str], n: int, workers: int, base_s: dict[str, float], tiny: bool
) -> float:
    """Wall seconds to lower, compile and time a wave of ``n`` cases of ``models``."""
    guess = max(
        base_s.get(m, TINY_COMPILE_GUESS_S if tiny else COMPILE_GUESS_S.get(m, 100.0))
        for m in models
    )
    w = max(1, min(workers, n))
    rounds = math.ceil(n / w)
    return guess * rounds * (1 + CONCURRENCY_SLOWDOWN * (w - 1)) + PER_CASE_S * n


def run(
    cases: list[TrainCase],
    rec: Recorder,
    *,
    tiny: bool,
    warmup: int = 3,
    repeats: int = 20,
    compile_workers: int = 4,
    lora_dropout: float = 0.1,
    keep: tuple[str, ...] = (),
    waves: tuple[int, ...] = (),
    rng_impl: str = "rbg",
    cache: dict | None = None,
) -> dict[str, Runner]:
    """Benchmark ``cases`` wave by wave; returns the runners named in ``keep``.

    ``cache`` (a dict owned by the caller) keeps built models and the per-model compile
    estimates between calls, so a second call reuses the first one's weights.
    """
    cache = {} if cache is None else cache
    built_cache: dict = cache.setdefault("built", {})
    base_s: dict[str, float] = cache.setdefault("compile_base_s", {})
    kept: dict[str, Runner] = {}
    sizes = wave_sizes(len(cases), waves)
    start = 0
    for size in sizes:
        group = cases[start : start + size]
        start += size
        est = estimate_wave_s([c.model for c in group], size, compile_workers, base_s, tiny)
        if not rec.fits(est):
            reason = f"time budget (wave of {size} estimated at {est:.0f} s, "
            rec.skip_all(group, AREA, reason + f"{rec.seconds_left():.0f} s left)")
            continue
        runners = _lower_wave(group, rec, tiny, lora_dropout, rng_impl, built_cache)
        t0 = time.perf_counter()
        runners = _compile_all(runners, compile_workers)
        compile_wall = time.perf_counter() - t0
        w = max(1, min(compile_workers, len(runners)))
        if runners:
            per = compile_wall / (
                math.ceil(len(runners) / w) * (1 + CONCURRENCY_SLOWDOWN * (w - 1))
            )
            for m in {r.case.model for r in runners}:
                base_s[m] = per
        for r in runners:
            if r.compiled is None:
                rec.add(
                    measurement(
                        r.case.name, AREA, r.case.config(), error=f"compile: {r.compile_error}"
                    )
                )
                continue
            rec.guard(
                r.case.name,
                AREA,
                r.case.config(),
                _time_one,
                r,
                rec,
                warmup,
                repeats,
                compile_wall,
                len(runners),
                est,
            )
            if r.case.name in keep:
                kept[r.case.name] = r
            else:  # free the executable (and its device buffers) before the next case
                r.compiled = r.lowered = None
                r.batches = r.frozen = r.trainable0 = None
    return kept


def _lower_wave(group, rec, tiny, lora_dropout, rng_impl, built_cache) -> list[Runner]:
    runners = []
    for case in group:
        model = case.model
        if ("config", model) not in built_cache:
            config = models.hf_config(model, tiny)
            built_cache[("config", model)] = config
            built_cache[("p32", model)] = models.init_params(model, config)
        config, p32 = built_cache[("config", model)], built_cache[("p32", model)]
        dt, pdt = models.dtypes(case.precision, case.method)
        key = (model, str(jnp.dtype(dt)), str(jnp.dtype(pdt)), case.attention)
        try:
            if key not in built_cache:
                built_cache[key] = models.build(
                    model,
                    case.precision,
                    case.method,
                    tiny=tiny,
                    params_f32=p32,
                    config=config,
                    attention=case.attention,
                )
            opts = FAST_COMPILE if tiny else None
            runners.append(
                Runner(
                    case, built_cache[key], lora_dropout, compiler_options=opts, rng_impl=rng_impl
                )
            )
        except Exception as e:  # noqa: BLE001
            rec.add(measurement(case.name, AREA, case.config(), error=f"lowering: {e!r}"))
    return runners


def _time_one(
    r: Runner,
    rec: Recorder,
    warmup: int,
    repeats: int,
    compile_wall: float,
    n_compiled: int,
    wave_estimate_s: float | None = None,
) -> None:
    samples, last = r.time(warmup, repeats)
    a = r.analytic()
    xla = r.cost_lowered
    xla_compiled = flops.xla_cost(r.compiled)
    mem = flops.compiled_memory(r.compiled)
    med = sorted(samples)[len(samples) // 2]
    derived = {
        "examples_per_s": r.case.batch / med,
        "flops_xla": xla["flops"],
        "flops_xla_source": "lowered.cost_analysis() (HLO before optimisation)",
        "flops_xla_compiled": xla_compiled["flops"],
        "bytes_accessed_xla": xla_compiled["bytes_accessed"],
        "flops_analytic": a["flops"]["total"],
        "flops_analytic_parts": a["flops"],
        "bytes_floor_analytic": a["bytes_floor"],
        "n_trainable": a["n_trainable"],
        "n_params": a["n_params"],
        "memory_compiled": mem,
        "memory_source": "compiled.memory_analysis(): argument + output - alias + temp",
        "peak_bytes": mem.get("peak_estimate"),
        "lower_s": r.lower_s,
        "compile_s": r.compile_s,
        "compile_wall_s_all": compile_wall,
        "compiled_together": n_compiled,
        "wave_estimate_s": wave_estimate_s,
        "last_loss": last.get("loss"),
        "nonfinite": last.get("nonfinite"),
        "timing": "per step: wall clock around one call + jax.block_until_ready(new state)",
    }
    if xla["flops"] and a["flops"]["total"]:
        derived["flops_xla_over_analytic"] = xla["flops"] / a["flops"]["total"]
    cfg = {
        **r.case.config(),
        "lora_rank": r.spec.lora.rank,
        "lora_alpha": r.spec.lora.alpha,
        "lora_dropout": r.spec.lora.dropout,
        "rng_impl": r.rng_impl,
        "optimizer": "adamw",
        "warmup": warmup,
        "shapes": dataclasses.asdict(r.built.shapes),
        "param_dtype": str(jax.tree.leaves(r.built.params)[0].dtype),
    }
    rec.add(measurement(r.case.name, AREA, cfg, samples, derived=derived))
