"""``microtrain inspect``: the model's layer table (output shape, parameters, receptive field).

The receptive field travels with the tensors: each convolution or pooling layer with kernel k,
dilation d and stride s grows its input's field by (d*(k-1)) * jump and multiplies the jump (the
input-pixel distance between neighbouring outputs) by s; every other operation (activations,
``+`` of a residual shortcut, concatenation) passes on the largest field of its inputs. So
branching models (residual blocks, whose shortcut convolution runs after the main path) get the
same figures as a hand computation along their longest path. Global pooling makes it the whole
input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: list[int]
    params: int
    receptive_field: int
    jump: int


def _pair(value) -> int:
    return value[0] if isinstance(value, (tuple, list)) else int(value)


SHORT_NAMES = {"ReLU": "relu", "BatchNorm2d": "bn", "Dropout2d": "drop", "Dropout": "drop", "Identity": "", "GELU": "gelu",
               "SiLU": "silu", "GroupNorm": "gn", "LayerNorm": "ln"}
ANCHORS = (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


class FieldTracker(TorchFunctionMode):
    """Carries (receptive field, jump) from the input tensors of every torch function to its outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[int, tuple[int, int]] = {}
        self.alive: list[torch.Tensor] = []  # keeps ids unique during the one forward pass

    def field(self, value: Any) -> tuple[int, int]:
        found = [self.fields[id(t)] for t in _tensors(value) if id(t) in self.fields]
        return (max(f[0] for f in found), max(f[1] for f in found)) if found else (1, 1)

    def set(self, value: Any, field: tuple[int, int]) -> None:
        for tensor in _tensors(value):
            self.fields[id(tensor)] = field
            self.alive.append(tensor)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(id(t) in self.fields for t in _tensors((args, kwargs))):
            self.set(out, self.field((args, kwargs)))
        return out


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        k, s, d = _pair(module.kernel_size), _pair(module.stride), _pair(module.dilation)
        extra = "".join([f" s{s}" if s != 1 else "", f" d{d}" if d != 1 else "",
                         f" g{module.groups}" if module.groups != 1 else ""])
        return f"Conv {k}x{k}{extra}"
    return type(module).__name__


def layer_table(model: nn.Module, image_shape: tuple[int, int, int], expand: bool = False) -> tuple[list[LayerRow], dict]:
    """Run one image through ``model`` and describe its layers in execution order.

    Convolutions, pooling and linear layers get a row each; the activations, norms and dropout
    that follow them are folded into that row unless ``expand``."""
    rows: list[LayerRow] = []
    input_size = image_shape[1]
    tracker = FieldTracker()
    handles = []

    def record(name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            rf, jump = tracker.field(inputs)
            if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                kernel = _pair(module.kernel_size)
                dilation = _pair(getattr(module, "dilation", 1))
                stride = _pair(module.stride) if module.stride is not None else kernel
                rf += dilation * (kernel - 1) * jump
                jump *= stride
            elif isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                rf = max(rf, input_size)
            tracker.set(output, (rf, jump))
            shape = list(output.shape[1:]) if isinstance(output, torch.Tensor) else []
            params = sum(p.numel() for p in module.parameters(recurse=False))
            if not expand and rows and not isinstance(module, ANCHORS):
                # Activations, norms and dropout join the row of the layer they follow.
                last = rows[-1]
                short = SHORT_NAMES.get(type(module).__name__, type(module).__name__)
                if short:
                    last.kind += f", {short}"
                last.params += params
                last.output_shape = shape
                return
            rows.append(LayerRow(name, _describe(module), shape, params, rf, jump))

        return hook

    for name, module in model.named_modules():
        if not list(module.children()):
            handles.append(module.register_forward_hook(record(name)))
    was_training = model.training
    model.eval()
    try:
        image = torch.zeros(1, *image_shape)
        with torch.no_grad(), tracker:
            tracker.set(image, (1, 1))
            output = model(image)
        rf = tracker.field(output)[0]
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    totals = {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "receptive_field": rf,
        "input_shape": list(image_shape),
    }
    return rows, totals


def as_json(rows: list[LayerRow], totals: dict) -> dict:
    return {"layers": [asdict(r) for r in rows], "totals": totals}
