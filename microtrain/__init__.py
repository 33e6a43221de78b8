"""microtrain: a small, plugin-based PyTorch framework for training image classifiers from a YAML recipe.

What a plugin (or a script) may use is exported here; everything else in the package is the core's own.
Write a plugin with ``@microtrain.hookimpl`` functions (see microtrain.hookspecs for the hooks); build
and train or evaluate a run from a recipe with :func:`build_run`; load a finished run to classify images with
:func:`load_run`.
"""

from microtrain.assembly import Run, build_run
from microtrain.checkpoint import atomic_save, load_checkpoint, make_checkpoint
from microtrain.components import Check, Range
from microtrain.engine import Engine, autocast, evaluate
from microtrain.errors import (
    CheckpointError,
    DataError,
    Interrupted,
    MicrotrainError,
    PluginError,
    RecipeError,
    TrainingStopped,
    did_you_mean,
)
from microtrain.hookspecs import hookimpl, hookspec
from microtrain.loading import LoadedRun, load_run
from microtrain.machine import machine_info
from microtrain.recipe import dump_recipe, plugin_entries, with_defaults
from microtrain.rundir import RunStatus, run_status
from microtrain.sampling import EpochBatches, batch_seed, epoch_batches
from microtrain.state import ImageData, LoaderContext, State

__version__ = "0.1.0"
__all__ = [
    "Check", "CheckpointError", "DataError", "Engine", "EpochBatches", "ImageData", "Interrupted", "LoadedRun",
    "LoaderContext", "MicrotrainError", "PluginError", "Range", "RecipeError", "Run", "State", "TrainingStopped",
    "__version__", "atomic_save", "autocast", "batch_seed", "build_run", "did_you_mean", "dump_recipe",
    "epoch_batches", "evaluate", "hookimpl", "hookspec", "load_checkpoint", "load_run", "machine_info", "make_checkpoint",
    "plugin_entries", "RunStatus", "run_status", "with_defaults",
]
