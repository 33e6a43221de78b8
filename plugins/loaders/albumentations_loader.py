"""Loader ``albumentations``: a torch DataLoader whose workers run an albumentations pipeline.

Each worker produces a whole batch (one inter-process message per batch, not per image) of
augmented uint8 images; the main process turns it into a normalised float tensor on the device.
The augmentation of a batch is seeded from (seed, epoch, batch index), so results do not depend
on the number of workers and a run can be resumed exactly.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network at import

import numpy as np
import torch
from microtrain_plugins.loaders.augment_spec import parse_augment_list

import microtrain
from microtrain.errors import RecipeError
from microtrain.sampling import EpochBatches, batch_seed
from microtrain.state import LoaderContext


def build_transforms(entries: list[Any], where: str = "loader.augment"):
    """Recipe list -> albumentations Compose. An argument albumentations does not know is an error."""
    import albumentations as A

    transforms = []
    for i, (name, args) in enumerate(parse_augment_list(entries, where)):
        cls = getattr(A, name, None)
        if not (inspect.isclass(cls) and issubclass(cls, A.BasicTransform)):
            from microtrain.errors import did_you_mean

            known = [n for n in dir(A) if inspect.isclass(getattr(A, n)) and issubclass(getattr(A, n), A.BasicTransform)]
            raise RecipeError(f"{where}[{i}]: '{name}' is not an albumentations transform{did_you_mean(name, known)}")
        params = inspect.signature(cls.__init__).parameters
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        valid = [p for p in params if p not in ("self", "args", "kwargs")]
        for key in args:
            if key not in params or (accepts_any and key not in valid):
                from microtrain.errors import did_you_mean

                raise RecipeError(
                    f"{where}[{i}]: {name} has no argument '{key}'{did_you_mean(key, valid)} in albumentations 2.x "
                    f"(it would be silently ignored); its arguments are: {', '.join(valid)}"
                )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                warnings.filterwarnings("ignore", message=".*special case of Affine.*")  # ShiftScaleRotate works as Affine
                transforms.append(cls(**args))
        except Exception as exc:  # pydantic ValidationError, UserWarning turned error, TypeError
            first = str(exc).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:3])
            raise RecipeError(f"{where}[{i}]: invalid arguments for {name}: {detail[:300]}") from None
    return A.Compose(transforms)


class _BatchDataset(torch.utils.data.Dataset):
    """Index = (epoch, batch number): returns the augmented uint8 batch (B, H, W, C) and labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: list[Any], seed: int, rank: int):
        self.images, self.labels = images, labels
        self.augment = augment
        self.seed, self.rank = seed, rank
        self._pipeline = None

    def __getitem__(self, key: tuple[int, int, np.ndarray]):
        epoch, number, indices = key
        images = self.images[indices]
        if self.augment:
            if self._pipeline is None:  # built in the worker process: albumentations objects stay there
                self._pipeline = build_transforms(self.augment)
            self._pipeline.set_random_seed(batch_seed(self.seed, epoch, number, self.rank))
            images = np.stack([self._pipeline(image=image)["image"] for image in images])
        return torch.from_numpy(images), torch.from_numpy(self.labels[indices])

    def __len__(self) -> int:  # unused: batches are addressed through the sampler's keys
        return 0


class AlbumentationsLoader(EpochBatches):
    """Batches of (normalised float NCHW images, int64 labels) on ``context.device``."""

    def __init__(self, context: LoaderContext, *, batch_size: int, eval_batch_size: int, workers: int,
                 augment: list[Any], drop_last: bool, prefetch_factor: int):
        super().__init__(context, batch_size=batch_size, eval_batch_size=eval_batch_size, drop_last=drop_last)
        self.workers = workers
        augment = augment if self.train else []
        if augment:
            build_transforms(augment)  # validate now, in the main process, so errors surface before training
        self.dataset = _BatchDataset(context.images, context.labels, augment, context.seed, context.rank)
        device = context.device
        channels = context.images.shape[-1]
        self.mean = torch.tensor(context.mean, device=device).view(1, channels, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(context.std, device=device).view(1, channels, 1, 1) * 255.0)
        self._loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            sampler=_KeySampler(self),
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=prefetch_factor if workers > 0 else None,
            # Its own generator: an iterator draws a base seed, which from torch's global RNG would shift dropout's
            # random stream by one draw per new iterator and break exact mid-epoch resume.
            generator=torch.Generator().manual_seed(context.seed),
        )

    def keys(self) -> list[tuple[int, int, np.ndarray]]:
        """What the sampler hands the workers: (epoch, batch number, indices) for each batch left."""
        return [(self.epoch, number, indices) for number, indices in self.remaining_batches()]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.context.device
        non_blocking = device.type == "cuda"
        for images, labels in self._loader:
            images = images.to(device, non_blocking=non_blocking).permute(0, 3, 1, 2).float()
            images = (images - self.mean) * self.inv_std  # NHWC storage: already channels_last
            if not self.context.channels_last:
                images = images.contiguous()
            yield images, labels.to(device, non_blocking=non_blocking)


class _KeySampler(torch.utils.data.Sampler):
    def __init__(self, loader: AlbumentationsLoader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader.keys())

    def __len__(self) -> int:
        return len(self.loader)


def build_albumentations_loader(context: LoaderContext, *, batch_size: int = 128, eval_batch_size: int = 500,
                                workers: int = 1, augment: list = [], drop_last: bool = False,  # noqa: B006
                                prefetch_factor: int = 4) -> AlbumentationsLoader:
    """CPU augmentation with albumentations in DataLoader worker processes (any albumentations transform)."""
    if batch_size < 1 or eval_batch_size < 1:
        raise RecipeError("loader.batch_size and loader.eval_batch_size must be at least 1")
    if workers < 0:
        raise RecipeError(f"loader.workers must be 0 (augment in the main process) or more, got {workers}")
    return AlbumentationsLoader(context, batch_size=batch_size, eval_batch_size=eval_batch_size, workers=workers,
                                augment=augment, drop_last=drop_last, prefetch_factor=prefetch_factor)


@microtrain.hookimpl
def register_components(registry):
    registry.loader("albumentations", build_albumentations_loader)
