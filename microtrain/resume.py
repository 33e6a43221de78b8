"""What ``--resume --force`` may change in a run, and how each change reaches the restored state.

Restoring a checkpoint brings back the optimizer's hyperparameters and the schedule's plan, which would
silently undo a changed learning rate, weight decay, schedule or length. So every change the resume
records in recipe.yaml is either applied or refused, before anything is written:

    refused      model.*, data.* (except where the data is: data.root, data.url, ...), loader.batch_size,
                 seed, optimizer.name, optimizer.decay_norm_and_bias: the checkpoint's weights, batches or
                 optimizer state belong to the old values
    re-planned   epochs, optimizer.* (hyperparameters), schedule.*: the optimizer keeps its state (momentum
                 buffers) but takes the new hyperparameters, and the schedule is built anew for the new
                 length and moved on to the restored step, as if the run had been planned that way from
                 its start (a finished onecycle run given more epochs goes back up to where the longer
                 cycle is at that step)
    as they are  everything else (plugins, other loader options, precision, label_smoothing, grad_clip,
                 threads, device...): the run continues with them from its next step

A run with no checkpoint yet starts again from the beginning, so there every change applies.
"""

from __future__ import annotations

import warnings
from typing import Any

from microtrain.errors import MicrotrainError, RecipeError

REFUSED = {
    "model": "the checkpoint holds the old model's weights",
    "data": "the checkpoint was trained on the old data",
    "loader.batch_size": "it changes every epoch's batches and the steps per epoch",
    "seed": "it changes the sample order and augmentation of the epochs already trained",
    "optimizer.name": "the checkpoint's optimizer state belongs to the old optimizer",
    "optimizer.decay_norm_and_bias": "it regroups the parameters the checkpoint's optimizer state is kept for",
}
DATA_LOCATION = ("data.root", "data.url", "data.archive_md5", "data.verify", "data.download_missing")
"""Where the data is and how it is checked: the same images from another place."""
REPLANNED = ("epochs", "optimizer", "schedule")


def _under(field: str, section: str) -> bool:
    return field == section or field.startswith(section + ".")


def recipe_changes(saved: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the fields that differ (a list, such as plugins or loader.augment, is one field)."""
    changed = []
    for key in sorted(set(saved) | set(new)):
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += recipe_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


def refused_changes(changed: list[str]) -> dict[str, str]:
    """The changed fields a resume cannot apply, with the reason."""
    refused = {}
    for field in changed:
        if field in DATA_LOCATION:
            continue
        reason = next((why for section, why in REFUSED.items() if _under(field, section)), None)
        if reason is not None:
            refused[field] = reason
    return refused


def replans(changed: list[str]) -> bool:
    """The optimizer's hyperparameters or the schedule must be rebuilt from the new recipe."""
    return any(_under(field, section) for field in changed for section in REPLANNED)


def check_changes(changed: list[str], run_dir: Any) -> None:
    """Refuse, in one line naming every field, the changes a resume cannot apply."""
    refused = refused_changes(changed)
    if refused:
        reasons = "; ".join(f"{field}: {why}" for field, why in refused.items())
        raise RecipeError(f"--resume --force cannot apply changes to {', '.join(refused)} ({reasons}); resume "
                          f"'{run_dir}' with their old values, or start a new run for them (--run-dir elsewhere)")


def epochs_started(checkpoint: dict[str, Any]) -> int:
    """Epochs the checkpoint has finished, plus the one it stopped in."""
    return int(checkpoint["epoch"]) + (1 if int(checkpoint.get("batch_index", 0)) else 0)


def check_epochs(checkpoint: dict[str, Any], epochs: int) -> None:
    started = epochs_started(checkpoint)
    if epochs < started:
        raise RecipeError(f"epochs={epochs} is fewer than the {started} epoch(s) the checkpoint has already trained or "
                          f"started; pass epochs={started} or more")


def check_steps_per_epoch(checkpoint: dict[str, Any], steps_per_epoch: int, changed: list[str]) -> None:
    """A change that alters the steps per epoch (a loader option) would put the checkpoint's position elsewhere."""
    epoch, batch, step = int(checkpoint["epoch"]), int(checkpoint.get("batch_index", 0)), int(checkpoint["step"])
    if epoch < 1 or (step - batch) % epoch:
        return
    before = (step - batch) // epoch
    if before != steps_per_epoch:
        raise RecipeError(f"the changed recipe makes {steps_per_epoch} steps per epoch where the checkpoint's run made "
                          f"{before} (changed: {', '.join(changed)}); resume with the settings it ran with")


def optimizer_hyperparameters(optimizer) -> list[dict[str, Any]]:
    """Every parameter group's settings (not its parameters): what a freshly built optimizer and schedule set."""
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


def replan(state, fresh_groups: list[dict[str, Any]], fresh_schedule: dict[str, Any]) -> tuple[float, float]:
    """After a restore: give the optimizer the new recipe's hyperparameters (``fresh_groups``, taken before the
    restore) and move the new recipe's schedule (``fresh_schedule``, its state before any step) on to the restored
    step. Returns the learning rate before and after."""
    optimizer, scheduler = state.optimizer, state.scheduler
    before = float(optimizer.param_groups[0]["lr"])
    if len(fresh_groups) != len(optimizer.param_groups):
        raise MicrotrainError("the changed optimizer has other parameter groups than the checkpoint's; resume with the "
                              "optimizer settings it ran with")
    for group, fresh in zip(optimizer.param_groups, fresh_groups, strict=True):
        group.update(fresh)
    scheduler.load_state_dict(fresh_schedule)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
            for _ in range(state.step):  # replaying works for every schedule, closed form or not
                scheduler.step()
    except ValueError as exc:  # a schedule shorter than the steps already trained
        raise RecipeError(f"the changed schedule cannot reach step {state.step}, where the checkpoint is "
                          f"({str(exc).splitlines()[0]}); train more epochs") from None
    return before, float(optimizer.param_groups[0]["lr"])
