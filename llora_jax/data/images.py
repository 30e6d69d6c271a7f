"""Image decoding and host-side resizing for streamed, variable-size image datasets.

Any record value becomes an RGB uint8 HWC array: a numpy array (HW, HW1, HW3, HW4), a
file path, encoded bytes, a ``{"bytes": ..., "path": ...}`` dict (Hugging Face ``Image``
with ``decode=False``) or a PIL image. Every PIL mode (grayscale, palette, RGBA, CMYK,
16-bit) is converted to RGB. A file that PIL cannot decode, or decodes only partially
(truncated), raises :class:`CorruptImageError` naming the file and how to skip it.

Resizing: ``"clip"`` = CLIP's bicubic shortest-side resize to ``size`` then a centre crop
(same geometry as :func:`llora_jax.data.vision.resize_center_crop`); ``"plain"`` = a
bicubic resize to ``size`` x ``size`` (the L-LoRA paper's 224 x 224); ``None`` = keep.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from llora_jax.data.sources import DataError

__all__ = ["CorruptImageError", "RESIZE_MODES", "open_rgb", "resize", "decode_resize"]

RESIZE_MODES = ("clip", "plain", None)
SKIP_HINT = "pass skip_corrupt=True (--config.data.skip_corrupt=True) to skip and count such files"


class CorruptImageError(DataError):
    """An image file that cannot be decoded; the message names it."""


def _describe(value: Any, where: str) -> str:
    if isinstance(value, dict) and value.get("path"):
        return f"{value['path']} ({where})"
    if isinstance(value, str | os.PathLike):
        return str(value)
    return where


def _open(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        arr = value[..., 0] if value.ndim == 3 and value.shape[-1] == 1 else value
        return Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8, copy=False)))
    if isinstance(value, dict):  # Hugging Face Image(decode=False)
        data = value.get("bytes")
        return Image.open(io.BytesIO(data)) if data is not None else Image.open(value["path"])
    if isinstance(value, bytes | bytearray | memoryview):
        return Image.open(io.BytesIO(bytes(value)))
    return Image.open(value)


def open_rgb(value: Any, where: str = "record") -> Image.Image:
    """Decode ``value`` fully and convert it to RGB; corrupt data raises with its name."""
    try:
        img = _open(value)
        img.load()  # decode now: a truncated file fails here, not later in a worker
        if img.mode != "RGB":
            # 16-bit grayscale ("I;16", "I") would clip in convert("RGB"): scale it first.
            if img.mode.startswith("I"):
                arr = np.asarray(img, np.float64)
                img = Image.fromarray((arr * 255.0 / max(arr.max(), 1.0)).astype(np.uint8))
            img = img.convert("RGB")
        return img
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise CorruptImageError(
            f"{_describe(value, where)}: cannot decode the image ({type(e).__name__}: {e}); "
            f"replace or delete the file, or {SKIP_HINT}"
        ) from None


def resize(img: Image.Image, size: int | None, mode: str | None = "clip") -> np.ndarray:
    """RGB uint8 [size, size, 3] (``mode`` "clip" or "plain"), or the image as is."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r} not in {RESIZE_MODES}")
    if mode is None or size is None:
        return np.asarray(img)
    w, h = img.size
    if mode == "plain":
        if (h, w) != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(img)
    if (h, w) == (size, size):
        return np.asarray(img)
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def decode_resize(value: Any, size: int | None, mode: str | None, where: str) -> np.ndarray:
    return resize(open_rgb(value, where), size, mode)
