"""Loader ``tensor``: the whole dataset held once as a uint8 tensor on the training device, augmented
a whole batch at a time with torch ops.

There are no worker processes and no per-sample Python: a batch is one index into the resident
tensor, then each augmentation is a handful of batched tensor ops (a per-sample random mask and
``torch.where``; affine warps through a sampling grid and ``F.grid_sample``; cutout holes through
broadcast index comparisons). On a GPU the images never leave the device; on a CPU this avoids
the DataLoader's inter-process copies.

The recipe's ``augment`` list is the same as for the other loaders: microtrain_plugins.loaders.augment_spec
validates it, reads it back as loader-neutral specs and draws every batch's random parameters (the
same draws as the dali loader's, from a torch generator here), so an argument means the same thing
here. This loader also runs microtrain's own TrivialAugment and RandAugment (policy_augment), with a
random op and magnitude per sample drawn from the same batch generator. Sample order comes from
microtrain.epoch_batches and the generator is seeded with microtrain.batch_seed(seed, epoch, batch,
rank): results depend only on (seed, epoch, batch), so resuming mid-epoch reproduces the same batches.

Augmentation works in float32 on the 0-255 scale and is not rounded back to integers in between
(albumentations rounds to uint8 after every transform, and a fractional fill to a whole level), so
values can differ from it by < 1 level.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F

import microtrain
from microtrain import Check, EpochBatches, LoaderContext, Range, RecipeError, batch_seed
from microtrain_plugins.loaders.augment_spec import (
    CANONICAL_CONTRACT,
    AffineSpec,
    DropoutSpec,
    FlipSpec,
    GraySpec,
    Spec,
    TorchRandom,
    canonical_check,
    canonical_specs,
    changes_pixels,
    draw_batch,
    spec_fill,
)
from microtrain_plugins.loaders.policy_augment import POLICY_CONTRACT, PolicyOps, PolicySpec

LUMA = (0.299, 0.587, 0.114)
AUGMENT_CONTRACT = f"{CANONICAL_CONTRACT}; {POLICY_CONTRACT}"


# ---------------------------------------------------------------------------------------------
# Batched transforms on float images (B, C, H, W) on the 0-255 scale. Each takes its random
# parameters explicitly, so tests can check the geometry against a hand computation or OpenCV.

def flip(images: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the samples where ``apply`` (bool, (B,)) is set."""
    return torch.where(apply.view(-1, 1, 1, 1), images.flip(-1), images)


def affine_theta(translate_px: torch.Tensor, scale: torch.Tensor, rotate_deg: torch.Tensor, height: int,
                 width: int) -> torch.Tensor:
    """The (B, 2, 3) ``F.affine_grid`` matrices for albumentations' Affine with these parameters.

    Albumentations maps a source pixel p to ``c + t + R s (p - c)`` around the centre
    ``c = (W/2 - 0.5, H/2 - 0.5)`` with ``R = [[cos, sin], [-sin, cos]]`` (OpenCV warps with it).
    affine_grid needs the inverse (output -> source) in normalised coordinates, where pixel
    centres are at ``(2x + 1)/W - 1`` (align_corners=False) and so ``c`` is the origin."""
    radians = torch.deg2rad(rotate_deg)
    cos, sin = torch.cos(radians) / scale, torch.sin(radians) / scale
    # Inverse linear part (1/s) R^T, conjugated by diag(W/2, H/2) into normalised units.
    a, b = cos, -sin * (height / width)
    c, d = sin * (width / height), cos
    tx = 2.0 * translate_px[:, 0] / width
    ty = 2.0 * translate_px[:, 1] / height
    row0 = torch.stack([a, b, -(a * tx + b * ty)], dim=1)
    row1 = torch.stack([c, d, -(c * tx + d * ty)], dim=1)
    return torch.stack([row0, row1], dim=1)


def sampling_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``F.affine_grid(theta, (B, C, H, W), align_corners=False)`` by broadcasting: the same
    (B, H, W, 2) grid, without affine_grid's batched matmul, which dominates it for small images."""
    xs = (torch.arange(width, device=theta.device, dtype=theta.dtype) * 2 + 1) / width - 1
    ys = (torch.arange(height, device=theta.device, dtype=theta.dtype) * 2 + 1) / height - 1
    xs, ys = xs.view(1, 1, width), ys.view(1, height, 1)
    t = theta.unsqueeze(-1).unsqueeze(-1)  # (B, 2, 3, 1, 1)
    gx = t[:, 0, 0] * xs + t[:, 0, 1] * ys + t[:, 0, 2]
    gy = t[:, 1, 0] * xs + t[:, 1, 1] * ys + t[:, 1, 2]
    return torch.stack([gx, gy], dim=-1)


def affine(images: torch.Tensor, apply: torch.Tensor, theta: torch.Tensor, fill: torch.Tensor,
           mode: str = "bilinear") -> torch.Tensor:
    """Warp the samples where ``apply`` is set with bilinear (or nearest) sampling; uncovered pixels get ``fill``.

    Sampling ``images - fill`` with zero padding and adding ``fill`` back blends border pixels with
    the fill colour exactly as OpenCV's BORDER_CONSTANT does, without a second validity pass."""
    _, c, h, w = images.shape
    grid = sampling_grid(theta.to(images.dtype), h, w)
    fill = fill.view(1, c, 1, 1)
    warped = F.grid_sample(images - fill, grid, mode=mode, padding_mode="zeros", align_corners=False) + fill
    return torch.where(apply.view(-1, 1, 1, 1), warped, images)


def hole_mask(top: torch.Tensor, left: torch.Tensor, height: torch.Tensor, width: torch.Tensor, active: torch.Tensor,
              image_height: int, image_width: int) -> torch.Tensor:
    """(B, H, W) bool: inside any active hole. Holes are (B, K) tensors of top/left/height/width."""
    rows = torch.arange(image_height, device=top.device).view(1, 1, -1)
    cols = torch.arange(image_width, device=top.device).view(1, 1, -1)
    in_rows = (rows >= top.unsqueeze(-1)) & (rows < (top + height).unsqueeze(-1)) & active.unsqueeze(-1)  # (B, K, H)
    in_cols = (cols >= left.unsqueeze(-1)) & (cols < (left + width).unsqueeze(-1))  # (B, K, W)
    return (in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2)).any(dim=1)


def dropout(images: torch.Tensor, apply: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Set the pixels of ``mask`` (B, H, W) to ``fill`` in the samples where ``apply`` is set."""
    where = (mask & apply.view(-1, 1, 1)).unsqueeze(1)
    return torch.where(where, fill.view(1, -1, 1, 1), images)


def gray(images: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Replace every channel by the luma 0.299 R + 0.587 G + 0.114 B where ``apply`` is set."""
    weights = torch.tensor(LUMA, device=images.device, dtype=images.dtype)
    luma = torch.einsum("bchw,c->bhw", images, weights).unsqueeze(1)  # a matvec in either memory layout
    return torch.where(apply.view(-1, 1, 1, 1), luma.expand_as(images), images)


# ---------------------------------------------------------------------------------------------

class BatchAugment:
    """The canonical specs of a recipe's augment list, applied to whole batches in order."""

    def __init__(self, specs: list[Spec], channels: int, height: int, width: int, device: torch.device):
        self.specs = specs
        self.channels, self.height, self.width = channels, height, width
        self.device = device
        self.fills = {i: torch.tensor(spec_fill(spec, channels, i), dtype=torch.float32, device=device)
                      for i, spec in enumerate(specs) if isinstance(spec, (AffineSpec, DropoutSpec))}
        self.policies = {i: PolicyOps(spec, channels, height, width, device, spec_fill(spec, channels, i))
                         for i, spec in enumerate(specs) if isinstance(spec, PolicySpec)}

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        h, w = self.height, self.width
        draws = draw_batch(self.specs, images.shape[0], h, w, TorchRandom(generator, self.device))
        for i, (spec, draw) in enumerate(zip(self.specs, draws, strict=True)):
            if not changes_pixels(spec, self.channels):
                continue
            if isinstance(spec, FlipSpec):
                images = flip(images, draw.apply)
            elif isinstance(spec, AffineSpec):
                shift = torch.stack([draw.params.translate_x, draw.params.translate_y], dim=1)
                theta = affine_theta(shift, draw.params.scale, draw.params.rotate, h, w)
                images = affine(images, draw.apply, theta, self.fills[i])
            elif isinstance(spec, DropoutSpec):
                holes = draw.params
                mask = hole_mask(holes.top, holes.left, holes.height, holes.width, holes.active, h, w)
                images = dropout(images, draw.apply, mask, self.fills[i])
            elif isinstance(spec, GraySpec):
                images = gray(images, draw.apply)
            elif isinstance(spec, PolicySpec):  # TrivialAugment, RandAugment: geometric ops warped by affine()
                images = self.policies[i](images, draw.apply, draw.params, warp=affine)
        return images


class TensorLoader(EpochBatches):
    """Batches of (normalised float NCHW images, int64 labels) cut from a device-resident uint8 tensor."""

    def __init__(self, context: LoaderContext, *, batch_size: int, eval_batch_size: int, augment: list[Any],
                 drop_last: bool):
        super().__init__(context, batch_size=batch_size, eval_batch_size=eval_batch_size, drop_last=drop_last)
        device = context.device
        if context.images.ndim != 4 or context.images.dtype != np.uint8:
            raise RecipeError(f"loader.name=tensor needs uint8 images (N, H, W, C), got {context.images.dtype} "
                              f"{tuple(context.images.shape)}; check the dataset plugin")
        _, h, w, channels = context.images.shape
        # NHWC storage: a gathered batch permuted to NCHW is already channels_last in memory.
        self.images = torch.as_tensor(np.ascontiguousarray(context.images)).to(device)
        self.labels = torch.as_tensor(np.asarray(context.labels, dtype=np.int64)).to(device)
        specs = canonical_specs(augment, "tensor", (h, w, channels), native=True) if augment and self.train else []
        self.augment = BatchAugment(specs, channels, h, w, device) if specs else None
        self.mean = torch.tensor(context.mean, device=device).view(1, channels, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(context.std, device=device).view(1, channels, 1, 1) * 255.0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        c, device = self.context, self.context.device
        remaining = self.remaining_batches()
        if not remaining:
            return
        # One host-to-device copy of the epoch's remaining order, then views of it per batch.
        order = torch.from_numpy(np.concatenate([idx for _, idx in remaining]).astype(np.int64)).to(device)
        offsets = np.concatenate([[0], np.cumsum([len(idx) for _, idx in remaining])])
        for position, (number, _) in enumerate(remaining):
            index = order[offsets[position]:offsets[position + 1]]
            images = self.images.index_select(0, index).permute(0, 3, 1, 2).float()  # NCHW view, NHWC memory
            if self.augment is not None:
                generator = torch.Generator(device=device)
                generator.manual_seed(batch_seed(c.seed, self.epoch, number, c.rank))
                images = self.augment(images, generator)
            images = (images - self.mean) * self.inv_std
            fmt = torch.channels_last if c.channels_last else torch.contiguous_format
            yield images.contiguous(memory_format=fmt), self.labels.index_select(0, index)


def build_tensor_loader(context: LoaderContext, *, batch_size: Annotated[int, Range(ge=1)] = 128,
                        eval_batch_size: Annotated[int, Range(ge=1)] = 500,
                        augment: Annotated[list, Check(canonical_check("tensor", native=True), AUGMENT_CONTRACT)] = [],  # noqa: B006
                        drop_last: bool = False) -> TensorLoader:
    """Whole dataset as one uint8 tensor on the device; batched torch-op augmentation, no workers."""
    return TensorLoader(context, batch_size=batch_size, eval_batch_size=eval_batch_size, augment=augment,
                        drop_last=drop_last)


@microtrain.hookimpl
def register_components(registry):
    registry.loader("tensor", build_tensor_loader)

