"""GPU tests: the Triton gate and the CUDA branch op on a real device (skipped without one)."""

import functools

import pytest
import torch
from helpers import make_layout

import bam_fused
from bam_fused import _ext
from bam_fused.ops import bam_branches, bam_gate
from bam_fused.testing import compare, gate_comparisons, randomize_

pytestmark = pytest.mark.cuda
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# BAM_FUSED_CUDA_SPATIAL: our fp32 kernel, or cuDNN's convs (TF32 by default, as in the
# reference on the GPU), each with the bound its arithmetic allows on the spatial map.
SPATIAL_IMPLS = ["kernel", "library"]
SPATIAL_TOL = {"kernel": 1e-4, "library": 1e-3}


@pytest.mark.parametrize("shape", [(2, 37, 7, 9), (4, 256, 56, 56), (8, 1024, 14, 14), (3, 5, 1, 1), (0, 8, 3, 3)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("combine", ["sum", "product"])
def test_triton_gate_on_gpu(shape, layout, dtype, combine):
    n, c, h, w = shape
    x = make_layout(torch.randn(shape, device="cuda").to(dtype), layout)
    ca = torch.randn(n, c, device="cuda", dtype=dtype)
    sa = torch.randn(n, h, w, device="cuda", dtype=dtype)
    g = torch.randn(shape, device="cuda").to(dtype)
    fn = functools.partial(bam_gate, combine=combine, backend="triton")
    for name, result in gate_comparisons(fn, x, ca, sa, combine, g):
        assert result.passed, (name, result)


def test_triton_backward_bitwise_repeatable_on_gpu():
    x = torch.randn(8, 512, 28, 28, device="cuda")
    ca, sa = torch.randn(8, 512, device="cuda"), torch.randn(8, 28, 28, device="cuda")

    def grads():
        xs, cs, ss = (t.clone().requires_grad_() for t in (x, ca, sa))
        bam_gate(xs, cs, ss, backend="triton").backward(torch.ones_like(xs))
        return xs.grad, cs.grad, ss.grad

    assert all(torch.equal(a, b) for a, b in zip(grads(), grads(), strict=True))


@pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="extension built without CUDA kernels")
@pytest.mark.parametrize("c,h,w,dilation,r", [(48, 9, 13, 1, 8), (256, 56, 56, 4, 16), (1024, 14, 14, 4, 16),
                                              (2048, 7, 7, 2, 16), (37, 7, 9, 4, 16)])  # fmt: skip
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
# (BAM_FUSED_CUDA_SPATIAL, BAM_FUSED_CUDA_EVAL): the Triton path runs its own convs.
@pytest.mark.parametrize("spatial_impl,eval_impl", [(s, e) for e in ("kernel", "triton-pass") for s in SPATIAL_IMPLS]
                         + [("kernel", "triton")])  # fmt: skip
def test_cuda_branch_op_and_module(c, h, w, dilation, r, layout, dtype, spatial_impl, eval_impl, monkeypatch):
    monkeypatch.setenv("BAM_FUSED_CUDA_SPATIAL", spatial_impl)
    monkeypatch.setenv("BAM_FUSED_CUDA_EVAL", eval_impl)  # the module's attention maps
    ref = randomize_(bam_fused.reference.BAM(c, r, dilation)).eval()
    fused = bam_fused.BAM(c, r, dilation, backend="fused").eval()
    fused.load_state_dict(ref.state_dict())
    x_cpu = torch.randn(3, c, h, w).to(dtype)
    x = make_layout(x_cpu.cuda(), layout)
    f = fused.cuda().folded()
    pooled, spatial = bam_branches(x, f["red_w"], f["red_b"], f["dil_w"], f["dil_b"], dilation, f["fin_w"], f["fin_b"])
    with torch.no_grad():
        ref64 = ref.double()
        want = ref64.spatial_att(x_cpu.double())[:, 0]
        torch.testing.assert_close(pooled.cpu().double(), x_cpu.double().mean((2, 3)), rtol=1e-5, atol=1e-5)
        assert compare(spatial.cpu(), want).max_abs <= SPATIAL_TOL[spatial_impl] * max(1.0, float(want.abs().max()))
        out = fused.to(dtype)(x)
        truth = ref64(x_cpu.double())
        # The eager reference on the same GPU: its convolutions run as TF32 there, as the
        # fused op's dilated convolutions do (torch.backends.cudnn.allow_tf32).
        eager = ref.cuda().to(dtype)(x)
    assert compare(out.cpu(), truth, eager.cpu()).passed


@pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="extension built without CUDA kernels")
@pytest.mark.parametrize("convs,c,dilation", [(1, 48, 3), (3, 4096, 1), (2, 4096, 4)])
@pytest.mark.parametrize("spatial_impl", SPATIAL_IMPLS)
def test_cuda_spatial_convs_any_count_and_width(convs, c, dilation, spatial_impl, monkeypatch):
    monkeypatch.setenv("BAM_FUSED_CUDA_SPATIAL", spatial_impl)
    # 4096 channels: Cr = 256, sixteen output groups and sixteen weight slices.
    ref = randomize_(bam_fused.reference.BAM(c, 16, dilation, num_dilated_convs=convs)).eval()
    fused = bam_fused.BAM(c, 16, dilation, num_dilated_convs=convs, backend="fused").eval()
    fused.load_state_dict(ref.state_dict())
    x_cpu = torch.randn(2, c, 11, 6)
    f = fused.cuda().folded()
    _, spatial = bam_branches(x_cpu.cuda(), f["red_w"], f["red_b"], f["dil_w"], f["dil_b"], dilation, f["fin_w"],
                              f["fin_b"])  # fmt: skip
    with torch.no_grad():
        want = ref.double().spatial_att(x_cpu.double())[:, 0]
    assert compare(spatial.cpu(), want).max_abs <= SPATIAL_TOL[spatial_impl] * max(1.0, float(want.abs().max()))


@pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="extension built without CUDA kernels")
@pytest.mark.parametrize("spatial_impl,eval_impl", [(s, e) for e in ("kernel", "triton-pass") for s in SPATIAL_IMPLS]
                         + [("kernel", "triton")])  # fmt: skip
def test_cuda_nan_in_x_goes_where_the_reference_puts_it(spatial_impl, eval_impl, monkeypatch):
    # A NaN in x reaches its dilated neighbours in the spatial map and, through the means, the
    # whole sample. The ReLUs must pass it on: fmaxf(v, 0) in the CUDA kernels and a plain
    # tl.maximum in Triton returned 0 instead (each found off the GPU, by the emulator and the
    # interpreter); this is the check on a real device.
    monkeypatch.setenv("BAM_FUSED_CUDA_SPATIAL", spatial_impl)
    monkeypatch.setenv("BAM_FUSED_CUDA_EVAL", eval_impl)
    ref = randomize_(bam_fused.reference.BAM(64, 16, 2)).eval()
    fused = bam_fused.BAM(64, 16, 2, backend="fused").eval()
    fused.load_state_dict(ref.state_dict())
    x_cpu = torch.randn(3, 64, 9, 13)
    x_cpu[1, 5, 4, 6] = float("nan")
    f = fused.cuda().folded()
    _, spatial = bam_branches(x_cpu.cuda(), f["red_w"], f["red_b"], f["dil_w"], f["dil_b"], 2, f["fin_w"], f["fin_b"])
    with torch.no_grad():
        want_map = ref.double().spatial_att(x_cpu.double())[:, 0]
        want = ref.double()(x_cpu.double())
        out = fused(x_cpu.cuda())
    assert want_map.isnan().any() and not want_map.isnan().all()
    got_nan = spatial.isnan().cpu()
    if spatial_impl == "library":
        # cuDNN picks its own conv algorithm (a transform-based one may spread a NaN over a
        # whole tile, as it would in the reference on the GPU): at least the dilated neighbours.
        assert (got_nan | ~want_map.isnan()).all() and not got_nan[[0, 2]].any()
    else:
        assert torch.equal(got_nan, want_map.isnan())
    assert want[1].isnan().all() and not want[[0, 2]].isnan().any()
    assert torch.equal(out.isnan().cpu(), want.isnan())


@pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="extension built without CUDA kernels")
def test_cuda_spatial_impl_variable_is_checked(monkeypatch):
    monkeypatch.setenv("BAM_FUSED_CUDA_SPATIAL", "fast")
    m = bam_fused.BAM(32, 16, backend="fused").cuda().eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="BAM_FUSED_CUDA_SPATIAL"):
        m(torch.randn(1, 32, 5, 5, device="cuda"))


@pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="extension built without CUDA kernels")
def test_auto_pass_under_graph_capture(monkeypatch):
    # A shape first met while a CUDA graph is captured cannot be timed: the kernel runs, and
    # the shape is timed at its first call outside capture.
    from bam_fused.ops import attention_cuda

    monkeypatch.setenv("BAM_FUSED_CUDA_EVAL", "auto")
    monkeypatch.setattr(attention_cuda, "_chosen", {})
    m = randomize_(bam_fused.BAM(64, 8)).cuda().eval()
    x = torch.randn(3, 64, 11, 7, device="cuda")
    with torch.no_grad():
        want = m(x).clone()
        attention_cuda._chosen.clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = m(x)
        graph.replay()
        assert not attention_cuda._chosen
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        m(x)
    (picks,) = attention_cuda._chosen.values()
    assert set(picks) <= {"kernel", "triton-pass", "triton"}
    # Captured again now that the shape is timed: the graph pick runs (maybe a Triton path, in
    # 3xTF32: hence the wider tolerance) and gives the same output.
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = m(x)
    graph.replay()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="extension built without CUDA kernels")
@pytest.mark.parametrize("eval_impl", ["kernel", "triton-pass", "triton"])
# C = 256: our MLP kernel beside our convs (Cr 16); 1024: the library's MLP beside cuDNN's (Cr 64).
@pytest.mark.parametrize("c", [256, 1024])
def test_channel_mlp_beside_the_convs(eval_impl, c, monkeypatch, tmp_path):
    # BAM_FUSED_CUDA_OVERLAP: the channel MLP on a side stream beside the dilated convs (under
    # graph capture by default; always with "on"). The same kernels run, so the same bits; a
    # missing join or allocator record would show as stale or overwritten maps.
    import json

    monkeypatch.setenv("BAM_FUSED_CUDA_EVAL", eval_impl)
    m = randomize_(bam_fused.BAM(c, 16)).cuda().eval()
    xs = [torch.randn(4, c, 14, 14, device="cuda") for _ in range(3)]
    with torch.no_grad():
        monkeypatch.setenv("BAM_FUSED_CUDA_OVERLAP", "off")
        want = [m(x) for x in xs]
        monkeypatch.setenv("BAM_FUSED_CUDA_OVERLAP", "on")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            got = [m(x) for x in xs]
            torch.cuda.synchronize()
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        prof.export_chrome_trace(str(tmp_path / "trace.json"))
        trace = json.loads((tmp_path / "trace.json").read_text())
        streams = {e["args"]["stream"] for e in trace["traceEvents"] if e.get("cat") == "kernel"}
        assert len(streams) >= 2, "the MLP should have run on a stream of its own"
        monkeypatch.setenv("BAM_FUSED_CUDA_OVERLAP", "auto")
        static = xs[0].clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = m(static)
        for x, w in zip(xs, want, strict=True):
            static.copy_(x)
            graph.replay()
            assert torch.equal(out, w)
        monkeypatch.setenv("BAM_FUSED_CUDA_OVERLAP", "sometimes")
        with pytest.raises((RuntimeError, ValueError), match="BAM_FUSED_CUDA_OVERLAP"):
            m(xs[0])


@pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="extension built without CUDA kernels")
@pytest.mark.parametrize("eval_impl", ["kernel", "triton"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_repeated_eval_calls_skip_the_routing_on_gpu(eval_impl, layout, routed, monkeypatch):
    # BAM._eval_again on CUDA (tests/test_eval_fast_path.py runs the rest of its cases through
    # the Triton interpreter): repeated plain eval calls skip the routing (counted at _gate_impl)
    # with the same bits, and every change the routing would see sends a call through it again.
    from bam_fused.ops import attention_cuda
    from bam_fused.ops.gate import memory_format

    monkeypatch.setenv("BAM_FUSED_CUDA_EVAL", eval_impl)
    torch.manual_seed(0)
    ref = randomize_(bam_fused.reference.BAM(48, 8, 2)).cuda().eval()
    m = bam_fused.BAM(48, 8, 2, backend="fused").cuda().eval()
    m.load_state_dict(ref.state_dict())
    x = make_layout(torch.randn(2, 48, 9, 13, device="cuda"), layout)

    def check(out, tol=1e-3):  # against float64 (no TF32) with the weights as they are now
        twin = bam_fused.reference.BAM(48, 8, 2).cuda().double().eval()
        twin.load_state_dict(ref.state_dict())
        torch.testing.assert_close(out.double(), twin(x.double()), rtol=tol, atol=tol)
        assert out.is_contiguous(memory_format=memory_format(x))

    with torch.no_grad():
        first = m(x)
        assert m._fold_state.call[1] is attention_cuda.eval_forward
        again = m(x)
        assert len(routed) == 1 and torch.equal(first, again)
        check(first)
        # An optimizer step's in-place update (a new version): routed again, the new weights used.
        for mm in (m, ref):
            mm.spatial_att.gate_s.gate_s_conv_di_1.weight.mul_(1.5)
        check(m(x))
        m(x)
        assert len(routed) == 2
        # A write through .data bumps no version: .eval() is how it reaches the fold off the CPU (README).
        for mm in (m, ref):
            mm.channel_att.gate_c.gate_c_fc_0.weight.data.mul_(0.5)
        m.eval()
        check(m(x))
        assert len(routed) == 3
        # A hook: the branches run as modules (cuDNN's convs, TF32 by default), and it fires.
        seen = []
        handle = m.spatial_att.gate_s.gate_s_conv_final.register_forward_hook(lambda *_: seen.append(1))
        check(m(x), tol=1e-2)
        handle.remove()
        assert seen == [1] and len(routed) == 4
        # x on another device: the full routing's error. Another dtype: the same call serves it.
        with pytest.raises(ValueError, match="x is on cpu but this BAM's parameters are on cuda"):
            m(x.cpu())
        assert len(routed) == 4  # (raised before the routing)
        half = m(x.half())
        assert half.dtype == torch.float16 and len(routed) == 4
        torch.testing.assert_close(half.float(), m(x.half().float()), rtol=1e-2, atol=1e-2)
        now = m(x)
    # Autograd on: routed every call (to the same kernels where nothing wants gradients).
    m.requires_grad_(False)
    with torch.enable_grad():
        assert torch.equal(m(x), now) and torch.equal(m(x), now) and len(routed) == 6


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_second_derivatives_on_gpu(mode):
    """A gradient penalty through a CUDA BAM (its layers and the Triton gate, whose backward runs
    as PyTorch ops under create_graph) against the float64 reference."""
    ref = randomize_(bam_fused.reference.BAM(48, 8, 2)).cuda()
    fused = bam_fused.BAM(48, 8, 2, backend="fused").cuda()
    fused.load_state_dict(ref.state_dict())
    truth = ref.double().train(mode == "train")
    fused.train(mode == "train")
    x, g = torch.randn(3, 48, 9, 13, device="cuda"), torch.randn(3, 48, 9, 13, device="cuda")
    results = []
    for m, dtype in ((fused, torch.float32), (truth, torch.float64)):
        xs = x.to(dtype, copy=True).requires_grad_()
        (dx,) = torch.autograd.grad(m(xs), xs, g.to(dtype), create_graph=True)
        (dx**2).sum().backward()
        results.append((dx.detach(), xs.grad, m.spatial_att.gate_s.gate_s_conv_di_0.weight.grad))
    for mine, exact in zip(*results, strict=True):
        # (cuDNN convs in TF32, as the reference's on the GPU: a loose bound, which a wrong formula is far past)
        torch.testing.assert_close(mine.double(), exact, rtol=1e-2, atol=1e-2 * float(exact.abs().max()))


def test_compile_module_on_gpu():
    m = randomize_(bam_fused.BAM(64, 8)).cuda().eval()
    x = torch.randn(4, 64, 14, 14, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x), rtol=1e-5, atol=1e-5)
    m.train()
    xg = x.clone().requires_grad_()
    torch.compile(m, fullgraph=True)(xg).sum().backward()
    assert xg.grad is not None


@pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="extension built without CUDA kernels")
def test_compile_reduce_overhead_on_gpu(monkeypatch):
    # The README's way to GPU time inside a model: CUDA graphs through torch.compile (cudagraph
    # trees: a warm-up call, a captured one, then replays). The extension's op runs captured
    # there, with the channel MLP on a side stream (BAM_FUSED_CUDA_OVERLAP=auto), and must give
    # what plain calls of the same kernels give, input after input.
    monkeypatch.setenv("BAM_FUSED_CUDA_EVAL", "kernel")  # the op that compiled graphs call
    m = randomize_(bam_fused.BAM(256, 16)).cuda().eval()
    xs = [torch.randn(4, 256, 14, 14, device="cuda") for _ in range(4)]
    with torch.no_grad():
        want = [m(x) for x in xs]
        compiled = torch.compile(m, mode="reduce-overhead", fullgraph=True)
        got = [compiled(x).clone() for x in xs]  # (a replay overwrites the last one's output)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
