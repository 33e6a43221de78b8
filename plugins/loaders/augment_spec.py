"""The recipe's augmentation list, shared by every loader.

Written as albumentations transform names and arguments, in order:

    augment:
      - HorizontalFlip: {p: 0.5}
      - Affine: {translate_percent: [-0.1, 0.1], scale: [0.9, 1.1], rotate: [-10, 10], fill: [125, 123, 114], p: 0.5}

Each entry is a one-key mapping ``{TransformName: {argument: value}}`` (or a bare name for the
defaults). Loaders other than albumentations translate the names they support and refuse the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from microtrain.errors import RecipeError


def parse_augment_list(entries: list[Any], where: str = "loader.augment") -> list[tuple[str, dict[str, Any]]]:
    """``[{Name: {args}}, "Name", ...]`` -> ``[(Name, args), ...]``, checking only the shape."""
    parsed = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            parsed.append((entry, {}))
            continue
        if not isinstance(entry, dict) or len(entry) != 1:
            raise RecipeError(f"{where}[{i}]: write each transform as {{Name: {{argument: value}}}}, got {entry!r}")
        (name, args), = entry.items()
        if args is None:
            args = {}
        if not isinstance(name, str) or not isinstance(args, dict):
            raise RecipeError(f"{where}[{i}]: write each transform as {{Name: {{argument: value}}}}, got {entry!r}")
        parsed.append((name, dict(args)))
    return parsed


def unsupported(loader: str, name: str, supported: list[str], where: str) -> RecipeError:
    return RecipeError(
        f"{where}: transform '{name}' cannot be expressed by the {loader} loader; it supports "
        f"{', '.join(supported)} (use loader.name=albumentations for any albumentations transform)"
    )


# ---------------------------------------------------------------------------------------------
# Canonical form, for loaders that implement the transforms themselves (dali, tensor). The recipe
# list is first validated by albumentations itself, then read back from the normalised attributes
# of the albumentations objects, so every loader interprets an argument exactly the same way.

@dataclass(frozen=True)
class Flip:
    """Mirror left-right with probability p."""

    p: float


@dataclass(frozen=True)
class AffineSpec:
    """Random affine with probability p: translation as a fraction of width/height, drawn uniformly
    from ``translate_x``/``translate_y``; isotropic scale from ``scale``; rotation in degrees from
    ``rotate``; uncovered pixels get ``fill`` (0-255 per channel)."""

    p: float
    translate_x: tuple[float, float]
    translate_y: tuple[float, float]
    scale: tuple[float, float]
    rotate: tuple[float, float]
    fill: tuple[float, ...]


@dataclass(frozen=True)
class DropoutSpec:
    """With probability p, ``holes`` rectangles (count drawn from the range) of height/width drawn
    from the ranges set to ``fill``. As in albumentations, the ranges are pixels when the height
    range's upper end is >= 1 (for the width too), else fractions of the image side."""

    p: float
    holes: tuple[int, int]
    height: tuple[float, float]
    width: tuple[float, float]
    fill: tuple[float, ...]


@dataclass(frozen=True)
class GraySpec:
    """With probability p, replace every channel by the luma 0.299 R + 0.587 G + 0.114 B."""

    p: float


Spec = Flip | AffineSpec | DropoutSpec | GraySpec
CANONICAL = ["HorizontalFlip", "Affine", "ShiftScaleRotate", "CoarseDropout", "ToGray"]


def _fill(value, channels: int = 3) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return (float(value),) * channels
    return tuple(float(v) for v in value)


def _defaults_only(transform, names: dict[str, object], loader: str, where: str) -> None:
    for attr, default in names.items():
        if getattr(transform, attr) != default:
            raise RecipeError(
                f"{where}: {type(transform).__name__}.{attr}={getattr(transform, attr)!r} cannot be expressed by the "
                f"{loader} loader (only {default!r}); use loader.name=albumentations or drop the argument"
            )


def canonical_transforms(entries: list[Any], loader: str, where: str = "loader.augment") -> list[Spec]:
    """Validate ``entries`` with albumentations, then return the loader-neutral specs.

    A transform or argument value the canonical form cannot express is an error naming the
    transform and the loader, never silently dropped."""
    import albumentations as A
    from microtrain_plugins.loaders.albumentations_loader import build_transforms

    parsed = parse_augment_list(entries, where)
    specs: list[Spec] = []
    for i, (name, _args) in enumerate(parsed):
        here = f"{where}[{i}]"
        if name not in CANONICAL:
            raise unsupported(loader, name, CANONICAL, here)
        (transform,) = build_transforms([entries[i]], where).transforms
        p = float(transform.p)
        if isinstance(transform, A.HorizontalFlip):
            specs.append(Flip(p))
        elif isinstance(transform, A.Affine):  # also ShiftScaleRotate, a subclass
            _defaults_only(transform, {"border_mode": 0, "interpolation": 1, "fit_output": False}, loader, here)
            shear = transform.shear
            if any(v != 0 for axis in shear.values() for v in axis):
                raise RecipeError(f"{here}: {name}.shear cannot be expressed by the {loader} loader; use loader.name=albumentations")
            scale = tuple(transform.scale["x"])
            if transform.scale["x"] != transform.scale["y"] or (not transform.keep_ratio and scale[0] != scale[1]):
                raise RecipeError(
                    f"{here}: {name} draws x and y scale independently (albumentations' keep_ratio=false), which the "
                    f"{loader} loader cannot express; use Affine with keep_ratio: true for one isotropic scale"
                )
            if transform.translate_px and any(v != 0 for axis in transform.translate_px.values() for v in axis):
                raise RecipeError(f"{here}: {name}.translate_px cannot be expressed by the {loader} loader; "
                                  "use translate_percent")
            translate = transform.translate_percent or {"x": (0.0, 0.0), "y": (0.0, 0.0)}
            specs.append(AffineSpec(p, tuple(translate["x"]), tuple(translate["y"]), scale,
                                    tuple(transform.rotate), _fill(transform.fill)))
        elif isinstance(transform, A.CoarseDropout):
            if isinstance(transform.fill, str):
                raise RecipeError(f"{here}: CoarseDropout.fill='{transform.fill}' cannot be expressed by the {loader} loader; "
                                  "use a number or one per channel")
            specs.append(DropoutSpec(p, tuple(transform.num_holes_range), tuple(transform.hole_height_range),
                                     tuple(transform.hole_width_range), _fill(transform.fill)))
        elif isinstance(transform, A.ToGray):
            _defaults_only(transform, {"method": "weighted_average", "num_output_channels": 3}, loader, here)
            specs.append(GraySpec(p))
    return specs
