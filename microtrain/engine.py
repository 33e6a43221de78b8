"""The training engine: the loop over a built ``State`` (see microtrain.assembly), and the one
evaluation loop every pass over a split goes through (per-epoch test metrics, reports, TensorBoard,
benchmarks).

    before_fit, [before_epoch, [before_batch, step, after_batch]*, (before_eval, on_eval), after_epoch]*, after_fit

(before_eval and on_eval come after every ``eval_every``-th epoch and the last; every epoch by default.)

The step itself (forward, loss, backward, optimizer and schedule step) is plain PyTorch with no
per-step host synchronisation, so the loop runs as fast as a hand-written one: on a GPU the host
queues steps ahead of the device. The non-finite loss check therefore stays on the device (a
running count of finite steps beside the epoch's loss sum) and the host reads it only every
``Engine.non_finite_check_steps`` steps, at the epoch's end, before a checkpoint and before a
signal's stop; the run still stops within that many steps and names the step that went bad.
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

# Steps between two host reads of the non-finite check on a GPU. Each read drains the GPU's queue of steps, and
# a launch-bound small model then idles while the host refills it: paid once in 50 steps, not at every step.
# A non-finite loss wastes at most 50 steps before the run stops.
CUDA_NON_FINITE_CHECK_STEPS = 50

FINITE_BATCHES = "finite_batches"
"""Key of ``State.epoch_totals``: batches of the epoch, from its first, before the first non-finite loss (a
device tensor the engine updates in place; checkpoints leave it out)."""

Collector = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
"""Called by :func:`evaluate` for every batch with ``(images, labels, logits)`` (logits float32, on the device)."""


def raise_if_not_finite(state: State, totals: dict[str, Any] | None = None) -> None:
    """Raise :class:`TrainingStopped` naming the step whose loss first went non-finite, if one did in the epoch
    in progress (``totals``, default ``state.epoch_totals``). One host read: call it only where a sync is due."""
    totals = state.epoch_totals if totals is None else totals
    if "loss_sum" not in totals:
        return
    finite = totals.get(FINITE_BATCHES)
    read = [totals["loss_sum"]] if finite is None else [totals["loss_sum"], finite]
    loss_sum, *finite_count = torch.stack([t.double() for t in read]).tolist()
    if math.isfinite(loss_sum):
        return
    bad_batch = int(finite_count[0]) + 1 if finite_count else state.batch_index
    global_step = state.step - (state.batch_index - bad_batch)
    raise TrainingStopped(
        f"loss is {loss_sum} at epoch {state.epoch}, step {bad_batch} (global step {global_step}); "
        "lower the learning rate or use precision=fp32; the last checkpoint is kept"
    )


def non_finite_check_steps(device: torch.device) -> int:
    """Steps between two host reads of the non-finite check. On a CPU a read costs nothing (no device queue to
    drain), so every step, as soon as it happens."""
    return CUDA_NON_FINITE_CHECK_STEPS if device.type == "cuda" else 1


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
    Keys are ``{prefix}_loss``, ``{prefix}_acc``, ``per_class_acc`` and ``confusion`` (rows: true class); for another
    prefix than ``test`` the last two are ``{prefix}_per_class_acc`` and ``{prefix}_confusion``."""
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
    detail = "" if prefix == "test" else f"{prefix}_"  # the test split's keys are per_class_acc and confusion
    return {
        f"{prefix}_loss": float(loss_sum) / max(total, 1),
        f"{prefix}_acc": 100.0 * int(confusion.diag().sum()) / max(total, 1),
        f"{detail}per_class_acc": per_class_acc,
        f"{detail}confusion": confusion.tolist(),
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
        self.non_finite_check_steps = non_finite_check_steps(state.device)

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
            if mid_epoch:  # the stop saves a checkpoint of this step: never one of a non-finite step
                raise_if_not_finite(self.state)
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
            if state.evaluates(epoch):
                self.evaluate_epoch()
            state.history.append(state.metrics)
            self.hook("after_epoch")
            self._stop_if_requested(mid_epoch=False)
            if distributed.any_rank_true(state.stop_training, state.device):  # every rank joins the vote
                break
        state.status = "completed"
        self.hook("after_fit")
        return state

    def evaluate_epoch(self) -> None:
        """Add the test (and validation) figures of the model the run evaluates to ``state.metrics``."""
        state = self.state
        self.hook("before_eval")
        model = state.eval_model if state.eval_model is not None else state.model  # no bool(): compiled modules raise
        state.metrics.update(evaluate(state, model))
        if state.val_loader is not None:
            state.metrics.update(evaluate(state, model, loader=state.val_loader, prefix="val"))
        self.hook("on_eval")

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
        if FINITE_BATCHES not in totals:  # a new epoch, or a resumed one: checkpoints hold only finite steps
            totals[FINITE_BATCHES] = torch.full((), state.batch_index, device=device, dtype=torch.int64)
        # updated in place: checkpoints read them
        loss_sum, correct, finite_batches = totals["loss_sum"], totals["correct"], totals[FINITE_BATCHES]
        seen_before = totals["seen"]
        check_steps = self.non_finite_check_steps
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
            # A loss is never negative, so a nan or inf stays in the sum: it counts the steps before the first one.
            finite_batches += torch.isfinite(loss_sum)
            # Soft labels (mixup, cutmix) count as their strongest class.
            hard_labels = labels if labels.dim() == 1 else labels.argmax(1)
            correct += (logits.detach().argmax(1) == hard_labels).sum()
            state.loss = loss.detach()
            if state.batch_index % check_steps == 0:
                raise_if_not_finite(state)
            self.hook("after_batch")
            self._stop_if_requested(mid_epoch=True)
        raise_if_not_finite(state)
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

