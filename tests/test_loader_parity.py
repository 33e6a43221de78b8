"""Parity across loaders: every registered loader that can express the canonical transforms
(albumentations, dali in CPU mode, tensor, and any other loader plugin) is held to the same
contract as the albumentations reference, on fixed images, on the CPU:

- without augmentation: the same samples, labels, dtype, layout and normalisation (to 1e-5);
- each augmentation with p=1 gives the same kind of result (flip: exact mirror; dropout: a hole of
  the requested size and fill; gray: equal channels; affine: same size, borders filled as asked,
  the same image as albumentations up to interpolation rounding) and with p=0 the input itself;
- with the seed recipe's probabilities, the fraction of augmented images is within 4 sigma of p;
- the rules that once diverged between loaders hold in each: a fill is one number for every channel
  or one per channel (anything else is refused, never padded or broadcast), ToGray leaves 1-channel
  images as they are and refuses channel counts other than 1 and 3.

A loader that is not registered (or whose package is not installed) is skipped, not failed."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from conftest import REPO  # noqa: E402

from microtrain.errors import MicrotrainError, RecipeError  # noqa: E402
from microtrain.plugin_manager import create_plugin_manager  # noqa: E402
from microtrain.recipe import load_recipe_file  # noqa: E402
from microtrain.state import LoaderContext  # noqa: E402

REFERENCE = "albumentations"
EXPECTED = ["albumentations", "dali", "tensor"]  # always listed, so a missing one shows up as skipped
MEAN = (0.49, 0.48, 0.45)
STD = (0.25, 0.24, 0.26)
SIZE = 32
FILL = [200, 210, 220]  # the test images stay below 100, so a filled pixel is unmistakable
SEED_AUGMENT = load_recipe_file(REPO / "recipes" / "cifar10_dsconv.yaml")["loader"]["augment"]


@functools.cache
def registry():
    return create_plugin_manager()[1]


def candidate_loaders() -> list[str]:
    """The expected loaders plus every other registered loader that takes an ``augment`` list."""
    try:
        found = [name for name in registry().names("loader") if "augment" in registry().get("loader", name, "").options]
    except MicrotrainError:  # a broken plugin elsewhere: the expected loaders are still tried (and reported)
        found = []
    return sorted(set(EXPECTED) | set(found))


LOADERS = candidate_loaders()
OTHERS = [name for name in LOADERS if name != REFERENCE]


def images(n: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 100, size=(n, SIZE, SIZE, channels), dtype=np.uint8)


def build(name: str, pixels: np.ndarray, augment: list, *, train: bool = True, channels_last: bool = True,
          batch_size: int = 64, seed: int = 0):
    """Build loader ``name`` on the CPU through the registry, with the options it declares (checked as the
    recipe resolver checks them); images of any channel count get MEAN and STD's first values, repeated."""
    if not registry().has("loader", name):
        pytest.skip(f"loader '{name}' is not registered")
    component = registry().get("loader", name, "loader.name")
    wanted = {"batch_size": batch_size, "eval_batch_size": batch_size, "augment": augment, "drop_last": False,
              "workers": 0, "device": "cpu", "threads": 1}
    options = component.validate({k: v for k, v in wanted.items() if k in component.options}, f"loader '{name}'")
    labels = (np.arange(len(pixels)) * 7 % 10).astype(np.int64)
    channels = pixels.shape[-1]
    ctx = LoaderContext(images=pixels, labels=labels, train=train, device=torch.device("cpu"), seed=seed,
                        mean=(MEAN * channels)[:channels], std=(STD * channels)[:channels], channels_last=channels_last)
    try:
        return component.build(ctx, options=options)
    except MicrotrainError as exc:
        if name == "dali" and "not installed" in str(exc):
            pytest.skip(str(exc))
        if name not in EXPECTED and "cannot be expressed" in str(exc):
            pytest.skip(f"loader '{name}' cannot express the canonical transforms: {exc}")
        raise


def run(name: str, pixels: np.ndarray, augment: list, epoch: int = 1, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch, concatenated: float images (N, C, H, W) and labels."""
    loader = build(name, pixels, augment, **kwargs)
    loader.set_epoch(epoch)
    batches = list(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: (N, H, W, C) on the 0..255 scale. Not rounded: a loader may keep
    augmented values between the integer levels (the tensor loader does)."""
    channels = images.shape[1]
    mean, std = np.array((MEAN * channels)[:channels]), np.array((STD * channels)[:channels])
    return images.permute(0, 2, 3, 1).double().numpy() * (std * 255.0) + mean * 255.0


TOL = 1e-3  # "equal" on the 0..255 scale: float32 normalisation round trips to ~1e-5


def same(a: np.ndarray, b, axis=None) -> np.ndarray | bool:
    """Equal up to float round-off (elementwise reduced with all() over ``axis``; all of it by default)."""
    close = np.abs(a - np.asarray(b)) <= TOL
    return close.all() if axis is None else close.all(axis=axis)


def source(pixels: np.ndarray, name: str, epoch: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The un-augmented images in the order the loader delivers them (the shared sample order), and labels."""
    plain, labels = run(name, pixels, [], epoch=epoch)
    return to_pixels(plain), labels.numpy()


# ---- no augmentation: numerically the same output ---------------------------------------------------

@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", OTHERS)
def test_without_augmentation_outputs_match_the_reference(name, train, channels_last):
    pixels = images(150)  # 2 full batches of 64 and a partial one
    for epoch in (1, 2):
        ref = build(REFERENCE, pixels, [], train=train, channels_last=channels_last)
        other = build(name, pixels, [], train=train, channels_last=channels_last)
        ref.set_epoch(epoch)
        other.set_epoch(epoch)
        assert len(ref) == len(other) == 3
        pairs = list(zip(ref, other, strict=True))
        for (xr, yr), (xo, yo) in pairs:
            assert xo.dtype == xr.dtype == torch.float32 and yo.dtype == yr.dtype == torch.int64
            assert xo.shape == xr.shape and xo.device == xr.device
            assert xo.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            assert torch.equal(yo, yr)
            torch.testing.assert_close(xo, xr, atol=1e-5, rtol=0)
        assert [len(yo) for _, (_, yo) in pairs] == [64, 64, 22]


# ---- each augmentation with p=1 and p=0 ---------------------------------------------------------------

@pytest.mark.parametrize("name", LOADERS)
def test_flip_is_an_exact_mirror(name):
    pixels = images(64)
    plain, labels = source(pixels, name)
    flipped, flipped_labels = run(name, pixels, [{"HorizontalFlip": {"p": 1.0}}])
    assert np.array_equal(flipped_labels.numpy(), labels)
    assert same(to_pixels(flipped), plain[:, :, ::-1])
    kept, _ = run(name, pixels, [{"HorizontalFlip": {"p": 0.0}}])
    assert same(to_pixels(kept), plain)


@pytest.mark.parametrize("hole", [[8, 8], [0.25, 0.25], [5, 11]])
@pytest.mark.parametrize("name", LOADERS)
def test_dropout_hole_has_the_requested_size_and_fill(name, hole):
    pixels = images(64)
    plain, _ = source(pixels, name)
    lo, hi = hole
    spec = {"num_holes_range": [1, 1], "hole_height_range": [lo, hi], "hole_width_range": [lo, hi], "fill": FILL}
    out = to_pixels(run(name, pixels, [{"CoarseDropout": {**spec, "p": 1.0}}])[0])
    sizes = set()
    for image, original in zip(out, plain, strict=True):
        filled = same(image, FILL, axis=2)
        rows, cols = np.nonzero(filled)
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert filled.sum() == height * width  # one solid rectangle
        sizes.add((int(height), int(width)))
        assert same(image[~filled], original[~filled])  # the rest untouched
    side = [round(SIZE * v) for v in hole] if hi < 1 else hole
    assert all(side[0] <= h <= side[1] and side[0] <= w <= side[1] for h, w in sizes), sizes
    kept = to_pixels(run(name, pixels, [{"CoarseDropout": {**spec, "p": 0.0}}])[0])
    assert same(kept, plain)


@pytest.mark.parametrize("name", LOADERS)
def test_gray_has_equal_channels_holding_the_luma(name):
    pixels = images(64)
    plain, _ = source(pixels, name)
    gray = to_pixels(run(name, pixels, [{"ToGray": {"p": 1.0}}])[0])
    assert same(gray[..., 0], gray[..., 1]) and same(gray[..., 1], gray[..., 2])
    luma = plain @ np.array([0.299, 0.587, 0.114])
    assert np.abs(gray[..., 0] - luma).max() <= 1.0
    kept = to_pixels(run(name, pixels, [{"ToGray": {"p": 0.0}}])[0])
    assert same(kept, plain)


@pytest.mark.parametrize("name", LOADERS)
def test_affine_shift_keeps_size_and_fills_the_uncovered_border(name):
    pixels = images(64)
    plain, _ = source(pixels, name)
    shift = {"translate_percent": [0.25, 0.25], "scale": [1.0, 1.0], "rotate": [0, 0], "fill": FILL}
    out = to_pixels(run(name, pixels, [{"Affine": {**shift, "p": 1.0}}])[0])
    assert out.shape == plain.shape
    k = SIZE // 4  # moved right and down by 8 pixels
    assert same(out[:, :k], FILL) and same(out[:, :, :k], FILL)
    assert np.abs(out[:, k:, k:] - plain[:, :-k, :-k]).max() <= 1.0
    kept = to_pixels(run(name, pixels, [{"Affine": {**shift, "p": 0.0}}])[0])
    assert same(kept, plain)


@pytest.mark.parametrize("transform", [
    {"Affine": {"rotate": [30, 30], "fill": FILL, "p": 1.0}},
    {"Affine": {"translate_percent": [-0.1, -0.1], "scale": [1.2, 1.2], "rotate": [-20, -20], "fill": FILL, "p": 1.0}},
    {"ShiftScaleRotate": {"shift_limit": [0.1, 0.1], "scale_limit": [-0.2, -0.2], "rotate_limit": [10, 10], "fill": FILL,
                          "p": 1.0}},
])
@pytest.mark.parametrize("name", OTHERS)
def test_affine_with_fixed_parameters_matches_the_reference(name, transform):
    """Same centre, direction and fill as albumentations; only interpolation rounding may differ."""
    pixels = images(64)
    ref = to_pixels(run(REFERENCE, pixels, [transform])[0])
    out = to_pixels(run(name, pixels, [transform])[0])
    assert out.shape == ref.shape
    if "rotate" in transform.get("Affine", {}) and len(transform["Affine"]) == 3:  # a pure rotation: corners uncovered
        corners = (slice(None), [0, 0, -1, -1], [0, -1, 0, -1])
        assert same(out[corners], FILL) and same(ref[corners], FILL)
    diff = np.abs(out - ref)
    assert diff.max() <= 3.0 and (diff > 1).mean() < 0.01, (diff.max(), (diff > 1).mean())


# ---- the seed recipe's probabilities ---------------------------------------------------------------

def seed_transform(name: str) -> dict:
    (entry,) = [e for e in SEED_AUGMENT if name in e]
    return entry


def applied(kind: str, out: np.ndarray, plain: np.ndarray) -> np.ndarray:
    """Which images got the transform, checking each is either untouched or the right kind of result."""
    changed = ~same(out, plain, axis=(1, 2, 3))
    if kind == "HorizontalFlip":
        mirrored = same(out, plain[:, :, ::-1], axis=(1, 2, 3))
        assert (mirrored | ~changed).all()
        return mirrored
    if kind == "ToGray":
        gray = same(out[..., 0], out[..., 1], axis=(1, 2)) & same(out[..., 1], out[..., 2], axis=(1, 2))
        assert (gray | ~changed).all()
        return gray
    if kind == "CoarseDropout":
        holes = same(out, FILL, axis=3).reshape(len(out), -1).sum(axis=1)
        assert (holes[changed] == 16 * 16).all()  # the seed's one 16x16 hole (images stay below 100, FILL above)
        return changed
    assert out.shape == plain.shape
    return changed


@pytest.mark.parametrize("kind", ["HorizontalFlip", "Affine", "CoarseDropout", "ToGray"])
@pytest.mark.parametrize("name", LOADERS)
def test_seed_probabilities_within_four_sigma(name, kind):
    n = 2000
    pixels = images(n, seed=1)
    entry = seed_transform(kind)
    if kind == "CoarseDropout":
        entry = {kind: {**entry[kind], "fill": FILL}}  # a fill the images never hold, so holes are countable
    plain, labels = source(pixels, name)
    out, out_labels = run(name, pixels, [entry], batch_size=250)
    assert np.array_equal(out_labels.numpy(), labels)
    p = entry[kind]["p"]
    fraction = applied(kind, to_pixels(out), plain).mean()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(fraction - p) <= 4 * sigma, (fraction, p)


# ---- the rules that once diverged: the same answer from every loader ---------------------------------

SHIFT = {"translate_percent": [0.25, 0.25], "scale": [1.0, 1.0], "rotate": [0, 0], "p": 1.0}  # 8-pixel border
HOLE = {"num_holes_range": [1, 1], "hole_height_range": [8, 8], "hole_width_range": [8, 8], "p": 1.0}


def filled_border(out: np.ndarray) -> np.ndarray:
    """The pixels the 8-pixel shift leaves uncovered (top rows), one row per image."""
    return out[:, 0]


@pytest.mark.parametrize("channels, fill, expected", [
    (3, [200], [200, 200, 200]),  # one value in a list: every channel (albumentations alone would fill 200, 0, 0)
    (3, 200, [200, 200, 200]),
    (1, 200, [200]),  # a number on gray images (the tensor loader once made it 3 values and refused it)
    (1, [200], [200]),
])
@pytest.mark.parametrize("name", LOADERS)
def test_a_single_fill_value_fills_every_channel(name, channels, fill, expected):
    pixels = images(16, channels=channels)
    shifted = to_pixels(run(name, pixels, [{"Affine": {**SHIFT, "fill": fill}}])[0])
    assert same(filled_border(shifted), expected)
    holed = to_pixels(run(name, pixels, [{"CoarseDropout": {**HOLE, "fill": fill}}])[0])
    assert (same(holed, expected, axis=3).sum(axis=(1, 2)) == 64).all()  # one 8x8 hole of the fill in every image


@pytest.mark.parametrize("channels, fill", [(3, [128, 128]), (1, [125, 123, 114]), (3, [1, 2, 3, 4])])
@pytest.mark.parametrize("transform", ["Affine", "CoarseDropout"])
@pytest.mark.parametrize("name", LOADERS)
def test_a_fill_of_another_length_than_the_channels_is_refused(name, transform, channels, fill):
    """Once: dali broadcast [128, 128] to 3 channels, tensor refused it, albumentations filled 128, 128, 0."""
    args = {**(SHIFT if transform == "Affine" else HOLE), "fill": fill}
    with pytest.raises(RecipeError) as info:
        build(name, images(4, channels=channels), [{transform: args}])
    assert str(info.value) == (f"loader.augment[0]: {transform}.fill has {len(fill)} values but the images have {channels} "
                               f"channels; give one number for every channel or {channels} values")


@pytest.mark.parametrize("name", LOADERS)
def test_gray_leaves_one_channel_images_as_they_are(name):
    """Once: dali refused 1-channel images, tensor left them alone; albumentations leaves them alone."""
    pixels = images(32, channels=1)
    plain, _ = source(pixels, name)
    out = to_pixels(run(name, pixels, [{"ToGray": {"p": 1.0}}, {"HorizontalFlip": {"p": 1.0}}])[0])
    assert out.shape == plain.shape and same(out, plain[:, :, ::-1])


@pytest.mark.parametrize("channels", [2, 4])
@pytest.mark.parametrize("name", LOADERS)
def test_gray_refuses_other_channel_counts_than_one_and_three(name, channels):
    with pytest.raises(RecipeError) as info:
        build(name, images(4, channels=channels), [{"ToGray": {"p": 0.5}}])
    assert str(info.value) == (f"loader.augment[0]: ToGray needs 3-channel (RGB) images (1-channel ones are left as they "
                               f"are); these have {channels} channels; drop it")


@pytest.mark.parametrize("name", LOADERS)
def test_a_pixel_hole_larger_than_the_image_is_refused(name):
    """albumentations itself fails on it mid-epoch; the tensor loader drew nonsense sizes."""
    hole = {**HOLE, "hole_height_range": [SIZE + 1, SIZE + 8]}
    with pytest.raises(RecipeError, match=rf"loader.augment\[0\]: CoarseDropout.hole_height_range starts at {SIZE + 1} "
                                          rf"pixels but the images are {SIZE} pixels in height"):
        build(name, images(4), [{"CoarseDropout": hole}])


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("name", LOADERS)
def test_a_fresh_loader_starts_a_resumed_epoch_at_its_start_batch(name, workers):
    """A resumed process builds new loaders: their very first pass must skip the batches already trained
    (a multi-worker DataLoader asks its sampler twice when its first iterator is made)."""
    if workers and name != "albumentations":
        pytest.skip("only the albumentations loader has worker processes")
    pixels = images(256)
    augment = [{"HorizontalFlip": {"p": 0.5}}]
    whole = build(name, pixels, augment, batch_size=32)
    whole.set_epoch(2)
    expected = [batch[0].clone() for batch in whole][3:]
    fresh = build(name, pixels, augment, batch_size=32)
    if workers:
        fresh = type(fresh)(fresh.context, batch_size=32, eval_batch_size=32, workers=workers, augment=augment,
                            drop_last=False, prefetch_factor=2)
    fresh.set_epoch(2, 3)
    resumed = [batch[0].clone() for batch in fresh]
    assert len(resumed) == len(expected) == 5
    assert all(torch.equal(a, b) for a, b in zip(resumed, expected, strict=True))
