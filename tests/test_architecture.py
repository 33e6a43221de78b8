"""The boundaries the code keeps: built-in plugins use only the public API a third-party plugin has
(``microtrain.__all__``), control-flow exceptions live in one module, and a run is assembled in one place."""

from __future__ import annotations

import ast
import inspect
import pkgutil
from pathlib import Path

import pytest
from conftest import REPO

import microtrain

PLUGIN_FILES = sorted((REPO / "plugins").rglob("*.py"))
CORE_FILES = sorted((REPO / "microtrain").glob("*.py"))


def _core_uses(path: Path) -> list[str]:
    """Every way ``path`` reaches into microtrain: imported modules and names, and attributes of ``microtrain``."""
    uses = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            uses += [alias.name for alias in node.names if alias.name.split(".")[0] == "microtrain"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "microtrain":
            uses += [node.module] if node.module != "microtrain" else [f"microtrain.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "microtrain":
            uses.append(f"microtrain.{node.attr}")
    return uses


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_built_in_plugins_use_only_the_public_api(path: Path) -> None:
    public = {"microtrain", *(f"microtrain.{name}" for name in microtrain.__all__)}
    private = [use for use in _core_uses(path) if use not in public]
    assert not private, f"{path.relative_to(REPO)} uses core internals {private}; export them in microtrain.__all__ or " \
                        "do without"


def test_the_public_api_resolves() -> None:
    for name in microtrain.__all__:
        assert hasattr(microtrain, name), name


def test_control_flow_exceptions_are_defined_in_errors_py() -> None:
    import microtrain.errors

    outside = []
    for module_info in pkgutil.iter_modules(microtrain.__path__):
        module = __import__(f"microtrain.{module_info.name}", fromlist=["_"])
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == module.__name__ \
                    and module is not microtrain.errors:
                outside.append(f"{module.__name__}.{name}")
    assert not outside, f"exceptions defined outside microtrain/errors.py: {outside}"


def test_state_has_typed_core_objects_and_no_untyped_side_channel() -> None:
    fields = microtrain.State.__dataclass_fields__
    assert "extras" not in fields
    assert {"plugin_manager", "grad_scaler"} <= set(fields)


# Who may call what: the assembly builds state and engine; the plugin manager is created by the assembly, by the
# CLI (to list plugins and add their subcommands) and by the loader benchmark (it needs only the loader registry).
OWNERS = {
    "build_state(": {"microtrain/assembly.py"},
    "Engine(": {"microtrain/assembly.py"},
    "create_plugin_manager(": {"microtrain/assembly.py", "microtrain/plugin_manager.py", "microtrain/cli.py",
                               "benchmarks/loader_throughput.py"},
    "collect_predictions": set(),  # the report's own evaluation loop, now the engine's evaluate with a collector
    "make_forward": set(),
}


@pytest.mark.parametrize("construct", sorted(OWNERS))
def test_a_run_is_assembled_and_evaluated_in_one_place(construct: str) -> None:
    """Every command, plugin and benchmark builds its run with microtrain.build_run and evaluates with
    microtrain.evaluate."""
    files = [*PLUGIN_FILES, *CORE_FILES, *sorted((REPO / "benchmarks").glob("*.py"))]
    found = {str(p.relative_to(REPO)) for p in files
             if any(construct in line and not line.lstrip().startswith(("def ", "class ", "#"))
                    for line in p.read_text().splitlines())}
    assert found <= OWNERS[construct], f"{construct} outside its owners: {sorted(found - OWNERS[construct])}"


def test_recipe_plugin_entries_are_unpacked_in_one_place() -> None:
    """A resolved recipe's plugins list is read through microtrain.plugin_entries, nowhere by hand."""
    files = [*PLUGIN_FILES, *CORE_FILES, *sorted((REPO / "benchmarks").glob("*.py"))]
    by_hand = [str(p.relative_to(REPO)) for p in files
               if any("plugins" in line and ("for entry in" in line or "next(iter(" in line)
                      for line in p.read_text().splitlines())]
    assert by_hand == ["microtrain/recipe.py"], by_hand  # plugin_entries itself
