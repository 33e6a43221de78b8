"""``microtrain inspect``: the model's layer table (output shape, parameters, receptive field).

The receptive field is followed along the order in which layers run: each convolution or pooling
layer with kernel k, dilation d and stride s grows it by (d*(k-1)) * jump, and multiplies the
jump (the input-pixel distance between neighbouring outputs) by s. Global pooling makes it the
whole input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


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
    rf, jump = 1, 1
    input_size = image_shape[1]
    handles = []

    def record(name: str):
        def hook(module: nn.Module, _inputs, output) -> None:
            nonlocal rf, jump
            if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                kernel = _pair(module.kernel_size)
                dilation = _pair(getattr(module, "dilation", 1))
                stride = _pair(module.stride) if module.stride is not None else kernel
                rf += dilation * (kernel - 1) * jump
                jump *= stride
            elif isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                rf = max(rf, input_size)
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
        with torch.no_grad():
            model(torch.zeros(1, *image_shape))
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
