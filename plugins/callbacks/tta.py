"""Callback ``tta``: test-time augmentation in evaluation.

With ``flip`` on, the logits of a test batch are the mean of the model's LOGITS for the images and
for their left-right mirror (the averaged logits go into the loss and the argmax, so test_loss is
the cross-entropy of the averaged logits). Both views go through the model as one batch of 2B
images: one forward call, and in eval mode BatchNorm uses running statistics, so the result does
not depend on the batching. Only evaluation is affected; training is unchanged.
"""

from __future__ import annotations

import torch

import microtrain


class FlipTTA:
    def __init__(self, *, flip: bool):
        self.flip = flip

    @microtrain.hookimpl
    def predict(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor | None:
        """Mean logits of the images and their mirror; None (plain forward) when flip is off."""
        if not self.flip:
            return None
        count = images.shape[0]
        logits = model(torch.cat([images, images.flip(3)]))
        # Slices, not chunk(2): torch.export cannot prove chunk's halves are `count` long for every batch size, so an
        # exported model with a dynamic batch (microtrain export) would fail; the values are the same.
        return (logits[:count] + logits[count:]) * 0.5


def build_tta(*, flip: bool = True) -> FlipTTA:
    """Test-time augmentation: average the logits of each test image and its horizontal mirror."""
    return FlipTTA(flip=flip)


@microtrain.hookimpl
def register_components(registry):
    registry.callback("tta", build_tta)
