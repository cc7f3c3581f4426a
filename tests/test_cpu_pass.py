"""The CPU pass over x (csrc/cpu/conv1x1_pool.h), NCHW and channels_last, in every
instruction set it has.

The branch op with no dilated convs returns the channel means and final(relu(W x + b)): with
random final weights every reduced channel shows in the map, so a wrong channel, pixel,
tile or chunk fails these tests.
"""

import pytest
import torch
from helpers import bf16_products, make_layout

from bam_fused.ops.branches import load_op

ISAS = ["avx512_bf16", "avx512", "avx2", "generic"]
# (N, C, H, W, Cr): odd sizes; several pixel chunks with a partial last tile (15x17, 4x50);
# Cr off the register blocks (5, 13, 37) and over several blocks (37, 70: channels_last uses
# 1, 2 or 4 output vectors per block); last tiles of 1 and 2 vectors in each instruction set
# (30 and 14 pixels); one pixel; no pixels.
SHAPES = [(2, 37, 7, 9, 5), (1, 48, 15, 17, 13), (3, 16, 4, 50, 37), (2, 8, 1, 1, 16), (0, 12, 5, 5, 4),
          (1, 40, 13, 15, 70), (2, 19, 9, 8, 24), (2, 20, 5, 6, 9), (1, 24, 7, 2, 8),
          # tiles past L1 take their channels in groups (conv1x1_tile), with more blocks than held at once
          (2, 400, 7, 9, 5), (1, 1000, 5, 11, 70)]  # fmt: skip


def isa_env(monkeypatch, isa: str) -> None:
    monkeypatch.setenv("BAM_FUSED_CPU_ISA", isa)
    op = load_op()
    x, w = torch.randn(1, 4, 2, 2), torch.randn(2, 4)
    try:
        op(x, w, torch.zeros(2), [], [], 1, torch.zeros(2), torch.zeros(1))
    except RuntimeError as e:
        if "does not support" in str(e):
            pytest.skip(f"this CPU has no {isa}")
        raise


def reference(x: torch.Tensor, w, b, wf, bf, bf16_weights: bool = False):
    x64 = x.double()
    w64 = (w.bfloat16() if bf16_weights else w).double()
    y = torch.relu(torch.einsum("nchw,oc->nohw", x64, w64) + b.double()[:, None, None])
    return x64.mean((2, 3)), torch.einsum("nohw,o->nhw", y, wf.double()) + bf.double()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,c,h,w,cr", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_pass_matches_reference(monkeypatch, isa, n, c, h, w, cr, dtype, layout):
    isa_env(monkeypatch, isa)
    g = torch.Generator().manual_seed(n * 1000 + c)
    x = make_layout(torch.randn(n, c, h, w, generator=g).to(dtype), layout)
    wr, br = torch.randn(cr, c, generator=g) / c**0.5, torch.randn(cr, generator=g)
    wf, bf = torch.randn(cr, generator=g), torch.randn(1, generator=g)
    pooled, spatial = load_op()(x, wr, br, [], [], 4, wf, bf)
    # The products are exact either way (bf16 x, bf16 or fp32 weights): fp32 sums only.
    want_pooled, want_spatial = reference(x, wr, br, wf, bf, bf16_weights=bf16_products(dtype, isa))
    assert pooled.shape == (n, c) and spatial.shape == (n, h, w)
    torch.testing.assert_close(pooled.double(), want_pooled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(spatial.double(), want_spatial, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("c", [256, 512, 1024])
@pytest.mark.parametrize("cr", [5, 16])
def test_channels_last_pass_at_constant_channel_counts(monkeypatch, isa, c, cr):
    """fp32 channels_last x with one output vector per block (Cr 5 everywhere, 16 under AVX-512)
    runs kernels compiled for C = 256, 512 and 1024; 63 pixels end in a partial tile."""
    isa_env(monkeypatch, isa)
    g = torch.Generator().manual_seed(c + cr)
    x = make_layout(torch.randn(2, c, 7, 9, generator=g), "channels_last")
    wr, br = torch.randn(cr, c, generator=g) / c**0.5, torch.randn(cr, generator=g)
    wf, bf = torch.randn(cr, generator=g), torch.randn(1, generator=g)
    pooled, spatial = load_op()(x, wr, br, [], [], 4, wf, bf)
    want_pooled, want_spatial = reference(x, wr, br, wf, bf)
    torch.testing.assert_close(pooled.double(), want_pooled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(spatial.double(), want_spatial, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,c,h,w,cr", SHAPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bf16_products_keep_the_pooled_bits_and_round_only_the_weights(monkeypatch, n, c, h, w, cr, layout):
    """avx512_bf16 against avx512 on the same bf16 x: the pooled means are the same bits (x is
    read exactly, summed in the same order); y differs from avx512's only by the weights'
    rounding to bf16: with weights that are bf16 already, both are close to fp32 rounding."""
    isa_env(monkeypatch, "avx512_bf16")
    g = torch.Generator().manual_seed(7 * c + cr)
    x = make_layout(torch.randn(n, c, h, w, generator=g).bfloat16(), layout)
    wr = (torch.randn(cr, c, generator=g) / c**0.5).bfloat16().float()
    args = (wr, torch.randn(cr, generator=g), [], [], 4, torch.randn(cr, generator=g), torch.randn(1, generator=g))
    ours = load_op()(x, *args)
    monkeypatch.setenv("BAM_FUSED_CPU_ISA", "avx512")
    plain = load_op()(x, *args)
    assert torch.equal(ours[0], plain[0])
    torch.testing.assert_close(ours[1], plain[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
def test_pass_no_pixels_gives_nan_means_like_torch(monkeypatch, isa):
    isa_env(monkeypatch, isa)
    x = torch.randn(2, 6, 0, 3)
    pooled, spatial = load_op()(x, torch.randn(4, 6), torch.randn(4), [], [], 1, torch.randn(4), torch.randn(1))
    assert spatial.shape == (2, 0, 3)
    assert torch.isnan(pooled).all() and torch.isnan(x.mean((2, 3))).all()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_pass_relu_keeps_nan_like_torch(layout):
    x = torch.randn(1, 8, 3, 3)
    x[0, :, 1, 2] = float("nan")
    x = make_layout(x, layout)
    wf = torch.ones(4)
    _, spatial = load_op()(x, torch.randn(4, 8), torch.randn(4), [], [], 1, wf, torch.zeros(1))
    assert torch.isnan(spatial[0, 1, 2]) and not torch.isnan(spatial[0, 0, 0])


THREAD_COUNTS = (2, 3, 7)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("n", [1, 3])  # 667 pixels: 14 chunks of 48 (batch 1) or 4 of 192
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: bf16 products where the CPU has them
def test_pass_same_bits_for_any_thread_count(layout, n, dtype):
    x = make_layout(torch.randn(n, 64, 23, 29).to(dtype), layout)
    args = (torch.randn(16, 64), torch.randn(16), [torch.randn(16, 16, 3, 3)], [torch.randn(16)], 2,
            torch.randn(16), torch.randn(1))  # fmt: skip
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = load_op()(x, *args)
        for count in THREAD_COUNTS:  # threads split the tasks by pixels (parallel_chunks.h): odd counts too
            torch.set_num_threads(count)
            many = load_op()(x, *args)
            assert all(torch.equal(a, b) for a, b in zip(one, many, strict=True)), count
    finally:
        torch.set_num_threads(threads)


def test_bad_isa_variable_names_it(monkeypatch):
    monkeypatch.setenv("BAM_FUSED_CPU_ISA", "sse9")
    x = torch.randn(1, 4, 2, 2)
    want = "BAM_FUSED_CPU_ISA must be auto, avx512_bf16, avx512, avx2 or generic, got 'sse9'"
    with pytest.raises(RuntimeError, match=want):
        load_op()(x, torch.randn(2, 4), torch.zeros(2), [], [], 1, torch.zeros(2), torch.zeros(1))


def test_info_shows_the_instruction_set(monkeypatch):
    from bam_fused import _ext

    assert _ext.build_info()["cpu_isa"] in ISAS
    monkeypatch.setenv("BAM_FUSED_CPU_ISA", "generic")
    assert _ext.build_info()["cpu_isa"] == "generic"


def emulate_bf16_model(x, wr, br, dw, db, dilation, wf, bf, bf16_convs: bool = True) -> torch.Tensor:
    """float64 spatial map with the avx512_bf16 rounding points: the reduce weights in bf16, y in
    fp32, then (bf16_convs) y, the dilated weights, biases and outputs in bf16; the final conv
    on them exactly."""

    def r(t):
        return t.bfloat16().double() if bf16_convs else t.double()

    y = torch.relu(torch.einsum("nchw,oc->nohw", x.double(), wr.bfloat16().double()) + br.double()[:, None, None])
    y = y.float().double()
    for w, b in zip(dw, db, strict=True):
        y = torch.relu(torch.nn.functional.conv2d(r(y), r(w), r(b), padding=dilation, dilation=dilation))
    return torch.einsum("nohw,o->nhw", r(y), wf.double()) + bf.double()


# (N, C, H, W, Cr, dilation, convs): Cr of oneDNN's (4, 24) and of our bf16 kernel (16, 32, 64,
# 128), 1-3 convs, dilation past the map (16 on 9x13).
BF16_CASES = [(2, 64, 7, 9, 4, 1, 2), (2, 256, 13, 15, 16, 2, 2), (1, 512, 9, 13, 32, 4, 3), (2, 96, 14, 14, 64, 4, 1),
              (1, 256, 5, 11, 128, 2, 2), (2, 48, 9, 13, 24, 16, 2), (0, 256, 7, 7, 16, 4, 2)]  # fmt: skip


@pytest.mark.parametrize("n,c,h,w,cr,dilation,convs", BF16_CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("spatial", ["auto", "library", "kernel"])
def test_bf16_branches_round_where_a_bf16_model_does(monkeypatch, n, c, h, w, cr, dilation, convs, layout, spatial):
    """bf16 x on avx512_bf16: the bf16-product pass, then the dilated convs rounding as oneDNN's
    bf16 convs do, by our bf16 kernel (auto, kernel: at 16-128 reduced channels) or oneDNN's.
    All match the float64 emulation of those rounding points to fp32 rounding; fp32 convs would
    be 1e-3 away."""
    isa_env(monkeypatch, "avx512_bf16")
    monkeypatch.setenv("BAM_FUSED_CPU_SPATIAL", spatial)
    g = torch.Generator().manual_seed(c + cr)
    x = make_layout(torch.randn(n, c, h, w, generator=g).bfloat16(), layout)
    wr, br = torch.randn(cr, c, generator=g) / c**0.5, torch.randn(cr, generator=g) * 0.1
    dw = [torch.randn(cr, cr, 3, 3, generator=g) / (3 * cr**0.5) for _ in range(convs)]
    db = [torch.randn(cr, generator=g) * 0.1 for _ in range(convs)]
    wf, bf = torch.randn(cr, generator=g) / cr**0.5, torch.randn(1, generator=g)
    _, spatial_map = load_op()(x, wr, br, dw, db, dilation, wf, bf)
    want = emulate_bf16_model(x, wr, br, dw, db, dilation, wf, bf)
    scale = float(want.abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(spatial_map.double(), want, rtol=0, atol=1e-5 * scale)
    if want.numel():  # the fp32-conv scheme is far outside that tolerance: the test tells them apart
        fp32_convs = emulate_bf16_model(x, wr, br, dw, db, dilation, wf, bf, bf16_convs=False)
        assert (fp32_convs - want).abs().max() > 1e-4 * scale


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bf16_dilated_conv_nan_reaches_exactly_the_dilated_neighbours(monkeypatch, layout):
    """One NaN pixel of bf16 x: y is NaN there only (ReLU keeps NaN), and after our bf16 dilated
    conv (Cr 16) the map is NaN exactly one dilation step around it, so a wrong tap, padding or
    rounding of NaN shows."""
    isa_env(monkeypatch, "avx512_bf16")
    monkeypatch.setenv("BAM_FUSED_CPU_SPATIAL", "kernel")
    x = torch.rand(1, 48, 11, 13)
    x[0, :, 5, 6] = float("nan")
    x = make_layout(x.bfloat16(), layout)
    g = torch.Generator().manual_seed(3)
    wr, br = torch.randn(16, 48, generator=g), torch.randn(16, generator=g)
    dw, db = [torch.randn(16, 16, 3, 3, generator=g)], [torch.randn(16, generator=g)]
    _, spatial = load_op()(x, wr, br, dw, db, 3, torch.randn(16, generator=g), torch.randn(1, generator=g))
    want = torch.zeros(11, 13, dtype=torch.bool)
    want[2:9:3, 3:10:3] = True
    assert torch.equal(torch.isnan(spatial[0]), want)
