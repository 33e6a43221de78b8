"""The ``microtrain`` command: run, plugins, inspect, and subcommands added by plugins (report).

Every user error ends as one line on stderr and exit status 2; no traceback."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations must not phone home

from microtrain.errors import MicrotrainError  # noqa: E402


def _parser(pm) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microtrain", description="Train image classifiers from a YAML recipe.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="train a recipe", description="Train a recipe. Overrides are dotted paths: "
                         "epochs=5 loader.batch_size=256 data.root=/data")
    run.add_argument("recipe", help="path to a recipe .yaml")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override any recipe field by its dotted path")
    run.add_argument("--run-dir", type=Path, help="output folder (default runs/<name>/<timestamp>); a folder that holds a "
                     "run is refused: continue it with --resume, or replace it with --force")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint "
                     "(or from the checkpoint file RUN_DIR/checkpoints/X.pt)")
    run.add_argument("--force", action="store_true", help="with --run-dir: move the run already there aside to "
                     "RUN_DIR.replaced-<time> and start a new one; with --resume: apply the recipe's changes (those a "
                     "checkpoint cannot take are refused by name)")
    run.set_defaults(handler=_cmd_run)

    plugins = sub.add_parser("plugins", help="list plugins, hooks and components with their options")
    plugins.add_argument("--hooks", action="store_true", help="also print every hook's documentation")
    plugins.set_defaults(handler=_cmd_plugins)

    insp = sub.add_parser("inspect", help="print the model's layer table (shapes, parameters, receptive field)")
    insp.add_argument("recipe")
    insp.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    insp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    insp.add_argument("--all", action="store_true", help="one row per leaf module (activations and norms too)")
    insp.set_defaults(handler=_cmd_inspect)

    if pm is not None:
        pm.hook.register_commands(subparsers=sub)
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, but KEY=VALUE overrides may also follow options (`run R --run-dir D epochs=2`).

    argparse stops filling a positional list at the first option and would reject the words after it.
    """
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in word and not word.startswith("-") for word in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from microtrain.plugin_manager import create_plugin_manager

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # recipe-named plugin modules next to the recipe, as with `python -m`
    try:
        pm, _ = create_plugin_manager()
        args = parse_command_line(_parser(pm), argv)
        if not getattr(args, "handler", None):
            _parser(pm).print_help()
            return 2
        return int(args.handler(args) or 0)
    except MicrotrainError as exc:
        print(f"microtrain: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("microtrain: interrupted", file=sys.stderr)
        return 130


def _cmd_run(args) -> int:
    from microtrain.run import run

    if args.force and not (args.resume or args.run_dir):
        raise MicrotrainError("--force only applies with --run-dir RUN_DIR (replace the run there) or --resume RUN_DIR "
                              "(apply a changed recipe); a new run dir needs neither")
    return run(args.recipe, args.overrides, run_dir=args.run_dir, resume=args.resume, force=args.force)


def _cmd_plugins(args) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from microtrain import hookspecs
    from microtrain.components import type_name
    from microtrain.plugin_manager import create_plugin_manager
    from microtrain.recipe import CORE_FIELDS, REQUIRED

    pm, registry = create_plugin_manager()
    console = Console()
    fields = Table(title="Recipe fields (top level; model, data, loader, optimizer, schedule pick components below)",
                   title_justify="left")
    for column in ("field", "type", "default", "what it is"):
        fields.add_column(column)
    for name, spec in CORE_FIELDS.items():
        fields.add_row(name, type_name(spec.annotation), "(required)" if spec.default is REQUIRED else repr(spec.default), spec.help)
    console.print(fields)
    table = Table(title="Plugins", title_justify="left")
    table.add_column("plugin")
    table.add_column("module")
    table.add_column("hooks")
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        table.add_row(name, getattr(plugin, "__name__", type(plugin).__name__), ", ".join(hooks))
    console.print(table)
    for kind, components in registry.all().items():
        table = Table(title=f"{kind} components (recipe: {_section_of(kind)})", title_justify="left")
        table.add_column("name")
        table.add_column("options (default)")
        table.add_column("plugin")
        table.add_column("what it is")
        for name, comp in components.items():
            opts = "\n".join(
                f"{o.name}: {o.type_name()}" + (" (required)" if o.required else f" = {o.default!r}") for o in comp.options.values()
            )
            table.add_row(name, opts or "-", comp.plugin, comp.doc)
        console.print(table)
    hooks = Table(title="Hooks (microtrain.hookspecs)", title_justify="left")
    hooks.add_column("hook")
    hooks.add_column("arguments")
    hooks.add_column("when" if not args.hooks else "documentation")
    specs = [func for _, func in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(func, "microtrain_spec")]
    for func in sorted(specs, key=lambda f: f.__code__.co_firstlineno):  # the order of hookspecs.py: a run's order
        doc = inspect.getdoc(func) or ""
        text = doc if args.hooks else doc.split("\n\n")[0].split(". ")[0].rstrip(".") + "."
        hooks.add_row(func.__name__, ", ".join(inspect.signature(func).parameters), escape(text))
    console.print(hooks)
    return 0


def _section_of(kind: str) -> str:
    return "plugins: [...]" if kind == "callback" else f"{kind}.name"


def _cmd_inspect(args) -> int:
    import torch

    from microtrain.assembly import prepare_recipe
    from microtrain.inspect_model import as_json, layer_table

    recipe, _, registry = prepare_recipe(args.recipe, args.overrides)
    model_cfg = dict(recipe["model"])
    data_component = registry.get("data", recipe["data"]["name"], "data.name")
    num_classes, image_shape = _data_shape(data_component, recipe)
    torch.manual_seed(0)
    model = registry.get("model", model_cfg.pop("name"), "model.name").build(num_classes, image_shape, options=model_cfg)
    rows, totals = layer_table(model, image_shape, expand=args.all)
    if args.json:
        print(json.dumps(as_json(rows, totals), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{recipe['model']['name']} on input {tuple(image_shape)}", title_justify="left")
    for column, justify in (("layer", "left"), ("type", "left"), ("output", "right"), ("params", "right"),
                            ("RF", "right"), ("jump", "right")):
        table.add_column(column, justify=justify)
    for row in rows:
        table.add_row(row.name, row.kind, "x".join(map(str, row.output_shape)), f"{row.params:,}",
                      str(row.receptive_field), str(row.jump))
    table.add_section()
    table.add_row("total", "", "", f"{totals['params']:,}", str(totals["receptive_field"]), "")
    Console().print(table)
    return 0


def _data_shape(data_component, recipe) -> tuple[int, tuple[int, int, int]]:
    """Classes and image shape without loading the data when the dataset declares them."""
    factory = data_component.factory
    describe = getattr(factory, "describe", None)
    options = {k: v for k, v in recipe["data"].items() if k != "name"}
    if describe is not None:
        return describe(**options)
    data = data_component.build(options=options)
    return data.num_classes, data.image_shape
