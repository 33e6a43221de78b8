"""The hooks a plugin may implement: this module is their reference (``microtrain plugins --hooks``
prints it). Every hook but ``register_components`` and ``register_commands`` receives the one
``state`` object (microtrain.State): read what you need from it, change what the hook's
docstring allows, set ``state.stop_training = True`` to stop after the current epoch.

Order within a run:
    register_commands            once, when the command line starts (add a subcommand)
    register_components          once, when the plugin manager is built
    before_fit                   model, optimizer, loaders and run dir exist
      before_epoch
        before_batch / after_batch   for every training batch
      before_eval / predict / on_eval   evaluation on the test split (predict: for every test batch), after
                                   every ``eval_every``-th epoch and the last (every epoch by default)
      after_epoch
    after_fit                    always after the last epoch (also when stopped early)
    on_checkpoint_save / on_checkpoint_load   when a checkpoint is written or restored
    on_error                     training raised; the run dir is about to be marked failed
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("microtrain")
hookimpl = pluggy.HookimplMarker("microtrain")


@hookspec
def register_components(registry):
    """Called once when the plugin manager is built. Add components with
    ``registry.model/data/loader/optimizer/schedule/callback(name, factory)``. Returns nothing."""


@hookspec
def before_fit(state):
    """Called once before the first epoch (after a resume, too). ``state`` has the model,
    optimizer, scheduler, loaders, data, recipe and run_dir. A plugin may wrap or replace
    ``state.model`` / ``state.eval_model`` here, or read ``state.start_epoch``."""


@hookspec
def before_epoch(state):
    """Called at the start of every epoch; ``state.epoch`` is the 1-based epoch about to run.
    The loader's shuffling for this epoch is already set. May change optimizer settings."""


@hookspec
def before_batch(state):
    """Called before each training step. ``state.batch`` is ``(images, labels)`` on the device;
    a plugin may replace it (for example with mixed or cut images)."""


@hookspec
def after_batch(state):
    """Called after each optimizer step. ``state.loss`` is the step's loss as a 0-d tensor
    (call ``.item()`` only when needed: it synchronises the device), ``state.step`` the global
    step (1-based), ``state.batch_index`` the step within the epoch (1-based). Set
    ``state.stop_training`` to stop after this epoch."""


@hookspec
def before_eval(state):
    """Called before evaluation on the test split. A plugin may set ``state.eval_model`` (for
    example to an EMA copy of the weights); the engine evaluates that model."""


@hookspec(firstresult=True)
def predict(state, model, images):
    """Return the logits of ``model`` for ``images`` during evaluation, or None to let the
    next plugin (finally the engine's plain forward) decide. Used for test-time augmentation."""


@hookspec
def on_eval(state):
    """Called after evaluation. ``state.metrics`` holds this epoch's figures: ``test_loss``,
    ``test_acc`` (percent), ``per_class_acc`` (class -> percent), ``confusion`` (rows: true
    class, columns: predicted), and the train figures. A plugin may add keys to it; they are
    logged with the epoch."""


@hookspec
def after_epoch(state):
    """Called at the end of every epoch, after ``on_eval``; ``state.history`` already holds this
    epoch's metrics (train figures only in an epoch that was not evaluated: ``"test_acc" in
    state.metrics`` tells). Checkpoints are written here. Set ``state.stop_training`` to stop."""


@hookspec
def after_fit(state):
    """Called once after training ends, normally or stopped early (not after an error).
    ``state.history`` is the list of per-epoch metrics. Reports and summaries run here."""


@hookspec
def on_checkpoint_save(state, checkpoint):
    """Called while a checkpoint dict is being assembled: after ``after_epoch``, and mid-epoch after a step's
    ``after_batch`` hooks (every N steps, or on Ctrl-C; then ``checkpoint["batch_index"]`` > 0 and a resume
    continues at the next batch, so save what your plugin needs to continue from there). A plugin may add its own entry,
    ``checkpoint["plugins"][name] = {...}`` holding tensors, numbers, strings, lists and dicts
    only (checkpoints are loaded with ``weights_only=True``)."""


@hookspec
def on_checkpoint_load(state, checkpoint):
    """Called after a checkpoint was restored into the model and optimizer. A plugin restores
    the entry it saved in ``on_checkpoint_save``."""


@hookspec
def on_error(state, error):
    """Called when training raised ``error`` (also KeyboardInterrupt). Runs for every plugin
    even if one of them raises. Use it to flush or close what your plugin holds open."""


@hookspec
def register_commands(subparsers):
    """Called when the command line starts. Add a subcommand with
    ``parser = subparsers.add_parser(name, help=...)`` and give it a handler with
    ``parser.set_defaults(handler=function)``; the handler gets the parsed args and returns
    the exit status."""
