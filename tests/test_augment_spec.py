"""The augmentation spec (microtrain_plugins.loaders.augment_spec): the augment list is refused when the
recipe is resolved (so ``inspect`` says so and ``run`` stops before any run dir exists), transforms
that break the loader contract (normalising, size-changing) are refused with the reason, and the
random draws the tensor and dali loaders share follow the recipe's ranges from either generator.
Cross-loader behaviour of the rules that need the images is in test_loader_parity.py."""

from __future__ import annotations

import ast
import functools
import os
import re

import numpy as np
import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from conftest import REPO  # noqa: E402

from microtrain.cli import main  # noqa: E402
from microtrain.errors import RecipeError  # noqa: E402
from microtrain.plugin_manager import create_plugin_manager  # noqa: E402
from microtrain.recipe import load_recipe_file  # noqa: E402
from microtrain_plugins.loaders import augment_spec  # noqa: E402
from microtrain_plugins.loaders.augment_spec import (  # noqa: E402
    AffineSpec,
    DropoutSpec,
    NumpyRandom,
    TorchRandom,
    canonical_transforms,
    check_augment_list,
    draw_batch,
)

LOADERS = ["albumentations", "tensor", "dali"]
SEED_AUGMENT = load_recipe_file(REPO / "recipes" / "cifar10_dsconv.yaml")["loader"]["augment"]


@functools.cache
def registry():
    return create_plugin_manager()[1]


def resolve_augment(loader: str, augment: list) -> list:
    """``loader.augment`` as the recipe resolver checks it: no data loaded, no loader built."""
    return registry().get("loader", loader, "loader.name").validate({"augment": augment}, "loader")["augment"]


# ---- through the command line ---------------------------------------------------------------------

def test_inspect_refuses_a_misspelt_transform_in_one_line(tiny_recipe, capsys):
    assert main(["inspect", str(tiny_recipe()), "loader.augment=[{HorizontalFlipp: {}}]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "loader.augment[0]: 'HorizontalFlipp' is not an albumentations transform (did you mean 'HorizontalFlip'?)" in err


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("augment, reason", [
    ("[{HorizontalFlip: {p: 0.5}}, {Resize: {height: 16, width: 16}}]", r"loader.augment\[1\]: Resize changes the image size"),
    ("[{Normalize: {}}]", r"loader.augment\[0\]: Normalize normalises the pixels; the loader already normalises"),
])
def test_run_with_a_bad_augment_list_fails_before_any_run_dir_exists(tiny_recipe, capsys, loader, augment, reason):
    run_dir = tiny_recipe().parent / "x"
    assert main(["run", str(tiny_recipe()), f"loader.name={loader}", f"loader.augment={augment}",
                 "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(reason, err), err
    assert not run_dir.exists()


# ---- the loader contract, for every loader ----------------------------------------------------------

@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("transform, reason", [
    ({"Normalize": {}}, "Normalize normalises the pixels; the loader already normalises every batch with the dataset's "
                        "mean and std, so this would normalise twice (every batch nearly constant); drop it"),
    ({"ToFloat": {}}, "ToFloat converts the pixels to float; the loader already normalises"),
    ({"FromFloat": {}}, "FromFloat rescales the pixels as if they were floats in [0, 1]; the loader already normalises"),
    ({"Resize": {"height": 24, "width": 24}}, "Resize changes the image size (96x96 -> 24x24); only the training split is "
                                              "augmented, so the model would train at one resolution and be tested at "
                                              "another; drop it and resize in the dataset"),
    ({"PadIfNeeded": {"min_height": 40, "min_width": 40}}, "PadIfNeeded changes the image size (37x37 -> 40x40)"),
    ({"RandomCrop": {"height": 24, "width": 24}}, "RandomCrop changes the image size (96x96 -> 24x24)"),
    ({"RandomScale": {"scale_limit": 0.1}}, "RandomScale changes the image size"),
    ({"CropAndPad": {"px": 4, "keep_size": False}}, "CropAndPad changes the image size (96x96 -> 104x104)"),
    ({"Affine": {"rotate": [30, 30], "fit_output": True}}, "Affine changes the image size"),
    ({"ToGray": {"num_output_channels": 1}}, "ToGray changes the channel count (3 -> 1)"),
    ({"MaskDropout": {}}, "MaskDropout cannot be applied to a 5x5x3 uint8 image on its own"),
])
def test_transforms_that_break_the_loader_contract_are_refused_with_the_reason(loader, transform, reason):
    with pytest.raises(RecipeError) as info:
        resolve_augment(loader, [{"HorizontalFlip": {"p": 0.5}}, transform])
    message = str(info.value)
    assert message.startswith("loader.augment[1]: ") and reason in message and "\n" not in message


@pytest.mark.parametrize("transform", [
    {"CropAndPad": {"px": 4}},  # pads then crops, and restores the size (keep_size: true)
    {"Rotate": {"limit": 20}},
    {"RandomBrightnessContrast": {}},
    {"GaussNoise": {}},
    "Transpose",  # square images stay square; a non-square dataset is refused when the loader is built
])
def test_transforms_that_keep_the_contract_are_accepted(transform):
    assert resolve_augment("albumentations", [transform]) == [transform]


def test_the_check_returns_the_recipe_list_itself():
    """The saved recipe.yaml keeps what the user wrote (a one-value fill list stays a list)."""
    augment = [{"Affine": {"fill": [7], "p": 0.5}}, "HorizontalFlip"]
    assert check_augment_list(augment, "loader.augment") is augment
    assert resolve_augment("tensor", augment) == [{"Affine": {"fill": [7], "p": 0.5}}, "HorizontalFlip"]


def test_a_non_square_dataset_refuses_a_transform_that_swaps_height_and_width():
    from microtrain_plugins.loaders.augment_spec import check_against_images

    check_against_images(["Transpose"], (32, 32, 3))
    with pytest.raises(RecipeError, match=r"loader.augment\[0\]: Transpose changes the image size \(24x32 -> 32x24\)"):
        check_against_images(["Transpose"], (24, 32, 3))


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("fill", [[300, 0, 0], -1, [0, 256, 0]])
def test_fill_values_outside_the_pixel_levels_are_refused(loader, fill):
    with pytest.raises(RecipeError, match=r"loader.augment\[0\]: Affine.fill=.*: fill values are uint8 pixel levels, "
                                          "from 0 to 255"):
        resolve_augment(loader, [{"Affine": {"fill": fill}}])


@pytest.mark.parametrize("loader", ["tensor", "dali"])
def test_what_the_canonical_loaders_cannot_express_is_refused_when_resolved(loader):
    with pytest.raises(RecipeError, match=rf"loader.augment\[1\]: transform 'Blur' cannot be expressed by the {loader} loader"):
        resolve_augment(loader, ["HorizontalFlip", {"Blur": {}}])
    with pytest.raises(RecipeError, match=rf"loader.augment\[2\]: Affine.shear cannot be expressed by the {loader} loader"):
        resolve_augment(loader, ["HorizontalFlip", "ToGray", {"Affine": {"shear": [-5, 5]}}])


@pytest.mark.parametrize("loader", LOADERS)
def test_the_recipes_augment_lists_are_accepted_unchanged(loader):
    """Each shipped augment list runs as written; one with a policy entry is refused by name elsewhere."""
    from microtrain_plugins.loaders import policy_augment

    for path in sorted((REPO / "recipes").glob("*.yaml")):
        augment = load_recipe_file(path)["loader"]["augment"]
        names = [name for name, _ in augment_spec.parse_augment_list(augment)]
        if loader != "tensor" and any(policy_augment.is_policy(name) for name in names):
            with pytest.raises(RecipeError, match=f"which the {loader} loader does not run; use loader.name=tensor"):
                resolve_augment(loader, augment)
        else:
            assert resolve_augment(loader, augment) == augment


# ---- the shared random draws ------------------------------------------------------------------------

SOURCES = {
    "numpy": lambda seed: NumpyRandom(np.random.default_rng(seed)),
    "torch": lambda seed: TorchRandom(torch.Generator().manual_seed(seed), torch.device("cpu")),
}


def as_numpy(values) -> np.ndarray:
    return values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


@pytest.mark.parametrize("source", SOURCES)
def test_draws_follow_the_recipe_ranges_from_either_generator(source):
    specs = canonical_transforms(SEED_AUGMENT + [
        {"CoarseDropout": {"num_holes_range": [1, 3], "hole_height_range": [2, 5], "hole_width_range": [3, 40], "p": 1.0}},
        {"CoarseDropout": {"num_holes_range": [2, 2], "hole_height_range": [0.25, 0.5], "hole_width_range": [0.1, 0.1]}},
    ], "tensor")
    size, height, width = 2000, 20, 32
    draws = draw_batch(specs, size, height, width, SOURCES[source](0))
    assert len(draws) == len(specs)
    for spec, draw in zip(specs, draws, strict=True):
        rate = as_numpy(draw.apply).mean()
        assert abs(rate - spec.p) <= 4 * (spec.p * (1 - spec.p) / size) ** 0.5 + 1e-9
        if isinstance(spec, AffineSpec):
            tx, ty = as_numpy(draw.params.translate_x), as_numpy(draw.params.translate_y)
            assert (tx == np.trunc(tx)).all() and np.abs(tx).max() <= 0.0625 * width
            assert (ty == np.trunc(ty)).all() and np.abs(ty).max() <= 0.0625 * height
            scale, rotate = as_numpy(draw.params.scale), as_numpy(draw.params.rotate)
            assert scale.min() >= 0.9 and scale.max() <= 1.1 and rotate.min() >= -15 and rotate.max() <= 15
        elif isinstance(spec, DropoutSpec):
            holes = draw.params
            active, h, w = as_numpy(holes.active), as_numpy(holes.height), as_numpy(holes.width)
            top, left = as_numpy(holes.top), as_numpy(holes.left)
            assert set(active.sum(axis=1)) == set(range(spec.holes[0], spec.holes[1] + 1))
            assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
            if spec.height[1] >= 1:  # pixels, both ends included, the upper end clipped to the image
                assert set(h.ravel()) == set(range(int(spec.height[0]), int(spec.height[1]) + 1))
                assert set(w.ravel()) == set(range(int(spec.width[0]), min(int(spec.width[1]), width) + 1))
            else:  # fractions of the side
                assert set(h.ravel()) <= set(range(5, 11)) and set(w.ravel()) == {3}


@pytest.mark.parametrize("loader", ["tensor", "dali"])
def test_gray_on_gray_images_still_draws_so_the_transforms_after_it_are_unchanged(loader):
    """1-channel images and the same images as 3 equal channels (where ToGray changes nothing either)
    get the same flips: ToGray draws its coins whether or not it acts."""
    from microtrain.state import LoaderContext

    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    component = registry().get("loader", loader, "loader.name")
    gray = np.random.default_rng(0).integers(0, 256, size=(64, 8, 8, 1), dtype=np.uint8)

    def first_channel(images: np.ndarray, augment: list) -> torch.Tensor:
        options = component.validate({"augment": augment, "batch_size": 64, **({"device": "cpu"} if loader == "dali" else {})},
                                     "loader")
        c = images.shape[3]
        ctx = LoaderContext(images=images, labels=np.zeros(64, dtype=np.int64), train=True, device=torch.device("cpu"),
                            seed=1, mean=(0.5,) * c, std=(0.25,) * c, channels_last=False)
        (batch, _), = list(component.build(ctx, options=options))
        return batch[:, 0]

    augment = [{"ToGray": {"p": 0.5}}, {"HorizontalFlip": {"p": 0.5}}]
    on_gray = first_channel(gray, augment)
    torch.testing.assert_close(on_gray, first_channel(np.repeat(gray, 3, axis=3), augment), atol=1e-4, rtol=0)
    assert not torch.equal(on_gray, first_channel(gray, []))  # some images were flipped


# ---- no import cycle -------------------------------------------------------------------------------

def test_the_spec_module_imports_no_loader():
    """augment_spec is what the loaders import; it imports none of them (once it and albumentations_loader
    imported each other). Its one plugin import is policy_augment, which imports no plugin module back."""
    tree = ast.parse(open(augment_spec.__file__, encoding="utf-8").read())
    imported = {f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names} | \
        {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    plugin_modules = {name.removeprefix("microtrain_plugins.loaders.policy_augment.")
                      for name in imported if name.startswith("microtrain_plugins")}
    assert plugin_modules == {"microtrain_plugins.loaders.policy_augment", "PolicyDraw", "PolicySpec"}, imported
