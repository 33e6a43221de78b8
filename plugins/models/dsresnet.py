"""Model ``dsresnet``: a residual network of depthwise-separable convolutions for 32x32 images.

For the "best accuracy at <= 105K parameters" goal. The seed's ``dsconv`` spends most of its
parameters and compute on full 3x3 convolutions and has no shortcuts, which limits how deep it
can usefully go. Here every 3x3 convolution after the stem is depthwise (9 weights per channel),
so the parameters go into 1x1 convolutions and width, and residual shortcuts let the network be
deep: with the defaults, a 3x3 stem and three stages (32, 64, 128 channels at 32x32, 16x16 and
8x8) of two blocks each, 13 convolution layers on the longest path and 97,610 parameters.

Block: [depthwise 3x3 (stride s) -> pointwise 1x1 -> BN -> ReLU] -> [depthwise 3x3 -> pointwise
1x1 -> BN] + shortcut -> ReLU. The shortcut is the identity, or where the shape changes either a
strided 1x1 convolution with BN (``shortcut: projection``, the default) or, with ``shortcut: pad``, a
2x2 average pool and zero channels appended (He et al.'s option A): no parameters, so the ~10K that
the two projections cost at the default widths can go into width instead.

``se_reduction: r`` (0, the default, leaves it out) scales the residual branch's channels, before the
sum, by a squeeze-and-excitation gate (Hu et al.): global average pool -> 1x1 to ``channels // r`` ->
ReLU -> 1x1 back -> sigmoid. Every other layer here sees a 3x3 neighbourhood; the gate lets each
block weigh its channels by what the whole image holds, for about ``2 * channels**2 / r`` parameters
(5,852 at the default widths with r=16) and little compute.

``activation: silu`` puts SiLU (x * sigmoid(x), smooth and non-monotonic; EfficientNet's choice for small
networks) where ReLU stands by default, at no cost in parameters.

The last BN of each block starts at zero, so each block starts as the
identity (He et al. / Goyal et al.'s zero-init trick; exactly so with ReLU, whose inputs here are already
non-negative, and as one more SiLU with ``activation: silu``), which makes deep stacks train from the
first step. Outputs logits after global average pooling and a linear layer.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import nn

import microtrain
from microtrain import Check, Range, RecipeError


def separable(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Depthwise 3x3 then pointwise 1x1 then BatchNorm (no bias: BN follows)."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
    )


class PoolAndPad(nn.Module):
    """The parameter-free shortcut: average-pool by the stride, then append zero channels up to ``cout``."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.extra = cout - cin
        self.pool: nn.Module = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(self.pool(x), (0, 0, 0, 0, 0, self.extra))


class SqueezeExcite(nn.Module):
    """Multiplies each channel by a gate in (0, 1) computed from the whole feature map's channel means."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(hidden, channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU}


class SeparableResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, shortcut: str = "projection", se_reduction: int = 0,
                 activation: str = "relu"):
        super().__init__()
        self.first = separable(cin, cout, stride)
        self.second = separable(cout, cout)
        nn.init.zeros_(self.second[-1].weight)  # the block starts as the identity (the gate scales a zero branch)
        self.excite: nn.Module = SqueezeExcite(cout, se_reduction) if se_reduction else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = PoolAndPad(cin, cout, stride) if shortcut == "pad" else \
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.act = ACTIVATIONS[activation](inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.first(x))
        return self.act(self.excite(self.second(out)) + self.shortcut(x))


class DSResNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, widths: list[int], blocks: list[int], dropout: float,
                 shortcut: str = "projection", se_reduction: int = 0, activation: str = "relu"):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), ACTIVATIONS[activation](inplace=True))
        layers: list[nn.Module] = []
        cin = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(SeparableResidualBlock(cin, width, stride, shortcut, se_reduction, activation))
                cin = width
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pool(self.stages(self.stem(x))).flatten(1)))


def at_least_one_stage(stages: list[int], where: str) -> list[int]:
    if not stages:
        raise RecipeError(f"{where}: needs one entry per stage and at least one stage, got []; e.g. {where}=[32, 64]")
    return stages


STAGES = Check(at_least_one_stage, "(one per stage, at least one)")


def build_dsresnet(num_classes: int, image_shape: tuple[int, int, int], *,
                   widths: Annotated[list[Annotated[int, Range(ge=1, le=1024)]], STAGES] = [32, 64, 128],  # noqa: B006
                   blocks: Annotated[list[Annotated[int, Range(ge=1, le=16)]], STAGES] = [2, 2, 2],  # noqa: B006
                   dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0,
                   shortcut: Literal["projection", "pad"] = "projection",
                   se_reduction: Annotated[int, Range(ge=0, le=1024)] = 0,
                   activation: Literal["relu", "silu"] = "relu") -> nn.Module:
    """Residual depthwise-separable CNN: one stage per entry of ``widths`` (each after the first halves the
    resolution) with as many residual blocks as the same entry of ``blocks``; dropout before the final linear layer;
    ``shortcut`` is how a block that changes the shape carries its input; ``se_reduction`` > 0 adds a
    squeeze-and-excitation gate to each block with that reduction ratio; ``activation`` is the non-linearity
    (see the module's docstring)."""
    if len(widths) != len(blocks):  # the one rule across two options, so it is checked here
        raise RecipeError(f"model.widths and model.blocks need the same number of stages (one entry each), got "
                          f"{len(widths)} widths and {len(blocks)} block counts")
    if shortcut == "pad":
        narrowing = [f"{a} -> {b}" for a, b in zip(widths[:-1], widths[1:], strict=True) if b < a]
        if narrowing:
            raise RecipeError(f"model.shortcut=pad only appends channels, but model.widths narrows ({', '.join(narrowing)}); "
                              "make each width at least the one before it, or use model.shortcut=projection")
    return DSResNet(num_classes, image_shape[0], list(widths), list(blocks), dropout, shortcut, se_reduction, activation)


@microtrain.hookimpl
def register_components(registry):
    registry.model("dsresnet", build_dsresnet)
