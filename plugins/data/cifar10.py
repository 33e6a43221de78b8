"""Dataset ``cifar10``: the official *binary version* of CIFAR-10, read with NumPy (no unpickling).

Where the data is looked for, in order: the ``root`` option, the ``MICROTRAIN_DATA`` environment
variable, ``~/.cache/microtrain``. A root holds ``cifar-10-batches-bin/`` (a root that is that
folder itself works too). When it is missing, the archive is downloaded, its MD5 checked against
the published one before it is opened, extracted safely, and every file checked against its
SHA-256.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated

import numpy as np

import microtrain
from microtrain import DataError, ImageData, Range
from microtrain_plugins.data.safe_archive import extract_tar_safely

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
OFFICIAL_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
FOLDER = "cifar-10-batches-bin"
TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_FILE = "test_batch.bin"
RECORD = 1 + 3 * 32 * 32
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# SHA-256 of the official binary files (also those of the copy described in shared/data/README.md).
OFFICIAL_SHA256 = {
    "data_batch_1.bin": "cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5",
    "data_batch_2.bin": "a591ca11fa1708a91ee40f54b3da4784ccd871ecf2137de63f51ada8b3fa57ed",
    "data_batch_3.bin": "bbe8596564c0f86427f876058170b84dac6670ddf06d79402899d93ceea26f67",
    "data_batch_4.bin": "014e562d6e23c72197cc727519169a60359f5eccd8945ad5a09d710285ff4e48",
    "data_batch_5.bin": "755304fc0b379caeae8c14f0dac912fbc7d6cd469eb67a1029a08a39453a9add",
    "test_batch.bin": "8e2eb146ae340b09e24670f29cabc6326dba54da8789dab6768acf480273f65b",
}


def default_root() -> Path:
    return Path(os.environ.get("MICROTRAIN_DATA") or Path.home() / ".cache" / "microtrain").expanduser()


def find_folder(root: Path) -> Path | None:
    for candidate in (root / FOLDER, root):
        if all((candidate / name).is_file() for name in [*TRAIN_FILES, TEST_FILE]):
            return candidate
    return None


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, md5: str, root: Path) -> Path:
    """Download the archive into ``root``, check its MD5, extract it safely; return the data folder."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create data folder '{root}' ({exc.strerror}); set data.root or MICROTRAIN_DATA to a "
                        "writable folder") from None
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        archive = Path(tmp) / "cifar-10-binary.tar.gz"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
                announced = response.headers.get("Content-Length")
            if announced and announced.isdigit() and archive.stat().st_size != int(announced):
                raise OSError(f"the connection closed after {archive.stat().st_size} of {announced} bytes")
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:  # HTTPException: cut short
            reason = getattr(exc, "reason", exc)
            raise DataError(
                f"CIFAR-10 not found in '{root}' (looked for {root / FOLDER}) and downloading {url} failed ({reason}); "
                f"copy the binary version's {FOLDER}/ folder there, or point data.root or MICROTRAIN_DATA at a folder holding it"
            ) from None
        actual = file_digest(archive, "md5")
        if actual != md5:
            raise DataError(
                f"checksum mismatch for {url}: MD5 {actual}, expected {md5}; the download is corrupt or not the "
                "official archive, nothing was extracted; delete it and try again"
            )
        extract_tar_safely(archive, Path(tmp) / "extracted")
        source = find_folder(Path(tmp) / "extracted")
        if source is None:
            raise DataError(f"the archive from {url} does not hold {FOLDER}/ with the 6 batch files")
        target = root / FOLDER
        shutil.move(str(source), target)  # build_cifar10 made sure nothing is there
    return target


def verify(folder: Path, expected: dict[str, str]) -> None:
    for name, sha in expected.items():
        actual = file_digest(folder / name, "sha256")
        if actual != sha:
            raise DataError(
                f"checksum mismatch for {folder / name}: SHA-256 {actual[:16]}..., expected {sha[:16]}...; the file is "
                "corrupt or altered: replace it with an official copy (or set data.verify=false for your own data)"
            )


def read_batches(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Records of 1 label byte + 3072 pixel bytes (R, G, B planes) -> (N, 32, 32, 3) uint8, int64 labels."""
    parts = []
    for path in paths:
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % RECORD:
            raise DataError(f"{path} is truncated or not a CIFAR-10 binary batch ({raw.size} bytes is not a multiple of "
                            f"{RECORD})")
        parts.append(raw.reshape(-1, RECORD))
    records = np.concatenate(parts)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= len(CLASSES):
        raise DataError(f"{paths[0].parent} holds a label {labels.max()} outside 0..9: not a CIFAR-10 batch")
    images = np.ascontiguousarray(records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1], computed in float64 over all pixels."""
    flat = images.reshape(-1, images.shape[-1])
    mean = flat.mean(axis=0, dtype=np.float64) / 255.0
    sq = (flat.astype(np.float32) ** 2).mean(axis=0, dtype=np.float64) / 255.0**2
    std = np.sqrt(np.maximum(sq - mean**2, 0.0))  # a constant channel's rounding error must give 0, not NaN
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)


def build_cifar10(*, root: str | None = None, download_missing: bool = True, verify: bool = True,
                  url: str = OFFICIAL_URL, archive_md5: str = OFFICIAL_MD5,
                  limit_train: Annotated[int, Range(ge=0)] = 0, limit_test: Annotated[int, Range(ge=0)] = 0) -> ImageData:
    """CIFAR-10, 50,000 training and 10,000 test images of 32x32 in 10 classes (limit_train / limit_test: the
    first N of each split, 0 for all)."""
    base = Path(root).expanduser() if root else default_root()
    folder = find_folder(base)
    if folder is None:
        partial = base / FOLDER
        if partial.exists():  # never delete what someone put there
            missing = [name for name in [*TRAIN_FILES, TEST_FILE] if not (partial / name).is_file()]
            raise DataError(f"'{partial}' is incomplete (missing {', '.join(missing)}); add those files, or delete the "
                            "folder to download CIFAR-10 again")
        if not download_missing:
            raise DataError(
                f"CIFAR-10 not found: looked for {base / FOLDER} with data_batch_1..5.bin and test_batch.bin; "
                "set data.root or MICROTRAIN_DATA to the folder holding it, or data.download_missing=true"
            )
        folder = download(url, archive_md5, base)
    if verify:
        _verify_once(folder)
    train_images, train_labels = read_batches([folder / name for name in TRAIN_FILES])
    test_images, test_labels = read_batches([folder / TEST_FILE])
    if limit_train:
        train_images, train_labels = train_images[:limit_train], train_labels[:limit_train]
    if limit_test:
        test_images, test_labels = test_images[:limit_test], test_labels[:limit_test]
    mean, std = channel_stats(train_images)
    return ImageData(train_images, train_labels, test_images, test_labels, list(CLASSES), mean, std)


def _verify_once(folder: Path) -> None:
    verify(folder, OFFICIAL_SHA256)


build_cifar10.describe = lambda **_: (len(CLASSES), (3, 32, 32))


@microtrain.hookimpl
def register_components(registry):
    registry.data("cifar10", build_cifar10)
