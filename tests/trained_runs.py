"""Small finished runs for the load_run / predict / export tests, trained once per test session.

- ``synthetic_run``: generated images, the albumentations loader, EMA and flip TTA (what load_run must restore).
- ``imagefolder_run``: PNG folders whose test split mixes gray, RGBA and palette images of another size than
  the trained one (``data.image_size``), so predicting it exercises the conversion and resize "as training did".
- ``cifar_run``: CIFAR-10 binary batches written here (the official format, generated content), the tensor loader
  in channels-last memory.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from microtrain_plugins.data import cifar10
from microtrain_plugins.data.synthetic import make_images

BASE = {
    "epochs": 2, "seed": 0, "threads": 1,
    "model": {"name": "dsconv", "dropout": 0.0},
    "optimizer": {"name": "sgd", "lr": 0.05},
    "schedule": {"name": "onecycle", "max_lr": 0.1},
    "plugins": ["metrics", "checkpoint", {"ema": {"decay": 0.9, "bn_batches": 2}}, "tta"],
}
ALBUMENTATIONS = {"name": "albumentations", "batch_size": 32, "eval_batch_size": 40, "workers": 0,
                  "augment": [{"HorizontalFlip": {"p": 0.5}}]}


def microtrain_cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The installed command, as a user runs it (a fresh process: its exit status and stderr are what they see)."""
    script = Path(sys.executable).parent / "microtrain"
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=900)


def microtrain_main(*args: str | Path) -> subprocess.CompletedProcess:
    """``microtrain ARGS`` in this process (seconds faster than a new one: torch and the plugins are imported
    already), with what it printed; the same exit status and lines as the command, which calls the same main()."""
    import contextlib
    import io

    from microtrain.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([str(arg) for arg in args])
        except SystemExit as exit_:  # argparse's usage errors
            status = exit_.code if isinstance(exit_.code, int) else 2
    return subprocess.CompletedProcess(["microtrain", *map(str, args)], status, out.getvalue(), err.getvalue())


def train(folder: Path, recipe: dict) -> Path:
    """Train ``recipe`` into ``folder/run`` and return the run dir."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = microtrain_cli("run", path, "--run-dir", folder / "run")
    assert result.returncode == 0, f"{shlex.join(['microtrain', 'run', str(path)])}:\n{result.stderr[-3000:]}"
    return folder / "run"


def write_image_folder(root: Path, *, classes: int = 3, train_per_class: int = 40, test_per_class: int = 8,
                       size: int = 32) -> None:
    """root/{train,test}/<class>/*.png with a learnable pattern; the test split in mixed modes and a larger size."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = make_images(per_class * classes, size, classes, rng)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / f"kind{label}"
            folder.mkdir(parents=True, exist_ok=True)
            picture = Image.fromarray(image)
            if split == "test":  # what a user's folder holds: other sizes and modes, converted as training converts
                picture = picture.resize((size + 8, size + 8), Image.BILINEAR)
                picture = [picture, picture.convert("L"), picture.convert("RGBA"), picture.convert("P")][i % 4]
            picture.save(folder / f"{i:03d}.png")


def write_cifar_batches(folder: Path, *, per_file: int = 60) -> None:
    """The six files of the binary version, holding generated learnable images (labels 0-9)."""
    rng = np.random.default_rng(2)
    folder.mkdir(parents=True, exist_ok=True)
    for name in [*cifar10.TRAIN_FILES, cifar10.TEST_FILE]:
        images, labels = make_images(per_file, 32, 10, rng)
        planes = images.transpose(0, 3, 1, 2).reshape(per_file, -1)
        (folder / name).write_bytes(np.concatenate([labels[:, None].astype(np.uint8), planes], axis=1).tobytes())


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory) -> Path:
    recipe = {**BASE, "name": "synthetic_run", "data": {"name": "synthetic", "train_size": 256, "test_size": 120},
              "loader": ALBUMENTATIONS}
    return train(tmp_path_factory.mktemp("synthetic"), recipe)


@pytest.fixture(scope="session")
def imagefolder_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("imagefolder")
    write_image_folder(folder / "images")
    recipe = {**BASE, "name": "imagefolder_run", "data": {"name": "imagefolder", "root": str(folder / "images"), "image_size": 32},
              "loader": ALBUMENTATIONS}
    return train(folder, recipe)


@pytest.fixture(scope="session")
def cifar_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cifar")
    write_cifar_batches(folder / "data" / cifar10.FOLDER)
    recipe = {**BASE, "name": "cifar_run", "channels_last": True,
              "data": {"name": "cifar10", "root": str(folder / "data"), "verify": False, "download_missing": False},
              "loader": {"name": "tensor", "batch_size": 32, "eval_batch_size": 25, "augment": [{"HorizontalFlip": {"p": 0.5}}]}}
    return train(folder, recipe)


def copy_with_another_model(run_dir: Path, target: Path) -> Path:
    """A copy of the run dir whose recipe builds a narrower dsconv: its checkpoint is then of another model."""
    import shutil

    shutil.copytree(run_dir, target)
    recipe = yaml.safe_load((target / "recipe.yaml").read_text())
    recipe["model"] = {"name": "dsconv", "dropout": 0.0, "width": 0.5}
    (target / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return target


def logged_test_acc(run_dir: Path, epoch: int | None = None) -> float:
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    row = rows[-1] if epoch is None else next(r for r in rows if r["epoch"] == epoch)
    return row["test_acc"]
