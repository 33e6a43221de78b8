"""Dataset ``synthetic``: small generated images whose class is learnable (a coloured square at a
class-dependent place on noise). For tests, benchmarks and trying a recipe without data."""

from __future__ import annotations

from typing import Annotated

import numpy as np

import microtrain
from microtrain import DataError, ImageData, Range

MAX_BYTES = 2**31
"""Generated images are held in memory; past 2 GiB a size option is a typo, not a test set."""


def make_images(count: int, size: int, num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(count, dtype=np.int64) % num_classes
    rng.shuffle(labels)
    images = rng.integers(0, 96, size=(count, size, size, 3), dtype=np.uint8)
    block = max(2, size // 4)
    for cls in range(num_classes):
        members = labels == cls
        row = (cls * 3) % (size - block)
        col = (cls * 5) % (size - block)
        colour = np.array([(cls * 70) % 256, (cls * 130 + 60) % 256, (cls * 200 + 120) % 256], dtype=np.uint8)
        images[members, row:row + block, col:col + block] = colour
    return images, labels


def build_synthetic(*, train_size: Annotated[int, Range(ge=1, le=1_000_000)] = 512,
                    test_size: Annotated[int, Range(ge=1, le=1_000_000)] = 256,
                    image_size: Annotated[int, Range(ge=3, le=1024)] = 32,  # the class square needs 3 pixels
                    num_classes: Annotated[int, Range(ge=2, le=10_000)] = 10,
                    seed: Annotated[int, Range(ge=0, le=2**32 - 1)] = 0) -> ImageData:
    """Generated images with a learnable class pattern (no files, no network)."""
    needed = (train_size + test_size) * image_size * image_size * 3
    if needed > MAX_BYTES:  # a rule across three options, so it is checked here
        raise DataError(f"data: {train_size + test_size:,} synthetic images of {image_size}x{image_size} would take "
                        f"{needed / 2**30:.1f} GiB (at most {MAX_BYTES / 2**30:.0f}); lower data.train_size, "
                        "data.test_size or data.image_size")
    rng = np.random.default_rng(seed)
    train_images, train_labels = make_images(train_size, image_size, num_classes, rng)
    test_images, test_labels = make_images(test_size, image_size, num_classes, rng)
    flat = train_images.reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = tuple(flat.mean(0).round(4).tolist()), tuple(flat.std(0).round(4).tolist())
    return ImageData(train_images, train_labels, test_images, test_labels, [f"class{i}" for i in range(num_classes)],
                     mean, std)


build_synthetic.describe = lambda *, num_classes=10, image_size=32, **_: (num_classes, (3, image_size, image_size))


@microtrain.hookimpl
def register_components(registry):
    registry.data("synthetic", build_synthetic)
