"""The UNet++ itself: shapes, the paper's configuration, true pruning."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from napari_unetpp.model.config import UNetPlusPlusConfig, node_names
from napari_unetpp.model.network import PrunedUNetPlusPlus, UNetPlusPlus, count_parameters

from .conftest import tiny_net

tiny = functools.partial(tiny_net, features=(4, 8, 8, 16, 16), norm="none")  # 4 levels, no norm layers


def test_node_names_follow_the_paper():
    assert node_names(1) == ["x_0_0", "x_1_0", "x_0_1"]
    assert node_names(2) == ["x_0_0", "x_1_0", "x_0_1", "x_2_0", "x_1_1", "x_0_2"]
    assert len(node_names(4)) == 15 and all(int(n[2]) + int(n[4]) <= 4 for n in node_names(4))
    m = tiny()
    assert set(m.nodes) == set(node_names(4))
    assert set(m.heads) == {"head_1", "head_2", "head_3", "head_4"}


def test_paper_configuration():
    m = UNetPlusPlus.paper()
    cfg = m.config
    assert cfg.features == (32, 64, 128, 256, 512) and cfg.norm == "none" and cfg.dropout == 0.5
    # the published UNet++ has 9.04M parameters
    assert abs(count_parameters(m) - 9.04e6) < 0.01e6
    assert not any(isinstance(x, (nn.BatchNorm2d, nn.GroupNorm)) for x in m.modules())
    ups = [x for x in m.modules() if isinstance(x, nn.ConvTranspose2d)]
    assert len(ups) == 10 and all(u.kernel_size == (2, 2) and u.stride == (2, 2) for u in ups)
    drops = [x for x in m.modules() if isinstance(x, nn.Dropout)]
    assert len(drops) == 30 and all(d.p == 0.5 for d in drops)
    # X(0, 3) concatenates X(0,0..2) and up(X(1,2)): 4 x 32 input channels
    assert m.nodes["x_0_3"].conv[0].in_channels == 128
    assert all(h.kernel_size == (1, 1) and h.out_channels == 1 for h in m.heads.values())


@pytest.mark.parametrize("shape", [(33, 63), (16, 16), (1, 1), (65, 17)])
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_odd_sizes_2d(shape, depth):
    m = tiny()
    x = torch.randn(2, 1, *shape)
    with torch.no_grad():
        out = m(x, depth=depth)
    assert len(out) == depth and all(o.shape == (2, 1, *shape) for o in out)


@pytest.mark.parametrize("in_ch,classes", [(1, 1), (3, 1), (2, 4)])
def test_channels_and_classes(in_ch, classes):
    m = tiny(in_channels=in_ch, num_classes=classes, norm="batch")
    with torch.no_grad():
        out = m(torch.randn(1, in_ch, 37, 29))
    assert [tuple(o.shape) for o in out] == [(1, classes, 37, 29)] * 4


@pytest.mark.parametrize(
    "norm,up", [("none", "transpose"), ("group", "linear"), ("instance", "nearest"), ("batch", "transpose")]
)
def test_3d(norm, up):
    m = tiny(spatial_dims=3, features=(4, 8, 8), norm=norm, upsample=up, num_classes=2)
    x = torch.randn(1, 1, 7, 21, 18)
    with torch.no_grad():
        out = m(x)
    assert [tuple(o.shape) for o in out] == [(1, 2, 7, 21, 18)] * 2
    assert isinstance(m.nodes["x_0_1"].conv[0], nn.Conv3d)


def test_depth_five():
    m = tiny(features=(4, 4, 8, 8, 8, 8))
    assert m.max_depth == 5
    with torch.no_grad():
        assert len(m(torch.randn(1, 1, 40, 40))) == 5


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_pruned_forward_equals_full_forward(depth):
    m = tiny()
    x = torch.randn(2, 1, 45, 70)
    with torch.no_grad():
        full = m(x)
        pruned = m(x, depth=depth)
    for j in range(depth):
        torch.testing.assert_close(pruned[j], full[j], rtol=0, atol=0)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_pruned_depth_touches_only_its_nodes(depth):
    m = tiny()
    ran: set[str] = set()
    hooks = [
        mod.register_forward_hook(lambda mod_, i, o, name=name: ran.add(name))
        for name, mod in m.named_modules()
        if name.count(".") == 1
    ]
    with torch.no_grad():
        m(torch.randn(1, 1, 32, 32), depth=depth)
    for h in hooks:
        h.remove()
    allowed = {name for name, _ in m.modules_for_depth(depth)}
    assert ran == allowed
    # deeper encoder blocks never run
    assert f"nodes.x_{depth + 1}_0" not in ran if depth < 4 else True


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_pruned_module_is_standalone_and_minimal(depth):
    m = tiny()
    p = m.pruned(depth)
    assert isinstance(p, PrunedUNetPlusPlus)
    expected = sum(count_parameters(m.nodes[n]) for n in node_names(depth)) + count_parameters(m.heads[f"head_{depth}"])
    assert count_parameters(p) == expected
    assert count_parameters(p) < count_parameters(m) or depth == 4
    x = torch.randn(1, 1, 50, 41)
    with torch.no_grad():
        torch.testing.assert_close(p(x), m(x)[depth - 1], rtol=0, atol=0)
    # the pruned copy does not share storage with the full model
    first = next(iter(p.parameters()))
    assert all(first.data_ptr() != q.data_ptr() for q in m.parameters())


def test_config_round_trip_and_validation():
    cfg = UNetPlusPlusConfig(in_channels=2, num_classes=3, features=(8, 16, 32), spatial_dims=3, norm="group")
    m = UNetPlusPlus.from_config(cfg.to_dict())
    assert m.config == cfg and m.max_depth == 2
    for bad in (
        {"features": (8,)},
        {"spatial_dims": 4},
        {"norm": "layer"},
        {"upsample": "pixelshuffle"},
        {"num_classes": 0},
        {"in_channels": 0},
        {"dropout": 1.0},
    ):
        with pytest.raises(ValueError):
            UNetPlusPlusConfig(**bad)


def test_bad_depth_and_input_give_clear_errors():
    m = tiny()
    with pytest.raises(ValueError, match="depth must be between 1 and 4"):
        m(torch.randn(1, 1, 16, 16), depth=5)
    with pytest.raises(ValueError, match="expects 1 input channel"):
        m(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="4-D tensor"):
        m(torch.randn(1, 16, 16))


def test_gradients_reach_only_used_nodes():
    m = tiny()
    m.train()
    out = m(torch.randn(2, 1, 32, 32), depth=2)
    sum(o.mean() for o in out).backward()
    for name, p in m.named_parameters():
        node = name.split(".")[1]
        used = node in node_names(2) or node in ("head_1", "head_2")
        assert (p.grad is not None) == used, name


def test_first_convolution_stays_fp32_under_autocast():
    m = tiny(norm="batch")
    seen = {}
    m.nodes["x_0_0"].conv[0].register_forward_hook(lambda mod, i, o: seen.__setitem__("first", (i[0].dtype, o.dtype)))
    m.nodes["x_0_0"].conv[3].register_forward_hook(lambda mod, i, o: seen.__setitem__("second", o.dtype))
    m.nodes["x_1_0"].conv[0].register_forward_hook(lambda mod, i, o: seen.__setitem__("x10", o.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        m(torch.randn(1, 1, 32, 32), depth=1)
    assert seen["first"] == (torch.float32, torch.float32)
    assert seen["second"] == torch.bfloat16 and seen["x10"] == torch.bfloat16
    with torch.no_grad():  # without autocast everything is fp32, and the output is unchanged by the policy
        m(torch.randn(1, 1, 32, 32), depth=1)
    assert seen["first"] == (torch.float32, torch.float32) and seen["second"] == torch.float32
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # gradients flow through the fp32 island
        out = m(torch.randn(2, 1, 32, 32), depth=1)
    out[0].float().mean().backward()
    assert m.nodes["x_0_0"].conv[0].weight.grad is not None


def test_plain_unet_baseline_matches_the_paper():
    """The U-Net baseline from the same blocks: 7.76M parameters in the paper's configuration (UNet++: 9.04M)."""
    from napari_unetpp.model.network import UNet, count_parameters

    assert round(count_parameters(UNet()) / 1e6, 2) == 7.76
    net = UNet(features=(4, 8, 16), norm="batch")
    outs = net(torch.randn(2, 1, 37, 50))
    assert len(outs) == 1 and outs[0].shape == (2, 1, 37, 50)
    assert not hasattr(net, "nodes")  # no nested nodes: one skip per level
