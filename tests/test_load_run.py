"""microtrain.load_run: the evaluation model, classes and preprocessing of a finished run, without its dataset.

The must-hold: the test split predicted from a checkpoint scores exactly the test accuracy the run logged for
that checkpoint's epoch (EMA weights, flip TTA and the test batch size included)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from trained_runs import copy_with_another_model, logged_test_acc

import microtrain
from microtrain import CheckpointError, DataError, MicrotrainError


def accuracy(loaded: microtrain.LoadedRun, images, labels) -> float:
    predicted = loaded.predict(images).argmax(1).numpy()
    return 100.0 * int((predicted == np.asarray(labels)).sum()) / len(labels)


@pytest.mark.parametrize("fixture", ["synthetic_run", "imagefolder_run", "cifar_run"])
def test_predicting_the_test_split_reproduces_the_logged_accuracy(fixture, request):
    run_dir = request.getfixturevalue(fixture)
    loaded = microtrain.load_run(run_dir)
    assert loaded.from_recorded_data  # the checkpoint records mean, std and shape: no dataset was read
    assert loaded.epoch == 2 and loaded.logged_metrics["test_acc"] == logged_test_acc(run_dir)
    data = loaded.dataset()
    assert accuracy(loaded, data.test_images, data.test_labels) == logged_test_acc(run_dir)


def test_the_loaded_model_is_the_runs_evaluation_model(synthetic_run):
    checkpoint = microtrain.load_checkpoint(synthetic_run / "checkpoints" / "last.pt")
    loaded = microtrain.load_run(synthetic_run)
    ema = checkpoint["plugins"]["ema"]["state_dict"]
    assert all(torch.equal(value.cpu(), ema[name]) for name, value in loaded.model.state_dict().items())
    raw = microtrain.load_run(synthetic_run, raw=True)
    assert all(torch.equal(value.cpu(), checkpoint["model"][name]) for name, value in raw.model.state_dict().items())
    images = loaded.dataset().test_images[:16]
    assert not torch.equal(raw.predict(images), loaded.predict(images))
    assert loaded.classes == checkpoint["classes"] and loaded.image_shape == (3, 32, 32)
    assert loaded.recipe["name"] == "synthetic_run" and not loaded.model.training


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_each_checkpoint_reproduces_what_was_logged_for_its_epoch(synthetic_run, name):
    loaded = microtrain.load_run(synthetic_run / "checkpoints" / name)
    assert loaded.checkpoint_path.name == name
    data = loaded.dataset()
    assert accuracy(loaded, data.test_images, data.test_labels) == logged_test_acc(synthetic_run, loaded.epoch)


@pytest.mark.parametrize("loader", ["albumentations", "tensor"])
def test_preprocess_gives_the_test_loaders_bits(synthetic_run, loader):
    """The same normalisation, in the same float operations, as each loader's test batches."""
    loaded = microtrain.load_run(synthetic_run)
    recipe = dict(loaded.recipe)
    if loader == "tensor":
        recipe["loader"] = {"name": "tensor", "batch_size": 32, "eval_batch_size": 40}
    run = microtrain.build_run(recipe, run_dir=synthetic_run, callbacks="none")
    images, _ = next(iter(run.state.test_loader))
    mine = loaded.preprocess(run.state.data.test_images[: len(images)])
    assert mine.dtype == torch.float32 and torch.equal(mine, images)
    assert mine.is_contiguous(memory_format=torch.channels_last) == bool(loaded.recipe["channels_last"])


def test_images_are_converted_and_resized_as_the_image_folder_dataset_does(tmp_path, synthetic_run):
    """Gray, RGBA, palette and other-size files become what training's decoder makes of them."""
    from PIL import Image

    from microtrain_plugins.data.imagefolder import _decode

    loaded = microtrain.load_run(synthetic_run)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (45, 37, 4), dtype=np.uint8)
    for mode in ("L", "RGB", "RGBA", "P", "LA"):
        path = tmp_path / f"{mode}.png"
        Image.fromarray(pixels, "RGBA").convert(mode).save(path)
        with Image.open(path) as picture:
            assert np.array_equal(loaded.to_arrays(picture)[0], _decode(path, 32)), mode
    with Image.open(tmp_path / "L.png") as picture:
        gray = np.asarray(picture)
        assert gray.ndim == 2 and np.array_equal(loaded.to_arrays(gray), loaded.to_arrays(picture))  # 2-D: a gray image
    assert np.array_equal(loaded.to_arrays(pixels)[0], _decode(tmp_path / "RGBA.png", 32))  # RGBA array: alpha dropped
    batch = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    assert np.array_equal(loaded.to_arrays(batch), batch) and loaded.preprocess(batch).shape == (5, 3, 32, 32)


def test_a_checkpoint_without_recorded_statistics_reads_the_dataset(tmp_path, synthetic_run):
    """Checkpoints written before checkpoint['data'] existed still load: the dataset gives the statistics."""
    old = tmp_path / "old_run"
    shutil.copytree(synthetic_run, old)
    checkpoint = microtrain.load_checkpoint(old / "checkpoints" / "last.pt")
    del checkpoint["data"]
    microtrain.atomic_save(checkpoint, old / "checkpoints" / "last.pt")
    loaded, new = microtrain.load_run(old), microtrain.load_run(synthetic_run)
    assert not loaded.from_recorded_data and (loaded.mean, loaded.std) == (new.mean, new.std)
    data = loaded.dataset()
    assert torch.equal(loaded.predict(data.test_images), new.predict(data.test_images))


def test_the_real_cifar10_run_reproduces_its_logged_accuracy():
    """The 50-epoch dsresnet run in docs/bench (a checkpoint written before checkpoint['data']): 10,000 test images
    through EMA weights and flip TTA. Minutes on 2 cores, so only with MICROTRAIN_SLOW_TESTS=1 and the data present."""
    import os

    from conftest import REPO, real_cifar_root

    root = real_cifar_root()
    if root is None or os.environ.get("MICROTRAIN_SLOW_TESTS") != "1":
        pytest.skip("needs the CIFAR-10 copy and MICROTRAIN_SLOW_TESTS=1")
    run_dir = REPO / "docs" / "bench" / "dsresnet-50ep-seed1"
    loaded = microtrain.load_run(run_dir, overrides=[f"data.root={root}"])
    data = loaded.dataset()
    assert accuracy(loaded, data.test_images, data.test_labels) == logged_test_acc(run_dir) == 92.25


@pytest.mark.parametrize("make, error, pattern", [
    (lambda run, tmp: tmp / "nowhere", MicrotrainError, "run dir or checkpoint .* not found"),
    (lambda run, tmp: (tmp / "empty").mkdir() or tmp / "empty", MicrotrainError, "has no recipe.yaml"),
    (lambda run, tmp: _without_checkpoint(run, tmp), CheckpointError, "has no checkpoints/last.pt"),
    (lambda run, tmp: _file(tmp / "r" / "checkpoints" / "x.pt", run, b"not a checkpoint"), CheckpointError, "corrupt or unsafe"),
])
def test_bad_paths_are_one_clear_error(make, error, pattern, tmp_path, synthetic_run):
    with pytest.raises(error, match=pattern):
        microtrain.load_run(make(synthetic_run, tmp_path))


def test_a_checkpoint_of_another_model_is_refused(tmp_path, synthetic_run):
    other = copy_with_another_model(synthetic_run, tmp_path / "other")
    with pytest.raises(CheckpointError, match="does not belong to the run .* does not fit"):
        microtrain.load_run(other)


def test_bad_image_arrays_are_refused(synthetic_run):
    loaded = microtrain.load_run(synthetic_run)
    with pytest.raises(DataError, match="uint8"):
        loaded.preprocess(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(DataError, match="shape"):
        loaded.preprocess(np.zeros((32, 32, 2), dtype=np.uint8))
    with pytest.raises(DataError, match="cannot read a str"):
        loaded.preprocess(["cat.png"])


def _without_checkpoint(run: Path, tmp: Path) -> Path:
    target = tmp / "no_checkpoint"
    target.mkdir()
    shutil.copy(run / "recipe.yaml", target / "recipe.yaml")
    return target


def _file(path: Path, run: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True)
    shutil.copy(run / "recipe.yaml", path.parent.parent / "recipe.yaml")
    path.write_bytes(content)
    return path
