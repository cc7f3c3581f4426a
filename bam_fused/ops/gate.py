"""bam_gate: out = x * (1 + sigmoid(Mc (+) Ms)), fused, with checks, dispatch and autograd.

The public function checks its arguments, picks a kernel and calls one registered op,
``bam_fused::gate`` (a ``torch.library.custom_op``), whose fake kernel reproduces the real
output strides and whose autograd calls ``bam_fused::gate_backward``. custom_op rather than
triton_op: it is opaque to Inductor, but it is also what runs torch.compile(fullgraph=True)
and opcheck on the CPU with the interpreted Triton kernel (DESIGN.md, kernel notes).
"""

from __future__ import annotations

import torch

from .. import _backends
from .._checks import check_choice, check_combine, check_feature_map, normalize_attention
from ..reference import bam_gate_reference

BACKENDS = ("auto", "triton", "cpp", "reference")


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout a result should have: x's own where x is dense, else the one it suggests."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch._prims_common.suggest_memory_format(x)


def _as_rows(x: torch.Tensor, row: torch.Tensor, col_: torch.Tensor):
    """Views a laid-out x as (N, R, L) with L contiguous, and names the row and column terms.

    Returns (x3, row_vec, col_vec, channels_last).
    """
    n, c, h, w = x.shape
    if x.is_contiguous():
        return x.view(n, c, h * w), row, col_, False
    # channels_last: rows are pixels, columns are channels.
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c), col_, row, True


def _forward(x: torch.Tensor, channel_att: torch.Tensor, spatial_att: torch.Tensor, product: bool, impl: str):
    x3, row, col, _ = _as_rows(x, channel_att, spatial_att)
    out3 = _backends.kernels(impl).gate_forward(x3, row, col, product)
    n, c, h, w = x.shape
    out = out3.view(n, c, h, w) if x.is_contiguous() else out3.view(n, h, w, c).permute(0, 3, 1, 2)
    # Not a view (detach): autograd forbids in-place changes to a view made inside a custom
    # Function, and a model may well run an in-place ReLU on BAM's output.
    return out.detach()


def _backward_kernels(grad, x, channel_att, spatial_att, product: bool, impl: str):
    n, c, h, w = x.shape
    x3, row, col, channels_last = _as_rows(x, channel_att, spatial_att)
    g3, _, _, _ = _as_rows(grad, channel_att, spatial_att)
    dx3, drow, dcol = _backends.kernels(impl).gate_backward(g3, x3, row, col, product)
    if channels_last:
        return dx3.view(n, h, w, c).permute(0, 3, 1, 2), dcol, drow
    return dx3.view(n, c, h, w), drow, dcol


@torch.library.custom_op("bam_fused::gate", mutates_args=())
def _gate_op(
    x: torch.Tensor, channel_att: torch.Tensor, spatial_att: torch.Tensor, product: bool, impl: str
) -> torch.Tensor:
    """x in NCHW or channels_last layout; channel_att (N, C), spatial_att (N, H*W) in fp32
    (fp64 for fp64 x)."""
    return _forward(x, channel_att, spatial_att, product, impl)


@_gate_op.register_fake
def _(x, channel_att, spatial_att, product, impl):
    return torch.empty_like(x)


@torch.library.custom_op("bam_fused::gate_backward", mutates_args=())
def _gate_backward_op(
    grad: torch.Tensor, x: torch.Tensor, channel_att: torch.Tensor, spatial_att: torch.Tensor, product: bool, impl: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad laid out like x. Returns dx (like x), d channel_att (N, C), d spatial_att (N, H*W)."""
    return _backward_kernels(grad, x, channel_att, spatial_att, product, impl)


@_gate_backward_op.register_fake
def _(grad, x, channel_att, spatial_att, product, impl):
    return torch.empty_like(x), torch.empty_like(channel_att), torch.empty_like(spatial_att)


def differentiable_backward(grad, x, channel_att, spatial_att, product: bool):
    """The backward kernels' results (dx like x in x's dtype; d channel_att (N, C) and
    d spatial_att (N, H*W) in their dtype, the math dtype) from differentiable PyTorch ops: what
    runs when a second derivative is wanted (create_graph=True), at the reference's speed."""
    n, c, h, w = x.shape
    acc = channel_att.dtype
    mc, ms = channel_att.view(n, c, 1, 1), spatial_att.view(n, 1, h, w)
    a = torch.sigmoid(mc * ms if product else mc + ms)
    g = grad.to(acc)
    dz = g * x.to(acc) * a * (1 - a)
    dx = (g * (1 + a)).to(x.dtype).contiguous(memory_format=memory_format(x))
    dc = (dz * ms if product else dz).sum((2, 3))
    ds = (dz * mc if product else dz).sum(1).reshape(n, h * w)
    return dx, dc, ds


def _wants_graph(*tensors: torch.Tensor) -> bool:
    """Whether a backward was asked to build a graph of itself (create_graph=True)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _setup_context(ctx, inputs, output):
    x, channel_att, spatial_att, product, impl = inputs
    ctx.save_for_backward(x, channel_att, spatial_att)
    ctx.product, ctx.impl = product, impl


def _backward(ctx, grad):
    x, channel_att, spatial_att = ctx.saved_tensors
    if _wants_graph(grad, x, channel_att, spatial_att):
        return *differentiable_backward(grad, x, channel_att, spatial_att, ctx.product), None, None
    # The kernels read grad with x's layout.
    grad = grad.contiguous(memory_format=memory_format(x))
    dx, dc, ds = _gate_backward_op(grad, x, channel_att, spatial_att, ctx.product, ctx.impl)
    return dx, dc, ds, None, None


_gate_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerGate(torch.autograd.Function):
    """The same kernels as the ops above, without the custom-op dispatch, which in eager mode
    cost 7 of the 16 us of a small bam_gate call on the development CPU (GPU runs are often
    bound by this overhead). Under torch.compile the custom ops are used (they carry the fake
    kernels). A backward asked for a graph of itself (create_graph=True, for second
    derivatives) runs as PyTorch ops instead of the kernels."""

    @staticmethod
    def forward(ctx, x, channel_att, spatial_att, product, impl):
        ctx.save_for_backward(x, channel_att, spatial_att)
        ctx.product, ctx.impl = product, impl
        return _forward(x, channel_att, spatial_att, product, impl)

    @staticmethod
    def backward(ctx, grad):
        x, channel_att, spatial_att = ctx.saved_tensors
        if _wants_graph(grad, x, channel_att, spatial_att):
            return *differentiable_backward(grad, x, channel_att, spatial_att, ctx.product), None, None
        grad = grad.contiguous(memory_format=memory_format(x))
        dx, dc, ds = _backward_kernels(grad, x, channel_att, spatial_att, ctx.product, ctx.impl)
        return dx, dc, ds, None, None


def bam_gate(
    x: torch.Tensor,
    channel_att: torch.Tensor,
    spatial_att: torch.Tensor,
    combine: str = "sum",
    backend: str = "auto",
) -> torch.Tensor:
    """Fused BAM gate: ``x * (1 + sigmoid(channel_att (+) spatial_att))``.

    Args:
        x: (N, C, H, W) feature map, fp32/fp16/bf16 (fp64 through the reference or "cpp").
        channel_att: Mc, (N, C) or (N, C, 1, 1).
        spatial_att: Ms, (N, H, W) or (N, 1, H, W).
        combine: "sum" (the paper) or "product" (the authors' code).
        backend: "auto", "triton", "cpp" or "reference".

    Returns:
        A tensor in x's dtype and memory format. Differentiable in all three inputs, to any
        order (a backward with create_graph=True runs as PyTorch ops).
    """
    check_combine(combine)
    check_choice("backend", backend, BACKENDS)
    if _backends.fx_traced(backend, x):
        return bam_gate_reference(x, channel_att.to(x.dtype), spatial_att.to(x.dtype), combine)
    x = check_feature_map(x)
    c, s = normalize_attention(x, channel_att, spatial_att)
    impl = _backends.gate_impl(backend, x)
    if impl == "reference":
        out = bam_gate_reference(x, c.to(x.dtype), s.to(x.dtype), combine)
        return out.contiguous(memory_format=memory_format(x))
    x = x.contiguous(memory_format=memory_format(x))
    # The attention terms are small: casting them to the math dtype here lets autograd cast
    # their gradients back to the caller's dtype.
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    gate = _gate_op if torch.compiler.is_compiling() or _backends.dispatch_mode() else _EagerGate.apply
    return gate(x, c.to(acc).contiguous(), s.to(acc).contiguous(), combine == "product", impl)
