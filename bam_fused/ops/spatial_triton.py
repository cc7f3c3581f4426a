"""Triton kernels of the spatial branch after the pass over x, on the tensor cores (CUDA eval
path, ops/attention_cuda.py).

On y = relu(reduce conv) (N, Cr, H, W) fp32: each dilated 3x3 conv (zero padding = dilation)
with bias and ReLU is an implicit matrix product per block of BLOCK_P pixels of one sample:
nine (BLOCK_P, Cr) x (Cr, Cr) products, one per tap, each reading y shifted by the tap (masked
at the border), in 3xTF32 like the pass (float32 accuracy). The last conv also applies the
final 1x1 conv to one channel, so its output never reaches memory. Our CUDA-core kernel
(csrc/cuda/spatial_convs.cuh) took 24-32 us per conv at 56x56 on an H200 for 0.23 G
multiply-adds, and cuDNN's TF32 convs 10.6 us at 28x28 plus layout and bias/ReLU launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pass_triton import cr_pad, relu

# Pixels per program and warps for each padded Cr, and input channels per product (pass_aot.py
# checks them for spills).
CONFIGS = {16: (128, 4), 32: (128, 8), 64: (32, 4)}
BLOCK_K = 32


@triton.jit
def _dilated_conv_kernel(
    y_ptr, w_ptr, b_ptr, wf_ptr, bf_ptr, out_ptr,
    H, W, CR, n_pb, dilation,
    sy_n, sy_c, sy_h, sy_w, sw_o, sw_i, sw_h, sw_w, so_n, so_c, so_p,
    CR_PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, FINAL: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n = (pid // n_pb).to(tl.int64)
    pb = pid % n_pb
    hw = H * W
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < hw
    h = p // W
    w = p % W
    c = tl.arange(0, CR_PAD)  # output channels
    c_ok = c < CR
    y_n = y_ptr + n * sy_n
    acc = tl.zeros((BLOCK_P, CR_PAD), dtype=tl.float32)
    k = tl.arange(0, BLOCK_K)
    # One loop over (tap, slice of BLOCK_K input channels), not unrolled: unrolled, the nine
    # shifted tiles were all loaded up front and spilled; whole 64-channel weight slices spilled too.
    for it in range(9 * (CR_PAD // BLOCK_K)):
        tap = it // (CR_PAD // BLOCK_K)
        ci = (it % (CR_PAD // BLOCK_K)) * BLOCK_K + k
        ci_ok = ci < CR
        kh = tap // 3
        kw = tap % 3
        hh = h + (kh - 1) * dilation
        ww = w + (kw - 1) * dilation
        ok = p_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        offs = hh.to(tl.int64) * sy_h + ww.to(tl.int64) * sy_w
        a = tl.load(y_n + offs[:, None] + ci[None, :] * sy_c, mask=ok[:, None] & ci_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + c[None, :] * sw_o + ci[:, None] * sw_i + kh * sw_h + kw * sw_w,
                     mask=ci_ok[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
        acc = tl.dot(a, wt, acc, input_precision=PRECISION)
    v = relu(acc + tl.load(b_ptr + c, mask=c_ok, other=0.0)[None, :])
    if FINAL:
        wf = tl.load(wf_ptr + c, mask=c_ok, other=0.0)
        # Padded channels hold 0 * y (masked weights), NaN where y is infinite: drop them
        # rather than weigh them by 0.
        v = tl.where(c_ok[None, :], v, 0.0)
        s = tl.sum(v * wf[None, :], axis=1) + tl.load(bf_ptr)
        tl.store(out_ptr + n * hw + p, s, mask=p_ok)
    else:
        o_offs = n * so_n + p.to(tl.int64)[:, None] * so_p + c[None, :] * so_c
        tl.store(out_ptr + o_offs, v, mask=p_ok[:, None] & c_ok[None, :])


def spatial_map(
    y: torch.Tensor,
    w_dilated: list[torch.Tensor],
    b_dilated: list[torch.Tensor],
    dilation: int,
    w_final: torch.Tensor,
    b_final: torch.Tensor,
    precision: str = "tf32x3",
) -> torch.Tensor:
    """The spatial map (N, H, W) fp32 from y (N, Cr, H, W) fp32 (any strides; read as
    channels_last, copied first if it is not): the dilated
    convs with bias and ReLU, then the final 1x1 conv to one channel.

    Weights as BAM.folded() gives them: w_dilated[i] (Cr, Cr, 3, 3) fp32 (any strides),
    b_dilated[i] (Cr,), w_final (Cr,), b_final (1,) contiguous fp32; at least one dilated conv
    and 1 <= Cr <= 64 (the caller checks).
    """
    n, cr, h, wd = y.shape
    pad = cr_pad(cr)
    block_p, warps = CONFIGS[pad]
    hw = h * wd
    n_pb = max(1, triton.cdiv(hw, block_p))
    spatial = torch.empty((n, h, wd), dtype=torch.float32, device=y.device)
    if n * hw == 0:
        return spatial
    # channels_last: each pixel's channels are one 16-byte-aligned run (the copies stay wide);
    # the Triton pass writes y so already.
    # Past the map's size every off-centre tap falls in the zero padding: same result, and the
    # kernel's int32 tap offsets cannot overflow.
    dilation = min(dilation, max(h, wd))
    cur = y.contiguous(memory_format=torch.channels_last)
    for i, (w, b) in enumerate(zip(w_dilated, b_dilated, strict=True)):
        final = i == len(w_dilated) - 1
        out = spatial if final else torch.empty_like(y, memory_format=torch.channels_last)
        so = (0, 0, 0) if final else (out.stride(0), out.stride(1), out.stride(3))
        _dilated_conv_kernel[(n * n_pb,)](
            cur, w, b, w_final, b_final, out, h, wd, cr, n_pb, dilation,
            *cur.stride(), *w.stride(), *so,
            CR_PAD=pad, BLOCK_P=block_p, BLOCK_K=min(pad, BLOCK_K), FINAL=final, PRECISION=precision,
            num_warps=warps, num_stages=3,
        )  # fmt: skip
        cur = out
    return spatial
