"""bam_gate against the float64 reference: every backend, layout, dtype and combine mode."""

import functools

import pytest
import torch
from helpers import LAYOUTS, gate_inputs, make_layout
from test_cpu_pass import isa_env

from bam_fused import _backends
from bam_fused.ops import bam_gate
from bam_fused.ops import gate as gate_module
from bam_fused.ops.branches import load_op
from bam_fused.reference import bam_gate_reference
from bam_fused.testing import compare, gate_comparisons

KERNELS = ["triton", "cpp"]
OPCHECK_UTILS = ("test_schema", "test_faketensor")
SHAPES = [(2, 37, 7, 9), (1, 37, 7, 9), (3, 5, 1, 1), (1, 1, 4, 4), (2, 64, 8, 8)]


def run_case(backend, shape, dtype, layout, combine):
    x, ca, sa = gate_inputs(*shape, dtype=dtype, layout=layout)
    out = bam_gate(x, ca, sa, combine, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    cl = layout == "channels_last"
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    g = torch.randn(x.shape, dtype=dtype)
    fn = functools.partial(bam_gate, combine=combine, backend=backend)
    for name, result in gate_comparisons(fn, x, ca, sa, combine, g):
        assert result.passed, f"{name}: {result}"
    assert x.grad.dtype == ca.grad.dtype == sa.grad.dtype == dtype


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("combine", ["sum", "product"])
def test_kernels_fp32(backend, shape, layout, combine):
    run_case(backend, shape, torch.float32, layout, combine)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("combine", ["sum", "product"])
def test_kernels_low_precision(backend, dtype, layout, combine):
    run_case(backend, (2, 37, 7, 9), dtype, layout, combine)


def test_cpp_float64_and_reference_backend():
    run_case("cpp", (2, 37, 7, 9), torch.float64, "nchw", "product")
    run_case("reference", (2, 37, 7, 9), torch.float32, "channels_last", "sum")


def test_reference_backend_runs_the_reference_not_a_kernel(monkeypatch):
    # The kernels give the same values to rounding: only a kernel that must not run shows it.
    monkeypatch.setattr(_backends, "kernels", lambda impl: pytest.fail(f"the {impl} kernels ran"))
    x, ca, sa = gate_inputs(2, 37, 7, 9, layout="channels_last")
    for combine in ("sum", "product"):
        out = bam_gate(x, ca, sa, combine, backend="reference")
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out, bam_gate_reference(x, ca, sa, combine))


@pytest.mark.parametrize("backend", KERNELS)
def test_attention_shapes_accepted(backend):
    x, ca, sa = gate_inputs()
    want = bam_gate(x, ca, sa, backend=backend)
    got = bam_gate(x, ca[:, :, None, None], sa[:, None], backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", KERNELS + ["reference"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(0, 37, 7, 9), (2, 5, 0, 3), (2, 5, 3, 0), (2, 0, 3, 3)])
def test_empty_batch_map_or_channels(backend, layout, shape):
    # The gate averages nothing, so empty inputs are fine (BAM's channel branch, which averages
    # over the pixels, raises on an empty map).
    x, ca, sa = gate_inputs(*shape, layout=layout, requires_grad=True)
    out = bam_gate(x, ca, sa, backend=backend)
    assert out.shape == shape
    out.sum().backward()
    assert x.grad.shape == x.shape and ca.grad.shape == ca.shape and sa.grad.shape == sa.shape
    assert torch.equal(ca.grad, torch.zeros_like(ca))


@pytest.mark.parametrize("backend", KERNELS)
def test_attention_dtypes_follow_inputs(backend):
    x, ca, sa = gate_inputs(dtype=torch.bfloat16, requires_grad=True)
    ca16 = ca.detach().half().requires_grad_()
    bam_gate(x, ca16, sa, backend=backend).sum().backward()
    assert ca16.grad.dtype == torch.float16 and sa.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", KERNELS)
def test_nan_and_inf_propagate_like_reference(backend):
    x, ca, sa = gate_inputs()
    x[0, 0, 0, 0], x[0, 1, 2, 3], x[1, 5, 6, 8] = float("nan"), float("inf"), float("-inf")
    ca[1, 3] = float("nan")
    out = bam_gate(x, ca, sa, backend=backend)
    ref = bam_gate_reference(x.double(), ca.double(), sa.double())
    assert compare(out, ref).passed


def test_cpp_gate_ops_opcheck():
    """The C++ gate ops' fake kernels (shape tools run bam_gate under FakeTensorMode)."""
    load_op()
    x3, g3 = torch.randn(2, 6, 15), torch.randn(2, 6, 15)
    row, col = torch.randn(2, 6), torch.randn(2, 15)
    for product in (False, True):
        torch.library.opcheck(torch.ops.bam_fused_C.gate_forward, (x3, row, col, product), test_utils=OPCHECK_UTILS)
        args = (g3, x3, row, col, product)
        torch.library.opcheck(torch.ops.bam_fused_C.gate_backward, args, test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_backward_is_bitwise_repeatable(backend, layout):
    x, ca, sa = gate_inputs(2, 64, 9, 13, layout=layout)
    g = make_layout(torch.randn(x.shape), layout)

    def grads():
        xs, cs, ss = (t.clone().requires_grad_() for t in (x, ca, sa))
        bam_gate(xs, cs, ss, "product", backend=backend).backward(g)
        return xs.grad, cs.grad, ss.grad

    first = grads()
    torch.use_deterministic_algorithms(True)
    try:
        second = grads()
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradcheck_float64(backend, combine, layout):
    x, ca, sa = gate_inputs(2, 5, 3, 4, dtype=torch.float64, layout=layout, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: bam_gate(a, b, c, combine, backend=backend), (x, ca, sa))


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(backend):
    from bam_fused.ops.gate import _gate_backward_op, _gate_op

    for layout in ("nchw", "channels_last"):
        x, ca, sa = gate_inputs(2, 6, 3, 5, layout=layout, requires_grad=True)
        c, s = ca.detach().reshape(2, 6).requires_grad_(), sa.detach().reshape(2, 15).requires_grad_()
        torch.library.opcheck(_gate_op, (x, c, s, True, backend))
        g = make_layout(torch.randn(x.shape), layout)
        torch.library.opcheck(_gate_backward_op, (g, x.detach(), c.detach(), s.detach(), False, backend))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_eager_path_matches_the_custom_op_bitwise(backend, layout):
    """Eager bam_gate goes through an autograd.Function, compiled code through the custom op:
    both must run the same kernels, forward and backward."""
    from bam_fused.ops.gate import _gate_op

    x, ca, sa = gate_inputs(2, 37, 7, 9, layout=layout)
    g = make_layout(torch.randn(x.shape), layout)
    results = []
    for call in (lambda a, b, c: bam_gate(a, b, c, "product", backend=backend),
                 lambda a, b, c: _gate_op(a, b, c.reshape(2, 63), True, backend)):  # fmt: skip
        xs, cs, ss = (t.clone().requires_grad_() for t in (x, ca, sa))
        out = call(xs, cs, ss)
        out.backward(g)
        results.append((out, xs.grad, cs.grad, ss.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_second_derivatives_by_gradgradcheck(combine, layout):
    """create_graph=True: the backward runs as differentiable PyTorch ops (float64, cpp)."""
    x, ca, sa = gate_inputs(2, 5, 3, 4, dtype=torch.float64, layout=layout, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b, c: bam_gate(a, b, c, combine, backend="cpp"), (x, ca, sa))


@pytest.mark.parametrize("combine", ["sum", "product"])
def test_third_derivatives_by_gradgradcheck(combine):
    """Any order: gradgradcheck of the first gradients (of a non-linear loss) checks the third."""
    x, ca, sa = gate_inputs(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)

    def first(a, b, c):
        out = bam_gate(a, b, c, combine, backend="cpp")
        return torch.autograd.grad((out**2).sum(), (a, b, c), create_graph=True)

    assert torch.autograd.gradgradcheck(first, (x, ca, sa))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_second_derivatives_match_the_reference(backend, combine, layout, dtype):
    """A gradient penalty through bam_gate (both the eager Function and the custom op): the
    first gradients, and the gradients of their squared norm, as the float64 reference's."""
    x, ca, sa = gate_inputs(2, 37, 7, 9, dtype=dtype, layout=layout)
    g = make_layout(torch.randn(x.shape, dtype=dtype), layout)
    product = combine == "product"
    results = []
    for call, cast in ((lambda a, b, c: bam_gate(a, b, c, combine, backend=backend), dtype),
                       (lambda a, b, c: gate_module._gate_op(a, b.float(), c.reshape(2, 63).float(), product, backend),
                        dtype),
                       (lambda a, b, c: bam_gate_reference(a, b, c, combine), torch.float64)):  # fmt: skip
        xs, cs, ss = (t.to(cast, copy=True).requires_grad_() for t in (x, ca, sa))
        first = torch.autograd.grad(call(xs, cs, ss), (xs, cs, ss), g.to(cast), create_graph=True)
        penalty = sum((d.double() ** 2).sum() for d in first)
        second = torch.autograd.grad(penalty, (xs, cs, ss))
        results.append((*first, *second))
    # bf16: dx rounds to bf16 (and its square's gradient with it); the attention terms' math is fp32.
    tol = {"rtol": 3e-2, "atol": 3e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    for fused in results[:2]:
        for a, b in zip(fused, results[2], strict=True):
            assert a.dtype == dtype
            torch.testing.assert_close(a.double(), b, **tol)
    assert results[0][0].is_contiguous(memory_format=gate_module.memory_format(x))
    assert not any(torch.equal(d, torch.zeros_like(d)) for d in results[0][3:])


def test_first_derivatives_stay_on_the_kernels(monkeypatch):
    """Without create_graph the backward kernels run, not the PyTorch ops of the second derivative."""
    calls = []
    real = gate_module.differentiable_backward
    monkeypatch.setattr(gate_module, "differentiable_backward", lambda *a: calls.append(1) or real(*a))
    x, ca, sa = gate_inputs(2, 5, 3, 4, requires_grad=True)
    bam_gate(x, ca, sa, backend="cpp").sum().backward()
    assert calls == []
    torch.autograd.grad(bam_gate(x, ca, sa, backend="cpp").sum(), x, create_graph=True)
    assert calls == [1]


@pytest.mark.parametrize("backend", KERNELS)
def test_torch_compile_fullgraph(backend):
    x, ca, sa = gate_inputs(2, 8, 4, 5, requires_grad=True)
    fn = torch.compile(lambda a, b, c: bam_gate(a, b, c, "sum", backend=backend), fullgraph=True, backend="eager")
    out = fn(x, ca, sa)
    out.sum().backward()
    torch.testing.assert_close(out, bam_gate_reference(x, ca, sa), rtol=1e-5, atol=1e-5)
    assert x.grad is not None and ca.grad is not None


def test_bad_inputs_name_the_argument():
    x, ca, sa = gate_inputs()
    with pytest.raises(
        ValueError,
        match=(
            r"channel_att must have shape \(N, C\) = \(2, 37\) or \(N, C, 1, 1\) = \(2, 37, 1, 1\) "
            r"to match x of shape \(2, 37, 7, 9\), got \(2, 36\)"
        ),
    ):
        bam_gate(x, ca[:, :36], sa)
    with pytest.raises(
        ValueError,
        match=(
            r"spatial_att must have shape \(N, H, W\) = \(2, 7, 9\) or \(N, 1, H, W\) = \(2, 1, 7, 9\) "
            r"to match x of shape \(2, 37, 7, 9\), got \(2, 9, 7\)"
        ),
    ):
        bam_gate(x, ca, sa.transpose(1, 2))
    with pytest.raises(ValueError, match=r"channel_att must have shape .* got \(1, 37\)"):
        bam_gate(x, ca[:1], sa)
    with pytest.raises(ValueError, match=r"x must be 4-D"):
        bam_gate(x[0], ca, sa)
    with pytest.raises(TypeError, match="channel_att must have a floating dtype .* got bool"):
        bam_gate(x, ca > 0, sa)
    with pytest.raises(TypeError, match="x must have a floating dtype .* got int32"):
        bam_gate(x.int(), ca, sa)
    with pytest.raises(ValueError, match="combine must be one of 'sum', 'product', got 'max'"):
        bam_gate(x, ca, sa, combine="max")
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'triton', 'cpp', 'reference', got 'cuda'"):
        bam_gate(x, ca, sa, backend="cuda")
    with pytest.raises(TypeError, match="x: the triton gate supports float32, float16, bfloat16; x has dtype float64"):
        bam_gate(x.double(), ca.double(), sa.double(), backend="triton")
    with pytest.raises(ValueError, match="spatial_att is on meta but x is on cpu"):
        bam_gate(x, ca, sa.to("meta"))
    # Before 2026-11-28 these raised from inside torch ("unsupported memory format option").
    with pytest.raises(TypeError, match=r"x must be a dense \(strided\) tensor, got layout sparse_coo"):
        bam_gate(x.to_sparse(), ca, sa)
    with pytest.raises(TypeError, match=r"x must be a dense \(strided\) tensor, got layout _mkldnn"):
        bam_gate(x.to_mkldnn(), ca, sa)
    with pytest.raises(TypeError, match=r"spatial_att must be a dense \(strided\) tensor, got layout sparse_coo"):
        bam_gate(x, ca, sa.to_sparse())


def test_triton_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setattr(_backends, "triton_interpreted", lambda: False)
    x, ca, sa = gate_inputs()
    with pytest.raises(_backends.BackendUnavailable, match="Triton kernels run on CUDA devices"):
        bam_gate(x, ca, sa, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_storage_conversions_are_exact_for_every_bit_pattern(dtype):
    """With sigmoid ~ 0 the gate is the identity: every 16-bit pattern must come back."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).reshape(1, 1, 256, 256)
    out = bam_gate(x, torch.full((1, 1), -60.0), torch.full((1, 256, 256), -60.0), backend="cpp")
    same = out.view(torch.int16) == bits.reshape(out.shape)
    nan = torch.isnan(x)
    assert bool(same[~nan].all()) and bool(torch.isnan(out[nan]).all())
    # Rounding of the store: x * (1 + s) in fp32, stored in dtype, as eager PyTorch rounds.
    y = torch.randn(1, 4, 64, 64).to(dtype)
    c, s = torch.randn(1, 4), torch.randn(1, 64, 64)
    want = (y.float() * (1 + torch.sigmoid(c[:, :, None, None] + s[:, None]))).to(dtype)
    got = bam_gate(y, c, s, backend="cpp")
    assert (got.float() - want.float()).abs().max() <= (want.float().abs() * 2**-7).max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("shape", [(2, 37, 7, 9), (1, 3, 33, 31), (2, 5, 1, 1), (1, 2, 40, 40)])
def test_cpp_stream_stores_give_the_same_bits(monkeypatch, dtype, combine, shape):
    """Non-temporal stores (large outputs) write what plain stores write. Rows of 63, 1023 and 1
    elements start off 16-byte boundaries; 1600 spans several staged chunks."""
    x, ca, sa = gate_inputs(*shape, dtype=dtype)
    sa[0, 0, 0] = 100.0  # one column past the split-exp limit: the per-element path
    outs = {}
    for mode in ("on", "off"):
        monkeypatch.setenv("BAM_FUSED_CPU_STREAM_STORES", mode)
        outs[mode] = bam_gate(x, ca, sa, combine, backend="cpp")
    assert torch.equal(outs["on"], outs["off"])
    torch.testing.assert_close(outs["on"].double(), bam_gate_reference(x.double(), ca.double(), sa.double(), combine),
                               rtol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("shape", [(2, 37, 7, 9), (1, 3, 33, 31), (2, 37, 40, 40)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpp_fp32_gate_forward_under_each_isa(monkeypatch, shape, layout):
    """fp32 split-exp rows take a reciprocal and one Newton step under AVX-512 (cpu/gate_avx512.cpp),
    a division elsewhere: within 3 ulp of the float64 gate either way (rcp14 alone is 2^-14 off),
    plain and non-temporal stores (rows of 63 and 1023 start off 64-byte boundaries) the same bits."""
    x, ca, sa = gate_inputs(*shape, layout=layout)
    want = bam_gate_reference(x.double(), ca.double(), sa.double(), "sum")
    outs = {}
    for isa in ("avx512", "avx2", "generic"):
        isa_env(monkeypatch, isa)
        for mode in ("on", "off"):
            monkeypatch.setenv("BAM_FUSED_CPU_STREAM_STORES", mode)
            outs[isa, mode] = bam_gate(x, ca, sa, "sum", backend="cpp")
        assert torch.equal(outs[isa, "on"], outs[isa, "off"]), isa
        torch.testing.assert_close(outs[isa, "on"].double(), want, rtol=3 * 2**-23, atol=1e-30)
    assert torch.equal(outs["avx2", "on"], outs["generic", "on"])  # the same division
    if shape[2] == 40:  # the reciprocal path ran: some element rounds otherwise
        assert not torch.equal(outs["avx512", "on"], outs["avx2", "on"])


@pytest.mark.parametrize("shape", [(2, 37, 7, 9), (1, 3, 33, 31), (2, 37, 40, 40), (1, 16, 1, 1)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpp_bf16_gate_forward_under_each_isa(monkeypatch, shape, layout):
    """bf16 split-exp rows round by vcvtne2ps2bf16 under avx512_bf16 (cpu/gate_avx512bf16.cpp),
    lane by lane as c10::BFloat16 does where a vector holds a NaN or a denormal result: the same
    bits as every other instruction set, NaN, infinities, denormals and signed zeros included,
    with plain and non-temporal stores (rows of 63 and 1023 start off 64-byte boundaries)."""
    isa_env(monkeypatch, "avx512_bf16")
    x, ca, sa = gate_inputs(*shape, dtype=torch.bfloat16, layout=layout)
    flat = x.view(-1) if x.is_contiguous() else x.permute(0, 2, 3, 1).reshape(-1)
    with torch.no_grad():
        flat[::97], flat[1::89], flat[2::83] = float("nan"), 1e-40, float("inf")  # 1e-40: a bf16 denormal
        flat[3::79], flat[4::71] = -0.0, 3e38  # 3e38 overflows to inf in the gate
    outs = {}
    for isa in ("avx512_bf16", "avx512", "avx2", "generic"):
        isa_env(monkeypatch, isa)
        for mode in ("on", "off"):
            monkeypatch.setenv("BAM_FUSED_CPU_STREAM_STORES", mode)
            outs[isa, mode] = bam_gate(x, ca, sa, "sum", backend="cpp").view(torch.int16)
    for key, out in outs.items():
        assert torch.equal(out, outs["generic", "off"]), key


@pytest.mark.parametrize("shape", [(2, 37, 7, 9), (1, 3, 33, 31), (2, 37, 40, 40), (1, 16, 1, 1)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpp_bf16_gate_backward_under_each_isa(monkeypatch, shape, layout):
    """The bf16 backward's split-exp rows round dx by vcvtne2ps2bf16 under avx512_bf16
    (cpu/gate_avx512bf16.cpp): dx the same bits as every other instruction set (rows of 1 to 1600
    elements, masked tails), also with NaN, infinities, denormals and signed zeros in x and g; the
    attention maps' gradients, whose row sums run in 16 lanes there, within rounding."""
    isa_env(monkeypatch, "avx512_bf16")
    x, ca, sa = gate_inputs(*shape, dtype=torch.bfloat16, layout=layout)
    g = torch.randn_like(x)
    for specials in (False, True):
        if specials:
            for t in (x, g):
                flat = t.view(-1) if t.is_contiguous() else t.permute(0, 2, 3, 1).reshape(-1)
                flat[::97], flat[1::89], flat[2::83] = float("nan"), 1e-40, float("inf")  # 1e-40: a bf16 denormal
                flat[3::79], flat[4::71] = -0.0, 3e38  # 3e38 * (1 + s) overflows to inf
        grads = {}
        for isa in ("avx512_bf16", "avx512", "generic"):
            isa_env(monkeypatch, isa)
            xs, cs, ss = (t.detach().requires_grad_() for t in (x, ca, sa))
            bam_gate(xs, cs, ss, "sum", backend="cpp").backward(g)
            grads[isa] = (xs.grad.view(torch.int16), cs.grad, ss.grad)
        for isa, (dx, dc, ds) in grads.items():
            assert torch.equal(dx, grads["generic"][0]), (isa, specials)
            for got, want in ((dc, grads["generic"][1]), (ds, grads["generic"][2])):
                assert specials or got.isfinite().all()
                # fp32 sums that differ by rounding may round to neighbouring bf16 values
                torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-6, equal_nan=True)


def test_cpp_bad_stream_stores_variable_names_it(monkeypatch):
    monkeypatch.setenv("BAM_FUSED_CPU_STREAM_STORES", "always")
    x, ca, sa = gate_inputs()
    with pytest.raises(RuntimeError, match="BAM_FUSED_CPU_STREAM_STORES must be auto, on or off, got 'always'"):
        bam_gate(x, ca, sa, backend="cpp")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_output_can_be_changed_in_place_before_backward(backend, layout):
    """As an in-place ReLU after BAM does in a model. Before 2026-11-26 the output was a view made
    inside the autograd Function, and autograd refused: "Output 0 of _EagerGate is a view and is
    being modified inplace"."""
    grads = []
    for fn in (bam_gate_reference, functools.partial(bam_gate, backend=backend)):
        torch.manual_seed(0)
        x, ca, sa = gate_inputs(layout=layout, requires_grad=True)
        out = torch.relu_(fn(x, ca, sa).mul_(2))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), x.grad, ca.grad, sa.grad))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- the Triton launch configs (host-side arithmetic; the kernels' results are tested above) --
def is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def test_triton_pow2_divisor_and_ceiling():
    from bam_fused.ops import gate_triton as gt

    for v in range(1, 300):
        d = gt._pow2_divisor(v)
        assert is_pow2(d) and v % d == 0 and (d == 16 or v % (2 * d) != 0), v
        p = gt._pow2_ceil(v)
        assert is_pow2(p) and p >= v > p // 2, v


@pytest.mark.parametrize("largest", [256, 1024])
def test_triton_block_width_is_the_widest_that_idles_little(largest):
    from bam_fused.ops import gate_triton as gt

    assert gt._block_l(56 * 56, 1024) == 256 and gt._block_l(14 * 14, 1024) == 256  # (its docstring's cases)
    for L in range(1, 4200, 3):
        b, width = gt._block_l(L, largest), gt._pow2_ceil(L)
        assert is_pow2(b) and min(128, width) <= b <= max(min(largest, width), 16), L

        def idle(w, L=L):
            return -(-L // w) * w - L

        wider = [w for w in (32, 64, 128, 256, 512, 1024) if b < w <= min(largest, width)]
        if idle(b) <= L / 16:
            assert all(idle(w) > L / 16 for w in wider), L
        else:  # none idles little enough: the one that idles the fewest
            assert all(idle(w) >= idle(b) for w in wider), L


def test_triton_tiles_cover_the_rows_in_chunks_of_whole_tiles():
    from bam_fused.ops import gate_triton as gt

    for n, r, l in [(1, 37, 63), (2, 256, 3136), (8, 3136, 256), (32, 1024, 196), (1, 5, 1), (64, 2048, 49)]:
        f = gt.fwd_config(r, l)
        assert is_pow2(f.block_r) and f.block_r <= gt._pow2_ceil(r) and f.block_r * f.block_l <= max(4096, f.block_l)
        b = gt.bwd_config(n, r, l)
        assert is_pow2(b.block_r) and b.block_r * b.block_l <= max(1024, b.block_l)
        assert b.rows_per_chunk % b.block_r == 0 and b.rows_per_chunk <= -(-r // b.block_r) * b.block_r
        chunks, column_blocks = -(-r // b.rows_per_chunk), -(-l // b.block_l)
        if chunks > 1:  # split only while the GPU (512 programs off CUDA) is not yet full
            assert n * column_blocks * (chunks - 1) < 512, (n, r, l)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_kernels_take_other_tiles(dtype):
    # gpu_probe.py times tiles other than the defaults, the backward's column sums kept per tile
    # position (acc_2d) and its loop's loads pipelined (stages; the interpreter runs the loop
    # plainly, the AOT test below compiles it): any of them computes the same gate (the forward
    # bit for bit; the backward's partial sums in another order).
    from bam_fused.ops import gate_aot
    from bam_fused.ops import gate_triton as gt

    n, r, l = 2, 37, 63
    torch.manual_seed(0)
    x, g = torch.randn(n, r, l).to(dtype), torch.randn(n, r, l).to(dtype)
    row, col = torch.randn(n, r), torch.randn(n, l)
    for product in (False, True):
        want = gt.gate_forward(x, row, col, product)
        want_dx, want_drow, want_dcol = gt.gate_backward(g, x, row, col, product)
        fwd_tiles = [gt.FwdConfig(1, 16, 4), gt.FwdConfig(8, 64, 8), gt.FwdConfig(64, 128, 4)]
        bwd_tiles = [gt.BwdConfig(1, 16, 5, 4, stages=3), gt.BwdConfig(8, 64, 16, 8, True),
                     gt.BwdConfig(2, 128, 64, 4, True, 2)]  # fmt: skip
        for fwd, bwd in zip(fwd_tiles, bwd_tiles, strict=True):
            assert fwd != gt.fwd_config(r, l) and bwd != gt.bwd_config(n, r, l)
            assert torch.equal(gt.gate_forward(x, row, col, product, fwd), want), fwd
            dx, drow, dcol = gt.gate_backward(g, x, row, col, product, bwd)
            assert torch.equal(dx, want_dx), bwd
            torch.testing.assert_close(drow, want_drow, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(dcol, want_dcol, rtol=1e-5, atol=1e-5)
            # ... and launches the tiles it was given.
            kernels = (gt, "_gate_fwd_kernel"), (gt, "_gate_bwd_kernel")
            with gate_aot.recorded_launches(*kernels) as launches:
                gt.gate_forward(x, row, col, product, fwd)
                gt.gate_backward(g, x, row, col, product, bwd)
            (_, _, fwd_kw), (_, bwd_args, bwd_kw) = launches
            launched_fwd = gt.FwdConfig(fwd_kw["BLOCK_R"], fwd_kw["BLOCK_L"], fwd_kw["num_warps"])
            launched_bwd = gt.BwdConfig(bwd_kw["BLOCK_R"], bwd_kw["BLOCK_L"], bwd_args[-1], bwd_kw["num_warps"],
                                        bwd_kw["ACC_2D"], bwd_kw["STAGES"])  # fmt: skip
            assert launched_fwd == fwd and launched_bwd == bwd


def test_triton_backward_fills_the_gpu_it_runs_on(monkeypatch):
    """On CUDA the backward aims at 8 programs a multiprocessor (asked once a device); off it, 512."""
    import types

    from bam_fused.ops import gate_triton as gt

    asked = []

    def properties(index):
        asked.append(index)
        return types.SimpleNamespace(multi_processor_count=132)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    gt.multiprocessors.cache_clear()
    gt.bwd_config.cache_clear()
    try:
        assert gt.multiprocessors(None) is None and gt._target_programs(None) == 512
        assert gt._target_programs(0) == gt._target_programs(0) == 8 * 132 and asked == [0]
        on_gpu, off = gt.bwd_config(2, 3136, 256, 0), gt.bwd_config(2, 3136, 256, None)
        # 2 samples x 1 column block: 528 and 256 chunks of the 784 tiles of 4 rows fill 1056 and 512
        # programs; whole tiles a chunk make that 2 and 4 tiles, so 392 and 196 chunks.
        assert [c.rows_per_chunk for c in (on_gpu, off)] == [8, 16] and on_gpu.block_r == 4
    finally:
        gt.multiprocessors.cache_clear()
        gt.bwd_config.cache_clear()
