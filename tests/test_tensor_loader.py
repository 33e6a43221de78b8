"""The ``tensor`` loader: augmentation semantics, probabilities, determinism, epoch coverage, and
output identical to the albumentations loader when nothing is augmented. (Cross-loader parity is in
test_loader_parity.py; these are the tensor-specific checks.)"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from microtrain.errors import RecipeError  # noqa: E402
from microtrain.sampling import epoch_batches  # noqa: E402
from microtrain.state import LoaderContext  # noqa: E402
from microtrain_plugins.loaders.albumentations_loader import build_albumentations_loader  # noqa: E402
from microtrain_plugins.loaders.tensor_loader import affine, affine_theta, build_tensor_loader, sampling_grid  # noqa: E402

MEAN = (0.49, 0.48, 0.45)
STD = (0.25, 0.24, 0.26)
FILL = [10, 20, 30]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def context(images: np.ndarray, labels: np.ndarray | None = None, *, train: bool = True, seed: int = 0,
            channels_last: bool = True, device: str = "cpu") -> LoaderContext:
    if labels is None:
        labels = np.arange(len(images), dtype=np.int64) % 10
    return LoaderContext(images=images, labels=labels, train=train, device=torch.device(device), seed=seed, mean=MEAN,
                         std=STD, channels_last=channels_last)


def index_images(n: int, size: int = 8) -> np.ndarray:
    """Images that encode their index: channel 0 = i % 256, channel 1 = i // 256, channel 2 = 7."""
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    images[..., 0] = (np.arange(n) % 256)[:, None, None]
    images[..., 1] = (np.arange(n) // 256)[:, None, None]
    images[..., 2] = 7
    return images


def random_images(n: int, size: int = 32, low: int = 100, high: int = 200, seed: int = 0) -> np.ndarray:
    """Pixels in [low, high): never equal to FILL, so filled pixels can be told apart."""
    return np.random.default_rng(seed).integers(low, high, size=(n, size, size, 3), dtype=np.uint8)


def pixels(images: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: (B, C, H, W) on the 0-255 scale."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255.0
    return images.cpu().float() * std + mean


def decode_index(images: torch.Tensor) -> np.ndarray:
    px = pixels(images).round().long()
    return (px[:, 0, 0, 0] + 256 * px[:, 1, 0, 0]).numpy()


def one_batch(images: np.ndarray, augment: list, *, seed: int = 0, epoch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    loader = build_tensor_loader(context(images, seed=seed), batch_size=len(images), augment=augment)
    loader.set_epoch(epoch)
    (batch,) = list(loader)
    return batch


def original_in_batch_order(images: np.ndarray, seed: int = 0, epoch: int = 1) -> torch.Tensor:
    (index,) = epoch_batches(len(images), len(images), seed=seed, epoch=epoch, shuffle=True, drop_last=False)
    return torch.from_numpy(images[index]).permute(0, 3, 1, 2).float()


# --- output format and order ------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_equal_to_albumentations_loader_without_augmentation(train: bool, channels_last: bool) -> None:
    images = random_images(150, size=16, low=0, high=256)
    labels = np.random.default_rng(1).integers(0, 10, 150).astype(np.int64)
    ctx = context(images, labels, train=train, channels_last=channels_last, seed=3)
    tensor = build_tensor_loader(ctx, batch_size=32, eval_batch_size=40, augment=[])
    album = build_albumentations_loader(ctx, batch_size=32, eval_batch_size=40, workers=0, augment=[])
    for loader in (tensor, album):
        loader.set_epoch(2)
    assert len(tensor) == len(album)
    pairs = list(zip(tensor, album, strict=True))
    assert len(pairs) == len(tensor)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for (x, y), (ax, ay) in pairs:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == ax.shape and x.dim() == 4 and x.shape[1] == 3
        assert x.is_contiguous(memory_format=fmt)
        assert torch.equal(y, ay)
        assert torch.allclose(x, ax, atol=1e-5, rtol=0)


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_sample_exactly_once_per_epoch(drop_last: bool) -> None:
    n, batch = 300, 64
    images = index_images(n)
    labels = (np.arange(n) * 7 % 10).astype(np.int64)
    loader = build_tensor_loader(context(images, labels, seed=5), batch_size=batch, augment=[], drop_last=drop_last)
    previous = None
    for epoch in (1, 2):
        loader.set_epoch(epoch)
        seen = []
        for x, y in loader:
            idx = decode_index(x)
            assert np.array_equal(y.numpy(), labels[idx])  # labels travel with their images
            seen.append(idx)
        order = np.concatenate(seen)
        expected = np.concatenate(epoch_batches(n, batch, seed=5, epoch=epoch, shuffle=True, drop_last=drop_last))
        assert np.array_equal(order, expected)  # the shared order of every loader
        if drop_last:
            assert len(order) == (n // batch) * batch and len(set(order.tolist())) == len(order)
        else:
            assert sorted(order.tolist()) == list(range(n))
        assert previous is None or not np.array_equal(order, previous)  # reshuffled between epochs
        previous = order


def test_eval_loader_is_in_order_and_unaugmented() -> None:
    images = index_images(90)
    loader = build_tensor_loader(context(images, train=False), batch_size=8, eval_batch_size=25,
                                 augment=[{"HorizontalFlip": {"p": 1.0}}])
    assert len(loader) == 4
    order = np.concatenate([decode_index(x) for x, _ in loader])
    assert order.tolist() == list(range(90))


# --- augmentation semantics ---------------------------------------------------------------------

def test_flip_p1_is_exact_mirror_and_p0_is_identity() -> None:
    images = random_images(16, size=8, low=0, high=256)
    plain, _ = one_batch(images, [])
    flipped, _ = one_batch(images, [{"HorizontalFlip": {"p": 1.0}}])
    kept, _ = one_batch(images, [{"HorizontalFlip": {"p": 0.0}}])
    assert torch.equal(flipped, plain.flip(3))
    assert torch.equal(kept, plain)
    assert torch.allclose(pixels(plain), original_in_batch_order(images), atol=1e-3)


@pytest.mark.parametrize("size", [[8, 8], [0.25, 0.25]])  # pixels, and a fraction of the 32-pixel side
def test_coarse_dropout_hole_size_and_fill(size: list) -> None:
    images = random_images(64)
    out, _ = one_batch(images, [{"CoarseDropout": {"num_holes_range": [1, 1], "hole_height_range": size,
                                                   "hole_width_range": size, "fill": FILL, "p": 1.0}}])
    px = pixels(out).round()
    filled = (px == torch.tensor(FILL, dtype=torch.float32).view(1, 3, 1, 1)).all(dim=1)  # (B, H, W)
    original = original_in_batch_order(images)
    for i in range(len(images)):
        rows = torch.nonzero(filled[i].any(dim=1)).flatten()
        cols = torch.nonzero(filled[i].any(dim=0)).flatten()
        assert int(filled[i].sum()) == 64  # one full 8x8 hole
        assert rows.max() - rows.min() + 1 == 8 and cols.max() - cols.min() + 1 == 8
        outside = ~filled[i]
        assert torch.allclose(px[i][:, outside], original[i][:, outside], atol=1e-3)  # the rest untouched


def test_coarse_dropout_sizes_and_counts_vary_within_their_ranges() -> None:
    images = random_images(256)
    out, _ = one_batch(images, [{"CoarseDropout": {"num_holes_range": [1, 1], "hole_height_range": [2, 6],
                                                   "hole_width_range": [3, 5], "fill": FILL, "p": 1.0}}])
    filled = (pixels(out).round() == torch.tensor(FILL, dtype=torch.float32).view(1, 3, 1, 1)).all(dim=1)
    heights = filled.any(dim=2).sum(dim=1)
    widths = filled.any(dim=1).sum(dim=1)
    assert set(heights.tolist()) == {2, 3, 4, 5, 6}  # every size in the inclusive range occurs
    assert set(widths.tolist()) == {3, 4, 5}
    assert torch.equal(filled.sum(dim=(1, 2)), heights * widths)  # each hole is a full rectangle

    many, _ = one_batch(images, [{"CoarseDropout": {"num_holes_range": [2, 4], "hole_height_range": [1, 1],
                                                    "hole_width_range": [1, 1], "fill": FILL, "p": 1.0}}])
    counts = (pixels(many).round() == torch.tensor(FILL, dtype=torch.float32).view(1, 3, 1, 1)).all(dim=1).sum(dim=(1, 2))
    assert counts.min() >= 1 and counts.max() <= 4 and (counts >= 3).any()  # 1-pixel holes may coincide


def test_gray_p1_gives_equal_channels_with_luma() -> None:
    images = random_images(32, size=8, low=0, high=256)
    out, _ = one_batch(images, [{"ToGray": {"p": 1.0}}])
    px = pixels(out)
    assert torch.allclose(px[:, 0], px[:, 1], atol=1e-3) and torch.allclose(px[:, 1], px[:, 2], atol=1e-3)
    original = original_in_batch_order(images)
    luma = 0.299 * original[:, 0] + 0.587 * original[:, 1] + 0.114 * original[:, 2]
    assert torch.allclose(px[:, 0], luma, atol=1e-3)


def test_affine_translation_shifts_exactly_and_fills_the_uncovered_border() -> None:
    images = random_images(8, size=16)
    out, _ = one_batch(images, [{"Affine": {"translate_percent": [0.25, 0.25], "fill": FILL, "p": 1.0}}])
    px, original = pixels(out), original_in_batch_order(images)
    assert px.shape == original.shape  # size kept
    fill = torch.tensor(FILL, dtype=torch.float32).view(1, 3, 1, 1)
    # +25% of 16 pixels: the picture moves 4 pixels right and down, as albumentations/OpenCV move it.
    assert torch.allclose(px[:, :, 4:, 4:], original[:, :, :-4, :-4], atol=1e-3)
    assert torch.allclose(px[:, :, :4, :], fill.expand(8, 3, 4, 16), atol=1e-3)
    assert torch.allclose(px[:, :, :, :4], fill.expand(8, 3, 16, 4), atol=1e-3)


def test_affine_rotation_keeps_size_and_fills_corners() -> None:
    images = random_images(4, size=32)
    out, _ = one_batch(images, [{"Affine": {"rotate": [45, 45], "fill": FILL, "p": 1.0}}])
    px = pixels(out)
    assert px.shape == (4, 3, 32, 32)
    fill = torch.tensor(FILL, dtype=torch.float32)
    for corner in (px[:, :, 0, 0], px[:, :, 0, -1], px[:, :, -1, 0], px[:, :, -1, -1]):
        assert torch.allclose(corner, fill.expand(4, 3), atol=1e-3)
    centre = px[:, :, 14:18, 14:18]
    assert centre.min() >= 100 - 1e-3 and centre.max() <= 200 + 1e-3  # the centre is picture, not fill


@pytest.mark.parametrize("params", [(3, -2, 1.0, 0.0), (0, 0, 1.1, 15.0), (-4, 5, 0.9, -10.0), (2, 1, 1.05, 33.0)])
def test_affine_matches_opencv_warp_of_albumentations(params: tuple) -> None:
    """Same matrix as albumentations' Affine (non-square image, so the aspect handling is checked too);
    the only difference is OpenCV's rounding to uint8 (<= 0.5) plus its 1/32-pixel grid."""
    cv2 = pytest.importorskip("cv2")
    from albumentations.augmentations.geometric import functional as fgeometric

    tx, ty, scale, rotate = params
    images = random_images(3, size=32, low=0, high=256)[:, :24]
    images[:, 8:16, 10:20] = 250
    h, w = images.shape[1:3]
    matrix = fgeometric.create_affine_transformation_matrix({"x": tx, "y": ty}, {"x": 0, "y": 0}, {"x": scale, "y": scale},
                                                            rotate, fgeometric.center((h, w)))
    expected = np.stack([cv2.warpAffine(im, matrix[:2], (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                        borderValue=tuple(float(v) for v in FILL)) for im in images])
    theta = affine_theta(torch.tensor([[tx, ty]] * 3, dtype=torch.float32), torch.full((3,), scale), torch.full((3,), rotate),
                         h, w)
    got = affine(torch.from_numpy(images).permute(0, 3, 1, 2).float(), torch.ones(3, dtype=torch.bool), theta,
                 torch.tensor(FILL, dtype=torch.float32)).permute(0, 2, 3, 1).numpy()
    diff = np.abs(got - expected.astype(np.float32))
    assert diff.max() <= 0.6 and diff.mean() < 0.3


def test_sampling_grid_equals_affine_grid() -> None:
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.affine_grid(theta, [5, 3, 12, 20], align_corners=False)
    assert torch.allclose(sampling_grid(theta, 12, 20), expected, atol=1e-6)


def test_affine_through_the_loader_matches_the_albumentations_loader() -> None:
    """With every random range pinned to one value, both loaders must produce the same pictures."""
    augment = [{"Affine": {"translate_percent": [0.0625, 0.0625], "scale": [1.1, 1.1], "rotate": [-12, -12],
                           "fill": FILL, "p": 1.0}}]
    images = random_images(40, low=0, high=256)
    ctx = context(images, seed=2)
    (x, y), = list(build_tensor_loader(ctx, batch_size=40, augment=augment))
    (ax, ay), = list(build_albumentations_loader(ctx, batch_size=40, workers=0, augment=augment))
    assert torch.equal(y, ay)
    assert (pixels(x) - pixels(ax)).abs().max() <= 0.6


def test_p0_transforms_change_nothing() -> None:
    images = random_images(32, size=16, low=0, high=256)
    plain, _ = one_batch(images, [])
    out, _ = one_batch(images, [
        {"HorizontalFlip": {"p": 0.0}},
        {"Affine": {"translate_percent": [-0.2, 0.2], "rotate": [-30, 30], "fill": FILL, "p": 0.0}},
        {"CoarseDropout": {"num_holes_range": [1, 2], "hole_height_range": [4, 8], "hole_width_range": [4, 8],
                           "fill": FILL, "p": 0.0}},
        {"ToGray": {"p": 0.0}},
    ])
    assert torch.equal(out, plain)


def test_probabilities_within_statistical_tolerance() -> None:
    """4000 samples: the fraction transformed is within 4 standard deviations of p for each transform."""
    n = 4000
    images = np.full((n, 8, 8, 3), 150, dtype=np.uint8)
    images[:, :, :4, 0] = 200  # left half redder: a flip is visible
    images[:, :, :, 1] = 100  # coloured: gray is visible
    augment = [
        {"HorizontalFlip": {"p": 0.3}},
        {"Affine": {"translate_percent": [0.25, 0.25], "fill": FILL, "p": 0.6}},  # top-left 2x2 becomes fill
        {"CoarseDropout": {"num_holes_range": [1, 1], "hole_height_range": [1, 1], "hole_width_range": [1, 1],
                           "fill": [0, 0, 0], "p": 0.5}},
        {"ToGray": {"p": 0.2}},
    ]
    loader = build_tensor_loader(context(images, seed=11), batch_size=500, augment=augment)
    px = torch.cat([pixels(x) for x, _ in loader]).round()
    gray_fill = 0.299 * FILL[0] + 0.587 * FILL[1] + 0.114 * FILL[2]
    gray = (px[:, 0] == px[:, 1]).all(dim=(1, 2)) & (px[:, 1] == px[:, 2]).all(dim=(1, 2))
    shifted = (px[:, :, 0, 0] == torch.tensor(FILL, dtype=torch.float32)).all(1) | (px[:, :, 0, 0] == round(gray_fill)).all(1)
    # The right-most column is never touched by the shift; its red tells whether the image was flipped.
    red_right = px[:, 0, 4, 7]
    flipped = (red_right == 200) | (gray & (red_right == round(0.299 * 200 + 0.587 * 100 + 0.114 * 150)))
    holes = (px == 0).all(dim=1).any(dim=(1, 2)) | (gray & (px == 0).all(dim=1).any(dim=(1, 2)))
    for name, hits, p in [("flip", flipped, 0.3), ("affine", shifted, 0.6), ("dropout", holes, 0.5), ("gray", gray, 0.2)]:
        rate = hits.float().mean().item()
        tolerance = 4 * (p * (1 - p) / n) ** 0.5
        assert abs(rate - p) < tolerance, f"{name}: {rate:.3f} vs p={p}"


# --- determinism and resume --------------------------------------------------------------------

AUGMENT = [
    {"HorizontalFlip": {"p": 0.5}},
    {"Affine": {"translate_percent": [-0.0625, 0.0625], "scale": [0.9, 1.1], "keep_ratio": True,
                "rotate": [-15, 15], "fill": FILL, "p": 0.5}},
    {"CoarseDropout": {"num_holes_range": [1, 1], "hole_height_range": [8, 8], "hole_width_range": [8, 8], "fill": FILL,
                       "p": 0.5}},
    {"ToGray": {"p": 0.1}},
]
# The policies draw per-sample operations and magnitudes from the same generator: the same guarantees must hold.
POLICY_AUGMENT = [
    {"HorizontalFlip": {"p": 0.5}}, {"Affine": {"translate_percent": [-0.125, 0.125], "fill": FILL, "p": 0.75}},
    {"TrivialAugment": {"fill": FILL}}, {"RandAugment": {"num_ops": 2, "magnitude": 9, "fill": FILL}},
    {"CoarseDropout": {"num_holes_range": [1, 1], "hole_height_range": [4, 4], "hole_width_range": [4, 4], "p": 0.5}},
]
# name: (image size, augment list); 8x8 policy images keep a batch below torch's parallel grain size, so the
# test is fast on a busy 2-core machine too
AUGMENTS = {"seed": (16, AUGMENT), "policy": (8, POLICY_AUGMENT)}


def epoch_of(seed: int, epoch: int, start_batch: int = 0, device: str = "cpu",
             augment: str = "seed") -> list[tuple[torch.Tensor, torch.Tensor]]:
    size, augment_list = AUGMENTS[augment]
    loader = build_tensor_loader(context(random_images(200, size=size, low=0, high=256), seed=seed, device=device),
                                 batch_size=48, augment=augment_list)
    loader.set_epoch(epoch, start_batch)
    return [(x.cpu(), y.cpu()) for x, y in loader]


@pytest.mark.parametrize("augment", AUGMENTS)
@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_batches_and_other_seed_or_epoch_differs(device: str, augment: str) -> None:
    first, second = epoch_of(0, 1, device=device, augment=augment), epoch_of(0, 1, device=device, augment=augment)
    assert len(first) == 5
    for (a, la), (b, lb) in zip(first, second, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    for other in (epoch_of(1, 1, device=device, augment=augment), epoch_of(0, 2, device=device, augment=augment)):
        assert not any(torch.equal(a, b) for (a, _), (b, _) in zip(first, other, strict=True))


@pytest.mark.parametrize("augment", AUGMENTS)
def test_resume_mid_epoch_gives_the_remaining_batches_unchanged(augment: str) -> None:
    full = epoch_of(4, 3, augment=augment)
    for start in (1, 3):
        resumed = epoch_of(4, 3, start_batch=start, augment=augment)
        assert len(resumed) == len(full) - start
        for (a, la), (b, lb) in zip(full[start:], resumed, strict=True):
            assert torch.equal(a, b) and torch.equal(la, lb)


def test_augmentation_does_not_depend_on_the_global_rng() -> None:
    torch.manual_seed(0)
    a = epoch_of(0, 1)
    torch.manual_seed(123)
    torch.rand(1000)
    b = epoch_of(0, 1)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b, strict=True))


def test_start_batch_applies_once() -> None:
    loader = build_tensor_loader(context(index_images(100)), batch_size=10, augment=[])
    loader.set_epoch(1, start_batch=7)
    assert len(list(loader)) == 3
    assert len(list(loader)) == 10  # the next pass is a full epoch again


# --- errors -----------------------------------------------------------------------------------

def resolve(**options) -> dict:
    """The loader section as the recipe resolver checks it (before any data is loaded)."""
    from microtrain.plugin_manager import create_plugin_manager

    return create_plugin_manager()[1].get("loader", "tensor", "loader.name").validate(options, "loader")


@pytest.mark.parametrize("augment, match", [
    ([{"RandomBrightnessContrast": {"p": 0.5}}], "cannot be expressed by the tensor loader"),
    ([{"HorizontalFlip": {"q": 0.5}}], "no argument 'q'"),
    ([{"Affine": {"shear": [-5, 5]}}], "shear"),
])
def test_bad_augment_entries_are_refused_when_the_recipe_is_resolved(augment: list, match: str) -> None:
    with pytest.raises(RecipeError, match=match) as info:
        resolve(augment=augment)
    assert "\n" not in str(info.value)
    with pytest.raises(RecipeError, match=match):  # and by the factory, for callers that skip the resolver
        build_tensor_loader(context(random_images(4, size=8)), augment=augment)


def test_fill_that_does_not_fit_the_channels_is_refused_when_built() -> None:
    augment = [{"CoarseDropout": {"fill": [1, 2], "p": 1.0}}]
    assert resolve(augment=augment)["augment"] == augment  # the channels are not known before the data
    with pytest.raises(RecipeError, match=r"loader.augment\[0\]: CoarseDropout.fill has 2 values but the images have 3 "
                                          "channels") as info:
        build_tensor_loader(context(random_images(4, size=8)), augment=augment)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("option", ["batch_size", "eval_batch_size"])
def test_bad_batch_size_is_refused_when_the_recipe_is_resolved(option: str) -> None:
    with pytest.raises(RecipeError, match=f"loader.{option}: must be >= 1, got 0"):
        resolve(**{option: 0})


# --- through the engine -----------------------------------------------------------------------

def test_trains_through_microtrain_run(tmp_path) -> None:
    from microtrain.run import run

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "name": "tensor_smoke", "epochs": 2, "threads": 1, "device": "cpu",
        "data": {"name": "synthetic", "train_size": 256, "test_size": 128},
        "model": {"name": "dsconv"},
        "loader": {"name": "tensor", "batch_size": 64, "augment": AUGMENT},
        "optimizer": {"name": "sgd", "lr": 0.05}, "schedule": {"name": "onecycle", "max_lr": 0.1},
        "plugins": ["metrics", "checkpoint"],
    }))
    assert run(recipe, [], run_dir=tmp_path / "run") == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
