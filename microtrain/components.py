"""The component registry: every model, dataset, loader, optimizer, schedule and callback a recipe
can pick by ``name:``. Plugins fill it from their ``register_components`` hook.

A component is a plain callable. Its *keyword-only* parameters are its recipe options: their
type hints are what the recipe is validated against, their defaults are the defaults, and a
keyword-only parameter with no default is a required option. Positional parameters are the
context the engine passes (for example the model's ``num_classes``).

A rule beyond the type is declared with the option, so it is checked when the recipe is
resolved (before any run dir exists) and ``microtrain plugins`` shows it:

    def build_sgd(model, *, lr: Annotated[float, Range(gt=0)] = 0.05,
                  augment: Annotated[list, Check(check_augment_list, "albumentations transforms")] = ()): ...
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from microtrain.errors import OptionTypeError, RecipeError, did_you_mean

KINDS = ("model", "data", "loader", "optimizer", "schedule", "callback")

_MISSING = inspect.Parameter.empty


@dataclass(frozen=True)
class Range:
    """Bounds on a number option: ``Annotated[float, Range(gt=0, lt=1)]``.

    NaN and infinities never fit: an option with bounds is a finite number, and NaN compares false with
    every bound, so it would otherwise slip through as far as the first training step."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def check(self, value: Any, where: str) -> Any:
        if value is None:
            return value
        finite = not isinstance(value, float) or math.isfinite(value)  # an int of any size is finite
        fits = finite and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt) \
            and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)
        if not fits:
            raise RecipeError(f"{where}: must be {self.describe()}, got {shown(value)}; fix the value in the recipe "
                              f"or override it as {where}=VALUE")
        return value

    def describe(self) -> str:
        parts = [f"{word} {_number(bound)}" for bound, word in ((self.ge, ">="), (self.gt, ">"), (self.le, "<="),
                                                                 (self.lt, "<")) if bound is not None]
        return " and ".join(parts) or "a finite number"


def _number(bound: float) -> str:
    """A bound as a person writes it: 4294967295 and 1e-08, not 4.29497e+09 and 1e-08.0."""
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


@dataclass(frozen=True)
class Check:
    """Any rule on an option's value: ``function(value, where)`` returns the value (possibly normalised)
    or raises RecipeError naming ``where``; ``description`` is what ``microtrain plugins`` shows."""

    function: Callable[[Any, str], Any]
    description: str

    def check(self, value: Any, where: str) -> Any:
        return self.function(value, where)

    def describe(self) -> str:
        return self.description


@dataclass(frozen=True)
class Option:
    name: str
    annotation: Any
    default: Any = _MISSING

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def type_name(self) -> str:
        return type_name(self.annotation)


@dataclass
class Component:
    kind: str
    name: str
    factory: Callable
    plugin: str
    options: dict[str, Option] = field(default_factory=dict)

    @property
    def doc(self) -> str:
        text = inspect.getdoc(self.factory) or ""
        return text.split("\n\n")[0].replace("\n", " ")

    def validate(self, options: dict[str, Any], where: str) -> dict[str, Any]:
        """Check ``options`` against what this component declares; return them with defaults filled."""
        for key in options:
            if key not in self.options:
                known = ", ".join(self.options) or "none"
                raise RecipeError(
                    f"{where}: '{key}' is not an option of {self.kind} '{self.name}'"
                    f"{did_you_mean(key, self.options)}; its options are: {known}"
                )
        resolved = {}
        for opt in self.options.values():
            if opt.name in options:
                resolved[opt.name] = check_type(options[opt.name], opt.annotation, f"{where}.{opt.name}")
            elif opt.required:
                raise RecipeError(
                    f"{where}.{opt.name} is required by {self.kind} '{self.name}' ({opt.type_name()}); "
                    f"add it to the recipe or pass {where}.{opt.name}=VALUE"
                )
            else:
                resolved[opt.name] = opt.default
        return resolved

    def build(self, *context: Any, options: dict[str, Any]) -> Any:
        return self.factory(*context, **options)


def options_of(factory: Callable) -> dict[str, Option]:
    """Read a factory's keyword-only parameters as recipe options."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    hints = typing.get_type_hints(target, include_extras=True)
    opts = {}
    for param in inspect.signature(target).parameters.values():
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            opts[param.name] = Option(param.name, hints.get(param.name, Any), param.default)
    return opts


class Registry:
    """Components by kind and name. Passed to every plugin's ``register_components`` hook."""

    def __init__(self) -> None:
        self._components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
        self.current_plugin = "?"

    def add(self, kind: str, name: str, factory: Callable) -> None:
        """Register ``factory`` as component ``name`` of ``kind`` (one of KINDS)."""
        if kind not in KINDS:
            raise RecipeError(f"plugin '{self.current_plugin}' registers unknown kind '{kind}'; kinds are {KINDS}")
        existing = self._components[kind].get(name)
        if existing is not None and existing.factory is not factory:
            raise RecipeError(
                f"{kind} '{name}' is registered twice: by plugin '{existing.plugin}' and by plugin "
                f"'{self.current_plugin}'; rename one of them"
            )
        self._components[kind][name] = Component(kind, name, factory, self.current_plugin, options_of(factory))

    # Short forms, so a plugin reads `registry.model("dsconv", build_dsconv)`.
    def model(self, name: str, factory: Callable) -> None:
        self.add("model", name, factory)

    def data(self, name: str, factory: Callable) -> None:
        self.add("data", name, factory)

    def loader(self, name: str, factory: Callable) -> None:
        self.add("loader", name, factory)

    def optimizer(self, name: str, factory: Callable) -> None:
        self.add("optimizer", name, factory)

    def schedule(self, name: str, factory: Callable) -> None:
        self.add("schedule", name, factory)

    def callback(self, name: str, factory: Callable) -> None:
        self.add("callback", name, factory)

    def names(self, kind: str) -> list[str]:
        return sorted(self._components[kind])

    def has(self, kind: str, name: str) -> bool:
        return name in self._components[kind]

    def get(self, kind: str, name: Any, where: str) -> Component:
        if not isinstance(name, str) or name not in self._components[kind]:
            available = ", ".join(self.names(kind)) or "none registered"
            raise RecipeError(
                f"{where}: unknown {kind} '{name}'{did_you_mean(name, self._components[kind])}; "
                f"available: {available}"
            )
        return self._components[kind][name]

    def all(self) -> dict[str, dict[str, Component]]:
        return {kind: dict(sorted(items.items())) for kind, items in self._components.items()}


def type_name(annotation: Any) -> str:
    """A type as ``microtrain plugins`` and error messages write it, rules included: ``float >= 0 and < 1``,
    ``list of int >= 1``, ``float >= 0, or none``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        base, *rules = args
        described = [rule.describe() for rule in rules if hasattr(rule, "describe")]
        return " ".join([type_name(base), *described])
    if annotation is Any:
        return "any"
    if annotation is type(None):
        return "none"
    if origin in (typing.Union, types.UnionType):
        names = [type_name(arg) for arg in args]
        return ", or ".join(names) if any(" " in name for name in names) else " or ".join(names)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    # No square brackets: they read as markup in `microtrain plugins`' tables.
    if origin in (list, tuple) and args and (origin is list or args[-1] is Ellipsis):
        return f"list of {type_name(args[0])}"
    if origin is tuple and args:
        names = [type_name(arg) for arg in args]
        return f"{len(names)} values, each {names[0]}" if len(set(names)) == 1 else f"{len(names)} values: {'; '.join(names)}"
    if origin is dict and args:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def check_type(value: Any, annotation: Any, where: str) -> Any:
    """Return ``value`` if it fits ``annotation`` and its rules (ints are accepted as floats), else raise RecipeError."""
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base, *rules = typing.get_args(annotation)
        value = check_type(value, base, where)
        for rule in rules:
            if hasattr(rule, "check"):
                value = rule.check(value, where)
        return value
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return check_type(value, arg, where)
            except OptionTypeError:
                continue
        raise _type_error(value, annotation, where)
    if origin is typing.Literal:
        if any(type(value) is type(arg) and value == arg for arg in args):  # True is not 1 here
            return value
        raise OptionTypeError(
            f"{where}: {value!r} is not allowed{did_you_mean(value, args)}; choose one of {', '.join(map(repr, args))}"
        )
    if annotation is type(None):
        if value is None:
            return None
        raise _type_error(value, annotation, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, annotation, where)
        if args and args[-1] is not Ellipsis and origin is tuple:
            if len(args) != len(value):
                raise OptionTypeError(f"{where}: expected {len(args)} values ({type_name(annotation)}), got {len(value)}")
            return [check_type(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))]
        item = args[0] if args else Any
        return [check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(value, annotation, where)
        return value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer too large for a float (10**400)
                raise RecipeError(f"{where}: {shown(value)} is too large for a number; fix the value in the recipe or "
                                  f"override it as {where}=VALUE") from None
        raise _type_error(value, annotation, where)
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(value, annotation, where)
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise _type_error(value, annotation, where)
    return value


def shown(value: Any) -> str:
    """A value as an error line quotes it: a pasted mapping or a 400-digit number must not flood the one line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_error(value: Any, annotation: Any, where: str) -> RecipeError:
    return OptionTypeError(
        f"{where}: expected {type_name(annotation)}, got {type(value).__name__} {shown(value)}; fix the value in the "
        f"recipe or override it as {where}=VALUE"
    )
