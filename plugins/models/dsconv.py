"""Model ``dsconv``: the seed document's ~104K-parameter CNN for 32x32 images.

C1..C13 as in the seed: 3x3 convolutions, 1x1 transitions, stride-2 3x3 convolutions in place
of pooling, depthwise-separable C10/C11 (grouped 3x3 followed by a pointwise 1x1), a dilated
C12, and a 1x1 C13 to the classes followed by global average pooling. ReLU -> BatchNorm ->
Dropout after every layer but the last. Outputs logits (softmax belongs to the loss).
"""

from __future__ import annotations

from typing import Annotated

from torch import nn

import microtrain
from microtrain import Range


def conv_block(cin: int, cout: int, kernel: int = 3, *, stride: int = 1, dilation: int = 1, groups: int = 1,
               dropout: float = 0.0) -> nn.Sequential:
    """Conv -> ReLU -> BN -> Dropout, the seed's layer order ('Relu-BN-DO')."""
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=False),
        nn.ReLU(inplace=True),
        nn.BatchNorm2d(cout),
        nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
    )


def separable_block(cin: int, cout: int, *, groups: int, dropout: float) -> nn.Sequential:
    """Depthwise-separable: grouped 3x3, then pointwise 1x1, then ReLU -> BN -> Dropout."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False),
        nn.Conv2d(cout, cout, 1, bias=False),
        nn.ReLU(inplace=True),
        nn.BatchNorm2d(cout),
        nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
    )


class DSConvNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.05, width: float = 1.0):
        super().__init__()

        def w(channels: int) -> int:
            return max(1, int(round(channels * width)))

        d = dropout
        self.features = nn.Sequential(
            conv_block(in_channels, w(16), dropout=d),  # C1   RF 3, 32x32
            conv_block(w(16), w(16), dropout=d),  # C2
            conv_block(w(16), w(32), dropout=d),  # C3
            conv_block(w(32), w(32), dropout=d),  # C4   RF 9
            conv_block(w(32), w(16), 1, dropout=d),  # C5   1x1 transition
            conv_block(w(16), w(16), stride=2, dropout=d),  # POOL1 RF 11, 16x16
            conv_block(w(16), w(16), dropout=d),  # C6
            conv_block(w(16), w(32), dropout=d),  # C7
            conv_block(w(32), w(64), dropout=d),  # C8   RF 23
            conv_block(w(64), w(32), 1, dropout=d),  # C9   1x1 transition
            conv_block(w(32), w(32), stride=2, dropout=d),  # POOL2 RF 27, 8x8
            separable_block(w(32), w(64), groups=w(32), dropout=d),  # C10 depthwise-separable
            separable_block(w(64), w(64), groups=w(32), dropout=d),  # C11 depthwise-separable
            conv_block(w(64), w(64), dilation=2, dropout=d),  # C12 dilated
        )
        self.classifier = nn.Conv2d(w(64), num_classes, 1)  # C13: no ReLU/BN/DO after the last layer
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.classifier(self.features(x))).flatten(1)


def build_dsconv(num_classes: int, image_shape: tuple[int, int, int], *,
                 dropout: Annotated[float, Range(ge=0, lt=1)] = 0.05,
                 width: Annotated[float, Range(gt=0, le=16)] = 1.0) -> nn.Module:
    """The seed's depthwise-separable CNN (about 104K parameters at width 1; parameters grow with width
    squared, so width 16 is already 27M)."""
    return DSConvNet(num_classes=num_classes, in_channels=image_shape[0], dropout=dropout, width=width)


@microtrain.hookimpl
def register_components(registry):
    registry.model("dsconv", build_dsconv)
