"""The validation split (recipe field ``val_fraction``): a stratified hold-out of the train split chosen by
the seed alone, never augmented, evaluated every epoch, and what best.pt is chosen on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

import microtrain
from microtrain import RecipeError
from microtrain.sampling import stratified_holdout

RECIPE = {
    "name": "val_split", "epochs": 3, "seed": 4, "threads": 1, "val_fraction": 0.25,
    "data": {"name": "synthetic", "train_size": 200, "test_size": 80},
    "model": {"name": "dsresnet", "widths": [8, 16], "blocks": [1, 1]},
    "loader": {"name": "tensor", "batch_size": 32, "augment": [{"HorizontalFlip": {"p": 0.5}}]},
    "optimizer": {"name": "sgd", "lr": 0.05}, "schedule": {"name": "onecycle", "max_lr": 0.1},
    "plugins": ["metrics", "checkpoint", "summary", "report"],
}


def test_the_holdout_takes_the_fraction_of_every_class_and_depends_only_on_the_seed() -> None:
    labels = np.repeat(np.arange(5), [40, 40, 40, 7, 1])
    kept, held = stratified_holdout(labels, 0.25, seed=3)
    assert np.intersect1d(kept, held).size == 0 and np.union1d(kept, held).size == len(labels)
    assert [int((labels[held] == c).sum()) for c in range(5)] == [10, 10, 10, 2, 0]  # a class of one stays trained
    again_kept, again_held = stratified_holdout(labels.copy(), 0.25, seed=3)
    assert np.array_equal(held, again_held) and np.array_equal(kept, again_kept)
    assert not np.array_equal(held, stratified_holdout(labels, 0.25, seed=4)[1])
    assert stratified_holdout(labels, 0.0, seed=3)[1].size == 0
    assert [int((labels[stratified_holdout(labels, 0.01, seed=3)[1]] == c).sum()) for c in range(4)] == [1, 1, 1, 1]


def test_val_fraction_is_checked_when_the_recipe_is_resolved() -> None:
    from microtrain.assembly import prepare_recipe

    with pytest.raises(RecipeError, match=r"val_fraction: must be >= 0 and <= 0.5"):
        prepare_recipe({**RECIPE, "val_fraction": 0.9})


def test_the_split_is_held_out_of_training_and_never_augmented() -> None:
    run = microtrain.build_run(RECIPE, callbacks="none", run_dir="unused")
    state = run.state
    data = state.data
    kept, held = stratified_holdout(data.train_labels, 0.25, seed=4)
    assert len(state.train_loader.context.labels) == len(kept) and len(state.val_loader.context.labels) == len(held)
    assert state.val_loader.context.train is False  # the test-time path: no augmentation, no shuffling
    assert np.array_equal(state.val_loader.context.images, data.train_images[held])
    assert np.array_equal(state.train_loader.context.images, data.train_images[kept])
    train_pixels = {image.tobytes() for image in state.train_loader.context.images}
    assert not any(image.tobytes() in train_pixels for image in state.val_loader.context.images)
    assert state.steps_per_epoch == -(-len(kept) // 32)
    # Every loader and process gets the same split: it is made from the recipe's seed before any loader exists.
    other = microtrain.build_run(RECIPE, ["loader.name=albumentations", "loader.workers=0"], callbacks="none",
                                 run_dir="unused").state
    assert np.array_equal(other.val_loader.context.labels, state.val_loader.context.labels)


def _run(tmp_path: Path, name: str, *overrides: str) -> Path:
    from microtrain.run import run

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    assert run(recipe, list(overrides), run_dir=tmp_path / name) == 0
    return tmp_path / name


def test_a_run_logs_validation_figures_and_picks_best_pt_on_them(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, "run")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert {"val_loss", "val_acc", "val_per_class_acc", "val_confusion", "test_acc", "per_class_acc"} <= set(row)
        assert sum(map(sum, row["val_confusion"])) == 50  # a quarter of every class of 200 images
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    chosen = max(rows, key=lambda row: row["val_acc"])  # the first of equal bests
    assert best == {"epoch": chosen["epoch"], "monitor": "val_acc", "value": chosen["val_acc"], "split": "validation split"}
    assert microtrain.load_checkpoint(run_dir / "checkpoints" / "best.pt")["epoch"] == chosen["epoch"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_val_epoch"] == chosen["epoch"] and summary["test_acc_at_best_val"] == chosen["test_acc"]
    report = (run_dir / "report" / "report.md").read_text()
    assert "best validation accuracy" in report and "chosen on val_acc" in report


def test_without_a_split_best_pt_says_it_was_chosen_on_the_test_split(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, "no_split", "val_fraction=0", "epochs=2")
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert best["monitor"] == "test_acc" and best["split"] == "test split"
    assert "picked by looking at the test split" in (run_dir / "report" / "report.md").read_text()
    assert not any("val_acc" in json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())


def test_a_validation_monitor_without_a_split_is_refused(tmp_path: Path) -> None:
    from microtrain.run import run

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "val_fraction": 0.0,
                                      "plugins": ["metrics", {"checkpoint": {"monitor": "val_acc"}}]}))
    with pytest.raises(RecipeError, match="needs a validation split"):
        run(recipe, [], run_dir=tmp_path / "refused")


def test_an_image_folder_dataset_holds_out_the_same_share_of_every_class(tmp_path: Path) -> None:
    """The split is made on the labels any dataset gives, before any loader: an image folder of 3 classes too."""
    from trained_runs import write_image_folder

    write_image_folder(tmp_path / "images", classes=3, train_per_class=20, test_per_class=4)
    recipe = {**RECIPE, "val_fraction": 0.2,
              "data": {"name": "imagefolder", "root": str(tmp_path / "images"), "image_size": 32}}
    state = microtrain.build_run(recipe, callbacks="none", run_dir="unused").state
    held_labels = state.val_loader.context.labels
    assert sorted(np.bincount(held_labels).tolist()) == [4, 4, 4]
    assert np.bincount(state.train_loader.context.labels).tolist() == [16, 16, 16]
    again = microtrain.build_run(recipe, callbacks="none", run_dir="unused").state
    assert np.array_equal(again.val_loader.context.images, state.val_loader.context.images)
