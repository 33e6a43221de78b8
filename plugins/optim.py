"""Optimizers (sgd, adamw) and learning-rate schedules (onecycle, cosine, step, constant).

Schedules are stepped after every batch, so their lengths are in steps; the engine passes the
run's total steps and steps per epoch.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from torch import nn

import microtrain
from microtrain import Range, RecipeError

NON_NEGATIVE = Range(ge=0)
# Upper bounds where torch would fail mid-run: it applies lr, weight decay and eps as float32 scalars, and a
# learning rate near float32's limit (3.4e38, or lr / bias correction in AdamW) stops the first step with
# "value cannot be converted to type float without overflow". No useful setting comes near these.
LEARNING_RATE = Annotated[float, Range(gt=0, le=1000)]
WEIGHT_DECAY = Annotated[float, Range(ge=0, le=1)]
BETA = Annotated[float, Range(ge=0, lt=1)]
DIVISOR = Annotated[float, Range(ge=1, le=1e12)]  # below 1, the "warm-up" would start above max_lr


def parameter_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """With ``decay_norm_and_bias`` false, biases and normalisation weights (1-d tensors) get no decay."""
    if decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_sgd(model: nn.Module, *, lr: LEARNING_RATE = 0.05, momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9,
              nesterov: bool = True, weight_decay: WEIGHT_DECAY = 5e-4, decay_norm_and_bias: bool = True) -> torch.optim.Optimizer:
    """SGD with momentum (Nesterov by default) and weight decay."""
    if nesterov and momentum <= 0:  # a rule across two options, so it is checked here
        raise RecipeError("optimizer.nesterov=true needs optimizer.momentum > 0")
    return torch.optim.SGD(parameter_groups(model, weight_decay, decay_norm_and_bias), lr=lr, momentum=momentum,
                           nesterov=nesterov)


def build_adamw(model: nn.Module, *, lr: LEARNING_RATE = 1e-3, betas: tuple[BETA, BETA] = (0.9, 0.999),
                weight_decay: WEIGHT_DECAY = 0.05, eps: Annotated[float, Range(gt=0, le=1)] = 1e-8,
                decay_norm_and_bias: bool = False) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay)."""
    return torch.optim.AdamW(parameter_groups(model, weight_decay, decay_norm_and_bias), lr=lr, betas=tuple(betas),
                             eps=eps)


def build_onecycle(optimizer, total_steps: int, steps_per_epoch: int, *, max_lr: LEARNING_RATE = 0.1,
                   pct_start: Annotated[float, Range(gt=0, lt=1)] = 0.25, div_factor: DIVISOR = 25.0,
                   final_div_factor: DIVISOR = 1e4, anneal: Literal["cos", "linear"] = "cos",
                   three_phase: bool = False):
    """OneCycle: warm up to max_lr over pct_start of the run, then anneal to max_lr/(div*final_div)."""
    if total_steps < 4:  # known only once the data and batch size are
        raise RecipeError(f"schedule onecycle needs at least 4 steps in the run, this one has {total_steps}; "
                          "train more epochs, lower loader.batch_size, or use schedule.name=constant")
    # Very short runs (tests, smoke checks): keep at least one step in each phase.
    phases = 3 if three_phase else 2
    pct_start = min(max(pct_start, phases / total_steps), 1.0 - phases / total_steps)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start,
                                               div_factor=div_factor, final_div_factor=final_div_factor,
                                               anneal_strategy=anneal, three_phase=three_phase)


def _lambda_schedule(optimizer, factor_of_step):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor_of_step)


def build_cosine(optimizer, total_steps: int, steps_per_epoch: int, *, warmup_epochs: Annotated[float, NON_NEGATIVE] = 0.0,
                 min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.0):
    """Linear warm-up (optional), then cosine decay of the optimizer's lr to lr * min_lr_ratio."""
    warmup = int(warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return _lambda_schedule(optimizer, factor)


def build_step(optimizer, total_steps: int, steps_per_epoch: int, *, step_epochs: Annotated[int, Range(ge=1)] = 15,
               gamma: Annotated[float, Range(gt=0, le=1)] = 0.1, warmup_epochs: Annotated[float, NON_NEGATIVE] = 0.0):
    """Multiply the lr by gamma every step_epochs epochs (after an optional linear warm-up)."""
    warmup = int(warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return gamma ** (step // (step_epochs * steps_per_epoch))

    return _lambda_schedule(optimizer, factor)


def build_constant(optimizer, total_steps: int, steps_per_epoch: int, *, warmup_epochs: Annotated[float, NON_NEGATIVE] = 0.0):
    """The optimizer's lr throughout (after an optional linear warm-up)."""
    warmup = int(warmup_epochs * steps_per_epoch)
    return _lambda_schedule(optimizer, lambda step: (step + 1) / warmup if step < warmup else 1.0)


@microtrain.hookimpl
def register_components(registry):
    registry.optimizer("sgd", build_sgd)
    registry.optimizer("adamw", build_adamw)
    registry.schedule("onecycle", build_onecycle)
    registry.schedule("cosine", build_cosine)
    registry.schedule("step", build_step)
    registry.schedule("constant", build_constant)
