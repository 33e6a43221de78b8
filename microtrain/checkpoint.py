"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` only.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts:
    format, epoch, batch_index, epoch_totals, step, model, optimizer, scheduler, grad_scaler, history, rng,
    recipe_hash, classes, data, plugins
``data`` records what a model needs to see its inputs as in training (``mean``, ``std``, ``image_shape``) and the
training split's ``train_size`` (so a stand-in dataset gives the run's epoch length), so microtrain.load_run rebuilds
a run's model without its dataset; checkpoints written before it have none.
``epoch`` is the last finished epoch. A mid-epoch checkpoint also has ``batch_index`` > 0 (batches of the
next epoch already trained) and ``epoch_totals`` (their loss and accuracy sums), so a resumed run starts at
the next batch and logs the same figures as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from microtrain.errors import CheckpointError

FORMAT = 1


def recipe_hash(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python, NumPy, torch CPU generator states, and the CUDA generator state of ``device`` (the run's own GPU)
    alone, as plain lists and tensors. Other GPUs' generators are not the run's: saving them would tie the
    checkpoint to this machine's GPU count."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": list(random.getstate()),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None, world_size: int = 1) -> None:
    """Restore :func:`rng_state`'s states; the CUDA one into ``device``, the run's own GPU.

    Only rank 0 writes checkpoints, and every rank seeds alike and draws alike, so each rank restores rank 0's
    generator into its own GPU. A checkpoint written before this format holds a list of every visible GPU's
    state: its entry for the saving process's GPU is taken (GPU 0 under torchrun, whose rank 0 runs there; the
    same index as ``device`` otherwise), and a list too short for that index restores nothing rather than fail."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    saved = state.get("cuda")
    if saved is None or device is None or device.type != "cuda" or not torch.cuda.is_available():
        return
    if isinstance(saved, (list, tuple)):  # the format before: every visible GPU of the saving process
        index = 0 if world_size > 1 else (device.index if device.index is not None else torch.cuda.current_device())
        if index >= len(saved):
            return
        saved = saved[index]
    torch.cuda.set_rng_state(saved, device)


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any byte leaves either the old file or the new one, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # full disk, lost permissions: one line, the old file is untouched
            raise CheckpointError(f"cannot write '{path}' ({exc.strerror or exc}); free space in or fix the permissions "
                                  f"of '{path.parent}' (the previous file there is kept)") from None
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint without executing any code it might carry."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or carrying pickled objects other than tensors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt or unsafe and was not loaded ({first[:200]}); "
            "resume from another checkpoint or start a new run"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT or "model" not in checkpoint:
        raise CheckpointError(f"'{path}' is not a microtrain checkpoint (format {FORMAT})")
    return checkpoint


def make_checkpoint(state, mid_epoch: bool = False) -> dict[str, Any]:
    """Assemble the checkpoint of ``state`` at the end of ``state.epoch``, or with ``mid_epoch`` after its
    step ``state.batch_index`` (call it then after the step's ``after_batch`` hooks, before the next batch)."""
    from microtrain.engine import FINITE_BATCHES, raise_if_not_finite
    from microtrain.plugin_manager import call_hook

    scaler = state.grad_scaler
    totals = {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in state.epoch_totals.items()}
    # The engine reads its non-finite check only every few steps on a GPU; the copy above has waited for the
    # device anyway, so a step that went non-finite since the last read stops the run here, not in a checkpoint.
    raise_if_not_finite(state, totals)
    totals.pop(FINITE_BATCHES, None)  # the engine's bookkeeping: a resumed epoch starts it from its batch index
    checkpoint = {
        "format": FORMAT,
        "epoch": state.epoch - 1 if mid_epoch else state.epoch,
        "batch_index": state.batch_index if mid_epoch else 0,
        "epoch_totals": totals if mid_epoch else {},
        "step": state.step,
        "model": state.unwrapped_model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "grad_scaler": scaler.state_dict() if scaler is not None else {},
        "history": state.history,
        "rng": rng_state(state.device),
        "recipe_hash": recipe_hash(state.recipe),
        "classes": list(state.data.classes),
        "data": {"mean": [float(v) for v in state.data.mean], "std": [float(v) for v in state.data.std],
                 "image_shape": [int(v) for v in state.data.image_shape], "train_size": len(state.data.train_labels)},
        "plugins": {},
    }
    call_hook(state.plugin_manager, "on_checkpoint_save", state=state, checkpoint=checkpoint)
    return checkpoint


def restore_checkpoint(state, checkpoint: dict[str, Any]) -> None:
    """Put a checkpoint back into ``state`` so the next epoch is ``checkpoint['epoch'] + 1``, from its batch
    ``checkpoint['batch_index'] + 1``. The RNG states are restored last: nothing may draw from them before the
    next training step (loaders use their own generators)."""
    from microtrain.plugin_manager import call_hook

    try:
        state.unwrapped_model.load_state_dict(checkpoint["model"])
        state.optimizer.load_state_dict(checkpoint["optimizer"])
        state.scheduler.load_state_dict(checkpoint["scheduler"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint does not fit this recipe's model or optimizer: {str(exc).splitlines()[0]}") from None
    scaler = state.grad_scaler
    if scaler is not None and checkpoint.get("grad_scaler"):
        scaler.load_state_dict(checkpoint["grad_scaler"])
    state.history = list(checkpoint["history"])
    state.epoch = int(checkpoint["epoch"])
    state.start_epoch = state.epoch + 1
    state.step = int(checkpoint["step"])
    state.start_batch = int(checkpoint.get("batch_index", 0))
    if state.start_batch > state.steps_per_epoch:
        raise CheckpointError(f"the checkpoint stopped at batch {state.start_batch} of epoch {state.start_epoch}, but "
                              f"an epoch of this recipe has {state.steps_per_epoch}; resume with the loader settings it ran with")
    state.epoch_totals = {k: v.to(state.device) if isinstance(v, torch.Tensor) else v
                          for k, v in checkpoint.get("epoch_totals", {}).items()}
    call_hook(state.plugin_manager, "on_checkpoint_load", state=state, checkpoint=checkpoint)
    set_rng_state(checkpoint["rng"], state.device, state.world_size)
