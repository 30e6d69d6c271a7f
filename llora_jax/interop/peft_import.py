"""Import a Hugging Face PEFT LoRA adapter onto a backbone that llora-jax loads.

A PEFT adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` (or ``adapter_model.bin``) with keys
``base_model.model.<HF module>.lora_A.weight`` (r, in) and ``….lora_B.weight``
(out, r). Here they become llora-jax's adapter tree ``{Linen path: {"A": (in, r),
"B": (r, out)}}`` and a scale (one float, or one per layer when ``rank_pattern`` /
``alpha_pattern`` make layers differ), so that ``adapters.apply(…, scale=…)``
computes exactly what ``peft.PeftModel`` computes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from llora_jax import tree as tree_lib
from llora_jax.adapters.lora import Scale, adapter_layers
from llora_jax.backbones.hf import Backbone, load_state_dict, read_safetensors
from llora_jax.interop import names
from llora_jax.interop.peft_config import (
    PeftImportError,
    check_config,
    layer_rank_alpha,
    layer_scale,
    read_config,
)

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
HUB_PATTERNS = ["adapter_config.json", *WEIGHT_FILES]
# base_model.model.<module>.lora_A.weight (the adapter name is stripped by save_pretrained;
# an old file may still carry it: lora_A.default.weight).
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")


@dataclasses.dataclass(frozen=True)
class ImportedAdapter:
    """A PEFT LoRA adapter as llora-jax adapter parameters."""

    phi: dict  # {Linen path...: {"A": (in, r), "B": (r, out)}} float32 numpy
    scale: Scale  # one float, or {Linen path: s} when layers differ
    modules: dict[str, str]  # PEFT module name -> Linen module path
    config: dict  # adapter_config.json as read
    source: str  # what the user passed (path or hub id)
    weights_file: Path
    sha256: str  # of the weights file
    phi0: dict | None = None  # the linearization point, when the file carries it (L-LoRA)

    @property
    def ranks(self) -> dict[str, int]:
        return {m: int(lay["A"].shape[1]) for m, lay in adapter_layers(self.phi).items()}


def resolve_adapter_dir(src: str | os.PathLike) -> Path:
    """A local adapter directory, or a hub id fetched with ``huggingface_hub`` (adapter files only)."""
    local = Path(os.fspath(src)).expanduser()
    if local.is_dir():
        return local.resolve()
    text = os.fspath(src)
    if local.exists() or text.startswith(("/", ".", "~")) or text.count("/") != 1:
        raise FileNotFoundError(
            f"PEFT adapter {text!r} is not a directory; pass the directory holding "
            "adapter_config.json and adapter_model.safetensors, or a hub id (owner/name)"
        )
    from huggingface_hub import snapshot_download  # optional: only for hub ids

    try:
        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # offline, 404, gated repository, ...
        raise FileNotFoundError(
            f"could not fetch the PEFT adapter {text!r} from the hub ({type(err).__name__}: {err}); "
            f"download it elsewhere (`hf download {text} --local-dir DIR`) and pass DIR"
        ) from err


def _weights(adapter_dir: Path) -> tuple[Path, dict[str, np.ndarray]]:
    for name in WEIGHT_FILES:
        file = adapter_dir / name
        if file.is_file():
            # .bin goes through torch (hf.load_state_dict says how to install it if missing).
            state = (
                read_safetensors(file) if name.endswith(".safetensors") else load_state_dict(file)
            )
            return file, state
    raise FileNotFoundError(
        f"no adapter weights in {adapter_dir}: expected one of {', '.join(WEIGHT_FILES)}"
    )


def sha256_file(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _same_base(a: str, b: str) -> bool:
    def norm(s: str) -> str:
        return s.rstrip("/").rsplit("/", 1)[-1].lower()

    return a.rstrip("/").lower() == b.rstrip("/").lower() or norm(a) == norm(b)


def check_base(cfg: dict, backbone: Backbone, where: str, force: bool) -> None:
    want = cfg.get("base_model_name_or_path")
    if want and not force and not _same_base(str(want), backbone.source):
        raise PeftImportError(
            f"{where}: adapter_config.json field base_model_name_or_path={want!r} does not name "
            f"the loaded backbone {backbone.source!r}; load that model, or pass force=True "
            "(--force) if it is the same model under another name (shapes are checked anyway)"
        )


def _factor_pairs(state: dict[str, np.ndarray], file: Path) -> dict[str, dict[str, np.ndarray]]:
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        m = _KEY.match(key)
        if m is None:
            raise PeftImportError(
                f"{file}: tensor {key!r} is not a lora_A / lora_B weight (DoRA magnitudes, biases, "
                "embedding adapters and saved modules cannot be imported)"
            )
        pairs.setdefault(m["mod"], {})[m["ab"]] = np.asarray(value, np.float32)
    for mod, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise PeftImportError(f"{file}: module {mod!r} has lora_{set('AB') - set(ab)} missing")
    if not pairs:
        raise PeftImportError(f"{file} holds no LoRA weights")
    return pairs


def check_shapes(
    mod: str, a: np.ndarray, b: np.ndarray, kernel_shape: tuple, cfg: dict, where: str
) -> None:
    d_in, d_out = kernel_shape
    r, _ = layer_rank_alpha(cfg, mod)
    if (
        a.ndim != 2
        or b.ndim != 2
        or a.shape != (a.shape[0], d_in)
        or b.shape != (d_out, a.shape[0])
    ):
        raise PeftImportError(
            f"{where}: shape mismatch at {mod!r}: lora_A {a.shape}, lora_B {b.shape}, but the "
            f"backbone layer is {d_in} -> {d_out} (expects lora_A (r, {d_in}), lora_B ({d_out}, r)); "
            "the adapter was made for another model size"
        )
    if a.shape[0] != r:
        raise PeftImportError(
            f"{where}: shape mismatch at {mod!r}: lora_A has rank {a.shape[0]} but "
            f"adapter_config.json (r / rank_pattern) gives r={r}, which PEFT would use for its scale"
        )


def adapter_tree(
    pairs: dict[str, dict[str, np.ndarray]],
    backbone: Backbone,
    cfg: dict,
    where: str,
    *,
    tower: str = "vision_model",
    state_keys: set[str] | None = None,
) -> tuple[dict, Scale, dict[str, str]]:
    """PEFT factors {module: {"A": (r, in), "B": (out, r)}} -> (φ tree, scale, module map).

    Checks every shape against the backbone's kernel (never overridable).
    """
    if state_keys is None:
        state_keys = set(load_state_dict(backbone.path))
    hf_names = names.hf_module_names(backbone, state_keys)
    modules = names.resolve_modules(sorted(pairs), hf_names, tower=tower)
    kernels = tree_lib.flatten(backbone.params)
    flat: dict[str, np.ndarray] = {}
    scales: dict[str, float] = {}
    for mod, path in modules.items():
        a, b = pairs[mod]["A"], pairs[mod]["B"]
        check_shapes(mod, a, b, tuple(np.shape(kernels[path + "/kernel"])), cfg, where)
        flat[path + "/A"] = np.ascontiguousarray(a.T)  # (r, in) -> (in, r)
        flat[path + "/B"] = np.ascontiguousarray(b.T)  # (out, r) -> (r, out)
        scales[path] = layer_scale(cfg, mod)
    distinct = set(scales.values())
    scale: Scale = distinct.pop() if len(distinct) == 1 else scales
    return tree_lib.unflatten(flat), scale, modules


def read_peft_adapter(
    src: str | os.PathLike,
    backbone: Backbone,
    *,
    force: bool = False,
    tower: str = "vision_model",
    state_keys: set[str] | None = None,
) -> ImportedAdapter:
    """Read one PEFT LoRA adapter onto ``backbone``; refuses what it cannot represent exactly.

    ``force`` skips the base-model *name* check (never the shape check). ``tower``: the CLIP
    tower that adapters made on one tower without its prefix belong to. ``state_keys``: the
    backbone checkpoint's tensor names (read from ``backbone.path`` when not given).
    """
    adapter_dir = resolve_adapter_dir(src)
    where = f"PEFT adapter {os.fspath(src)}"
    cfg = read_config(adapter_dir)
    check_config(cfg, where)
    check_base(cfg, backbone, where, force)
    file, state = _weights(adapter_dir)
    pairs = _factor_pairs(state, file)
    phi, scale, modules = adapter_tree(
        pairs, backbone, cfg, where, tower=tower, state_keys=state_keys
    )
    return ImportedAdapter(
        phi=phi,
        scale=scale,
        modules=modules,
        config=cfg,
        source=os.fspath(src),
        weights_file=file,
        sha256=sha256_file(file),
    )


def provenance(adapter: ImportedAdapter) -> dict[str, Any]:
    """What task-vector metadata records about where an imported adapter came from."""
    cfg = adapter.config
    return {
        "source": adapter.source,
        "weights_file": adapter.weights_file.name,
        "sha256": adapter.sha256,
        "revision": cfg.get("revision"),
        "peft_version": cfg.get("peft_version"),
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        "target_modules": cfg.get("target_modules"),
        "use_rslora": bool(cfg.get("use_rslora")),
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "rank_pattern": cfg.get("rank_pattern") or {},
        "alpha_pattern": cfg.get("alpha_pattern") or {},
        "modules": adapter.modules,
    }
