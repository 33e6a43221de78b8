"""Callback ``checkpoint``: the files that let a run survive a kill, a signal or a crash.

    <run dir>/checkpoints/last.pt      after every epoch, every ``every_steps`` steps if asked, and on Ctrl-C/SIGTERM/SIGHUP
    <run dir>/checkpoints/previous.pt  the last.pt before the newest one (a second chance if last.pt is damaged)
    <run dir>/checkpoints/best.pt      the best epoch by ``monitor`` (``keep_best``); best.json says which epoch,
                                       on which metric, and whether that was the validation or the test split

``monitor: auto`` is ``val_acc`` when the recipe holds out a validation split (``val_fraction``) and
``test_acc`` otherwise; then best.pt was picked by looking at the test split, and best.json says so.

Every file is written atomically (temporary file in the same folder, fsync, rename), so a kill at any
byte leaves the old file or the new one, never a partial one. A mid-epoch checkpoint records the batch
it stopped after; ``microtrain run RECIPE --resume RUN_DIR`` continues at the next batch with the same
samples, augmentation and random state, and logs exactly the figures an uninterrupted run logs.
``microtrain report`` reloads the final model from last.pt.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Annotated, Literal

import microtrain
from microtrain import CheckpointError, Interrupted, Range, RecipeError, atomic_save, make_checkpoint

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
    def __init__(self, *, keep_best: bool = True, every_steps: int = 0, keep_previous: bool = True, monitor: str = "auto"):
        self.keep_best = keep_best
        self.monitor = monitor
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
        if self.monitor == "auto":
            self.monitor = "val_acc" if state.val_loader is not None else "test_acc"
        elif self.monitor.startswith("val_") and state.val_loader is None:
            raise RecipeError(f"plugins.checkpoint.monitor: '{self.monitor}' needs a validation split; set val_fraction "
                              "(e.g. val_fraction=0.1) or monitor a test metric")
        self.best = max((self._score(row) for row in state.history if self.monitor in row), default=float("-inf"))
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
        if self.keep_best and self.monitor in state.metrics and self._score(state.metrics) > self.best:  # (evaluated)
            self.best = self._score(state.metrics)
            atomic_save(checkpoint, self.folder(state) / "best.pt")
            split = "validation split" if self.monitor.startswith("val_") else "test split"
            chosen = {"epoch": state.epoch, "monitor": self.monitor, "value": state.metrics[self.monitor], "split": split}
            write_json_atomically(self.folder(state) / "best.json", chosen)
        self.save_last(state, checkpoint)

    def _score(self, metrics: dict) -> float:
        """Higher is better: accuracies as they are, losses negated."""
        value = float(metrics[self.monitor])
        return -value if self.monitor.endswith("_loss") else value

    @microtrain.hookimpl
    def on_error(self, state, error):
        """On Ctrl-C/SIGTERM/SIGHUP the engine stopped at a consistent point: save it. Other errors (a NaN loss, a plugin
        that raised, a second Ctrl-C that abandoned a step) keep the last good checkpoint untouched."""
        if isinstance(error, Interrupted) and error.mid_epoch and state.is_main and self.started:
            self.save_last(state, make_checkpoint(state, mid_epoch=True))  # (epoch ends: after_epoch wrote it)


def write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


def build_checkpoint(*, keep_best: bool = True, every_steps: Annotated[int, Range(ge=0)] = 0, keep_previous: bool = True,
                     monitor: Literal["auto", "val_acc", "val_loss", "test_acc", "test_loss"] = "auto") -> Checkpointing:
    """Atomic checkpoints: last.pt every epoch (and every every_steps steps, 0: only at epoch ends), best.pt on a new
    best of monitor (auto: val_acc with a validation split, else test_acc)."""
    return Checkpointing(keep_best=keep_best, every_steps=every_steps, keep_previous=keep_previous, monitor=monitor)


@microtrain.hookimpl
def register_components(registry):
    registry.callback("checkpoint", build_checkpoint)
