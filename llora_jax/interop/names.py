"""Which HF module is which Linen dense layer, for a loaded backbone.

The Linen backbones mirror HF's module tree (``backbones/*.params_from_hf``):
a Linen path such as ``encoder/layer_0/attention/self/query`` is HF's
``encoder.layer.0.attention.self.query`` with numbered children spelled
``layer_0`` instead of ``layer.0``. CLIP's own mapping (``clip.hf_key_for``)
is reused as is. Every name derived here is checked against the keys of the
backbone's own checkpoint, so a naming rule that does not fit fails loudly
instead of attaching an adapter to the wrong layer.
"""

from __future__ import annotations

import re

import numpy as np

from llora_jax import tree as tree_lib
from llora_jax.backbones import clip
from llora_jax.backbones.hf import Backbone

# Linen spells numbered HF children `layer_0`; only these container names are numbered lists
# (T5's `wi_0` / `wi_1` are plain attribute names and stay as they are).
_NUMBERED = re.compile(r"^(layer|layers|block)_(\d+)$")
CLIP_TOWERS = ("vision_model", "text_model")


def dense_paths(params: dict) -> list[str]:
    """Module paths of every 2-D ``kernel`` (the layers LoRA can adapt)."""
    flat = tree_lib.flatten(params)
    return [
        n[: -len("/kernel")] for n, v in flat.items() if n.endswith("/kernel") and np.ndim(v) == 2
    ]


def _generic_hf_name(path: str) -> str:
    return ".".join(_NUMBERED.sub(r"\1.\2", part) for part in path.split("/"))


def _clip_hf_name(path: str, state_keys: set[str]) -> str:
    prefixes = {
        t: t + "." if any(k.startswith(t + ".") for k in state_keys) else "" for t in CLIP_TOWERS
    }
    key, _ = clip.hf_key_for(path + "/kernel", prefixes)
    return key[: -len(".weight")]


def hf_module_names(backbone: Backbone, state_keys: set[str]) -> dict[str, str]:
    """{Linen module path: HF module name as in the backbone's checkpoint} for every dense layer.

    ``state_keys`` are the tensor names of the backbone's checkpoint; a name is kept with the
    prefix the checkpoint uses (e.g. ``bert.`` or ``vision_model.``).
    """
    out = {}
    for path in dense_paths(backbone.params):
        name = (
            _clip_hf_name(path, state_keys) if backbone.kind == "clip" else _generic_hf_name(path)
        )
        hits = [
            k for k in state_keys if k == name + ".weight" or k.endswith("." + name + ".weight")
        ]
        if len(hits) != 1:
            raise ValueError(
                f"cannot tie Linen layer {path!r} to one tensor of the {backbone.kind} checkpoint "
                f"{backbone.path}: expected a key ending in {name + '.weight'!r}, found {hits[:3]}"
            )
        out[path] = hits[0][: -len(".weight")]
    return out


# Linen leaf name -> HF tensor name (Dense kernel, LayerNorm / RMSNorm scale, Embed table).
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "weight": "weight"}


def hf_param_key(backbone: Backbone, path: str, state_keys: set[str]) -> str:
    """The HF tensor name of any Linen parameter path (checked against ``state_keys``)."""
    if backbone.kind == "clip":
        prefixes = {
            t: t + "." if any(k.startswith(t + ".") for k in state_keys) else ""
            for t in CLIP_TOWERS
        }
        name, _ = clip.hf_key_for(path, prefixes)
    else:
        mod, leaf = path.rsplit("/", 1)
        name = f"{_generic_hf_name(mod)}.{_LEAVES.get(leaf, leaf)}"
    hits = [k for k in state_keys if k == name or k.endswith("." + name)]
    if len(hits) != 1:
        raise ValueError(
            f"Linen parameter {path!r} has no single tensor in the {backbone.kind} checkpoint "
            f"{backbone.path}: looked for a key ending in {name!r}, found {hits[:3]}"
        )
    return hits[0]


def to_hf_layout(path: str, x: np.ndarray) -> np.ndarray:
    """A Linen parameter in torch's layout: Dense kernel (in, out) -> (out, in), conv kernel
    HWIO -> OIHW; everything else (embedding tables, norms, biases) is stored alike."""
    if path.endswith("/kernel") and x.ndim == 2:
        return x.T
    if path.endswith("/kernel") and x.ndim == 4:
        return x.transpose(3, 2, 0, 1)
    return x


def resolve_modules(
    peft_modules: list[str], hf_names: dict[str, str], *, tower: str = "vision_model"
) -> dict[str, str]:
    """{PEFT module name: Linen module path}, or an error naming the modules that fit no layer.

    PEFT names are relative to the model PEFT wrapped, which may be the backbone itself, a
    model with a task head (``bert.encoder…``) or one CLIP tower (``encoder.layers…``, no
    ``vision_model.`` prefix). A name matches an HF name when one ends with the other on a
    dot boundary; for CLIP, tower-less names are looked up in ``tower`` first.
    """
    by_hf = {hf: path for path, hf in hf_names.items()}
    out, missing = {}, []
    for mod in peft_modules:
        candidates = [mod, f"{tower}.{mod}"]
        parts = mod.split(".")
        candidates += [".".join(parts[i:]) for i in range(1, len(parts))]
        hit = next((by_hf[c] for c in candidates if c in by_hf), None)
        if hit is None:  # the backbone's names may carry a prefix the adapter's lack (bert.)
            ends = [p for hf, p in by_hf.items() if hf.endswith("." + mod)]
            hit = ends[0] if len(ends) == 1 else None
        if hit is None:
            missing.append(mod)
        else:
            out[mod] = hit
    if missing:
        raise ValueError(
            f"{len(missing)} adapted modules have no matching dense layer in the backbone, e.g. "
            f"{missing[:3]}; the backbone's layers are named like {sorted(by_hf)[:3]}. "
            "Is the adapter made for this architecture?"
        )
    if len(set(out.values())) != len(out):
        raise ValueError(
            "two adapted modules map to the same backbone layer; the names are ambiguous"
        )
    return out
