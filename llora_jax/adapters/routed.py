"""Many adapters in one batch: every example carries its own adapter index.

A *routed bank* stacks N adapters of one base model and one set of target layers,
layer by layer::

    factors:   {path: {"A": (N, d_in, r_max), "B": (N, r_max, d_out), "scale": (N,)}}
    shared_a:  {path: {"A0": (d_in, r), "B": (N, r, d_out), "scale": (N,)}}   (L-LoRA, B0 = 0)
    dense:     {path: {"W": (N, d_in, d_out), "scale": (N,)}}                 (ΔW entries)

Ranks may differ: A is padded with zero columns and B with zero rows up to r_max,
which adds exact zeros (x·0 = 0, 0·b = 0), so the padding changes no output bit.
A batch carries ``ids`` (B,), one bank index per example (−1 = the bare base
model), and every adapted ``nn.Dense`` adds s_id · (x A_id) B_id for that
example. Sequence models: the index is per example, broadcast over its tokens.
Calls whose leading dimension is k·B (T5 label scoring repeats each example's
encoder output k times, ``jnp.repeat``) use each index for k consecutive rows.

Entries (host side, :func:`lora_entry`, :func:`l_lora_entry`, :func:`delta_w_entry`):

* ``lora``: (A, B, s = α/r) as trained.
* ``l_lora`` (per-branch linearization around φ0): y = x W0 + s[(x A0) B + (x (A − A0)) B0].
  With B0 = 0 (the default init) this is the LoRA entry (A0, B): equal to
  x W0 + s·(x A0) B exactly; every such entry of one study shares A0, which the
  ``shared_a`` bank stores once. With B0 ≠ 0 it is the rank-2r entry ([A0, A − A0], [B; B0]).
* merged adapters: a fusion result φ = φ0 + Σ λ τ is one more ``lora``/``l_lora`` entry.
* dense ΔW task vectors: ``delta_w_entry``. Their routed form gathers a full
  d_in × d_out matrix per example and layer: as many FLOPs as the base layer
  and B·d_in·d_out bytes of traffic (at MiniLM size, 4 layers × 384² × 4 B ≈ 0.6 MB
  per example per layer pair), so they are for small banks only. Mixed with factor
  entries, the factors are expanded to ΔW = A B (exact up to float rounding).

The routed mode reuses :func:`llora_jax.adapters.attach.dense_interceptor`: it is
inference only (no adapter dropout, no linearization of the whole model).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from llora_jax.adapters.attach import apply_intercepted, dense_interceptor
from llora_jax.adapters.lora import adapter_layers
from llora_jax.adapters.routed_kernels import KERNELS

PyTree = Any

BANK_KINDS = ("factors", "shared_a", "dense")
IMPLS = ("auto", *KERNELS)
# Implementations each bank kind can run.
IMPLS_OF_KIND = {
    "factors": ("gather", "ragged", "onehot"),
    "shared_a": ("shared_a",),
    "dense": ("dense",),
}
# The one-hot form runs all N adapters on every token; worth it while N·r_max is small
# enough that two dense matmuls of width N·r_max beat a gather (measured on CPU, see
# docs/notes/multi_adapter.md).
ONEHOT_MAX_TOTAL_RANK = 64
# Platforms whose ragged_dot lowers to a grouped kernel (not a dense masked product).
# GPU is unconfirmed (issue 23: read the compiled HLO first); CPU loops over groups.
GROUPED_RAGGED_PLATFORMS: tuple[str, ...] = ("tpu",)


@flax.struct.dataclass
class RoutedBank:
    """N adapters stacked per layer (a pytree; ``kind`` is static)."""

    layers: dict
    kind: str = flax.struct.field(pytree_node=False)

    @property
    def size(self) -> int:
        return int(next(iter(self.layers.values()))["scale"].shape[0])

    @property
    def max_rank(self) -> int:
        lay = next(iter(self.layers.values()))
        return 0 if self.kind == "dense" else int(lay["B"].shape[-2])


# ----------------------------------------------------------------------------- entries


def _np(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x), np.float32)


def lora_entry(phi: PyTree, scale: float) -> dict:
    """One LoRA adapter (or a merged one) as a bank entry {path: {"A", "B", "scale"}}."""
    return {
        path: {"A": _np(lay["A"]), "B": _np(lay["B"]), "scale": float(scale)}
        for path, lay in adapter_layers(phi).items()
    }


def l_lora_entry(phi: PyTree, phi0: PyTree, scale: float) -> dict:
    """An L-LoRA adapter as a bank entry: (A0, B) when B0 = 0, else the exact rank-2r form."""
    layers0 = adapter_layers(phi0)
    out = {}
    for path, lay in adapter_layers(phi).items():
        a0, b0 = _np(layers0[path]["A"]), _np(layers0[path]["B"])
        a, b = _np(lay["A"]), _np(lay["B"])
        if not np.any(b0):
            out[path] = {"A": a0, "B": b, "scale": float(scale)}
        else:
            # s[(x A0) B + (x (A − A0)) B0] = s · x [A0, A − A0] [B; B0]
            out[path] = {
                "A": np.concatenate([a0, a - a0], axis=1),
                "B": np.concatenate([b, b0], axis=0),
                "scale": float(scale),
            }
    return out


def entry(phi: PyTree, *, mode: str, scale: float, phi0: PyTree | None = None) -> dict:
    """A bank entry from an in-memory adapter tree of ``mode`` "lora" or "l_lora"."""
    if mode == "lora":
        return lora_entry(phi, scale)
    if mode == "l_lora":
        if phi0 is None:
            raise ValueError("an l_lora bank entry needs phi0, the adapter's linearization point")
        return l_lora_entry(phi, phi0, scale)
    raise ValueError(
        f"mode {mode!r} cannot be routed: a bank holds 'lora' and 'l_lora' adapters "
        "('l_lora_model' linearizes the whole network, which is no per-layer branch)"
    )


def delta_w_entry(delta_w: dict[str, Any]) -> dict:
    """A dense ΔW task vector {module path: ΔW (d_in, d_out)} as a bank entry."""
    return {path: {"W": _np(dw), "scale": 1.0} for path, dw in delta_w.items()}


def _entry_kind(i: int, entry: dict) -> str:
    kinds = {"W" in lay for lay in entry.values()}
    if len(kinds) != 1:
        raise ValueError(f"bank entry {i} mixes dense ΔW and factor layers; make it one kind")
    return "dense" if kinds.pop() else "factors"


def _as_dense(entry: dict) -> dict:
    return {
        p: lay if "W" in lay else {"W": lay["A"] @ lay["B"], "scale": lay["scale"]}
        for p, lay in entry.items()
    }


def _shares_a(entries: Sequence[dict]) -> bool:
    first = entries[0]
    return all(np.array_equal(e[p]["A"], first[p]["A"]) for e in entries[1:] for p in first)


def _pad(a: np.ndarray, axis: int, size: int) -> np.ndarray:
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return np.pad(a, widths)


def stack(entries: Sequence[dict], kind: str = "auto") -> RoutedBank:
    """Stack entries into a bank (host arrays; ``jax.device_put`` it once).

    ``kind="auto"``: ``dense`` if any entry is a dense ΔW, else ``shared_a`` when every
    entry has the same A per layer (an L-LoRA study with B0 = 0), else ``factors``.
    """
    if not entries:
        raise ValueError("a routed bank needs at least one entry")
    if kind not in ("auto", *BANK_KINDS):
        raise ValueError(f"unknown bank kind {kind!r}; valid: auto, {', '.join(BANK_KINDS)}")
    paths = sorted(entries[0])
    for i, e in enumerate(entries):
        if sorted(e) != paths:
            diff = sorted(set(e) ^ set(paths))
            raise ValueError(
                f"bank entry {i} adapts other layers than entry 0 (e.g. {diff[:3]}); a bank "
                "holds adapters of one base model with the same targets"
            )
    kinds = {_entry_kind(i, e) for i, e in enumerate(entries)}
    if kind == "auto":
        kind = "dense" if "dense" in kinds else ("shared_a" if _shares_a(entries) else "factors")
    if kind != "dense" and "dense" in kinds:
        raise ValueError(f"a {kind!r} bank cannot hold dense ΔW entries; use kind='dense'")
    if kind == "shared_a" and not _shares_a(entries):
        raise ValueError(
            "kind='shared_a' needs every entry to have the same A per layer (L-LoRA adapters "
            "of one study with B0 = 0); these differ, use kind='factors'"
        )
    layers = {}
    for p in paths:
        scale = np.asarray([e[p]["scale"] for e in entries], np.float32)
        if kind == "dense":
            w = np.stack([_as_dense(e)[p]["W"] for e in entries])
            layers[p] = {"W": w, "scale": scale}
            continue
        if kind == "shared_a":
            layers[p] = {
                "A0": entries[0][p]["A"],
                "B": np.stack([e[p]["B"] for e in entries]),
                "scale": scale,
            }
            continue
        r = max(e[p]["A"].shape[1] for e in entries)
        layers[p] = {
            "A": np.stack([_pad(e[p]["A"], 1, r) for e in entries]),
            "B": np.stack([_pad(e[p]["B"], 0, r) for e in entries]),
            "scale": scale,
        }
    return RoutedBank(layers=layers, kind=kind)


def bytes_per_adapter(bank: RoutedBank) -> int:
    """Device bytes one bank slot takes (padded rank; ``shared_a``: B only)."""
    keys = {"factors": ("A", "B"), "shared_a": ("B",), "dense": ("W",)}[bank.kind]
    total = 0
    for lay in bank.layers.values():
        for k in keys:
            total += int(np.prod(lay[k].shape[1:])) * jnp.dtype(lay[k].dtype).itemsize
    return total


# ----------------------------------------------------------------------------- applying


def choose_impl(
    bank: RoutedBank, rows: int, *, distinct: int | None = None, platform: str | None = None
) -> str:
    """The implementation ``impl="auto"`` takes (a static choice: it fixes the program).

    * dense and shared_a banks have one implementation each;
    * ``onehot`` while N·r_max ≤ ONEHOT_MAX_TOTAL_RANK: two plain matmuls with no
      gather or sort beat the other forms when the bank is a handful of adapters;
    * ``ragged`` where ragged_dot has a grouped lowering and the batch is known (host
      side, ``distinct``) to hold few distinct adapters (≤ rows / 4): weights are read
      once per group instead of once per example;
    * else ``gather``: minimum FLOPs and a cost independent of N.
    """
    if bank.kind != "factors":
        return IMPLS_OF_KIND[bank.kind][0]
    if bank.size * bank.max_rank <= ONEHOT_MAX_TOTAL_RANK:
        return "onehot"
    platform = platform or jax.default_backend()
    if distinct is not None and platform in GROUPED_RAGGED_PLATFORMS and 4 * distinct <= rows:
        return "ragged"
    return "gather"


def check_impl(bank: RoutedBank, impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown routed implementation {impl!r}; valid: {', '.join(IMPLS)}")
    if impl != "auto" and impl not in IMPLS_OF_KIND[bank.kind]:
        raise ValueError(
            f"implementation {impl!r} does not run a {bank.kind!r} bank; it runs "
            f"{', '.join(IMPLS_OF_KIND[bank.kind])}"
        )
    return impl


def row_ids(ids: jax.Array, rows: int) -> jax.Array:
    """Per-example ids for a call with ``rows`` leading rows (k consecutive rows each)."""
    b = ids.shape[0]
    if rows == b:
        return ids
    if rows % b:
        raise ValueError(
            f"a routed layer got {rows} rows for a batch of {b} adapter ids; the model must "
            "keep the batch dimension first (or repeat each example k times, jnp.repeat-style)"
        )
    return jnp.repeat(ids, rows // b)


def apply(
    module: nn.Module,
    params: PyTree,
    bank: RoutedBank,
    ids: jax.Array,
    *args: Any,
    impl: str = "auto",
    method: Any = None,
    rngs: dict | None = None,
    **kwargs: Any,
) -> Any:
    """``module.apply`` where example i runs with bank entry ``ids[i]`` (−1: base model)."""
    ids = jnp.asarray(ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"adapter ids must be a 1-D integer array (one per example), got {ids}")
    check_impl(bank, impl)
    if impl == "auto":
        impl = choose_impl(bank, ids.shape[0])
    kernel = KERNELS[impl]

    def delta(path: str, x: jax.Array) -> jax.Array:
        return kernel(bank.layers[path], x, row_ids(ids, x.shape[0]))

    used: set[str] = set()
    return apply_intercepted(
        module,
        params,
        args,
        kwargs,
        interceptor=dense_interceptor(bank.layers, delta, used),
        layer_paths=bank.layers,
        used=used,
        method=method,
        rngs=rngs,
    )


@functools.cache
def apply_fn(module: nn.Module, impl: str = "auto"):
    """``fn((params, bank, ids), *args, method=..., **kw)`` for helpers that take an
    ``apply_fn`` (T5 greedy decoding and label scoring); cached so jit sees one function."""

    def fn(state: tuple, *args: Any, **kwargs: Any) -> Any:
        params, bank, ids = state
        return apply(module, params, bank, ids, *args, impl=impl, **kwargs)

    return fn
