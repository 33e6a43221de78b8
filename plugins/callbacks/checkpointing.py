"""Callback ``checkpoint``: the files that let a run survive a kill, a signal or a crash.

    <run dir>/checkpoints/last.pt      after every epoch, every ``every_steps`` steps if asked, and on Ctrl-C/SIGTERM/SIGHUP
    <run dir>/checkpoints/previous.pt  the last.pt before the newest one (a second chance if last.pt is damaged)
    <run dir>/checkpoints/best.pt      the epoch with the highest test accuracy (``keep_best``)

Every file is written atomically (temporary file in the same folder, fsync, rename), so a kill at any
byte leaves the old file or the new one, never a partial one. A mid-epoch checkpoint records the batch
it stopped after; ``microtrain run RECIPE --resume RUN_DIR`` continues at the next batch with the same
samples, augmentation and random state, and logs exactly the figures an uninterrupted run logs.
``microtrain report`` reloads the final model from last.pt.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import microtrain
from microtrain import CheckpointError, Interrupted, RecipeError, atomic_save, make_checkpoint

FOLDER = "checkpoints"


def keep_previous(path: Path) -> None:
    """Hard-link ``path`` to ``previous.pt`` before it is replaced: atomic, costs no copy. Where hard links are
    not supported the previous file is simply not kept."""
    if not path.is_file():
        return
    link = path.with_name(".previous.pt.link")
    with contextlib.suppress(OSError):
        if link.exists():
            link.unlink()
        os.link(path, link)
        os.replace(link, path.with_name("previous.pt"))


def checkpoint_bytes(state) -> int:
    """About what one checkpoint takes: the model, up to twice its size of optimizer state, and slack."""
    model = sum(t.numel() * t.element_size() for t in state.unwrapped_model.state_dict().values())
    return 3 * model + (1 << 20)


class Checkpointing:
    def __init__(self, *, keep_best: bool = True, every_steps: int = 0, keep_previous: bool = True):
        self.keep_best = keep_best
        self.every_steps = every_steps
        self.keep_previous = keep_previous
        self.started = False  # before_fit ran: the state is one a checkpoint may capture
        self.best = float("-inf")

    def folder(self, state) -> Path:
        return state.run_dir / FOLDER

    def save_last(self, state, checkpoint: dict) -> None:
        path = self.folder(state) / "last.pt"
        if self.keep_previous:
            keep_previous(path)
        atomic_save(checkpoint, path)

    @microtrain.hookimpl
    def before_fit(self, state):
        """Fail before training when the run dir cannot hold the checkpoints; drop temporary files a kill left."""
        self.started = True
        self.best = max((row["test_acc"] for row in state.history), default=float("-inf"))
        if not state.is_main:
            return
        folder = self.folder(state)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".*.tmp"):  # a checkpoint write that was killed half-way
            with contextlib.suppress(OSError):
                stale.unlink()
        need = (3 if self.keep_best else 2) * checkpoint_bytes(state)
        free = shutil.disk_usage(folder).free
        if free < need:
            raise CheckpointError(f"'{folder}' has {free / 2**20:.1f} MiB free but the checkpoints need about "
                                  f"{need / 2**20:.1f} MiB; free space or pass --run-dir on another disk")

    @microtrain.hookimpl(trylast=True)
    def after_batch(self, state):
        """Last of all after_batch hooks, so plugins that update there (EMA) are saved after their update."""
        if (not state.is_main or not self.every_steps or state.step % self.every_steps
                or state.batch_index >= state.steps_per_epoch):  # the epoch's end writes one anyway
            return
        self.save_last(state, make_checkpoint(state, mid_epoch=True))

    @microtrain.hookimpl(trylast=True)
    def after_epoch(self, state):
        """best.pt before last.pt: a kill between the two repeats this epoch, which rewrites best.pt."""
        if not state.is_main:
            return
        checkpoint = make_checkpoint(state)
        if self.keep_best and state.metrics["test_acc"] > self.best:
            self.best = state.metrics["test_acc"]
            atomic_save(checkpoint, self.folder(state) / "best.pt")
        self.save_last(state, checkpoint)

    @microtrain.hookimpl
    def on_error(self, state, error):
        """On Ctrl-C/SIGTERM/SIGHUP the engine stopped at a consistent point: save it. Other errors (a NaN loss, a plugin
        that raised, a second Ctrl-C that abandoned a step) keep the last good checkpoint untouched."""
        if isinstance(error, Interrupted) and error.mid_epoch and state.is_main and self.started:
            self.save_last(state, make_checkpoint(state, mid_epoch=True))  # (epoch ends: after_epoch wrote it)


def build_checkpoint(*, keep_best: bool = True, every_steps: int = 0, keep_previous: bool = True) -> Checkpointing:
    """Atomic checkpoints: last.pt every epoch (and every every_steps steps), best.pt on a new best test accuracy."""
    if every_steps < 0:
        raise RecipeError(f"plugins.checkpoint.every_steps must be 0 (only at epoch ends) or more, got {every_steps}")
    return Checkpointing(keep_best=keep_best, every_steps=every_steps, keep_previous=keep_previous)


@microtrain.hookimpl
def register_components(registry):
    registry.callback("checkpoint", build_checkpoint)
