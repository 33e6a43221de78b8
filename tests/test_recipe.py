"""Recipe loading, overrides and validation: every mistake is one clear RecipeError."""

from __future__ import annotations

import pytest
import yaml

from microtrain.assembly import prepare_recipe
from microtrain.errors import MicrotrainError, RecipeError
from microtrain.recipe import apply_overrides, parse_override, parse_recipe_text


def test_overrides_parse_yaml_scalars():
    assert parse_override("epochs=5") == (["epochs"], 5)
    assert parse_override("optimizer.lr=0.1") == (["optimizer", "lr"], 0.1)
    assert parse_override("data.root=/some/dir") == (["data", "root"], "/some/dir")
    assert parse_override("compile=true") == (["compile"], True)
    assert parse_override("loader.augment=[]") == (["loader", "augment"], [])


def test_overrides_apply_by_dotted_path(tiny_recipe):
    recipe, _, _ = prepare_recipe(tiny_recipe(), ["epochs=5", "optimizer.lr=0.2", "loader.batch_size=32"])
    assert recipe["epochs"] == 5
    assert recipe["optimizer"]["lr"] == 0.2
    assert recipe["loader"]["batch_size"] == 32
    assert recipe["optimizer"]["momentum"] == 0.9  # defaults filled in


def test_override_without_equals_is_an_error():
    with pytest.raises(RecipeError, match="no '='"):
        apply_overrides({}, ["epochs"])


def test_unknown_field_suggests_the_right_one(tiny_recipe):
    with pytest.raises(RecipeError, match="unknown recipe field 'epoch'.*did you mean 'epochs'"):
        prepare_recipe(tiny_recipe(), ["epoch=3"])


def test_unknown_option_suggests_the_right_one(tiny_recipe):
    with pytest.raises(RecipeError, match="'bach_size' is not an option of loader 'albumentations'.*did you mean 'batch_size'"):
        prepare_recipe(tiny_recipe(), ["loader.bach_size=3"])


def test_wrong_type_names_field_and_value(tiny_recipe):
    with pytest.raises(RecipeError, match=r"epochs: expected int, got str 'ten'"):
        prepare_recipe(tiny_recipe(), ["epochs=ten"])
    with pytest.raises(RecipeError, match=r"optimizer.lr: expected float"):
        prepare_recipe(tiny_recipe(), ["optimizer.lr=fast"])


def test_missing_required_field(tiny_recipe, tmp_path):
    recipe = yaml.safe_load(tiny_recipe().read_text())
    del recipe["epochs"]
    path = tmp_path / "no_epochs.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match="recipe field 'epochs' is missing"):
        prepare_recipe(path, [])


def test_unknown_component_lists_available(tiny_recipe):
    with pytest.raises(RecipeError, match=r"unknown model 'dsconf'.*did you mean 'dsconv'.*available: .*dsconv"):
        prepare_recipe(tiny_recipe(), ["model.name=dsconf"])


def test_unknown_plugin_module(tiny_recipe):
    with pytest.raises(MicrotrainError, match="plugin module 'no_such_pkg.plugin' not found"):
        prepare_recipe(tiny_recipe(plugins=["metrics", "no_such_pkg.plugin"]), [])


def test_unknown_callback_name(tiny_recipe):
    with pytest.raises(RecipeError, match="'metrix' is neither a callback.*did you mean 'metrics'"):
        prepare_recipe(tiny_recipe(plugins=["metrix"]), [])


def test_malformed_yaml_gives_line_number():
    with pytest.raises(RecipeError, match=r"recipe.yaml:3:\d+: malformed YAML"):
        parse_recipe_text("name: x\nepochs: 2\nmodel: {name: dsconv]\nseed: 1\n", "recipe.yaml")
    with pytest.raises(RecipeError, match=r"recipe.yaml:4:1: malformed YAML.*started at line 3"):
        parse_recipe_text("name: x\nepochs: 2\nmodel: {name: dsconv\n", "recipe.yaml")


def test_recipe_must_be_a_mapping():
    with pytest.raises(RecipeError, match="a recipe is a YAML mapping"):
        parse_recipe_text("- a\n- b\n")


def test_switching_component_drops_options_of_the_old_one(tiny_recipe, tmp_path):
    """data.name=imagefolder on a cifar10 recipe: cifar10-only options go, new ones are checked."""
    path = tiny_recipe(data={"name": "cifar10", "root": str(tmp_path), "limit_train": 100})
    recipe, _, _ = prepare_recipe(path, ["data.name=imagefolder", f"data.root={tmp_path}"])
    assert recipe["data"] == {"name": "imagefolder", "root": str(tmp_path), "image_size": None}
    with pytest.raises(RecipeError, match="'limit_train' is not an option of data 'imagefolder'"):
        prepare_recipe(path, ["data.name=imagefolder", "data.limit_train=5"])


def test_every_shipped_recipe_resolves_and_switches_dataset(tmp_path):
    from conftest import REPO

    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        recipe, _, _ = prepare_recipe(path, [])
        assert recipe["name"]
        switched, _, _ = prepare_recipe(path, ["data.name=imagefolder", f"data.root={tmp_path}"])
        assert switched["data"]["name"] == "imagefolder"


def test_seed_recipe_matches_the_seed_document():
    from conftest import REPO

    recipe, _, _ = prepare_recipe(REPO / "recipes" / "cifar10_dsconv.yaml", [])
    assert recipe["epochs"] == 50
    assert recipe["model"]["name"] == "dsconv"
    names = [next(iter(entry)) for entry in recipe["loader"]["augment"]]
    assert names == ["HorizontalFlip", "Affine", "CoarseDropout", "ToGray"]


def test_albumentations_argument_it_does_not_know_is_an_error(tiny_recipe):
    """albumentations 2.x only warns about old names such as max_holes; microtrain refuses them."""
    from microtrain_plugins.loaders.albumentations_loader import build_transforms

    with pytest.raises(RecipeError, match="CoarseDropout has no argument 'max_holes'.*num_holes_range"):
        build_transforms([{"CoarseDropout": {"max_holes": 1}}])
    with pytest.raises(RecipeError, match="'HorizontalFlipp' is not an albumentations transform.*HorizontalFlip"):
        build_transforms([{"HorizontalFlipp": {"p": 0.5}}])
    with pytest.raises(RecipeError, match="invalid arguments for Affine"):
        build_transforms([{"Affine": {"rotate": "a lot"}}])


def test_canonical_affine_refuses_what_dali_and_tensor_cannot_express():
    from microtrain_plugins.loaders.augment_spec import AffineSpec, canonical_transforms

    with pytest.raises(RecipeError, match="draws x and y scale independently.*keep_ratio: true"):
        canonical_transforms([{"Affine": {"scale": [0.9, 1.1]}}], "tensor")
    with pytest.raises(RecipeError, match="translate_px cannot be expressed by the dali loader"):
        canonical_transforms([{"Affine": {"translate_px": 3}}], "dali")
    (spec,) = canonical_transforms([{"Affine": {"scale": [0.9, 1.1], "keep_ratio": True, "p": 1.0}}], "tensor")
    assert spec == AffineSpec(1.0, (0.0, 0.0), (0.0, 0.0), (0.9, 1.1), (0.0, 0.0), (0.0,))  # one fill for every channel
