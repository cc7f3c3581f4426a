"""BatchNorm folding for the eval op: a BAM's branch weights with every BatchNorm folded in, and
the key that tells when a cached fold is stale."""

from __future__ import annotations

import torch
from torch import nn

from . import _ext
from ._layers import branch_layers

# The branch op runs the library's convs channels_last (cuDNN's or oneDNN's NHWC kernels, no
# transposes) or our CUDA kernel, which reads any strides: channels_last weights spare a
# reorder per call (oneDNN, batch 1, 64 x 14 x 14: 0.072 against 0.088 ms per conv).
_DILATED_WEIGHT_FORMAT = torch.channels_last


def _fold_bn(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and shift with bn(y) == y * scale + shift in eval mode, in fp32."""
    var, mean = bn.running_var.float(), bn.running_mean.float()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.float()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    return scale, shift


def _fold_linear(weight: torch.Tensor, bias: torch.Tensor | None, bn) -> tuple[torch.Tensor, torch.Tensor]:
    """Folds bn(weight @ y + bias) into one (weight, bias) pair, fp32. Works for convs too."""
    scale, shift = _fold_bn(bn)
    w = weight.float() * scale.view(-1, *([1] * (weight.dim() - 1)))
    b = shift if bias is None else bias.float() * scale + shift
    return w, b


# The layer attributes a fold depends on (BatchNorm's eps) or that decide whether the op computes
# the layer at all (a conv's geometry; _layers.op_reason): changed in place, they refold.
_LAYER_ATTRS = ("eps", "stride", "padding", "dilation", "groups", "padding_mode")
_RUNNING_STATS = ("running_mean", "running_var")


def fold_key(bam: nn.Module) -> tuple[list, list[torch.Tensor]]:
    """What the fold depends on: a key and the layers' tensors. The key holds every layer of the
    branches (identity, mode, the attributes above), read each time straight from _modules,
    _parameters and _buffers, where assignments land, so that replaced layers and a layer's own
    .train() refresh the fold. The tensors' contents: on the CPU, their bytes, compared by
    unchanged with a snapshot; elsewhere, which that comparison would wait for, each tensor's
    address and version in the key (replaced tensors, in-place updates: an optimizer step; not
    writes through .data, which bump no version). Flat, without a tuple per item."""
    layers = branch_layers(bam)
    if layers is None:
        return [object()], []  # never equal: _layers.op_reason says why the op cannot run
    key: list = [bam.training, bam.dilation, bam.num_dilated_convs]
    tensors: list[torch.Tensor] = []
    add, keep = key.append, tensors.append  # appends, not tuples: 12 -> 6 us a call
    for group in layers:
        for m in group.values():
            add(id(m))
            if m is None:  # (a layer set to None: the layers run, and raise as the reference's)
                continue
            add(m.training)
            attrs = m.__dict__
            for name in _LAYER_ATTRS:
                add(attrs.get(name))
            if "parametrizations" in m._modules:
                # A parametrized weight (torch.nn.utils.parametrize: weight_norm, spectral_norm) is
                # computed from tensors this key does not watch: fold it anew on every call.
                add(object())
            for t in m._parameters.values():
                add(t is None)
                if t is not None:
                    keep(t)
            buffers = m._buffers
            if buffers:  # a BatchNorm's statistics (not num_batches_tracked, which eval mode does not read)
                for name in _RUNNING_STATS:
                    t = buffers.get(name)
                    add(t is None)
                    if t is not None:
                        keep(t)
    if tensors and not tensors[0].is_cpu:
        for t in tensors:
            add(t.data_ptr())
            add(t._version)
    return key, tensors


def snapshot(tensors: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor] | None:
    """What unchanged compares the layers' tensors with later: on the CPU their bytes, with their
    dtypes and sizes, in one tensor (the extension's bytes_of; copies of them without it); None
    elsewhere."""
    if tensors and not tensors[0].is_cpu:  # (fold_key's rule; a CPU list with others raises in bytes_of)
        return None
    if _ext.reason() is None:
        return torch.ops.bam_fused_C.bytes_of.default(tensors)
    return [t.detach().clone() for t in tensors]


def unchanged(tensors: list[torch.Tensor], copy: torch.Tensor | list[torch.Tensor] | None) -> bool:
    """Whether the layers' tensors match their snapshot (True without one): one op call for them
    all (the extension's same_bytes), which sees any write, those through .data included."""
    global _same_bytes
    if copy is None:
        return True
    if isinstance(copy, torch.Tensor):
        if _same_bytes is None:
            _same_bytes = torch.ops.bam_fused_C.same_bytes.default
        return _same_bytes(tensors, copy)
    return len(tensors) == len(copy) and all(
        t.dtype == c.dtype and t.shape == c.shape and torch.equal(t, c) for t, c in zip(tensors, copy, strict=True)
    )


_same_bytes = None  # the op, once the extension has loaded


def fold(bam: nn.Module) -> dict:
    """The folded weights of a BAM whose layers are the ones the eval op computes
    (_layers.op_reason(bam) is None), in fp32 and the shapes the op takes."""
    gc, gs = branch_layers(bam)
    dilated = [(gs[f"gate_s_conv_di_{i}"], gs[f"gate_s_bn_di_{i}"]) for i in range(bam.num_dilated_convs)]
    fc1, fin = gc["gate_c_fc_final"], gs["gate_s_conv_final"]
    with torch.no_grad():
        fc0_w, fc0_b = _fold_linear(gc["gate_c_fc_0"].weight, gc["gate_c_fc_0"].bias, gc["gate_c_bn_1"])
        red = gs["gate_s_conv_reduce0"]
        red_w, red_b = _fold_linear(red.weight, red.bias, gs["gate_s_bn_reduce0"])
        dil = [_fold_linear(conv.weight, conv.bias, bn) for conv, bn in dilated]
        return {
            "fc0_w": fc0_w.contiguous(), "fc0_b": fc0_b.contiguous(),
            "fc1_w": fc1.weight.float().contiguous(), "fc1_b": fc1.bias.float().contiguous(),
            "red_w": red_w.reshape(red_w.shape[0], -1).contiguous(), "red_b": red_b.contiguous(),
            "dil_w": [w.contiguous(memory_format=_DILATED_WEIGHT_FORMAT) for w, _ in dil],
            "dil_b": [b.contiguous() for _, b in dil],
            "fin_w": fin.weight.float().reshape(-1).contiguous(), "fin_b": fin.bias.float().reshape(-1),
            "unsupported": None,
        }  # fmt: skip
