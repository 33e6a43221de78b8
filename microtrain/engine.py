"""The training engine: the loop over a built ``State`` (see microtrain.assembly), and the one
evaluation loop every pass over a split goes through (per-epoch test metrics, reports, TensorBoard,
benchmarks).

    before_fit, [before_epoch, [before_batch, step, after_batch]*, before_eval, on_eval, after_epoch]*, after_fit

The step itself (forward, loss, backward, optimizer and schedule step) is plain PyTorch with no
per-step host synchronisation apart from the NaN check, so the loop runs as fast as a
hand-written one.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from microtrain import distributed
from microtrain.errors import Interrupted, TrainingStopped
from microtrain.plugin_manager import call_hook
from microtrain.state import State

PRECISION_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

Collector = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
"""Called by :func:`evaluate` for every batch with ``(images, labels, logits)`` (logits float32, on the device)."""


def autocast(device: torch.device, precision: str):
    """The forward pass's autocast context for a recipe's ``precision``."""
    dtype = PRECISION_DTYPES[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@torch.inference_mode()
def evaluate(state: State, model: torch.nn.Module, *, loader: Iterable | None = None, prefix: str = "test",
             collect: Collector | None = None, all_ranks: bool = True) -> dict[str, Any]:
    """Loss, accuracy, per-class accuracy and confusion matrix of ``model`` over ``loader`` (the test split by
    default), with the recipe's precision and the ``predict`` hook (test-time augmentation) as in training.

    ``collect`` sees every batch's logits (the report keeps the most confident mistakes with it). With
    ``all_ranks`` every rank evaluates rank 0's model on its shard and the figures are summed over ranks; a
    pass run on one rank only (``all_ranks=False``) covers that rank's shard and makes no collective call.
    Keys are ``{prefix}_loss``, ``{prefix}_acc``, ``per_class_acc`` and ``confusion`` (rows: true class)."""
    loader = state.test_loader if loader is None else loader
    if all_ranks:
        distributed.broadcast_buffers(model)  # every rank evaluates rank 0's model, the one it checkpoints
    classes = state.data.classes
    num_classes = len(classes)
    device = state.device
    pm = state.plugin_manager
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    try:
        for images, labels in loader:
            with autocast(device, state.recipe["precision"]):
                logits = call_hook(pm, "predict", state=state, model=model, images=images) if pm is not None else None
                if logits is None:
                    logits = model(images)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
            if collect is not None:
                collect(images, labels, logits)
    finally:
        model.train(was_training)
    if all_ranks:
        loss_sum = distributed.all_reduce_sum(loss_sum)
        confusion = distributed.all_reduce_sum(confusion)
    confusion = confusion.view(num_classes, num_classes).cpu()
    total = int(confusion.sum())
    per_class_total = confusion.sum(1)
    per_class_acc = {
        name: (100.0 * int(confusion[i, i]) / int(per_class_total[i])) if int(per_class_total[i]) else math.nan
        for i, name in enumerate(classes)
    }
    return {
        f"{prefix}_loss": float(loss_sum) / max(total, 1),
        f"{prefix}_acc": 100.0 * int(confusion.diag().sum()) / max(total, 1),
        "per_class_acc": per_class_acc,
        "confusion": confusion.tolist(),
    }


class Engine:
    """Runs the loop over a built ``State`` (microtrain.build_run makes one) and calls the hooks of its
    plugin manager."""

    def __init__(self, state: State):
        if state.plugin_manager is None or state.grad_scaler is None:
            raise ValueError("the state has no plugin manager or grad scaler: build it with microtrain.build_run")
        self.state = state
        self.pm = state.plugin_manager
        self.scaler = state.grad_scaler
        recipe = state.recipe
        self.label_smoothing = recipe["label_smoothing"]
        self.grad_clip = recipe["grad_clip"]
        self.channels_last = recipe["channels_last"]
        self.stop_signal: int | None = None

    def hook(self, name: str, **kwargs: Any) -> Any:
        return call_hook(self.pm, name, state=self.state, **kwargs)

    def autocast(self):
        return autocast(self.state.device, self.state.recipe["precision"])

    def evaluate(self, model: torch.nn.Module, **options: Any) -> dict[str, Any]:
        """:func:`evaluate` on this engine's state."""
        return evaluate(self.state, model, **options)

    def request_stop(self, signum: int) -> None:
        """Ask the loop to stop at the next point a checkpoint can capture (a signal handler calls this)."""
        self.stop_signal = signum

    def _stop_if_requested(self, mid_epoch: bool) -> None:
        if self.stop_signal is not None:
            raise Interrupted(self.stop_signal, mid_epoch)

    def fit(self) -> State:
        state = self.state
        self.hook("before_fit")
        for epoch in range(state.start_epoch, state.epochs + 1):
            state.epoch = epoch
            state.batch_index, state.start_batch = state.start_batch, 0  # non-zero only after a mid-epoch resume
            if state.batch_index:
                state.train_loader.set_epoch(epoch, state.batch_index)
            else:
                state.train_loader.set_epoch(epoch)
            self.hook("before_epoch")
            train_metrics = self.train_epoch()
            state.metrics = {"epoch": epoch, **train_metrics}
            self.hook("before_eval")
            state.metrics.update(evaluate(state, state.eval_model or state.model))
            self.hook("on_eval")
            state.history.append(state.metrics)
            self.hook("after_epoch")
            self._stop_if_requested(mid_epoch=False)
            if distributed.any_rank_true(state.stop_training, state.device):  # every rank joins the vote
                break
        state.status = "completed"
        self.hook("after_fit")
        return state

    def train_epoch(self) -> dict[str, Any]:
        """Train from batch ``state.batch_index`` to the end of the epoch. After a mid-epoch resume that index is
        non-zero and ``state.epoch_totals`` holds the restored sums of the batches before it, so the epoch's
        figures equal those of an uninterrupted run."""
        state = self.state
        model, optimizer, scheduler = state.model, state.optimizer, state.scheduler
        model.train()
        device = state.device
        if state.batch_index == 0:
            state.epoch_totals = {"loss_sum": torch.zeros((), device=device, dtype=torch.float64),
                                  "correct": torch.zeros((), device=device, dtype=torch.int64), "seen": 0,
                                  "lr": optimizer.param_groups[0]["lr"]}
        totals = state.epoch_totals
        loss_sum, correct = totals["loss_sum"], totals["correct"]  # updated in place: checkpoints read them
        seen_before = totals["seen"]
        start = time.perf_counter()
        for images, labels in state.train_loader:
            state.batch_index += 1
            state.step += 1
            state.batch = (images, labels)
            self.hook("before_batch")
            images, labels = state.batch
            totals["lr"] = optimizer.param_groups[0]["lr"]
            with self.autocast():
                logits = model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
            if not torch.isfinite(loss):
                raise TrainingStopped(
                    f"loss is {loss.item()} at epoch {state.epoch}, step {state.batch_index} (global step {state.step}); "
                    "lower the learning rate or use precision=fp32; the last checkpoint is kept"
                )
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.grad_clip:
                self.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
            self.scaler.step(optimizer)
            self.scaler.update()
            scheduler.step()
            batch = labels.shape[0]
            totals["seen"] += batch
            loss_sum += loss.detach() * batch
            if labels.dim() == 1:
                correct += (logits.detach().argmax(1) == labels).sum()
            state.loss = loss.detach()
            self.hook("after_batch")
            self._stop_if_requested(mid_epoch=True)
        seconds = time.perf_counter() - start
        counts = torch.tensor([totals["seen"], totals["seen"] - seen_before], device=device, dtype=torch.float64)
        totals_all = distributed.all_reduce_sum(torch.cat([torch.stack([loss_sum, correct.double()]), counts]))
        loss_total, correct_total, seen_total, trained_now = totals_all.tolist()
        return {
            "lr": totals["lr"],
            "train_loss": loss_total / max(seen_total, 1),
            "train_acc": 100.0 * correct_total / max(seen_total, 1),
            "epoch_seconds": seconds,
            "train_images_per_second": trained_now / seconds if seconds > 0 else math.nan,
        }
