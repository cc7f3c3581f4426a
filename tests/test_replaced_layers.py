"""A BAM whose containers or layers were replaced by modules with their own forward (a subclass
of the stock one, as for CBAM-style pooling or weight standardisation) runs them, in every mode.
The fused paths skip the layers' forwards: the CPU autograd path used to compute the mean of x
and the stock 1x1 conv whatever the modules were (0.3 to 1.5 off, silently), and the eval path's
fallback took it too."""

import copy
import warnings
from collections import OrderedDict

import pytest
import test_convert as convert_test
import torch
from test_training_tail import assert_same_training, count_tail_ops
from torch import nn

import bam_fused
from bam_fused import _backends, _layers
from bam_fused.reference import BAM as RefBAM
from bam_fused.reference import ChannelGate, SpatialGate
from bam_fused.testing import randomize_

C, R, D = 48, 8, 2  # 6 reduced channels


class MaxPooledChannelGate(ChannelGate):
    """CBAM's channel pooling: the maximum over H and W, not the mean."""

    def forward(self, x):
        return self.gate_c(x.amax(dim=(2, 3)))


class DoubledSpatialGate(SpatialGate):
    def forward(self, x):
        return 2 * self.gate_s(x)


class HalvedSequential(nn.Sequential):
    def forward(self, x):
        return 0.5 * super().forward(x)


class StandardizedConv(nn.Conv2d):
    """Weight standardisation in the forward."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class LinearChannelGate(nn.Module):
    """A channel gate without the reference's gate_c: one Linear on the channel means."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(C, C)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def _like(cls, old, *args):
    new = cls(*args)
    new.load_state_dict(old.state_dict())
    return new


def _seeded(cls):
    torch.manual_seed(5)  # the same weights in both modules
    return cls()


# The module at a path (words after it say how, where one path has several), replaced.
REPLACEMENTS = {
    "channel_att": lambda m: _like(MaxPooledChannelGate, m.channel_att, C, R),
    # No gate_c_fc_0 to read the parameters' device from (forward asks every call).
    "channel_att without gate_c": lambda m: _seeded(LinearChannelGate),
    "spatial_att": lambda m: _like(DoubledSpatialGate, m.spatial_att, C, R, D),
    "channel_att.gate_c": lambda m: HalvedSequential(OrderedDict(m.channel_att.gate_c.named_children())),
    "spatial_att.gate_s": lambda m: HalvedSequential(OrderedDict(m.spatial_att.gate_s.named_children())),
    "spatial_att.gate_s.gate_s_conv_reduce0": lambda m: _like(
        StandardizedConv, m.spatial_att.gate_s.gate_s_conv_reduce0, C, C // R, 1
    ),
}


def replaced_pair(key):
    ref = randomize_(RefBAM(C, R, D))
    fused = bam_fused.BAM(C, R, D)
    fused.load_state_dict(ref.state_dict())
    with torch.no_grad():
        fused.eval()(torch.randn(2, C, 9, 13))  # a cached fold of the stock layers must not survive
    parent, _, name = key.partition(" ")[0].rpartition(".")
    for m in (ref, fused):
        setattr(m.get_submodule(parent), name, REPLACEMENTS[key](m))
    return ref, fused


@pytest.mark.parametrize("mode", ["train", "eval with gradients", "eval", "compiled train"])
@pytest.mark.parametrize("key", list(REPLACEMENTS))
def test_replaced_containers_and_layers_run_as_modules(monkeypatch, key, mode):
    torch.manual_seed(0)
    ref, fused = replaced_pair(key)
    for m in (ref, fused):
        m.train(mode.endswith("train"))
    x = torch.randn(3, C, 9, 13)
    compiled = mode.startswith("compiled")
    run = torch.compile(fused, fullgraph=True, backend="aot_eager") if compiled else fused
    monkeypatch.setattr(_backends, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if mode == "eval":
            with torch.no_grad():
                torch.testing.assert_close(run(x), ref(x), rtol=1e-5, atol=1e-5)
        else:  # two steps: outputs, gradients and running statistics
            assert_same_training(ref, run, x, torch.randn_like(x))
    said = [str(w.message) for w in caught if "run as the module's layers" in str(w.message)]
    assert len(said) == (0 if compiled else 1), said  # (no warning while Dynamo traces)


def test_the_autograd_path_takes_the_stock_layers_and_any_rest():
    """The check is not stricter than it must be: the stock BAM, and one whose rest of the
    branches was replaced (run as layers after the fused pass over x), keep the CPU autograd path."""
    ref, fused = RefBAM(C, R, D), bam_fused.BAM(C, R, D)
    assert _layers.autograd_reason(ref) is None and _layers.autograd_reason(fused) is None
    fused.spatial_att.gate_s.gate_s_relu_di_0 = nn.LeakyReLU()
    fused.channel_att.gate_c.gate_c_relu_1 = nn.GELU()
    assert _layers.autograd_reason(fused) is None
    torch.nn.utils.parametrizations.weight_norm(fused.spatial_att.gate_s.gate_s_conv_reduce0)
    assert _layers.autograd_reason(fused) is None  # its .weight is what its forward uses
    for key in REPLACEMENTS:
        _, replaced = replaced_pair(key)
        assert _layers.autograd_reason(replaced) is not None, key


@pytest.mark.parametrize("mode", ["train", "eval with gradients", "eval"])
def test_a_layer_set_to_none_raises_as_in_the_reference(mode):
    """Before 2026-11-26 the layer checks themselves failed on it (AttributeError on None)."""
    for m in (RefBAM(C, R, D), bam_fused.BAM(C, R, D)):
        m.train(mode == "train").spatial_att.gate_s.gate_s_relu_di_0 = None
        grad = mode != "eval"
        with torch.set_grad_enabled(grad), pytest.raises(TypeError, match="'NoneType' object is not callable"):
            m(torch.randn(2, C, 5, 5, requires_grad=grad))


SPECTRAL = {
    "gate_c_fc_0": lambda m: m.channel_att.gate_c.gate_c_fc_0,
    "gate_s_conv_reduce0": lambda m: m.spatial_att.gate_s.gate_s_conv_reduce0,
    "gate_s_conv_di_0": lambda m: m.spatial_att.gate_s.gate_s_conv_di_0,
}


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("layer", list(SPECTRAL))
def test_spectral_norm_iterates_once_per_forward_as_in_the_reference(layer, compiled):
    """spectral_norm's power iteration advances on every read of .weight in training mode. Until
    2026-11-26 the fused paths read gate_c_fc_0's and the reduce conv's weight for their dtype
    and device too, so its state drifted from the reference's (u off by 0.01 after 3 steps)."""
    torch.manual_seed(0)
    ref = randomize_(RefBAM(C, R, D)).train()
    torch.nn.utils.parametrizations.spectral_norm(SPECTRAL[layer](ref))
    fused = bam_fused.convert(copy.deepcopy(ref))
    run = torch.compile(fused, fullgraph=True, backend="aot_eager") if compiled else fused
    for _ in range(3):
        x = torch.randn(2, C, 9, 13)
        torch.testing.assert_close(run(x), ref(x), rtol=1e-5, atol=1e-5)
    state = [SPECTRAL[layer](m).parametrizations.weight[0]._u for m in (ref, fused)]
    torch.testing.assert_close(state[1], state[0], rtol=0, atol=0)


def test_dynamically_quantized_linears_run_as_modules(monkeypatch):
    """torch.ao.quantization.quantize_dynamic swaps the channel MLP's Linears for quantized ones
    (also named "Linear"): the eval op does not compute them, so they run, and the warning names
    their module."""
    ref = randomize_(RefBAM(C, R, D)).eval()
    fused = bam_fused.convert(copy.deepcopy(ref)).eval()
    quantized = [torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8) for m in (ref, fused)]
    x = torch.randn(2, C, 9, 13)
    monkeypatch.setattr(_backends, "_warned", set())
    with torch.no_grad(), pytest.warns(RuntimeWarning, match=r"gate_c_fc_0 .* \(a torch\.ao\.nn\.quantized\.dynamic"):
        torch.testing.assert_close(quantized[1](x), quantized[0](x), rtol=1e-5, atol=1e-5)


def _same_padded(m):
    """m's dilated convs as padding="same" convs with the same weights (the same computation)."""
    gs = m.spatial_att.gate_s
    for name in [n for n in gs._modules if n.startswith("gate_s_conv_di_")]:
        old = gs._modules[name]
        new = nn.Conv2d(old.in_channels, old.out_channels, 3, padding="same", dilation=old.dilation)
        new.load_state_dict(old.state_dict())
        setattr(gs, name, new)


def test_same_padded_dilated_convs_keep_the_fused_paths(monkeypatch):
    """padding="same" on a 3x3 conv is its dilation on each side: the eval op and the training
    path's C++ tail take it (before 2026-11-26 it ran as modules, with a warning)."""
    ref = randomize_(RefBAM(C, R, D))
    fused = bam_fused.convert(copy.deepcopy(ref))
    for m in (ref, fused):
        _same_padded(m)
    x = torch.randn(3, C, 9, 13)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), ref.eval()(x), rtol=1e-5, atol=1e-5)
    assert fused.folded()["unsupported"] is None
    calls = count_tail_ops(monkeypatch)
    assert_same_training(ref.train(), fused.train(), x, torch.randn_like(x))
    assert "spatial_train" in calls
    authors = convert_test.AuthorsBAM(C, dilation_val=D)
    _same_padded(authors)
    assert type(bam_fused.convert(authors)) is bam_fused.BAM
