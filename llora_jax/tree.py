"""Path-named pytree helpers.

Every parameter tree in the project is a nested dict of arrays. A leaf is named
by its keys joined with "/" (e.g. ``encoder/layer_0/attention/self/query/kernel``),
which is how targets are chosen by regex and how task vectors are compared.
All functions are pure: they build new trees and never mutate their inputs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = [
    "PyTree",
    "path_str",
    "flatten",
    "unflatten",
    "select",
    "select_paths",
    "add",
    "sub",
    "scale",
    "weighted_sum",
    "dot",
    "norm",
    "to_vector",
    "cosine",
    "zeros_like",
    "num_params",
    "fingerprint",
    "structure_signature",
]


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path: Iterable[Any]) -> str:
    """Turn a jax key path (or a tuple of names) into "a/b/c"."""
    return "/".join(_key_name(k) for k in path)


def flatten(tree: PyTree) -> dict[str, Any]:
    """Flatten a tree into {"a/b/c": leaf}, in a deterministic (sorted key) order."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): v for p, v in leaves}


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Inverse of :func:`flatten` for nested-dict trees."""
    out: dict = {}
    for name, value in flat.items():
        parts = name.split("/")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {name!r} collides with a leaf at {p!r}")
        if parts[-1] in node:
            raise ValueError(f"duplicate path {name!r}")
        node[parts[-1]] = value
    return out


def select_paths(tree_or_names: PyTree | Iterable[str], patterns: str | Iterable[str]) -> list[str]:
    """Paths whose name matches any regex in ``patterns`` (``re.search``).

    Raises ``ValueError`` when a pattern matches nothing, listing the available
    paths: a misspelled target (``v_porj``) must never silently select nothing.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if isinstance(tree_or_names, Mapping):
        names = list(flatten(tree_or_names))
    else:
        names = list(tree_or_names)
    chosen: list[str] = []
    for pat in patterns:
        rx = re.compile(pat)
        hits = [n for n in names if rx.search(n)]
        if not hits:
            shown = "\n  ".join(names[:200]) + ("\n  ..." if len(names) > 200 else "")
            raise ValueError(
                f"pattern {pat!r} matches no parameter path; check its spelling. "
                f"Available paths ({len(names)}):\n  {shown}"
            )
        chosen.extend(h for h in hits if h not in chosen)
    return [n for n in names if n in chosen]


def select(tree: PyTree, patterns: str | Iterable[str]) -> dict[str, Any]:
    """{path: leaf} for the leaves matching ``patterns`` (raises on a pattern with no match)."""
    flat = flatten(tree)
    return {n: flat[n] for n in select_paths(list(flat), patterns)}


def add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: x + y, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: x - y, a, b)


def scale(a: PyTree, s: Any) -> PyTree:
    return jax.tree.map(lambda x: x * s, a)


def zeros_like(a: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, a)


def stack(trees: list[PyTree]) -> PyTree:
    """The trees stacked leaf by leaf on a new leading axis (n, ...)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def weighted_sum(trees: list[PyTree], weights: Any) -> PyTree:
    """Σ_i w_i · tree_i; ``weights`` may be a traced array (used inside vmap)."""
    if not trees:
        raise ValueError("weighted_sum needs at least one tree")
    return jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs)), *trees)


def dot(a: PyTree, b: PyTree) -> jax.Array:
    """Σ over all leaves of <a, b>, accumulated in float32 (float64 when enabled)."""
    parts = jax.tree.leaves(
        jax.tree.map(lambda x, y: jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)), a, b)
    )
    return sum(parts, jnp.zeros((), jnp.float32))


def norm(a: PyTree) -> jax.Array:
    return jnp.sqrt(dot(a, a))


def to_vector(a: PyTree) -> jax.Array:
    """Concatenate all leaves (flattened, in path order) into one vector."""
    leaves = jax.tree.leaves(a)
    if not leaves:
        return jnp.zeros((0,), jnp.float32)
    return jnp.concatenate([jnp.ravel(x) for x in leaves])


def cosine(a: PyTree, b: PyTree, eps: float = 1e-12) -> jax.Array:
    """Cosine similarity of two trees seen as flat vectors."""
    return dot(a, b) / jnp.maximum(norm(a) * norm(b), eps)


def num_params(a: PyTree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(a)))


def structure_signature(a: PyTree) -> dict[str, list]:
    """{path: [shape..., dtype]}: what two trees must share to be combined."""
    return {
        n: [*np.shape(v), str(np.asarray(v).dtype if not hasattr(v, "dtype") else v.dtype)]
        for n, v in flatten(a).items()
    }


def fingerprint(a: PyTree, hasher: Callable[[], Any] = hashlib.sha256) -> str:
    """A content hash of a tree (paths, shapes, dtypes and bytes).

    Used to tie task vectors to the exact frozen backbone they were trained on.
    """
    h = hasher()
    for name, v in flatten(a).items():
        arr = np.asarray(jax.device_get(v))
        h.update(name.encode())
        h.update(str(arr.shape).encode())
        h.update(str(arr.dtype).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:32]
