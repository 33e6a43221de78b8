"""What ``microtrain predict`` and ``microtrain export --check`` read: image files, folders of them, and CIFAR-10
binary batches, each image with its class when the layout says it.

A folder is read recursively (PNG and JPEG, as the image-folder dataset reads them, in sorted order). When every
subfolder of it is named after a class of the run (``<folder>/<class>/...``, as a dataset's test split is laid
out), its images are labelled with that class and can be scored. A ``.bin`` file is read as a CIFAR-10 binary
batch (with NumPy, never unpickled) and labelled by its class names. Images are decoded a batch at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from microtrain import DataError, LoadedRun
from microtrain_plugins.data import cifar10
from microtrain_plugins.data.imagefolder import EXTENSIONS

NOT_AN_IMAGE = "pass PNG or JPEG files, folders of them, or a CIFAR-10 binary batch (.bin)"


@dataclass
class Inputs:
    """The images to predict, in order: a name (path, or ``file.bin[i]``), a source, and a class index if known."""

    names: list[str] = field(default_factory=list)
    shown_names: list[str] = field(default_factory=list)  # for a table: a batch file's images without its folder
    sources: list[Path | np.ndarray] = field(default_factory=list)  # an image file, or a uint8 (H, W, C) array
    labels: list[int | None] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # said once to the user: folders not scored and why

    def __len__(self) -> int:
        return len(self.names)

    def add(self, name: str, source: Path | np.ndarray, label: int | None, shown_name: str | None = None) -> None:
        self.names.append(name)
        self.shown_names.append(shown_name or name)
        self.sources.append(source)
        self.labels.append(label)

    @property
    def labelled(self) -> bool:
        return any(label is not None for label in self.labels)


def collect(paths: Sequence[str | Path], classes: Sequence[str]) -> Inputs:
    """Every image under ``paths``, labelled where the layout gives the class; a bad path stops with one line."""
    inputs = Inputs()
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            _add_folder(inputs, path, classes)
        elif path.is_file():
            if path.suffix.lower() == ".bin":
                _add_cifar_batch(inputs, path, classes)
            else:
                inputs.add(str(path), path, None)
        else:
            raise DataError(f"input '{path}' not found; {NOT_AN_IMAGE}")
    return inputs


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _add_folder(inputs: Inputs, folder: Path, classes: Sequence[str]) -> None:
    subfolders = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    known = [name for name in subfolders if name in classes]
    by_class = bool(subfolders) and len(known) == len(subfolders)
    if known and not by_class:
        unknown = [name for name in subfolders if name not in classes]
        inputs.notes.append(f"{folder}: not scored, its subfolders {unknown} are not classes of this run "
                            f"(a folder laid out <class>/ is scored when every subfolder is a class)")
    found = _images_under(folder)
    if not found:
        raise DataError(f"no PNG or JPEG images under '{folder}'; {NOT_AN_IMAGE}")
    for path in found:
        relative = path.relative_to(folder).parts
        label = classes.index(relative[0]) if by_class and len(relative) > 1 else None
        inputs.add(str(path), path, label)


def _add_cifar_batch(inputs: Inputs, path: Path, classes: Sequence[str]) -> None:
    images, labels = cifar10.read_batches([path])
    index = {name: i for i, name in enumerate(classes)}
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        inputs.add(f"{path}[{i}]", image, index.get(cifar10.CLASSES[int(label)]), f"{path.name}[{i}]")


def read_image(path: Path):
    """Open and fully decode an image file (PIL opens lazily, and a truncated file fails only when decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except Exception as exc:  # noqa: BLE001 - UnidentifiedImageError, OSError (truncated), DecompressionBombError, ...
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if path.suffix.lower() in EXTENSIONS:
            raise DataError(f"unreadable image '{path}' ({type(exc).__name__}: {detail}); delete or replace the file") from None
        raise DataError(f"'{path}' is not an image ({detail}); {NOT_AN_IMAGE}") from None


def arrays(inputs: Inputs, loaded: LoadedRun, start: int, stop: int) -> np.ndarray:
    """Images ``start:stop`` as uint8 ``(N, H, W, C)`` at the run's trained size and channels."""
    sources = inputs.sources[start:stop]
    return loaded.to_arrays([read_image(s) if isinstance(s, Path) else s for s in sources])
