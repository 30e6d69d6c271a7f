"""Evaluation: predictions of one model, and of whole grids of merged models at once.

``predict`` runs one model over a dataset in fixed-size batches (the last one
padded, padding dropped from the result; token inputs packed several to a row
for models that support it, else sorted by length and each batch trimmed to its
longest row). ``predict_grid`` evaluates K merged
models — φ0 + Σ_i λ_ki τ_i for a (K, n) coefficient matrix — with one compiled
program: ``chunk`` models vmapped per call, every call dispatched before the
first result is read back.
For ``l_lora_model`` task vectors the outputs are exactly linear in λ, so
``predict_grid_linear`` needs one forward pass and one JVP per task vector,
then only a contraction for any number of merges.
Weight-space task vectors (``delta_w``, spec ``AdapterSpec(DELTA_W)``) merge from a zero
base: the model is W0 + Σ λ ΔW on the adapted kernels, run with no adapter attached.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llora_jax import adapters, forward
from llora_jax import tree as tree_lib
from llora_jax.evaluation.batches import device_batches, gather
from llora_jax.interop.delta_w import KIND as DELTA_W
from llora_jax.interop.delta_w import merged_params
from llora_jax.types import AdapterSpec, TaskModel, functions_key

PyTree = Any
# The backbone run as it is (its weights already merged): "full" with nothing trainable.
_PLAIN = AdapterSpec("full")


def _frozen(tm: TaskModel, phi0: PyTree | None) -> dict:
    return {"params": tm.params, "head": tm.head, "phi0": phi0}


def _bind(tm: TaskModel, frozen: dict) -> TaskModel:
    return dataclasses.replace(tm, params=frozen["params"], head=frozen["head"])


def _outputs(tm: TaskModel, spec: AdapterSpec, trainable: PyTree, frozen: dict, batch) -> dict:
    """The task model's outputs; for ``delta_w`` ``trainable`` is Σ λ ΔW, added onto W0."""
    if spec.method == DELTA_W:
        params = merged_params(frozen["params"], trainable)
        tmx = dataclasses.replace(tm, params=params, head=frozen["head"])
        return forward.forward(tmx, _PLAIN, {}, None, batch)
    return forward.forward(_bind(tm, frozen), spec, trainable, frozen["phi0"], batch)


_PREDICT_FNS: dict = {}


def make_predict_fn(tm: TaskModel, spec: AdapterSpec) -> Callable:
    """jit(trainable, frozen, batch) -> predictions (B,).

    Cached per model functions and spec: the frozen weights and head are arguments,
    so every task model with the same functions reuses one compiled program.
    """
    key = functions_key(tm, spec)
    if key in _PREDICT_FNS:
        return _PREDICT_FNS[key]

    def fn(trainable, frozen, batch):
        return tm.predict(_outputs(tm, spec, trainable, frozen, batch), batch)

    _PREDICT_FNS[key] = jax.jit(fn)
    return _PREDICT_FNS[key]


def predict(
    tm: TaskModel,
    spec: AdapterSpec,
    trainable: PyTree,
    phi0: PyTree | None,
    arrays: dict[str, np.ndarray],
    batch_size: int = 64,
    predict_fn: Callable | None = None,
) -> np.ndarray:
    """Predictions of one model for every example of ``arrays`` (in order)."""
    fn = predict_fn or make_predict_fn(tm, spec)
    return _dispatch(fn, trainable, _frozen(tm, phi0), arrays, batch_size, tm.packable)()


def _dispatch(
    fn: Callable, trainable, frozen, arrays, batch_size: int, pack: bool = False
) -> Callable[[], np.ndarray]:
    """Run ``fn`` on every batch; returns a function that reads the predictions back.

    Every batch is dispatched before any result is read back, so the device never
    waits for the host between batches (nor between models, for a caller that starts
    several before reading any)."""
    batches, n = device_batches(arrays, batch_size, pack)
    outs = [(fn(trainable, frozen, batch), slots) for batch, slots in batches]
    return lambda: gather([(np.asarray(o), s) for o, s in outs], n)


def merged_trainable(base: PyTree, taus: PyTree, lambdas: jax.Array) -> PyTree:
    """base + Σ_i λ_i τ_i with τ stacked on a leading axis (n, ...)."""
    return jax.tree.map(
        lambda b, t: b + jnp.tensordot(lambdas.astype(t.dtype), t, axes=(0, 0)).astype(b.dtype),
        base,
        taus,
    )


_merged_trainable = jax.jit(merged_trainable)


def make_grid_predict_fn(tm: TaskModel, spec: AdapterSpec) -> Callable:
    """jit(base, taus, lambdas (C, n), frozen, batch) -> predictions (C, B).

    ``base`` is φ0 for adapters (θ0 restricted to what trained for ``full``, zeros shaped
    like ΔW for ``delta_w``). The C
    merged models are vmapped; ``GridEvaluator`` calls it one chunk of C models at a
    time, so memory stays bounded and grids of any size share one compiled program.
    """

    def one(base, taus, lam, frozen, batch):
        trainable = merged_trainable(base, taus, lam)
        return tm.predict(_outputs(tm, spec, trainable, frozen, batch), batch)

    return jax.jit(jax.vmap(one, in_axes=(None, None, 0, None, None)))


def predict_grid(
    tm: TaskModel,
    spec: AdapterSpec,
    base: PyTree,
    phi0: PyTree | None,
    taus: list[PyTree],
    lambdas: np.ndarray,
    arrays: dict[str, np.ndarray],
    batch_size: int = 64,
    chunk: int = 8,
) -> np.ndarray:
    """Predictions (K, N) of the K merged models base + Σ λ_ki τ_i, in one program per batch.

    Evaluates every model directly (no linear shortcut). To evaluate K arbitrary
    merged task vectors m_k (TIES, DARE, ...), pass them as ``taus`` with
    ``lambdas`` = the identity matrix.
    """
    ev = GridEvaluator(tm, spec, batch_size, chunk, linear=False)
    return ev.predict(base, phi0, taus, lambdas, arrays)


def make_linear_grid_fn(tm: TaskModel, spec: AdapterSpec) -> Callable:
    """For ``l_lora_model``: jit(phi0, taus, lambdas, frozen, batch) -> predictions (K, B).

    Outputs at φ0 + Σ λ_i τ_i equal f(φ0) + Σ λ_i J τ_i exactly, so the cost is
    one forward, one JVP per task vector and a (K × n) contraction.
    """
    if spec.method != "l_lora_model":
        raise ValueError("the linear shortcut is exact only for l_lora_model task vectors")
    lora_spec = dataclasses.replace(spec, method="lora")

    def fn(phi0, taus, lambdas, frozen, batch):
        tmx = _bind(tm, frozen)

        def outputs(phi):
            return forward.forward(tmx, lora_spec, phi, None, batch)

        y0, jt = adapters.linearize_outputs(outputs, phi0, taus)
        outs = adapters.combine_linear(y0, jt, lambdas)
        return jax.vmap(lambda o: tm.predict(o, batch))(outs)

    return jax.jit(fn)


def predict_grid_linear(
    tm: TaskModel,
    spec: AdapterSpec,
    phi0: PyTree,
    taus: list[PyTree],
    lambdas: np.ndarray,
    arrays: dict[str, np.ndarray],
    batch_size: int = 64,
) -> np.ndarray:
    """Predictions (K, N) of an ``l_lora_model`` merge grid by the exact linear shortcut."""
    ev = GridEvaluator(tm, spec, batch_size, linear=True)
    return ev.predict(phi0, phi0, taus, lambdas, arrays)


# See GridEvaluator.stack_size. A zero vector costs a few multiply-adds per parameter and
# model; another compiled grid program, seconds to a minute on a GPU.
STACK_MULTIPLE = 64


class GridEvaluator:
    """Evaluates merged models of one task model, reusing its compiled programs.

    ``predict(base, phi0, taus, lambdas, arrays)`` -> predictions (K, N) of
    base + Σ λ_ki τ_i; ``l_lora_model`` task vectors take the exact linear
    shortcut. One executable per (chunk, stack size, batch width): grids of
    any K share it.
    """

    def __init__(
        self,
        tm: TaskModel,
        spec: AdapterSpec,
        batch_size: int = 64,
        chunk: int = 8,
        linear: bool | None = None,
    ):
        self.tm, self.spec, self.batch_size, self.chunk = tm, spec, batch_size, chunk
        self.linear = spec.method == "l_lora_model" if linear is None else linear
        self._fn = make_linear_grid_fn(tm, spec) if self.linear else make_grid_predict_fn(tm, spec)

    def stack_size(self, n: int) -> int:
        """The stack that ``n`` task vectors take: the direct path pads it to a multiple of
        ``STACK_MULTIPLE`` zero vectors (zero vectors add nothing to a merge), so grids over
        any number of vectors — every fusion method of a study, the disentanglement grids —
        share one compiled program; the linear shortcut, which pays one JVP per vector, is
        not padded."""
        return n if self.linear else -(-n // STACK_MULTIPLE) * STACK_MULTIPLE

    def stack(self, taus: list[PyTree]) -> PyTree:
        """Task vectors stacked on a leading axis (padded: ``stack_size``), on the device."""
        # One compiled program per stack size; vectors already on the device stay there.
        return stack_vectors(list(taus), self.stack_size(len(taus)) - len(taus))

    def predict(self, *args: Any, **kwargs: Any) -> np.ndarray:
        """``start(...)()``: the (K, N) predictions, read back."""
        return self.start(*args, **kwargs)()

    def start(
        self,
        base: PyTree,
        phi0: PyTree | None,
        taus: list[PyTree] | PyTree,
        lambdas: np.ndarray,
        arrays: dict[str, np.ndarray],
        tm: TaskModel | None = None,
    ) -> Callable[[], np.ndarray]:
        """Dispatch the K merged models base + Σ λ_ki τ_i; returns a function that reads
        their (K, N) predictions back. Start several (e.g. one per task of a merge) before
        reading any.

        ``taus``: a list of task vectors, or ``stack(list)`` to reuse one stack across
        calls; ``tm``: the task model whose frozen weights and head to use (default: the
        evaluator's own); any task model with the same functions and shapes fits."""
        stacked = self.stack(taus) if isinstance(taus, (list, tuple)) else taus
        n_stack = jax.tree.leaves(stacked)[0].shape[0]
        lambdas = np.asarray(lambdas, np.float32)
        if lambdas.ndim != 2 or lambdas.shape[1] > n_stack:
            raise ValueError(f"lambdas must have shape (K, n_tasks), got {lambdas.shape}")
        if isinstance(taus, (list, tuple)) and lambdas.shape[1] != len(taus):
            raise ValueError(f"lambdas must have shape (K, {len(taus)}), got {lambdas.shape}")
        k = lambdas.shape[0]
        if k == 1:
            # One model: the plain predict program (a vmapped grid of one costs ~1.5× it;
            # the linear shortcut one JVP per vector, the plain l_lora_model forward one).
            row = np.zeros(n_stack, np.float32)
            row[: lambdas.shape[1]] = lambdas[0]
            merged = _merged_trainable(base, stacked, jnp.asarray(row))
            model = tm or self.tm
            fn = make_predict_fn(model, self.spec)
            get = _dispatch(
                fn, merged, _frozen(model, phi0), arrays, self.batch_size, model.packable
            )
            return lambda: get()[None]
        # The linear shortcut takes the whole grid in one call (its cost is one forward
        # and one JVP per vector, whatever K); the direct path takes ``chunk`` models per
        # call. K is padded (to a power of two, or a multiple of the chunk) so that grids of
        # different sizes share compiled programs.
        if self.linear:
            step = k_pad = _bucket(k)
        else:
            step = min(_bucket(k), self.chunk)
            k_pad = -(-k // step) * step
        lam = np.zeros((k_pad, n_stack), np.float32)
        lam[:k, : lambdas.shape[1]] = lambdas
        lams = [jnp.asarray(lam[i : i + step]) for i in range(0, k_pad, step)]
        model = tm or self.tm
        frozen = _frozen(model, base if self.linear else phi0)
        batches, n = device_batches(arrays, self.batch_size, model.packable)
        outs = [
            ([self._fn(base, stacked, lm, frozen, batch) for lm in lams], slots)
            for batch, slots in batches
        ]  # all dispatched before the first read-back

        def get() -> np.ndarray:
            rows = [(np.concatenate([np.asarray(o) for o in row])[:k], s) for row, s in outs]
            return gather(rows, n)

        return get


@functools.partial(jax.jit, static_argnums=1)
def stack_vectors(taus: list[PyTree], pad: int = 0) -> PyTree:
    """Task vectors stacked on a leading axis, then ``pad`` zero vectors."""
    return jax.tree.map(
        lambda x: jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]),
        tree_lib.stack(taus),
    )


def _bucket(n: int) -> int:
    """The smallest power of two ≥ n."""
    return 1 << max(n - 1, 0).bit_length()


def predict_merged(
    tm: TaskModel,
    spec: AdapterSpec,
    base: PyTree,
    phi0: PyTree | None,
    taus: list[PyTree],
    lambdas: np.ndarray,
    arrays: dict[str, np.ndarray],
    batch_size: int = 64,
    chunk: int = 8,
) -> np.ndarray:
    """Predictions (K, N) of base + Σ λ_ki τ_i, by the exact linear shortcut when it applies."""
    return GridEvaluator(tm, spec, batch_size, chunk).predict(base, phi0, taus, lambdas, arrays)


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(preds) == np.asarray(labels)))
