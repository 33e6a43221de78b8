"""Assembling a run: recipe + overrides -> plugins -> components -> ``State`` -> ``Engine``.

:func:`build_run` is the one way to do it. ``microtrain run``, ``microtrain report``, the benchmarks
and a user's own script all go through it, so whatever they train or evaluate is built exactly as a
run would build it:

    run = microtrain.build_run("recipes/cifar10_dsconv.yaml", ["epochs=1"], run_dir="runs/try")
    run.engine.fit()                                   # train
    run.evaluate()                                     # or: test-split metrics of the evaluation model

Process-wide set-up (threads, device, determinism, seeds) happens here too: it must precede
building the model, whose initial weights come from the seeded generator.
"""

from __future__ import annotations

import datetime
import os
import random
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pluggy
import torch

from microtrain import distributed
from microtrain.checkpoint import load_checkpoint, restore_checkpoint
from microtrain.components import Registry
from microtrain.engine import Engine, evaluate
from microtrain.errors import MicrotrainError
from microtrain.plugin_manager import call_hook, create_plugin_manager, register_callback, register_module
from microtrain.recipe import apply_overrides, load_recipe_file, module_exists, plugin_entries, resolve_recipe
from microtrain.sampling import stratified_holdout
from microtrain.state import ImageData, LoaderContext, State

EVALUATION_HOOKS = ("on_checkpoint_load", "before_eval", "predict")
"""A callback that implements one of these takes part in evaluation (EMA weights, test-time augmentation)."""

CallbackChoice = Literal["all", "evaluation", "none"] | Iterable[str]


@dataclass
class Run:
    """An assembled run: the resolved recipe, its plugins, the built state and the engine over it."""

    recipe: dict[str, Any]
    plugin_manager: pluggy.PluginManager
    registry: Registry
    state: State
    engine: Engine
    checkpoint: dict[str, Any] | None = None  # the checkpoint restored into ``state``, if any

    def evaluate(self, **options: Any) -> dict[str, Any]:
        """Test-split figures of the model the run evaluates (after ``before_eval``: e.g. the EMA weights)."""
        call_hook(self.plugin_manager, "before_eval", state=self.state)
        return evaluate(self.state, self.state.eval_model if self.state.eval_model is not None else self.state.model, **options)


def prepare_recipe(recipe: str | Path | Mapping[str, Any], overrides: Iterable[str] = ()
                   ) -> tuple[dict[str, Any], pluggy.PluginManager, Registry]:
    """Load (from a file, or take a mapping), override and validate a recipe.

    Returns the resolved recipe and the plugin manager and component registry it was resolved against
    (installed plugins plus the plugin modules the recipe names)."""
    raw = load_recipe_file(recipe) if isinstance(recipe, (str, Path)) else dict(recipe)
    overridden, from_cli = apply_overrides(raw, list(overrides))
    pm, registry = create_plugin_manager()
    plugins = overridden.get("plugins") or []
    modules = [p for p in plugins if isinstance(p, str) and not registry.has("callback", p) and ("." in p or module_exists(p))] \
        if isinstance(plugins, list) else []
    if modules:
        pm, registry = create_plugin_manager(modules)
    return resolve_recipe(overridden, registry, from_cli, raw), pm, registry


def enable_plugins(recipe: dict[str, Any], pm: pluggy.PluginManager, registry: Registry,
                   callbacks: CallbackChoice = "all") -> None:
    """Instantiate the recipe's callbacks that ``callbacks`` selects and register the plugin modules it names.

    ``"all"``: every callback; ``"evaluation"``: those that take part in evaluation (a callback that cannot be
    built on this machine, such as tensorboard without its package, is skipped); ``"none"``; or names."""
    for name, options in plugin_entries(recipe["plugins"]):
        if options is None:
            register_module(pm, name)
            continue
        if callbacks == "none" or (callbacks not in ("all", "evaluation") and name not in callbacks):
            continue
        component = registry.get("callback", name, "plugins")
        try:
            instance = component.build(options=options)
        except MicrotrainError:
            if callbacks == "evaluation":
                continue
            raise
        if callbacks == "evaluation" and not any(hasattr(getattr(instance, hook, None), "microtrain_impl")
                                                 for hook in EVALUATION_HOOKS):
            continue
        register_callback(pm, instance, name)


def default_run_dir(recipe: dict[str, Any]) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / recipe["name"] / stamp


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", distributed.local_rank())
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MicrotrainError(f"device '{name}' requested but CUDA is not available here; use device=cpu or device=auto")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MicrotrainError(f"device: '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", distributed.local_rank())
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def configure_threads(threads: int, world_size: int) -> None:
    """0 means every core available, shared out between the processes of a distributed run on one host.

    More threads than cores available are capped to the cores, with a warning, rather than refused: a recipe
    written on a big machine still runs on a small one (and resumes there, its saved recipe unchanged), and
    threads beyond the cores only contend for them (OpenMP crashed outright at 100,000)."""
    cores = available_cores()
    if threads <= 0:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        threads = max(1, cores // max(1, local))
    elif threads > cores:
        if distributed.rank() == 0:
            print(f"microtrain: warning: threads={threads} but this process may use {cores} core"
                  f"{'s' if cores != 1 else ''}; using {cores}", file=sys.stderr)
        threads = cores
    torch.set_num_threads(threads)


def setup_process(recipe: dict[str, Any]) -> torch.device:
    """Threads, device, determinism and seeds for this process, from the recipe; returns the device."""
    configure_threads(recipe["threads"], distributed.world_size())
    device = pick_device(recipe["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if recipe["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = True
    seed_everything(recipe["seed"])
    return device


def build_state(recipe: dict[str, Any], run_dir: Path, pm: pluggy.PluginManager, registry: Registry,
                data: ImageData | None = None) -> State:
    """Everything a run needs, built from a resolved recipe (after :func:`setup_process`'s set-up); ``data``, when
    given, is used instead of building the recipe's dataset."""
    rank, world_size = distributed.rank(), distributed.world_size()
    device = setup_process(recipe)

    if data is None:
        data_cfg = dict(recipe["data"])
        data = registry.get("data", data_cfg.pop("name"), "data.name").build(options=data_cfg)

    loader_cfg = dict(recipe["loader"])
    loader_component = registry.get("loader", loader_cfg.pop("name"), "loader.name")

    def make_loader(images: np.ndarray, labels: np.ndarray, train: bool):
        ctx = LoaderContext(images=images, labels=labels, train=train, device=device, seed=recipe["seed"],
                            mean=data.mean, std=data.std, rank=rank, world_size=world_size,
                            channels_last=recipe["channels_last"])
        return loader_component.build(ctx, options=loader_cfg)

    train_images, train_labels = data.split(True)
    val_loader = None
    if recipe["val_fraction"] > 0:
        # Chosen by the seed alone, before any loader: every rank, loader and resumed process holds out the same images.
        kept, held = stratified_holdout(train_labels, recipe["val_fraction"], recipe["seed"])
        if len(held):
            val_loader = make_loader(train_images[held], train_labels[held], train=False)
            train_images, train_labels = train_images[kept], train_labels[kept]
    train_loader = make_loader(train_images, train_labels, train=True)
    test_loader = make_loader(*data.split(False), train=False)

    model_cfg = dict(recipe["model"])
    model = registry.get("model", model_cfg.pop("name"), "model.name").build(data.num_classes, data.image_shape, options=model_cfg)
    model = model.to(device)
    if recipe["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if world_size > 1:
        model = distributed.wrap_model(model, device, recipe["sync_batchnorm"])

    opt_cfg = dict(recipe["optimizer"])
    optimizer = registry.get("optimizer", opt_cfg.pop("name"), "optimizer.name").build(model, options=opt_cfg)

    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise MicrotrainError("the training loader yields no batch: the dataset is smaller than loader.batch_size; lower it")
    sched_cfg = dict(recipe["schedule"])
    scheduler = registry.get("schedule", sched_cfg.pop("name"), "schedule.name").build(
        optimizer, recipe["epochs"] * steps_per_epoch, steps_per_epoch, options=sched_cfg
    )
    grad_scaler = torch.amp.GradScaler(device.type, enabled=recipe["precision"] == "fp16" and device.type == "cuda")

    state = State(recipe=recipe, run_dir=run_dir, device=device, data=data, model=model, optimizer=optimizer,
                  scheduler=scheduler, train_loader=train_loader, test_loader=test_loader, epochs=recipe["epochs"],
                  rank=rank, world_size=world_size, steps_per_epoch=steps_per_epoch, plugin_manager=pm,
                  grad_scaler=grad_scaler, val_loader=val_loader, eval_every=recipe["eval_every"])
    if recipe["compile"]:
        state.model = torch.compile(model)
    state.eval_model = state.model
    return state


def build_run(recipe: str | Path | Mapping[str, Any], overrides: Iterable[str] = (), *, run_dir: str | Path | None = None,
              callbacks: CallbackChoice = "all", checkpoint: str | Path | Mapping[str, Any] | None = None,
              extra_plugins: Mapping[str, object] | None = None, data: ImageData | None = None) -> Run:
    """Build a run from a recipe (a path or a mapping) and dotted overrides.

    ``callbacks`` picks which of the recipe's callbacks are enabled (see :func:`enable_plugins`); plugin
    modules the recipe names are always registered. ``extra_plugins`` (name -> plugin object) are registered
    too, before the checkpoint is restored. ``checkpoint`` (a path, or a checkpoint already loaded) is
    restored into the state: weights, optimizer, schedule, RNG, and what plugins saved (EMA weights).
    ``data`` replaces the recipe's dataset (microtrain.load_run passes the classes, shape and statistics a checkpoint
    recorded, with blank images, to rebuild a model without reading its data).
    Nothing is written here; ``run_dir`` (default ``runs/<name>/<timestamp>``) is where plugins write."""
    resolved, pm, registry = prepare_recipe(recipe, overrides)
    enable_plugins(resolved, pm, registry, callbacks)
    for name, plugin in (extra_plugins or {}).items():
        if pm.get_plugin(name) is None:
            pm.register(plugin, name=name)
    state = build_state(resolved, Path(run_dir) if run_dir is not None else default_run_dir(resolved), pm, registry, data)
    engine = Engine(state)
    loaded = None
    if checkpoint is not None:
        loaded = dict(checkpoint) if isinstance(checkpoint, Mapping) else load_checkpoint(Path(checkpoint))
        restore_checkpoint(state, loaded)
    return Run(recipe=resolved, plugin_manager=pm, registry=registry, state=state, engine=engine, checkpoint=loaded)
