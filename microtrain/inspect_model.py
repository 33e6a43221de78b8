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


def layer_table(model: nn.Module, image_shape: tuple[int, int, int]) -> tuple[list[LayerRow], dict]:
    """Run one image through ``model`` and describe every leaf layer in execution order."""
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
            rows.append(LayerRow(name, type(module).__name__, shape, params, rf, jump))

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
