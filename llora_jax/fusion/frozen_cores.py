"""Multi-task fine-tuning of a fused adapter with every core region frozen, and its control.

Step d) of the isolation pipeline (:mod:`llora_jax.fusion.isolation_pipeline`): after the
merge, a short multi-task fine-tuning may adjust the fused adapter, but no element of any
task's core region may move. :func:`freeze` wraps any optax optimizer so that frozen
elements never change, bit for bit, whatever the optimizer does (weight decay included).
The control the claim names is the same fine-tuning *without* isolation, tasks scheduled
in sequence: :func:`sequential_schedule` gives its task order.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llora_jax.fusion.common import PyTree, check_taus

__all__ = ["frozen_union", "zero_frozen", "freeze", "sequential_schedule", "frozen_fraction"]


def frozen_union(masks: Sequence[PyTree]) -> PyTree:
    """The boolean tree of elements that any task's core claims (what :func:`freeze` freezes)."""
    masks = check_taus(masks)
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x, bool) for x in xs]).any(0), *masks)


def zero_frozen(frozen: PyTree) -> optax.GradientTransformation:
    """Replace the updates of frozen elements by −0.0 (stateless).

    −0.0, not +0.0: x + (−0.0) == x bit for bit for every float x, while −0.0 + (+0.0)
    gives +0.0, so a parameter that happens to be −0.0 would change its sign bit.
    """

    def update(updates, state, params=None):
        del params
        new = jax.tree.map(
            lambda u, f: jnp.where(f, jnp.asarray(-0.0, u.dtype), u), updates, frozen
        )
        return new, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def freeze(optimizer: optax.GradientTransformation, frozen: PyTree) -> optax.GradientTransformation:
    """``optimizer`` with the ``frozen`` elements (a boolean tree shaped like the parameters)
    held fixed bit for bit.

    Frozen gradients are zeroed before the optimizer (so global-norm clipping and the Adam
    moments see only trainable elements) and frozen updates after it (so weight decay, which
    adds λ·φ to the update, cannot move them either); ``optax.apply_updates`` then adds −0.0,
    which leaves every float unchanged. (``optax.masked`` would not do: it masks whole leaves
    and passes masked-out updates through untransformed.)
    """
    return optax.chain(zero_frozen(frozen), optimizer, zero_frozen(frozen))


def sequential_schedule(
    n_tasks: int, steps_per_task: int, *, order: Sequence[int] | None = None
) -> np.ndarray:
    """Task index of every step of the control fine-tuning: tasks one after another.

    ``order`` (a permutation of 0..n_tasks−1, default 0, 1, ...): which task trains first;
    each trains for ``steps_per_task`` consecutive steps, shape (n_tasks · steps_per_task,).
    """
    if n_tasks < 1 or steps_per_task < 1:
        raise ValueError(
            f"need n_tasks >= 1 and steps_per_task >= 1, got {n_tasks}, {steps_per_task}"
        )
    order = list(range(n_tasks)) if order is None else [int(i) for i in order]
    if sorted(order) != list(range(n_tasks)):
        raise ValueError(f"order must be a permutation of 0..{n_tasks - 1}, got {order}")
    return np.repeat(np.asarray(order, np.int64), steps_per_task)


def frozen_fraction(frozen: PyTree) -> float:
    """Fraction of elements frozen (for the report)."""
    leaves = [np.asarray(x, bool) for x in jax.tree.leaves(frozen)]
    total = sum(x.size for x in leaves)
    return float(sum(x.sum() for x in leaves) / max(total, 1))
