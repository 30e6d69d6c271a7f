"""Image preprocessing for CLIP, in numpy + PIL (no torch, no jax).

``mode="clip"`` reproduces transformers' ``CLIPImageProcessor`` as it runs without torchvision
(its PIL backend, ``CLIPImageProcessorPil``): resize the shortest side to ``image_size`` with PIL
bicubic on the uint8 image, center crop ``image_size``, rescale by 1/255, normalise with the
OpenAI CLIP mean/std. Same operations, order and dtypes, so the output equals HF's exactly on
uint8 input (measured max abs diff 0.0; the tests allow 1e-6). With torchvision installed HF
switches to a torch backend whose bicubic/antialias resize differs slightly (not checked here).

``mode="resize"`` is the L-LoRA paper's variant: resize to ``image_size`` x ``image_size``
(default PIL bilinear, as torchvision's ``Resize`` on PIL images), rescale to [0, 1], no
normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = ["CLIP_MEAN", "CLIP_STD", "preprocess_images", "MODES"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODES = ("clip", "resize")

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_DEFAULT_RESAMPLE = {"clip": "bicubic", "resize": "bilinear"}


def _to_rgb(img: np.ndarray, index: int) -> np.ndarray:
    """(H, W[, C]) uint8 -> (H, W, 3) uint8; alpha is composited onto white like HF."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(
            f"image {index} has dtype {img.dtype}; preprocess_images expects uint8 pixels (0..255)"
        )
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"image {index} has shape {img.shape}; expected (H, W), (H, W, 1), (H, W, 3) or "
            "(H, W, 4) channels-last"
        )
    if img.shape[-1] == 1:
        return np.repeat(img, 3, axis=-1)
    if img.shape[-1] == 4:
        alpha = img[..., 3:4] / 255
        return np.round(alpha * img[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return img


def _resize(img: np.ndarray, height: int, width: int, resample: str) -> np.ndarray:
    if img.shape[:2] == (height, width):
        return img
    return np.asarray(Image.fromarray(img).resize((width, height), resample=_RESAMPLE[resample]))


def _shortest_side(img: np.ndarray, size: int) -> tuple[int, int]:
    # Same integer rule as HF get_resize_output_image_size(default_to_square=False).
    h, w = img.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return (new_long, size) if w <= h else (size, new_long)


def _center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if h < size or w < size:  # cannot happen after a shortest-side resize to `size`
        raise ValueError(f"image of size {(h, w)} is smaller than the crop {size}")
    top, left = (h - size) // 2, (w - size) // 2
    return img[top : top + size, left : left + size]


def preprocess_images(
    images: np.ndarray | Sequence[np.ndarray],
    image_size: int = 224,
    mode: str = "clip",
    *,
    resample: str | None = None,
) -> np.ndarray:
    """uint8 images (an (N, H, W[, C]) array or a list of (H, W[, C]) arrays of any sizes)
    -> float32 (N, image_size, image_size, 3) NHWC pixel values for ``CLIP.encode_image``.

    ``mode="clip"``: HF ``CLIPImageProcessor`` (shortest side, center crop, CLIP mean/std);
    ``mode="resize"``: the paper's square resize to [0, 1] without normalisation.
    ``resample`` overrides the filter ("nearest", "bilinear", "bicubic", "lanczos").
    """
    if mode not in MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; valid modes: {', '.join(MODES)}")
    resample = resample or _DEFAULT_RESAMPLE[mode]
    if resample not in _RESAMPLE:
        raise ValueError(f"unknown resample filter {resample!r}; valid: {sorted(_RESAMPLE)}")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if isinstance(images, np.ndarray) and images.ndim not in (3, 4):
        # A 3-d array is read as N grayscale images, never as one (H, W, C) image.
        raise ValueError(
            f"images has shape {images.shape}; pass a batch (N, H, W[, C]) or a list of "
            "(H, W[, C]) arrays"
        )
    out = np.empty((len(images), image_size, image_size, 3), np.float32)
    mean = np.asarray(CLIP_MEAN, np.float32)
    std = np.asarray(CLIP_STD, np.float32)
    for i, img in enumerate(images):
        img = _to_rgb(img, i)
        if mode == "clip":
            img = _resize(img, *_shortest_side(img, image_size), resample)
            img = _center_crop(img, image_size)
        else:
            img = _resize(img, image_size, image_size, resample)
        # float64 multiply then float32, exactly as HF's rescale.
        x = (img.astype(np.float64) * (1 / 255)).astype(np.float32)
        out[i] = (x - mean) / std if mode == "clip" else x
    return out
