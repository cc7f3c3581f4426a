"""The CPU spatial branch after the pass over x (csrc/cpu/dilated_conv.h): dilated 3x3 convs
with bias and ReLU, and the final 1x1 conv, in every instruction set, against float64.

Fed through attention_tail (y given directly), so any y layout and every reduced-channel
count reach the kernels.
"""

import pytest
import torch
from test_cpu_pass import ISAS, isa_env

from bam_fused.ops.branches import load_op

# (N, Cr, H, W, dilation, convs). Cr: the constant-channel paths (16, 32, 64, 128) and run-time
# ones with 1, 2 and 4 output vectors per block and several blocks (5, 20, 37, 70); maps where
# blocks span rows, odd sizes, one pixel, a row, dilations past the map, no pixels; batch 0 and 1.
SHAPES = [(2, 16, 7, 9, 4, 2), (1, 32, 9, 13, 2, 2), (2, 64, 5, 11, 1, 3), (1, 128, 6, 7, 3, 1),
          (2, 5, 7, 9, 4, 2), (1, 20, 9, 13, 1, 2), (2, 37, 4, 50, 2, 1), (1, 70, 6, 5, 2, 2),
          (1, 16, 1, 1, 4, 2), (2, 16, 3, 40, 100, 2), (0, 16, 7, 9, 4, 2), (3, 32, 15, 17, 4, 2),
          (1, 16, 56, 56, 4, 2), (2, 16, 5, 0, 4, 2), (2, 20, 0, 3, 1, 1)]  # fmt: skip


def weights(cr: int, convs: int):
    g = torch.Generator().manual_seed(cr * 10 + convs)
    w = [torch.randn(cr, cr, 3, 3, generator=g) / (3 * cr**0.5) for _ in range(convs)]
    b = [0.1 * torch.randn(cr, generator=g) for _ in range(convs)]
    wf, bf = torch.randn(cr, generator=g) / cr**0.5, torch.randn(1, generator=g)
    mlp = (torch.randn(4, 8), torch.randn(4), torch.randn(8, 4), torch.randn(8))
    return w, b, wf, bf, mlp


def tail(y, w, b, dilation, wf, bf, mlp):
    part = torch.randn(y.shape[0], 1, 8)
    return load_op("attention_tail")(part, y, w, b, dilation, wf, bf, *mlp)[1]


def reference(y, w, b, dilation, wf, bf):
    if y.shape[2] * y.shape[3] == 0:  # conv2d refuses an empty map
        return torch.empty(y.shape[0], *y.shape[2:], dtype=torch.float64)
    z = y.double()
    for wi, bi in zip(w, b, strict=True):
        z = torch.relu(torch.nn.functional.conv2d(z, wi.double(), bi.double(), padding=dilation, dilation=dilation))
    return torch.einsum("nohw,o->nhw", z, wf.double()) + bf.double()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,cr,h,w,dilation,convs", SHAPES)
@pytest.mark.parametrize("y_layout", ["channels_last", "nchw"])
def test_kernel_matches_float64(monkeypatch, isa, n, cr, h, w, dilation, convs, y_layout):
    isa_env(monkeypatch, isa)
    monkeypatch.setenv("BAM_FUSED_CPU_SPATIAL", "kernel")
    y = torch.relu(torch.randn(n, cr, h, w))
    if y_layout == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last)
    wd, bd, wf, bf, mlp = weights(cr, convs)
    got = tail(y, wd, bd, dilation, wf, bf, mlp)
    want = reference(y, wd, bd, dilation, wf, bf)
    assert got.shape == (n, h, w) and got.dtype == torch.float32
    scale = max([1.0, *want.abs().flatten().tolist()])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("n,cr,h,w,dilation,convs", [s for s in SHAPES if s[0] > 0][:6])
def test_kernel_and_library_agree(monkeypatch, n, cr, h, w, dilation, convs):
    y = torch.relu(torch.randn(n, cr, h, w)).contiguous(memory_format=torch.channels_last)
    args = (*weights(cr, convs)[:2], dilation, *weights(cr, convs)[2:])
    monkeypatch.setenv("BAM_FUSED_CPU_SPATIAL", "kernel")
    ours = tail(y, *args)
    monkeypatch.setenv("BAM_FUSED_CPU_SPATIAL", "library")
    lib = tail(y, *args)
    torch.testing.assert_close(ours, lib, rtol=1e-5, atol=1e-5)


def test_nan_reaches_exactly_the_dilated_neighbours(monkeypatch):
    # One NaN input pixel: after one dilated conv it reaches the pixels one dilation step away
    # (3x3 of them) and no others, so a wrong tap offset or padding shows.
    monkeypatch.setenv("BAM_FUSED_CPU_SPATIAL", "kernel")
    y = torch.rand(1, 16, 11, 13).contiguous(memory_format=torch.channels_last)
    y[0, :, 5, 6] = float("nan")
    wd, bd, wf, bf, mlp = weights(16, 1)
    got = tail(y, wd, bd, 3, wf, bf, mlp)[0]
    want = torch.zeros(11, 13, dtype=torch.bool)
    want[2:9:3, 3:10:3] = True
    assert torch.equal(torch.isnan(got), want)


@pytest.mark.parametrize("cr", [16, 20])
def test_same_bits_for_any_thread_count(monkeypatch, cr):
    monkeypatch.setenv("BAM_FUSED_CPU_SPATIAL", "kernel")
    y = torch.relu(torch.randn(3, cr, 23, 29)).contiguous(memory_format=torch.channels_last)
    args = (*weights(cr, 2)[:2], 2, *weights(cr, 2)[2:])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tail(y, *args)
        torch.set_num_threads(max(2, threads))
        many = tail(y, *args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_bad_spatial_variable_names_it(monkeypatch):
    monkeypatch.setenv("BAM_FUSED_CPU_SPATIAL", "fast")
    y = torch.rand(1, 16, 4, 4)
    with pytest.raises(RuntimeError, match="BAM_FUSED_CPU_SPATIAL must be auto, kernel or library, got 'fast'"):
        tail(y, *weights(16, 1)[:2], 1, *weights(16, 1)[2:])
