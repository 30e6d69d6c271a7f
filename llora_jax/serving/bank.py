"""An adapter bank: any number of adapters on disk, in host RAM lazily, C of them on device.

Three tiers:

* **disk**: task-vector directories (:mod:`llora_jax.task_vectors`), one per adapter;
  only ``meta.json`` is read when the bank is built.
* **host**: an adapter's bank entry (:mod:`llora_jax.adapters.routed`) is read the first
  time a batch needs it, with a fingerprint of its content (``tree.fingerprint``) and a
  stamp of its files (inode, size, mtime).
* **device**: a :class:`~llora_jax.adapters.routed.RoutedBank` of ``capacity`` slots
  (fixed shapes, so one compiled program serves every batch), filled least recently
  used first. A batch whose adapters are not all resident costs one host→device copy
  of the missing ones.

Stale entries: before a batch uses an adapter, its files' stamp is compared with the
one it was read with; if the directory changed (e.g. re-saved), the entry is re-read and
its fingerprint compared with the resident copy's, and a different fingerprint reloads
the slot. Eviction therefore never serves an adapter that no longer matches its files.

A batch that needs more distinct adapters than ``capacity`` is **refused**
(:class:`BankCapacityError`) rather than split here: splitting changes batch shapes and
order, which belongs to the caller. :func:`llora_jax.serving.predict.predict_rows`
groups rows so that no batch exceeds the capacity.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llora_jax import task_vectors
from llora_jax import tree as tree_lib
from llora_jax.adapters import routed
from llora_jax.serving import entries

PyTree = Any


class BankCapacityError(ValueError):
    """A batch needs more distinct adapters than the device cache holds."""


@dataclasses.dataclass
class HostEntry:
    entry: dict
    fingerprint: str
    stamp: tuple | None  # files' identity when read; None for in-memory entries


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    stale_reloads: int = 0
    bytes_copied: int = 0


def _dir_stamp(path: Path) -> tuple:
    """What changes when a task-vector directory is re-saved (an atomic rename)."""
    out = []
    for p in (path / task_vectors.META_FILE, path / "tau"):
        st = os.stat(p)
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class AdapterBank:
    """Named adapters → a device-resident routed bank of ``capacity`` slots (LRU).

    ``sources`` maps a name to a task-vector directory (read lazily) or to a bank entry
    already in memory (``routed.lora_entry`` / ``l_lora_entry`` / ``delta_w_entry``; a
    fusion result is one more entry). ``kind``: the routed bank kind ("auto": shared_a
    when every source is an L-LoRA task vector of one φ0, dense when any in-memory entry
    is a dense ΔW, else factors). ``max_rank``: slot rank (default: the largest rank the
    sources declare; an L-LoRA adapter with B0 ≠ 0 needs twice its rank).
    """

    def __init__(
        self,
        sources: Mapping[str, str | os.PathLike | dict],
        *,
        capacity: int,
        kind: str = "auto",
        max_rank: int | None = None,
        dtype: Any = jnp.float32,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"bank capacity must be >= 1 adapter, got {capacity}")
        if not sources:
            raise ValueError("an adapter bank needs at least one adapter")
        self.capacity = int(capacity)
        self.dtype = jnp.dtype(dtype)
        self._paths: dict[str, Path] = {}
        self._host: dict[str, HostEntry] = {}
        metas = {}
        for name, src in sources.items():
            if isinstance(src, dict):
                self._host[name] = HostEntry(src, tree_lib.fingerprint(src), None)
                continue
            path = Path(src).absolute()
            if not task_vectors.is_task_vector(path):
                raise ValueError(f"adapter {name!r}: {path} is not a task-vector directory")
            self._paths[name] = path
            metas[name] = entries.read_meta(path)
        self.names = tuple(sources)
        self.metas = metas  # task-vector metadata by name (none for in-memory entries)
        self.kind = self._resolve_kind(kind, metas)
        self.max_rank = max_rank or self._declared_max_rank(metas)
        self._slots: collections.OrderedDict[str, tuple[int, str]] = collections.OrderedDict()
        self._device: routed.RoutedBank | None = None
        self.stats = CacheStats()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_task_vectors(
        cls, dirs: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike], **kw: Any
    ) -> AdapterBank:
        """Named by the mapping's keys, or by each directory's name."""
        if not isinstance(dirs, Mapping):
            names = [Path(d).name for d in dirs]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(
                    f"task-vector directories share the names {dup[:3]}; pass a mapping "
                    "{adapter name: directory} to name them apart"
                )
            dirs = dict(zip(names, dirs))
        return cls(dict(dirs), **kw)

    @classmethod
    def from_directory(cls, root: str | os.PathLike, **kw: Any) -> AdapterBank:
        """Every task-vector directory directly under ``root``, named by its folder name."""
        root = Path(root)
        dirs = (
            sorted(p for p in root.iterdir() if task_vectors.is_task_vector(p))
            if root.is_dir()
            else []
        )
        if not dirs:
            raise ValueError(
                f"no task-vector directories under {root} (each holds meta.json and tau/)"
            )
        return cls.from_task_vectors(dirs, **kw)

    def _resolve_kind(self, kind: str, metas: dict) -> str:
        if kind != "auto":
            if kind not in routed.BANK_KINDS:
                raise ValueError(f"unknown bank kind {kind!r}; valid: auto, {routed.BANK_KINDS}")
            return kind
        dense_in_memory = any("W" in lay for h in self._host.values() for lay in h.entry.values())
        if dense_in_memory or any(m.get("adapter_kind") == "delta_w" for m in metas.values()):
            return "dense"
        phi0s = {m.get("phi0_fingerprint") for m in metas.values()}
        modes = {m.get("mode") for m in metas.values()}
        if not self._host and modes == {"l_lora"} and len(phi0s) == 1:
            return "shared_a"
        return "factors"

    def task_of(self, name: str) -> str | None:
        """The task an adapter was trained for (its task vector's ``meta["task"]``)."""
        return self.metas.get(name, {}).get("task")

    def _declared_max_rank(self, metas: dict) -> int:
        ranks = [int(m.get("rank") or 0) for m in metas.values()]
        for h in self._host.values():
            ranks += [lay["A"].shape[1] for lay in h.entry.values() if "A" in lay]
        return max(ranks or [0])

    # ------------------------------------------------------------------ host tier

    def _read(self, name: str) -> HostEntry:
        path = self._paths[name]
        stamp = self._stamp(name)
        entry = entries.cast_entry(
            entries.entry_from_task_vector(task_vectors.load(path)), np.float32
        )
        return HostEntry(entry, tree_lib.fingerprint(entry), stamp)

    def _stamp(self, name: str) -> tuple:
        try:
            return _dir_stamp(self._paths[name])
        except FileNotFoundError as e:
            raise task_vectors.TaskVectorError(
                f"adapter {name!r}: its task vector at {self._paths[name]} is gone ({e.filename})"
            ) from e

    def host_entry(self, name: str) -> HostEntry:
        """The adapter's host copy, re-read if its files changed since it was read."""
        h = self._host.get(name)
        if name in self._paths and (h is None or h.stamp != self._stamp(name)):
            h = self._read(name)
            self._host[name] = h
        return h

    # ------------------------------------------------------------------ device tier

    def _slot_layout(self, entry: dict) -> dict:
        """Zero device arrays of ``capacity`` slots shaped after one entry."""
        layers = {}
        c, dt = self.capacity, self.dtype
        for p, lay in entry.items():
            if self.kind == "dense":
                w = lay["W"] if "W" in lay else lay["A"] @ lay["B"]
                layers[p] = {"W": jnp.zeros((c, *w.shape), dt)}
            else:
                d_in, d_out = lay["A"].shape[0], lay["B"].shape[1]
                r = self.max_rank
                layers[p] = {"B": jnp.zeros((c, r, d_out), dt)}
                if self.kind == "shared_a":
                    layers[p]["A0"] = jnp.asarray(lay["A"], dt)
                else:
                    layers[p]["A"] = jnp.zeros((c, d_in, r), dt)
            layers[p]["scale"] = jnp.zeros((c,), jnp.float32)
        return layers

    def _slot_arrays(self, name: str, entry: dict) -> dict:
        """The entry as one slot's arrays (rank padded exactly, checked against the bank)."""
        out = {}
        for p, lay in entry.items():
            if self.kind == "dense":
                w = lay["W"] if "W" in lay else lay["A"] @ lay["B"]
                out[p] = {"W": w, "scale": lay["scale"]}
                continue
            r = lay["A"].shape[1]
            if r > self.max_rank:
                raise ValueError(
                    f"adapter {name!r} has rank {r} at {p}, above the bank's slot rank "
                    f"{self.max_rank}; build the bank with max_rank={r} or more"
                )
            if self.kind == "shared_a":
                a0 = np.asarray(self._device.layers[p]["A0"], np.float32)
                if not np.array_equal(lay["A"].astype(self.dtype).astype(np.float32), a0):
                    raise ValueError(
                        f"adapter {name!r} does not share the bank's A0 at {p} (another study "
                        "or seed, or B0 != 0); build the bank with kind='factors'"
                    )
                out[p] = {"B": np.pad(lay["B"], ((0, self.max_rank - r), (0, 0)))}
            else:
                out[p] = {
                    "A": np.pad(lay["A"], ((0, 0), (0, self.max_rank - r))),
                    "B": np.pad(lay["B"], ((0, self.max_rank - r), (0, 0))),
                }
            out[p]["scale"] = lay["scale"]
        return out

    def _take_slot(self, keep: set[str]) -> int:
        used = {s for s, _ in self._slots.values()}
        free = [i for i in range(self.capacity) if i not in used]
        if free:
            return free[0]
        for name in self._slots:  # least recently used first
            if name not in keep:
                slot, _ = self._slots.pop(name)
                self.stats.evictions += 1
                return slot
        raise AssertionError("unreachable: the batch fits the capacity")

    def resolve(self, names: Sequence[str | None]) -> tuple[routed.RoutedBank, np.ndarray]:
        """(device bank, per-row slot ids) for a batch naming one adapter (or None) per row."""
        unknown = sorted({n for n in names if n is not None and n not in self.names})
        if unknown:
            raise KeyError(
                f"adapters not in the bank: {unknown[:5]}; the bank has {len(self.names)}"
            )
        needed = list(dict.fromkeys(n for n in names if n is not None))
        if self._device is None:  # slot shapes come from the first adapter
            first = self.host_entry(needed[0] if needed else self.names[0])
            self._device = routed.RoutedBank(layers=self._slot_layout(first.entry), kind=self.kind)
        if len(needed) > self.capacity:
            raise BankCapacityError(
                f"this batch needs {len(needed)} distinct adapters but the device cache holds "
                f"{self.capacity}; split the batch (predict_rows does) or raise capacity"
            )
        load: list[tuple[str, int, HostEntry]] = []
        for name in needed:
            h = self.host_entry(name)
            resident = self._slots.get(name)
            if resident is not None and resident[1] == h.fingerprint:
                self.stats.hits += 1
                self._slots.move_to_end(name)
                continue
            if resident is not None:  # files changed: the resident copy is stale
                self.stats.stale_reloads += 1
                slot = self._slots.pop(name)[0]
            else:
                self.stats.misses += 1
                slot = self._take_slot(set(needed))
            self._slots[name] = (slot, h.fingerprint)
            load.append((name, slot, h))
        if load:
            self._copy_in(load)
        ids = np.asarray([-1 if n is None else self._slots[n][0] for n in names], np.int32)
        return self._device, ids

    def _copy_in(self, load: list[tuple[str, int, HostEntry]]) -> None:
        """One host→device copy of the missing entries, scattered into their slots."""
        arrays = [self._slot_arrays(name, h.entry) for name, _, h in load]
        new = {
            p: {
                k: np.stack([np.asarray(a[p][k], np.float32) for a in arrays]) for k in arrays[0][p]
            }
            for p in arrays[0]
        }
        slots = np.asarray([s for _, s, _ in load], np.int32)
        self.stats.bytes_copied += sum(v.size * self.dtype.itemsize for v in jax.tree.leaves(new))
        self._device = _scatter(self._device, jax.device_put(new), jax.device_put(slots))

    # ------------------------------------------------------------------ reporting

    def memory_report(self) -> dict:
        """Bytes per adapter on device and in the whole cache, and what host RAM holds."""
        per = self.bytes_per_adapter()
        host = sum(
            sum(np.asarray(v).nbytes for v in jax.tree.leaves(h.entry)) for h in self._host.values()
        )
        return {
            "kind": self.kind,
            "dtype": self.dtype.name,
            "capacity": self.capacity,
            "slot_rank": self.max_rank,
            "bytes_per_adapter": per,
            "device_cache_bytes": per * self.capacity,
            "host_entries": len(self._host),
            "host_bytes": int(host),
            "adapters": len(self.names),
        }

    def bytes_per_adapter(self) -> int:
        if self._device is None:
            self.resolve([self.names[0]])
        return routed.bytes_per_adapter(self._device)


@jax.jit
def _scatter(bank: routed.RoutedBank, new: dict, slots: jax.Array) -> routed.RoutedBank:
    layers = {}
    for p, lay in bank.layers.items():
        layers[p] = dict(lay)
        for k, v in new[p].items():
            layers[p][k] = lay[k].at[slots].set(v.astype(lay[k].dtype))
    return routed.RoutedBank(layers=layers, kind=bank.kind)
