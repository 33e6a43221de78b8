"""What the report shows of the data: the most confidently wrong test images (kept by a collector that
rides along the engine's evaluation pass) and training images as the train loader delivers them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Predictions:
    """The most confidently wrong images of one pass, most confident first."""

    images: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.uint8))  # uint8 (k, H, W, C), real colours
    true: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    predicted: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))  # softmax of the prediction


def denormalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Loader batch (float NCHW, normalised with mean/std in [0, 1]) -> uint8 NHWC in real colours."""
    channels = images.shape[1]
    scale = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, channels, 1, 1) * 255.0
    shift = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, channels, 1, 1) * 255.0
    pixels = (images.float() * scale + shift).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


class MistakeCollector:
    """A collector for :func:`microtrain.evaluate`: keeps the ``keep`` most confidently wrong images.

    Only the few kept images are de-normalised and copied to the host, so the pass costs little more
    than an evaluation. Earlier images win ties."""

    def __init__(self, keep: int, mean: Sequence[float], std: Sequence[float]):
        self.keep, self.mean, self.std = keep, mean, std
        self.found = Predictions()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> None:
        if self.keep <= 0:
            return
        top, guess = logits.float().softmax(1).max(1)
        labels_np, guess_np = labels.cpu().numpy(), guess.cpu().numpy()
        wrong = np.flatnonzero(labels_np != guess_np)
        if wrong.size == 0:
            return
        top_np = top.cpu().numpy().astype(np.float64)
        wrong = wrong[np.argsort(-top_np[wrong], kind="stable")[: self.keep]]
        picked = denormalise(images[torch.as_tensor(wrong, device=images.device)], self.mean, self.std)
        found = self.found
        images_np = picked if found.images.size == 0 else np.concatenate([found.images, picked])
        true = np.concatenate([found.true, labels_np[wrong]])
        predicted = np.concatenate([found.predicted, guess_np[wrong]])
        confidence = np.concatenate([found.confidence, top_np[wrong]])
        order = np.argsort(-confidence, kind="stable")[: self.keep]
        self.found = Predictions(images_np[order], true[order], predicted[order], confidence[order])


def loader_samples(loader: Any, mean: Sequence[float], std: Sequence[float], count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` images of epoch 1's first batch, as the train loader delivers them (augmented)."""
    loader.set_epoch(1)
    iterator = iter(loader)
    try:
        images, labels = next(iterator)
    finally:
        del iterator
    images, labels = images[:count], labels[:count]
    if labels.dim() != 1:  # soft labels (e.g. mixed batches): show the strongest class
        labels = labels.argmax(1)
    return denormalise(images, mean, std), labels.cpu().numpy()
