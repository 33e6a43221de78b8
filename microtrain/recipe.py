"""Recipes: YAML files and dotted command-line overrides (both read by :func:`load_yaml`: ``yaml.safe_load``
with bounds on size and alias expansion, and no duplicate keys), validated against the core fields below and
against the options each picked component declares.

A resolved recipe is a plain dict; every component section holds ``name`` plus every option
with its default filled in, so the saved ``recipe.yaml`` says exactly what ran. Its ``plugins``
list has one normal form: ``{callback_name: {every option}}`` for a callback, a plain string
for a plugin module's import path; :func:`plugin_entries` reads it.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from microtrain.components import Check, Range, Registry, check_type
from microtrain.errors import MicrotrainError, RecipeError, did_you_mean

COMPONENT_SECTIONS = {"model": "model", "data": "data", "loader": "loader", "optimizer": "optimizer", "schedule": "schedule"}

DEFAULT_PLUGINS = ["progress", "metrics", "checkpoint", "summary", "report"]

REQUIRED = object()


@dataclass(frozen=True)
class CoreField:
    """A top-level recipe field: its type (with its rules, see microtrain.components), default and help.
    A default of REQUIRED means the recipe must set it."""

    annotation: Any
    default: Any
    help: str


MAX_THREADS = 4096
"""More torch threads than any machine this runs on has cores; above it, a value is a typo (100000 made OpenMP crash)."""


def check_device(value: str, where: str) -> str:
    """A device torch can name (cuda:N whether or not this machine has it: that is checked when the run starts)."""
    if value == "auto":
        return value
    import torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise RecipeError(f"{where}: {value!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    return value


CORE_FIELDS: dict[str, CoreField] = {
    "name": CoreField(str, REQUIRED, "the run's name; run dirs go to runs/<name>/<timestamp>"),
    "epochs": CoreField(Annotated[int, Range(ge=1, le=1_000_000)], REQUIRED, "number of training epochs"),
    "seed": CoreField(Annotated[int, Range(ge=0, le=2**32 - 1)], 0, "seed for shuffling, augmentation and initialisation"),
    "device": CoreField(Annotated[str, Check(check_device, "(auto, cpu, cuda or cuda:N)")], "auto",
                        "auto (cuda when present, else cpu), cpu, cuda or cuda:N"),
    "threads": CoreField(Annotated[int, Range(ge=0, le=MAX_THREADS)], 0,
                         "torch CPU threads; 0 uses every core available, shared between a host's processes; more than "
                         "the cores available to the process is capped to them, with a warning"),
    "precision": CoreField(Literal["fp32", "bf16", "fp16"], "fp32", "fp32, or autocast to bf16 / fp16 for the forward pass"),
    "channels_last": CoreField(bool, True, "NHWC memory layout for conv models (faster on CPU and tensor cores)"),
    "compile": CoreField(bool, False, "torch.compile the model"),
    "deterministic": CoreField(bool, False, "deterministic algorithms (exact resume, slower on GPU)"),
    "label_smoothing": CoreField(Annotated[float, Range(ge=0, lt=1)], 0.0, "label smoothing of the cross-entropy loss"),
    "grad_clip": CoreField(Annotated[float, Range(ge=0)] | None, None,
                           "clip the gradient norm to this value (none or 0: no clipping)"),
    "sync_batchnorm": CoreField(bool, False, "use SyncBatchNorm across ranks in distributed GPU runs"),
    "val_fraction": CoreField(Annotated[float, Range(ge=0, le=0.5)], 0.0,
                              "share of each class of the train split held out for validation (chosen by seed, never "
                              "augmented; best.pt is chosen on it); 0: no validation split"),
    "eval_every": CoreField(Annotated[int, Range(ge=1, le=1_000_000)], 1,
                            "evaluate on the test (and validation) split after every N-th epoch and after the last; "
                            "the epochs between log train figures only"),
    "plugins": CoreField(list, DEFAULT_PLUGINS, "callbacks by name (a dict gives options) and plugin modules by import path"),
}

MAX_RECIPE_BYTES = 1_000_000
"""A recipe is a page of YAML; a bigger file is not one (and is not read into memory)."""
MAX_RECIPE_NODES = 100_000
"""Values a recipe may hold once its aliases are expanded (a 1,000-class reference table is 2,000). Aliases are
shared when read, but validation, saving and checkpoints expand them: an 855-byte alias bomb reached 16 GB."""
MAX_RECIPE_DEPTH = 50
"""Nesting levels of lists and mappings; a recipe uses four or five."""


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (plain data only: nothing is imported or called) that also refuses a key given twice
    in one mapping, which YAML would silently resolve to the last one (``epochs: 2`` ... ``epochs: 5``)."""

    source = "<recipe>"
    show_lines = True  # off for a one-line override

    def at(self, node: yaml.Node) -> str:
        return f"{self.source}:{node.start_mark.line + 1}" if self.show_lines else self.source

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first_seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # keys a '<<' merge brings in may be overridden: that is what merging is for
                key = self.construct_object(key_node)
                try:
                    first = first_seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: PyYAML refuses it with its own message
                    continue
                if first is not key_node:
                    first_at = f" (first at line {first.start_mark.line + 1})" if self.show_lines else ""
                    raise RecipeError(f"{self.at(key_node)}: duplicate key {key!r}{first_at}; YAML would silently keep "
                                      "the last one: remove one of them")
        return super().construct_mapping(node, deep=deep)


# PyYAML reads YAML 1.1, where a float needs a dot: `lr: 1e-3` would be the text '1e-3' and refused as "expected
# float, got str". YAML 1.2 and JSON read it as a number, and so does a recipe.
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                   list("-+0123456789"))


def _expanded_size(node: yaml.Node, loader: RecipeLoader) -> int:
    """The number of values ``node`` holds with every alias expanded, refused past MAX_RECIPE_NODES or nested past
    MAX_RECIPE_DEPTH (aliases of aliases nest too). Each node's size and height are memoised, so a billion-laughs
    recipe is refused after a few hundred steps, in kilobytes."""
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (values, levels below it)
    open_nodes: set[int] = set()

    def too_deep(current: yaml.Node) -> RecipeError:
        return RecipeError(f"{loader.at(current)}: lists and mappings nested deeper than {MAX_RECIPE_DEPTH} levels "
                           "(counting what aliases bring in); a recipe needs a few")

    def measure(current: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(current)
        if key in open_nodes:
            raise RecipeError(f"{loader.at(current)}: an alias refers to the list or mapping that holds it (an "
                              "endless value); write the values out")
        if key not in measured:
            if depth > MAX_RECIPE_DEPTH:
                raise too_deep(current)
            open_nodes.add(key)
            if isinstance(current, yaml.SequenceNode):
                children = current.value
            elif isinstance(current, yaml.MappingNode):
                children = [child for pair in current.value for child in pair]
            else:
                children = []
            total, height = 1, 0
            for child in children:
                child_total, child_height = measure(child, depth + 1)
                total, height = total + child_total, max(height, child_height + 1)
                if total > MAX_RECIPE_NODES:
                    raise RecipeError(f"{loader.source}: expands to more than {MAX_RECIPE_NODES:,} values once its "
                                      "aliases are expanded (aliases of aliases?); a recipe is a page of settings: "
                                      "write them out")
            open_nodes.discard(key)
            measured[key] = (total, height)
        total, height = measured[key]
        if depth + height > MAX_RECIPE_DEPTH:
            raise too_deep(current)
        return total, height

    return measure(node, 0)[0]


def load_yaml(text: str, source: str = "<recipe>", *, show_lines: bool = True) -> Any:
    """``yaml.safe_load`` with a recipe's bounds: size, values after alias expansion, nesting, no duplicate keys.
    Over a bound: RecipeError; malformed YAML: PyYAML's own exceptions (the callers word them)."""
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{source}: {len(text):,} characters is too large for a recipe (at most "
                          f"{MAX_RECIPE_BYTES:,}); is this the right file?")
    loader = RecipeLoader(text)
    loader.source, loader.show_lines = source, show_lines
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, loader)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_recipe_file(path: str | Path) -> dict[str, Any]:
    """Read a recipe file; malformed YAML becomes one line with the line number."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file '{path}' not found; pass the path to a .yaml recipe, e.g. recipes/cifar10_dsconv.yaml")
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:  # refused before it is read into memory
            raise RecipeError(f"recipe '{path}' is {path.stat().st_size:,} bytes, too large for a recipe (at most "
                              f"{MAX_RECIPE_BYTES:,}); is this the right file?")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe '{path}': {exc}") from None
    return parse_recipe_text(text, str(path))


def parse_recipe_text(text: str, source: str = "<recipe>") -> dict[str, Any]:
    try:
        data = load_yaml(text, source)
    except RecipeError:
        raise
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        started = f" ({context} started at line {start.line + 1})" if context and start and mark and start.line != mark.line else ""
        raise RecipeError(f"{where}: malformed YAML: {problem}{started}; fix the syntax there") from None
    except Exception as exc:  # PyYAML's constructors raise others on values they cannot build (2001-02-30, !!bool x)
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RecipeError(f"{source}: malformed YAML: a value cannot be read ({type(exc).__name__}: {detail}); "
                          "fix or quote that value") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of fields (name:, epochs:, model:, ...), got {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise RecipeError(f"{source}: field names must be text, got {key!r}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as a YAML scalar or flow list/dict)."""
    if "=" not in text:
        raise RecipeError(f"override '{text}' has no '='; write it as key.path=value, e.g. epochs=5")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise RecipeError(f"override '{text}' has an empty key; write it as key.path=value, e.g. loader.batch_size=256")
    try:
        value = load_yaml(raw, f"override '{key.strip()}'", show_lines=False) if raw.strip() else ""
    except RecipeError:  # a duplicate key or a value past the recipe bounds is never taken as text
        raise
    except Exception:  # not valid YAML (or a value PyYAML cannot build, like 2001-02-30): take it as text
        value = raw
    return parts, value


def apply_overrides(recipe: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], dict[str, set[str]]]:
    """Apply dotted overrides. Returns the new recipe and, per section, the keys set on the command line."""
    recipe = copy.deepcopy(recipe)
    from_cli: dict[str, set[str]] = {}
    for text in overrides:
        parts, value = parse_override(text)
        node = recipe
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                path = ".".join(parts[: depth + 1])
                raise RecipeError(f"override '{text}': '{path}' is a {type(child).__name__}, not a section with fields")
            node = child
        node[parts[-1]] = value
        if len(parts) >= 2:
            from_cli.setdefault(parts[0], set()).add(parts[1])
    return recipe, from_cli


def resolve_recipe(raw: dict[str, Any], registry: Registry, from_cli: dict[str, set[str]] | None = None,
                   original: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate a recipe and fill in defaults.

    When an override switched a component (``data.name=imagefolder``), options that came from the
    file and that the new component does not take are dropped; options given on the command line
    must still fit the new component.
    """
    from_cli = from_cli or {}
    allowed = set(CORE_FIELDS) | set(COMPONENT_SECTIONS)
    for key in raw:
        if key not in allowed:
            raise RecipeError(
                f"unknown recipe field '{key}'{did_you_mean(key, allowed)}; recipe fields are: {', '.join(sorted(allowed))}"
            )
    resolved: dict[str, Any] = {}
    for key, spec in CORE_FIELDS.items():
        if key in raw:
            resolved[key] = check_type(raw[key], spec.annotation, key)
        elif spec.default is REQUIRED:
            raise RecipeError(f"recipe field '{key}' is missing: {spec.help}; add '{key}: ...' to the recipe")
        else:
            resolved[key] = copy.deepcopy(spec.default)
    name = resolved["name"]
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise RecipeError(f"name: {name!r} cannot be a folder name (run dirs go to runs/<name>/); use letters, digits, "
                          "'-' and '_'")
    for section, kind in COMPONENT_SECTIONS.items():
        body = raw.get(section)
        if body is None:
            raise RecipeError(f"recipe section '{section}' is missing; add '{section}: {{name: ...}}' (see `microtrain plugins`)")
        if isinstance(body, str):
            body = {"name": body}
        if not isinstance(body, dict):
            raise RecipeError(f"{section}: expected a section like {{name: ..., option: value}}, got {type(body).__name__}")
        if "name" not in body:
            raise RecipeError(f"{section}.name is missing; pick one of: {', '.join(registry.names(kind))}")
        component = registry.get(kind, body["name"], f"{section}.name")
        options = {k: v for k, v in body.items() if k != "name"}
        original_body = (original or {}).get(section)
        switched = isinstance(original_body, dict) and original_body.get("name") != body["name"] and "name" in from_cli.get(section, set())
        if switched:
            cli_keys = from_cli.get(section, set())
            options = {k: v for k, v in options.items() if k in component.options or k in cli_keys}
        resolved[section] = {"name": body["name"], **component.validate(options, section)}
    resolved["plugins"] = normalise_plugins(resolved["plugins"], registry)
    return resolved


def with_core_defaults(recipe: dict[str, Any]) -> dict[str, Any]:
    """``recipe`` with every optional core field it lacks set to its default: a recipe.yaml saved before a field
    existed describes a run that had the field's default."""
    filled = dict(recipe)
    for key, spec in CORE_FIELDS.items():
        if key not in filled and spec.default is not REQUIRED:
            filled[key] = copy.deepcopy(spec.default)
    return filled


def with_defaults(recipe: dict[str, Any], registry: Registry) -> dict[str, Any]:
    """A recipe.yaml saved by an earlier run, with the defaults of today's core fields and component options filled in.

    An option added since the run was saved (``model.shortcut``, say) is then not a change: the run had its default.
    Components the registry does not know, and options since removed or renamed, are left as saved, so that a
    comparison with today's resolved recipe reports them. ``registry``: the components today's recipe was resolved
    against (``Run.registry``)."""
    filled = with_core_defaults(recipe)
    for section, kind in COMPONENT_SECTIONS.items():
        body = filled.get(section)
        if isinstance(body, dict) and isinstance(body.get("name"), str) and registry.has(kind, body["name"]):
            options = {k: v for k, v in body.items() if k != "name"}
            try:
                filled[section] = {"name": body["name"], **registry.get(kind, body["name"], section).validate(options, section)}
            except MicrotrainError:
                pass
    if isinstance(filled.get("plugins"), list):
        try:  # a run dir written before plugins had their normal form lists bare callback names
            filled["plugins"] = normalise_plugins(filled["plugins"], registry)
        except MicrotrainError:
            pass
    return filled


def normalise_plugins(plugins: list[Any], registry: Registry) -> list[Any]:
    """Check a ``plugins`` list and put it in the normal form (see the module's docstring)."""
    return [_check_plugin_entry(entry, registry, i) for i, entry in enumerate(plugins)]


def plugin_entries(plugins: list[Any]) -> list[tuple[str, dict[str, Any] | None]]:
    """``(name, options)`` of each entry of a resolved ``plugins`` list; options are None for a module path."""
    entries = []
    for entry in plugins:
        if isinstance(entry, dict):
            (name, options), = entry.items()
            entries.append((name, dict(options or {})))
        else:
            entries.append((entry, None))
    return entries


def _check_plugin_entry(entry: Any, registry: Registry, index: int) -> Any:
    """A plugins entry is a callback name, {name: {options}}, or a module import path; callbacks come back
    in the normal form {name: {every option}}."""
    where = f"plugins[{index}]"
    if isinstance(entry, dict):
        if len(entry) != 1:
            raise RecipeError(f"{where}: write a callback with options as {{name: {{option: value}}}}, got {entry!r}")
        (name, options), = entry.items()
        options = options or {}
        if not isinstance(options, dict):
            raise RecipeError(f"{where}: options of '{name}' must be a mapping, got {options!r}")
        component = registry.get("callback", name, where)
        return {name: component.validate(options, f"plugins.{name}")}
    if not isinstance(entry, str) or not entry:
        raise RecipeError(f"{where}: expected a callback name or a module path, got {entry!r}")
    if registry.has("callback", entry):
        return {entry: registry.get("callback", entry, where).validate({}, f"plugins.{entry}")}
    if "." not in entry and not module_exists(entry):
        raise RecipeError(
            f"{where}: '{entry}' is neither a callback{did_you_mean(entry, registry.names('callback'))} nor an importable "
            f"module; callbacks: {', '.join(registry.names('callback'))}"
        )
    return entry


def module_exists(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def dump_recipe(recipe: dict[str, Any]) -> str:
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None, width=100)
