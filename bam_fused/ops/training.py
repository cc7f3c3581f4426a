"""BAM with autograd on the CPU (training mode, or eval mode with gradients wanted).

The reference reads x three times on the way forward (the 1x1 reduce conv, the mean, the
gate) and autograd adds three gradients of x's size on the way back. Here:

- forward: one pass over x gives the reduce conv's output (before its BatchNorm) and the
  channel means (``bam_fused_C::reduce_pool``); the small rest of both branches (BatchNorm
  with batch statistics, ReLU, the dilated convs, the channel MLP) runs as the module's own
  layers; then the fused gate;
- backward: the gate's backward writes dx; autograd runs the small rest of the branches;
  ``bam_fused_C::reduce_pool_backward`` adds the reduce conv's and the mean's share into dx
  in place and gives the reduce conv's weight and bias gradients.

First derivatives only. The layers of the rest run as modules (their hooks fire, BatchNorm
updates its running statistics); the reduce conv's own forward does not run (its hooks do
not fire), as in the eval-mode branch op. The rest's autograd graph (tensors of about 1/16 of
x's size) is kept until the output's graph is freed, so that retain_graph works.
"""

from __future__ import annotations

import torch
from torch import nn

from .branches import BRANCH_DTYPES, load_op
from .gate import _backward_kernels, _forward, memory_format


def _rest_of_spatial(gate_s: nn.Sequential) -> list[nn.Module]:
    return list(gate_s)[1:]  # everything after gate_s_conv_reduce0


class _TrainingBAM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module, product, reduce_w, reduce_b, *rest_params):
        gs, gc = module.spatial_att.gate_s, module.channel_att.gate_c
        n, c, h, w = x.shape
        cr = reduce_w.shape[0]
        w32 = reduce_w.detach().reshape(cr, c).float().contiguous()
        b32 = torch.zeros(cr) if reduce_b is None else reduce_b.detach().float().contiguous()
        means, y = load_op("reduce_pool")(x, w32, b32, False)
        with torch.enable_grad():
            # The rest of both branches as the module's layers, on leaves that collect the
            # gradients of y and of the means.
            y_in, m_in = y.requires_grad_(), means.requires_grad_()
            s = y_in.to(reduce_w.dtype)
            for layer in _rest_of_spatial(gs):
                s = layer(s)
            ch = gc(m_in.to(gc.gate_c_fc_0.weight.dtype))
        c32 = ch.detach().float().contiguous()
        s32 = s.detach().float().reshape(n, h * w).contiguous()
        ctx.save_for_backward(x, c32, s32, w32)
        ctx.graph = (y_in, m_in, ch, s, rest_params)
        ctx.product, ctx.w_like = product, reduce_w
        return _forward(x, c32, s32, product, "cpp")

    @staticmethod
    def backward(ctx, grad):
        x, c32, s32, w32 = ctx.saved_tensors
        y_in, m_in, ch, s, rest_params = ctx.graph
        if torch.is_grad_enabled() and any(t.requires_grad for t in (grad, x, ctx.w_like, *rest_params)):
            raise RuntimeError(
                "bam_fused.BAM has first derivatives only on this path (create_graph=True was asked "
                "for); use backend='reference' for higher orders"
            )
        grad = grad.contiguous(memory_format=memory_format(x))
        dx, dc, ds = _backward_kernels(grad, x, c32, s32, ctx.product, "cpp")
        wanted = [p for p in rest_params if p.requires_grad]
        # retain_graph: a Function cannot tell whether its caller retains the graph, so the
        # rest's graph lives as long as this node (a second backward works, as in the reference).
        grads = torch.autograd.grad(
            (ch, s), (y_in, m_in, *wanted), (dc.to(ch.dtype), ds.view_as(s).to(s.dtype)),
            allow_unused=True, retain_graph=True,
        )  # fmt: skip
        dy, dmean, *rest_grads = grads
        n, c = x.shape[:2]
        dy = torch.zeros_like(y_in) if dy is None else dy
        dmean = torch.zeros(n, c) if dmean is None else dmean
        want_dx, want_w, want_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dw = db = None
        if want_dx or want_w or want_b:
            dw, db = load_op("reduce_pool_backward")(
                x, dy.contiguous(memory_format=memory_format(x)), dmean.contiguous(), w32, dx if want_dx else None
            )
        it = iter(rest_grads)
        rest_out = [next(it) if p.requires_grad else None for p in rest_params]
        w_like = ctx.w_like.detach()
        return (
            dx if want_dx else None, None, None,
            dw.view(w_like.shape).to(w_like.dtype) if want_w else None,
            db.to(w_like.dtype) if want_b else None, *rest_out,
        )  # fmt: skip


def reason(module: nn.Module, x: torch.Tensor) -> str | None:
    """Why this call cannot take the CPU autograd path, or None when it can."""
    if x.device.type != "cpu":
        return "not a CPU tensor"
    if x.dtype not in BRANCH_DTYPES:
        return f"x is {x.dtype}"
    if x.numel() == 0:
        return "x is empty"
    red = module.spatial_att.gate_s.gate_s_conv_reduce0
    if not (isinstance(red, nn.Conv2d) and red.kernel_size == (1, 1) and red.stride == (1, 1)
            and red.padding == (0, 0) and red.groups == 1 and red.weight.dtype in BRANCH_DTYPES):  # fmt: skip
        return "gate_s_conv_reduce0 is not a plain 1x1 conv"
    return None


def training_bam(module: nn.Module, x: torch.Tensor, combine: str) -> torch.Tensor:
    """module (a bam_fused.BAM) on x with autograd, through the CPU kernels above. x is laid out
    NCHW or channels_last (dense)."""
    red = module.spatial_att.gate_s.gate_s_conv_reduce0
    rest = [p for layer in _rest_of_spatial(module.spatial_att.gate_s) for p in layer.parameters()]
    rest += list(module.channel_att.gate_c.parameters())
    x = x.contiguous(memory_format=memory_format(x))
    return _TrainingBAM.apply(x, module, combine == "product", red.weight, red.bias, *rest)
