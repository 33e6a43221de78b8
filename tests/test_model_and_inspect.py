"""The seed model's size and the layer table's receptive fields, checked against a hand computation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from microtrain.inspect_model import layer_table
from microtrain_plugins.models.dsconv import build_dsconv


def test_dsconv_size_and_output():
    model = build_dsconv(10, (3, 32, 32))
    params = sum(p.numel() for p in model.parameters())
    assert 100_000 <= params <= 108_000
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_dsconv_has_no_activation_after_the_last_layer():
    model = build_dsconv(10, (3, 32, 32))
    assert isinstance(model.classifier, torch.nn.Conv2d)
    assert model.classifier.kernel_size == (1, 1)


def test_receptive_fields_match_the_hand_computation():
    """RF_out = RF_in + (k_eff - 1) * jump, k_eff = d*(k-1)+1, jump *= stride. By hand for the seed:
    C1..C4 3x3: 3, 5, 7, 9; C5 1x1: 9; POOL1 3x3 s2: 11 (jump 2); C6..C8: 15, 19, 23; C9: 23;
    POOL2 3x3 s2: 27 (jump 4); C10 depthwise 3x3: 35 (+1x1: 35); C11: 43 (+1x1: 43);
    C12 3x3 dilation 2 (k_eff 5): 59; C13 1x1: 59; GAP: the whole image."""
    rows, totals = layer_table(build_dsconv(10, (3, 32, 32)), (3, 32, 32))
    convs = [row for row in rows if row.kind.startswith("Conv")]
    expected = [3, 5, 7, 9, 9, 11, 15, 19, 23, 23, 27, 35, 35, 43, 43, 59, 59]
    assert [row.receptive_field for row in convs] == expected
    assert [row.jump for row in convs][-1] == 4
    assert [row.output_shape for row in convs][5] == [16, 16, 16]
    assert [row.output_shape for row in convs][10] == [32, 8, 8]
    assert totals["params"] == sum(row.params for row in rows)


def test_inspect_command_json():
    result = subprocess.run([sys.executable, "-m", "microtrain", "inspect", str(REPO / "recipes" / "cifar10_dsconv.yaml"),
                             "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["totals"]["receptive_field"] == 59
    assert 100_000 <= data["totals"]["params"] <= 108_000
    assert data["layers"][-1]["output_shape"] == [10, 1, 1]


def test_dsresnet_size_output_and_options():
    from microtrain.errors import RecipeError
    from microtrain_plugins.models.dsresnet import build_dsresnet

    model = build_dsresnet(10, (3, 32, 32))
    assert sum(p.numel() for p in model.parameters()) == 97_610  # the <= 105K-parameter goal
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    deeper = build_dsresnet(10, (3, 32, 32), widths=[16, 32], blocks=[1, 3])
    assert len(deeper.stages) == 4 and deeper(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(RecipeError, match="same number of stages"):
        build_dsresnet(10, (3, 32, 32), widths=[32, 64], blocks=[2])
    from microtrain.plugin_manager import create_plugin_manager  # single-option rules are checked at resolution

    dsresnet = create_plugin_manager()[1].get("model", "dsresnet", "model.name")
    with pytest.raises(RecipeError, match=r"model.widths\[1\]: must be >= 1 and <= 1024, got 0"):
        dsresnet.validate({"widths": [32, 0], "blocks": [2, 2]}, "model")


def test_dsresnet_blocks_start_as_the_identity():
    """The last BN of each block starts at zero, so a fresh block passes a non-negative input through."""
    from microtrain_plugins.models.dsresnet import SeparableResidualBlock

    block = SeparableResidualBlock(8, 8).eval()
    x = torch.rand(2, 8, 6, 6)
    assert torch.equal(block(x), x)
    assert not isinstance(SeparableResidualBlock(8, 16, stride=2).shortcut, torch.nn.Identity)


def test_receptive_fields_follow_residual_branches():
    """By hand along dsresnet's longest path: stem 3x3: 3; every depthwise 3x3 adds 2*jump. Stage 1
    (jump 1): 5, 7, 9, 11. Stage 2, the first depthwise has stride 2: 13 (jump 2), then 17, 21, 25.
    Stage 3: 29 (jump 4), 37, 45, 53. 1x1 convolutions add nothing; a shortcut's 1x1 convolution runs
    after its block's main path but sees the block's input (11 and 25), and the sum after it takes
    the larger field, so the blocks after it continue from the main path."""
    from microtrain_plugins.models.dsresnet import build_dsresnet

    rows, totals = layer_table(build_dsresnet(10, (3, 32, 32)), (3, 32, 32))
    depthwise = [row.receptive_field for row in rows if row.kind.startswith("Conv 3x3") and " g" in row.kind]
    assert depthwise == [5, 7, 9, 11, 13, 17, 21, 25, 29, 37, 45, 53]
    shortcuts = [(row.receptive_field, row.jump) for row in rows if ".shortcut." in row.name]
    assert shortcuts == [(11, 2), (25, 4)]
    assert totals["receptive_field"] == 53


def test_dsresnet_pad_shortcut_has_no_parameters_and_carries_the_input():
    """shortcut=pad: a fresh block that halves and widens passes the pooled input on in its first channels, zeros after."""
    from microtrain.errors import RecipeError
    from microtrain_plugins.models.dsresnet import SeparableResidualBlock, build_dsresnet

    block = SeparableResidualBlock(4, 8, stride=2, shortcut="pad").eval()
    assert sum(p.numel() for p in block.shortcut.parameters()) == 0
    x = torch.rand(2, 4, 6, 6)
    out = block(x)
    assert out.shape == (2, 8, 3, 3)
    assert torch.allclose(out[:, :4], torch.nn.functional.avg_pool2d(x, 2)) and torch.equal(out[:, 4:], torch.zeros(2, 4, 3, 3))

    projection, pad = build_dsresnet(10, (3, 32, 32)), build_dsresnet(10, (3, 32, 32), shortcut="pad")
    saved = sum(p.numel() for p in projection.parameters()) - sum(p.numel() for p in pad.parameters())
    assert saved == 32 * 64 + 2 * 64 + 64 * 128 + 2 * 128  # the two strided 1x1 projections and their BatchNorms
    assert sum(p.numel() for p in build_dsresnet(10, (3, 32, 32), widths=[32, 72, 128], blocks=[2, 3, 2],
                                                 shortcut="pad").parameters()) == 103_834  # recipes/cifar10_dsresnet_pad.yaml
    with pytest.raises(RecipeError, match=r"model.shortcut=pad only appends channels, but model.widths narrows \(64 -> 32\)"):
        build_dsresnet(10, (3, 32, 32), widths=[64, 32], blocks=[1, 1], shortcut="pad")
    from microtrain.plugin_manager import create_plugin_manager

    dsresnet = create_plugin_manager()[1].get("model", "dsresnet", "model.name")
    with pytest.raises(RecipeError, match="model.shortcut"):
        dsresnet.validate({"shortcut": "conv"}, "model")


def test_dsresnet_squeeze_excite_gates_each_image_and_keeps_the_identity_start():
    """se_reduction=r: a per-image, per-channel gate in (0, 1) on the residual branch, 2*c*c/r weights + biases."""
    from microtrain.errors import RecipeError
    from microtrain_plugins.models.dsresnet import SeparableResidualBlock, SqueezeExcite, build_dsresnet

    block = SeparableResidualBlock(16, 16, se_reduction=4).eval()
    x = torch.rand(2, 16, 6, 6)
    assert torch.equal(block(x), x)  # the zero-initialised BN still makes a fresh block the identity
    assert sum(p.numel() for p in block.excite.parameters()) == 16 * 4 + 4 + 4 * 16 + 16

    torch.manual_seed(0)
    excite = SqueezeExcite(8, 2)
    images = torch.rand(2, 8, 5, 5)
    images[1] *= 3  # another image: other channel means, so another gate
    gate = excite(images) / images
    assert ((gate > 0) & (gate < 1)).all()
    assert torch.allclose(gate, gate[:, :, :1, :1].expand_as(gate))  # one factor per image and channel
    assert not torch.allclose(gate[0], gate[1])

    plain, gated = build_dsresnet(10, (3, 32, 32)), build_dsresnet(10, (3, 32, 32), se_reduction=16)
    assert sum(p.numel() for p in gated.parameters()) - sum(p.numel() for p in plain.parameters()) == 5_852
    assert gated(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    from microtrain.plugin_manager import create_plugin_manager

    dsresnet = create_plugin_manager()[1].get("model", "dsresnet", "model.name")
    with pytest.raises(RecipeError, match=r"model.se_reduction: must be >= 0"):
        dsresnet.validate({"se_reduction": -1}, "model")


def test_dsresnet_silu_replaces_every_relu_at_no_parameter_cost():
    from microtrain_plugins.models.dsresnet import build_dsresnet

    plain, smooth = build_dsresnet(10, (3, 32, 32)), build_dsresnet(10, (3, 32, 32), activation="silu")
    kinds = {type(module) for module in smooth.modules()}
    assert torch.nn.SiLU in kinds and torch.nn.ReLU not in kinds
    assert sum(p.numel() for p in smooth.parameters()) == sum(p.numel() for p in plain.parameters())
    x = torch.randn(2, 3, 32, 32)
    assert smooth.eval()(x).shape == (2, 10)
    smooth.load_state_dict(plain.state_dict())  # same layers, same names: only the non-linearity differs
    assert not torch.allclose(smooth(x), plain.eval()(x))
    smooth.train()(x).sum().backward()  # the in-place SiLU keeps what its gradient needs
    assert all(p.grad is not None for p in smooth.parameters())
