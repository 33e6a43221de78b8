"""Callbacks ``mixup`` and ``cutmix``: batch-level augmentation that mixes pairs of training images
and their labels, for any loader (they work on the batch the loader delivered, in ``before_batch``).

mixup blends whole images, ``lam * x + (1 - lam) * x[perm]``; cutmix pastes a box of ``x[perm]``
into ``x`` and sets ``lam`` to the share of pixels left. Either way the labels become soft,
``lam * y + (1 - lam) * y[perm]`` (one-hot, or already soft when both callbacks are on), which the
engine's cross-entropy takes as class probabilities; train accuracy then counts the prediction
against the label's strongest class. ``lam`` is drawn from Beta(alpha, alpha).

Every random draw comes from a generator seeded by (seed, epoch, batch, rank), so a run is
repeatable and a resumed run mixes exactly as an uninterrupted one. ``p`` is the probability that a
batch is mixed at all; ``off_last_epochs`` turns mixing off for the final epochs, so the model ends
on the data it is tested on.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F

import microtrain
from microtrain import Range

SALT = {"mixup": 0x3A1, "cutmix": 0xC07}  # separate streams, so listing both gives independent draws


def soft_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class probabilities: one-hot for integer labels, unchanged when already soft."""
    return F.one_hot(labels, num_classes).float() if labels.dim() == 1 else labels


def mix_labels(labels: torch.Tensor, permutation: torch.Tensor, lam: float, num_classes: int) -> torch.Tensor:
    soft = soft_labels(labels, num_classes)
    return lam * soft + (1.0 - lam) * soft[permutation]


def cut_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box covering about ``1 - lam`` of the image, its centre uniform over the image, clipped to it."""
    ratio = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(round(height * ratio)), int(round(width * ratio))
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, width)
    return top, bottom, left, right


class BatchMixing:
    """One of the two mixings; ``kind`` is "mixup" or "cutmix"."""

    def __init__(self, kind: str, *, alpha: float, p: float, off_last_epochs: int):
        self.kind, self.alpha, self.p, self.off_last_epochs = kind, alpha, p, off_last_epochs

    def rng(self, state) -> np.random.Generator:
        """This batch's own generator: the draws depend only on (seed, epoch, batch, rank), never on the past."""
        return np.random.default_rng([state.recipe["seed"], state.epoch, state.batch_index, state.rank, SALT[self.kind]])

    @microtrain.hookimpl
    def before_batch(self, state):
        if state.epoch > state.epochs - self.off_last_epochs:
            return
        rng = self.rng(state)
        if rng.random() >= self.p:
            return
        images, labels = state.batch
        lam = float(rng.beta(self.alpha, self.alpha))
        permutation = torch.as_tensor(rng.permutation(images.shape[0]), device=images.device)
        if self.kind == "mixup":
            mixed = images * lam + images[permutation] * (1.0 - lam)
        else:
            top, bottom, left, right = cut_box(images.shape[2], images.shape[3], lam, rng)
            mixed = images.clone()
            mixed[:, :, top:bottom, left:right] = images[permutation, :, top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (images.shape[2] * images.shape[3])
        state.batch = (mixed, mix_labels(labels, permutation, lam, state.data.num_classes))


def build_mixup(*, alpha: Annotated[float, Range(gt=0)] = 0.2, p: Annotated[float, Range(ge=0, le=1)] = 1.0,
                off_last_epochs: Annotated[int, Range(ge=0)] = 0) -> BatchMixing:
    """mixup: blend pairs of training images and their labels (lam ~ Beta(alpha, alpha)) with probability p."""
    return BatchMixing("mixup", alpha=alpha, p=p, off_last_epochs=off_last_epochs)


def build_cutmix(*, alpha: Annotated[float, Range(gt=0)] = 1.0, p: Annotated[float, Range(ge=0, le=1)] = 1.0,
                 off_last_epochs: Annotated[int, Range(ge=0)] = 0) -> BatchMixing:
    """cutmix: paste a box of another training image into each image, labels mixed by the box's area, with probability p."""
    return BatchMixing("cutmix", alpha=alpha, p=p, off_last_epochs=off_last_epochs)


@microtrain.hookimpl
def register_components(registry):
    registry.callback("mixup", build_mixup)
    registry.callback("cutmix", build_cutmix)
