"""Dataset ``imagefolder``: your own images, one folder per class.

    root/train/<class>/*.png|jpg|jpeg
    root/test/<class>/*.png|jpg|jpeg

Classes are the folder names, sorted. Every image is decoded once at start into memory (this
framework trains small classifiers on small images); all must have the same size, or set
``image_size`` to resize them. An unreadable image stops the run with its path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

import microtrain
from microtrain import DataError, ImageData
from microtrain_plugins.data.cifar10 import channel_stats

EXTENSIONS = {".png", ".jpg", ".jpeg"}


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _decode(path: Path, image_size: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image_size and image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"unreadable image {path} ({type(exc).__name__}: {exc}); delete or replace the file") from None


def read_split(split_dir: Path, classes: list[str], image_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    shape = None
    for label, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in EXTENSIONS:
                continue
            array = _decode(path, image_size)
            if shape is None:
                shape = array.shape
            elif array.shape != shape:
                raise DataError(
                    f"{path} is {array.shape[1]}x{array.shape[0]} but earlier images are {shape[1]}x{shape[0]}; "
                    "set data.image_size=N to resize every image to NxN"
                )
            images.append(array)
            labels.append(label)
    if not images:
        raise DataError(f"no .png/.jpg images found under {split_dir}/<class>/; put each class's images in its own folder")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def build_imagefolder(*, root: str | None = None, image_size: int | None = None) -> ImageData:
    """Class-per-folder images: root/train/<class>/*, root/test/<class>/* (PNG or JPEG)."""
    base = Path(root or os.environ.get("MICROTRAIN_DATA") or "").expanduser()
    if not root and not os.environ.get("MICROTRAIN_DATA"):
        raise DataError("data.root is required for imagefolder: pass data.root=DIR holding train/<class>/ and test/<class>/")
    for split in ("train", "test"):
        if not (base / split).is_dir():
            raise DataError(f"imagefolder: '{base / split}' not found; data.root must hold train/<class>/ and test/<class>/")
    classes = _class_folders(base / "train")
    if not classes:
        raise DataError(f"imagefolder: no class folders in {base / 'train'}; make one folder per class")
    unknown = sorted(set(_class_folders(base / "test")) - set(classes))
    if unknown:
        raise DataError(f"imagefolder: test classes {unknown} have no folder in {base / 'train'}; the splits must share classes")
    train_images, train_labels = read_split(base / "train", classes, image_size)
    test_images, test_labels = read_split(base / "test", classes, image_size)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(f"imagefolder: train images are {train_images.shape[1:3]} but test images {test_images.shape[1:3]}; "
                        "set data.image_size=N")
    mean, std = channel_stats(train_images)
    return ImageData(train_images, train_labels, test_images, test_labels, classes, mean, std)



def _describe(*, root: str | None = None, image_size: int | None = None) -> tuple[int, tuple[int, int, int]]:
    """Classes and image shape from the folder names and the first image, without decoding everything."""
    base = Path(root or os.environ.get("MICROTRAIN_DATA") or ".").expanduser()
    classes = _class_folders(base / "train") if (base / "train").is_dir() else []
    if not classes:
        raise DataError(f"imagefolder: no class folders in {base / 'train'}; pass data.root=DIR")
    if image_size:
        return len(classes), (3, image_size, image_size)
    first = next((p for c in classes for p in sorted((base / "train" / c).iterdir()) if p.suffix.lower() in EXTENSIONS), None)
    if first is None:
        raise DataError(f"imagefolder: no images under {base / 'train'}")
    h, w, c = _decode(first, None).shape
    return len(classes), (c, h, w)


build_imagefolder.describe = _describe


@microtrain.hookimpl
def register_components(registry):
    registry.data("imagefolder", build_imagefolder)
