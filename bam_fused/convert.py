"""convert(model): swap every BAM in a model for bam_fused.BAM holding the same layers.

Handles our reference BAMs and foreign modules in the authors' layout (``channel_att.gate_c``
and ``spatial_att.gate_s`` built as in their code). The new module takes the old one's layers
themselves, not copies of their weights into stock ones: a layer the user changed (another
activation, BatchNorm eps, padding mode, a frozen BatchNorm or weight, a hook) stays as it was.
Keys, outputs and gradients stay the same.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import torch
from torch import nn

from ._checks import check_choice, check_combine
from ._layers import has_hooks, pads_by_dilation
from .modules import BAM, MODULE_BACKENDS
from .reference import BAM as ReferenceBAM


class _LayoutMismatch(ValueError):
    pass


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise _LayoutMismatch(what)


def _authors_hparams(module: nn.Module) -> dict:
    """Reads (gate_channels, reduction_ratio, dilation, num_dilated_convs) from a module in
    the authors' layout, or raises _LayoutMismatch saying what does not match."""
    gate_c = getattr(getattr(module, "channel_att", None), "gate_c", None)
    gate_s = getattr(getattr(module, "spatial_att", None), "gate_s", None)
    _expect(
        isinstance(gate_c, nn.Module) and isinstance(gate_s, nn.Module), "no channel_att.gate_c / spatial_att.gate_s"
    )
    c_names = [n for n, m in gate_c.named_children() if any(True for _ in m.parameters(recurse=False))]
    _expect(
        c_names == ["gate_c_fc_0", "gate_c_bn_1", "gate_c_fc_final"],
        f"channel gate layers {c_names} (expected one hidden layer: gate_c_fc_0, gate_c_bn_1, gate_c_fc_final)",
    )
    fc0, bn1, fc1 = gate_c.gate_c_fc_0, gate_c.gate_c_bn_1, gate_c.gate_c_fc_final
    _expect(
        isinstance(fc0, nn.Linear) and isinstance(fc1, nn.Linear) and isinstance(bn1, nn.BatchNorm1d),
        "channel gate layer types",
    )
    channels, hidden = fc0.in_features, fc0.out_features
    _expect(fc1.in_features == hidden and fc1.out_features == channels, "channel gate widths")
    reduction = channels // hidden
    _expect(reduction >= 1 and channels // reduction == hidden, f"hidden width {hidden} is not C // r for C={channels}")
    red = getattr(gate_s, "gate_s_conv_reduce0", None)
    _expect(
        isinstance(red, nn.Conv2d)
        and red.kernel_size == (1, 1)
        and red.in_channels == channels
        and red.out_channels == hidden,
        "gate_s_conv_reduce0 is not a 1x1 conv C -> C/r",
    )
    _expect(isinstance(getattr(gate_s, "gate_s_bn_reduce0", None), nn.BatchNorm2d), "gate_s_bn_reduce0")
    num_convs, dilation = 0, None
    while hasattr(gate_s, f"gate_s_conv_di_{num_convs}"):
        conv = getattr(gate_s, f"gate_s_conv_di_{num_convs}")
        d = conv.dilation[0] if isinstance(conv, nn.Conv2d) else None
        _expect(
            isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (3, 3)
            and conv.dilation == (d, d)
            and pads_by_dilation(conv, d)
            and conv.stride == (1, 1)
            and conv.groups == 1
            and conv.in_channels == hidden
            and conv.out_channels == hidden,
            f"gate_s_conv_di_{num_convs} is not a 3x3 conv C/r -> C/r with padding = dilation",
        )
        _expect(dilation in (None, d), "dilated convs with different dilations")
        _expect(
            isinstance(getattr(gate_s, f"gate_s_bn_di_{num_convs}", None), nn.BatchNorm2d), f"gate_s_bn_di_{num_convs}"
        )
        dilation = d
        num_convs += 1
    final = getattr(gate_s, "gate_s_conv_final", None)
    _expect(
        isinstance(final, nn.Conv2d)
        and final.kernel_size == (1, 1)
        and final.in_channels == hidden
        and final.out_channels == 1,
        "gate_s_conv_final is not a 1x1 conv C/r -> 1",
    )
    return dict(gate_channels=channels, reduction_ratio=reduction, dilation=dilation or 4, num_dilated_convs=num_convs)


def _looks_like_bam(module: nn.Module) -> bool:
    return (
        isinstance(module, ReferenceBAM)
        or "bam" in type(module).__name__.lower()
        or (hasattr(module, "channel_att") and hasattr(module, "spatial_att"))
    )


def _without_flatten(gate_c: nn.Sequential) -> OrderedDict:
    """The authors' gate_c layers without their Flatten: the mean of x is (N, C) already, and the
    eval op computes the reference's four layers."""
    return OrderedDict(
        (name, m) for name, m in gate_c.named_children()
        if not (name == "flatten" and type(m).__name__ == "Flatten" and next(m.parameters(), None) is None)
    )  # fmt: skip


def _converted(module: nn.Module, backend: str, combine: str | None) -> BAM:
    """A bam_fused.BAM that holds module's own layers (so every layer keeps its type, settings,
    mode, requires_grad and hooks; those the fused kernels do not compute run as modules), with
    the reference's containers around them."""
    if has_hooks(module):
        raise _LayoutMismatch("it has hooks, which a new module would not carry")
    if isinstance(module, ReferenceBAM):
        if type(module).forward not in (ReferenceBAM.forward, BAM.forward):
            raise _LayoutMismatch(f"{type(module).__name__} has its own forward")
        hp = dict(
            gate_channels=module.gate_channels,
            reduction_ratio=module.reduction_ratio,
            dilation=module.dilation,
            num_dilated_convs=module.num_dilated_convs,
        )
        mode = combine or module.combine
    else:
        hp = _authors_hparams(module)
        mode = combine or "product"  # the authors' code multiplies
        _expect(not (has_hooks(module.channel_att) or has_hooks(module.spatial_att)), "hooks on its gates")
    # On the meta device: its stock layers are replaced below (no memory, no draw from the RNG).
    with torch.device("meta"):
        new = BAM(**hp, combine=mode, backend=backend)
    if isinstance(module, ReferenceBAM):
        new.channel_att, new.spatial_att = module.channel_att, module.spatial_att
    else:
        gate_c = module.channel_att.gate_c
        if type(gate_c) is nn.Sequential:  # (another container keeps its Flatten and runs as modules)
            gate_c = nn.Sequential(_without_flatten(gate_c))
            gate_c.training = module.channel_att.gate_c.training  # (not .train(): it sets the layers too)
        new.channel_att.gate_c, new.spatial_att.gate_s = gate_c, module.spatial_att.gate_s
        new.channel_att.training, new.spatial_att.training = module.channel_att.training, module.spatial_att.training
    new.training = module.training
    _expect(set(new.state_dict()) == set(module.state_dict()), "state_dict keys that bam_fused.BAM does not have")
    return new


def convert(model: nn.Module, backend: str = "auto", combine: str | None = None, inplace: bool = False) -> nn.Module:
    """Replaces every BAM in ``model`` by a ``bam_fused.BAM`` holding its layers.

    Args:
        model: any module; the model itself may be a BAM.
        backend: backend of the new modules ("auto", "fused", "reference").
        combine: force "sum" or "product"; None keeps each module's own (reference BAMs)
            or uses "product" (authors'-layout modules, which multiply).
        inplace: modify ``model`` rather than a deep copy of it.

    A BAM-like module that does not match the layout is left alone with a warning naming it. A
    BAM shared by several parents stays shared.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_choice("backend", backend, MODULE_BACKENDS)
    if combine is not None:
        check_combine(combine)
    if not inplace:
        model = copy.deepcopy(model)

    done: dict[int, nn.Module] = {}  # a BAM reached twice (shared) becomes one new BAM

    def swap(module: nn.Module, name: str) -> nn.Module:
        if not _looks_like_bam(module):
            return module
        if id(module) in done:
            return done[id(module)]
        try:
            new = done[id(module)] = _converted(module, backend, combine)
            done[id(new)] = new  # (met again through a shared container: already converted)
            return new
        except (_LayoutMismatch, RuntimeError) as exc:
            warnings.warn(
                f"bam_fused.convert: left {name or 'the model'} ({type(module).__name__}) alone: {exc}",
                RuntimeWarning,
                stacklevel=3,
            )
            return module

    visited: set[int] = set()

    def visit(parent: nn.Module, prefix: str) -> None:
        # _modules, not named_children(), which skips a module met before: every place of a shared
        # BAM gets the same new one, and a shared container is walked once.
        visited.add(id(parent))
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            name = f"{prefix}.{child_name}" if prefix else child_name
            new = swap(child, name)
            if new is not child:
                setattr(parent, child_name, new)
            elif id(child) not in visited:
                visit(child, name)

    root = swap(model, "")
    if root is not model:
        return root
    visit(model, "")
    return model
