"""Launchers of the C++ CPU gate kernels, with the same (N, R, L) contract as gate_triton."""

from __future__ import annotations

import torch

from .. import _ext


def gate_forward(x3: torch.Tensor, row: torch.Tensor, col: torch.Tensor, product: bool) -> torch.Tensor:
    _ext.load()
    return torch.ops.bam_fused_C.gate_forward(x3, row, col, product)


def gate_backward(
    g3: torch.Tensor, x3: torch.Tensor, row: torch.Tensor, col: torch.Tensor, product: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _ext.load()
    dx, drow, dcol = torch.ops.bam_fused_C.gate_backward(g3, x3, row, col, product)
    return dx, drow, dcol
