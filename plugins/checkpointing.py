"""Callback ``checkpoint``: ``<run dir>/checkpoints/last.pt`` after every epoch and ``best.pt``
(highest test accuracy), each written atomically, so ``microtrain run RECIPE --resume RUN_DIR``
can continue and ``microtrain report`` can reload the final model."""

from __future__ import annotations

import microtrain
from microtrain.checkpoint import atomic_save, make_checkpoint


class Checkpointing:
    def __init__(self, *, keep_best: bool = True):
        self.keep_best = keep_best
        self.pm = None

    @microtrain.hookimpl
    def before_fit(self, state):
        self.pm = state.extras["plugin_manager"]
        self.best = max((row["test_acc"] for row in state.history), default=float("-inf"))

    @microtrain.hookimpl
    def after_epoch(self, state):
        if not state.is_main:
            return
        folder = state.run_dir / "checkpoints"
        checkpoint = make_checkpoint(state, self.pm)
        atomic_save(checkpoint, folder / "last.pt")
        if self.keep_best and state.metrics["test_acc"] > self.best:
            self.best = state.metrics["test_acc"]
            atomic_save(checkpoint, folder / "best.pt")


def build_checkpoint(*, keep_best: bool = True) -> Checkpointing:
    """Atomic checkpoints: last.pt every epoch, best.pt on a new best test accuracy."""
    return Checkpointing(keep_best=keep_best)


@microtrain.hookimpl
def register_components(registry):
    registry.callback("checkpoint", build_checkpoint)
