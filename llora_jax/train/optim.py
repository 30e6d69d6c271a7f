"""The optimizer of a run: AdamW / Adam / SGD with warm-up and a schedule; the rate is state."""

from __future__ import annotations

import dataclasses

import optax

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adamw"  # "adamw" | "adam" | "sgd"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"  # "cosine" (warm-up + cosine decay) | "constant" (warm-up + constant)
    warmup_steps: int = 0
    total_steps: int = 100
    clip_norm: float | None = 1.0
    grad_accum: int = 1
    b1: float = 0.9
    b2: float = 0.999


def make_optimizer(oc: OptimConfig) -> optax.GradientTransformation:
    """The configured optimizer; its learning rate lives in the optimizer state.

    The schedule's shape (warm-up, cosine/constant) is built with peak 1 and the rate is
    an injected hyper-parameter, so runs that differ only in learning rate (a sweep)
    share one compiled train step. Equals optax.adamw/adam/sgd with the scheduled rate.
    """
    if oc.warmup_steps >= oc.total_steps and oc.warmup_steps > 0:
        raise ValueError(
            f"warmup_steps ({oc.warmup_steps}) must be smaller than the number of steps "
            f"({oc.total_steps})"
        )
    warmup, total = max(oc.warmup_steps, 0), max(oc.total_steps, 1)
    if oc.schedule == "cosine":
        shape = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, total, 0.0)
    elif oc.schedule == "constant":
        shape = (
            optax.join_schedules(
                [optax.linear_schedule(0.0, 1.0, warmup), optax.constant_schedule(1.0)],
                [warmup],
            )
            if warmup > 0
            else optax.constant_schedule(1.0)
        )
    else:
        raise ValueError(f"unknown schedule {oc.schedule!r}; valid: cosine, constant")
    if oc.optimizer == "adamw":
        core = [
            optax.scale_by_adam(b1=oc.b1, b2=oc.b2),
            optax.add_decayed_weights(oc.weight_decay),
        ]
    elif oc.optimizer == "adam":
        core = [optax.scale_by_adam(b1=oc.b1, b2=oc.b2)]
    elif oc.optimizer == "sgd":
        core = []
    else:
        raise ValueError(f"unknown optimizer {oc.optimizer!r}; valid: adamw, adam, sgd")
    clip = [optax.clip_by_global_norm(oc.clip_norm)] if oc.clip_norm else []
    rate = optax.inject_hyperparams(optax.scale)(step_size=-float(oc.learning_rate))
    opt = optax.chain(*clip, *core, optax.scale_by_schedule(shape), rate)
    if oc.grad_accum > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=oc.grad_accum)
    return opt
