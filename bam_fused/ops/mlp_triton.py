"""Triton kernels of BAM's channel MLP for the CUDA eval path's Triton plan (ops/attention_cuda.py):
w1 @ relu(w0 @ mean + b0) + b1 for every sample, from the pass's pooled partial means.

Three small kernels: the means (a sum over the pass's pixel blocks), then each layer as a
matrix product over all samples at once on the tensor cores (3xTF32, like the pass). On an
H200 (2026-11-26, N = 32) the library's path took about 25-30 us at C = 512 and 1024 (two
skinny sgemm/gemv launches, a reduction, elementwise), and the extension's one-block-per-sample
kernel 25 and 83 us; these need little more than three launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pass_triton import relu

BLOCK_N = 16  # samples per program (tl.dot needs 16)
BLOCK_C = 64  # channels per program (means, second layer) and per step (first layer)
BLOCK_H = 16  # hidden units per program (first layer)


@triton.jit
def _means_kernel(part_ptr, mean_ptr, N, P, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """mean[n, c] = sum over p, in order, of part[n, p, c] (the pass scaled part by 1/HW)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (n < N)[:, None] & (c < C)[None, :]
    rows = part_ptr + n.to(tl.int64)[:, None] * P * C + c[None, :]
    s = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for p in range(P):
        s += tl.load(rows + p * C, mask=mask, other=0.0)
    tl.store(mean_ptr + n.to(tl.int64)[:, None] * C + c[None, :], s, mask=mask)


@triton.jit
def _layer_kernel(
    a_ptr, w_ptr, b_ptr, out_ptr, N, K, M,
    RELU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """out[n, m] = (relu)(sum_k a[n, k] * w[m, k] + b[m]): a (N, K), w (M, K), out (N, M), fp32."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = n < N
    m_ok = m < M
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        k_ok = k < K
        a = tl.load(a_ptr + n.to(tl.int64)[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + m[None, :] * K + k[:, None], mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    acc += tl.load(b_ptr + m, mask=m_ok, other=0.0)[None, :]
    if RELU:
        acc = relu(acc)
    tl.store(out_ptr + n.to(tl.int64)[:, None] * M + m[None, :], acc, mask=n_ok[:, None] & m_ok[None, :])


def _layer(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, relu: bool, block_m: int, precision: str):
    n, k = a.shape
    m = w.shape[0]
    out = torch.empty((n, m), dtype=torch.float32, device=a.device)
    block_k = max(16, min(64, triton.next_power_of_2(k)))
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(m, block_m))
    _layer_kernel[grid](a, w, b, out, n, k, m, RELU=relu, BLOCK_N=BLOCK_N, BLOCK_M=block_m, BLOCK_K=block_k,
                        PRECISION=precision, num_warps=4)  # fmt: skip
    return out


def channel_mlp(
    part: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    precision: str = "tf32x3",
) -> torch.Tensor:
    """The channel MLP's output (N, C) fp32 from pooled partial means part (N, P, C) fp32.

    w0 (hidden, C), b0 (hidden,), w1 (C, hidden), b1 (C,): contiguous fp32 (BAM.folded()'s,
    the caller checks).
    """
    n, p, c = part.shape
    if n == 0:
        return torch.empty((0, c), dtype=torch.float32, device=part.device)
    mean = torch.empty((n, c), dtype=torch.float32, device=part.device)
    _means_kernel[(triton.cdiv(n, BLOCK_N), triton.cdiv(c, BLOCK_C))](
        part, mean, n, p, c, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, num_warps=4
    )
    hidden = _layer(mean, w0, b0, True, BLOCK_H, precision)
    return _layer(hidden, w1, b1, False, BLOCK_C, precision)
