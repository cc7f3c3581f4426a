"""BatchNorm folding for the eval op: a BAM's branch weights with every BatchNorm folded in, and
the key that tells when a cached fold is stale."""

from __future__ import annotations

import torch
from torch import nn

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


def fold_key(bam: nn.Module) -> list:
    """What the fold depends on. Every layer of the branches (identity, mode) and every tensor of
    theirs, read each time (straight from _modules, _parameters and _buffers, where assignments
    land), so that replaced layers or tensors, in-place updates (_version) and a layer's own
    .train() refresh the fold. Flat, without a tuple per tensor."""
    layers = branch_layers(bam)
    if layers is None:
        return [object()]  # never equal: _layers.op_reason says why the op cannot run
    key: list = [bam.training]
    add = key.append  # appends, not tuples: 12 -> 6 us a call
    for group in layers:
        for m in group.values():
            add(id(m))
            if m is None:  # (a layer set to None: the layers run, and raise as the reference's)
                continue
            add(m.training)
            if "parametrizations" in m._modules:
                # A parametrized weight (torch.nn.utils.parametrize: weight_norm, spectral_norm) is
                # computed from tensors this key does not watch: fold it anew on every call.
                add(object())
            for d in (m._parameters, m._buffers):
                for t in d.values():
                    if t is None:
                        add(None)
                    else:
                        add(t.data_ptr())
                        add(t._version)
    return key


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
