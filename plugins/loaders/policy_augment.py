"""microtrain's own policy augmentations for the ``tensor`` loader: TrivialAugment and RandAugment,
applied to whole batches with a random op and magnitude per sample.

    augment:
      - TrivialAugment: {num_magnitude_bins: 31, space: wide, fill: [125, 123, 114], p: 1.0}
      - RandAugment: {num_ops: 2, magnitude: 9, num_magnitude_bins: 31, fill: [125, 123, 114], p: 1.0}

- TrivialAugment (Müller & Hutter 2021): per sample, one op drawn uniformly from ``ops``, one
  magnitude bin drawn uniformly from 0..num_magnitude_bins-1, and a random sign for the signed ops.
- RandAugment (Cubuk et al. 2020): per sample, ``num_ops`` ops applied in sequence, each drawn
  uniformly per sample, all at the bin ``magnitude``, each signed op with a random sign.

The op set and the magnitude of each bin follow torchvision's ``TrivialAugmentWide`` (``space: wide``)
and ``RandAugment`` (``space: standard``): see :func:`magnitude_table`. These are not albumentations
transforms (albumentations 2.0.8 has none of these names); the albumentations and dali loaders refuse
them with :func:`refused_by`.

This module owns the op set, the spec, argument validation, the draws and the batched ops. It imports
no other microtrain plugin module, so augment_spec (which dispatches these names here) and the
tensor loader (which applies them) can both import it without a cycle. The one thing it takes from
the loader is the warp (the loader's sampling grid and ``grid_sample``), passed in as a function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from microtrain import RecipeError, did_you_mean

NAMES = ("TrivialAugment", "RandAugment")
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
BLENDS = ("Brightness", "Color", "Contrast", "Sharpness")  # a blend of the image with a degenerate image
LEVEL_OPS = ("Posterize", "Solarize", "AutoContrast", "Equalize")  # a per-channel lookup table on uint8 levels
SIGNED = frozenset(GEOMETRIC + BLENDS)
SPACES = ("wide", "standard")
INTERPOLATIONS = ("nearest", "bilinear")
LUMA = (0.299, 0.587, 0.114)
POLICY_CONTRACT = "TrivialAugment, RandAugment (microtrain's own batched policies, tensor loader only)"

# Every argument with its default; the defaults are torchvision's, except fill (128, mid-grey, not black).
DEFAULTS: dict[str, dict[str, Any]] = {
    "TrivialAugment": {"num_magnitude_bins": 31, "space": "wide", "ops": list(OPS), "fill": 128,
                       "interpolation": "nearest", "p": 1.0},
    "RandAugment": {"num_ops": 2, "magnitude": 9, "num_magnitude_bins": 31, "space": "standard", "ops": list(OPS),
                    "fill": 128, "interpolation": "nearest", "p": 1.0},
}


@dataclass(frozen=True)
class PolicySpec:
    """A validated TrivialAugment or RandAugment entry. ``magnitude`` None: a random bin per sample and
    op (TrivialAugment); otherwise every op uses that bin (RandAugment). ``num_ops`` ops are applied in
    sequence (1 for TrivialAugment)."""

    name: str
    p: float
    num_ops: int
    magnitude: int | None
    num_magnitude_bins: int
    space: str
    ops: tuple[str, ...]
    fill: tuple[float, ...]
    interpolation: str


def is_policy(name: str) -> bool:
    return name in NAMES


def refused_by(loader: str, name: str, where: str) -> RecipeError:
    """The one-line refusal of a loader that does not run these transforms."""
    return RecipeError(f"{where}: {name} is a tensor-loader transform (microtrain's own batched policy, not an "
                       f"albumentations transform), which the {loader} loader does not run; use loader.name=tensor")


# ---------------------------------------------------------------------------------------------
# Validation, when the recipe is resolved.

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_policy(name: str, args: dict[str, Any], where: str) -> PolicySpec:
    """Validate one entry's arguments (each problem one line naming the argument and the fix) and
    return its spec. Nothing here needs the images; :func:`check_channels` and the fill's channel
    count are checked when the loader is built."""
    defaults = DEFAULTS[name]
    for key in args:
        if key not in defaults:
            raise RecipeError(f"{where}: {name} has no argument '{key}'{did_you_mean(key, defaults)}; its arguments "
                              f"are: {', '.join(defaults)}")
    values = {**defaults, **args}

    def bad(key: str, problem: str) -> RecipeError:
        return RecipeError(f"{where}: {name}.{key}={values[key]!r}: {problem}")

    bins = values["num_magnitude_bins"]
    if not _is_int(bins) or bins < 2:
        raise bad("num_magnitude_bins", "must be a whole number >= 2 (torchvision's default is 31); raise it")
    magnitude = None
    if name == "RandAugment":
        if not _is_int(values["num_ops"]) or values["num_ops"] < 1:
            raise bad("num_ops", "must be a whole number >= 1 (ops applied in sequence per sample; 2 is the usual)")
        magnitude = values["magnitude"]
        if not _is_int(magnitude) or not 0 <= magnitude < bins:
            raise bad("magnitude", f"must be a bin index from 0 to num_magnitude_bins - 1 = {bins - 1}; lower it or "
                                   "raise num_magnitude_bins")
    p = values["p"]
    if not _is_number(p) or not 0 <= p <= 1:
        raise bad("p", "must be a probability from 0 to 1")
    space = values["space"]
    if space not in SPACES:
        raise bad("space", f"must be one of {', '.join(SPACES)}{did_you_mean(space, SPACES)}")
    interpolation = values["interpolation"]
    if interpolation not in INTERPOLATIONS:
        raise bad("interpolation", f"must be one of {', '.join(INTERPOLATIONS)}{did_you_mean(interpolation, INTERPOLATIONS)}")
    ops = values["ops"]
    if not isinstance(ops, (list, tuple)) or not ops:
        raise bad("ops", f"must be a non-empty list of op names from: {', '.join(OPS)}")
    for op in ops:
        if op not in OPS:
            raise bad("ops", f"'{op}' is not an op{did_you_mean(op, OPS)}; the ops are: {', '.join(OPS)}")
    if len(set(ops)) != len(ops):
        raise bad("ops", "names an op twice; list each op once (each is drawn with equal probability)")
    fill = values["fill"]
    levels = list(fill) if isinstance(fill, (list, tuple)) else [fill]
    if not levels or not all(_is_number(v) for v in levels):
        raise bad("fill", "must be a number or a list of numbers (one for every channel or one per channel)")
    if not all(0 <= v <= 255 for v in levels):
        raise bad("fill", "fill values are uint8 pixel levels, from 0 to 255")
    return PolicySpec(name=name, p=float(p), num_ops=int(values.get("num_ops", 1)), magnitude=magnitude,
                      num_magnitude_bins=bins, space=space, ops=tuple(ops), fill=tuple(float(v) for v in levels),
                      interpolation=interpolation)


def check_channels(name: str, channels: int, where: str) -> None:
    """Color and Contrast are defined on RGB (their grey is the luma) or on one grey channel."""
    if channels not in (1, 3):
        raise RecipeError(f"{where}: {name} needs 1- or 3-channel images (Color and Contrast use the RGB luma); "
                          f"these have {channels} channels; drop it")


# ---------------------------------------------------------------------------------------------
# Magnitudes (torchvision's _augmentation_space of TrivialAugmentWide and RandAugment).

def magnitude_table(space: str, bins: int, height: int, width: int) -> dict[str, list[float]]:
    """The value of each bin of each op: shear factor (x shift per row), translation in pixels
    (truncated to whole pixels when applied), rotation in degrees (counter-clockwise), blend
    factor - 1 (Brightness, Color, Contrast, Sharpness), bits kept (Posterize), threshold level
    (Solarize: levels >= it are inverted). Ops without a magnitude have zeros.

    ``wide`` translates by up to 32 pixels whatever the image size, as TrivialAugmentWide does;
    ``standard`` by up to 150/331 of the side, as RandAugment does."""
    wide = space == "wide"

    def spread(top: float) -> list[float]:
        return [top * k / (bins - 1) for k in range(bins)]

    posterize_span = 6 if wide else 4  # bits from 8 down to 2 (wide) or 4 (standard)
    table = {
        "ShearX": spread(0.99 if wide else 0.3),
        "ShearY": spread(0.99 if wide else 0.3),
        "TranslateX": spread(32.0 if wide else 150.0 / 331.0 * width),
        "TranslateY": spread(32.0 if wide else 150.0 / 331.0 * height),
        "Rotate": spread(135.0 if wide else 30.0),
        "Posterize": [float(8 - round(k / ((bins - 1) / posterize_span))) for k in range(bins)],  # round half to even
        "Solarize": [255.0 - v for v in spread(255.0)],
    }
    for op in BLENDS:
        table[op] = spread(0.99 if wide else 0.9)
    for op in ("Identity", "AutoContrast", "Equalize"):
        table[op] = [0.0] * bins
    return table


# ---------------------------------------------------------------------------------------------
# The draws of a batch, through augment_spec's RandomSource (torch or NumPy): a fixed number of values
# per spec and batch, whatever the images hold, so later specs' streams do not depend on the pixels.

@dataclass
class PolicyDraw:
    """Per round and sample, (num_ops, B): the op (an index into ``spec.ops``), its magnitude bin and
    whether a signed op is negated."""

    op: Any
    bin: Any
    negative: Any


def draw_policy(spec: PolicySpec, size: int, source: Any) -> PolicyDraw:
    """``source`` is an augment_spec.RandomSource (not imported here: that module imports this one).
    RandAugment's fixed bin is drawn as a one-value range, so both policies draw the same count."""
    shape = (spec.num_ops, size)
    op = source.integers(0, len(spec.ops) - 1, shape)
    low, high = (0, spec.num_magnitude_bins - 1) if spec.magnitude is None else (spec.magnitude, spec.magnitude)
    bins = source.integers(low, high, shape)
    negative = source.uniform(0.0, 1.0, shape) < 0.5
    return PolicyDraw(op, bins, negative)


# ---------------------------------------------------------------------------------------------
# Batched ops on float images (B, C, H, W), 0-255 scale. Each takes per-sample values and a mask and
# returns the batch with only the masked samples changed, so a whole round is one pass per op family.

Warp = Callable[..., torch.Tensor]  # (images, apply, theta, fill, mode=...) -> images: tensor_loader.affine


def geometry_theta(op: torch.Tensor, value: torch.Tensor, index: dict[str, int], height: int, width: int) -> torch.Tensor:
    """The (B, 2, 3) ``affine_grid`` matrices (output -> source, normalised coordinates with
    align_corners=False) of each sample's geometric op; the identity for the others.

    As torchvision: ShearX samples the source at (x + m y, y) and ShearY at (x, y + m x), about the
    top-left corner of the image; TranslateX/Y move the picture by whole pixels (the magnitude
    truncated, as ``int()``), positive to the right/down; Rotate turns it counter-clockwise by the
    magnitude in degrees about the image centre. Each sample has one op, so the terms simply add."""

    def where_op(name: str, values: torch.Tensor) -> torch.Tensor:
        if name not in index:
            return torch.zeros_like(values)
        return torch.where(op == index[name], values, torch.zeros_like(values))

    shear_x, shear_y = where_op("ShearX", value), where_op("ShearY", value)
    shift_x = torch.trunc(where_op("TranslateX", value)) * (2.0 / width)
    shift_y = torch.trunc(where_op("TranslateY", value)) * (2.0 / height)
    radians = torch.deg2rad(where_op("Rotate", value))
    cos, sin = torch.cos(radians), torch.sin(radians)
    aspect = height / width
    # A source pixel p goes to c + R (p - c) + t (R as albumentations' Affine; see tensor_loader.affine_theta);
    # the grid needs the inverse, R^T (q - c - t), with the aspect conjugation of normalised units.
    a, b = cos, -sin * aspect + shear_x * aspect
    c, d = sin / aspect + shear_y / aspect, cos
    row0 = torch.stack([a, b, -(a * shift_x + b * shift_y) + shear_x * aspect], dim=1)
    row1 = torch.stack([c, d, -(c * shift_x + d * shift_y) + shear_y / aspect], dim=1)
    return torch.stack([row0, row1], dim=1)


def luma(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W): 0.299 R + 0.587 G + 0.114 B, or the one channel of a grey image."""
    if images.shape[1] == 1:
        return images
    weights = torch.tensor(LUMA, device=images.device, dtype=images.dtype)
    return torch.einsum("bchw,c->bhw", images, weights).unsqueeze(1)


def smoothed(images: torch.Tensor) -> torch.Tensor:
    """PIL's ImageFilter.SMOOTH ([[1,1,1],[1,5,1],[1,1,1]]/13) inside the image, the border pixels kept
    as they are (as PIL and torchvision do): the degenerate image of Sharpness. Not rounded. Written as
    sums of shifted slices (a 3x3 box plus 4 x the centre): on a CPU about twice as fast as a depthwise
    conv2d on CIFAR-sized batches."""
    if images.shape[2] < 3 or images.shape[3] < 3:
        return images
    rows = images[:, :, :-2] + images[:, :, 1:-1] + images[:, :, 2:]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    out = images.clone()
    out[:, :, 1:-1, 1:-1] = (box + 4.0 * images[:, :, 1:-1, 1:-1]) / 13.0
    return out


def equalize_lut(levels: torch.Tensor) -> torch.Tensor:
    """(B, C, 256) lookup tables of PIL's ImageOps.equalize, per sample and channel, from integer
    ``levels`` (B, C, H, W): a histogram by scatter_add, ``step = (pixels - count of the highest level
    present) // 255``, ``lut[v] = (step // 2 + pixels below v) // step`` clipped to 255, and the identity
    where step is 0 (one level, or too few pixels). (Pillow divides by 255, as torchvision does; old PIL
    releases divided by 256.)"""
    b, c, h, w = levels.shape
    flat = levels.reshape(b * c, h * w).long()
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=levels.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    highest = hist.gather(1, flat.amax(dim=1, keepdim=True))
    step = (h * w - highest) // 255  # (B*C, 1)
    below = hist.cumsum(dim=1) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    identity = torch.arange(256, device=levels.device).expand_as(lut)
    return torch.where(step > 0, lut, identity).view(b, c, 256).to(levels.dtype)


class PolicyOps:
    """One policy spec prepared for images of a given shape on a device: the magnitude table and fill
    live on the device, so a batch costs no host round trip and no per-sample Python."""

    def __init__(self, spec: PolicySpec, channels: int, height: int, width: int, device: torch.device,
                 fill: tuple[float, ...]):
        self.spec, self.channels, self.height, self.width = spec, channels, height, width
        table = magnitude_table(spec.space, spec.num_magnitude_bins, height, width)
        self.values = torch.tensor([table[op] for op in spec.ops], dtype=torch.float32, device=device)  # (ops, bins)
        self.signed = torch.tensor([op in SIGNED for op in spec.ops], device=device)
        self.index = {op: i for i, op in enumerate(spec.ops)}
        self.geometric = torch.tensor([op in GEOMETRIC for op in spec.ops], device=device)
        self.blend = torch.tensor([op in BLENDS for op in spec.ops], device=device)
        self.level = torch.tensor([op in LEVEL_OPS for op in spec.ops], device=device)
        # Families absent from ``ops`` cost nothing: their pass is skipped.
        self.has_geometric, self.has_blend, self.has_level = (bool(mask.any()) for mask in (self.geometric, self.blend,
                                                                                              self.level))
        self.fill = torch.tensor(fill, dtype=torch.float32, device=device)
        self.levels_range = torch.arange(256, dtype=torch.float32, device=device)

    def __call__(self, images: torch.Tensor, apply: torch.Tensor, draw: PolicyDraw, warp: Warp) -> torch.Tensor:
        for step in range(self.spec.num_ops):
            images = self.round(images, apply, draw.op[step].long(), draw.bin[step].long(), draw.negative[step], warp)
        return images

    def round(self, images: torch.Tensor, apply: torch.Tensor, op: torch.Tensor, bins: torch.Tensor,
              negative: torch.Tensor, warp: Warp) -> torch.Tensor:
        """One op per sample (``op``, (B,) index into spec.ops) where ``apply`` is set."""
        value = self.values[op, bins]
        value = torch.where(self.signed[op] & negative, -value, value)
        if self.has_geometric:
            theta = geometry_theta(op, value, self.index, self.height, self.width)
            images = warp(images, apply & self.geometric[op], theta, self.fill, mode=self.spec.interpolation)
        if self.has_blend:
            images = self.blends(images, apply & self.blend[op], op, 1.0 + value)
        if self.has_level:
            images = self.level_ops(images, apply & self.level[op], op, value)
        return images

    def _is(self, op: torch.Tensor, name: str) -> torch.Tensor:
        return (op == self.index[name]).view(-1, 1, 1, 1)

    def blends(self, images: torch.Tensor, mask: torch.Tensor, op: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """PIL's ImageEnhance: ``degenerate + factor (image - degenerate)`` clipped to 0-255, where the
        degenerate image is black (Brightness), the luma (Color), the mean luma of the sample
        (Contrast) or the smoothed image (Sharpness). In float: PIL rounds the luma and the
        smoothed image and truncates the result, so it differs by less than 1.5 levels."""
        degenerate = images
        if "Brightness" in self.index:
            degenerate = torch.where(self._is(op, "Brightness"), torch.zeros_like(images), degenerate)
        if "Color" in self.index or "Contrast" in self.index:
            grey = luma(images)
            if "Color" in self.index:
                degenerate = torch.where(self._is(op, "Color"), grey, degenerate)
            if "Contrast" in self.index:
                degenerate = torch.where(self._is(op, "Contrast"), grey.mean(dim=(2, 3), keepdim=True), degenerate)
        if "Sharpness" in self.index:
            degenerate = torch.where(self._is(op, "Sharpness"), smoothed(images), degenerate)
        blended = (degenerate + factor.view(-1, 1, 1, 1) * (images - degenerate)).clamp(0.0, 255.0)
        return torch.where(mask.view(-1, 1, 1, 1), blended, images)

    def level_ops(self, images: torch.Tensor, mask: torch.Tensor, op: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Posterize, Solarize, AutoContrast and Equalize as one (B, C, 256) lookup table per sample and
        channel, gathered once. They are defined on integer levels, so the input is rounded to the
        nearest uint8 level first (after a bilinear Affine or a blend it holds fractions); the tables
        give whole levels except AutoContrast's, which is not truncated as PIL's is (< 1 level apart)."""
        b, c, h, w = images.shape
        levels = images.clamp(0.0, 255.0).round()
        v = self.levels_range.view(1, 1, 256)
        lut = v.expand(b, c, 256)
        if "Posterize" in self.index:
            keep = 2.0 ** (8.0 - value.view(-1, 1, 1))  # the size of a posterized step; bits of 8 keep every level
            lut = torch.where(self._is(op, "Posterize").view(-1, 1, 1), torch.floor(v / keep) * keep, lut)
        if "Solarize" in self.index:
            inverted = torch.where(v >= value.view(-1, 1, 1), 255.0 - v, v)
            lut = torch.where(self._is(op, "Solarize").view(-1, 1, 1), inverted, lut)
        if "AutoContrast" in self.index:
            low = levels.amin(dim=(2, 3)).unsqueeze(-1)
            high = levels.amax(dim=(2, 3)).unsqueeze(-1)
            spread = high > low
            stretched = ((v - low) * (255.0 / torch.where(spread, high - low, 1.0))).clamp(0.0, 255.0)
            lut = torch.where(self._is(op, "AutoContrast").view(-1, 1, 1) & spread, stretched, lut)
        if "Equalize" in self.index:
            lut = torch.where(self._is(op, "Equalize").view(-1, 1, 1), equalize_lut(levels), lut)
        mapped = lut.gather(2, levels.reshape(b, c, h * w).long()).view(b, c, h, w)
        return torch.where(mask.view(-1, 1, 1, 1), mapped, images)
