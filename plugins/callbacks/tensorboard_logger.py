"""Callback ``tensorboard``: the run's scalars and pictures as TensorBoard events in
``<run dir>/tensorboard/``, so ``tensorboard --logdir runs`` shows every run.

Logged against the global step: the loss and learning rate every ``every_steps`` steps (reading
the loss synchronises the device, hence not every step), and at each epoch's end train/val/test
loss and accuracy, the learning rate, images/s and per-class accuracy; the confusion matrix as
an image every epoch, and the most confidently wrong test images at the end (one pass of the
evaluation model over rank 0's share of the test split, through the engine's evaluation loop). Needs the ``tensorboard``
package (``pip install 'microtrain[tensorboard]'``); asking for it without is one clear error.
"""

from __future__ import annotations

from typing import Annotated

import microtrain
from microtrain import MicrotrainError, Range


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch.utils.tensorboard imports the tensorboard package
        raise MicrotrainError(
            f"plugins: 'tensorboard' needs the tensorboard package, which is not installed ({exc}); "
            "run pip install 'microtrain[tensorboard]' or remove tensorboard from the recipe's plugins"
        ) from None
    return SummaryWriter


EPOCH_SCALARS = (("train_loss", "loss/train"), ("val_loss", "loss/val"), ("test_loss", "loss/test"),
                 ("train_acc", "accuracy/train"), ("val_acc", "accuracy/val"), ("test_acc", "accuracy/test"),
                 ("lr", "epoch/lr"), ("train_images_per_second", "epoch/images_per_second"))


class TensorBoardLogger:
    def __init__(self, writer_class, *, every_steps: int, images: bool, mistakes: int):
        self.writer_class = writer_class
        self.every_steps = every_steps
        self.images = images
        self.mistakes = mistakes
        self.writer = None

    @microtrain.hookimpl
    def before_fit(self, state):
        if not state.is_main:
            return
        # purge_step drops events an interrupted session wrote after the checkpoint we resume from
        self.writer = self.writer_class(log_dir=str(state.run_dir / "tensorboard"),
                                        purge_step=state.step + 1 if state.step else None)
        if not state.step:
            self.writer.add_text("recipe", "```yaml\n" + microtrain.dump_recipe(state.recipe) + "\n```", 0)

    @microtrain.hookimpl
    def after_batch(self, state):
        if self.writer is None or self.every_steps <= 0 or state.step % self.every_steps:
            return
        self.writer.add_scalar("step/loss", state.loss.item(), state.step)
        self.writer.add_scalar("step/lr", state.optimizer.param_groups[0]["lr"], state.step)

    @microtrain.hookimpl
    def after_epoch(self, state):
        if self.writer is None:
            return
        m, step = state.metrics, state.step
        for key, tag in EPOCH_SCALARS:
            if isinstance(m.get(key), (int, float)):
                self.writer.add_scalar(tag, m[key], step)
        self.writer.add_scalar("epoch/epoch", state.epoch, step)
        for key, group in (("per_class_acc", "per_class"), ("val_per_class_acc", "val_per_class")):
            for name, value in (m.get(key) or {}).items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{group}/{name}", value, step)
        if self.images and m.get("confusion") is not None:
            from microtrain_plugins.callbacks.report import confusion_figure, figure_rgb

            fig = confusion_figure(m["confusion"], state.data.classes, f"confusion matrix, epoch {state.epoch}")
            self.writer.add_image("confusion", figure_rgb(fig), step, dataformats="HWC")
        self.writer.flush()

    @microtrain.hookimpl
    def after_fit(self, state):
        if self.writer is None:
            return
        try:
            if self.images and self.mistakes > 0:
                self._log_mistakes(state)
        finally:
            self._close()

    def _log_mistakes(self, state) -> None:
        from microtrain_plugins.callbacks import report

        classes = state.data.classes
        collector = report.MistakeCollector(self.mistakes, state.data.mean, state.data.std)
        microtrain.evaluate(state, state.unwrapped_eval_model, collect=collector, all_ranks=False)
        found = collector.found
        count = min(self.mistakes, len(found.images))
        titles = [f"{classes[t]} -> {classes[p]} ({c:.2f})"
                  for t, p, c in zip(found.true[:count], found.predicted[:count], found.confidence[:count], strict=True)]
        fig = report.grid_figure("misclassified", found.images[:count], titles, "most confidently wrong test images")
        self.writer.add_image("misclassified", report.figure_rgb(fig), state.step, dataformats="HWC")

    @microtrain.hookimpl
    def on_error(self, state, error):  # noqa: ARG002 - the hook's signature
        self._close()

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


def build_tensorboard(*, every_steps: Annotated[int, Range(ge=0)] = 50, images: bool = True,
                      mistakes: Annotated[int, Range(ge=0, le=256)] = 24) -> TensorBoardLogger:
    """TensorBoard events in <run dir>/tensorboard: scalars per step (every_steps; 0: per epoch only) and epoch,
    confusion and the most confident mistakes as images (one grid cell each, hence the bound)."""
    return TensorBoardLogger(_summary_writer_class(), every_steps=every_steps, images=images, mistakes=mistakes)


@microtrain.hookimpl
def register_components(registry):
    registry.callback("tensorboard", build_tensorboard)
