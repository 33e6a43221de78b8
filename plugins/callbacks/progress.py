"""Callback ``progress``: a rich progress bar per epoch on a terminal; one line per epoch otherwise."""

from __future__ import annotations

import sys

import microtrain


class Progress:
    def __init__(self, *, refresh_steps: int = 20, force_lines: bool = False):
        self.refresh_steps = max(1, refresh_steps)
        self.force_lines = force_lines
        self._progress = None
        self._task = None

    @property
    def interactive(self) -> bool:
        return sys.stdout.isatty() and not self.force_lines

    @microtrain.hookimpl
    def before_fit(self, state):
        if not state.is_main:
            return
        from rich.console import Console

        self.console = Console()
        params = sum(p.numel() for p in state.unwrapped_model.parameters())
        self.console.print(
            f"[bold]{state.recipe['name']}[/]: {state.recipe['model']['name']} ({params:,} parameters) on "
            f"{state.device}, {state.epochs} epochs of {state.steps_per_epoch} steps, run dir {state.run_dir}",
            highlight=False,
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
        self._progress.update(self._task, completed=state.batch_index, info=f"loss {state.loss.item():.3f}")

    @microtrain.hookimpl
    def after_epoch(self, state):
        if not state.is_main:
            return
        self._stop()
        m = state.metrics
        self.console.print(
            f"epoch {m['epoch']:>3}/{state.epochs}  lr {m['lr']:.4f}  train loss {m['train_loss']:.4f} acc "
            f"{m['train_acc']:.2f}%  test loss {m['test_loss']:.4f} acc {m['test_acc']:.2f}%  "
            f"{m['epoch_seconds']:.1f}s {m['train_images_per_second']:.0f} img/s",
            highlight=False,
        )

    @microtrain.hookimpl
    def on_error(self, state, error):
        self._stop()

    def _stop(self):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def build_progress(*, refresh_steps: int = 20, force_lines: bool = False) -> Progress:
    """Progress bar with the running loss on a terminal, one line per epoch in logs."""
    return Progress(refresh_steps=refresh_steps, force_lines=force_lines)


@microtrain.hookimpl
def register_components(registry):
    registry.callback("progress", build_progress)
