"""The CPU spatial branch after the pass over x (csrc/cpu/dilated_conv.h): dilated 3x3 convs
with bias and ReLU, and the final 1x1 conv, in every instruction set, against float64.

Fed through attention_tail (y given directly), so any y layout and every reduced-channel
count reach the kernels.
"""

import pytest
import torch
from helpers import spatial_env
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
@pytest.mark.parametrize("ours", ["kernel", "winograd"])
def test_kernel_matches_float64(monkeypatch, isa, n, cr, h, w, dilation, convs, y_layout, ours):
    isa_env(monkeypatch, isa)
    spatial_env(monkeypatch, ours)
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
@pytest.mark.parametrize("ours", ["kernel", "winograd"])
def test_kernel_and_library_agree(monkeypatch, n, cr, h, w, dilation, convs, ours):
    y = torch.relu(torch.randn(n, cr, h, w)).contiguous(memory_format=torch.channels_last)
    args = (*weights(cr, convs)[:2], dilation, *weights(cr, convs)[2:])
    spatial_env(monkeypatch, ours)
    got = tail(y, *args)
    spatial_env(monkeypatch, "library")
    lib = tail(y, *args)
    torch.testing.assert_close(got, lib, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ours", ["kernel", "winograd"])
def test_nan_reaches_exactly_the_dilated_neighbours(monkeypatch, ours):
    # One NaN input pixel: after one dilated conv it reaches the pixels one dilation step away
    # (3x3 of them) and no others, so a wrong tap offset or padding shows (Winograd: its
    # transforms' zeros keep each output to its own 3x3 inputs).
    spatial_env(monkeypatch, ours)
    y = torch.rand(1, 16, 11, 13).contiguous(memory_format=torch.channels_last)
    y[0, :, 5, 6] = float("nan")
    wd, bd, wf, bf, mlp = weights(16, 1)
    got = tail(y, wd, bd, 3, wf, bf, mlp)[0]
    want = torch.zeros(11, 13, dtype=torch.bool)
    want[2:9:3, 3:10:3] = True
    assert torch.equal(torch.isnan(got), want)


@pytest.mark.parametrize("cr", [16, 20])
@pytest.mark.parametrize("ours", ["kernel", "winograd"])
def test_same_bits_for_any_thread_count(monkeypatch, cr, ours):
    spatial_env(monkeypatch, ours)
    y = torch.relu(torch.randn(3, cr, 23, 29)).contiguous(memory_format=torch.channels_last)
    args = (*weights(cr, 2)[:2], 2, *weights(cr, 2)[2:])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tail(y, *args)
        for count in (2, 3, 7):  # threads split the tasks by pixels (parallel_chunks.h): odd counts too
            torch.set_num_threads(count)
            assert torch.equal(one, tail(y, *args)), count
    finally:
        torch.set_num_threads(threads)


def test_bad_spatial_variable_names_it(monkeypatch):
    monkeypatch.setenv("BAM_FUSED_CPU_SPATIAL", "fast")
    y = torch.rand(1, 16, 4, 4)
    with pytest.raises(RuntimeError, match="BAM_FUSED_CPU_SPATIAL must be auto, kernel or library, got 'fast'"):
        tail(y, *weights(16, 1)[:2], 1, *weights(16, 1)[2:])


def test_bad_winograd_variable_names_it(monkeypatch):
    monkeypatch.setenv("BAM_FUSED_CPU_SPATIAL", "kernel")
    monkeypatch.setenv("BAM_FUSED_CPU_WINOGRAD", "yes")
    y = torch.rand(1, 16, 4, 4)
    with pytest.raises(RuntimeError, match="BAM_FUSED_CPU_WINOGRAD must be auto, on or off, got 'yes'"):
        tail(y, *weights(16, 1)[:2], 1, *weights(16, 1)[2:])


@pytest.mark.parametrize("ours", ["kernel", "winograd"])
def test_each_output_reads_only_its_own_inputs(monkeypatch, ours):
    # A huge input pixel (1e30, finite): each output either reads it through one tap (values
    # near 1e30 / 48) or not at all (values near 1). Winograd's transforms mix a tile's 4x4
    # inputs, so a wrong zero in them would leak 1e30-sized terms (or their rounding) into
    # outputs whose 3x3 inputs do not hold the pixel; every tile position of the pixel is tried.
    spatial_env(monkeypatch, ours)
    wd, bd, wf, bf, mlp = weights(16, 1)
    for h0 in range(4):
        for w0 in range(4):
            y = torch.rand(1, 16, 10, 11).contiguous(memory_format=torch.channels_last)
            y[0, :, 2 + h0, 3 + w0] = 1e30
            got = tail(y, wd, bd, 2, wf, bf, mlp)[0]
            near = torch.zeros(10, 11, dtype=torch.bool)
            near[h0 : 5 + h0 : 2, 1 + w0 : 6 + w0 : 2] = True
            assert torch.all(got[~near].abs() < 100), (h0, w0)
            want = reference(y, wd, bd, 2, wf, bf)[0]
            torch.testing.assert_close(got[~near].double(), want[~near], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "isa,n,cr,h,w,dilation,winograd",
    [("generic", 2, 16, 16, 16, 4, True), ("generic", 1, 16, 14, 14, 4, True), ("generic", 2, 16, 7, 16, 4, False),
     ("generic", 1, 32, 14, 14, 4, False), ("generic", 1, 32, 28, 28, 4, True), ("generic", 2, 8, 16, 16, 2, False),
     ("avx512", 2, 16, 16, 16, 4, True), ("avx512", 2, 16, 7, 16, 4, False), ("avx512", 1, 32, 14, 14, 4, False),
     ("avx512", 1, 32, 28, 28, 4, True), ("avx512_bf16", 2, 16, 16, 16, 4, True)],
)  # fmt: skip
def test_auto_takes_winograd_where_it_was_faster(monkeypatch, isa, n, cr, h, w, dilation, winograd):
    # Winograd and the direct conv round differently, so auto's bits tell which one ran.
    isa_env(monkeypatch, isa)
    y = torch.relu(torch.randn(n, cr, h, w)).contiguous(memory_format=torch.channels_last)
    args = (*weights(cr, 2)[:2], dilation, *weights(cr, 2)[2:])
    got = {}
    for choice in ("auto", "on", "off"):
        monkeypatch.setenv("BAM_FUSED_CPU_SPATIAL", "kernel")
        monkeypatch.setenv("BAM_FUSED_CPU_WINOGRAD", choice)
        got[choice] = tail(y, *args)
    assert not torch.equal(got["on"], got["off"])
    assert torch.equal(got["auto"], got["on" if winograd else "off"])


@pytest.mark.parametrize("cr", [16, 20])
@pytest.mark.parametrize("convs", [1, 2])
def test_infinite_inputs_give_what_the_direct_conv_gives(monkeypatch, cr, convs):
    # Winograd's transforms subtract inputs (inf - inf = NaN), so its tiles with a non-finite
    # input run the direct conv: an infinite pixel with positive weights stays infinite in its
    # dilated neighbours, as in the direct conv and torch, and other outputs stay finite.
    y = torch.rand(2, cr, 13, 11).contiguous(memory_format=torch.channels_last)
    y[0, :3, 6, 5] = float("inf")
    y[1, 1, 0, 10] = float("nan")
    g = torch.Generator().manual_seed(1)
    wd = [torch.rand(cr, cr, 3, 3, generator=g) for _ in range(convs)]
    bd = [torch.rand(cr, generator=g) for _ in range(convs)]
    args = (wd, bd, 2, torch.rand(cr, generator=g), torch.rand(1, generator=g), weights(cr, 1)[4])
    got = {}
    for ours in ("kernel", "winograd"):
        spatial_env(monkeypatch, ours)
        got[ours] = tail(y, *args)
    want = reference(y, *args[:5])
    assert torch.isinf(want).sum() > 0 and torch.isnan(want).sum() > 0
    for ours, out in got.items():
        assert torch.equal(torch.isinf(out), torch.isinf(want)), ours
        assert torch.equal(torch.isnan(out), torch.isnan(want)), ours
        finite = torch.isfinite(want)
        torch.testing.assert_close(out[finite].double(), want[finite], rtol=1e-5, atol=1e-5)
