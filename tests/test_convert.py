import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_forward_backward
from torch import nn

import bam_fused
from bam_fused.testing import randomize_


# The authors' modules, rebuilt here from their published code (layout and math, product).
class Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class AuthorsChannelGate(nn.Module):
    def __init__(self, gate_channel, reduction_ratio=16, num_layers=1):
        super().__init__()
        self.gate_c = nn.Sequential()
        self.gate_c.add_module("flatten", Flatten())
        gate_channels = [gate_channel] + [gate_channel // reduction_ratio] * num_layers + [gate_channel]
        for i in range(len(gate_channels) - 2):
            self.gate_c.add_module(f"gate_c_fc_{i}", nn.Linear(gate_channels[i], gate_channels[i + 1]))
            self.gate_c.add_module(f"gate_c_bn_{i + 1}", nn.BatchNorm1d(gate_channels[i + 1]))
            self.gate_c.add_module(f"gate_c_relu_{i + 1}", nn.ReLU())
        self.gate_c.add_module("gate_c_fc_final", nn.Linear(gate_channels[-2], gate_channels[-1]))

    def forward(self, x):
        avg_pool = F.avg_pool2d(x, x.size(2), stride=x.size(2))
        return self.gate_c(avg_pool).unsqueeze(2).unsqueeze(3).expand_as(x)


class AuthorsSpatialGate(nn.Module):
    def __init__(self, gate_channel, reduction_ratio=16, dilation_conv_num=2, dilation_val=4):
        super().__init__()
        r = gate_channel // reduction_ratio
        self.gate_s = nn.Sequential()
        self.gate_s.add_module("gate_s_conv_reduce0", nn.Conv2d(gate_channel, r, kernel_size=1))
        self.gate_s.add_module("gate_s_bn_reduce0", nn.BatchNorm2d(r))
        self.gate_s.add_module("gate_s_relu_reduce0", nn.ReLU())
        for i in range(dilation_conv_num):
            self.gate_s.add_module(
                f"gate_s_conv_di_{i}", nn.Conv2d(r, r, kernel_size=3, padding=dilation_val, dilation=dilation_val)
            )
            self.gate_s.add_module(f"gate_s_bn_di_{i}", nn.BatchNorm2d(r))
            self.gate_s.add_module(f"gate_s_relu_di_{i}", nn.ReLU())
        self.gate_s.add_module("gate_s_conv_final", nn.Conv2d(r, 1, kernel_size=1))

    def forward(self, x):
        return self.gate_s(x).expand_as(x)


class AuthorsBAM(nn.Module):
    def __init__(self, gate_channel, reduction_ratio=16, **kw):
        super().__init__()
        self.channel_att = AuthorsChannelGate(gate_channel, reduction_ratio)
        self.spatial_att = AuthorsSpatialGate(gate_channel, reduction_ratio, **kw)

    def forward(self, x):
        att = 1 + torch.sigmoid(self.channel_att(x) * self.spatial_att(x))
        return att * x


class Net(nn.Module):
    def __init__(self, bam_cls=AuthorsBAM, **kw):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.bam1 = bam_cls(32, **kw)
        self.body = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), bam_cls(64, **kw))
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        x = self.body(self.bam1(self.stem(x)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize(
    "kw", [{}, {"dilation_val": 2, "dilation_conv_num": 3}, {"dilation_conv_num": 0}, {"reduction_ratio": 1}]
)
def test_convert_authors_layout_keeps_keys_and_outputs(kw):
    net = randomize_(Net(**kw)).eval()
    x = torch.randn(2, 3, 12, 12)  # square: the authors' pooling assumes H == W
    before, keys = net(x), list(net.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say: every other module is not BAM-like
        converted = bam_fused.convert(net, backend="reference")
    assert converted is not net and isinstance(net.bam1, AuthorsBAM)  # not in place by default
    assert isinstance(converted.bam1, bam_fused.BAM) and isinstance(converted.body[1], bam_fused.BAM)
    assert converted.bam1.combine == "product"
    assert converted.bam1.dilation == kw.get("dilation_val", 4)  # (4, the default, without dilated convs)
    assert converted.bam1.reduction_ratio == kw.get("reduction_ratio", 16)
    assert not any(m.training for m in converted.modules())  # the mode too
    assert list(converted.state_dict()) == keys
    torch.testing.assert_close(converted(x), before, rtol=1e-5, atol=1e-5)
    # The default backend gives the same outputs through whatever kernels are active.
    with torch.no_grad():
        torch.testing.assert_close(bam_fused.convert(net)(x), before, rtol=1e-4, atol=1e-4)


def test_convert_inplace_and_root_and_reference_bams():
    net = Net(bam_cls=lambda c: bam_fused.reference.BAM(c, combine="sum"))
    assert bam_fused.convert(net, inplace=True) is net
    assert type(net.bam1) is bam_fused.BAM and net.bam1.combine == "sum"
    root = bam_fused.convert(bam_fused.reference.BAM(32), combine="product", backend="reference")
    assert type(root) is bam_fused.BAM and root.combine == "product" and root.backend == "reference"


def test_convert_leaves_mismatching_module_alone_with_warning():
    net = Net()
    net.bam1.spatial_att.gate_s.gate_s_conv_di_0 = nn.Conv2d(2, 2, 5, padding=2)
    with pytest.warns(RuntimeWarning, match=r"left bam1 \(AuthorsBAM\) alone: gate_s_conv_di_0 is not a 3x3 conv"):
        out = bam_fused.convert(net)
    assert isinstance(out.bam1, AuthorsBAM) and isinstance(out.body[1], bam_fused.BAM)


class OnlyChannelGate(nn.Module):  # an SE-like block with BAM's channel gate alone: not a BAM
    def __init__(self):
        super().__init__()
        self.channel_att = AuthorsChannelGate(32)


class MyBamBlock(nn.Module):  # called a BAM, laid out otherwise
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(32, 32, 1)


def test_convert_takes_for_a_bam_what_is_called_one_or_has_both_gates():
    with pytest.warns(RuntimeWarning) as record:
        out = bam_fused.convert(nn.Sequential(OnlyChannelGate(), MyBamBlock(), AuthorsBAM(32)))
    assert [str(w.message) for w in record] == [
        "bam_fused.convert: left 1 (MyBamBlock) alone: no channel_att.gate_c / spatial_att.gate_s"
    ]
    assert [type(m) for m in out] == [OnlyChannelGate, MyBamBlock, bam_fused.BAM]


def _set(path, make):
    def change(m):
        parent, _, name = path.rpartition(".")
        setattr(m.get_submodule(parent), name, make())

    return change


def _hidden(width):  # 32 -> width -> 32, where no r gives 32 // r == width
    def change(m):
        gc = m.channel_att.gate_c
        gc.gate_c_fc_0, gc.gate_c_bn_1 = nn.Linear(32, width), nn.BatchNorm1d(width)
        gc.gate_c_fc_final = nn.Linear(width, 32)

    return change


def _hooked(path):
    return lambda m: m.get_submodule(path).register_forward_pre_hook(lambda *args: None)


MISMATCHES = {  # the authors' layout at C = 32, r = 16 (2 hidden channels), changed in one place
    "no channel_att.gate_c": _set("channel_att", nn.Identity),
    "channel gate layers": _set("channel_att", lambda: AuthorsChannelGate(32, num_layers=2)),
    "channel gate layer types": _set("channel_att.gate_c.gate_c_bn_1", lambda: nn.LayerNorm(2)),
    "channel gate widths": _set("channel_att.gate_c.gate_c_fc_final", lambda: nn.Linear(2, 16)),
    "hidden width 7 is not C // r": _hidden(7),
    "hidden width 64 is not C // r": _hidden(64),
    "gate_s_conv_reduce0 is not a 1x1 conv": _set(
        "spatial_att.gate_s.gate_s_conv_reduce0", lambda: nn.Conv2d(32, 2, 3, padding=1)
    ),
    "gate_s_bn_reduce0": _set("spatial_att.gate_s.gate_s_bn_reduce0", lambda: nn.GroupNorm(1, 2)),
    "dilated convs with different dilations": _set(
        "spatial_att.gate_s.gate_s_conv_di_1", lambda: nn.Conv2d(2, 2, 3, padding=2, dilation=2)
    ),
    "gate_s_bn_di_0": _set("spatial_att.gate_s.gate_s_bn_di_0", nn.Identity),
    "gate_s_conv_final is not a 1x1 conv": _set("spatial_att.gate_s.gate_s_conv_final", lambda: nn.Conv2d(2, 2, 1)),
    "state_dict keys that bam_fused.BAM does not have": _set("scale", lambda: nn.Parameter(torch.ones(1))),
    "hooks on its gates (channel)": _hooked("channel_att"),
    "hooks on its gates (spatial)": _hooked("spatial_att"),
}


@pytest.mark.parametrize("what", list(MISMATCHES))
def test_convert_names_each_mismatch_of_the_authors_layout(what):
    m = AuthorsBAM(32)
    MISMATCHES[what](m)
    reason = what.partition(" (")[0]  # (a key may say where, in brackets)
    with pytest.warns(RuntimeWarning, match=rf"left the model \(AuthorsBAM\) alone: {re.escape(reason)}"):
        assert type(bam_fused.convert(m)) is AuthorsBAM


def test_convert_errors():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        bam_fused.convert(42)
    for model in (Net(), nn.Linear(2, 2)):  # checked whether or not the model holds a BAM
        with pytest.raises(ValueError, match="backend must be one of"):
            bam_fused.convert(model, backend="triton")
        with pytest.raises(ValueError, match="combine must be one of"):
            bam_fused.convert(model, combine="mul")


class MaxPooledChannelGate(bam_fused.reference.ChannelGate):
    def forward(self, x):
        return self.gate_c(x.amax(dim=(2, 3)))


def _max_pooled(m):
    gate = MaxPooledChannelGate(32)
    gate.load_state_dict(m.channel_att.state_dict())
    m.channel_att = gate


# Layers a user changed in a BAM before converting it. Each must survive the conversion (until
# 2026-11-26 convert built stock layers and loaded the weights: outputs 0.003 to 1.3 off, silently).
LAYER_CHANGES = {
    "leaky relu": lambda m: setattr(m.spatial_att.gate_s, "gate_s_relu_di_0", nn.LeakyReLU(0.2)),
    "batchnorm eps": lambda m: setattr(m.spatial_att.gate_s.gate_s_bn_di_0, "eps", 0.1),
    "reflect padding": lambda m: setattr(m.spatial_att.gate_s.gate_s_conv_di_0, "padding_mode", "reflect"),
    "frozen batchnorm": lambda m: m.spatial_att.gate_s.gate_s_bn_reduce0.eval(),
    "frozen channel batchnorm": lambda m: m.channel_att.gate_c.gate_c_bn_1.eval(),
    "frozen weights": lambda m: m.spatial_att.requires_grad_(False),
    "max-pooled channel gate": _max_pooled,
}


@pytest.mark.parametrize(
    "kind,change",
    [("reference", c) for c in LAYER_CHANGES] + [("authors", c) for c in LAYER_CHANGES if "channel gate" not in c],
)
def test_convert_keeps_each_layer_as_it_was(kind, change):
    torch.manual_seed(0)
    bam = randomize_(AuthorsBAM(32) if kind == "authors" else bam_fused.reference.BAM(32, combine="product")).train()
    LAYER_CHANGES[change](bam)
    rng = torch.get_rng_state()
    converted = bam_fused.convert(bam)
    assert torch.equal(torch.get_rng_state(), rng)  # no draws for layers it throws away
    assert type(converted) is bam_fused.BAM
    modes = {n: m.training for n, m in bam.named_modules() if not n.endswith("flatten")}
    assert {n: m.training for n, m in converted.named_modules()} == modes
    assert {n: p.requires_grad for n, p in converted.named_parameters()} == {
        n: p.requires_grad for n, p in bam.named_parameters()
    }
    x = torch.randn(2, 32, 8, 8)  # square: the authors' pooling assumes H == W
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers the fused kernels do not compute say so once
        for train in (True, False):
            for m in (bam, converted):
                m.train(train)
                if change.startswith("frozen") and "batchnorm" in change:
                    LAYER_CHANGES[change](m)  # frozen again after .train()
            assert_same_forward_backward(bam, converted, x, grad_rtol=1e-4)
        for (name, b), bc in zip(bam.named_buffers(), converted.buffers(), strict=True):
            torch.testing.assert_close(bc, b, msg=name)


def test_convert_keeps_a_shared_bam_shared():
    """nn.Module.named_children() skips a module met before: until 2026-11-26 the second place of a
    shared BAM kept the reference."""
    bam = bam_fused.reference.BAM(32)
    block = nn.Sequential(bam, nn.ReLU())
    model = nn.Sequential(bam, nn.Identity(), bam, block, block)
    converted = bam_fused.convert(model)
    assert type(converted[0]) is bam_fused.BAM and converted[0] is converted[2] is converted[3][0]
    assert converted[3] is converted[4]


def test_convert_leaves_bams_with_their_own_forward_or_hooks_alone():
    class Scaled(bam_fused.reference.BAM):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.warns(RuntimeWarning, match=r"left the model \(Scaled\) alone: Scaled has its own forward"):
        assert type(bam_fused.convert(Scaled(32))) is Scaled
    hooked = bam_fused.reference.BAM(32)
    hooked.register_forward_hook(lambda *args: None)
    with pytest.warns(RuntimeWarning, match="alone: it has hooks"):
        assert type(bam_fused.convert(hooked)) is bam_fused.reference.BAM
    # Hooks on its layers go with the layers.
    layer_hooked = bam_fused.reference.BAM(32)
    seen = []
    layer_hooked.spatial_att.register_forward_hook(lambda m, i, o: seen.append(o))
    converted = bam_fused.convert(layer_hooked)
    with torch.no_grad():
        converted.eval()(torch.randn(1, 32, 5, 5))
    assert type(converted) is bam_fused.BAM and len(seen) == 1
