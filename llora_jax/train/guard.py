"""The loop's health guard: what happened between two reads of the metrics, judged per run.

The loop reads metrics from the device only every ``log_every`` steps. So that a spike or
a non-finite step between two reads is not missed, ``Interval`` folds every step's
metrics on the device (one tiny jitted op per step, no transfer): the largest gradient
norm and the number of non-finite steps since the last read. At a read, ``Guard.check``
judges each run with ``health.assess`` (the interval's largest norm; any non-finite step,
or non-finite trainable parameters, diverges at once) and raises ``TrainingDiverged``
naming the last healthy step and checkpoint; ``healthy`` tells the loop whether the
current state may be checkpointed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llora_jax.errors import UserError
from llora_jax.train import health

PyTree = Any


class TrainingDiverged(UserError, RuntimeError):
    """Training diverged; only healthy checkpoints are kept (the message names the last)."""


@jax.jit
def _fold(acc: dict, metrics: dict) -> dict:
    return {
        "grad_norm_max": jnp.maximum(acc["grad_norm_max"], metrics["grad_norm"]),
        "nonfinite": acc["nonfinite"] + metrics["nonfinite"],
    }


def _params_finite(trainable: PyTree, stacked: bool) -> jax.Array:
    """Per run: are all trainable values finite? (shape (R,) when stacked, else ())."""
    leaves = jax.tree.leaves(trainable)
    if not leaves:
        return jnp.asarray(True)
    if stacked:
        return jnp.stack([jnp.isfinite(x).reshape(x.shape[0], -1).all(1) for x in leaves]).all(0)
    return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all()


_params_finite_jit = jax.jit(_params_finite, static_argnums=1)


class Interval:
    """The largest gradient norm and the non-finite count since the last ``take``."""

    def __init__(self) -> None:
        self._acc: dict | None = None

    def add(self, metrics: dict) -> None:
        first = {"grad_norm_max": metrics["grad_norm"], "nonfinite": metrics["nonfinite"]}
        self._acc = first if self._acc is None else _fold(self._acc, metrics)

    def take(self) -> dict:
        acc, self._acc = self._acc, None
        return acc


class Guard:
    """Health of each of R runs across the reads of one ``fit``."""

    def __init__(
        self, rule: health.HealthRule, dirs: Sequence[Path], rates: Sequence[float], start: int
    ) -> None:
        self.rule, self.dirs, self.rates = rule, list(dirs), list(rates)
        self.states = [health.HealthState() for _ in dirs]
        # The checkpoint the run resumed from was healthy when it was saved.
        self.last_checkpoint: int | None = start or None
        self.healthy: list[bool] = [True] * len(dirs)

    def check(
        self, step: int, metrics: dict, interval: dict, trainable: PyTree, stacked: bool
    ) -> None:
        """Judge ``step`` for every run (``metrics``/``interval``: host arrays of shape (R,))."""
        finite = np.atleast_1d(np.asarray(_params_finite_jit(trainable, stacked)))
        for i in range(len(self.dirs)):
            bad = int(np.atleast_1d(interval["nonfinite"])[i]) > 0
            loss = math.nan if bad else float(metrics["loss"][i])
            norm = float(np.atleast_1d(interval["grad_norm_max"])[i])
            verdict, self.states[i] = health.assess(
                self.rule, self.states[i], step, loss, norm, params_finite=bool(finite[i])
            )
            self.healthy[i] = verdict == health.HEALTHY
            if verdict == health.DIVERGED:
                raise TrainingDiverged(f"{self.dirs[i]}: {self._message(i)}")

    def _message(self, i: int) -> str:
        has_ckpt = self.last_checkpoint is not None and len(self.dirs) == 1
        return health.divergence_message(
            self.states[i],
            learning_rate=self.rates[i],
            last_healthy_checkpoint=self.last_checkpoint if has_ckpt else None,
            checkpoint_dir=str(self.dirs[i] / "checkpoints") if has_ckpt else None,
        )

    @property
    def all_healthy(self) -> bool:
        return all(self.healthy)
