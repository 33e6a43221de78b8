"""Loader ``albumentations``: a torch DataLoader whose workers run an albumentations pipeline.

Each worker produces a whole batch (one inter-process message per batch, not per image) of
augmented uint8 images; the main process turns it into a normalised float tensor on the device.
The augmentation of a batch is seeded from (seed, epoch, batch index), so results do not depend
on the number of workers and a run can be resumed exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Annotated, Any

import numpy as np
import torch

import microtrain
from microtrain import Check, EpochBatches, LoaderContext, Range, batch_seed
from microtrain_plugins.loaders.augment_spec import CONTRACT, build_transforms, check_against_images, check_augment_list


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
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The image is already gray")  # ToGray on gray images: as it is
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
        if augment:  # here, in the main process, so an error surfaces before any worker starts
            check_against_images(augment, context.images.shape[1:])
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
        # A generator, so the keys are read when the first batch is asked for: a new multi-worker DataLoader
        # iterator calls iter(sampler) twice and drops the first one, which must not use up a resume's start batch.
        yield from self.loader.keys()

    def __len__(self) -> int:
        return len(self.loader)


def build_albumentations_loader(context: LoaderContext, *, batch_size: Annotated[int, Range(ge=1)] = 128,
                                eval_batch_size: Annotated[int, Range(ge=1)] = 500,
                                workers: Annotated[int, Range(ge=0)] = 1,
                                augment: Annotated[list, Check(check_augment_list, CONTRACT)] = [],  # noqa: B006
                                drop_last: bool = False,
                                prefetch_factor: Annotated[int, Range(ge=1)] = 4) -> AlbumentationsLoader:
    """CPU augmentation with albumentations in DataLoader worker processes (any size-keeping transform).

    ``workers=0`` augments in the main process."""
    return AlbumentationsLoader(context, batch_size=batch_size, eval_batch_size=eval_batch_size, workers=workers,
                                augment=augment, drop_last=drop_last, prefetch_factor=prefetch_factor)


@microtrain.hookimpl
def register_components(registry):
    registry.loader("albumentations", build_albumentations_loader)
