"""The objects that pass between the engine and plugins: the dataset arrays, the context a
loader is built with, and the one ``State`` every hook receives."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    import pluggy


@dataclass
class ImageData:
    """A dataset held in memory: uint8 images ``(N, H, W, C)`` and int64 labels for each split.

    Every dataset plugin returns one. ``mean``/``std`` are per-channel in [0, 1] and are what
    loaders normalise with.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image as the model sees it."""
        _, h, w, c = self.train_images.shape
        return (c, h, w)

    def split(self, train: bool) -> tuple[np.ndarray, np.ndarray]:
        return (self.train_images, self.train_labels) if train else (self.test_images, self.test_labels)


@dataclass
class LoaderContext:
    """What the engine tells a loader factory besides the recipe options."""

    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    train: bool  # shuffle and augment when True
    device: torch.device
    seed: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rank: int = 0
    world_size: int = 1
    channels_last: bool = False


class Loader(Protocol):
    """What the engine needs from a loader: batches of ``(images, labels)`` already on
    ``context.device`` (images float32 NCHW, normalised; labels int64), a length in batches,
    and ``set_epoch`` so shuffling and augmentation depend only on (seed, epoch)."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...


@dataclass
class State:
    """Everything a hook may look at. Fields a hook may change say so in the hook's docstring."""

    recipe: dict[str, Any]
    run_dir: Path
    device: torch.device
    data: ImageData
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: Any
    test_loader: Any
    epochs: int
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    start_epoch: int = 1
    start_batch: int = 0  # batches of start_epoch already trained: a mid-epoch checkpoint was restored
    step: int = 0
    batch_index: int = 0
    epoch_totals: dict[str, Any] = field(default_factory=dict)  # running train sums of the epoch in progress
    steps_per_epoch: int = 0
    batch: tuple[torch.Tensor, torch.Tensor] | None = None
    loss: torch.Tensor | None = None
    eval_model: torch.nn.Module | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    stop_training: bool = False
    status: str = "running"
    plugin_manager: pluggy.PluginManager | None = None  # calls the hooks; checkpoints and evaluation use it
    grad_scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling (disabled, but present, otherwise)
    val_loader: Any = None  # the held-out share of the train split (recipe field val_fraction), or None
    eval_every: int = 1  # recipe field eval_every: epochs between two evaluations (the last epoch is always one)

    def evaluates(self, epoch: int) -> bool:
        """Whether the engine evaluates after ``epoch``: every ``eval_every``-th epoch and the last."""
        return epoch % self.eval_every == 0 or epoch >= self.epochs

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        """The model without a DistributedDataParallel or torch.compile wrapper."""
        return _unwrap(self.model)

    @property
    def unwrapped_eval_model(self) -> torch.nn.Module:
        """The model evaluation uses, without DistributedDataParallel (a pass on one rank alone must not wait for
        the others) and without torch.compile (one pass is not worth compiling)."""
        return _unwrap(self.eval_model if self.eval_model is not None else self.model)  # bool() of a compiled module raises


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)
