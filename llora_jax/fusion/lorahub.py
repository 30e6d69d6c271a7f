"""LoraHub-style coefficient search (Huang et al., 2023): one weight per task, gradient-free.

Minimises  objective(w) + l1 · Σ_i |w_i|  over w ∈ [−bounds, bounds]^n with a
nevergrad optimizer (NGOpt by default), ``budget`` evaluations, seeded, starting
at w_i = 1/n (the average; evaluated first). The merged task vector is
Σ_i w_i τ_i at the best *evaluated* w (not the optimizer's extrapolated
recommendation, whose loss nobody measured).

``objective`` is any callable np.ndarray (n,) -> float, typically the
validation loss of the model merged with those weights; it runs on the host,
once per evaluation.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from llora_jax.fusion.common import PyTree, check_taus
from llora_jax.fusion.task_arithmetic import weighted


def _stop_threads(opt: Any, seen: set[int] | None = None) -> None:
    # nevergrad's recast optimizers (e.g. the COBYLA that NGOpt picks for small budgets)
    # run scipy in a thread that only stops when the optimizer is garbage-collected;
    # stop it explicitly so that no thread outlives the search.
    seen = set() if seen is None else seen
    if opt is None or id(opt) in seen:
        return
    seen.add(id(opt))
    thread = getattr(opt, "_messaging_thread", None)
    if thread is not None and hasattr(thread, "stop"):
        thread.stop()
    for name in ("optim", "_optim", "optimizers", "_optimizers"):
        try:
            sub = getattr(opt, name, None)
        except Exception:  # noqa: BLE001 - some properties build lazily and may refuse
            continue
        for s in sub if isinstance(sub, (list, tuple)) else [sub]:
            if hasattr(s, "ask"):
                _stop_threads(s, seen)


def lorahub(
    taus: Sequence[PyTree],
    objective: Callable[[np.ndarray], float],
    *,
    bounds: float = 1.5,
    l1: float = 0.05,
    budget: int = 40,
    seed: int = 0,
    optimizer: str = "NGOpt",
    merge: bool = True,
) -> tuple[PyTree | None, np.ndarray, list[dict]]:
    """Search one coefficient per task; returns (merged τ, best weights, history).

    ``merge=False`` skips building the merged τ (None is returned in its place): a caller
    that evaluates merges from the weights alone needs only ``best weights``.
    ``history`` has one dict per evaluation, in order: ``weights`` (n,),
    ``objective`` (the raw value) and ``loss`` (objective + l1 term, what is
    minimised). A NaN objective counts as +inf.
    """
    taus = check_taus(taus)
    search = LorahubSearch(
        len(taus), bounds=bounds, l1=l1, budget=budget, seed=seed, optimizer=optimizer
    )
    try:
        with quiet():
            while not search.done:
                search.tell(float(objective(search.ask())))
    finally:
        search.close()
    best_w = search.best_weights()
    merged = weighted(taus, best_w.astype(np.float32)) if merge else None
    return merged, best_w, search.history


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Wrap a whole search loop: scipy's COBYLA (inside NGOpt) warns about nevergrad's
    tolerance setting from the optimizer's own thread, at any step."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RHOEND.*")
        yield


class LorahubSearch:
    """One LoraHub search stepped by its caller: ``ask()`` weights, ``tell(objective)``.

    The same sequential search as :func:`lorahub` (which runs one of these), for a caller
    that runs many searches in lockstep — e.g. one per subset of tasks — and evaluates
    their proposals together. Call ``close()`` when done (it stops the optimizer's thread;
    the last ``tell`` of the budget does it too), and wrap the loop in :func:`quiet`.
    """

    def __init__(
        self,
        n: int,
        *,
        bounds: float = 1.5,
        l1: float = 0.05,
        budget: int = 40,
        seed: int = 0,
        optimizer: str = "NGOpt",
    ):
        import nevergrad as ng  # heavy import, only needed here

        if n < 1:
            raise ValueError(f"lorahub needs at least one task vector, got {n}")
        if not bounds > 0:
            raise ValueError(f"lorahub bounds must be > 0, got {bounds}")
        if budget < 1:
            raise ValueError(f"lorahub budget must be >= 1 evaluation, got {budget}")
        if optimizer not in ng.optimizers.registry:
            raise ValueError(
                f"unknown nevergrad optimizer {optimizer!r} (see ng.optimizers.registry)"
            )
        self.bounds, self.l1, self.budget = float(bounds), float(l1), int(budget)
        init = np.full(n, 1.0 / n)
        if 1.0 / n > bounds:
            init = np.full(n, float(bounds))
        # "clipping": a proposal outside the box is evaluated at the nearest point inside
        # it. (nevergrad's default "bouncing" reflects it, which trapped COBYLA, NGOpt's
        # pick for small budgets, in a mirrored optimum in our tests.)
        param = ng.p.Array(init=init).set_bounds(-bounds, bounds, method="clipping")
        param.random_state = np.random.RandomState(seed)
        self._opt = ng.optimizers.registry[optimizer](
            parametrization=param, budget=budget, num_workers=1
        )
        self._opt.suggest(init)
        self._cand: Any = None
        self.history: list[dict] = []

    @property
    def done(self) -> bool:
        return len(self.history) >= self.budget

    def ask(self) -> np.ndarray:
        """The next weights to evaluate (n,), inside the bounds."""
        if self.done:
            raise RuntimeError("this LoraHub search has spent its budget")
        if self._cand is not None:
            raise RuntimeError("tell() the objective of the last ask() before asking again")
        self._cand = self._opt.ask()
        self._w = np.clip(np.asarray(self._cand.value, np.float64), -self.bounds, self.bounds)
        return self._w.copy()

    def tell(self, objective: float) -> None:
        """The raw objective of the last asked weights (NaN counts as +inf)."""
        if self._cand is None:
            raise RuntimeError("ask() before tell()")
        w = self._w
        raw = float(objective)
        loss = raw + self.l1 * float(np.abs(w).sum())
        if math.isnan(loss):
            loss = math.inf
        self._opt.tell(self._cand, loss)
        self._cand = None
        self.history.append({"weights": w, "objective": raw, "loss": loss})
        if self.done:
            self.close()

    def best_index(self) -> int:
        """The evaluation with the lowest loss (the first one on a tie)."""
        if not self.history:
            raise RuntimeError("no evaluation told yet")
        return min(range(len(self.history)), key=lambda i: self.history[i]["loss"])

    def best_weights(self) -> np.ndarray:
        return self.history[self.best_index()]["weights"].copy()

    def close(self) -> None:
        _stop_threads(self._opt)
