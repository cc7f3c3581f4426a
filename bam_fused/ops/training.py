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

When the rest of the spatial branch is the stock one (BatchNorm2d in either mode, ReLU,
dilated 3x3 convs, the final 1x1 conv; fp32; no autocast), it runs as two C++ ops
instead of its layers (``bam_fused_C::spatial_train`` and its backward: BatchNorm and ReLU in
a few sweeps over the small maps, the convs and their input and weight gradients in our vector
code where our convs run); this module updates the BatchNorms' running statistics as
nn.BatchNorm2d does. At 56x56 those layers took about 40% of a training step.

Otherwise the layers of the rest run as modules (BatchNorm updates its running statistics); the
reduce conv's own forward does not run, as in the eval-mode branch op.
(A BAM with a hook on any layer, or a global one, does not come here: modules.BAM runs its
branches as modules then, so that every hook fires.) The rest's autograd graph, or the C++ ops'
maps (tensors of about 1/16 of x's size each) are kept until the output's graph is freed, so
that retain_graph works.

A backward asked for a graph of itself (create_graph=True, for second derivatives) recomputes
the forward from x as PyTorch ops (the reduce conv, the mean, the module's layers, the gate),
with the forward's random-number state and autocast state and on copies of the layers'
buffers (running statistics move once per forward), and differentiates that.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .._layers import pads_by_dilation, raw_weight
from ..reference import bam_gate_reference
from .branches import BRANCH_DTYPES, load_op
from .gate import _backward_kernels, _forward, _wants_graph, memory_format


def _rest_of_spatial(gate_s: nn.Sequential) -> list[nn.Module]:
    return list(gate_s)[1:]  # everything after gate_s_conv_reduce0


def _fp32(layer: nn.Module) -> bool:
    return all(t.dtype == torch.float32 for t in (*layer.parameters(), *layer.buffers()) if t.is_floating_point())


def _batch_stats(bn: nn.BatchNorm2d) -> bool:
    """Whether bn normalises with the batch's statistics (nn.BatchNorm2d's rule), not its running ones."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _stock_tail(rest: list[nn.Module], pixels: int) -> tuple[list, list, nn.Conv2d, int] | None:
    """(BatchNorms, dilated convs, final conv, dilation) when the rest of the spatial branch is
    what spatial_train computes, else None (the layers run as modules)."""
    if torch.is_autocast_enabled("cpu") or (len(rest) - 3) % 3 != 0:
        return None
    bns, convs, final = rest[0:-1:3], rest[2:-1:3], rest[-1]
    if not all(type(bn) is nn.BatchNorm2d for bn in bns):
        return None
    if pixels < 2 and any(_batch_stats(bn) for bn in bns):
        return None  # the layers raise BatchNorm's own error
    relus = rest[1:-1:3]
    d = convs[0].dilation[0] if convs else 1
    if not all(_fp32(layer) for layer in rest):
        return None
    ok = all(type(r) is nn.ReLU for r in relus)
    ok = ok and all(
        type(c) is nn.Conv2d and c.kernel_size == (3, 3) and c.stride == (1, 1) and c.dilation == (d, d)
        and pads_by_dilation(c, d) and c.groups == 1 and c.padding_mode == "zeros"
        and c.in_channels == c.out_channels == bns[0].num_features
        for c in convs
    )  # fmt: skip
    ok = ok and type(final) is nn.Conv2d and final.kernel_size == (1, 1) and final.stride == (1, 1)
    ok = ok and final.padding == (0, 0) and final.dilation == (1, 1) and final.groups == 1 and final.out_channels == 1
    return (bns, convs, final, d) if ok else None


def _update_running_stats(bns: list[nn.BatchNorm2d], mean: torch.Tensor, var: torch.Tensor, pixels: int) -> None:
    """What nn.BatchNorm2d's training forward does to its buffers, given the batch's mean and
    biased variance (K, Cr). The cumulative factor of momentum=None is a 0-d double tensor, not a
    Python float (a graph break under Dynamo, ops/training_compiled.py): the same arithmetic, the
    factor cast to float32 where it meets the buffers either way."""
    for k, bn in enumerate(bns):
        if not (bn.training and bn.track_running_stats):
            continue
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                factor = 1.0 / bn.num_batches_tracked.double()
        if bn.running_mean is not None:
            bn.running_mean.mul_(1 - factor).add_(mean[k] * factor)
        if bn.running_var is not None:
            bn.running_var.mul_(1 - factor).add_(var[k] * (factor * pixels / (pixels - 1)))


class _Tail:
    """The stock rest of the spatial branch through spatial_train: its forward, and the state its
    backward needs (the layers' tensors as the forward read them, the maps, the statistics)."""

    def __init__(self, stock: tuple, y: torch.Tensor, pixels: int) -> None:
        bns, convs, final, self.dilation = stock

        def d(t):
            return None if t is None else t.detach()  # shares the version counter

        # The layers' (weight, bias) parameters (or None) in the order of the backward op's gradients.
        layers = [layer for pair in zip(bns[:-1], convs, strict=True) for layer in pair] + [bns[-1], final]
        self.params = [p for layer in layers for p in (layer._parameters.get("weight"), layer._parameters.get("bias"))]
        self.versions = [p._version for p in self.params if p is not None]
        self.bn_w, self.bn_b = [d(b.weight) for b in bns], [d(b.bias) for b in bns]
        # BatchNorms in eval mode (frozen, or the whole BAM in eval mode with gradients) normalise
        # with their running statistics.
        self.batch_stats = [_batch_stats(b) for b in bns]
        running = [
            (None, None) if bs else (d(b.running_mean), d(b.running_var))
            for b, bs in zip(bns, self.batch_stats, strict=True)
        ]
        self.conv_w, self.fin_w = [c.weight.detach() for c in convs], final.weight.detach()
        self.y = y
        self.s, self.maps, self.stats = load_op("spatial_train")(
            y, self.bn_w, self.bn_b, [bn.eps for bn in bns], [m for m, _ in running], [v for _, v in running],
            self.conv_w, [d(c.bias) for c in convs], self.dilation, self.fin_w, d(final.bias),
        )  # fmt: skip
        _update_running_stats(bns, self.stats[0], self.stats[2], pixels)

    def backward(self, ds: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, dict]:
        """dy (laid out as asked) and {parameter: gradient} for the layers' parameters."""
        if [p._version for p in self.params if p is not None] != self.versions:
            raise RuntimeError(
                "bam_fused.BAM: a spatial-branch weight was modified by an inplace operation between "
                "the forward and the backward"
            )
        dy, flat = load_op("spatial_train_backward")(
            ds.contiguous(), self.y, self.maps, self.stats, self.bn_w, self.bn_b, self.conv_w, self.dilation,
            self.fin_w, self.batch_stats, channels_last,
        )  # fmt: skip
        return dy, {p: g.view(p.shape) for p, g in zip(self.params, flat, strict=True) if p is not None}


@contextlib.contextmanager
def _buffer_copies(layers: list[nn.Module]) -> Iterator[None]:
    """The layers' buffers replaced by copies, and put back after: a forward run again (for a
    second derivative) leaves the running statistics as the first one left them, and moves no
    tensor that a graph saved (a copy_ back would bump its version)."""
    held = [(m._buffers, name, t) for layer in layers for m in layer.modules() for name, t in m._buffers.items()]
    try:
        for buffers, name, t in held:
            if t is not None:
                buffers[name] = t.clone()
        yield
    finally:
        for buffers, name, t in held:
            buffers[name] = t


def _second_order_backward(ctx, grad: torch.Tensor, x: torch.Tensor) -> tuple:
    """The backward as a graph (create_graph=True): the forward again as PyTorch ops on the same
    inputs, differentiated with create_graph. The rest's layers see the forward's random-number
    and autocast states and copies of their buffers."""
    module, reduce_w, reduce_b, rest_params = ctx.module, ctx.w_like, ctx.reduce_b, ctx.graph[4]
    params = (reduce_w, reduce_b, *rest_params)
    if [None if p is None else p._version for p in params] != ctx.versions:
        raise RuntimeError(
            "bam_fused.BAM: a weight was modified by an inplace operation between the forward and a "
            "backward with create_graph=True"
        )
    gs, gc = module.spatial_att.gate_s, module.channel_att.gate_c
    rest = _rest_of_spatial(gs)
    autocast_on, autocast_dtype = ctx.autocast
    # reduce_pool and the gate compute in fp32, whatever autocast state the caller's backward has.
    fp32 = functools.partial(torch.autocast, "cpu", enabled=False)
    with torch.enable_grad(), _buffer_copies([*rest, gc]), torch.random.fork_rng(devices=[]):
        torch.set_rng_state(ctx.rng)
        with fp32():
            xf = x.float()
            y = F.conv2d(xf, reduce_w.float(), None if reduce_b is None else reduce_b.float())
            means = xf.mean((2, 3))
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_on):
            s = y.to(reduce_w.dtype)
            for layer in rest:
                s = layer(s)
            ch = gc(means.to(raw_weight(gc.gate_c_fc_0).dtype))
        with fp32():
            combine = "product" if ctx.product else "sum"
            out = bam_gate_reference(xf, ch.float(), s.float(), combine).to(x.dtype)
    inputs = (x, *params)
    needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[4:])
    wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
    grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
    dx, dw, db, *rest_grads = (next(grads) if need else None for need in needs)
    return dx, None, None, None, dw, db, *rest_grads


def _kept(t: torch.Tensor) -> torch.Tensor:
    return t


def _own_saved_tensors() -> contextlib.ExitStack:
    """A graph built inside keeps its saved tensors itself, past any outer saved-tensor hooks;
    where hooks are disabled (disable_saved_tensors_hooks) there are none to get past."""
    stack = contextlib.ExitStack()
    with contextlib.suppress(RuntimeError):  # (raised on entering while hooks are disabled)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_kept, _kept))
    return stack


class _TrainingBAM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module, product, graph, reduce_w, reduce_b, *rest_params):
        # What a backward with create_graph=True needs to run this forward again (all cheap).
        ctx.module, ctx.reduce_b, ctx.rng = module, reduce_b, torch.get_rng_state()
        ctx.autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        ctx.versions = [None if p is None else p._version for p in (reduce_w, reduce_b, *rest_params)]
        gs, gc = module.spatial_att.gate_s, module.channel_att.gate_c
        n, c, h, w = x.shape
        cr = reduce_w.shape[0]
        w32 = reduce_w.detach().reshape(cr, c).float().contiguous()
        b32 = torch.zeros(cr) if reduce_b is None else reduce_b.detach().float().contiguous()
        means, y = load_op("reduce_pool")(x, w32, b32, False)
        rest = _rest_of_spatial(gs)
        stock = _stock_tail(rest, n * h * w)
        ctx.tail = None if stock is None else _Tail(stock, y, n * h * w)
        # The rest of both branches as the module's layers (the spatial one unless spatial_train
        # ran it), on leaves that collect the gradients of y and of the means. This inner graph
        # keeps its own saved tensors: under an outer pair of saved-tensor hooks, the
        # non-reentrant torch.utils.checkpoint's, the backward's torch.autograd.grad over it (a
        # graph task of its own) ran the whole forward once more, and BatchNorm's running
        # statistics took a third update where the reference's take two. Without graph (the caller
        # has gradients off: a training-mode forward under no_grad, as BatchNorm recalibration and
        # the reentrant checkpoint's first pass run) nothing is recorded.
        with torch.enable_grad() if graph else contextlib.nullcontext(), _own_saved_tensors():
            y_in, m_in = y.requires_grad_(ctx.tail is None), means.requires_grad_()
            if ctx.tail is None:
                s = y_in.to(reduce_w.dtype)
                for layer in rest:
                    s = layer(s)
            else:
                s = ctx.tail.s
            ch = gc(m_in.to(raw_weight(gc.gate_c_fc_0).dtype))
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
        if _wants_graph(grad, x, ctx.w_like, *rest_params):
            return _second_order_backward(ctx, grad, x)
        grad = grad.contiguous(memory_format=memory_format(x))
        dx, dc, ds = _backward_kernels(grad, x, c32, s32, ctx.product, "cpp")
        n, c = x.shape[:2]
        tail_grads = {}
        if ctx.tail is not None:
            # dy comes back laid out like x, as reduce_pool_backward takes it.
            dy, tail_grads = ctx.tail.backward(ds, memory_format(x) == torch.channels_last)
        wanted = [p for p in rest_params if p.requires_grad and p not in tail_grads]
        # retain_graph: a Function cannot tell whether its caller retains the graph, so the
        # rest's graph lives as long as this node (a second backward works, as in the reference).
        if ctx.tail is None:
            grads = torch.autograd.grad(
                (ch, s), (y_in, m_in, *wanted), (dc.to(ch.dtype), ds.view_as(s).to(s.dtype)),
                allow_unused=True, retain_graph=True,
            )  # fmt: skip
            dy, dmean, *rest_grads = grads
        else:
            dmean, *rest_grads = torch.autograd.grad(
                (ch,), (m_in, *wanted), (dc.to(ch.dtype),), allow_unused=True, retain_graph=True
            )
        dy = torch.zeros_like(y_in) if dy is None else dy
        dmean = torch.zeros(n, c) if dmean is None else dmean
        want_dx, want_w, want_b = ctx.needs_input_grad[0], ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        dw = db = None
        if want_dx or want_w or want_b:
            dw, db = load_op("reduce_pool_backward")(
                x, dy.contiguous(memory_format=memory_format(x)), dmean.contiguous(), w32, dx if want_dx else None
            )
        it = iter(rest_grads)
        rest_out = [(tail_grads[p] if p in tail_grads else next(it)) if p.requires_grad else None for p in rest_params]
        w_like = ctx.w_like.detach()
        return (
            dx if want_dx else None, None, None, None,
            dw.view(w_like.shape).to(w_like.dtype) if want_w else None,
            db.to(w_like.dtype) if want_b else None, *rest_out,
        )  # fmt: skip


def reason(x: torch.Tensor) -> str | None:
    """Why x cannot take the CPU autograd path, or None when it can (_layers.autograd_reason says
    whether the module's layers can)."""
    if x.device.type != "cpu":
        return "not a CPU tensor"
    if x.dtype not in BRANCH_DTYPES:
        return f"x is {x.dtype}"
    if x.numel() == 0:
        return "x is empty"
    return None


def training_bam(module: nn.Module, x: torch.Tensor, combine: str) -> torch.Tensor:
    """module (a bam_fused.BAM) on x with autograd, through the CPU kernels above. x is laid out
    NCHW or channels_last (dense)."""
    red = module.spatial_att.gate_s.gate_s_conv_reduce0
    rest = [p for layer in _rest_of_spatial(module.spatial_att.gate_s) for p in layer.parameters()]
    rest += list(module.channel_att.gate_c.parameters())
    x = x.contiguous(memory_format=memory_format(x))
    graph = torch.is_grad_enabled()  # (inside forward, gradients are always off)
    return _TrainingBAM.apply(x, module, combine == "product", graph, red.weight, red.bias, *rest)
