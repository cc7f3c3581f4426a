"""Triton pass over x for BAM's CUDA eval path: the 1x1 reduce conv on tensor cores plus the
pooled channel sums, reading x once.

Per block of BLOCK_P pixels of one sample, y = relu(x^T W^T + b) is a (BLOCK_P, C) x (C, Cr)
matrix product: tl.dot in 3xTF32 ("tf32x3": each fp32 operand split into a TF32 high and low
part, three products; close to float32 accuracy at tensor-core speed). The same tiles give the
channel sums over the block's pixels. The CUDA-core kernel (csrc/cuda/reduce_pool.cuh) ran at
about a quarter of the FMA rate on an H200 (49-58 us at every ResNet stage, against 9-27 us
for one read of x); this one moves the arithmetic to the tensor cores.

When the grid would not fill the GPU (14x14 maps) the channels are split over program_id(1)
and each split writes raw sums; _finish_kernel adds them in a fixed order, then bias and ReLU.
No atomics: results are bitwise repeatable. Outputs follow the branch op's contract
(csrc/ops.h): pooled partial means (N, P, C) fp32 and y (N, Cr, H, W) fp32, NCHW or
channels_last as asked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .gate_triton import _pow2_divisor as pow2_divisor
from .gate_triton import multiprocessors

# Reduced channels the kernel takes (the accumulator is BLOCK_P x Cr, padded to a power of
# two >= 16, in registers); wider reductions stay on the CUDA kernel.
MAX_CR = 64
# Channel splits are whole multiples of this many channels (any BLOCK_C divides it).
SPLIT_ALIGN = 64


@triton.jit
def relu(v):
    """max(v, 0) that keeps NaN, as torch's ReLU does. A plain tl.maximum is maxnum: PTX max.f32
    (and the interpreter's np.fmax) return the other operand, so a NaN input became 0."""
    return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)


@dataclass(frozen=True)
class PassConfig:
    block_p: int
    block_c: int
    num_warps: int
    num_stages: int


# What the launcher uses, by x's layout (channels_last?) and padded Cr: of the configurations
# timed on an H200 (2026-11-26, N = 32, fp32, ResNet-50 stages, GPU time as CUDA graphs;
# benchmarks/results/nvidia-h200/probe-configs.log at commit 8656bab), the fastest that
# compiles with zero spills for sm_80 and sm_90 in every dtype (pass_aot.py).
DEFAULTS = {
    (False, 16): PassConfig(64, 32, 4, 3),  # 56x56: 47.8 us, against 51.1 for 128/32/4/3
    (False, 32): PassConfig(64, 32, 4, 3),  # 28x28: 39.5 against 44.8 (128/32/8/3)
    # 14x14: every NCHW time then came from 4-byte loads (now 16-byte, see ROW); unmeasured since.
    # channels_last's fastest tile (64/16/4/4) spills nothing in NCHW.
    (False, 64): PassConfig(64, 16, 4, 4),
    (True, 16): PassConfig(128, 16, 4, 3),  # 62.7 against 76.3 (128/32/4/3)
    (True, 32): PassConfig(128, 16, 4, 3),  # 50.0 against 61.7 (128/32/8/3)
    # 45.6; 64/16/4/4 took 39.5 but spills 4 bytes for 16-bit x on sm_80.
    (True, 64): PassConfig(128, 16, 8, 3),
}
# Further configurations benchmarks/gpu_probe.py times against the defaults.
CANDIDATES = (PassConfig(64, 32, 4, 3), PassConfig(128, 16, 4, 3), PassConfig(128, 32, 8, 4),
              PassConfig(64, 16, 4, 4), PassConfig(256, 16, 8, 3), PassConfig(128, 32, 4, 3))  # fmt: skip


def cr_pad(cr: int) -> int:
    """The accumulator's width for Cr reduced channels: a power of two, at least 16 (tl.dot)."""
    return max(16, triton.next_power_of_2(cr))


@triton.jit
def _pass_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, part_ptr,
    C, HW, CR, n_pb, c_split, inv_hw,
    sx_n, sx_c, sx_p, sy_n, sy_c, sy_p, sy_split, raw,
    CR_PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
    ROW: tl.constexpr, C_DIV: tl.constexpr, X_CL: tl.constexpr, Y_CL: tl.constexpr,
):  # fmt: skip
    # Loads of masked tiles are 16 bytes wide only where Triton can prove alignment, and it
    # specialises integer arguments on divisibility by 16 alone (tl.multiple_of hints on them
    # did not help: sm_90 PTX, Triton 3.8). So NCHW rows whose length is a multiple of 4 but not
    # of 16 (14x14 maps: HW = 196) come as the constant ROW, and the channel bound below, a
    # minimum Triton cannot see through, is hinted. NCHW y's rows (channel stride HW) likewise,
    # for 16-byte stores, whatever x's layout.
    if ROW > 0:
        HW = ROW
        if not X_CL:
            sx_c = ROW
            sx_n = C * ROW
        if not Y_CL:
            sy_c = ROW
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n = (pid // n_pb).to(tl.int64)
    pb = pid % n_pb
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HW
    p64 = p.to(tl.int64)
    r = tl.arange(0, CR_PAD)
    r_ok = r < CR
    ci = tl.arange(0, BLOCK_C)
    c_begin = split * c_split
    c_end = tl.minimum(C, c_begin + c_split)
    if C_DIV > 1:
        c_end = tl.multiple_of(c_end, C_DIV)
    x_rows = x_ptr + n * sx_n + p64[:, None] * sx_p  # (BLOCK_P, 1) pointers
    part_row = part_ptr + (n * n_pb + pb) * C
    acc = tl.zeros((BLOCK_P, CR_PAD), dtype=tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_C):
        c = c0 + ci
        c_ok = c < c_end
        xt = tl.load(x_rows + c.to(tl.int64)[None, :] * sx_c, mask=p_ok[:, None] & c_ok[None, :], other=0.0)
        xt = xt.to(tl.float32)
        wt = tl.load(w_ptr + r[None, :] * C + c[:, None], mask=c_ok[:, None] & r_ok[None, :], other=0.0)
        tl.store(part_row + c, tl.sum(xt, axis=0) * inv_hw, mask=c_ok)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
    y_offs = n * sy_n + p64[:, None] * sy_p + r[None, :] * sy_c
    mask = p_ok[:, None] & r_ok[None, :]
    if raw:
        tl.store(y_ptr + split.to(tl.int64) * sy_split + y_offs, acc, mask=mask)
    else:
        bias = tl.load(b_ptr + r, mask=r_ok, other=0.0)
        tl.store(y_ptr + y_offs, relu(acc + bias[None, :]), mask=mask)


@triton.jit
def _finish_kernel(part_ptr, b_ptr, y_ptr, numel, CR, HW, splits, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """y[e] = relu(sum over splits, in order, of part[s, e] + b[channel of e]); part and y in one layout."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = e < numel
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    src = part_ptr + e
    for _ in range(splits):
        s += tl.load(src, mask=ok, other=0.0)
        src += numel  # a pointer step: no 32-bit product of split and numel to overflow
    if CHANNELS_LAST:
        r = e % CR
    else:
        r = (e // HW) % CR
    tl.store(y_ptr + e, relu(s + tl.load(b_ptr + r, mask=ok, other=0.0)), mask=ok)


def _constant_row(hw: int) -> int:
    """ROW for the kernel: HW where it is a multiple of 4 but not of 16 (NCHW rows of x and y
    can then move 16 bytes at a time; one compile per such HW), else 0. The kernel takes x's
    strides from it only for NCHW-contiguous x (X_CL false); other x keep theirs."""
    return hw if hw > 1 and hw % 4 == 0 and hw % 16 != 0 else 0


def plan_splits(programs: int, c: int, min_programs: int) -> tuple[int, int]:
    """(splits, channels per split): split the channels only as far as the grid needs to
    reach min_programs, in whole SPLIT_ALIGN-channel slices, at least two slices per split."""
    slices = triton.cdiv(c, SPLIT_ALIGN)
    want = triton.cdiv(min_programs, max(programs, 1))
    splits = max(1, min(want, slices // 2))
    c_split = triton.cdiv(slices, splits) * SPLIT_ALIGN
    return triton.cdiv(c, c_split), c_split


def _multiprocessors(device: torch.device) -> int:
    sms = multiprocessors(device.index if device.type == "cuda" else None)
    return 4 if sms is None else sms  # the interpreter: any small number exercises the split path


def reduce_pool(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    y_channels_last: bool,
    config: PassConfig | None = None,
    precision: str = "tf32x3",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled partial means (N, P, C) and y = relu(w @ x + b) (N, Cr, H, W), both fp32.

    x: NCHW- or channels_last-contiguous fp32/fp16/bf16; w (Cr, C) and b (Cr,) contiguous fp32
    with 1 <= Cr <= MAX_CR (the caller checks: this is the fast path behind the module).
    config: DEFAULTS[(x is channels_last, cr_pad(Cr))] unless given.
    """
    n, c, h, wd = x.shape
    hw, cr = h * wd, w.shape[0]
    x_cl = not x.is_contiguous()
    config = config or DEFAULTS[(x_cl, cr_pad(cr))]
    n_pb = max(1, triton.cdiv(hw, config.block_p))
    f32 = dict(dtype=torch.float32, device=x.device)
    y_format = torch.channels_last if y_channels_last else torch.contiguous_format
    part = torch.empty((n, n_pb, c), **f32)
    y = torch.empty((n, cr, h, wd), **f32, memory_format=y_format)
    if n * hw == 0:
        return part.zero_(), y
    splits, c_split = plan_splits(n * n_pb, c, 4 * _multiprocessors(x.device))
    # (N, C, HW) strides of x and (N, Cr, HW) of y: NCHW or channels_last alike.
    sx = (x.stride(0), x.stride(1), x.stride(3))
    sy = (y.stride(0), y.stride(1), y.stride(3))
    # Raw split sums: splits blocks of N samples, each block laid out like y (y.numel() apart).
    out = torch.empty((splits * n, cr, h, wd), **f32, memory_format=y_format) if splits > 1 else y
    _pass_kernel[(n * n_pb, splits)](
        x, w, b, out, part, c, hw, cr, n_pb, c_split, 1.0 / hw, *sx, *sy, y.numel(), splits > 1,
        CR_PAD=cr_pad(cr), BLOCK_P=config.block_p, BLOCK_C=config.block_c,
        PRECISION=precision, ROW=_constant_row(hw), C_DIV=pow2_divisor(math.gcd(c, c_split)), X_CL=x_cl,
        Y_CL=y_channels_last,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if splits > 1:
        block = 1024
        _finish_kernel[(triton.cdiv(y.numel(), block),)](
            out, b, y, y.numel(), cr, hw, splits, CHANNELS_LAST=y_channels_last, BLOCK=block
        )
    return part, y
