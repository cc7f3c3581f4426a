"""bam_branches: both BAM branches' reads of x in one op (the C++/CUDA extension).

One pass over x gives the pooled means and the 1x1 reduce conv: a CUDA kernel, or on the CPU
our vector code (csrc/cpu/conv1x1_pool.h).

Given x and the spatial branch's weights with BatchNorm folded in (eval mode), returns the
pooled channel means (N, C) and the spatial attention map (N, H, W), both fp32. Inference
only: the op has no autograd (with autograd, bam_fused.BAM uses ops/training.py on the CPU
and PyTorch modules on CUDA).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ext
from .._checks import check_feature_map, check_float_tensor, check_positive_int
from .gate import memory_format

# The dtypes x may have in the branch kernels: the pass over x (eval and training) and its backward.
BRANCH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_fake_registered = False


def _register_fake() -> None:
    """The extension defines the op; its fake kernel lives here, registered once it loads."""
    global _fake_registered
    if _fake_registered:
        return

    def maps(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, h, w = x.shape
        f32 = dict(dtype=torch.float32, device=x.device)
        return x.new_empty((n, c), **f32), x.new_empty((n, h, w), **f32)

    @torch.library.register_fake("bam_fused_C::gate_forward")
    def _(x, row, col, product):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("bam_fused_C::gate_backward")
    def _(grad, x, row, col, product):
        return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(row), torch.empty_like(col)

    @torch.library.register_fake("bam_fused_C::branches")
    def _(x, w_reduce, b_reduce, w_dilated, b_dilated, dilation, w_final, b_final):
        return maps(x)

    @torch.library.register_fake("bam_fused_C::attention")
    def _(x, w_reduce, b_reduce, w_dilated, b_dilated, dilation, w_final, b_final, w_fc0, b_fc0, w_fc1, b_fc1):
        return maps(x)

    @torch.library.register_fake("bam_fused_C::bam_eval")
    def _(x, w_reduce, b_reduce, w_dilated, b_dilated, dilation, w_final, b_final, w_fc0, b_fc0, w_fc1, b_fc1, product):
        return torch.empty_like(x)

    @torch.library.register_fake("bam_fused_C::attention_tail")
    def _(part, y, w_dilated, b_dilated, dilation, w_final, b_final, w_fc0, b_fc0, w_fc1, b_fc1):
        n, cr, h, wd = y.shape
        return part.new_empty((n, part.shape[2])), y.new_empty((n, h, wd))

    @torch.library.register_fake("bam_fused_C::reduce_pool")
    def _(x, w, b, relu):
        n, c, h, wd = x.shape
        y = torch.empty((n, w.shape[0], h, wd), dtype=torch.float32, device=x.device)
        return x.new_empty((n, c), dtype=torch.float32), y.contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("bam_fused_C::reduce_pool_backward")
    def _(x, dy, dmean, w, dx):
        return w.new_empty(w.shape), w.new_empty(w.shape[:1])

    @torch.library.register_fake("bam_fused_C::spatial_train")
    def _(y, bn_weight, bn_bias, eps, running_mean, running_var, conv_weight, conv_bias, dilation, final_weight,
          final_bias):  # fmt: skip
        n, cr, h, wd = y.shape
        maps = [y.new_empty(y.shape, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
                for _ in range(2 * len(bn_weight) - 1)]  # fmt: skip
        return y.new_empty((n, h, wd), dtype=torch.float32), maps, y.new_empty((3, len(bn_weight), cr))

    @torch.library.register_fake("bam_fused_C::spatial_train_backward")
    def _(ds, y, maps, stats, bn_weight, bn_bias, conv_weight, dilation, final_weight, batch_stats, dy_channels_last):
        layout = torch.channels_last if dy_channels_last else torch.contiguous_format
        dy = torch.empty(y.shape, dtype=torch.float32, device=y.device).contiguous(memory_format=layout)
        cr = y.shape[1]
        grads = []
        for w in conv_weight:
            grads += [stats.new_empty(cr), stats.new_empty(cr), w.new_empty(w.shape), stats.new_empty(cr)]
        grads += [
            stats.new_empty(cr),
            stats.new_empty(cr),
            final_weight.new_empty(final_weight.shape),
            stats.new_empty(1),
        ]
        return dy, grads

    _fake_registered = True


def load_op(name: str = "branches"):
    """Loads the extension (raising ExtensionUnavailable with the reason) and returns the op:
    "branches" (bam_branches), "attention" (the branch op and the channel MLP: BAM's eval path on
    CUDA) or "bam_eval" (attention, then the gate: BAM's eval path on the CPU), among others."""
    _ext.load()
    _register_fake()
    return getattr(torch.ops.bam_fused_C, name)


def bam_branches(
    x: torch.Tensor,
    w_reduce: torch.Tensor,
    b_reduce: torch.Tensor,
    w_dilated: Sequence[torch.Tensor],
    b_dilated: Sequence[torch.Tensor],
    dilation: int,
    w_final: torch.Tensor,
    b_final: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled means (N, C) and spatial map (N, H, W) of x (one pass over x, on CUDA and on the CPU).

    Weights (fp32, BatchNorm folded in): w_reduce (Cr, C) or (Cr, C, 1, 1), b_reduce (Cr,),
    w_dilated[i] (Cr, Cr, 3, 3), b_dilated[i] (Cr,), w_final (Cr,) or (1, Cr, 1, 1), b_final (1,).
    """
    x = check_feature_map(x, pixels=True)
    check_positive_int("dilation", dilation)
    c = x.shape[1]
    w_reduce = check_float_tensor("w_reduce", w_reduce)
    if w_reduce.dim() not in (2, 4) or w_reduce.shape[1] != c or w_reduce[0].numel() != c:
        raise ValueError(f"w_reduce must have shape (Cr, {c}) or (Cr, {c}, 1, 1), got {tuple(w_reduce.shape)}")
    if len(w_dilated) != len(b_dilated):
        raise ValueError(
            f"w_dilated and b_dilated must have one entry per conv, got {len(w_dilated)} and {len(b_dilated)}"
        )
    # Under torch.compile the op was loaded while tracing (BAM checks it first); loading
    # imports modules, which Dynamo must not trace.
    op = torch.ops.bam_fused_C.branches if torch.compiler.is_compiling() else load_op()
    x = x.contiguous(memory_format=memory_format(x))

    def f32(name: str, t: torch.Tensor, any_strides: bool = False) -> torch.Tensor:
        t = check_float_tensor(name, t)
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; put them on one device")
        t = t.to(torch.float32)
        return t if any_strides else t.contiguous()

    cr = w_reduce.shape[0]
    return op(
        x, f32("w_reduce", w_reduce.reshape(cr, c)), f32("b_reduce", b_reduce.reshape(-1)),
        [f32(f"w_dilated[{i}]", w, any_strides=True) for i, w in enumerate(w_dilated)],
        [f32(f"b_dilated[{i}]", b) for i, b in enumerate(b_dilated)], dilation,
        f32("w_final", w_final.reshape(-1)), f32("b_final", b_final.reshape(-1)),
    )  # fmt: skip


@torch.library.custom_op("bam_fused::bam_eval_flexible", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def bam_eval_flexible(
    x: torch.Tensor, w_reduce: torch.Tensor, b_reduce: torch.Tensor, w_dilated: list[torch.Tensor],
    b_dilated: list[torch.Tensor], dilation: int, w_final: torch.Tensor, b_final: torch.Tensor,
    w_fc0: torch.Tensor, b_fc0: torch.Tensor, w_fc1: torch.Tensor, b_fc1: torch.Tensor, product: bool,
) -> torch.Tensor:  # fmt: skip
    """bam_fused_C::bam_eval (CPU) for torch.compile, taking x NCHW or channels_last as Inductor
    lays it out (flexible_layout): in a compiled model Inductor lays activations out
    channels_last around convolutions, and the C++ op, fixed to the traced layout, cost a copy
    of x each way."""
    weights = (w_reduce, b_reduce, w_dilated, b_dilated, dilation, w_final, b_final, w_fc0, b_fc0, w_fc1, b_fc1)
    return load_op("bam_eval")(x.contiguous(memory_format=memory_format(x)), *weights, product)


@bam_eval_flexible.register_fake
def _(x, w_reduce, b_reduce, w_dilated, b_dilated, dilation, w_final, b_final, w_fc0, b_fc0, w_fc1, b_fc1, product):
    return torch.empty_like(x, memory_format=memory_format(x))
