"""Shared test helpers: tiny recipes on synthetic data, and where the real CIFAR-10 copy is."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]

# The small finished runs several test modules predict from and export: declared once here, so each is
# trained once per session (a fixture imported into several modules would be trained once per module).
pytest_plugins = ["trained_runs"]


def real_cifar_root() -> Path | None:
    """The CIFAR-10 copy beside the repo (../shared/data) or $MICROTRAIN_DATA, if present."""
    for candidate in (os.environ.get("MICROTRAIN_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "cifar-10-batches-bin" / "test_batch.bin").is_file():
            return Path(candidate)
    return None


TINY_RECIPE = {
    "name": "tiny",
    "epochs": 2,
    "seed": 0,
    "threads": 1,
    "data": {"name": "synthetic", "train_size": 256, "test_size": 128, "image_size": 16},
    "model": {"name": "dsconv", "dropout": 0.0},
    "loader": {"name": "albumentations", "batch_size": 64, "workers": 0,
               "augment": [{"HorizontalFlip": {"p": 0.5}}]},
    "optimizer": {"name": "sgd", "lr": 0.05},
    "schedule": {"name": "onecycle", "max_lr": 0.1},
    "plugins": ["metrics", "checkpoint"],
}


@pytest.fixture
def tiny_recipe(tmp_path):
    """Write the tiny recipe (optionally changed) and return its path."""

    def write(**changes) -> Path:
        recipe = {**TINY_RECIPE, **changes}
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write
