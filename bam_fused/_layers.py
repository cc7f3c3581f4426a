"""Which of a BAM's branch layers each fused path computes.

The fused paths skip the layers' own forwards: the eval op folds them into weights, the CPU
autograd path reads the reduce conv's weights and the mean of x itself. So each path runs only
when the layers are the ones it computes; anything else (a replaced or subclassed layer or
container) runs as the module's layers, as in the reference. A replaced layer used to be
computed as if it were the stock one, silently (another dilation or padding: 0.14 off).
"""

from __future__ import annotations

import torch
from torch import nn

from . import reference
from .ops.branches import BRANCH_DTYPES


def exactly(m: nn.Module, cls: type) -> bool:
    """m is a cls itself (not a subclass with its own forward), or one with torch.nn.utils.parametrize
    parametrizations (which makes a subclass for it)."""
    t = type(m)
    return t is cls or (t.__bases__ == (cls,) and "parametrizations" in m._modules)


def has_hooks(m: nn.Module) -> bool:
    """Whether a forward or backward hook is registered on m itself."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def raw_weight(m: nn.Module) -> torch.Tensor | None:
    """m's weight, or with a torch.nn.utils.parametrize parametrization its (first) original, for
    its device and dtype: reading .weight runs the parametrization, and spectral_norm's power
    iteration advances on every read in training mode (the reference reads once per forward)."""
    w = m._parameters.get("weight")
    if w is None and "parametrizations" in m._modules and "weight" in m._modules["parametrizations"]._modules:
        w = next(m._modules["parametrizations"]._modules["weight"].parameters(), None)
    return w


def branch_layers(bam: nn.Module) -> tuple[dict, dict] | None:
    """gate_c's and gate_s's layers by name (their _modules, where assignments land), or None when
    channel_att and spatial_att are not the reference's containers holding nn.Sequentials (whose
    forwards the fused paths compute: gate_c on the mean of x, gate_s on x)."""
    ca, sa = bam._modules.get("channel_att"), bam._modules.get("spatial_att")
    if type(ca) is not reference.ChannelGate or type(sa) is not reference.SpatialGate:
        return None
    gc, gs = ca._modules.get("gate_c"), sa._modules.get("gate_s")
    if type(gc) is not nn.Sequential or type(gs) is not nn.Sequential:
        return None
    return gc._modules, gs._modules


_NOT_CONTAINERS = "channel_att, spatial_att or their gate_c, gate_s are not the reference's containers"


def pads_by_dilation(conv: nn.Conv2d, dilation: int) -> bool:
    """A 3x3 conv's zero padding is its dilation on each side: padding=(d, d), or "same"."""
    return conv.padding in ((dilation, dilation), "same")


def _plain_conv(m: nn.Module, one: bool, dilation: int) -> bool:
    """A Conv2d with stride 1 and groups 1: 1x1 without padding (one), or 3x3 with zero padding =
    dilation."""
    if not (exactly(m, nn.Conv2d) and m.stride == (1, 1) and m.groups == 1):
        return False
    if one:
        return m.kernel_size == (1, 1) and m.padding == (0, 0)
    d = (dilation, dilation)
    return m.kernel_size == (3, 3) and m.dilation == d and pads_by_dilation(m, dilation) and m.padding_mode == "zeros"


def op_reason(bam: nn.Module) -> str | None:
    """Why the eval op cannot compute these branches (None when it can). It computes the
    reference's layers: Linear, BatchNorm with running statistics (folded), ReLU; a 1x1 reduce
    conv, 3x3 convs with zero padding = dilation = bam.dilation, a 1x1 conv to one channel."""
    layers = branch_layers(bam)
    if layers is None:
        return _NOT_CONTAINERS
    gc, gs = layers
    k = bam.num_dilated_convs
    names = ["gate_s_conv_reduce0", "gate_s_bn_reduce0", "gate_s_relu_reduce0"]
    names += [f"gate_s_{kind}_di_{i}" for i in range(k) for kind in ("conv", "bn", "relu")]
    if list(gc) != ["gate_c_fc_0", "gate_c_bn_1", "gate_c_relu_1", "gate_c_fc_final"]:
        return "gate_c does not hold the reference's four layers"
    if list(gs) != [*names, "gate_s_conv_final"]:
        return f"gate_s does not hold the reference's {len(names) + 1} layers"
    for name, m in {**gc, **gs}.items():
        kind = name.split("_")[2]
        if kind == "fc":
            ok = exactly(m, nn.Linear) and (m.bias is not None or name == "gate_c_fc_0")
        elif kind == "bn":
            ok = (any(exactly(m, c) for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm))
                  and not m.training and m.running_mean is not None and m.running_var is not None)  # fmt: skip
        elif kind == "relu":
            ok = type(m) is nn.ReLU
        else:
            ok = _plain_conv(m, not name.startswith("gate_s_conv_di_"), bam.dilation)
            ok = ok and (name != "gate_s_conv_final" or (m.out_channels == 1 and m.bias is not None))
        if not ok:
            # (No repr(m): Dynamo cannot trace a conv's.)
            t = type(m)  # (its module too where the name is ambiguous: a quantized Linear is a "Linear")
            kind = t.__name__ if t.__module__.startswith("torch.nn.modules") else f"{t.__module__}.{t.__name__}"
            return f"{name} is not what the eval op computes (a {kind}, training={getattr(m, 'training', None)})"
    return None


def autograd_reason(bam: nn.Module) -> str | None:
    """Why the CPU autograd path (ops/training.py) cannot compute these branches (None when it
    can). It computes the mean of x into gate_c and gate_s's first layer, a plain 1x1 conv, from
    one pass over x; gate_c and the rest of gate_s run as layers, whatever they are."""
    layers = branch_layers(bam)
    if layers is None:
        return _NOT_CONTAINERS
    gc, gs = layers
    first, red = next(iter(gs.items()), (None, None))
    if first != "gate_s_conv_reduce0" or not _plain_conv(red, True, 1):
        return "gate_s does not start with gate_s_conv_reduce0, a plain 1x1 conv"
    weight = raw_weight(red)
    if weight is None or weight.dtype not in BRANCH_DTYPES:
        return f"gate_s_conv_reduce0's weight is {None if weight is None else weight.dtype}"
    if None in gc.values() or None in gs.values():
        return "a layer of gate_c or gate_s is None"
    fc0 = gc.get("gate_c_fc_0")
    if fc0 is None or raw_weight(fc0) is None:
        return "gate_c has no gate_c_fc_0 with a weight"
    return None
