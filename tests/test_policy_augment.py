"""microtrain's own TrivialAugment and RandAugment (microtrain_plugins.loaders.policy_augment) in the
``tensor`` loader: each op against PIL, per-sample draws, determinism and exact mid-epoch resume, the
p/identity/magnitude-0 edge cases, the pixel range, argument validation (and the refusal by the
other loaders), and one short ``microtrain run``. Nothing here asserts accuracy."""

from __future__ import annotations

import functools
import json
import math
import os
import re

import numpy as np
import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

from microtrain.cli import main  # noqa: E402
from microtrain.errors import RecipeError  # noqa: E402
from microtrain.plugin_manager import create_plugin_manager  # noqa: E402
from microtrain.sampling import epoch_batches  # noqa: E402
from microtrain.state import LoaderContext  # noqa: E402
from microtrain_plugins.loaders.augment_spec import TorchRandom, canonical_transforms, draw_batch  # noqa: E402
from microtrain_plugins.loaders.policy_augment import (  # noqa: E402
    OPS,
    PolicyDraw,
    PolicyOps,
    draw_policy,
    magnitude_table,
    parse_policy,
)
from microtrain_plugins.loaders.tensor_loader import affine, build_tensor_loader  # noqa: E402

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
FILL = (10, 20, 30)
BINS = 31
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@functools.cache
def registry():
    return create_plugin_manager()[1]


def resolve_augment(loader: str, augment: list) -> list:
    """``loader.augment`` as the recipe resolver checks it: no data loaded, no loader built."""
    return registry().get("loader", loader, "loader.name").validate({"augment": augment}, "loader")["augment"]


def pictures(n: int, height: int = 24, width: int = 32, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Gradients plus noise, levels 0-235: structure for the geometry to move, a spread histogram for
    Equalize/AutoContrast, and a non-square shape so the aspect handling is checked."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = (xs[None, :, :, None] * 5 + ys[None, :, :, None] * 3 + np.arange(channels) * 45) % 200 + 20
    return np.clip(base + rng.integers(-20, 20, (n, height, width, channels)), 0, 255).astype(np.uint8)


def apply_op(images: np.ndarray, op: str, bin_index: int, negative: bool = False, space: str = "wide",
             interpolation: str = "nearest") -> np.ndarray:
    """``op`` at ``bin_index`` on every image (B, H, W, C) uint8 -> float (B, H, W, C), through the batched code."""
    b, h, w, c = images.shape
    spec = parse_policy("RandAugment", {"num_ops": 1, "magnitude": bin_index, "ops": [op], "space": space,
                                        "interpolation": interpolation, "fill": list(FILL[:c])}, "test")
    ops = PolicyOps(spec, c, h, w, torch.device("cpu"), tuple(float(v) for v in FILL[:c]))
    draw = PolicyDraw(torch.zeros(1, b, dtype=torch.long), torch.full((1, b), bin_index), torch.full((1, b), negative))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return ops(x, torch.ones(b, dtype=torch.bool), draw, affine).permute(0, 2, 3, 1).numpy()


def with_pil(images: np.ndarray, function) -> np.ndarray:
    mode = "L" if images.shape[-1] == 1 else "RGB"
    out = [np.asarray(function(Image.fromarray(im.squeeze(-1) if mode == "L" else im, mode))) for im in images]
    return np.stack(out).reshape(images.shape).astype(np.float32)


# ---- each op against PIL ------------------------------------------------------------------------------
# Geometry: PIL's affine maps take the source point of each output pixel centre, as torchvision's ops
# define it (ShearX (1, m, 0, 0, 1, 0) about the top-left corner, TranslateX (1, 0, -t, 0, 1, 0),
# Rotate counter-clockwise about the centre), with nearest sampling and the fill colour.

WIDE = magnitude_table("wide", BINS, 24, 32)


def pil_geometry(op: str, value: float):
    if op == "Rotate":
        return lambda im: im.rotate(value, resample=Image.NEAREST, fillcolor=FILL)
    data = {"ShearX": (1, value, 0, 0, 1, 0), "ShearY": (1, 0, 0, value, 1, 0),
            "TranslateX": (1, 0, -int(value), 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, -int(value))}[op]
    return lambda im: im.transform(im.size, Image.AFFINE, data, resample=Image.NEAREST, fillcolor=FILL)


@pytest.mark.parametrize("op", ["ShearX", "ShearY", "TranslateX", "TranslateY"])
@pytest.mark.parametrize("negative", [False, True])
def test_shear_and_translate_equal_pil_exactly(op: str, negative: bool) -> None:
    images = pictures(4)
    value = WIDE[op][10] * (-1 if negative else 1)
    np.testing.assert_array_equal(apply_op(images, op, 10, negative), with_pil(images, pil_geometry(op, value)))


@pytest.mark.parametrize("bin_index", [3, 10, 25])
def test_rotate_equals_pil_but_for_nearest_neighbour_ties(bin_index: int) -> None:
    """Where a source point falls exactly half-way between pixels, PIL takes the pixel after it and
    grid_sample the even one (and float32 vs float64 decides near-ties), so a few pixels (0.12% at 45
    degrees) take a neighbour's value: at most 1% may differ."""
    images = pictures(4)
    angle = WIDE["Rotate"][bin_index]
    for negative in (False, True):
        got = apply_op(images, "Rotate", bin_index, negative)
        expected = with_pil(images, pil_geometry("Rotate", -angle if negative else angle))
        assert (got != expected).any(axis=-1).mean() <= 0.01


def test_bilinear_translation_is_exact_too() -> None:
    """Whole-pixel shifts sample pixel centres, so bilinear sampling gives the same picture as nearest."""
    images = pictures(3)
    np.testing.assert_allclose(apply_op(images, "TranslateX", 12, interpolation="bilinear"),
                               apply_op(images, "TranslateX", 12), atol=1e-3)


# Blends: PIL computes in integers (its grey is the rounded luma, its Contrast mean a rounded mean of that,
# its smoothed image rounded) and truncates the result; ours is float and not truncated. Bounds: Brightness
# truncation only, so 0 <= ours - PIL < 1; Color and Sharpness add at most 0.5 |factor - 1| <= 0.495 of
# rounding, < 1.5; Contrast's mean can be off by up to 1 level, times |factor - 1| <= 0.99, < 2.
BLEND_TOLERANCE = {"Brightness": 1.0, "Color": 1.5, "Contrast": 2.0, "Sharpness": 1.5}
ENHANCERS = {"Brightness": ImageEnhance.Brightness, "Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
             "Sharpness": ImageEnhance.Sharpness}


@pytest.mark.parametrize("op", list(ENHANCERS))
@pytest.mark.parametrize("channels", [3, 1])
def test_blends_match_pil_image_enhance_within_its_integer_rounding(op: str, channels: int) -> None:
    images = pictures(4, channels=channels)
    for bin_index, negative in ((30, False), (30, True), (12, False)):
        factor = 1 + (-1 if negative else 1) * WIDE[op][bin_index]
        expected = with_pil(images, lambda im, factor=factor: ENHANCERS[op](im).enhance(factor))
        difference = apply_op(images, op, bin_index, negative) - expected
        assert np.abs(difference).max() < BLEND_TOLERANCE[op], (op, factor)
        if op == "Brightness":
            assert difference.min() >= -1e-3  # PIL truncates, we do not


@pytest.mark.parametrize("bin_index", [0, 10, 30])
def test_posterize_and_solarize_equal_pil_exactly(bin_index: int) -> None:
    images = pictures(4)
    bits, threshold = int(WIDE["Posterize"][bin_index]), WIDE["Solarize"][bin_index]
    assert bits == 8 - round(bin_index / 5)  # wide: 8 bits kept at bin 0, 2 at the last
    np.testing.assert_array_equal(apply_op(images, "Posterize", bin_index),
                                  with_pil(images, lambda im: ImageOps.posterize(im, bits)))
    np.testing.assert_array_equal(apply_op(images, "Solarize", bin_index),
                                  with_pil(images, lambda im: ImageOps.solarize(im, threshold)))


@pytest.mark.parametrize("channels", [3, 1])
def test_equalize_equals_pil_exactly_and_autocontrast_within_its_truncation(channels: int) -> None:
    images = pictures(6, channels=channels)
    images[0] = 77  # one level only: both leave it as it is
    images[1, ..., 0] = np.where(np.arange(32) < 16, 40, 90)  # two levels
    np.testing.assert_array_equal(apply_op(images, "Equalize", 0), with_pil(images, ImageOps.equalize))
    difference = apply_op(images, "AutoContrast", 0) - with_pil(images, ImageOps.autocontrast)
    # PIL truncates the stretched level, in float64: a level that should be whole can lose 1 (40..90: 90 * 5.1 - 204
    # is 254.99999999999997 there, 254 after truncation; 255 here).
    assert difference.min() >= -1e-3 and difference.max() <= 1.0


def test_level_ops_round_fractional_levels_first() -> None:
    """Posterize and friends are defined on uint8 levels: 127.6 counts as 128 (kept by 2-bit posterize), not 127 (-> 64)."""
    spec = parse_policy("RandAugment", {"num_ops": 1, "magnitude": 30, "ops": ["Posterize"], "space": "wide"}, "test")
    ops = PolicyOps(spec, 1, 2, 2, torch.device("cpu"), (0.0,))
    x = torch.tensor([127.6, 127.4, 63.4, 255.0]).view(1, 1, 2, 2)
    draw = PolicyDraw(torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), 30), torch.zeros(1, 1, dtype=torch.bool))
    out = ops(x, torch.ones(1, dtype=torch.bool), draw, affine)  # wide bin 30: 2 bits kept, steps of 64
    assert out.flatten().tolist() == [128.0, 64.0, 0.0, 192.0]


# ---- the magnitude tables ---------------------------------------------------------------------------------

def test_magnitude_tables_follow_torchvision_ranges() -> None:
    wide, standard = magnitude_table("wide", BINS, 32, 32), magnitude_table("standard", BINS, 32, 32)
    for table, shear, shift, degrees, blend, bits in ((wide, 0.99, 32.0, 135.0, 0.99, 2),
                                                      (standard, 0.3, 150 / 331 * 32, 30.0, 0.9, 4)):
        assert table["ShearX"][0] == 0 and math.isclose(table["ShearX"][-1], shear)
        assert math.isclose(table["TranslateY"][-1], shift) and math.isclose(table["Rotate"][-1], degrees)
        assert all(math.isclose(table[op][-1], blend) for op in ("Brightness", "Color", "Contrast", "Sharpness"))
        assert table["Posterize"][0] == 8 and table["Posterize"][-1] == bits
        assert table["Solarize"][0] == 255 and table["Solarize"][-1] == 0
        assert table["Identity"] == table["AutoContrast"] == table["Equalize"] == [0.0] * BINS
    assert set(wide) == set(OPS)


# ---- draws: per sample, fixed in number --------------------------------------------------------------------

def test_ops_and_bins_are_drawn_per_sample_uniformly() -> None:
    """Chi-square of the op and bin counts over 14,000 samples of one batch: per-sample uniform draws
    pass; a draw per batch (every sample the same op) would give a chi-square of about 180,000."""
    spec = parse_policy("TrivialAugment", {}, "test")
    size = 14_000
    draw = draw_policy(spec, size, TorchRandom(torch.Generator().manual_seed(3), torch.device("cpu")))
    for values, categories in ((draw.op[0], len(OPS)), (draw.bin[0], BINS)):
        counts = torch.bincount(values, minlength=categories).double()
        expected = size / categories
        chi_square = float(((counts - expected) ** 2 / expected).sum())
        assert chi_square < categories - 1 + 5 * math.sqrt(2 * (categories - 1))  # mean + 5 sd of chi2(k-1)
    negative = draw.negative.float().mean().item()
    assert abs(negative - 0.5) < 4 * math.sqrt(0.25 / size)


def test_rand_augment_draws_num_ops_ops_per_sample_at_the_fixed_bin() -> None:
    spec = parse_policy("RandAugment", {"num_ops": 3, "magnitude": 7}, "test")
    draw = draw_policy(spec, 500, TorchRandom(torch.Generator().manual_seed(0), torch.device("cpu")))
    assert draw.op.shape == (3, 500) and (draw.bin == 7).all()
    assert len(set(draw.op[0].tolist())) == len(OPS)  # every op occurs among 500 samples
    assert (draw.op[0] != draw.op[1]).float().mean() > 0.8  # the rounds draw independently


def test_the_draw_count_is_fixed_so_later_transforms_see_the_same_stream() -> None:
    """A flip after the policy gets the same coins whatever the policy's ops or kind (same number of rounds)."""
    def flips_after(policy: dict) -> torch.Tensor:
        specs = canonical_transforms([policy, {"HorizontalFlip": {"p": 0.5}}], "tensor", native=True)
        return draw_batch(specs, 64, 8, 8, TorchRandom(torch.Generator().manual_seed(5), torch.device("cpu")))[1].apply

    reference = flips_after({"TrivialAugment": {}})
    for other in ({"TrivialAugment": {"ops": ["Identity"], "num_magnitude_bins": 2, "p": 0.1}},
                  {"RandAugment": {"num_ops": 1, "magnitude": 0, "space": "wide"}}):
        assert torch.equal(flips_after(other), reference)


def test_different_samples_of_a_batch_get_different_ops() -> None:
    """Through the loader, ops [Identity, Solarize] at the bin whose threshold is 0: each sample is
    either untouched or fully inverted, both in every batch, about half each (4 sigma)."""
    n = 2000
    images = pictures(n, height=4, width=4)
    out = loader_pixels(images, [{"RandAugment": {"num_ops": 1, "magnitude": 30, "ops": ["Identity", "Solarize"]}}],
                        batch_size=500)
    original = in_batch_order(images, batch_size=500)
    kept = (out - original).abs().amax(dim=(1, 2, 3)) < 1e-3
    inverted = (out - (255 - original)).abs().amax(dim=(1, 2, 3)) < 1e-3
    assert (kept | inverted).all()
    for batch in range(4):
        assert 0 < kept[batch * 500:(batch + 1) * 500].sum() < 500
    assert abs(kept.float().mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)


def test_all_geometric_samples_of_a_round_share_one_warp() -> None:
    calls = []

    def counting_warp(*args, **kwargs):
        calls.append(args[1].sum().item())
        return affine(*args, **kwargs)

    spec = parse_policy("RandAugment", {"num_ops": 2}, "test")
    ops = PolicyOps(spec, 3, 8, 8, torch.device("cpu"), (128.0,) * 3)
    draw = draw_policy(spec, 256, TorchRandom(torch.Generator().manual_seed(0), torch.device("cpu")))
    ops(torch.rand(256, 3, 8, 8) * 255, torch.ones(256, dtype=torch.bool), draw, counting_warp)
    assert len(calls) == 2 and all(count > 1 for count in calls)  # one grid_sample per round, many samples in it


# ---- through the loader: p, identity, range, determinism, resume --------------------------------------------

def context(images: np.ndarray, seed: int = 0, device: str = "cpu") -> LoaderContext:
    c = images.shape[-1]
    return LoaderContext(images=images, labels=np.arange(len(images), dtype=np.int64) % 10, train=True,
                         device=torch.device(device), seed=seed, mean=MEAN[:c], std=STD[:c], channels_last=True)


def loader_pixels(images: np.ndarray, augment: list, *, batch_size: int | None = None, seed: int = 0,
                  epoch: int = 1, device: str = "cpu") -> torch.Tensor:
    """One epoch's training batches, de-normalised to the 0-255 scale (B, C, H, W), on the CPU."""
    loader = build_tensor_loader(context(images, seed, device), batch_size=batch_size or len(images), augment=augment)
    loader.set_epoch(epoch)
    c = images.shape[-1]
    return torch.cat([x.cpu() for x, _ in loader]) * (torch.tensor(STD[:c]).view(1, c, 1, 1) * 255) + \
        torch.tensor(MEAN[:c]).view(1, c, 1, 1) * 255


def in_batch_order(images: np.ndarray, *, batch_size: int, seed: int = 0, epoch: int = 1) -> torch.Tensor:
    order = np.concatenate(epoch_batches(len(images), batch_size, seed=seed, epoch=epoch, shuffle=True, drop_last=False))
    return torch.from_numpy(images[order]).permute(0, 3, 1, 2).float()


STRONG = [{"TrivialAugment": {"fill": list(FILL)}},
          {"RandAugment": {"num_ops": 3, "magnitude": 30, "space": "wide", "interpolation": "bilinear", "fill": 250}}]


def test_p0_identity_only_and_magnitude_0_leave_images_unchanged() -> None:
    images = pictures(64, height=8, width=8)
    images[images == 255] = 254  # Solarize at bin 0 inverts level 255 only: kept out of the magnitude-0 case
    original = in_batch_order(images, batch_size=64)
    magnitude_ops = ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
                     "Sharpness", "Posterize", "Solarize"]
    for augment in ([{"TrivialAugment": {"p": 0.0}}, {"RandAugment": {"p": 0.0, "num_ops": 4}}],
                    [{"TrivialAugment": {"ops": ["Identity"]}}],
                    [{"RandAugment": {"num_ops": 3, "magnitude": 0, "ops": magnitude_ops}}],
                    [{"TrivialAugment": {"num_magnitude_bins": 2, "ops": magnitude_ops, "p": 0.0}}]):
        torch.testing.assert_close(loader_pixels(images, augment), original, atol=1e-3, rtol=0, msg=str(augment))
    solarized = loader_pixels(np.full((4, 2, 2, 3), 255, np.uint8), [{"RandAugment": {"magnitude": 0, "ops": ["Solarize"]}}])
    assert (solarized.abs() < 1e-3).all()  # ... where level 255 becomes 0, as torchvision's and PIL's solarize(255)


def test_p_is_the_fraction_of_samples_augmented() -> None:
    n, p = 2000, 0.3
    images = pictures(n, height=4, width=4)
    out = loader_pixels(images, [{"RandAugment": {"num_ops": 1, "magnitude": 30, "ops": ["Solarize"], "p": p}}],
                        batch_size=1000)
    changed = (out - in_batch_order(images, batch_size=1000)).abs().amax(dim=(1, 2, 3)) > 1e-3
    assert abs(changed.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("augment", STRONG)
def test_pixels_stay_uint8_levels_range(augment: dict, device: str) -> None:
    images = pictures(200, height=8, width=8)
    images[:50] = 255
    images[50:100] = 0
    out = loader_pixels(images, [augment], batch_size=100, device=device)
    assert out.min() >= -1e-3 and out.max() <= 255 + 1e-3
    assert (out - in_batch_order(images, batch_size=100)).abs().amax(dim=(1, 2, 3)).gt(1e-3).float().mean() > 0.5


def test_gray_images_are_augmented_too() -> None:
    out = loader_pixels(pictures(32, height=8, width=8, channels=1), [{"TrivialAugment": {"fill": [7]}}])
    assert out.shape == (32, 1, 8, 8) and out.min() >= -1e-3 and out.max() <= 255 + 1e-3


# Determinism under a seed, other seeds and epochs differing and mid-epoch resume, for these policies as for
# every other augmentation: tests/test_tensor_loader.py (test_same_seed_same_batches..., test_resume_mid_epoch...).

AUGMENT = [{"HorizontalFlip": {"p": 0.5}}, {"Affine": {"translate_percent": [-0.125, 0.125], "fill": list(FILL), "p": 0.75}},
           {"TrivialAugment": {"fill": list(FILL)}}, {"RandAugment": {"num_ops": 2, "magnitude": 9, "fill": list(FILL)}}]


# ---- validation: one line, when the recipe is resolved ---------------------------------------------------

@pytest.mark.parametrize("entry, message", [
    ({"TrivialAugment": {"num_bins": 31}}, "TrivialAugment has no argument 'num_bins' (did you mean 'num_magnitude_bins'?); "
                                           "its arguments are: num_magnitude_bins, space, ops, fill, interpolation, p"),
    ({"TrivialAugment": {"magnitude": 3}}, "TrivialAugment has no argument 'magnitude'"),
    ({"TrivialAugment": {"num_magnitude_bins": 1}}, "TrivialAugment.num_magnitude_bins=1: must be a whole number >= 2"),
    ({"RandAugment": {"num_magnitude_bins": 2.5}}, "RandAugment.num_magnitude_bins=2.5: must be a whole number >= 2"),
    ({"RandAugment": {"magnitude": 31}}, "RandAugment.magnitude=31: must be a bin index from 0 to num_magnitude_bins - 1 = 30"),
    ({"RandAugment": {"magnitude": -1}}, "RandAugment.magnitude=-1: must be a bin index"),
    ({"RandAugment": {"num_ops": 0}}, "RandAugment.num_ops=0: must be a whole number >= 1"),
    ({"RandAugment": {"num_ops": True}}, "RandAugment.num_ops=True: must be a whole number >= 1"),
    ({"TrivialAugment": {"p": 1.5}}, "TrivialAugment.p=1.5: must be a probability from 0 to 1"),
    ({"TrivialAugment": {"space": "wdie"}}, "TrivialAugment.space='wdie': must be one of wide, standard (did you mean 'wide'?)"),
    ({"TrivialAugment": {"interpolation": "cubic"}}, "TrivialAugment.interpolation='cubic': must be one of nearest, bilinear"),
    ({"TrivialAugment": {"ops": ["Rotate", "Solarise"]}}, "TrivialAugment.ops=['Rotate', 'Solarise']: 'Solarise' is not an op "
                                                          "(did you mean 'Solarize'?)"),
    ({"TrivialAugment": {"ops": []}}, "TrivialAugment.ops=[]: must be a non-empty list of op names"),
    ({"TrivialAugment": {"ops": ["Rotate", "Rotate"]}}, "names an op twice"),
    ({"TrivialAugment": {"fill": [300, 0, 0]}}, "TrivialAugment.fill=[300, 0, 0]: fill values are uint8 pixel levels, from 0 to 255"),
    ({"RandAugment": {"fill": "random"}}, "RandAugment.fill='random': must be a number or a list of numbers"),
])
def test_bad_arguments_are_refused_in_one_line_when_resolved(entry: dict, message: str) -> None:
    with pytest.raises(RecipeError) as info:
        resolve_augment("tensor", [{"HorizontalFlip": {"p": 0.5}}, entry])
    text = str(info.value)
    assert text.startswith("loader.augment[1]: ") and message in text and "\n" not in text, text


def test_fill_that_does_not_fit_the_channels_is_refused_when_built() -> None:
    augment = [{"TrivialAugment": {"fill": [1, 2]}}]
    assert resolve_augment("tensor", augment) == augment  # the channel count is not known before the data
    with pytest.raises(RecipeError, match=r"^loader.augment\[0\]: TrivialAugment.fill has 2 values but the images have 3 "):
        build_tensor_loader(context(pictures(4, height=8, width=8)), augment=augment)
    with pytest.raises(RecipeError, match=r"^loader.augment\[0\]: RandAugment needs 1- or 3-channel images"):
        build_tensor_loader(context(pictures(4, height=8, width=8, channels=4)), augment=["RandAugment"])


@pytest.mark.parametrize("loader", ["albumentations", "dali"])
@pytest.mark.parametrize("name", ["TrivialAugment", "RandAugment"])
def test_other_loaders_refuse_them_naming_the_tensor_loader(loader: str, name: str) -> None:
    with pytest.raises(RecipeError) as info:
        resolve_augment(loader, ["HorizontalFlip", {name: {"p": 0.5}}])
    assert str(info.value) == (f"loader.augment[1]: {name} is a tensor-loader transform (microtrain's own batched policy, "
                               f"not an albumentations transform), which the {loader} loader does not run; use "
                               "loader.name=tensor")


def test_albumentations_has_no_transform_of_these_names() -> None:
    import albumentations as A

    assert not hasattr(A, "TrivialAugment") and not hasattr(A, "RandAugment")


def test_the_recipe_list_is_kept_as_written() -> None:
    assert resolve_augment("tensor", AUGMENT) == AUGMENT
    assert resolve_augment("tensor", ["TrivialAugment"]) == ["TrivialAugment"]


def test_the_policy_module_imports_no_other_plugin_module() -> None:
    """augment_spec imports policy_augment; policy_augment imports neither it nor any loader (no cycle)."""
    import ast

    from microtrain_plugins.loaders import policy_augment

    tree = ast.parse(open(policy_augment.__file__, encoding="utf-8").read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | \
        {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name and name.startswith("microtrain_plugins")}, imported


# ---- through the command line ------------------------------------------------------------------------------

def test_inspect_refuses_a_bad_policy_argument_in_one_line(tiny_recipe, capsys) -> None:
    recipe = tiny_recipe(loader={"name": "tensor", "batch_size": 64, "augment": [{"TrivialAugment": {"spce": "wide"}}]})
    assert main(["inspect", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "loader.augment[0]: TrivialAugment has no argument 'spce' (did you mean 'space'?)" in err


def test_run_with_the_albumentations_loader_fails_before_any_run_dir_exists(tiny_recipe, capsys) -> None:
    run_dir = tiny_recipe().parent / "x"
    assert main(["run", str(tiny_recipe()), "loader.augment=[TrivialAugment]", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"TrivialAugment is a tensor-loader transform.*loader.name=tensor", err)
    assert not run_dir.exists()


def test_microtrain_run_trains_one_epoch_with_trivial_augment(tiny_recipe, tmp_path) -> None:
    recipe = tiny_recipe(epochs=1, data={"name": "synthetic", "train_size": 256, "test_size": 64},  # 4 steps: onecycle's least
                         loader={"name": "tensor", "batch_size": 64,
                                 "augment": [{"HorizontalFlip": {"p": 0.5}},
                                             {"TrivialAugment": {"num_magnitude_bins": 31, "space": "wide",
                                                                 "fill": [125, 123, 114]}}]})
    run_dir = tmp_path / "run"
    assert main(["run", str(recipe), "--run-dir", str(run_dir)]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1]
    assert re.search(r"TrivialAugment", (run_dir / "recipe.yaml").read_text())


def test_a_policy_only_list_needs_no_albumentations(monkeypatch) -> None:
    """TrivialAugment/RandAugment are ours: a machine without albumentations can still check and run them."""
    import sys

    from microtrain_plugins.loaders.augment_spec import check_against_images, check_augment_list

    monkeypatch.setitem(sys.modules, "albumentations", None)  # any import of it now raises ImportError
    entries = [{"TrivialAugment": {}}, {"RandAugment": {"num_ops": 2, "magnitude": 9}}]
    assert check_augment_list(entries, loader="tensor", native=True) == entries
    check_against_images(entries, (32, 32, 3), loader="tensor", native=True)
    assert len(canonical_transforms(entries, "tensor", "loader.augment", native=True)) == 2
    with pytest.raises(ImportError):
        check_augment_list([{"HorizontalFlip": {"p": 0.5}}], loader="tensor", native=True)
