"""The mixup and cutmix callbacks: label mixing, the box, determinism, and a run that uses them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from microtrain import RecipeError
from microtrain_plugins.callbacks.mixing import build_cutmix, build_mixup, cut_box, mix_labels

CLASSES = 5


def batch_state(epoch: int = 1, batch_index: int = 1, seed: int = 0, epochs: int = 10, size: int = 16):
    images = torch.arange(size, dtype=torch.float32).view(size, 1, 1, 1).expand(size, 3, 8, 8).contiguous()
    labels = torch.arange(size) % CLASSES
    return SimpleNamespace(recipe={"seed": seed}, epoch=epoch, epochs=epochs, batch_index=batch_index, rank=0,
                           batch=(images, labels), data=SimpleNamespace(num_classes=CLASSES))


@pytest.mark.parametrize("build", [build_mixup, build_cutmix])
@pytest.mark.parametrize("seed", range(5))
def test_mixed_labels_are_probabilities_and_weigh_each_image_by_its_share_of_pixels(build, seed) -> None:
    """Image i is filled with the value i and has class i: after mixing, an image's mean pixel value is the
    label-weighted mean of the classes, for mixup (blend) and cutmix (box; lam = share of pixels kept) alike."""
    state = batch_state(seed=seed, size=CLASSES)
    build(alpha=1.0).before_batch(state)
    images, labels = state.batch
    assert labels.shape == (CLASSES, CLASSES)
    assert torch.allclose(labels.sum(1), torch.ones(CLASSES)) and (labels >= 0).all()
    expected = (labels * torch.arange(CLASSES, dtype=torch.float32)).sum(1)
    assert torch.allclose(images.mean((1, 2, 3)), expected, atol=1e-5)


def test_mix_labels_weights_the_partner_by_one_minus_lam() -> None:
    labels = torch.tensor([0, 1, 2])
    mixed = mix_labels(labels, torch.tensor([2, 0, 1]), 0.7, 3)
    assert torch.allclose(mixed, torch.tensor([[0.7, 0.0, 0.3], [0.3, 0.7, 0.0], [0.0, 0.3, 0.7]]))
    again = mix_labels(mixed, torch.tensor([1, 2, 0]), 0.5, 3)  # soft labels mix again (mixup then cutmix)
    assert torch.allclose(again.sum(1), torch.ones(3))


def test_the_box_is_inside_the_image_and_has_the_asked_area_when_centred() -> None:
    import numpy as np

    for seed in range(50):
        top, bottom, left, right = cut_box(32, 32, 0.75, np.random.default_rng(seed))
        assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 32
        assert (bottom - top) * (right - left) <= 16 * 16


@pytest.mark.parametrize("build", [build_mixup, build_cutmix])
def test_draws_depend_only_on_seed_epoch_and_batch(build) -> None:
    """A resumed run rebuilds the callback: the same (seed, epoch, batch) must give the same mix."""
    first, second, other = batch_state(epoch=3, batch_index=7), batch_state(epoch=3, batch_index=7), batch_state(epoch=3, batch_index=8)
    build().before_batch(first)
    fresh = build()
    fresh.before_batch(batch_state(epoch=1, batch_index=1))  # history must not matter
    fresh.before_batch(second)
    build().before_batch(other)
    assert torch.equal(first.batch[0], second.batch[0]) and torch.equal(first.batch[1], second.batch[1])
    assert not torch.equal(first.batch[1], other.batch[1])


def test_probability_and_last_epochs_leave_batches_alone() -> None:
    state = batch_state()
    build_mixup(p=0.0).before_batch(state)
    assert state.batch[1].dim() == 1
    late = batch_state(epoch=9, epochs=10)
    build_cutmix(off_last_epochs=2).before_batch(late)
    assert late.batch[1].dim() == 1
    earlier = batch_state(epoch=8, epochs=10)
    build_cutmix(off_last_epochs=2).before_batch(earlier)
    assert earlier.batch[1].dim() == 2


def test_bad_options_are_refused_when_the_recipe_is_resolved(tiny_recipe) -> None:
    from microtrain.assembly import prepare_recipe

    with pytest.raises(RecipeError, match=r"plugins.mixup.alpha: must be > 0"):
        prepare_recipe(tiny_recipe(plugins=[{"mixup": {"alpha": 0}}]), [])
    with pytest.raises(RecipeError, match=r"plugins.cutmix.p: must be >= 0 and <= 1"):
        prepare_recipe(tiny_recipe(plugins=[{"cutmix": {"p": 1.5}}]), [])


def test_a_run_with_mixup_and_cutmix_trains_and_counts_train_accuracy(tiny_recipe, tmp_path) -> None:
    from microtrain.run import run

    recipe = tiny_recipe(plugins=["metrics", {"mixup": {"alpha": 0.4}}, {"cutmix": {"p": 0.5}}])
    assert run(recipe, [], run_dir=tmp_path / "run") == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["train_loss"] > 0 for row in rows)
    assert all(row["train_acc"] > 5.0 for row in rows), "train accuracy must count mixed batches too"
