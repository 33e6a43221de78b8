"""Loader ``dali``: an NVIDIA DALI pipeline with the recipe's augmentations on the GPU (or on the
CPU, with ``device_id=None``, where there is no GPU or ``loader.device=cpu``).

DALI has no CIFAR reader, so the dataset's uint8 images enter through ``fn.external_source`` one
batch at a time, in the order ``microtrain.sampling.epoch_batches`` gives: the same samples in the
same batches as every other loader. Every random number of a batch (coins, affine parameters, hole
positions) is drawn with NumPy from ``batch_seed(seed, epoch, batch, rank)`` by
``augment_spec.draw_batch`` (the tensor loader's draws, from another generator), turned into DALI's
inputs here and fed in beside the images, so the augmentation depends only on those four numbers:
runs are reproducible and a resumed run continues exactly. DALI operators then do the pixel work,
on the GPU after the transfer in GPU mode, and the batch reaches torch without a host round trip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import numpy as np
import torch

import microtrain
from microtrain import Check, EpochBatches, LoaderContext, MicrotrainError, Range, RecipeError, batch_seed
from microtrain_plugins.loaders.augment_spec import (
    CANONICAL_CONTRACT,
    AffineSpec,
    DropoutSpec,
    FlipSpec,
    GraySpec,
    NumpyRandom,
    Spec,
    canonical_check,
    canonical_specs,
    changes_pixels,
    draw_batch,
    spec_fill,
    whole_levels,
)

INSTALL_HINT = 'pip install -e ".[dali]"'


def import_dali():
    """Import DALI only when the loader is used, so the plugin registers on machines without it."""
    try:
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
    except ImportError as exc:
        raise MicrotrainError(
            f"loader 'dali' needs NVIDIA DALI, which is not installed here ({exc}); install it with "
            f"{INSTALL_HINT} for a torch built for CUDA 12 (\".[dali-cu13]\" for CUDA 13: python -c "
            "'import torch; print(torch.version.cuda)' tells), or use loader.name=albumentations"
        ) from None
    return fn, types, pipeline_def, feed_ndarray, to_torch_type


# ---------------------------------------------------------------------------------------------
# A batch's random parameters as DALI's inputs (pure functions, so they are testable without DALI).

def affine_matrices(tx: np.ndarray, ty: np.ndarray, scale: np.ndarray, angle: np.ndarray,
                    height: int, width: int) -> np.ndarray:
    """Destination-to-source matrices ``(B, 2, 3)`` in DALI's pixel coordinates (corner at 0).

    The forward transform is albumentations' Affine: scale, then rotate by ``angle`` degrees
    (positive = counter-clockwise on screen) about the image centre, then translate by whole
    pixels ``(tx, ty)``. DALI wants the inverse map: src = c + R(-a)/s (dst - c - t)."""
    rad = np.deg2rad(angle % 360.0)
    cos, sin = np.cos(rad) / scale, np.sin(rad) / scale
    cx, cy = width / 2.0, height / 2.0  # albumentations' centre (w/2 - 0.5 at pixel centres) in DALI coordinates
    m = np.empty((len(tx), 2, 3), dtype=np.float32)
    m[:, 0, 0], m[:, 0, 1] = cos, -sin
    m[:, 1, 0], m[:, 1, 1] = sin, cos
    ux, uy = cx + tx, cy + ty
    m[:, 0, 2] = cx - (cos * ux - sin * uy)
    m[:, 1, 2] = cy - (sin * ux + cos * uy)
    return m


def pipeline_inputs(specs: list[Spec], size: int, height: int, width: int, rng: np.random.Generator,
                    channels: int = 3) -> list[np.ndarray]:
    """The random inputs of one batch of ``size`` images, spec by spec, for the specs that change
    images of ``channels`` channels (the others still draw, so the stream stays the same).

    Flip: int32 coins (``horizontal``). Affine: bool coins, float32 matrices. Dropout: float32
    anchors and shapes ``(y, x, ...)`` of ``max holes`` regions (unused ones have size 0).
    Gray: bool coins."""
    inputs: list[np.ndarray] = []
    for spec, draw in zip(specs, draw_batch(specs, size, height, width, NumpyRandom(rng)), strict=True):
        if not changes_pixels(spec, channels):
            continue
        if isinstance(spec, FlipSpec):
            inputs.append(draw.apply.astype(np.int32))
        elif isinstance(spec, AffineSpec):
            drawn = draw.params
            inputs += [draw.apply, affine_matrices(drawn.translate_x, drawn.translate_y, drawn.scale, drawn.rotate,
                                                   height, width)]
        elif isinstance(spec, DropoutSpec):
            holes = draw.params
            used = draw.apply[:, None] & holes.active
            h, w = np.where(used, holes.height, 0), np.where(used, holes.width, 0)
            most = used.shape[1]
            inputs += [np.stack([holes.top, holes.left], axis=2).reshape(size, 2 * most).astype(np.float32),
                       np.stack([h, w], axis=2).reshape(size, 2 * most).astype(np.float32)]
        elif isinstance(spec, GraySpec):
            inputs.append(draw.apply)
    return inputs


def inputs_count(spec: Spec, channels: int) -> int:
    if not changes_pixels(spec, channels):
        return 0
    return 2 if isinstance(spec, (AffineSpec, DropoutSpec)) else 1


# ---------------------------------------------------------------------------------------------

class DaliLoader(EpochBatches):
    """Batches of (normalised float NCHW images, int64 labels) on ``context.device``, made by DALI."""

    def __init__(self, context: LoaderContext, *, batch_size: int, eval_batch_size: int, augment: list[Any],
                 drop_last: bool, device: str, threads: int, prefetch: int):
        self.fn, self.types, self.pipeline_def, self.feed_ndarray, self.torch_type = import_dali()
        super().__init__(context, batch_size=batch_size, eval_batch_size=eval_batch_size, drop_last=drop_last)
        self.specs = canonical_specs(augment, "dali", context.images.shape[1:]) if self.train and augment else []
        self.gpu = pick_mode(device, context.device)
        self.threads = threads
        self.prefetch = prefetch
        _, self.height, self.width, self.channels = context.images.shape
        # DALI writes uint8 images, so the fill is taken in whole levels, as albumentations takes it.
        self.fills = {i: list(whole_levels(s, spec_fill(s, self.channels, i)))
                      for i, s in enumerate(self.specs) if isinstance(s, (AffineSpec, DropoutSpec))}
        self._batches: list[tuple[int, np.ndarray]] = []
        self._pipe = self._build()
        self._dirty = False  # True while the pipeline holds batches of an unfinished epoch

    # -- the pipeline -------------------------------------------------------------------------
    def _source(self, info) -> tuple[np.ndarray, ...]:
        """external_source callback: DALI asks for iteration ``info.iteration`` of the current pass."""
        if info.iteration >= len(self._batches):
            raise StopIteration
        number, indices = self._batches[info.iteration]
        c = self.context
        images = c.images[indices]
        params: list[np.ndarray] = []
        if self.specs:
            rng = np.random.default_rng(batch_seed(c.seed, self.epoch, number, c.rank))
            params = pipeline_inputs(self.specs, len(indices), self.height, self.width, rng, self.channels)
        return (images, c.labels[indices].astype(np.int64), *params)

    def _build(self):
        fn, types = self.fn, self.types
        c = self.context
        outputs = 2 + sum(inputs_count(s, self.channels) for s in self.specs)
        mean = [255.0 * m for m in c.mean]
        std = [255.0 * s for s in c.std]
        layout = "HWC" if c.channels_last else "CHW"
        specs, fills, gpu, channels = self.specs, self.fills, self.gpu, self.channels

        def warp(images, matrix, fill: list[float]):
            if len(set(fill)) == 1:
                return fn.warp_affine(images, matrix=matrix, fill_value=fill[0])
            # warp_affine takes one fill value: warp each channel with its own and put them back together
            planes = [fn.warp_affine(images[:, :, k:k + 1], matrix=matrix, fill_value=f) for k, f in enumerate(fill)]
            return fn.cat(*planes, axis=2)

        def to_gray(images):
            luma = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
            return fn.cat(luma, luma, luma, axis=2)

        def affine(images, coin, matrix, fill):
            if coin:
                images = warp(images, matrix, fill)
            return images

        def gray(images, coin):
            if coin:
                images = to_gray(images)
            return images

        @self.pipeline_def(enable_conditionals=True)
        def pipeline():
            images, labels, *params = fn.external_source(source=self._source, num_outputs=outputs, batch=True,
                                                         batch_info=True, layout=["HWC"] + [""] * (outputs - 1))
            if gpu:
                images, labels = images.gpu(), labels.gpu()
            for i, spec in enumerate(specs):
                if not changes_pixels(spec, channels):
                    continue
                if isinstance(spec, FlipSpec):
                    images = fn.flip(images, horizontal=params.pop(0))
                elif isinstance(spec, AffineSpec):
                    images = affine(images, params.pop(0), params.pop(0), fills[i])
                elif isinstance(spec, DropoutSpec):
                    anchor, shape = params.pop(0), params.pop(0)
                    images = fn.erase(images, anchor=anchor, shape=shape, axis_names="HW", fill_value=fills[i])
                elif isinstance(spec, GraySpec):
                    images = gray(images, params.pop(0))
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=layout, mean=mean, std=std)
            return images, labels

        device_id = (c.device.index if c.device.index is not None else torch.cuda.current_device()) if gpu else None
        pipe = pipeline(batch_size=self.batch_size, num_threads=self.threads, device_id=device_id, seed=c.seed % 2**31,
                        prefetch_queue_depth=self.prefetch)
        try:
            pipe.build()
        except RuntimeError as exc:  # e.g. a CUDA driver DALI cannot use
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            where = f"GPU {device_id}" if gpu else "the CPU"
            hint = "; try loader.device=cpu" if gpu else ""
            raise MicrotrainError(f"loader 'dali' could not build its pipeline on {where}: {first}{hint}") from exc
        return pipe

    def _stream(self) -> torch.cuda.Stream | None:
        """torch's current stream on the run's GPU in GPU mode: DALI binds its outputs to it, so the copy into
        torch waits on the device, not the host. None in CPU mode (the outputs are host memory)."""
        return torch.cuda.current_stream(self.context.device) if self.gpu else None

    def _run(self) -> tuple:
        """One pipeline iteration. In GPU mode its outputs are ordered on torch's stream instead of being
        host-synchronous: ``Pipeline.run(cuda_stream)``, which needs DALI's dynamic executor (the default since
        DALI 2.0); an older DALI gets the plain, host-synchronous ``run()``."""
        stream = self._stream()
        if stream is None or not getattr(self._pipe, "exec_dynamic", False):
            return self._pipe.run()
        return self._pipe.run(stream)

    def _to_torch(self, batch) -> torch.Tensor:
        """Copy a dense DALI batch into a new torch tensor: on the GPU on torch's current stream; from DALI's CPU
        operators into pinned memory and on to a GPU run's device without blocking the host."""
        tensor = batch.as_tensor()
        dtype = self.torch_type[tensor.dtype]
        device = self.context.device
        if self.gpu:
            out = torch.empty(tensor.shape(), dtype=dtype, device=device)
            return self.feed_ndarray(tensor, out, cuda_stream=self._stream())
        if device.type != "cuda":
            return self.feed_ndarray(tensor, torch.empty(tensor.shape(), dtype=dtype))
        # Pinned staging makes the host-to-device copy asynchronous; torch's pinned allocator keeps the buffer
        # until that copy has run, so a new one per batch is safe and comes from its cache.
        staged = self.feed_ndarray(tensor, torch.empty(tensor.shape(), dtype=dtype, pin_memory=True))
        return staged.to(device, non_blocking=True)

    def _finish(self) -> None:
        """After the epoch's last batch: DALI's source has said StopIteration; rewind for the next epoch."""
        try:
            self._run()
        except StopIteration:
            self._pipe.reset()
            self._dirty = False
            return
        raise RuntimeError("DALI produced more batches than the epoch holds")  # an internal error, not user input

    # -- the loader protocol --------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._dirty:  # the last pass was abandoned midway: its prefetched batches are stale
            self._pipe = self._build()
            self._dirty = False
        self._batches = self.remaining_batches()
        total = len(self._batches)
        for i in range(total):
            self._dirty = True
            images, labels = self._run()
            images, labels = self._to_torch(images), self._to_torch(labels)
            if self.context.channels_last:
                images = images.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW: channels_last memory format
            if i == total - 1:
                self._finish()
            yield images, labels


def pick_mode(device: str, run_device: torch.device) -> bool:
    """True for GPU operators. ``auto`` follows the run's device; a GPU asked for without one is an error."""
    if device == "cpu":
        return False
    if device == "gpu":
        if not torch.cuda.is_available():
            raise MicrotrainError("loader.device=gpu but no CUDA GPU is available here; use loader.device=cpu (or auto)")
        if run_device.type != "cuda":
            raise RecipeError("loader.device=gpu delivers batches on the GPU but the run's device is cpu; "
                              "set device=cuda (or auto), or loader.device=cpu")
        return True
    return run_device.type == "cuda"


def default_threads() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


def build_dali_loader(context: LoaderContext, *, batch_size: Annotated[int, Range(ge=1)] = 128,
                      eval_batch_size: Annotated[int, Range(ge=1)] = 500,
                      augment: Annotated[list, Check(canonical_check("dali"), CANONICAL_CONTRACT)] = [],  # noqa: B006
                      drop_last: bool = False, device: Literal["auto", "cpu", "gpu"] = "auto",
                      threads: Annotated[int, Range(ge=0)] = 0,
                      prefetch: Annotated[int, Range(ge=1)] = 2) -> DaliLoader:
    """NVIDIA DALI pipeline: augmentation on the GPU (device=auto|gpu) or on DALI's CPU operators (cpu).

    ``threads=0`` takes one per core, at most 8."""
    return DaliLoader(context, batch_size=batch_size, eval_batch_size=eval_batch_size, augment=augment,
                      drop_last=drop_last, device=device, threads=threads or default_threads(), prefetch=prefetch)


@microtrain.hookimpl
def register_components(registry):
    registry.loader("dali", build_dali_loader)
