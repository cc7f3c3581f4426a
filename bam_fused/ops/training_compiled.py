"""BAM with autograd on the CPU under torch.compile.

Dynamo cannot trace ops/training.py's autograd Function (its backward runs torch.autograd.grad
through the module's layers), so under torch.compile the branches used to run as plain
modules: oneDNN's 1x1 reduce conv and its backward took 6.3 ms of a 28 ms step at 56x56
(N = 8, 2-core CPU; our pass and its backward about 3), and, as the graph held convolutions,
Inductor laid x out channels_last, copying it back and forth around our gate and handing back
x's gradient channels_last (5 ms to add into an NCHW x.grad). Here, as custom ops with their
own autograd, traced into one graph:

- the pass over x (``bam_fused::reduce_pool_train``: ``bam_fused_C::reduce_pool``; backward
  ``bam_fused_C::reduce_pool_backward``, which adds its share into the gate's dx in place);
- the stock rest of the spatial branch (``bam_fused::spatial_train``: ``bam_fused_C::
  spatial_train`` and its backward, as in ops/training.py), the running statistics updated
  here (training._update_running_stats); any other rest runs as the module's layers, traced;
- the channel MLP as the module's layers, traced;
- the gate (``bam_fused::gate_train``), whose dx goes to the pass's backward through a token.

The ops that take x take it in the layout Inductor gives them (flexible_layout), NCHW or
channels_last, so that a BAM among convolutions, where Inductor lays activations out
channels_last, costs no copies of x (see FLEXIBLE below).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from .._layers import raw_weight
from .branches import load_op
from .gate import _backward_kernels, _forward, memory_format
from .training import _batch_stats, _rest_of_spatial, _stock_tail, _update_running_stats


def _dense(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t laid out as like (x) is: NCHW or channels_last."""
    return t.contiguous(memory_format=memory_format(like))


def _like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor like x, laid out as x is: the token, and the fake kernels' outputs."""
    return torch.empty_like(x, memory_format=memory_format(x))


class _XOps(NamedTuple):
    reduce_pool: Callable
    reduce_pool_backward: Callable
    gate: Callable
    gate_backward: Callable


def _x_ops() -> _XOps:
    """The custom ops that take x, registered as bam_fused::<name>, tagged flexible_layout: they
    take x (and tensors laid out like it) NCHW or channels_last, whichever they are given."""
    tags = (torch.Tag.flexible_layout,)

    @torch.library.custom_op("bam_fused::reduce_pool_train", mutates_args=(), tags=tags)
    def reduce_pool(
        x: torch.Tensor, w: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """w (Cr, C) and b (Cr,) fp32. The channel means (N, C) and the reduce conv's output y (N,
        Cr, H, W), both fp32, y channels_last; and a token: a tensor like x, allocated but never
        written or read, that only carries the gate's dx back here (see gate). Inductor takes no
        expanded (stride 0) output from a custom op."""
        x = _dense(x, x)
        means, y = load_op("reduce_pool")(x, w, b, False)
        return means, y, _like(x)

    @reduce_pool.register_fake
    def _(x, w, b):
        n, c, h, wd = x.shape
        y = x.new_empty((n, w.shape[0], h, wd), dtype=torch.float32).contiguous(memory_format=torch.channels_last)
        return x.new_empty((n, c), dtype=torch.float32), y, _like(x)

    @torch.library.custom_op("bam_fused::reduce_pool_train_backward", mutates_args=("dx",), tags=tags)
    def reduce_pool_backward(
        x: torch.Tensor, dy: torch.Tensor, dmean: torch.Tensor, w: torch.Tensor, dx: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """dw (Cr, C), db (Cr,); adds the reduce conv's and the means' share of x's gradient into
        dx in place, when given."""
        x = _dense(x, x)
        acc = None if dx is None else _dense(dx, x)  # dx itself unless laid out otherwise
        dw, db = load_op("reduce_pool_backward")(x, _dense(dy, x), dmean.contiguous(), w, acc)
        if acc is not None and acc is not dx:
            dx.copy_(acc)
        return dw, db

    @reduce_pool_backward.register_fake
    def _(x, dy, dmean, w, dx):
        return w.new_empty(w.shape), w.new_empty(w.shape[:1])

    def setup_context(ctx, inputs, output):
        x, w, _ = inputs
        ctx.save_for_backward(x, w)

    def backward(ctx, dmean, dy, dtoken):
        x, w = ctx.saved_tensors
        # dtoken is the gate's dx, a tensor of this backward's own: x's whole gradient is summed in it.
        dx = dtoken if ctx.needs_input_grad[0] else None
        dw, db = reduce_pool_backward(x, dy, dmean, w, dx)
        return dx, dw, db

    reduce_pool.register_autograd(backward, setup_context=setup_context)

    @torch.library.custom_op("bam_fused::gate_train", mutates_args=(), tags=tags)
    def gate(
        x: torch.Tensor, token: torch.Tensor, channel_att: torch.Tensor, spatial_att: torch.Tensor, product: bool
    ) -> torch.Tensor:
        """bam_fused::gate whose backward gives x's gradient to token (from reduce_pool), so that
        the pass's backward adds its share in place: without it, Inductor summed two gradients of
        x's size (a zeroed one for the pass's share), about 1.4 ms of a 14.6 ms step at 56x56."""
        return _forward(_dense(x, x), channel_att, spatial_att, product, "cpp")

    @gate.register_fake
    def _(x, token, channel_att, spatial_att, product):
        return _like(x)

    @torch.library.custom_op("bam_fused::gate_train_backward", mutates_args=(), tags=tags)
    def gate_backward(
        grad: torch.Tensor, x: torch.Tensor, channel_att: torch.Tensor, spatial_att: torch.Tensor, product: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """bam_fused::gate_backward, with grad taken in any layout: dx (like x), d channel_att (N,
        C), d spatial_att (N, H*W)."""
        x = _dense(x, x)
        return _backward_kernels(_dense(grad, x), x, channel_att, spatial_att, product, "cpp")

    @gate_backward.register_fake
    def _(grad, x, channel_att, spatial_att, product):
        return _like(x), torch.empty_like(channel_att), torch.empty_like(spatial_att)

    def gate_setup_context(ctx, inputs, output):
        x, _, channel_att, spatial_att, ctx.product = inputs
        ctx.save_for_backward(x, channel_att, spatial_att)

    def gate_grad(ctx, grad):
        x, channel_att, spatial_att = ctx.saved_tensors
        dx, dc, ds = gate_backward(grad, x, channel_att, spatial_att, ctx.product)
        return None, dx, dc, ds, None

    gate.register_autograd(gate_grad, setup_context=gate_setup_context)
    return _XOps(reduce_pool, reduce_pool_backward, gate, gate_backward)


# flexible_layout: x as Inductor lays it out. In a compiled CPU model, Inductor lays activations
# out channels_last around convolutions (layout optimisation), and copying x back to NCHW for
# these ops (five copies a step) had cost nearly all the fused BAM saved (N = 8, 56x56, NCHW: its
# share of a step 17.8 ms, against 18.6 for the compiled reference; 12.2 without the copies).
# With the module's own spatial layers (bf16, autocast, other layers), a second set kept x as traced
# until 2026-11-26: a bf16 model step (1x1 conv, BatchNorm, ReLU, BAM, 1x1 conv; N = 8) took
# 51.4 / 40.6 / 35.0 ms with it at 56x56 / 28x28 / 14x14, 43.6 / 33.9 / 32.4 with these (the
# compiled reference BAM: 51.1 / 38.0 / 32.6). A compiled bf16 BAM alone on NCHW x pays for it:
# its convs make Inductor copy x to channels_last for these ops (17.4 against 14.2 ms a step).
FLEXIBLE = _x_ops()


def _spatial_train_impl(
    y: torch.Tensor,
    bn_weight: list[torch.Tensor],
    bn_bias: list[torch.Tensor],
    eps: list[float],
    running_mean: list[torch.Tensor | None],
    running_var: list[torch.Tensor | None],
    conv_weight: list[torch.Tensor],
    conv_bias: list[torch.Tensor],
    dilation: int,
    final_weight: torch.Tensor,
    final_bias: torch.Tensor,
    dy_channels_last: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """bam_fused_C::spatial_train: the map s (N, H, W), the maps its backward reads, the
    statistics (3, K + 1, Cr). Every weight and bias is a tensor (torch.library differentiates
    no list that holds a None): ones and zeros stand for missing ones, which changes no bit. A
    running_mean given (eval-mode BatchNorm) normalises with the running statistics.
    dy_channels_last: the layout of the backward's dy (x's). On fake tensors the C++ op's fake
    kernel runs, so this serves as the op's fake kernel too."""
    args = (y, bn_weight, bn_bias, eps, running_mean, running_var, conv_weight, conv_bias, dilation, final_weight)
    return load_op("spatial_train")(*args, final_bias)


_spatial_train = torch.library.custom_op("bam_fused::spatial_train", _spatial_train_impl, mutates_args=())
_spatial_train.register_fake(_spatial_train_impl)


def _spatial_setup_context(ctx, inputs, output):
    y, bn_weight, bn_bias, _, running_mean, _, conv_weight, _, dilation, final_weight, _, cl = inputs
    _, maps, stats = output
    ctx.save_for_backward(y, stats, final_weight, *maps, *conv_weight, *bn_weight, *bn_bias)
    ctx.n_maps, ctx.k = len(maps), len(conv_weight)
    ctx.batch_stats = [m is None for m in running_mean]
    ctx.dilation, ctx.dy_channels_last = dilation, cl


def _spatial_backward(ctx, ds, dmaps, dstats):
    y, stats, final_weight, *rest = ctx.saved_tensors
    k = ctx.k
    maps, rest = rest[: ctx.n_maps], rest[ctx.n_maps :]
    conv_weight, bn_weight, bn_bias = rest[:k], rest[k : 2 * k + 1], rest[2 * k + 1 :]
    dy, flat = load_op("spatial_train_backward")(
        ds.contiguous(), y, maps, stats, bn_weight, bn_bias, conv_weight, ctx.dilation, final_weight,
        ctx.batch_stats, ctx.dy_channels_last,
    )  # fmt: skip
    # flat: (weight, bias) of bn_0, conv_0, ..., bn_K, then the final conv.
    bn_w = [flat[4 * i] for i in range(k + 1)]
    bn_b = [flat[4 * i + 1] for i in range(k + 1)]
    conv_w = [flat[4 * i + 2].view(w.shape) for i, w in enumerate(conv_weight)]
    conv_b = [flat[4 * i + 3] for i in range(k)]
    fin_w, fin_b = flat[4 * k + 2].view(final_weight.shape), flat[4 * k + 3]
    # The structure of the inputs as torch.library flattens them: a list of tensors takes a list,
    # one that holds a None (the running statistics of BatchNorms in training mode) or floats
    # takes one None.
    running = None if any(ctx.batch_stats) else [None] * (k + 1)
    return dy, bn_w, bn_b, None, running, running, conv_w, conv_b, None, fin_w, fin_b, None


_spatial_train.register_autograd(_spatial_backward, setup_context=_spatial_setup_context)


def _spatial_tail(stock: tuple, y: torch.Tensor, pixels: int, channels_last: bool) -> torch.Tensor:
    bns, convs, final, dilation = stock
    batch = [_batch_stats(bn) for bn in bns]
    cr = y.shape[1]

    def given(t: torch.Tensor | None, fill: float, size: int) -> torch.Tensor:
        return y.new_full((size,), fill) if t is None else t

    s, _, stats = _spatial_train(
        y, [given(bn.weight, 1.0, cr) for bn in bns], [given(bn.bias, 0.0, cr) for bn in bns], [bn.eps for bn in bns],
        [None if b else bn.running_mean for bn, b in zip(bns, batch, strict=True)],
        [None if b else bn.running_var for bn, b in zip(bns, batch, strict=True)],
        [c.weight for c in convs], [given(c.bias, 0.0, cr) for c in convs], dilation, final.weight,
        given(final.bias, 0.0, 1), channels_last,
    )  # fmt: skip
    # Detached statistics into buffers (which need no gradient): nothing for autograd to record,
    # so no torch.no_grad() block, which torch.export records as a wrap_with_set_grad_enabled
    # node that its serialiser then rejects (torch.export.save: "missing val field").
    stats = stats.detach()
    _update_running_stats(bns, stats[0], stats[2], pixels)
    return s


def compiled_training_bam(module: nn.Module, x: torch.Tensor, combine: str) -> torch.Tensor:
    """module (a bam_fused.BAM) on x with autograd, under torch.compile (training.reason(x) and
    _layers.autograd_reason(module) are None)."""
    red = module.spatial_att.gate_s.gate_s_conv_reduce0
    gc = module.channel_att.gate_c
    n, c, h, w = x.shape
    weight = red.weight  # (read once: a parametrization runs on every read, as in the reference's forward)
    cr = weight.shape[0]
    x = x.contiguous(memory_format=memory_format(x))
    w32 = weight.reshape(cr, c).float()
    b32 = red.bias.float() if red.bias is not None else weight.new_zeros(cr, dtype=torch.float32)
    rest = _rest_of_spatial(module.spatial_att.gate_s)
    stock = _stock_tail(rest, n * h * w)
    means, y, token = FLEXIBLE.reduce_pool(x, w32, b32)
    if stock is not None:
        s = _spatial_tail(stock, y, n * h * w, memory_format(x) == torch.channels_last)
    else:
        s = y.to(weight.dtype)
        for layer in rest:
            s = layer(s)
    channel = gc(means.to(raw_weight(gc.gate_c_fc_0).dtype))
    # The attention terms in fp32 (autograd casts their gradients back), as bam_gate passes them.
    c32, s32 = channel.float().reshape(n, c).contiguous(), s.float().reshape(n, h * w).contiguous()
    return FLEXIBLE.gate(x, token, c32, s32, combine == "product")
