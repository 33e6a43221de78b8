"""Callback ``ema``: an exponential moving average of the model's weights, used for evaluation.

After every ``every_steps`` optimizer steps each floating-point parameter is updated as
``ema = d * ema + (1 - d) * weight``; buffers (BatchNorm running statistics, counters) are copied,
because they are already averages of the data, not of the optimisation path. With ``warmup`` the
decay of the n-th update is ``min(decay, (1 + n) / (10 + n))``, so the early, random weights are
forgotten quickly instead of dominating the average for thousands of steps.

Before each evaluation ``state.eval_model`` is set to the averaged copy, so the logged test
accuracy (and best.pt's choice) is that of the EMA weights. Checkpoints carry the averaged weights
under ``checkpoint["plugins"]["ema"]`` so a resumed run continues the same average. The model
weights in the checkpoint's ``model`` entry stay the raw trained weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

import microtrain
from microtrain.errors import RecipeError


class EMA:
    """Keeps the averaged copy; one instance per run."""

    def __init__(self, *, decay: float, warmup: bool, every_steps: int):
        self.decay = decay
        self.warmup = warmup
        self.every_steps = every_steps
        self.updates = 0
        self.model: torch.nn.Module | None = None

    def current_decay(self) -> float:
        """The decay of the next update (smaller during warm-up)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        """Start the average from ``model``'s current weights (a detached deep copy, in eval mode)."""
        self.model = copy.deepcopy(model).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        return self.model

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One EMA step towards ``model``'s weights; buffers are copied."""
        assert self.model is not None
        d = self.current_decay()
        averaged, current = [], []
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            if ema_p.dtype.is_floating_point:
                averaged.append(ema_p)
                current.append(p.detach())
            else:
                ema_p.copy_(p)
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - d)  # ema + (1-d)(p - ema) = d ema + (1-d) p
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
        self.updates += 1

    def _ensure(self, state) -> torch.nn.Module:
        if self.model is None:
            self.attach(state.unwrapped_model)
        return self.model

    @microtrain.hookimpl
    def before_fit(self, state):
        self._ensure(state)

    @microtrain.hookimpl
    def after_batch(self, state):
        if state.step % self.every_steps == 0:
            self.update(state.unwrapped_model)

    @microtrain.hookimpl
    def before_eval(self, state):
        state.eval_model = self._ensure(state)

    @microtrain.hookimpl
    def on_checkpoint_save(self, state, checkpoint):
        model = self._ensure(state)
        checkpoint["plugins"]["ema"] = {
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "updates": self.updates,
            "decay": self.decay,
        }

    @microtrain.hookimpl
    def on_checkpoint_load(self, state, checkpoint):
        """Called before before_fit on resume: build the copy here if needed, then load it."""
        model = self._ensure(state)
        saved: dict[str, Any] | None = checkpoint.get("plugins", {}).get("ema")
        if saved is None:  # the run was started without EMA: average from the restored weights on
            self.attach(state.unwrapped_model)
            self.updates = 0
            return
        model.load_state_dict(saved["state_dict"])
        self.updates = int(saved["updates"])


def build_ema(*, decay: float = 0.999, warmup: bool = True, every_steps: int = 1) -> EMA:
    """EMA of the weights (buffers copied), evaluated in place of the model; saved in checkpoints."""
    if not 0.0 <= decay < 1.0:
        raise RecipeError(f"plugins.ema.decay must be in [0, 1), got {decay}; 0.999 is a usual value")
    if every_steps < 1:
        raise RecipeError(f"plugins.ema.every_steps must be at least 1, got {every_steps}")
    return EMA(decay=decay, warmup=warmup, every_steps=every_steps)


@microtrain.hookimpl
def register_components(registry):
    registry.callback("ema", build_ema)
