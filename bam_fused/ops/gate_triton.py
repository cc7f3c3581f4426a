"""Triton kernels of the fused gate and their launchers.

Both memory layouts reduce to one problem. x is viewed as (N, R, L) with L contiguous:
NCHW gives R = C, L = H*W; channels_last gives R = H*W, L = C. Each row r carries a scalar
``row[n, r]`` and each column l a scalar ``col[n, l]`` (Mc and Ms, in the order the layout
implies); the gate is out = x * (1 + sigmoid(row (+) col)) on every (r, l).

Forward: one program per (n, block of rows, block of columns), a 2-D tile.
Backward: one program per (n, block of columns, chunk of rows) walks its rows in tiles: it
writes dx, keeps the column gradient of its chunk in registers, and writes per-tile row
gradients. Both partials are summed afterwards by a fixed-order torch.sum: no atomics, so the
result is bitwise repeatable.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

INT32_LIMIT = 2**31 - 1
# dtypes the kernels store; math is always fp32.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _split_pid(pid, n_fast, n_mid):
    """Program id -> (fast, mid, slow) coordinates; consecutive programs walk memory in order."""
    rest = pid // n_fast
    return pid % n_fast, rest % n_mid, rest // n_mid


@triton.jit
def _attention(rv, cv, PRODUCT: tl.constexpr):
    """row (+) col as an outer sum or product: (BLOCK_R, BLOCK_L)."""
    if PRODUCT:
        a = rv[:, None] * cv[None, :]
    else:
        a = rv[:, None] + cv[None, :]
    return a


@triton.jit
def _gate_fwd_kernel(
    x_ptr, row_ptr, col_ptr, out_ptr, R, L, n_rb, n_lb,
    PRODUCT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
    L_DIV: tl.constexpr, INT64: tl.constexpr,
):  # fmt: skip
    if L_DIV > 1:  # (L == 1 arrives as a constexpr, which multiple_of rejects)
        L = tl.multiple_of(L, L_DIV)  # row length: lets masks and loads be vectorised
    lb, rb, n = _split_pid(tl.program_id(0), n_lb, n_rb)
    if INT64:
        n = n.to(tl.int64)
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    l_idx = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    r_ok = r < R
    l_ok = l_idx < L
    rv = tl.load(row_ptr + n * R + r, mask=r_ok, other=0.0)
    cv = tl.load(col_ptr + n * L + l_idx, mask=l_ok, other=0.0)
    a = _attention(rv, cv, PRODUCT)
    # Row starts are multiples of L_DIV (the power of two dividing L): lets Triton vectorise.
    row_start = (n * R + r) * L
    offs = row_start[:, None] + l_idx[None, :]
    mask = r_ok[:, None] & l_ok[None, :]
    xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = xv * (1.0 + tl.sigmoid(a))  # the reference's form and rounding
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd_kernel(
    g_ptr, x_ptr, row_ptr, col_ptr, dx_ptr, drow_part_ptr, dcol_part_ptr,
    R, L, n_lb, n_rc, rows_per_chunk,
    PRODUCT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
    L_DIV: tl.constexpr, INT64: tl.constexpr, ACC_2D: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    if L_DIV > 1:
        L = tl.multiple_of(L, L_DIV)
    lb, rc, n = _split_pid(tl.program_id(0), n_lb, n_rc)
    if INT64:
        n = n.to(tl.int64)
    l_idx = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    l_ok = l_idx < L
    cv = tl.load(col_ptr + n * L + l_idx, mask=l_ok, other=0.0)
    # The column gradient: summed over each tile's rows every iteration (a reduction across
    # warps, through shared memory, each time), or with ACC_2D kept per tile position in
    # registers and summed over the rows once at the end.
    if ACC_2D:
        dcol_2d = tl.zeros([BLOCK_R, BLOCK_L], dtype=tl.float32)
    else:
        dcol = tl.zeros([BLOCK_L], dtype=tl.float32)
    r_begin = rc * rows_per_chunk
    r_end = tl.minimum(r_begin + rows_per_chunk, R)
    for r0 in tl.range(r_begin, r_end, BLOCK_R, num_stages=STAGES):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < r_end
        rv = tl.load(row_ptr + n * R + r, mask=r_ok, other=0.0)
        a = _attention(rv, cv, PRODUCT)
        row_start = (n * R + r) * L
        offs = row_start[:, None] + l_idx[None, :]
        mask = r_ok[:, None] & l_ok[None, :]
        # Masked lanes load g = 0, so they add nothing to either gradient.
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(a)
        tl.store(dx_ptr + offs, (g * (1.0 + s)).to(dx_ptr.dtype.element_ty), mask=mask)
        dz = g * xv * s * (1.0 - s)
        if PRODUCT:
            drow = tl.sum(dz * cv[None, :], axis=1)
            dz_col = dz * rv[:, None]
        else:
            drow = tl.sum(dz, axis=1)
            dz_col = dz
        if ACC_2D:
            dcol_2d += dz_col
        else:
            dcol += tl.sum(dz_col, axis=0)
        tl.store(drow_part_ptr + (n * n_lb + lb) * R + r, drow, mask=r_ok)
    if ACC_2D:
        dcol = tl.sum(dcol_2d, axis=0)
    tl.store(dcol_part_ptr + (n * n_rc + rc) * L + l_idx, dcol, mask=l_ok)


# Host-side launch arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are
# JIT-aware wrappers, and with them the configs cost about 50 us per call under cProfile on
# the H100 machine's CPU (2026-11-25), which is as long as a 14x14 gate kernel runs.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_ceil(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _pow2_divisor(value: int, cap: int = 16) -> int:
    d = 1
    while d < cap and value % (2 * d) == 0:
        d *= 2
    return d


@dataclass(frozen=True)
class FwdConfig:
    block_r: int
    block_l: int
    num_warps: int


@dataclass(frozen=True)
class BwdConfig:
    block_r: int
    block_l: int
    rows_per_chunk: int
    num_warps: int
    acc_2d: bool = False  # the kernel's ACC_2D (gpu_probe.py's gate step times both)
    # The kernel's STAGES: its loop's loads pipelined this deep (tl.range's num_stages: cp.async
    # into shared memory); 1 compiles the loop as before the option (the same SASS, checked for
    # 48 configurations on sm_80 and sm_90), which the launcher uses until a GPU has timed it.
    stages: int = 1


def _block_l(L: int, largest: int) -> int:
    """The block width along L: a power of two, at least 128 lanes (or L's own power of two)
    so that rows are read in long coalesced runs, and the widest one whose ragged last block
    idles at most 1/16 of its lanes; else the one that idles the fewest. 56*56 = 3136 gets
    256 (1024 would idle 23%); 14*14 = 196 gets 256 (one block per row, 23% idle lanes beat
    16-wide blocks, which read 64-byte runs and ran 4x slower on an H100)."""
    width = _pow2_ceil(L)
    lo, hi = min(128, width), max(min(largest, width), 16)
    candidates = [b for b in (1024, 512, 256, 128, 64, 32, 16) if lo <= b <= hi]

    def idle(b: int) -> int:
        return _cdiv(L, b) * b - L

    good = [b for b in candidates if idle(b) <= L / 16]
    best = good[0] if good else min(candidates, key=lambda b: (idle(b), -b))
    return min(best, width)


@functools.lru_cache(maxsize=1024)
def fwd_config(R: int, L: int) -> FwdConfig:
    """Tiles of about 4096 elements, as wide along the contiguous axis as L allows."""
    block_l = _block_l(L, 1024)
    block_r = min(max(4096 // block_l, 1), _pow2_ceil(R))
    return FwdConfig(block_r, block_l, num_warps=8 if block_r * block_l >= 4096 else 4)


@functools.cache
def multiprocessors(device_index: int | None) -> int | None:
    """Multiprocessors of CUDA device device_index (cached: launchers ask on every call); None
    off CUDA (the interpreter)."""
    if device_index is None or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device_index: int | None) -> int:
    sms = multiprocessors(device_index)
    return 512 if sms is None else 8 * sms


@functools.lru_cache(maxsize=1024)
def bwd_config(N: int, R: int, L: int, device_index: int | None = None) -> BwdConfig:
    """Splits the rows into chunks only as far as needed to fill the GPU (fewer partials)."""
    block_l = _block_l(L, 256)
    block_r = min(max(1024 // block_l, 1), _pow2_ceil(R))
    n_lb = _cdiv(L, block_l)
    row_tiles = _cdiv(R, block_r)
    n_rc = min(max(_cdiv(_target_programs(device_index), max(N * n_lb, 1)), 1), row_tiles)
    rows_per_chunk = _cdiv(row_tiles, n_rc) * block_r
    return BwdConfig(block_r, block_l, rows_per_chunk, num_warps=4)


# Backward tiles other than bwd_config's, which benchmarks/gpu_probe.py's gate step times against
# it on a GPU (the bf16 backward's open question, README): (bwd_config's rows times k, warps,
# acc_2d, stages). gate_aot compiles them too, so that a GPU session finds none that fails.
BWD_CANDIDATES = ((1, 4, True, 1), (2, 4, False, 1), (1, 4, False, 2), (1, 4, False, 3), (2, 4, False, 3),
                  (1, 4, True, 3))  # fmt: skip


def candidate_bwd_configs(N: int, R: int, L: int, device_index: int | None = None) -> list[BwdConfig]:
    """BWD_CANDIDATES as configs for this problem: bwd_config's, with the changes each names (the
    chunks rounded up to whole tiles)."""
    b0 = bwd_config(N, R, L, device_index)
    configs = []
    for k, warps, acc_2d, stages in BWD_CANDIDATES:
        rows = b0.block_r * k
        configs.append(BwdConfig(rows, b0.block_l, _cdiv(b0.rows_per_chunk, rows) * rows, warps, acc_2d, stages))
    return configs


def _device_index(t: torch.Tensor) -> int | None:
    return t.device.index if t.is_cuda else None


def on_device_of(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes t's GPU the current one while Triton launches (it launches on the current device,
    whatever device the tensors are on); a no-op when it already is, or off CUDA."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def gate_forward(
    x3: torch.Tensor, row: torch.Tensor, col: torch.Tensor, product: bool, cfg: FwdConfig | None = None
) -> torch.Tensor:
    """x3: (N, R, L) contiguous; row: (N, R) and col: (N, L) fp32 contiguous. cfg: the tiles
    (default fwd_config's; benchmarks/gpu_probe.py times others)."""
    N, R, L = x3.shape
    out = torch.empty_like(x3)
    if x3.numel() == 0:
        return out
    cfg = cfg or fwd_config(R, L)
    n_rb, n_lb = _cdiv(R, cfg.block_r), _cdiv(L, cfg.block_l)
    with on_device_of(x3):
        _gate_fwd_kernel[(N * n_rb * n_lb,)](
            x3, row, col, out, R, L, n_rb, n_lb,
            PRODUCT=product, BLOCK_R=cfg.block_r, BLOCK_L=cfg.block_l,
            L_DIV=_pow2_divisor(L), INT64=x3.numel() > INT32_LIMIT, num_warps=cfg.num_warps,
        )  # fmt: skip
    return out


def gate_backward(
    g3: torch.Tensor,
    x3: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    product: bool,
    cfg: BwdConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dx (like x3), drow (N, R) and dcol (N, L) in fp32. cfg: as gate_forward's."""
    N, R, L = x3.shape
    dx = torch.empty_like(x3)
    if x3.numel() == 0:
        return dx, torch.zeros_like(row), torch.zeros_like(col)
    cfg = cfg or bwd_config(N, R, L, _device_index(x3))
    n_lb = _cdiv(L, cfg.block_l)
    n_rc = _cdiv(R, cfg.rows_per_chunk)
    drow_part = torch.empty((N, n_lb, R), device=x3.device, dtype=torch.float32)
    dcol_part = torch.empty((N, n_rc, L), device=x3.device, dtype=torch.float32)
    with on_device_of(x3):
        _gate_bwd_kernel[(N * n_rc * n_lb,)](
            g3, x3, row, col, dx, drow_part, dcol_part, R, L, n_lb, n_rc, cfg.rows_per_chunk,
            PRODUCT=product, BLOCK_R=cfg.block_r, BLOCK_L=cfg.block_l,
            L_DIV=_pow2_divisor(L), INT64=x3.numel() > INT32_LIMIT, ACC_2D=cfg.acc_2d, STAGES=cfg.stages,
            num_warps=cfg.num_warps,
        )  # fmt: skip
    return dx, drow_part.sum(dim=1), dcol_part.sum(dim=1)
