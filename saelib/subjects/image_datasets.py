"""RGB image-classification datasets from the Hugging Face hub, resized the way CLIP resizes.

Chapter 5's gpu profile reads the paper's kind of data by hub name (``datasets.load_dataset``,
parquet datasets only: recent ``datasets`` refuses loading scripts):

* ``load_hub_images(name, split, n=..., size=224)`` picks ``n`` images (a seeded sample, or
  ``per_class`` of each class) by their labels alone, then decodes only those, converts them to RGB
  and resizes each as ``CLIPImageProcessor`` does (``clip_resize``): the shortest side to ``size``
  (bicubic), then the centre ``size`` x ``size`` crop, kept as uint8 like PIL's output;
* the image and label columns are found by their features (``image``/``img``, ``label``/``labels``,
  ...), and class names come from the label's ``ClassLabel``, made readable for CLIP's prompt
  ("a photo of a {}."): ``AnnualCrop`` -> "annual crop", ``apple_pie`` -> "apple pie",
  ``"bonnet, poke bonnet"`` -> "bonnet";
* ``HUB_DATASETS`` records, per dataset the book names, its training and held-out splits and its
  class count as its dataset card gives them.
"""

from __future__ import annotations

import functools
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from saelib.core import seeding

__all__ = [
    "HUB_DATASETS",
    "HubImages",
    "class_names",
    "clip_resize",
    "load_hub_images",
    "readable_class_name",
    "split_names",
    "split_size",
]

HUB_DATASETS: dict[str, dict[str, Any]] = {
    # ImageNet-100 (the CMC paper's 100-class ImageNet subset, arXiv 1906.05849): parquet, image +
    # label ClassLabel with ImageNet's readable synonyms ("bonnet, poke bonnet"); train 126,689,
    # validation 5,000 (ImageNet's own validation images, 50 per class).
    "clane9/imagenet-100": {"train": "train", "test": "validation", "classes": 100},
    # EuroSAT RGB (Sentinel-2, 64 x 64 JPEG): parquet, image + label ClassLabel (AnnualCrop ...
    # SeaLake) + image_id; train 16,200, validation 5,400, test 5,400.
    "timm/eurosat-rgb": {"train": "train", "test": "test", "classes": 10},
    # Food-101: parquet since its loading script was deleted (PR #3); image + label ClassLabel
    # (apple_pie ... waffles); train 75,750, validation 25,250 (the official test set: 250 per class).
    "ethz/food101": {"train": "train", "test": "validation", "classes": 101},
}
"""The hub datasets the book reads: ``train`` and ``test`` name the splits that serve as its
training and held-out images; ``classes`` is the class count of the dataset card."""
_IMAGE_COLUMNS = ("image", "img", "jpg", "png", "picture")
_LABEL_COLUMNS = ("label", "labels", "fine_label", "cls", "class")


@dataclass
class HubImages:
    """Images of one split: uint8 [n, 3, size, size], int64 labels, and the readable class names
    (``raw_classes``: the ``ClassLabel`` names as stored)."""

    name: str
    split: str
    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]
    raw_classes: tuple[str, ...]
    indices: Tensor
    """Rows of the split that were picked (sorted)."""


def readable_class_name(name: str) -> str:
    """A ClassLabel name as a prompt says it: the first of comma-separated synonyms, CamelCase
    and underscores split into words, lower case (CLIP's tokenizer lower-cases anyway)."""
    first = name.split(",")[0].strip()
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", first).replace("_", " ")
    return " ".join(words.split()).lower()


def clip_resize(images: Tensor, size: int) -> Tensor:
    """``CLIPImageProcessor``'s geometry on float images [n, C, H, W] in [0, 1]: the shortest side
    resized to ``size`` (bicubic; antialiased when shrinking, as PIL is), the longer side to
    ``int(size * long / short)``, then the centre ``size`` x ``size`` crop. Clamped to [0, 1]."""
    if images.ndim != 4:
        raise ValueError(f"expected images [n, C, H, W], got shape {list(images.shape)}")
    h, w = images.shape[-2:]
    if (h, w) != (size, size):
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new_h, new_w = (new_long, size) if w <= h else (size, new_long)
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False,
                               antialias=min(h, w) > size).clamp(0, 1)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        images = images[..., top:top + size, left:left + size]
    return images


@functools.lru_cache(maxsize=8)
def _open(name: str, split: str):
    """The split as a ``datasets.Dataset`` (loaded once per process), its image and label columns."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except ValueError as e:
        if "split" in str(e).lower():  # datasets: 'Unknown split "x". Should be one of [...]'
            raise ValueError(f"dataset {name!r} has no split {split!r} ({_first_line(e)})") from None
        raise RuntimeError(f"could not load the image dataset {name!r} ({type(e).__name__}: "
                           f"{_first_line(e)})") from None
    except Exception as e:  # the hub's errors are long; the one line a reader needs
        raise RuntimeError(f"could not load the image dataset {name!r} ({type(e).__name__}: "
                           f"{_first_line(e)})") from None
    features = ds.features
    images = [c for c in ds.column_names if isinstance(features[c], datasets.Image)]
    images = [c for c in _IMAGE_COLUMNS if c in images] or images
    labels = [c for c in ds.column_names if isinstance(features[c], datasets.ClassLabel)]
    labels = [c for c in _LABEL_COLUMNS if c in labels] or labels
    if not images or not labels:
        missing = "image column" if not images else "ClassLabel label column"
        raise KeyError(f"dataset {name!r} ({split}) has no {missing}; its columns are "
                       + ", ".join(f"{c} ({type(features[c]).__name__})" for c in ds.column_names))
    return ds, images[0], labels[0]


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def class_names(name: str, split: str = "train") -> tuple[str, ...]:
    """The readable class names of a hub dataset (from its label's ``ClassLabel``)."""
    ds, _, label = _open(name, split)
    return tuple(readable_class_name(n) for n in ds.features[label].names)


def split_size(name: str, split: str) -> int:
    """The number of images in a split of a hub dataset."""
    return _open(name, split)[0].num_rows


def split_names(name: str) -> tuple[str, str]:
    """The training and held-out splits of ``name``: ``HUB_DATASETS``'s, else train and test."""
    entry = HUB_DATASETS.get(name, {})
    return entry.get("train", "train"), entry.get("test", "test")


def load_hub_images(name: str, split: str, *, n: int | None = None, per_class: int | None = None,
                    classes: tuple[int, ...] | None = None, size: int = 224, seed: int = 0) -> HubImages:
    """Images of a hub image-classification dataset, RGB, resized and cropped by ``clip_resize``
    to ``size`` x ``size`` (uint8 [n, 3, size, size]).

    ``classes``: keep only these label ids, relabelled 0..len-1 in the order given (default: all).
    ``n``: a seeded random sample of that many images; ``per_class``: that many of each class (the
    same seeded order); neither: all of them. Only the picked images are decoded."""
    import datasets
    from PIL import Image

    if n is not None and per_class is not None:
        raise ValueError("give n or per_class, not both")
    ds, image_col, label_col = _open(name, split)
    all_names = tuple(ds.features[label_col].names)
    labels = torch.as_tensor(np.asarray(ds[label_col], dtype=np.int64))
    keep = tuple(range(len(all_names))) if classes is None else tuple(classes)
    if not keep or min(keep) < 0 or max(keep) >= len(all_names) or len(set(keep)) != len(keep):
        raise ValueError(f"classes {classes} must be distinct label ids of {name!r}'s {len(all_names)}")
    new_label = torch.full((len(all_names),), -1, dtype=torch.long)
    new_label[list(keep)] = torch.arange(len(keep))
    labels = new_label[labels]
    stream = seeding.generator(f"image_splits:hub:{name}:{split}", seed)
    order = torch.randperm(len(labels), generator=stream)
    order = order[labels[order] >= 0]
    if per_class is not None:
        picked = []
        for c in range(len(keep)):
            of_class = order[labels[order] == c]
            if len(of_class) < per_class:
                raise ValueError(f"{name!r} ({split}) has {len(of_class)} images of class "
                                 f"{all_names[keep[c]]!r}, fewer than the {per_class} asked for")
            picked.append(of_class[:per_class])
        rows = torch.cat(picked)
    elif n is not None:
        if n > len(order):
            raise ValueError(f"{name!r} ({split}) has {len(order)} images of these classes, "
                             f"fewer than the {n} asked for")
        rows = order[:n]
    else:
        rows = order
    rows = rows.sort().values
    raw = ds.select(rows.tolist()).cast_column(image_col, datasets.Image(decode=False))[image_col]
    out = torch.empty((len(rows), 3, size, size), dtype=torch.uint8)
    for i, item in enumerate(raw):
        # one image at a time: the split's images differ in size
        data = item["bytes"] if item.get("bytes") is not None else Path(item["path"]).read_bytes()
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0
        resized = clip_resize(torch.from_numpy(pixels).permute(2, 0, 1)[None], size)[0]
        out[i] = (resized * 255).round().to(torch.uint8)
    return HubImages(name, split, out, labels[rows], tuple(readable_class_name(all_names[c]) for c in keep),
                     tuple(all_names[c] for c in keep), rows)
