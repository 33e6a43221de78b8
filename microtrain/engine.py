"""The training engine: builds the picked components, then runs the loop and calls the hooks.

    before_fit, [before_epoch, [before_batch, step, after_batch]*, before_eval, on_eval, after_epoch]*, after_fit

The step itself (forward, loss, backward, optimizer and schedule step) is plain PyTorch with no
per-step host synchronisation apart from the NaN check, so the loop runs as fast as a
hand-written one.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pluggy
import torch
import torch.nn.functional as F

from microtrain import distributed
from microtrain.components import Registry
from microtrain.errors import MicrotrainError, TrainingStopped
from microtrain.plugin_manager import call_hook, register_callback, register_module
from microtrain.state import LoaderContext, State


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", distributed.local_rank())
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MicrotrainError(f"device '{name}' requested but CUDA is not available here; use device=cpu or device=auto")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MicrotrainError(f"device: '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", distributed.local_rank())
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_threads(threads: int, world_size: int) -> None:
    """0 means every core, shared out between the processes of a distributed run on one host."""
    if threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        threads = max(1, cores // max(1, local))
    torch.set_num_threads(threads)


def build_state(recipe: dict[str, Any], run_dir: Path, pm: pluggy.PluginManager, registry: Registry) -> State:
    """Everything a run needs, built from a resolved recipe."""
    rank, world_size = distributed.rank(), distributed.world_size()
    configure_threads(recipe["threads"], world_size)
    device = pick_device(recipe["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if recipe["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = True
    seed_everything(recipe["seed"])

    data_cfg = dict(recipe["data"])
    data = registry.get("data", data_cfg.pop("name"), "data.name").build(options=data_cfg)

    loader_cfg = dict(recipe["loader"])
    loader_component = registry.get("loader", loader_cfg.pop("name"), "loader.name")

    def make_loader(train: bool):
        images, labels = data.split(train)
        ctx = LoaderContext(images=images, labels=labels, train=train, device=device, seed=recipe["seed"],
                            mean=data.mean, std=data.std, rank=rank, world_size=world_size,
                            channels_last=recipe["channels_last"])
        return loader_component.build(ctx, options=loader_cfg)

    train_loader, test_loader = make_loader(True), make_loader(False)

    model_cfg = dict(recipe["model"])
    model = registry.get("model", model_cfg.pop("name"), "model.name").build(data.num_classes, data.image_shape, options=model_cfg)
    model = model.to(device)
    if recipe["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if world_size > 1:
        model = distributed.wrap_model(model, device, recipe["sync_batchnorm"])

    opt_cfg = dict(recipe["optimizer"])
    optimizer = registry.get("optimizer", opt_cfg.pop("name"), "optimizer.name").build(model, options=opt_cfg)

    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise MicrotrainError("the training loader yields no batch: the dataset is smaller than loader.batch_size; lower it")
    sched_cfg = dict(recipe["schedule"])
    scheduler = registry.get("schedule", sched_cfg.pop("name"), "schedule.name").build(
        optimizer, recipe["epochs"] * steps_per_epoch, steps_per_epoch, options=sched_cfg
    )

    state = State(recipe=recipe, run_dir=run_dir, device=device, data=data, model=model, optimizer=optimizer,
                  scheduler=scheduler, train_loader=train_loader, test_loader=test_loader, epochs=recipe["epochs"],
                  rank=rank, world_size=world_size, steps_per_epoch=steps_per_epoch)
    if recipe["compile"]:
        state.model = torch.compile(model)
    state.eval_model = state.model
    return state


def enable_plugins(recipe: dict[str, Any], pm: pluggy.PluginManager, registry: Registry) -> None:
    """Instantiate the callbacks the recipe lists and register recipe-named plugin modules."""
    for entry in recipe["plugins"]:
        if isinstance(entry, dict):
            (name, options), = entry.items()
            register_callback(pm, registry.get("callback", name, "plugins").build(options=options), name)
        elif registry.has("callback", entry):
            component = registry.get("callback", entry, "plugins")
            register_callback(pm, component.build(options=component.validate({}, f"plugins.{entry}")), entry)
        else:
            register_module(pm, entry)


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal (Ctrl-C, SIGTERM), raised where the state is consistent: after a training
    step (``mid_epoch``: a checkpoint resumes at the next batch) or after an epoch's hooks."""

    def __init__(self, signum: int, mid_epoch: bool):
        super().__init__(f"signal {signum}")
        self.signum, self.mid_epoch = signum, mid_epoch


class Engine:
    """Runs the loop over a built ``State`` and calls the hooks of ``pm``."""

    def __init__(self, state: State, pm: pluggy.PluginManager):
        self.state = state
        self.pm = pm
        recipe = state.recipe
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[recipe["precision"]]
        self.scaler = torch.amp.GradScaler(state.device.type, enabled=self.autocast_dtype is torch.float16
                                           and state.device.type == "cuda")
        state.extras["grad_scaler"] = self.scaler
        state.extras["plugin_manager"] = pm
        self.label_smoothing = recipe["label_smoothing"]
        self.grad_clip = recipe["grad_clip"]
        self.channels_last = recipe["channels_last"]
        self.stop_signal: int | None = None

    def hook(self, name: str, **kwargs: Any) -> Any:
        return call_hook(self.pm, name, state=self.state, **kwargs)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.state.device.type, dtype=self.autocast_dtype)

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
            state.metrics.update(self.evaluate(state.eval_model or state.model))
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

    @torch.inference_mode()
    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        """Loss, accuracy, per-class accuracy and confusion matrix on the test split (all ranks)."""
        state = self.state
        distributed.broadcast_buffers(model)  # every rank evaluates rank 0's model, the one it checkpoints
        classes = state.data.classes
        num_classes = len(classes)
        device = state.device
        was_training = model.training
        model.eval()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
        for images, labels in state.test_loader:
            with self.autocast():
                logits = self.hook("predict", model=model, images=images)
                if logits is None:
                    logits = model(images)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
        model.train(was_training)
        loss_sum = distributed.all_reduce_sum(loss_sum)
        confusion = distributed.all_reduce_sum(confusion).view(num_classes, num_classes).cpu()
        total = int(confusion.sum())
        per_class_total = confusion.sum(1)
        per_class_acc = {
            name: (100.0 * int(confusion[i, i]) / int(per_class_total[i])) if int(per_class_total[i]) else math.nan
            for i, name in enumerate(classes)
        }
        return {
            "test_loss": float(loss_sum) / max(total, 1),
            "test_acc": 100.0 * int(confusion.diag().sum()) / max(total, 1),
            "per_class_acc": per_class_acc,
            "confusion": confusion.tolist(),
        }
