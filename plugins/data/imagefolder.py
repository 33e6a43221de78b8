"""Dataset ``imagefolder``: your own images, one folder per class.

    root/train/<class>/*.png|jpg|jpeg
    root/test/<class>/*.png|jpg|jpeg

Classes are the folder names, sorted. Every image is decoded once at start into memory (this
framework trains small classifiers on small images); all must have the same size, or set
``image_size`` to resize them. An unreadable image stops the run with its path; so does a training
class folder without images (it would be a class the model can never be shown) and a colour channel
that has the same value in every training image (its std is 0 and normalising it gives NaN).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import numpy as np

import microtrain
from microtrain import DataError, ImageData, Range
from microtrain_plugins.data.cifar10 import channel_stats

EXTENSIONS = {".png", ".jpg", ".jpeg"}


CHANNELS = ("red", "green", "blue")  # every image is converted to RGB


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in EXTENSIONS and not path.name.startswith(".")


def _training_classes(train_dir: Path) -> list[str]:
    """The class folders of the training split, each holding at least one image (checked without decoding)."""
    classes = _class_folders(train_dir)
    if not classes:
        raise DataError(f"imagefolder: no class folders in {train_dir}; make one folder per class")
    for name in classes:
        if not any(_is_image(path) for path in (train_dir / name).iterdir()):
            raise DataError(f"imagefolder: class folder {train_dir / name} has no .png/.jpg/.jpeg image, so its class "
                            "could never be learnt; put its images there or remove the folder")
    return classes


def _check_channels(std: tuple[float, ...], train_dir: Path) -> None:
    """A channel with std 0 (to the 4 decimals kept) cannot be normalised: it would divide by zero."""
    for channel, value in zip(CHANNELS, std, strict=False):
        if value == 0:
            raise DataError(f"imagefolder: the {channel} channel has the same value in every training image under "
                            f"{train_dir} (std 0), so normalising it divides by zero; the images are blank or one "
                            "colour: check that they were copied or exported correctly")


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
            if not _is_image(path):
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


IMAGE_SIZE = Annotated[int, Range(ge=1, le=4096)] | None


def build_imagefolder(*, root: str | None = None, image_size: IMAGE_SIZE = None) -> ImageData:
    """Class-per-folder images: root/train/<class>/*, root/test/<class>/* (PNG or JPEG); image_size=N resizes
    every image to NxN."""
    base = Path(root or os.environ.get("MICROTRAIN_DATA") or "").expanduser()
    if not root and not os.environ.get("MICROTRAIN_DATA"):
        raise DataError("data.root is required for imagefolder: pass data.root=DIR holding train/<class>/ and test/<class>/")
    for split in ("train", "test"):
        if not (base / split).is_dir():
            raise DataError(f"imagefolder: '{base / split}' not found; data.root must hold train/<class>/ and test/<class>/")
    classes = _training_classes(base / "train")
    unknown = sorted(set(_class_folders(base / "test")) - set(classes))
    if unknown:
        raise DataError(f"imagefolder: test classes {unknown} have no folder in {base / 'train'}; the splits must share classes")
    train_images, train_labels = read_split(base / "train", classes, image_size)
    test_images, test_labels = read_split(base / "test", classes, image_size)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(f"imagefolder: train images are {train_images.shape[1:3]} but test images {test_images.shape[1:3]}; "
                        "set data.image_size=N")
    mean, std = channel_stats(train_images)
    _check_channels(std, base / "train")
    return ImageData(train_images, train_labels, test_images, test_labels, classes, mean, std)



def _describe(*, root: str | None = None, image_size: IMAGE_SIZE = None) -> tuple[int, tuple[int, int, int]]:
    """Classes and image shape from the folder names and the first image, without decoding everything."""
    base = Path(root or os.environ.get("MICROTRAIN_DATA") or ".").expanduser()
    if not (base / "train").is_dir():
        raise DataError(f"imagefolder: '{base / 'train'}' not found; pass data.root=DIR holding train/<class>/")
    classes = _training_classes(base / "train")
    if image_size:
        return len(classes), (3, image_size, image_size)
    first = next(p for p in sorted((base / "train" / classes[0]).iterdir()) if _is_image(p))
    h, w, c = _decode(first, None).shape
    return len(classes), (c, h, w)


build_imagefolder.describe = _describe


@microtrain.hookimpl
def register_components(registry):
    registry.data("imagefolder", build_imagefolder)
