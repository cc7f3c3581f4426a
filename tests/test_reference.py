import copy

import pytest
import torch
import torch.nn.functional as F

import bam_fused
from bam_fused.reference import BAM, ChannelGate, SpatialGate
from bam_fused.testing import randomize_


def bn(y, m):
    shape = (1, -1) + (1,) * (y.dim() - 2)
    return (y - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps) * m.weight.view(
        shape
    ) + m.bias.view(shape)


def hand_bam(m: BAM, x: torch.Tensor) -> torch.Tensor:
    """BAM written out from the paper's formulas, independently of the module's forward."""
    gc, gs = m.channel_att.gate_c, m.spatial_att.gate_s
    pooled = x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])
    hidden = torch.relu(bn(pooled @ gc.gate_c_fc_0.weight.T + gc.gate_c_fc_0.bias, gc.gate_c_bn_1))
    mc = hidden @ gc.gate_c_fc_final.weight.T + gc.gate_c_fc_final.bias
    y = torch.relu(bn(F.conv2d(x, gs.gate_s_conv_reduce0.weight, gs.gate_s_conv_reduce0.bias), gs.gate_s_bn_reduce0))
    for i in range(m.num_dilated_convs):
        conv = getattr(gs, f"gate_s_conv_di_{i}")
        y = F.conv2d(y, conv.weight, conv.bias, padding=m.dilation, dilation=m.dilation)
        y = torch.relu(bn(y, getattr(gs, f"gate_s_bn_di_{i}")))
    ms = F.conv2d(y, gs.gate_s_conv_final.weight, gs.gate_s_conv_final.bias)
    att = mc[:, :, None, None] + ms if m.combine == "sum" else mc[:, :, None, None] * ms
    return x + x * torch.sigmoid(att)


@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("shape", [(2, 37, 7, 9), (1, 48, 9, 13), (3, 32, 1, 1), (2, 16, 12, 5)])
@pytest.mark.parametrize("dilation,convs,r", [(4, 2, 16), (1, 1, 8), (2, 3, 4)])
def test_reference_matches_hand_formula(combine, shape, dilation, convs, r):
    n, c, h, w = shape
    r = min(r, c)
    m = randomize_(BAM(c, r, dilation, convs, combine)).double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(m(x), hand_bam(m, x), rtol=1e-12, atol=1e-12)


def test_reference_is_not_trivial():
    """The gate must actually change x: a reference that returned x would pass nothing here."""
    m = randomize_(BAM(32, 4)).eval()
    x = torch.randn(2, 32, 6, 6)
    out = m(x)
    assert (out - x).abs().max() > 1e-2
    assert ((out / x) > 1 - 1e-6).all() and ((out / x) < 2 + 1e-6).all()  # 1 + sigmoid in (1, 2)


def test_shapes_of_branches():
    x = torch.randn(2, 32, 5, 7)
    assert ChannelGate(32, 4)(x).shape == (2, 32)
    assert SpatialGate(32, 4).eval()(x).shape == (2, 1, 5, 7)


def test_branch_defaults_are_the_papers():
    """r = 16, two dilated convs with dilation 4 (as BAM's own defaults): a state_dict saved from
    BAM(64) loads into gates built with defaults."""
    bam, channel, spatial = BAM(64), ChannelGate(64), SpatialGate(64)
    assert (bam.reduction_ratio, bam.dilation, bam.num_dilated_convs) == (16, 4, 2)
    assert channel.gate_c.gate_c_fc_0.out_features == 4
    channel.load_state_dict(bam.channel_att.state_dict())
    spatial.load_state_dict(bam.spatial_att.state_dict())
    convs = [m for m in spatial.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert [(c.dilation, c.padding) for c in convs] == [((4, 4), (4, 4))] * 2


def test_training_mode_batch_statistics_and_batch_one_eval():
    m = BAM(32, 4)
    out = m(torch.randn(4, 32, 5, 5))
    out.sum().backward()
    assert m.channel_att.gate_c.gate_c_bn_1.num_batches_tracked == 1
    m.eval()
    assert m(torch.randn(1, 32, 5, 5)).shape == (1, 32, 5, 5)


def test_state_dict_keys_follow_authors_layout():
    keys = set(BAM(64).state_dict())
    expected = {
        "channel_att.gate_c.gate_c_fc_0.weight", "channel_att.gate_c.gate_c_fc_0.bias",
        "channel_att.gate_c.gate_c_bn_1.weight", "channel_att.gate_c.gate_c_bn_1.running_var",
        "channel_att.gate_c.gate_c_fc_final.weight",
        "spatial_att.gate_s.gate_s_conv_reduce0.weight", "spatial_att.gate_s.gate_s_bn_reduce0.running_mean",
        "spatial_att.gate_s.gate_s_conv_di_0.weight", "spatial_att.gate_s.gate_s_bn_di_1.weight",
        "spatial_att.gate_s.gate_s_conv_final.bias",
    }  # fmt: skip
    assert expected <= keys
    assert not any("di_2" in k for k in keys)


def test_state_dict_round_trip_between_reference_and_fused():
    ref = randomize_(BAM(48, 8, combine="product")).eval()
    fused = bam_fused.BAM(48, 8, combine="product", backend="reference").eval()
    fused.load_state_dict(ref.state_dict())
    assert fused.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 48, 7, 9)
    torch.testing.assert_close(fused(x), ref(x), rtol=0, atol=0)
    back = BAM(48, 8, combine="product").eval()
    back.load_state_dict(fused.state_dict())
    torch.testing.assert_close(back(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [BAM, bam_fused.BAM])
def test_load_state_dict_reports_wrong_keys_as_the_reference(cls):
    """The fused BAM refreshes its fold on load_state_dict and must still run the module's own
    check: a key of no layer (here at the top level) or a missing one is an error, or, with
    strict=False, reported."""
    m = cls(32, 4)
    state = m.state_dict()
    del state["spatial_att.gate_s.gate_s_conv_final.bias"]
    state["scale"] = torch.ones(1)
    with pytest.raises(RuntimeError, match=r'(?s)Missing key.*"spatial_att.gate_s.gate_s_conv_final.bias".*'
                                           r'Unexpected key.*"scale"'):  # fmt: skip
        m.load_state_dict(state)
    result = m.load_state_dict(state, strict=False)
    assert result.missing_keys == ["spatial_att.gate_s.gate_s_conv_final.bias"] and result.unexpected_keys == ["scale"]


@pytest.mark.parametrize("cls", [BAM, bam_fused.BAM])
def test_construction_errors(cls):
    with pytest.raises(ValueError, match=r"gate_channels // reduction_ratio must be >= 1.*8 // 16"):
        cls(8)
    with pytest.raises(ValueError, match="combine must be one of 'sum', 'product', got 'max'"):
        cls(64, combine="max")
    with pytest.raises(ValueError, match="dilation must be an integer >= 1"):
        cls(64, dilation=0)
    with pytest.raises(ValueError, match="reduction_ratio must be an integer >= 1"):
        cls(64, reduction_ratio=0)


@pytest.mark.parametrize("cls", [BAM, bam_fused.BAM])
def test_integer_settings_must_be_integers(cls):
    # A float or bool ratio would size the layers by truncation or as 1, silently.
    for kwargs, name, minimum in (
        ({"gate_channels": 64.0}, "gate_channels", 1),
        ({"gate_channels": True}, "gate_channels", 1),
        ({"gate_channels": 64, "reduction_ratio": 2.5}, "reduction_ratio", 1),
        ({"gate_channels": 64, "dilation": True}, "dilation", 1),
        ({"gate_channels": 64, "dilation": "4"}, "dilation", 1),
        ({"gate_channels": 64, "num_dilated_convs": -1}, "num_dilated_convs", 0),
    ):
        with pytest.raises(ValueError, match=rf"{name} must be an integer >= {minimum}, got "):
            cls(**kwargs)
    # The edges are accepted: one hidden channel, no dilated convs, dilation 1.
    m = cls(16, 16, dilation=1, num_dilated_convs=0).eval()
    assert m.channel_att.gate_c.gate_c_fc_0.out_features == 1
    assert not any("_di_" in name for name, _ in m.named_modules())
    with torch.no_grad():
        assert m(torch.randn(2, 16, 3, 5)).shape == (2, 16, 3, 5)


def test_fused_backend_argument_is_checked():
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'fused', 'reference', got 'cuda'"):
        bam_fused.BAM(64, backend="cuda")


@pytest.mark.parametrize("cls", [BAM, bam_fused.BAM])
def test_settings_are_checked_when_assigned_later(cls):
    """combine and backend are read on every call: a typo assigned later ("mul") used to pick a
    formula silently (the fused eval op took anything but "product" for "sum", the reference
    anything but "sum" for "product")."""
    m = cls(32, 4)
    with pytest.raises(ValueError, match="combine must be one of 'sum', 'product', got 'mul'"):
        m.combine = "mul"
    m.combine = "product"
    assert m.combine == "product" and "combine='product'" in repr(m)
    if cls is bam_fused.BAM:
        with pytest.raises(ValueError, match="backend must be one of 'auto', 'fused', 'reference', got 'refrence'"):
            m.backend = "refrence"
        m.backend = "reference"
        assert copy.deepcopy(m).backend == "reference" and "backend='reference'" in repr(m)


@pytest.mark.parametrize("cls", [BAM, bam_fused.BAM])
def test_call_errors(cls):
    m = cls(32, 4).eval()
    with pytest.raises(ValueError, match=r"x must have 32 channels .* got shape \(2, 16, 5, 5\)"):
        m(torch.randn(2, 16, 5, 5))
    with pytest.raises(ValueError, match=r"x must be 4-D \(N, C, H, W\), got shape \(32, 5, 5\)"):
        m(torch.randn(32, 5, 5))
    with pytest.raises(TypeError, match="x must have a floating dtype .* got int64"):
        m(torch.ones(2, 32, 5, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        m([1.0])
    x = torch.randn(2, 32, 5, 5)
    with torch.no_grad():
        m(x)  # (the fused module's CPU eval call is then cached: the checks below must still run)
        for bad, layout in ((x.to_sparse(), "sparse_coo"), (x.to_mkldnn(), "_mkldnn")):
            with pytest.raises(TypeError, match=rf"x must be a dense \(strided\) tensor, got layout {layout}"):
                m(bad)
    for training in (False, True):
        for shape in ((2, 32, 0, 5), (2, 32, 5, 0)):
            with pytest.raises(ValueError, match=r"x must have H, W >= 1 \(BAM's channel branch averages"):
                m.train(training)(torch.randn(shape))


def test_fused_module_rejects_mixed_devices():
    m = bam_fused.BAM(32, 4).to("meta")
    with pytest.raises(ValueError, match="x is on cpu but this BAM's parameters are on meta"):
        m(torch.randn(2, 32, 5, 5))
    # Without the stock channel MLP, whose first weight it reads first, forward asks any parameter.
    m.channel_att = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 32))
    with pytest.raises(ValueError, match="x is on cpu but this BAM's parameters are on meta"):
        m.to("meta")(torch.randn(2, 32, 5, 5))
