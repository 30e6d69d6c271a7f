"""Vision tasks: class names, CLIP prompt templates, image preprocessing.

Class names follow the label order of the tfds builders (checked in tests against
``tfds.builder(name).info.features["label"].names``). SUN397 and Stanford Cars have
hundreds of classes whose names ship with tensorflow-datasets (offline, no TensorFlow),
so they are read from the builder metadata and cleaned instead of being copied here.

Templates: ``PAPER_TEMPLATE`` is the single prompt of the L-LoRA paper; ``TEMPLATES``
holds the per-dataset ensembles used by the task-arithmetic line of work (CLIP's
zero-shot prompts), written from memory and kept short where unsure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PAPER_TEMPLATE = "a photo of a {c}."

# OpenAI CLIP image statistics (RGB, on [0, 1] pixels).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_DIGITS = tuple(str(i) for i in range(10))

EUROSAT_CLASSES = (
    "annual crop land",
    "forest",
    "brushland or shrubland",
    "highway or road",
    "industrial buildings or commercial buildings",
    "pasture land",
    "permanent crop land",
    "residential buildings or homes or apartments",
    "river",
    "lake or sea",
)

# GTSRB ClassId 0..42 (the official class order), described by what the sign shows.
GTSRB_CLASSES = (
    "20 km/h speed limit",
    "30 km/h speed limit",
    "50 km/h speed limit",
    "60 km/h speed limit",
    "70 km/h speed limit",
    "80 km/h speed limit",
    "end of 80 km/h speed limit",
    "100 km/h speed limit",
    "120 km/h speed limit",
    "no overtaking",
    "no overtaking by trucks",
    "right of way at the next intersection",
    "priority road",
    "yield",
    "stop",
    "no vehicles",
    "no trucks",
    "no entry",
    "general caution",
    "dangerous curve to the left",
    "dangerous curve to the right",
    "double curve",
    "bumpy road",
    "slippery road",
    "road narrows on the right",
    "road work",
    "traffic signals ahead",
    "pedestrian crossing",
    "children crossing",
    "bicycles crossing",
    "ice or snow",
    "wild animals crossing",
    "end of all speed and overtaking limits",
    "turn right ahead",
    "turn left ahead",
    "ahead only",
    "go straight or right",
    "go straight or left",
    "keep right",
    "keep left",
    "roundabout",
    "end of no overtaking",
    "end of no overtaking by trucks",
)

_RESISC45_TFDS = (
    "airplane airport baseball_diamond basketball_court beach bridge chaparral church "
    "circular_farmland cloud commercial_area dense_residential desert forest freeway golf_course "
    "ground_track_field harbor industrial_area intersection island lake meadow medium_residential "
    "mobile_home_park mountain overpass palace parking_lot railway railway_station "
    "rectangular_farmland river roundabout runway sea_ice ship snowberg sparse_residential stadium "
    "storage_tank tennis_court terrace thermal_power_station wetland"
).split()
RESISC45_CLASSES = tuple(n.replace("_", " ") for n in _RESISC45_TFDS)

DTD_CLASSES = tuple(
    (
        "banded blotchy braided bubbly bumpy chequered cobwebbed cracked crosshatched crystalline "
        "dotted fibrous flecked freckled frilly gauzy grid grooved honeycombed interlaced knitted "
        "lacelike lined marbled matted meshed paisley perforated pitted pleated polka-dotted porous "
        "potholed scaly smeared spiralled sprinkled stained stratified striped studded swirly veined "
        "waffled woven wrinkled zigzagged"
    ).split()
)

_NUMBER = ('a photo of the number: "{c}".',)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "sun397": ("a photo of a {c}.", "a photo of the {c}."),
    "cars": (
        "a photo of a {c}.",
        "a photo of the {c}.",
        "a photo of my {c}.",
        "i love my {c}!",
        "a photo of my dirty {c}.",
        "a photo of my clean {c}.",
        "a photo of my new {c}.",
        "a photo of my old {c}.",
    ),
    "resisc45": tuple(
        f"{kind} {view} of {art}{{c}}."
        for art in ("", "a ", "the ")
        for kind in ("satellite", "aerial")
        for view in ("imagery", "photo", "view")
    ),
    "eurosat": (
        "a centered satellite photo of {c}.",
        "a centered satellite photo of a {c}.",
        "a centered satellite photo of the {c}.",
    ),
    "svhn": _NUMBER,
    "gtsrb": (
        'a zoomed in photo of a "{c}" traffic sign.',
        'a centered photo of a "{c}" traffic sign.',
        'a close up photo of a "{c}" traffic sign.',
    ),
    "mnist": _NUMBER,
    "dtd": tuple(
        f"a photo of {art} {{c}} {what}."
        for art in ("a", "the")
        for what in ("texture", "pattern", "thing", "object")
    ),
}

_STATIC_CLASSES: dict[str, tuple[str, ...]] = {
    "resisc45": RESISC45_CLASSES,
    "eurosat": EUROSAT_CLASSES,
    "svhn": _DIGITS,
    "gtsrb": GTSRB_CLASSES,
    "mnist": _DIGITS,
    "dtd": DTD_CLASSES,
}

# Classes whose names come from the tfds builder metadata (shipped with the package).
_TFDS_CLASS_SOURCE = {"sun397": "sun397", "cars": "cars196"}


def _clean_sun397(name: str) -> str:
    # "/a/apartment_building/outdoor" -> "apartment building outdoor"
    parts = name.strip("/").split("/")[1:]
    return " ".join(p.replace("_", " ") for p in parts)


def class_names(task: str) -> tuple[str, ...]:
    """Human-readable class names of a registered vision task, in label order."""
    if task in _STATIC_CLASSES:
        return _STATIC_CLASSES[task]
    if task in _TFDS_CLASS_SOURCE:
        import tensorflow_datasets as tfds  # lazy: only these two need it

        names = tfds.builder(_TFDS_CLASS_SOURCE[task], try_gcs=False).info.features["label"].names
        if task == "sun397":
            return tuple(_clean_sun397(n) for n in names)
        return tuple(names)
    known = sorted([*_STATIC_CLASSES, *_TFDS_CLASS_SOURCE])
    raise KeyError(f"no class names for vision task {task!r}; known: {known}")


def templates(task: str, *, ensemble: bool = True) -> tuple[str, ...]:
    """CLIP prompt templates with a ``{c}`` slot: the dataset ensemble, or the paper's one."""
    if not ensemble:
        return (PAPER_TEMPLATE,)
    return TEMPLATES.get(task, (PAPER_TEMPLATE,))


def prompts(class_names_: Sequence[str], templates_: Sequence[str]) -> list[list[str]]:
    """``[class][template]`` prompt strings, ready for a text tower."""
    return [[t.format(c=c) for t in templates_] for c in class_names_]


# ---------------------------------------------------------------------------------------
# preprocessing


def _to_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    if img.shape[-1] != 3:
        raise ValueError(f"expected an HWC image with 1 or 3 channels, got shape {img.shape}")
    return img


def resize_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """CLIP-style: bicubic resize of the shorter side to ``size``, then a centre crop (uint8)."""
    from PIL import Image  # Pillow: only hosts that resize images need it

    img = _to_rgb(img)
    h, w = img.shape[:2]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        pil = Image.fromarray(img.astype(np.uint8)).resize((nw, nh), Image.Resampling.BICUBIC)
        img = np.asarray(pil)
        top, left = (nh - size) // 2, (nw - size) // 2
        img = img[top : top + size, left : left + size]
    return img


def normalize(images, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
    """uint8 [..., H, W, 3] -> float32 standardised pixels. Works on numpy and jax arrays,
    so it can run inside the jitted step (ship uint8 to the device: 4x fewer bytes)."""
    xp = np if isinstance(images, np.ndarray) else jnp
    x = images.astype(xp.float32) / 255.0
    return (x - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32)


def preprocess_on_device(images, size: int = 224, *, normalized: bool = True):
    """The CLIP preprocessing of :func:`resize_center_crop` (+ :func:`normalize`) as a jax
    function of a uint8 batch [B, H, W, C] (C = 1 or 3): call it inside the jitted step.

    For fixed-size datasets (MNIST, SVHN, GTSRB, EuroSAT, RESISC45) this keeps the host
    out of the way: batches travel at native size (GTSRB: 3 KB per image instead of
    150 KB) and the resize is one vectorised op. jax's antialiased bicubic matches PIL's
    within one intensity level (tested).
    """
    b, h, w, c = images.shape
    x = images.astype(jnp.float32)
    if c == 1:
        x = jnp.repeat(x, 3, axis=-1)
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = jax.image.resize(x, (b, nh, nw, 3), "bicubic", antialias=True)
        x = jnp.clip(jnp.round(x), 0.0, 255.0)  # PIL returns uint8 pixels
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, top : top + size, left : left + size]
    return normalize(x) if normalized else x


def image_transform(
    size: int = 224, *, normalized: bool = False, key: str = "image"
) -> Callable[[Mapping[str, object]], dict]:
    """A host batch transform for :func:`llora_jax.data.batches`: the ``key`` field (a
    stacked array or a list of variable-size HWC images) becomes ``uint8 [B, size, size,
    3]`` (or float32 CLIP-normalised when ``normalized``). Needed for variable-size
    datasets (SUN397, Cars, DTD; use ``num_workers``); for fixed-size ones prefer
    :func:`preprocess_on_device`. Batches already at the target size pass through."""

    def transform(batch: Mapping[str, object]) -> dict:
        images = batch[key]
        if (
            isinstance(images, np.ndarray)
            and images.ndim == 4
            and images.shape[1:] == (size, size, 3)
        ):
            out = images.astype(np.uint8, copy=False)
        elif len(images):
            out = np.stack([resize_center_crop(im, size) for im in images])
        else:
            out = np.zeros((0, size, size, 3), np.uint8)
        new = dict(batch)
        new[key] = normalize(out) if normalized else out
        return new

    return transform
