"""HF CLIP configs and state dicts -> :class:`~llora_jax.backbones.clip.CLIP` modules and params.

Accepted checkpoints (HF key layout):

* ``CLIPModel``: ``vision_model.*``, ``text_model.*``, ``visual_projection.weight``,
  ``text_projection.weight``, ``logit_scale``;
* ``CLIPVisionModelWithProjection``: ``vision_model.*`` + ``visual_projection.weight``;
* ``CLIPVisionModel``: ``vision_model.*`` (hub, transformers 4) or bare ``embeddings.*``,
  ``encoder.*``, ... (saved by transformers 5); same for the text-only models.

Whether a tower-only checkpoint carries a projection is read from ``config.architectures``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llora_jax import tree as tree_lib
from llora_jax.backbones.clip import CLIP, TextConfig, VisionConfig, init_params

__all__ = ["module_from_hf_config", "params_from_hf", "hf_key_for"]

_TOWERS = ("vision_model", "text_model")


def _vision_config(vc: Any) -> VisionConfig:
    return VisionConfig(
        hidden_size=vc.hidden_size,
        intermediate_size=vc.intermediate_size,
        num_layers=vc.num_hidden_layers,
        num_heads=vc.num_attention_heads,
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        num_channels=vc.num_channels,
        layer_norm_eps=vc.layer_norm_eps,
        hidden_act=vc.hidden_act,
        attention_dropout=float(vc.attention_dropout),
    )


def _text_config(tc: Any) -> TextConfig:
    eos = tc.eos_token_id
    if isinstance(eos, (list, tuple)):
        if len(eos) != 1:
            raise ValueError(f"CLIP text config has eos_token_id={eos}; expected a single id")
        eos = eos[0]
    if eos is None:
        raise ValueError("CLIP text config has no eos_token_id; set it in config.json")
    return TextConfig(
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size,
        num_layers=tc.num_hidden_layers,
        num_heads=tc.num_attention_heads,
        vocab_size=tc.vocab_size,
        max_position_embeddings=tc.max_position_embeddings,
        eos_token_id=int(eos),
        layer_norm_eps=tc.layer_norm_eps,
        hidden_act=tc.hidden_act,
        attention_dropout=float(tc.attention_dropout),
    )


def module_from_hf_config(
    config: Any, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
) -> CLIP:
    """The :class:`CLIP` module for a ``CLIPConfig`` / ``CLIPVisionConfig`` / ``CLIPTextConfig``."""
    model_type = getattr(config, "model_type", None)
    archs = set(getattr(config, "architectures", None) or [])
    kw = {"dtype": dtype, "param_dtype": param_dtype}
    if model_type == "clip":
        return CLIP(
            vision=_vision_config(config.vision_config),
            text=_text_config(config.text_config),
            projection_dim=config.projection_dim,
            use_visual_projection=True,
            use_text_projection=True,
            use_logit_scale=True,
            logit_scale_init=float(config.logit_scale_init_value),
            **kw,
        )
    if model_type == "clip_vision_model":
        proj = "CLIPVisionModelWithProjection" in archs
        return CLIP(
            vision=_vision_config(config),
            text=None,
            projection_dim=config.projection_dim if proj else None,
            use_visual_projection=proj,
            **kw,
        )
    if model_type == "clip_text_model":
        proj = "CLIPTextModelWithProjection" in archs
        return CLIP(
            vision=None,
            text=_text_config(config),
            projection_dim=config.projection_dim if proj else None,
            use_text_projection=proj,
            **kw,
        )
    raise ValueError(
        f"not a CLIP config: model_type={model_type!r}; expected 'clip', 'clip_vision_model' "
        "or 'clip_text_model'"
    )


def _tower_prefixes(state: dict[str, Any], module: CLIP) -> dict[str, str]:
    """HF key prefix of each tower: "vision_model." or "" (tower-only models saved by v5)."""
    prefixes = {}
    for tower in _TOWERS:
        nested = any(k.startswith(tower + ".") for k in state)
        only_tower = (module.vision is None) or (module.text is None)
        prefixes[tower] = tower + "." if nested or not only_tower else ""
    return prefixes


def hf_key_for(path: str, prefixes: dict[str, str] | None = None) -> tuple[str, str]:
    """HF key for a Flax param path, and its layout ("dense", "conv", "plain")."""
    prefixes = prefixes or {t: t + "." for t in _TOWERS}
    parts = path.split("/")
    head = ""
    if parts[0] in _TOWERS:
        head, parts = prefixes[parts[0]], parts[1:]
    parts = [p.replace("layers_", "layers.") if p.startswith("layers_") else p for p in parts]
    leaf, layout = parts[-1], "plain"
    if leaf == "kernel":
        leaf = "weight"
        layout = "conv" if parts[-2] == "patch_embedding" else "dense"
    elif leaf in ("scale", "embedding"):
        leaf = "weight"
    return head + ".".join([*parts[:-1], leaf]), layout


def _to_flax(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "dense":  # torch Linear (out, in) -> (in, out)
        return x.T
    if layout == "conv":  # torch Conv2d (out, in, kh, kw) -> (kh, kw, in, out)
        return x.transpose(2, 3, 1, 0)
    return x


def _hf_shape(shape: tuple, layout: str) -> tuple:
    if layout == "dense":
        return tuple(reversed(shape))
    if layout == "conv":
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def params_from_hf(state: dict[str, Any], config: Any) -> dict:
    """Convert an HF CLIP state dict (numpy arrays) into the Flax params tree.

    Raises ValueError naming the HF key when a tensor is missing, has a shape that does not match
    the config, or when the checkpoint holds weights this config would silently drop.
    """
    module = module_from_hf_config(config)
    expected = tree_lib.flatten(jax.eval_shape(lambda: init_params(module, jax.random.key(0))))
    prefixes = _tower_prefixes(state, module)
    flat, used = {}, set()
    for path, spec in expected.items():
        key, layout = hf_key_for(path, prefixes)
        if key not in state:
            near = sorted(k for k in state if k.split(".")[0] == key.split(".")[0])[:5]
            raise ValueError(
                f"CLIP checkpoint has no tensor {key!r} (needed for parameter {path!r}); "
                f"keys with the same prefix: {near or sorted(state)[:5]}. Is config.json "
                "(model_type / architectures) the one saved with these weights?"
            )
        value = np.asarray(state[key])
        want = _hf_shape(tuple(spec.shape), layout)
        if tuple(value.shape) != want:
            raise ValueError(
                f"CLIP checkpoint tensor {key!r} has shape {tuple(value.shape)}, but the config "
                f"expects {want}; the weights do not belong to this config.json"
            )
        flat[path] = _to_flax(value, layout)
        used.add(key)
    # position_ids are non-persistent buffers that old checkpoints still carry.
    unused = sorted(k for k in state if k not in used and not k.endswith("position_ids"))
    if unused:
        raise ValueError(
            f"CLIP checkpoint has tensors the config does not use: {unused[:10]}. A vision/text-only "
            "checkpoint with a projection needs config.architectures = "
            "['CLIPVisionModelWithProjection'] (or ['CLIPTextModelWithProjection'])"
        )
    return tree_lib.unflatten(flat)
