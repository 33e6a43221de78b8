"""Bad input, issue 16 items 7 and 8 and its property tests: every option's rule is declared with the option and
checked when the recipe is resolved (before any run dir exists); threads are bounded and capped to the cores; a
duplicate recipe key is an error naming its line; what a recipe may expand to is bounded. The properties, over
option values and augment lists: exit status 0 or 2, never a traceback, never a run dir left ``running``, never an
existing run changed by a refused command. (Item 6, imagefolder, is in test_datasets.py.)"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import tracemalloc
import typing
from pathlib import Path
from typing import Annotated, Any

import pytest
import torch
import yaml
from conftest import REPO
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from microtrain import Check, Range, RecipeError
from microtrain.assembly import available_cores, configure_threads, prepare_recipe
from microtrain.cli import main
from microtrain.components import check_type, type_name
from microtrain.errors import MicrotrainError
from microtrain.plugin_manager import create_plugin_manager
from microtrain.recipe import (
    CORE_FIELDS,
    MAX_RECIPE_NODES,
    apply_overrides,
    dump_recipe,
    parse_override,
    parse_recipe_text,
    resolve_recipe,
)

REGISTRY = create_plugin_manager()[1]

TINY = {"name": "opts", "epochs": 1, "device": "cpu", "threads": 1,
        "data": {"name": "synthetic", "train_size": 64, "test_size": 32, "image_size": 16},
        "model": {"name": "dsconv", "width": 0.25, "dropout": 0.0},
        "loader": {"name": "albumentations", "batch_size": 32, "workers": 0},
        "optimizer": {"name": "sgd", "lr": 0.05}, "schedule": {"name": "constant"},
        "plugins": ["metrics", "checkpoint"]}


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """In-process runs set torch's thread count: put it back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "opts.yaml"
    path.write_text(yaml.safe_dump(TINY, sort_keys=False))
    return path


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``microtrain ARGV`` in this process; returns (exit status, stderr). An exception escaping ``main`` is what
    the console script would print as a traceback, so it fails the test that called this."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(argv)
    return status, err.getvalue()


def error_line(stderr: str) -> str:
    """The one ``microtrain: error:`` line of a refused command (warnings may come before it)."""
    errors = [line for line in stderr.splitlines() if line.startswith("microtrain: error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return errors[0]


# ---------------------------------------------------------------- each option's rule, at resolution

RULES = [  # (overrides, the one line it must give)
    (["grad_clip=-1"], r"^grad_clip: must be >= 0, got -1"),
    (["threads=100000"], r"^threads: must be >= 0 and <= 4096, got 100000"),
    (["optimizer.lr=-1"], r"^optimizer.lr: must be > 0 and <= 1000, got -1"),
    (["optimizer.lr=1e5"], r"^optimizer.lr: must be > 0 and <= 1000, got 100000.0"),
    (["model.dropout=1.5"], r"^model.dropout: must be >= 0 and < 1, got 1.5"),
    (["optimizer.lr=.nan"], r"^optimizer.lr: must be > 0 and <= 1000, got nan"),
    (["optimizer.lr=.inf"], r"^optimizer.lr: must be > 0 and <= 1000, got inf"),
    (["optimizer.lr=1e400"], r"^optimizer.lr: must be > 0 and <= 1000, got inf"),  # YAML reads 1e400 as inf
    (["optimizer.lr=" + "9" * 400], r"^optimizer.lr: 9{77}\.\.\. is too large for a number"),
    (["optimizer.momentum=1"], r"^optimizer.momentum: must be >= 0 and < 1"),
    (["optimizer.weight_decay=-0.1"], r"^optimizer.weight_decay: must be >= 0 and <= 1"),
    (["epochs=0"], r"^epochs: must be >= 1 and <= 1000000, got 0"),
    (["seed=-1"], r"^seed: must be >= 0 and <= 4294967295, got -1"),
    (["label_smoothing=1"], r"^label_smoothing: must be >= 0 and < 1"),
    (["device=gpu0"], r"^device: 'gpu0' is not a device; use auto, cpu, cuda or cuda:N"),
    (["model.width=0"], r"^model.width: must be > 0 and <= 16, got 0"),
    (["data.image_size=0"], r"^data.image_size: must be >= 3 and <= 1024"),
    (["data.train_size=0"], r"^data.train_size: must be >= 1"),
    (["data.test_size=-3"], r"^data.test_size: must be >= 1"),
    (["data.num_classes=1"], r"^data.num_classes: must be >= 2"),
    (["data.seed=-5"], r"^data.seed: must be >= 0"),
    (["data.name=imagefolder", "data.image_size=0"], r"^data.image_size: must be >= 1 and <= 4096, got 0"),
    (["data.name=cifar10", "data.limit_train=-1"], r"^data.limit_train: must be >= 0"),
    (["model.name=dsresnet", "model.widths=[]"], r"^model.widths: needs one entry per stage and at least one"),
    (["model.name=dsresnet", "model.blocks=[2, 0]"], r"^model.blocks\[1\]: must be >= 1 and <= 16, got 0"),
    (["model.name=dsresnet", "model.dropout=-0.5"], r"^model.dropout: must be >= 0 and < 1"),
    (["optimizer.name=adamw", "optimizer.betas=[0.9, 1.0]"], r"^optimizer.betas\[1\]: must be >= 0 and < 1, got 1.0"),
    (["optimizer.name=adamw", "optimizer.betas=[0.9]"], r"^optimizer.betas: expected 2 values"),
    (["optimizer.name=adamw", "optimizer.eps=0"], r"^optimizer.eps: must be > 0 and <= 1"),
    (["schedule.name=onecycle", "schedule.pct_start=0"], r"^schedule.pct_start: must be > 0 and < 1"),
    (["schedule.name=onecycle", "schedule.max_lr=-0.1"], r"^schedule.max_lr: must be > 0"),
    (["schedule.name=onecycle", "schedule.div_factor=0.5"], r"^schedule.div_factor: must be >= 1 and <= 1e\+12"),
    (["schedule.name=onecycle", "schedule.anneal=cosine"], r"^schedule.anneal: 'cosine' is not allowed.*'cos'"),
    (["schedule.name=step", "schedule.gamma=0"], r"^schedule.gamma: must be > 0 and <= 1"),
    (["schedule.name=step", "schedule.step_epochs=0"], r"^schedule.step_epochs: must be >= 1"),
    (["schedule.name=cosine", "schedule.min_lr_ratio=1.5"], r"^schedule.min_lr_ratio: must be >= 0 and <= 1"),
    (["schedule.warmup_epochs=-1"], r"^schedule.warmup_epochs: must be >= 0"),
    (["plugins=[{ema: {decay: 1.0}}]"], r"^plugins.ema.decay: must be >= 0 and < 1, got 1.0"),
    (["plugins=[{ema: {every_steps: 0}}]"], r"^plugins.ema.every_steps: must be >= 1"),
    (["plugins=[{ema: {bn_batches: -1}}]"], r"^plugins.ema.bn_batches: must be >= 0"),
    (["plugins=[{summary: {reference: {cat: 120}}}]"], r"^plugins.summary.reference.cat: expected an accuracy in percent"),
    (["plugins=[{summary: {last: 0}}]"], r"^plugins.summary.last: must be >= 1"),
    (["plugins=[{report: {mistakes: -1}}]"], r"^plugins.report.mistakes: must be >= 0 and <= 256"),
    (["plugins=[{tensorboard: {mistakes: 1000}}]"], r"^plugins.tensorboard.mistakes: must be >= 0 and <= 256"),
    (["plugins=[{tensorboard: {every_steps: -1}}]"], r"^plugins.tensorboard.every_steps: must be >= 0"),
]


@pytest.mark.parametrize("overrides, message", RULES, ids=[" ".join(o)[:60] for o, _ in RULES])
def test_each_rule_refuses_its_bad_value_in_one_line_when_resolved(overrides, message):
    with pytest.raises(RecipeError) as info:
        prepare_recipe(TINY, overrides)
    assert re.search(message, str(info.value)), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides", [["grad_clip=0"], ["grad_clip=null"], ["grad_clip=1.5"], ["threads=0"],
                                       ["model.dropout=0"], ["optimizer.momentum=0", "optimizer.nesterov=false"]])
def test_edge_values_inside_the_rules_are_accepted(overrides):
    prepare_recipe(TINY, overrides)


def test_exponents_without_a_dot_are_numbers():
    """PyYAML alone reads 1e-3 as text (YAML 1.1), which the lr rule would refuse as 'expected float, got str'."""
    assert prepare_recipe(TINY, ["optimizer.lr=1e-3"])[0]["optimizer"]["lr"] == 0.001
    assert parse_recipe_text("optimizer: {name: sgd, weight_decay: 5e-4}\n")["optimizer"]["weight_decay"] == 5e-4


@pytest.mark.parametrize("override", ["optimizer.lr=-1", "model.dropout=1.5", "grad_clip=-1", "threads=100000"])
def test_issue_cases_stop_in_one_line_before_any_run_dir_exists(tiny, tmp_path, override):
    """The issue's reports: raw tracebacks (lr, dropout), a negative grad_clip accepted, 100,000 threads crashing
    with the run dir left 'running'."""
    run_dir = tmp_path / "run"
    status, stderr = run_cli(["run", str(tiny), override, "--run-dir", str(run_dir)])
    assert status == 2
    assert error_line(stderr).startswith(f"microtrain: error: {override.split('=')[0]}: must be ")
    assert not run_dir.exists()


def declared_rules(annotation: Any) -> list[Any]:
    """Every Range/Check in an annotation, however nested (unions, list items, tuple members)."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *rules = typing.get_args(annotation)
        return [*rules, *declared_rules(base)]
    return [rule for arg in typing.get_args(annotation) for rule in declared_rules(arg)]


def holds_numbers(annotation: Any) -> bool:
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) is typing.Annotated:
        return holds_numbers(typing.get_args(annotation)[0])
    return any(holds_numbers(arg) for arg in typing.get_args(annotation) if arg is not Ellipsis)


# The run-dir work owns these callbacks' options; when it declares their ranges, this set empties.
UNDECLARED_ELSEWHERE: set[tuple[str, str, str]] = set()


def test_every_numeric_option_declares_its_rule():
    missing = {("core", "", name) for name, spec in CORE_FIELDS.items()
               if holds_numbers(spec.annotation) and not declared_rules(spec.annotation)}
    missing |= {(kind, name, option.name) for kind, components in REGISTRY.all().items()
                for name, component in components.items() for option in component.options.values()
                if holds_numbers(option.annotation) and not declared_rules(option.annotation)}
    assert missing == UNDECLARED_ELSEWHERE


def test_microtrain_plugins_shows_the_rules(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plugins"]) == 0
    text = out.getvalue()
    for shown in ("lr: float > 0 and <= 1000 = 0.05", "dropout: float >= 0 and < 1 = 0.05", "float >= 0, or none",
                  "int >= 0 and <= 4096", "widths: list of int >= 1 and <= 1024 (one per stage, at least one)",
                  "betas: 2 values, each float >= 0 and < 1", "anneal: one of 'cos', 'linear'",
                  "image_size: int >= 1 and <= 4096, or none", "decay: float >= 0 and < 1",
                  "reference: dict (class name: accuracy %, 0 to 100), or none"):
        assert shown in text, shown


def test_a_third_party_component_declares_and_shows_its_own_rules(tmp_path, monkeypatch):
    (tmp_path / "my_options_plugin.py").write_text('''
from typing import Annotated

from torch import nn

import microtrain
from microtrain import Check, Range, RecipeError


def odd(value, where):
    if value % 2 == 0:
        raise RecipeError(f"{where}: must be odd, got {value}")
    return value


def build_odd_cnn(num_classes, image_shape, *, kernel: Annotated[int, Range(ge=1, le=7), Check(odd, "(odd)")] = 3,
                  gain: Annotated[float, Range(gt=0)] | None = None):
    """A one-layer CNN with an odd kernel."""
    return nn.Sequential(nn.Conv2d(image_shape[0], num_classes, kernel), nn.AdaptiveAvgPool2d(1), nn.Flatten())


@microtrain.hookimpl
def register_components(registry):
    registry.model("odd_cnn", build_odd_cnn)
''')
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = {**TINY, "plugins": ["metrics", "my_options_plugin"]}
    assert prepare_recipe(recipe, ["model.name=odd_cnn", "model.kernel=5"])[0]["model"] == \
        {"name": "odd_cnn", "kernel": 5, "gain": None}
    for override, message in (("model.kernel=4", "model.kernel: must be odd, got 4"),
                              ("model.kernel=9", "model.kernel: must be >= 1 and <= 7, got 9"),
                              ("model.gain=-2", "model.gain: must be > 0, got -2")):
        with pytest.raises(RecipeError, match=re.escape(message)):
            prepare_recipe(recipe, ["model.name=odd_cnn", override])
    _, _, registry = prepare_recipe(recipe, ["model.name=odd_cnn"])
    options = registry.get("model", "odd_cnn", "model.name").options
    assert options["kernel"].type_name() == "int >= 1 and <= 7 (odd)"
    assert options["gain"].type_name() == "float > 0, or none"


def test_rules_check_every_kind_of_value():
    assert check_type(3, Annotated[float, Range(gt=0)], "x") == 3.0
    for bad in (float("nan"), float("inf"), -float("inf"), 0, -1):
        with pytest.raises(RecipeError, match="x: must be > 0"):
            check_type(bad, Annotated[float, Range(gt=0)], "x")
    with pytest.raises(RecipeError, match="x: expected float >= 0, or none, got str 'a'"):
        check_type("a", Annotated[float, Range(ge=0)] | None, "x")
    with pytest.raises(RecipeError, match=r"x\[2\]: must be >= 1"):
        check_type([1, 2, 0], list[Annotated[int, Range(ge=1)]], "x")
    with pytest.raises(RecipeError, match="x: expected int"):
        check_type(True, Annotated[int, Range(ge=0)], "x")  # a bool is not a number here
    shout = Check(lambda value, where: value.upper(), "(upper-cased)")
    assert check_type("abc", Annotated[str, shout], "x") == "ABC"  # a Check may normalise
    assert type_name(Annotated[int, Range(ge=0, le=2**32 - 1)]) == "int >= 0 and <= 4294967295"


# ---------------------------------------------------------------- threads

def test_threads_above_the_cores_available_are_capped_with_a_warning(capsys):
    cores = available_cores()
    configure_threads(cores + 3, 1)
    assert torch.get_num_threads() == cores
    assert f"microtrain: warning: threads={cores + 3} but this process may use {cores} core" in capsys.readouterr().err
    configure_threads(1, 1)
    assert torch.get_num_threads() == 1 and capsys.readouterr().err == ""


def test_a_run_asking_for_more_threads_than_cores_completes_with_the_warning(tiny, tmp_path):
    run_dir = tmp_path / "run"
    status, stderr = run_cli(["run", str(tiny), f"threads={available_cores() + 1}", "--run-dir", str(run_dir)])
    assert status == 0, stderr
    assert "microtrain: warning: threads=" in stderr
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["threads"] == available_cores() + 1  # as asked


# ---------------------------------------------------------------- duplicate keys

def test_a_duplicate_key_is_an_error_naming_both_lines():
    text = "name: t\nepochs: 2\nseed: 0\nepochs: 5\n"
    with pytest.raises(RecipeError, match=r"^r.yaml:4: duplicate key 'epochs' \(first at line 2\);"):
        parse_recipe_text(text, "r.yaml")
    nested = "name: t\nmodel:\n  name: dsconv\n  dropout: 0.1\n  dropout: 0.2\n"
    with pytest.raises(RecipeError, match=r"^r.yaml:5: duplicate key 'dropout' \(first at line 4\)"):
        parse_recipe_text(nested, "r.yaml")
    with pytest.raises(RecipeError, match=r"^r.yaml:1: duplicate key 'lr'"):
        parse_recipe_text("optimizer: {name: sgd, lr: 0.1, lr: 0.2}\n", "r.yaml")


def test_merge_keys_may_still_be_overridden():
    """A '<<' merge is not a duplicate: the mapping's own keys override what it brings in."""
    data = parse_recipe_text("base: &base {name: sgd, lr: 0.1}\noptimizer: {<<: *base, lr: 0.2}\n")
    assert data["optimizer"] == {"name": "sgd", "lr": 0.2}


def test_a_duplicate_key_in_an_override_is_an_error():
    with pytest.raises(RecipeError, match=r"^override 'plugins': duplicate key 'cat'"):
        parse_override("plugins=[{summary: {reference: {cat: 60, cat: 70}}}]")


def test_a_recipe_with_a_duplicate_key_stops_before_any_run_dir(tmp_path):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text(yaml.safe_dump(TINY, sort_keys=False) + "epochs: 5\n")
    run_dir = tmp_path / "run"
    status, stderr = run_cli(["run", str(recipe), "--run-dir", str(run_dir)])
    assert status == 2
    assert re.search(r"dup.yaml:\d+: duplicate key 'epochs' \(first at line \d+\)", error_line(stderr))
    assert not run_dir.exists()


# ---------------------------------------------------------------- what a recipe may expand to

def laughs(levels: int = 9, indent: str = "        ") -> str:
    """The classic billion-laughs: 9 levels of 9 aliases each, 9**9 values once expanded, a few hundred bytes."""
    lines = [f'{indent}l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{indent}l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


BOMB = """name: bomb
epochs: 1
data: {name: synthetic}
model: {name: dsconv}
loader: {name: tensor}
optimizer: {name: sgd}
schedule: {name: constant}
plugins:
  - summary:
      reference:
""" + laughs()


def test_an_alias_bomb_in_a_free_form_mapping_fails_fast_with_little_memory():
    assert len(BOMB) < 1200
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(RecipeError, match=rf"^bomb.yaml: expands to more than {MAX_RECIPE_NODES:,} values"):
            parse_recipe_text(BOMB, "bomb.yaml")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 2.0
    assert peak < 5 * 2**20, peak


def test_an_alias_bomb_fails_in_one_line_from_the_command_line_under_a_memory_cap(tmp_path):
    """The process the issue saw reach 16 GB, under a 6 GiB address-space cap: one line, exit 2, quickly."""
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(BOMB)
    cap = "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)); " \
          "sys.argv = ['microtrain'] + sys.argv[1:]; runpy.run_module('microtrain', run_name='__main__')"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", cap, "run", str(recipe), "--run-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    assert result.returncode == 2, result.stderr
    assert re.search(r"bomb.yaml: expands to more than [\d,]+ values", error_line(result.stderr))
    assert time.perf_counter() - started < 60
    assert not (tmp_path / "run").exists()


def test_an_alias_bomb_in_an_override_is_refused():
    flow = "[" + ", ".join(["&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [f"&{c} [{', '.join([f'*{p}'] * 10)}]"
                                                                    for p, c in zip("abcd", "bcde", strict=True)]) + "]"
    with pytest.raises(RecipeError, match="^override 'plugins': expands to more than"):
        parse_override(f"plugins={flow}")


@pytest.mark.parametrize("text, message", [
    ("a: &x [1, *x]\n", r"^r.yaml:1: an alias refers to the list or mapping that holds it"),
    ("a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 60)), r"nested deeper than 50 levels"),
    ("a: " + "[" * 60 + "]" * 60 + "\n", r"^r.yaml:1: lists and mappings nested deeper than 50 levels"),
])
def test_endless_and_deep_recipes_are_refused(text, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe_text(text, "r.yaml")


def test_an_oversized_recipe_is_refused_without_being_read(tmp_path, monkeypatch):
    huge = tmp_path / "huge.yaml"
    with open(huge, "w") as handle:
        handle.write("name: x\n")
        handle.truncate(5 * 2**20)
    monkeypatch.setattr(Path, "read_text", lambda *_a, **_k: pytest.fail("the file was read"))
    with pytest.raises(RecipeError, match=r"huge.yaml' is 5,242,880 bytes, too large for a recipe"):
        prepare_recipe(huge, [])
    with pytest.raises(RecipeError, match="too large for a recipe"):
        parse_recipe_text("#" * 1_000_001)


def test_aliases_within_the_bounds_still_work():
    text = "fill: &grey [125, 123, 114]\nloader: {augment: [{CoarseDropout: {fill: *grey}}, {Affine: {fill: *grey}}]}\n"
    data = parse_recipe_text(text)
    assert data["loader"]["augment"][1]["Affine"]["fill"] == [125, 123, 114]


# ---------------------------------------------------------------- properties (hypothesis)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NUMBERS = (st.sampled_from([float("nan"), float("inf"), -float("inf"), -1, -1e-9, 1.5, 10**30])
           | st.integers(-10, 10) | st.floats(0, 2) | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, -1, 2**32, 10**30, 10**400])
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e-300, 1e300]))
VALUES = NUMBERS | st.booleans() | st.none() | st.text(max_size=6) | st.lists(NUMBERS, max_size=3) | \
    st.dictionaries(st.text(max_size=4), NUMBERS | st.text(max_size=4), max_size=2)

COMPONENT_SECTIONS = {"model": "model", "data": "data", "loader": "loader", "optimizer": "optimizer",
                      "schedule": "schedule"}
OPTIONS = sorted([("core", "", name) for name in CORE_FIELDS if name not in ("name", "plugins")] + [
    (kind, name, option) for kind, components in REGISTRY.all().items() for name, component in components.items()
    for option in component.options])


def place(recipe: dict[str, Any], kind: str, component: str, option: str, value: Any) -> str:
    """Put ``value`` at its option in ``recipe`` (switching the section's component); return the option's path."""
    if kind == "core":
        recipe[option] = value
        return option
    if kind == "callback":
        entries = [entry for entry in recipe["plugins"] if not (isinstance(entry, dict) and component in entry)]
        recipe["plugins"] = [*entries, {component: {option: value}}]
        return f"plugins.{component}.{option}"
    section = next(s for s, k in COMPONENT_SECTIONS.items() if k == kind)
    body = recipe[section] if recipe[section].get("name") == component else {"name": component}
    recipe[section] = {**body, option: value}
    return f"{section}.{option}"


def annotation_of(kind: str, component: str, option: str) -> Any:
    return CORE_FIELDS[option].annotation if kind == "core" else REGISTRY.get(kind, component, kind).options[option].annotation


def as_yaml(value: Any) -> str:
    """A value as a command-line override writes it (YAML flow style, one line)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").removesuffix(" ...")


def finite_numbers(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(finite_numbers(v) for v in value)
    return True


@FAST
@given(st.lists(st.tuples(st.sampled_from(OPTIONS), VALUES), min_size=1, max_size=3), st.booleans())
def test_any_option_value_resolves_within_its_rules_or_is_refused_in_one_line_naming_it(changes, as_override):
    """In the recipe or as a command-line override (the value written as YAML)."""
    recipe, overrides, paths = copy.deepcopy(TINY), [], []
    for (kind, component, option), value in changes:
        paths.append((place(recipe, kind, component, option, value), kind, component, option))
    for path, kind, component, option in paths if as_override else []:  # move the values to the command line
        holder = recipe if kind == "core" else recipe[path.split(".")[0]] if kind != "callback" else {}
        if option in holder and (kind == "core" or holder["name"] == component):
            overrides.append(f"{path}={as_yaml(holder.pop(option))}")
    try:
        raw, from_cli = apply_overrides(recipe, overrides)
        resolved = resolve_recipe(raw, REGISTRY, from_cli, recipe)
    except MicrotrainError as exc:
        event("refused")
        message = str(exc)
        assert "\n" not in message and message.strip()
        assert any(path in message for path, *_ in paths) or "duplicate key" in message or "override" in message, message
        return
    for path, kind, component, option in paths:
        if kind == "callback":
            value = next(e[component] for e in resolved["plugins"] if isinstance(e, dict) and component in e)[option]
        elif kind == "core":
            value = resolved[option]
        else:
            body = resolved[path.split(".")[0]]
            if body["name"] != component:
                continue  # a later change switched the section to another component
            value = body[option]
        assert finite_numbers(value), (path, value)
        assert check_type(value, annotation_of(kind, component, option), path) == value  # it fits its rules
    event("accepted")
    again = resolve_recipe(parse_recipe_text(dump_recipe(resolved)), REGISTRY)
    assert json.dumps(again, sort_keys=True) == json.dumps(resolved, sort_keys=True)


OPTIM_OPTIONS = [o for o in OPTIONS if o[0] in ("optimizer", "schedule")]


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(OPTIM_OPTIONS), VALUES), min_size=1, max_size=4))
def test_accepted_optimizer_and_schedule_values_build_and_step(changes):
    """What resolution accepts, the factories build and train with: no exception but a MicrotrainError."""
    recipe = copy.deepcopy(TINY)
    for (kind, component, option), value in changes:
        place(recipe, kind, component, option, value)
    try:
        resolved = resolve_recipe(recipe, REGISTRY)
    except MicrotrainError:
        event("refused when resolved")
        return
    event("accepted")
    model = torch.nn.Linear(4, 2)
    opt_cfg, sched_cfg = dict(resolved["optimizer"]), dict(resolved["schedule"])
    try:
        optimizer = REGISTRY.get("optimizer", opt_cfg.pop("name"), "o").build(model, options=opt_cfg)
        schedule = REGISTRY.get("schedule", sched_cfg.pop("name"), "s").build(optimizer, 20, 5, options=sched_cfg)
    except MicrotrainError:
        return
    for _ in range(20):
        optimizer.zero_grad()
        model(torch.ones(3, 4)).sum().backward()
        optimizer.step()
        schedule.step()


TRANSFORMS = ["HorizontalFlip", "Affine", "ShiftScaleRotate", "CoarseDropout", "ToGray", "Blur", "RandomCrop",
              "Resize", "Normalize", "PadIfNeeded", "GaussNoise", "RandomBrightnessContrast", "Rotate", "NoSuchThing"]
ARGUMENTS = ["p", "scale", "rotate", "translate_percent", "translate_px", "fill", "keep_ratio", "num_holes_range",
             "hole_height_range", "hole_width_range", "height", "width", "blur_limit", "limit", "shift_limit", "bogus"]
ARGUMENT_VALUES = (st.floats(-2, 2) | st.sampled_from([0, 1, 0.5, -1, 300, float("nan"), True, "x", None])
                   | st.lists(st.floats(-2, 40) | st.integers(-5, 300), min_size=1, max_size=3))
PROBABILITY = st.floats(0, 1)


def ordered(values: st.SearchStrategy) -> st.SearchStrategy:
    return st.tuples(values, values).map(sorted)


PLAUSIBLE_ENTRIES = st.one_of(  # valid transforms with edge-of-range arguments: what reaches the batch code
    st.builds(lambda p: {"HorizontalFlip": {"p": p}}, PROBABILITY),
    st.builds(lambda p: {"ToGray": {"p": p}}, PROBABILITY),
    st.builds(lambda t, s, r, p: {"Affine": {"translate_percent": t, "scale": s, "keep_ratio": True, "rotate": r, "p": p}},
              ordered(st.floats(-0.5, 0.5)), ordered(st.floats(0.1, 3)), ordered(st.floats(-180, 180)), PROBABILITY),
    st.builds(lambda n, h, w, f, p: {"CoarseDropout": {"num_holes_range": n, "hole_height_range": h,
                                                       "hole_width_range": w, "fill": f, "p": p}},
              ordered(st.integers(1, 8)), ordered(st.integers(1, 32)), ordered(st.integers(1, 32)), st.integers(0, 255),
              PROBABILITY),
    st.builds(lambda sh, sc, r, p: {"ShiftScaleRotate": {"shift_limit": sh, "scale_limit": sc, "rotate_limit": r, "p": p}},
              st.floats(0, 0.5), st.floats(0, 0.9), st.integers(0, 180), PROBABILITY))
ENTRIES = (PLAUSIBLE_ENTRIES | PLAUSIBLE_ENTRIES
           | st.builds(lambda name, args: {name: args}, st.sampled_from(TRANSFORMS),
                       st.dictionaries(st.sampled_from(ARGUMENTS), ARGUMENT_VALUES, max_size=3))
           | st.sampled_from(TRANSFORMS) | VALUES)
AUGMENT_LISTS = st.lists(ENTRIES, max_size=3)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(AUGMENT_LISTS, st.sampled_from(["albumentations", "tensor"]))
def test_any_augment_list_is_refused_in_one_line_or_augments_a_batch(augment, loader):
    from microtrain import LoaderContext
    from microtrain_plugins.data.synthetic import build_synthetic

    recipe = {**TINY, "loader": {"name": loader, "batch_size": 8, "augment": augment}}
    if loader == "albumentations":
        recipe["loader"]["workers"] = 0
    try:
        resolved = resolve_recipe(recipe, REGISTRY)
    except MicrotrainError as exc:
        event("refused when resolved")
        assert "\n" not in str(exc) and "loader" in str(exc)
        return
    data = build_synthetic(train_size=8, test_size=8, image_size=16)
    context = LoaderContext(images=data.train_images, labels=data.train_labels, train=True, device=torch.device("cpu"),
                            seed=0, mean=data.mean, std=data.std)
    options = {k: v for k, v in resolved["loader"].items() if k != "name"}
    try:
        batches = REGISTRY.get("loader", loader, "loader.name").build(context, options=options)
    except MicrotrainError:  # a rule that needs the images (channels, size)
        event("refused when built")
        return
    event(f"augmented a batch with {len(augment)} transforms")
    batches.set_epoch(1)
    images, labels = next(iter(batches))
    assert images.shape == (8, 3, 16, 16) and labels.shape == (8,)


# Command-line cases: values that are mostly refused, plus a few accepted ones that train in a second or two (no
# option whose accepted values make a run long or spawn processes: sizes, epochs, loader.workers).
CLI_PATHS = ["grad_clip", "threads", "seed", "epochs", "label_smoothing", "device", "optimizer.lr", "optimizer.momentum",
             "optimizer.weight_decay", "model.dropout", "model.width", "data.image_size", "data.num_classes",
             "loader.batch_size", "schedule.warmup_epochs"]
CLI_VALUES = st.sampled_from(["-1", "-1e-9", "0", "1.5", ".nan", ".inf", "-.inf", "1e30", str(10**30), "abc", "true",
                              "[]", "{}", "null", "[1, 2]", "{a: 1, a: 2}", "[&a [1,1], *a]"])
CLI_OVERRIDE = st.builds(lambda path, value: f"{path}={value}", st.sampled_from(CLI_PATHS), CLI_VALUES) | \
    st.builds(lambda augment: f"loader.augment={as_yaml(augment)}", AUGMENT_LISTS)
CLI_CASES = st.tuples(st.lists(CLI_OVERRIDE, min_size=1, max_size=2), st.sampled_from([False, False, True]))  # resume?


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    """A recipe and a completed run of it, to resume from (copied for each example)."""
    folder = tmp_path_factory.mktemp("finished")
    recipe = folder / "opts.yaml"
    recipe.write_text(yaml.safe_dump(TINY, sort_keys=False))
    threads = torch.get_num_threads()
    status, stderr = run_cli(["run", str(recipe), "--run-dir", str(folder / "run")])
    torch.set_num_threads(threads)
    assert status == 0, stderr
    return recipe, folder / "run"


def check_command(argv: list[str], status: int, stderr: str, run_dir: Path, existing: tuple[Path, dict] | None) -> None:
    event(f"exit {status}, {'existing run' if existing else 'new run dir'}"
          f"{', run dir written' if (run_dir / 'status.json').is_file() else ''}")
    assert status in (0, 2), (argv, stderr)
    assert "Traceback" not in stderr, stderr
    if status == 2:
        error_line(stderr)
    if (run_dir / "status.json").is_file():
        assert json.loads((run_dir / "status.json").read_text())["status"] != "running", argv
    if existing is not None and status == 2:
        folder, before = existing
        assert snapshot(folder) == before, f"a refused command changed {folder}: {argv}"


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(CLI_CASES)
def test_commands_with_any_option_values_exit_0_or_2_and_leave_runs_consistent(finished_run, tmp_path_factory, case):
    overrides, resume = case
    recipe, finished = finished_run
    work = tmp_path_factory.mktemp("cli")
    if resume:  # an existing run: a refused command must leave it exactly as it was
        run_dir = work / "run"
        shutil.copytree(finished, run_dir)
        argv, existing = ["run", str(recipe), *overrides, "--resume", str(run_dir)], (run_dir, snapshot(run_dir))
    else:
        run_dir = work / "new"
        argv, existing = ["run", str(recipe), *overrides, "--run-dir", str(run_dir)], None
    threads = torch.get_num_threads()
    try:
        status, stderr = run_cli(argv)
    finally:
        torch.set_num_threads(threads)
    check_command(argv, status, stderr, run_dir, existing)


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(CLI_CASES)
def test_the_console_command_never_prints_a_traceback(finished_run, tmp_path_factory, case):
    """The same property through a real process, where an escaped exception would print a traceback."""
    overrides, resume = case
    recipe, finished = finished_run
    run_dir = tmp_path_factory.mktemp("proc") / "run"
    existing = None
    if resume:
        shutil.copytree(finished, run_dir)
        existing = (run_dir, snapshot(run_dir))
    argv = ["run", str(recipe), *overrides, "--resume" if resume else "--run-dir", str(run_dir)]
    result = subprocess.run([sys.executable, "-m", "microtrain", *argv], capture_output=True, text=True, cwd=REPO,
                            timeout=300, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    check_command(argv, result.returncode, result.stderr, run_dir, existing)
