"""The recipe's augmentation list (``loader.augment``): one reading of it for every loader.

Written as albumentations transform names and arguments, in order:

    augment:
      - HorizontalFlip: {p: 0.5}
      - Affine: {translate_percent: [-0.1, 0.1], scale: [0.9, 1.1], rotate: [-10, 10], fill: [125, 123, 114], p: 0.5}

Each entry is a one-key mapping ``{TransformName: {argument: value}}`` (or a bare name for the
defaults). Everything the loaders must agree on lives here, so they cannot drift apart:

- validation that needs no images (names, arguments, fill values, the loader contract below), run
  when the recipe is resolved: each loader declares its ``augment`` option with a ``Check`` built
  from :func:`check_augment_list` or :func:`canonical_check`;
- the rules that need the images (channel count, image size), run when a loader is built:
  :func:`check_against_images`;
- for the loaders that implement the transforms themselves (tensor, dali): the canonical specs,
  the per-channel fill, and the random parameters of a batch (:func:`draw_batch`), drawn in one
  order whether the generator is torch's or NumPy's.

Two names are microtrain's own, not albumentations': ``TrivialAugment`` and ``RandAugment``
(plugins/loaders/policy_augment.py owns them: op set, arguments, draws, batched ops). This module
only routes them there: validated by that module instead of albumentations, read back as a
PolicySpec for a loader that declares ``native=True`` (tensor), refused by every other loader.

The loader contract: a transform keeps the image's size, channels and uint8 pixels. Only the
training split is augmented and every loader normalises with the dataset's mean and std itself,
so a size change would train and test at different resolutions and a second normalisation would
leave every batch nearly constant.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from microtrain import RecipeError, did_you_mean
from microtrain_plugins.loaders import policy_augment
from microtrain_plugins.loaders.policy_augment import PolicyDraw, PolicySpec

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network at import

CANONICAL = ["HorizontalFlip", "Affine", "ShiftScaleRotate", "CoarseDropout", "ToGray"]
CONTRACT = "albumentations transforms that keep the image size, channels and uint8 pixels"
CANONICAL_CONTRACT = f"{', '.join(CANONICAL)} (albumentations arguments)"

# Normalising transforms named with their reason, so the refusal says why rather than "changes the dtype".
NORMALISING = {"Normalize": "normalises the pixels", "ToFloat": "converts the pixels to float",
               "FromFloat": "rescales the pixels as if they were floats in [0, 1]"}
_NORMALISED_TWICE = ("the loader already normalises every batch with the dataset's mean and std, so this would "
                     "normalise twice (every batch nearly constant); drop it")
# Square probe images, large to small: a size change shows on at least one of them (PadIfNeeded only
# pads small ones, a crop only shrinks large ones). Three draws each, so a random size is unlikely to
# hit the input size every time.
PROBE_SIDES = (96, 37, 5)
PROBE_DRAWS = 3


# ---------------------------------------------------------------------------------------------
# Parsing and validation.

def parse_augment_list(entries: list[Any], where: str = "loader.augment") -> list[tuple[str, dict[str, Any]]]:
    """``[{Name: {args}}, "Name", ...]`` -> ``[(Name, args), ...]``, checking only the shape."""
    if not isinstance(entries, (list, tuple)):
        raise RecipeError(f"{where}: expected a list of transforms like [{{HorizontalFlip: {{p: 0.5}}}}], got {entries!r}")
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


def build_transforms(entries: list[Any], where: str = "loader.augment"):
    """Recipe list -> albumentations Compose. An unknown transform or argument is an error, and a
    one-value ``fill`` list is passed as a number: albumentations would fill the other channels with 0.
    microtrain's own transforms (TrivialAugment, RandAugment) are not albumentations': refused."""
    import albumentations as A

    parsed = parse_augment_list(entries, where)
    for i, (name, _args) in enumerate(parsed):
        if policy_augment.is_policy(name):
            raise policy_augment.refused_by("albumentations", name, f"{where}[{i}]")
    return A.Compose(list(_albumentations_transforms(parsed, where).values()))


def _albumentations_transforms(parsed: list[tuple[str, dict[str, Any]]], where: str) -> dict[int, Any]:
    """{entry index: albumentations object} for every entry that is not one of microtrain's own transforms.
    albumentations is imported only when there is one, so a list of TrivialAugment/RandAugment runs without it."""
    import inspect

    if all(policy_augment.is_policy(name) for name, _ in parsed):
        return {}
    import albumentations as A

    transforms = {}
    for i, (name, args) in enumerate(parsed):
        if policy_augment.is_policy(name):
            continue
        cls = getattr(A, name, None)
        if not (inspect.isclass(cls) and issubclass(cls, A.BasicTransform)):
            known = [n for n in dir(A) if inspect.isclass(getattr(A, n)) and issubclass(getattr(A, n), A.BasicTransform)]
            raise RecipeError(f"{where}[{i}]: '{name}' is not an albumentations transform{did_you_mean(name, known)}")
        params = inspect.signature(cls.__init__).parameters
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        valid = [p for p in params if p not in ("self", "args", "kwargs")]
        for key in args:
            if key not in params or (accepts_any and key not in valid):
                raise RecipeError(
                    f"{where}[{i}]: {name} has no argument '{key}'{did_you_mean(key, valid)} in albumentations 2.x "
                    f"(it would be silently ignored); its arguments are: {', '.join(valid)}"
                )
        fill = args.get("fill")
        if isinstance(fill, (list, tuple)) and len(fill) == 1:
            args = {**args, "fill": fill[0]}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                warnings.filterwarnings("ignore", message=".*special case of Affine.*")  # ShiftScaleRotate works as Affine
                transforms[i] = cls(**args)
        except Exception as exc:  # pydantic ValidationError, UserWarning turned error, TypeError
            first = str(exc).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:3])
            raise RecipeError(f"{where}[{i}]: invalid arguments for {name}: {detail[:300]}") from None
    return transforms


def check_augment_list(entries: list[Any], where: str = "loader.augment", *, loader: str = "albumentations",
                       native: bool = False) -> list[Any]:
    """The ``Check`` of every loader's ``augment`` option: valid albumentations transforms with fill
    values that are pixel levels, each keeping the loader contract. microtrain's own transforms are
    validated by policy_augment where the loader runs them (``native``) and refused elsewhere.
    Returns ``entries`` unchanged, so the saved recipe says what the user wrote."""
    parsed = parse_augment_list(entries, where)
    if not parsed:  # nothing to check: a machine without albumentations can still run the canonical loaders
        return entries
    for i, (name, args) in enumerate(parsed):
        if policy_augment.is_policy(name):
            if not native:
                raise policy_augment.refused_by(loader, name, f"{where}[{i}]")
            policy_augment.parse_policy(name, args, f"{where}[{i}]")
        else:
            _check_fill_levels(name, args.get("fill"), f"{where}[{i}]")
    for i, transform in _albumentations_transforms(parsed, where).items():
        name, args = parsed[i]
        fill = args.get("fill")
        # RGB probes, unless a fill gives one value per channel of some other count (checked when the data is known)
        channels = len(fill) if isinstance(fill, (list, tuple)) and len(fill) > 1 else 3
        _check_contract(transform, name, [(side, side, channels) for side in PROBE_SIDES], f"{where}[{i}]")
    return entries


def canonical_check(loader: str, *, native: bool = False) -> Callable[[list[Any], str], list[Any]]:
    """The ``Check`` of the ``augment`` option of a loader that implements the canonical transforms itself
    (and, with ``native``, microtrain's own TrivialAugment and RandAugment)."""

    def check(entries: list[Any], where: str) -> list[Any]:
        check_augment_list(entries, where, loader=loader, native=native)
        canonical_transforms(entries, loader, where, native=native)
        return entries

    return check


def check_against_images(entries: list[Any], shape: tuple[int, int, int], where: str = "loader.augment", *,
                         loader: str = "albumentations", native: bool = False) -> None:
    """The rules that need the images, run when a loader is built: fill lists of one value or one per
    channel, ToGray on 3 channels (1-channel images are already gray: left as they are, as albumentations
    does), CoarseDropout's smallest pixel hole inside the image, microtrain's own transforms on 1 or 3
    channels, and the contract at this exact shape (a Transpose keeps square images square, not others).
    ``shape`` is (height, width, channels)."""
    height, width, channels = shape
    parsed = parse_augment_list(entries, where)
    transforms = _albumentations_transforms(parsed, where)
    for i, (name, args) in enumerate(parsed):
        here = f"{where}[{i}]"
        fill = args.get("fill")
        if policy_augment.is_policy(name):
            if not native:
                raise policy_augment.refused_by(loader, name, here)
            policy_augment.check_channels(name, channels, here)
        if isinstance(fill, (int, float, list, tuple)):
            fill_per_channel(fill, channels, f"{here}: {name}.fill")
        if policy_augment.is_policy(name):
            continue
        import albumentations as A  # only reached for an albumentations entry

        transform = transforms[i]
        if isinstance(transform, A.ToGray) and channels not in (1, 3):
            raise RecipeError(f"{here}: ToGray needs 3-channel (RGB) images (1-channel ones are left as they are); "
                              f"these have {channels} channels; drop it")
        if isinstance(transform, A.CoarseDropout) and transform.hole_height_range[1] >= 1:
            for axis, (low, _), side in (("height", transform.hole_height_range, height),
                                         ("width", transform.hole_width_range, width)):
                if int(low) > side:
                    raise RecipeError(f"{here}: CoarseDropout.hole_{axis}_range starts at {low:g} pixels but the images "
                                      f"are {side} pixels in {axis}; lower it to at most {side}")
        _check_contract(transform, name, [shape], here)


def _check_fill_levels(name: str, fill: Any, where: str) -> None:
    values = fill if isinstance(fill, (list, tuple)) else [fill]
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if any(not 0 <= v <= 255 for v in numbers):
        raise RecipeError(f"{where}: {name}.fill={fill!r}: fill values are uint8 pixel levels, from 0 to 255")


def _check_contract(transform, name: str, shapes: list[tuple[int, int, int]], where: str) -> None:
    """Refuse a transform that normalises, or whose output size, channels or dtype can differ from its
    input, judged by applying it (p forced to 1) to uint8 noise of each shape."""
    if name in NORMALISING:
        raise RecipeError(f"{where}: {name} {NORMALISING[name]}; {_NORMALISED_TWICE}")
    failures = []
    for shape in shapes:
        for draw in range(PROBE_DRAWS):
            image = np.random.default_rng(draw).integers(0, 256, size=shape, dtype=np.uint8)
            transform.set_random_seed(draw)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = transform(image=image, force_apply=True)["image"]
            except Exception as exc:  # e.g. a crop larger than this probe, or a transform that needs masks
                failures.append((shape, exc))
                break
            if not isinstance(out, np.ndarray) or out.dtype != np.uint8:
                kind = out.dtype if isinstance(out, np.ndarray) else type(out).__name__
                raise RecipeError(f"{where}: {name} turns the uint8 pixels into {kind}; {_NORMALISED_TWICE}")
            if out.shape[:2] != shape[:2]:
                raise RecipeError(
                    f"{where}: {name} changes the image size ({shape[0]}x{shape[1]} -> {out.shape[0]}x{out.shape[1]}); "
                    "only the training split is augmented, so the model would train at one resolution and be tested "
                    "at another; drop it and resize in the dataset (a transform that keeps the size, such as "
                    "CropAndPad with keep_size: true, is fine)"
                )
            if out.shape != shape:
                channels = out.shape[2] if out.ndim == 3 else 1  # a 2-D result is one channel
                raise RecipeError(f"{where}: {name} changes the channel count ({shape[2]} -> {channels}); the model "
                                  "and the test split keep the dataset's channels; drop it")
    if len(failures) == len(shapes):
        shape, exc = failures[-1]
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RecipeError(f"{where}: {name} cannot be applied to a {'x'.join(map(str, shape))} uint8 image on its own "
                          f"({type(exc).__name__}: {detail}); the loaders pass only the image (no masks, boxes or "
                          "metadata); drop it or change its arguments")


def fill_per_channel(fill: float | Sequence[float], channels: int, what: str) -> tuple[float, ...]:
    """One fill value per channel: a single value (a number or a one-value list) fills every channel;
    any other length must match the channels, never padded or cut (albumentations would pad with 0)."""
    values = tuple(float(v) for v in fill) if isinstance(fill, (list, tuple)) else (float(fill),)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise RecipeError(f"{what} has {len(values)} values but the images have {channels} channels; give one number "
                          f"for every channel or {channels} values")
    return values


# ---------------------------------------------------------------------------------------------
# Canonical form, for loaders that implement the transforms themselves (dali, tensor). The recipe
# list is first validated by albumentations itself, then read back from the normalised attributes
# of the albumentations objects, so every loader interprets an argument exactly the same way.

@dataclass(frozen=True)
class FlipSpec:
    """Mirror left-right with probability p."""

    p: float


@dataclass(frozen=True)
class AffineSpec:
    """Random affine with probability p: translation as a fraction of width/height, drawn uniformly
    from ``translate_x``/``translate_y``; isotropic scale from ``scale``; rotation in degrees from
    ``rotate``; uncovered pixels get ``fill`` (0-255; one value for every channel or one per channel)."""

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
    """With probability p, replace every channel by the luma 0.299 R + 0.587 G + 0.114 B (a
    1-channel image is left as it is)."""

    p: float


Spec = FlipSpec | AffineSpec | DropoutSpec | GraySpec | PolicySpec  # PolicySpec: policy_augment's


def unsupported(loader: str, name: str, supported: list[str], where: str) -> RecipeError:
    return RecipeError(
        f"{where}: transform '{name}' cannot be expressed by the {loader} loader; it supports "
        f"{', '.join(supported)} (use loader.name=albumentations for any albumentations transform)"
    )


def _fill(value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),)


def _defaults_only(transform, names: dict[str, object], loader: str, where: str) -> None:
    for attr, default in names.items():
        if getattr(transform, attr) != default:
            raise RecipeError(
                f"{where}: {type(transform).__name__}.{attr}={getattr(transform, attr)!r} cannot be expressed by the "
                f"{loader} loader (only {default!r}); use loader.name=albumentations or drop the argument"
            )


def canonical_transforms(entries: list[Any], loader: str, where: str = "loader.augment", *,
                         native: bool = False) -> list[Spec]:
    """Validate ``entries`` with albumentations, then return the loader-neutral specs, one per entry.

    A transform or argument value the canonical form cannot express is an error naming the
    transform and the loader, never silently dropped. microtrain's own transforms become
    policy_augment's PolicySpec where the loader runs them (``native``) and are refused elsewhere."""
    parsed = parse_augment_list(entries, where)
    if not parsed:
        return []
    supported = CANONICAL + (list(policy_augment.NAMES) if native else [])
    for i, (name, _args) in enumerate(parsed):
        if policy_augment.is_policy(name):
            if not native:
                raise policy_augment.refused_by(loader, name, f"{where}[{i}]")
        elif name not in CANONICAL:
            raise unsupported(loader, name, supported, f"{where}[{i}]")
    transforms = _albumentations_transforms(parsed, where)
    specs: list[Spec] = []
    for i, (name, args) in enumerate(parsed):
        here = f"{where}[{i}]"
        if policy_augment.is_policy(name):
            specs.append(policy_augment.parse_policy(name, args, here))
            continue
        import albumentations as A  # only reached for an albumentations entry

        transform = transforms[i]
        p = float(transform.p)
        if isinstance(transform, A.HorizontalFlip):
            specs.append(FlipSpec(p))
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


def canonical_specs(entries: list[Any], loader: str, shape: tuple[int, int, int], *, native: bool = False) -> list[Spec]:
    """The specs a canonical loader applies to images of ``shape`` (height, width, channels), after the
    rules that need the images."""
    check_against_images(entries, shape, loader=loader, native=native)
    return canonical_transforms(entries, loader, native=native)


def spec_fill(spec: AffineSpec | DropoutSpec | PolicySpec, channels: int, index: int) -> tuple[float, ...]:
    """The fill of entry ``index`` per channel, as given (a loader working between integer levels uses it so)."""
    if isinstance(spec, PolicySpec):
        name = spec.name
    else:
        name = "Affine" if isinstance(spec, AffineSpec) else "CoarseDropout"
    return fill_per_channel(spec.fill, channels, f"loader.augment[{index}]: {name}.fill")


def whole_levels(spec: AffineSpec | DropoutSpec, fill: tuple[float, ...]) -> tuple[float, ...]:
    """``fill`` made whole as albumentations applies it to uint8 images: OpenCV rounds Affine's border
    value to the nearest level, CoarseDropout's cast to uint8 truncates."""
    whole = np.rint if isinstance(spec, AffineSpec) else np.trunc
    return tuple(float(whole(v)) for v in fill)


def changes_pixels(spec: Spec, channels: int) -> bool:
    """False for a transform that leaves images of ``channels`` channels as they are (ToGray on gray)."""
    return not (isinstance(spec, GraySpec) and channels == 1)


# ---------------------------------------------------------------------------------------------
# The random parameters of one batch. The tensor loader draws from a torch generator, dali from a
# NumPy one; both go through draw_batch, so what is drawn, in which order and from which range is
# written once. Every spec draws its coins first, even where it then changes nothing, so the
# stream of the specs after it does not depend on the images.

class RandomSource(Protocol):
    """The few operations draw_batch needs, on NumPy arrays or torch tensors."""

    def coins(self, p: float, size: int) -> Any: ...
    def uniform(self, low: float, high: float, size: tuple[int, ...]) -> Any: ...
    def integers(self, low: Any, high_inclusive: Any, size: tuple[int, ...]) -> Any: ...
    def trunc(self, values: Any) -> Any: ...
    def to_int(self, values: Any) -> Any: ...
    def arange(self, n: int) -> Any: ...


class NumpyRandom:
    """A RandomSource over ``np.random.Generator`` (float64 draws)."""

    def __init__(self, generator: np.random.Generator):
        self.generator = generator

    def coins(self, p: float, size: int) -> np.ndarray:
        return self.generator.random(size) < p

    def uniform(self, low: float, high: float, size: tuple[int, ...]) -> np.ndarray:
        return self.generator.uniform(low, high, size=size)

    def integers(self, low: Any, high_inclusive: Any, size: tuple[int, ...]) -> np.ndarray:
        return self.generator.integers(low, np.asarray(high_inclusive) + 1, size=size)

    def trunc(self, values: np.ndarray) -> np.ndarray:
        return np.trunc(values)

    def to_int(self, values: np.ndarray) -> np.ndarray:
        return values.astype(np.int64)

    def arange(self, n: int) -> np.ndarray:
        return np.arange(n)


class TorchRandom:
    """A RandomSource over a ``torch.Generator`` on ``device`` (float32 draws, no host round trip)."""

    def __init__(self, generator: torch.Generator, device: torch.device):
        self.generator, self.device = generator, device

    def _rand(self, size: tuple[int, ...] | int) -> torch.Tensor:
        return torch.rand(size, generator=self.generator, device=self.device)

    def coins(self, p: float, size: int) -> torch.Tensor:
        return self._rand(size) < p

    def uniform(self, low: float, high: float, size: tuple[int, ...]) -> torch.Tensor:
        return low + (high - low) * self._rand(size)

    def integers(self, low: Any, high_inclusive: Any, size: tuple[int, ...]) -> torch.Tensor:
        span = high_inclusive - low + 1  # the bounds may be tensors, one per element
        return low + (self._rand(size) * span).floor().long()

    def trunc(self, values: torch.Tensor) -> torch.Tensor:
        return torch.trunc(values)

    def to_int(self, values: torch.Tensor) -> torch.Tensor:
        return values.long()

    def arange(self, n: int) -> torch.Tensor:
        return torch.arange(n, device=self.device)


@dataclass
class AffineDraw:
    """Per image: translation in whole pixels (truncated as albumentations' ``int(t * side)``), scale, degrees."""

    translate_x: Any
    translate_y: Any
    scale: Any
    rotate: Any


@dataclass
class HoleDraw:
    """Per image and hole slot (B, K), K the most holes: whether the slot is used, its top-left and size."""

    active: Any
    top: Any
    left: Any
    height: Any
    width: Any


@dataclass
class Draw:
    """One spec's draws for a batch: ``apply`` (B,) bool, and its parameters (None for flip and gray)."""

    apply: Any
    params: AffineDraw | HoleDraw | PolicyDraw | None = None


def draw_batch(specs: list[Spec], size: int, height: int, width: int, source: RandomSource) -> list[Draw]:
    """The random parameters of a batch of ``size`` images of ``height`` x ``width``, spec by spec."""
    draws = []
    for spec in specs:
        apply = source.coins(spec.p, size)
        if isinstance(spec, AffineSpec):
            draws.append(Draw(apply, AffineDraw(
                translate_x=source.trunc(source.uniform(*spec.translate_x, (size,)) * width),
                translate_y=source.trunc(source.uniform(*spec.translate_y, (size,)) * height),
                scale=source.uniform(*spec.scale, (size,)),
                rotate=source.uniform(*spec.rotate, (size,)),
            )))
        elif isinstance(spec, DropoutSpec):
            draws.append(Draw(apply, _draw_holes(spec, size, height, width, source)))
        elif isinstance(spec, PolicySpec):
            draws.append(Draw(apply, policy_augment.draw_policy(spec, size, source)))
        else:
            draws.append(Draw(apply))
    return draws


def _draw_holes(spec: DropoutSpec, size: int, height: int, width: int, source: RandomSource) -> HoleDraw:
    """As albumentations' CoarseDropout: a hole count, then sizes (pixels, the upper end clipped to the
    image, when the height range's upper end is >= 1; else fractions of the side), then top-left
    corners uniform over the positions where each hole fits."""
    most = int(spec.holes[1])
    count = source.integers(int(spec.holes[0]), most, (size,))
    if spec.height[1] >= 1:
        hole_height = source.integers(int(spec.height[0]), min(int(spec.height[1]), height), (size, most))
        hole_width = source.integers(int(spec.width[0]), min(int(spec.width[1]), width), (size, most))
    else:
        hole_height = source.to_int(height * source.uniform(*spec.height, (size, most)))
        hole_width = source.to_int(width * source.uniform(*spec.width, (size, most)))
    top = source.integers(0, height - hole_height, (size, most))
    left = source.integers(0, width - hole_width, (size, most))
    active = source.arange(most)[None, :] < count[:, None]
    return HoleDraw(active, top, left, hole_height, hole_width)
