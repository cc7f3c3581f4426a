"""What `bam-fused verify` and the tests share: the tolerance table and the comparison rule.

Rule (flash-attention's): compare against the reference computed in float64. In float32 and
float64 the error must be within the table's atol + rtol * |ref|, or, when eager PyTorch's
result in the same dtype is given, at most twice eager's error plus atol (long reductions).
In float16 and bfloat16 a kernel's error may be at most twice that of eager PyTorch in the
same dtype (and never less than one unit in the last place at the largest value), plus the
table's atol.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# The dtypes and layouts verify, bench and the tests sweep, by their short names.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def as_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x in "nchw" or "channels_last" memory format."""
    return x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


# dtype -> (atol, rtol); the one table of tolerances.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 0.0),
    torch.bfloat16: (1.6e-2, 0.0),
}


@dataclass
class Comparison:
    max_abs: float
    max_rel: float
    tolerance: float
    passed: bool

    def __str__(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        return f"max_abs={self.max_abs:.3g} max_rel={self.max_rel:.3g} tol={self.tolerance:.3g} {verdict}"


def compare(out: torch.Tensor, truth: torch.Tensor, eager: torch.Tensor | None = None) -> Comparison:
    """Compares a kernel's result with the float64 truth (and eager PyTorch in out's dtype).

    NaN and Inf must sit at the same places with the same values as in the truth.
    """
    if out.shape != truth.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference shape {tuple(truth.shape)}")
    out64, truth64 = out.detach().double().cpu(), truth.detach().double().cpu()
    finite = torch.isfinite(truth64)
    same_nonfinite = bool(torch.equal(torch.isfinite(out64), finite)) and bool(
        torch.equal(out64[~finite].nan_to_num(), truth64[~finite].nan_to_num())
    )
    err = (out64 - truth64).abs()[finite]
    scale = truth64.abs()[finite]
    max_abs = float(err.max()) if err.numel() else 0.0
    max_rel = float((err / scale.clamp_min(1e-6)).max()) if err.numel() else 0.0
    atol, rtol = TOLERANCES[out.dtype]
    eager_bound = None
    if eager is not None:
        eager_err = (eager.detach().double().cpu() - truth64).abs()[finite]
        eager_bound = 2 * (float(eager_err.max()) if eager_err.numel() else 0.0) + atol
    if eager_bound is not None and out.dtype in (torch.float16, torch.bfloat16):
        # Never tighter than one unit in the last place at the largest value: a result that
        # is stored in this dtype can be off by one rounding even where eager was lucky.
        ulp = torch.finfo(out.dtype).eps * (float(scale.max()) if scale.numel() else 0.0)
        tolerance = max(eager_bound, ulp + atol)
        passed = max_abs <= tolerance
    else:
        passed = bool((err <= atol + rtol * scale).all())
        tolerance = atol + rtol * (float(scale.max()) if scale.numel() else 0.0)
        if not passed and eager_bound is not None:
            # Long reductions (gradients of the attention terms): float32 summation order
            # alone can exceed the table; no worse than twice eager is the rule then.
            passed, tolerance = max_abs <= eager_bound, eager_bound
    return Comparison(max_abs, max_rel, tolerance, passed and same_nonfinite)


def randomize_(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Random weights and BatchNorm statistics away from their defaults (in place), so that
    a test would notice BatchNorm folded wrongly or skipped."""
    with torch.no_grad():
        for p in module.parameters():
            std = p[0].numel() ** -0.5 if p.dim() > 1 else 0.2  # keep activations O(1)
            p.copy_(torch.randn(p.shape, generator=generator) * std)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
    return module


def gate_comparisons(
    fn, x: torch.Tensor, channel_att: torch.Tensor, spatial_att: torch.Tensor, combine: str, grad: torch.Tensor
) -> list[tuple[str, Comparison]]:
    """Runs ``fn(x, channel_att, spatial_att)`` forward and backward (leaf inputs; it sets
    requires_grad) and compares the output and all three gradients with the float64
    reference, eager PyTorch in the same dtype as the yardstick."""
    from .reference import bam_gate_reference

    for t in (x, channel_att, spatial_att):
        t.requires_grad_()
    out = fn(x, channel_att, spatial_att)
    out.backward(grad)
    x64, c64, s64 = (t.detach().double().requires_grad_() for t in (x, channel_att, spatial_att))
    truth = bam_gate_reference(x64, c64, s64, combine)
    truth.backward(grad.double())
    xe, ce, se = (t.detach().clone().requires_grad_() for t in (x, channel_att, spatial_att))
    eager = bam_gate_reference(xe, ce, se, combine)
    eager.backward(grad)
    return [
        ("out", compare(out, truth, eager)),
        ("d_x", compare(x.grad, x64.grad, xe.grad)),
        ("d_channel", compare(channel_att.grad, c64.grad, ce.grad)),
        ("d_spatial", compare(spatial_att.grad, s64.grad, se.grad)),
    ]


def gate_second_order_comparisons(
    fn, x: torch.Tensor, channel_att: torch.Tensor, spatial_att: torch.Tensor, combine: str, grad: torch.Tensor
) -> list[tuple[str, Comparison]]:
    """The gradients of a gradient penalty (the squared first gradients of
    ``fn(x, channel_att, spatial_att)`` summed, through create_graph=True) against the float64
    reference's, eager PyTorch in the same dtype as the yardstick."""
    from .reference import bam_gate_reference

    def penalty_grads(f, dtype: torch.dtype, acc: torch.dtype) -> tuple[torch.Tensor, ...]:
        ins = [t.detach().to(dtype, copy=True).requires_grad_() for t in (x, channel_att, spatial_att)]
        first = torch.autograd.grad(f(*ins), ins, grad.to(dtype), create_graph=True)
        return torch.autograd.grad(sum((d.to(acc) ** 2).sum() for d in first), ins)

    def reference(a, b, c):
        return bam_gate_reference(a, b, c, combine)

    out = penalty_grads(fn, x.dtype, torch.float32)
    truth = penalty_grads(reference, torch.float64, torch.float64)
    eager = penalty_grads(reference, x.dtype, torch.float32)
    names = ("d2_x", "d2_channel", "d2_spatial")
    return [(name, compare(*t)) for name, t in zip(names, zip(out, truth, eager, strict=True), strict=True)]
