"""Callback ``progress``: a rich progress bar per epoch on a terminal; one line per epoch otherwise.

Output is never worth a run: when no one reads it any more (``microtrain run ... | head -2`` closed the
pipe, a closed terminal), the display goes quiet and training goes on."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Annotated

import torch

import microtrain
from microtrain import Range


class LossReader:
    """The running loss for display, read without making the host wait for the GPU.

    On a CPU the loss is a host value: read it. On CUDA a read would wait for every queued step, so each refresh
    starts a non-blocking copy into pinned memory and shows the newest copy that has already arrived (at most a
    refresh or two old)."""

    def __init__(self) -> None:
        self.shown: float | None = None
        self._host: torch.Tensor | None = None
        self._arrived: torch.cuda.Event | None = None

    def read(self, loss: torch.Tensor) -> float | None:
        if loss.device.type != "cuda":
            return float(loss)
        if self._arrived is not None and self._arrived.query():
            self.shown = float(self._host)
        if self._host is None:
            self._host = torch.empty((), dtype=loss.dtype, pin_memory=True)
        self._host.copy_(loss.detach(), non_blocking=True)
        self._arrived = torch.cuda.Event()
        self._arrived.record()
        return self.shown


class Progress:
    def __init__(self, *, refresh_steps: int = 20, force_lines: bool = False):
        self.refresh_steps = refresh_steps
        self.force_lines = force_lines
        self._progress = None
        self._task = None
        self._loss = LossReader()

    @property
    def interactive(self) -> bool:
        return sys.stdout.isatty() and not self.force_lines

    @microtrain.hookimpl
    def before_fit(self, state):
        if not state.is_main:
            return
        self.console = _console()
        params = sum(p.numel() for p in state.unwrapped_model.parameters())
        self._print(
            f"[bold]{state.recipe['name']}[/]: {state.recipe['model']['name']} ({params:,} parameters) on "
            f"{state.device}, {state.epochs} epochs of {state.steps_per_epoch} steps, run dir {state.run_dir}"
        )

    @microtrain.hookimpl
    def before_epoch(self, state):
        if not state.is_main or not self.interactive:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn(f"epoch {state.epoch}/{state.epochs}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console,
                                  transient=True)
        self._progress.start()
        self._task = self._progress.add_task("train", total=state.steps_per_epoch, info="")

    @microtrain.hookimpl
    def after_batch(self, state):
        if self._progress is None or state.batch_index % self.refresh_steps:
            return
        loss = self._loss.read(state.loss)
        self._progress.update(self._task, completed=state.batch_index, info="" if loss is None else f"loss {loss:.3f}")

    @microtrain.hookimpl
    def after_epoch(self, state):
        if not state.is_main:
            return
        self._stop()
        m = state.metrics
        self._print(
            f"epoch {m['epoch']:>3}/{state.epochs}  lr {m['lr']:.4f}  train loss {m['train_loss']:.4f} acc "
            f"{m['train_acc']:.2f}%  " + (f"val loss {m['val_loss']:.4f} acc {m['val_acc']:.2f}%  " if "val_acc" in m else "")
            + (f"test loss {m['test_loss']:.4f} acc {m['test_acc']:.2f}%  " if "test_acc" in m else "")
            + f"{m['epoch_seconds']:.1f}s {m['train_images_per_second']:.0f} img/s"
        )

    @microtrain.hookimpl
    def on_error(self, state, error):
        self._stop()

    def _print(self, text: str) -> None:
        try:
            self.console.print(text, highlight=False)
        except OSError:  # a terminal that went away (EIO): rich handles only a broken pipe itself
            self.console.quiet = True

    def _stop(self):
        if self._progress is not None:
            with contextlib.suppress(OSError):
                self._progress.stop()
            self._progress = None


def _console():
    """A rich Console that goes quiet on a broken pipe; rich's own reaction is to exit, which would end the run."""
    from rich.console import Console

    class QuietOnBrokenPipe(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            with contextlib.suppress(OSError, ValueError, AttributeError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                try:
                    os.dup2(devnull, self.file.fileno())  # so the interpreter's last flush does not fail either
                finally:
                    os.close(devnull)

    return QuietOnBrokenPipe()


def build_progress(*, refresh_steps: Annotated[int, Range(ge=1)] = 20, force_lines: bool = False) -> Progress:
    """Progress bar with the running loss on a terminal, one line per epoch in logs."""
    return Progress(refresh_steps=refresh_steps, force_lines=force_lines)


@microtrain.hookimpl
def register_components(registry):
    registry.callback("progress", build_progress)
