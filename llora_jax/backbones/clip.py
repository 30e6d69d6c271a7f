"""CLIP (vision and text towers) as Linen modules whose parameter paths mirror HF ``CLIPModel``.

Paths: ``vision_model/encoder/layers_0/self_attn/q_proj/kernel``, ``text_model/...``,
``visual_projection/kernel``, ``text_projection/kernel``, ``logit_scale``. A vision-only
checkpoint (``CLIPVisionModel[WithProjection]``) gives the same ``vision_model/...`` paths and no
text tower, so adapters and task vectors are interchangeable between the two.

Accepted HF checkpoints (key layouts):

* ``CLIPModel``: ``vision_model.*``, ``text_model.*``, ``visual_projection.weight``,
  ``text_projection.weight``, ``logit_scale``;
* ``CLIPVisionModelWithProjection``: ``vision_model.*`` + ``visual_projection.weight``;
* ``CLIPVisionModel``: ``vision_model.*`` (hub, transformers 4) or bare ``embeddings.*``,
  ``encoder.*``, ... (saved by transformers 5); the same for the text-only models.
  Whether a tower-only checkpoint has a projection is read from ``config.architectures``.

Images are NHWC float arrays (JAX convention; HF uses NCHW). Tower internals live in
``clip_layers``, the zero-shot head in ``clip_heads``, image preprocessing in
``clip_preprocess``; the public names are re-exported here.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llora_jax import tree as tree_lib
from llora_jax.backbones.clip_heads import (
    PAPER_TEMPLATE,
    PAPER_TEMPLATES,
    build_zeroshot_head,
    zeroshot_logits,
)
from llora_jax.backbones.clip_layers import (
    TextConfig,
    TextTransformer,
    VisionConfig,
    VisionTransformer,
    dense,
)
from llora_jax.backbones.clip_preprocess import CLIP_MEAN, CLIP_STD, preprocess_images

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "VisionConfig",
    "TextConfig",
    "CLIP",
    "init_params",
    "module_from_hf_config",
    "params_from_hf",
    "hf_key_for",
    "build_zeroshot_head",
    "zeroshot_logits",
    "PAPER_TEMPLATE",
    "PAPER_TEMPLATES",
    "preprocess_images",
    "CLIP_MEAN",
    "CLIP_STD",
]

# The paper adapts only the vision tower; the text tower only builds frozen zero-shot heads.
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    r"^vision_model/encoder/layers_\d+/self_attn/q_proj/kernel$",
    r"^vision_model/encoder/layers_\d+/self_attn/v_proj/kernel$",
)


class CLIP(nn.Module):
    """CLIP with optional towers: full ``CLIPModel``, vision-only or text-only.

    ``encode_image`` / ``encode_text`` return projected, unnormalised embeddings (the pooled
    output when the checkpoint has no projection). ``__call__`` follows HF ``CLIPOutput``.
    """

    vision: VisionConfig | None
    text: TextConfig | None
    projection_dim: int | None = None
    use_visual_projection: bool = False
    use_text_projection: bool = False
    use_logit_scale: bool = False
    logit_scale_init: float = 2.6592
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        dt, pdt = self.dtype, self.param_dtype
        if self.vision is not None:
            self.vision_model = VisionTransformer(self.vision, dt, pdt)
        if self.text is not None:
            self.text_model = TextTransformer(self.text, dt, pdt)
        proj = lambda: dense(self.projection_dim, ("embed", None), dt, pdt, bias=False)  # noqa: E731
        if self.use_visual_projection:
            self.visual_projection = proj()
        if self.use_text_projection:
            self.text_projection = proj()
        if self.use_logit_scale:
            init = nn.initializers.constant(self.logit_scale_init)
            self.logit_scale = self.param(
                "logit_scale", nn.with_logical_partitioning(init, ()), (), pdt
            )

    def encode_image(self, pixel_values: jax.Array, *, deterministic: bool = True) -> jax.Array:
        if self.vision is None:
            raise ValueError("this CLIP module has no vision tower (text-only checkpoint)")
        pooled = self.vision_model(pixel_values, deterministic)[1]
        return self.visual_projection(pooled) if self.use_visual_projection else pooled

    def encode_text(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        if self.text is None:
            raise ValueError(
                "this CLIP module has no text tower (vision-only checkpoint); load a full CLIPModel "
                "checkpoint to encode text or build zero-shot heads"
            )
        pooled = self.text_model(input_ids, attention_mask, deterministic)[1]
        return self.text_projection(pooled) if self.use_text_projection else pooled

    def __call__(
        self,
        pixel_values: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> dict[str, jax.Array]:
        """HF ``CLIPModel.forward``: L2-normalised embeddings and scaled cosine logits."""
        if not self.use_logit_scale:
            raise ValueError(
                "this CLIP module has no logit_scale (not a full CLIPModel checkpoint)"
            )
        img = _l2_normalize(self.encode_image(pixel_values, deterministic=deterministic))
        txt = _l2_normalize(
            self.encode_text(input_ids, attention_mask, deterministic=deterministic)
        )
        logits_per_text = jnp.exp(self.logit_scale).astype(txt.dtype) * (txt @ img.T)
        return {
            "image_embeds": img,
            "text_embeds": txt,
            "logits_per_image": logits_per_text.T,
            "logits_per_text": logits_per_text,
        }

    def init_all(
        self, pixel_values: jax.Array | None = None, input_ids: jax.Array | None = None
    ) -> None:
        """Touch every parameter (for ``init``); missing inputs become dummy zeros."""
        if self.vision is not None:
            if pixel_values is None:
                v = self.vision
                pixel_values = jnp.zeros((1, v.image_size, v.image_size, v.num_channels))
            self.encode_image(pixel_values)
        if self.text is not None:
            if input_ids is None:
                input_ids = jnp.zeros((1, min(8, self.text.max_position_embeddings)), jnp.int32)
            self.encode_text(input_ids)
        if self.use_logit_scale:
            _ = self.logit_scale


def _l2_normalize(x: jax.Array) -> jax.Array:
    n = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
    return (x / jnp.maximum(n, 1e-12)).astype(x.dtype)


def init_params(module: CLIP, rng: jax.Array) -> dict:
    """Random parameters (plain arrays, no partitioning boxes) for every tower of ``module``."""
    # Jitted: op-by-op Flax init dispatches hundreds of tiny computations.
    return jax.jit(lambda r: nn.unbox(module.init(r, method=CLIP.init_all))["params"])(rng)


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
