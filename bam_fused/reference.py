"""The truth: BAM in plain PyTorch, the math of DESIGN.md and nothing clever.

Submodule names follow the authors' code, so state_dict keys match their checkpoints:
``channel_att.gate_c.{gate_c_fc_0, gate_c_bn_1, gate_c_fc_final}`` and
``spatial_att.gate_s.{gate_s_conv_reduce0, gate_s_bn_reduce0, gate_s_conv_di_<i>,
gate_s_bn_di_<i>, gate_s_conv_final}``.
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_combine, check_feature_map, check_positive_int, check_reduction

__all__ = ["BAM", "ChannelGate", "SpatialGate", "bam_gate_reference"]


def bam_gate_reference(
    x: torch.Tensor, channel_att: torch.Tensor, spatial_att: torch.Tensor, combine: str = "sum"
) -> torch.Tensor:
    """x * (1 + sigmoid(Mc (+) Ms)), Mc broadcast over H and W, Ms over C; in x's dtype."""
    # (x.shape[i], not unpacking: torch.fx traces this with a Proxy for x, which cannot be iterated.)
    mc = channel_att.reshape(x.shape[0], x.shape[1], 1, 1)
    ms = spatial_att.reshape(x.shape[0], 1, x.shape[2], x.shape[3])
    att = mc + ms if combine == "sum" else mc * ms
    return x * (1 + torch.sigmoid(att))


class ChannelGate(nn.Module):
    """Mc = MLP(avgpool(x)): Linear C -> C/r, BN, ReLU, Linear C/r -> C. Returns (N, C)."""

    def __init__(self, gate_channels: int, reduction_ratio: int = 16) -> None:
        super().__init__()
        hidden = check_reduction(gate_channels, reduction_ratio)
        self.gate_c = nn.Sequential()
        self.gate_c.add_module("gate_c_fc_0", nn.Linear(gate_channels, hidden))
        self.gate_c.add_module("gate_c_bn_1", nn.BatchNorm1d(hidden))
        self.gate_c.add_module("gate_c_relu_1", nn.ReLU())
        self.gate_c.add_module("gate_c_fc_final", nn.Linear(hidden, gate_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Mean over H and W works for any H, W (the authors' avg_pool2d assumes H == W).
        return self.gate_c(x.mean(dim=(2, 3)))


class SpatialGate(nn.Module):
    """Ms: 1x1 conv C -> C/r, BN, ReLU, k x [3x3 dilated conv, BN, ReLU], 1x1 conv -> 1.

    Returns (N, 1, H, W).
    """

    def __init__(
        self, gate_channels: int, reduction_ratio: int = 16, dilation: int = 4, num_dilated_convs: int = 2
    ) -> None:
        super().__init__()
        hidden = check_reduction(gate_channels, reduction_ratio)
        check_positive_int("dilation", dilation)
        check_positive_int("num_dilated_convs", num_dilated_convs, minimum=0)
        g = nn.Sequential()
        g.add_module("gate_s_conv_reduce0", nn.Conv2d(gate_channels, hidden, kernel_size=1))
        g.add_module("gate_s_bn_reduce0", nn.BatchNorm2d(hidden))
        g.add_module("gate_s_relu_reduce0", nn.ReLU())
        for i in range(num_dilated_convs):
            g.add_module(
                f"gate_s_conv_di_{i}",
                nn.Conv2d(hidden, hidden, kernel_size=3, padding=dilation, dilation=dilation),
            )
            g.add_module(f"gate_s_bn_di_{i}", nn.BatchNorm2d(hidden))
            g.add_module(f"gate_s_relu_di_{i}", nn.ReLU())
        g.add_module("gate_s_conv_final", nn.Conv2d(hidden, 1, kernel_size=1))
        self.gate_s = g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate_s(x)


class BAM(nn.Module):
    """Bottleneck Attention Module: out = x + x * sigmoid(Mc (+) Ms).

    combine="sum" is the paper's broadcast sum; "product" is the authors' released code.
    """

    def __init__(
        self,
        gate_channels: int,
        reduction_ratio: int = 16,
        dilation: int = 4,
        num_dilated_convs: int = 2,
        combine: str = "sum",
    ) -> None:
        super().__init__()
        check_reduction(gate_channels, reduction_ratio)
        self.gate_channels = gate_channels
        self.reduction_ratio = reduction_ratio
        self.dilation = dilation
        self.num_dilated_convs = num_dilated_convs
        self.combine = combine
        self.channel_att = ChannelGate(gate_channels, reduction_ratio)
        self.spatial_att = SpatialGate(gate_channels, reduction_ratio, dilation, num_dilated_convs)

    @property
    def combine(self) -> str:
        return self._combine

    @combine.setter
    def combine(self, value: str) -> None:
        # Checked on every assignment: a typo set later ("mul") must not pick a formula silently.
        self._combine = check_combine(value)

    def extra_repr(self) -> str:
        return (
            f"{self.gate_channels}, reduction_ratio={self.reduction_ratio}, dilation={self.dilation}, "
            f"num_dilated_convs={self.num_dilated_convs}, combine={self.combine!r}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.fx.Proxy):  # (torch.fx symbolic tracing has no shapes to check)
            check_feature_map(x, self.gate_channels, pixels=True)
        return bam_gate_reference(x, self.channel_att(x), self.spatial_att(x), self.combine)
