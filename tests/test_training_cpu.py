"""BAM with autograd on the CPU (bam_fused/ops/training.py): the reduce_pool op and its
backward (csrc/cpu/conv1x1_grad.h) in every instruction set, and the module against the
reference, forward and backward."""

import warnings

import pytest
import torch
from helpers import bf16_products, make_layout
from test_cpu_pass import ISAS, isa_env

import bam_fused
from bam_fused import _backends
from bam_fused.ops import training
from bam_fused.ops.branches import load_op
from bam_fused.reference import BAM as RefBAM
from bam_fused.testing import randomize_

# (N, C, H, W, Cr): odd sizes; Cr off every register block (5, 13); several channel groups per
# dW task (200 > 192) with a ragged last one; several dW chunks per sample (37 x 40 = 1480 >
# 1152 pixels) with partial last vectors; one pixel; no pixels; no samples.
SHAPES = [(2, 37, 7, 9, 5), (1, 48, 9, 13, 6), (2, 200, 5, 7, 13), (1, 20, 37, 40, 4), (3, 64, 14, 14, 16),
          (2, 8, 1, 1, 3), (2, 12, 0, 5, 4), (0, 12, 5, 5, 4)]  # fmt: skip


def ops():
    load_op()
    return torch.ops.bam_fused_C.reduce_pool, torch.ops.bam_fused_C.reduce_pool_backward


def reduce_reference(x, w, b, dy, dmean, dx, bf16_weights=False):
    """float64: y (from w rounded to bf16 if asked), means, dx + W^T dy + dmean / HW, dW, db."""
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    hw = x.shape[2] * x.shape[3]
    y = torch.einsum("nchw,rc->nrhw", x64, (w.bfloat16() if bf16_weights else w).double()) + b.double()[:, None, None]
    dx_want = dx.double() + torch.einsum("nrhw,rc->nchw", dy64, w64) + dmean.double()[:, :, None, None] / hw
    return y, x64.mean((2, 3)), dx_want, torch.einsum("nrhw,nchw->rc", dy64, x64), dy64.sum((0, 2, 3))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,c,h,w,cr", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_reduce_pool_and_backward_match_reference(monkeypatch, isa, n, c, h, w, cr, dtype, layout):
    isa_env(monkeypatch, isa)
    fwd, bwd = ops()
    g = torch.Generator().manual_seed(n * 1000 + c)
    x = make_layout(torch.randn(n, c, h, w, generator=g).to(dtype), layout)
    wr, br = torch.randn(cr, c, generator=g) / c**0.5, torch.randn(cr, generator=g)
    dy = make_layout(torch.randn(n, cr, h, w, generator=g), layout)
    dmean = torch.randn(n, c, generator=g)
    dx = make_layout(torch.randn(n, c, h, w, generator=g).to(dtype), layout)
    y_want, m_want, dx_want, dw_want, db_want = reduce_reference(x, wr, br, dy, dmean, dx, bf16_products(dtype, isa))

    means, y = fwd(x, wr, br, False)
    assert y.dtype == means.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), y_want, rtol=1e-5, atol=1e-5)
    if h * w > 0:
        torch.testing.assert_close(means.double(), m_want, rtol=1e-5, atol=1e-6)

    dw, db = bwd(x, dy, dmean, wr, dx)  # dx in place
    scale = max(1.0, float(dw_want.abs().max())) if dw_want.numel() else 1.0
    torch.testing.assert_close(dw.double(), dw_want, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(db.double(), db_want, rtol=1e-5, atol=1e-5 * scale)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    if h * w > 0:
        torch.testing.assert_close(dx.double(), dx_want, rtol=tol, atol=tol)
    dw2, db2 = bwd(x, dy, dmean, wr, None)  # weight gradients only
    assert torch.equal(dw2, dw) and torch.equal(db2, db)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("bf16_weights", [False, True])
def test_reduce_pool_backward_rounds_dx_like_torch(monkeypatch, isa, dtype, layout, bf16_weights):
    # With dy = 0 the kernel adds dmean / HW to dx in fp32 and rounds once: torch's rounding,
    # bit for bit, NaN and infinity included. bf16 weights (with bf16 x on avx512_bf16): the
    # bf16-product dx kernels, which round with their own stores.
    isa_env(monkeypatch, isa)
    _, bwd = ops()
    n, c, h, w = 2, 70, 8, 8
    dx = torch.randn(n, c, h, w).to(dtype)
    dmean = torch.randn(n, c) * 1e3
    # Ties: 1 + k ulp plus half an ulp (bfloat16's ulp at 1 is 2^-7, half's 2^-10) round to even.
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    dx[:, :10] = (1 + torch.arange(n * 10 * h * w).remainder(16).view(n, 10, h, w) * ulp).to(dtype)
    dmean[:, :10] = ulp / 2 * h * w
    dx[0, 13, 2, 1], dx[1, 15, 0, 0] = float("nan"), float("inf")
    dx = make_layout(dx, layout)
    want = (dx.float() + dmean[:, :, None, None] / (h * w)).to(dtype)
    x = make_layout(torch.randn(n, c, h, w).to(dtype), layout)
    weights = torch.randn(3, c).bfloat16().float() if bf16_weights else torch.randn(3, c)
    bwd(x, make_layout(torch.zeros(n, 3, h, w), layout), dmean, weights, dx)
    assert torch.equal(dx.isnan(), want.isnan()) and dx.isnan().sum() == 1
    finite = ~want.isnan()
    assert torch.equal(dx[finite].view(torch.int16), want[finite].view(torch.int16))


def test_reduce_pool_relu_and_thread_count_independence():
    fwd, bwd = ops()
    x = torch.randn(3, 200, 37, 40)
    w, b = torch.randn(13, 200) / 14, torch.randn(13)
    _, y = fwd(x, w, b, True)
    _, y_lin = fwd(x, w, b, False)
    assert torch.equal(y, y_lin.clamp_min(0))
    dy, dmean = torch.randn(3, 13, 37, 40), torch.randn(3, 200)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bwd(x, dy, dmean, w, None)
        for count in (2, 3, 7):  # dx's tasks split by pixels (parallel_chunks.h): odd counts too
            torch.set_num_threads(count)
            many = bwd(x, dy, dmean, w, None)
            assert all(torch.equal(a, b) for a, b in zip(one, many, strict=True)), count
    finally:
        torch.set_num_threads(threads)


def test_reduce_pool_backward_rejects_bad_arguments():
    _, bwd = ops()
    x, w = torch.randn(2, 8, 3, 4), torch.randn(2, 8)
    dy, dmean = torch.randn(2, 2, 3, 4), torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="dy must be fp32 .* laid out like x"):
        bwd(x, dy.contiguous(memory_format=torch.channels_last), dmean, w, None)
    with pytest.raises(RuntimeError, match="dx must have x's sizes"):
        bwd(x, dy, dmean, w, torch.zeros(2, 8, 3, 4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="dmean must be contiguous fp32"):
        bwd(x, dy, dmean[:1], w, None)
    with pytest.raises(RuntimeError, match="w must be"):
        bwd(x, dy, dmean, torch.randn(2, 7), None)


def make_pair(c, r, dilation, combine, dtype=torch.float32):
    ref = randomize_(RefBAM(c, r, dilation, combine=combine)).to(dtype)
    fused = bam_fused.BAM(c, r, dilation, combine=combine, backend="fused").to(dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def run_both(ref, fused, x, g, x_grad=True):
    xr, xf = (x.clone().requires_grad_(x_grad) for _ in range(2))
    out_r, out_f = ref(xr), fused(xf)
    out_r.backward(g)
    out_f.backward(g)
    return out_r, out_f, xr, xf


# (N, C, H, W, r, dilation): the odd shapes of the branch tests, batch 1 (eval mode: BatchNorm
# in training needs more than one value per channel), and a ResNet-like one.
BIASES_BEFORE_BATCHNORM = ("gate_c_fc_0.bias", "gate_s_conv_reduce0.bias", "conv_di_0.bias", "conv_di_1.bias")
MODULE_GRID = [(3, 48, 9, 13, 8, 4), (2, 37, 7, 9, 16, 1), (2, 48, 9, 13, 16, 2), (4, 64, 14, 14, 16, 4)]


@pytest.mark.parametrize("n,c,h,w,r,dilation", MODULE_GRID)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_module_autograd_matches_reference(monkeypatch, n, c, h, w, r, dilation, layout, combine, mode):
    calls = []
    real = training.training_bam
    monkeypatch.setattr(training, "training_bam", lambda *a: calls.append(1) or real(*a))
    ref, fused = make_pair(c, r, dilation, combine)
    ref.train(mode == "train")
    fused.train(mode == "train")
    x = make_layout(torch.randn(n, c, h, w), layout)
    g = torch.randn(n, c, h, w)
    out_r, out_f, xr, xf = run_both(ref, fused, x, g)
    assert calls, "the CPU autograd path did not run"
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)
    if layout != "strided":
        assert out_f.stride() == out_r.stride()
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5)
    scale = max(1.0, max(float(p.grad.abs().max()) for p in ref.parameters()))
    for (name, pr), pf in zip(ref.named_parameters(), fused.parameters(), strict=True):
        if mode == "train" and name.endswith(BIASES_BEFORE_BATCHNORM):
            # Zero in theory (BatchNorm with batch statistics removes any shift): float32 noise,
            # which BatchNorm over a few samples amplifies differently in each. Both near zero.
            assert max(pf.grad.abs().max(), pr.grad.abs().max()) <= 1e-4 * scale, name
        else:
            torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    for (name, br), bf in zip(ref.named_buffers(), fused.buffers(), strict=True):
        torch.testing.assert_close(bf, br, msg=name)


def gradient_penalty(model, x, g):
    """The gradients of sum((d out / d x . g)^2) (a gradient penalty) with respect to x and the
    model's parameters, and the first gradient: a second derivative through the whole BAM."""
    x = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(model(x), x, g, create_graph=True)
    (dx**2).sum().backward()
    return dx.detach(), x.grad, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("n,c,h,w,r,dilation", [(4, 48, 9, 13, 8, 4), (2, 37, 7, 9, 16, 1)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_module_second_derivatives_match_reference(monkeypatch, n, c, h, w, r, dilation, layout, combine, mode):
    """create_graph=True on the CPU autograd path (the forward recomputed as PyTorch ops) against
    the float64 reference; the BatchNorms' statistics move once, as the reference's."""
    calls = []
    real = training._second_order_backward
    monkeypatch.setattr(training, "_second_order_backward", lambda *a: calls.append(1) or real(*a))
    ref, fused = make_pair(c, r, dilation, combine)
    truth = RefBAM(c, r, dilation, combine=combine).double()
    truth.load_state_dict(ref.state_dict())
    for m in (truth, fused):
        m.train(mode == "train")
    x = make_layout(torch.randn(n, c, h, w), layout)
    g = torch.randn(n, c, h, w)
    want = gradient_penalty(truth, x.double(), g.double())
    got = gradient_penalty(fused, x, g)
    assert calls == [1]
    for mine, exact in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(mine.double(), exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max()))
    scale = max(float(p.abs().max()) for p in want[2].values())
    for name, exact in want[2].items():
        mine = got[2][name].double()
        if mode == "train" and name.endswith(BIASES_BEFORE_BATCHNORM):
            assert max(mine.abs().max(), exact.abs().max()) <= 1e-4 * scale, name  # zero in theory
        else:
            torch.testing.assert_close(mine, exact, rtol=1e-4, atol=1e-5 * scale, msg=name)
    for (name, exact), mine in zip(truth.named_buffers(), fused.buffers(), strict=True):
        torch.testing.assert_close(mine.double(), exact.double(), msg=name)


def test_module_second_derivatives_replay_randomness_and_check_weights(monkeypatch):
    """A layer that draws random numbers (a Dropout in gate_c) draws the forward's again when the
    backward recomputes it; a weight changed in place before that backward raises."""
    calls = []
    real = training._second_order_backward
    monkeypatch.setattr(training, "_second_order_backward", lambda *a: calls.append(1) or real(*a))
    ref, fused = make_pair(48, 8, 2, "sum")
    for m in (ref, fused):
        m.channel_att.gate_c.gate_c_relu_1 = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Dropout(0.5))
    x, g = torch.randn(3, 48, 9, 13), torch.randn(3, 48, 9, 13)
    torch.manual_seed(1)
    want = gradient_penalty(ref, x, g)
    torch.manual_seed(1)
    got = gradient_penalty(fused, x, g)
    assert calls == [1]
    for mine, exact in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(mine, exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max()))
    name = "channel_att.gate_c.gate_c_fc_final.weight"
    torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-3, atol=1e-3)

    xf = x.clone().requires_grad_()
    out = fused(xf)
    with torch.no_grad():
        fused.spatial_att.gate_s.gate_s_conv_di_0.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out, xf, g, create_graph=True)


class _AutocastProbe(torch.nn.Module):
    """An identity layer that records the CPU autocast state each time it runs."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, t):
        self.seen.append((torch.is_autocast_enabled("cpu"), t.dtype))
        return t


def test_module_second_derivatives_replay_autocast():
    """A forward under CPU autocast, a create_graph backward outside it: the recomputed layers run
    under autocast again (bf16 out of the final conv before the probe); the output and its
    gradient stay fp32, as x."""
    _, fused = make_pair(48, 8, 2, "sum")
    probe = _AutocastProbe()
    gs = fused.spatial_att.gate_s
    gs.gate_s_conv_final = torch.nn.Sequential(gs.gate_s_conv_final, probe)
    x = torch.randn(3, 48, 9, 13, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(x)
    assert out.dtype == torch.float32 and probe.seen == [(True, torch.bfloat16)]
    (dx,) = torch.autograd.grad(out, x, torch.randn_like(out), create_graph=True)
    assert probe.seen == [(True, torch.bfloat16)] * 2
    assert dx.dtype == torch.float32 and dx.requires_grad


def test_module_autograd_batch_one_and_bf16():
    ref, fused = make_pair(37, 16, 4, "sum")
    ref.eval()
    fused.eval()
    x, g = torch.randn(1, 37, 7, 9), torch.randn(1, 37, 7, 9)
    out_r, out_f, xr, xf = run_both(ref, fused, x, g)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5)

    ref, fused = make_pair(48, 8, 2, "sum", torch.bfloat16)
    x, g = torch.randn(2, 48, 9, 13).bfloat16(), torch.randn(2, 48, 9, 13).bfloat16()
    out_r, out_f, xr, xf = run_both(ref, fused, x, g)
    truth_m = RefBAM(48, 8, 2).double()
    truth_m.load_state_dict(ref.state_dict())
    x64 = x.double().requires_grad_()
    truth = truth_m(x64)
    truth.backward(g.double())
    assert out_f.dtype == xf.grad.dtype == torch.bfloat16
    # bf16 through the module's layers either way: ours no further from float64 than eager.
    for mine, eager, want in ((out_f, out_r, truth), (xf.grad, xr.grad, x64.grad)):
        err_mine = (mine.double() - want).abs().max()
        err_eager = (eager.double() - want).abs().max()
        assert err_mine <= 2 * err_eager + 1e-2, (err_mine, err_eager)


def assert_partial_requirements(ref, fused, model=None):
    """ref and fused (run as model: fused itself, or compiled) with x needing no gradient, then
    with a frozen reduce conv: the gradients wanted match the reference's. Returns (x, g)."""
    model = fused if model is None else model
    x, g = torch.randn(2, 48, 9, 13), torch.randn(2, 48, 9, 13)
    # Parameters only (x needs no gradient): a frozen input.
    out_r, out_f, xr, xf = run_both(ref, model, x, g, x_grad=False)
    assert xf.grad is None
    red_f, red_r = fused.spatial_att.gate_s.gate_s_conv_reduce0, ref.spatial_att.gate_s.gate_s_conv_reduce0
    torch.testing.assert_close(red_f.weight.grad, red_r.weight.grad, rtol=1e-4, atol=1e-4)
    # Frozen reduce conv: the others still get theirs.
    for m in (ref, fused):
        m.zero_grad(set_to_none=True)
        m.spatial_att.gate_s.gate_s_conv_reduce0.requires_grad_(False)
    out_r, out_f, xr, xf = run_both(ref, model, x, g)
    assert red_f.weight.grad is None
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5)
    fc_f, fc_r = fused.channel_att.gate_c.gate_c_fc_0, ref.channel_att.gate_c.gate_c_fc_0
    torch.testing.assert_close(fc_f.weight.grad, fc_r.weight.grad, rtol=1e-4, atol=1e-4)
    # Half of it frozen (its bias; its weight and the BatchNorm after it): each gradient is computed
    # by its own requires_grad, not a neighbour's.
    bn_f = fused.spatial_att.gate_s.gate_s_bn_reduce0
    for frozen in ("bias", "weight"):
        for m in (ref, fused):
            m.zero_grad(set_to_none=True)
            m.requires_grad_(True)
            getattr(m.spatial_att.gate_s.gate_s_conv_reduce0, frozen).requires_grad_(False)
            m.spatial_att.gate_s.gate_s_bn_reduce0.weight.requires_grad_(frozen == "bias")
        run_both(ref, model, x, g)
        assert (red_f.weight.grad is None, red_f.bias.grad is None) == (frozen == "weight", frozen == "bias")
        assert (bn_f.weight.grad is None) == (frozen == "weight")
        if frozen == "bias":
            torch.testing.assert_close(red_f.weight.grad, red_r.weight.grad, rtol=1e-4, atol=1e-4)
    for m in (ref, fused):
        m.requires_grad_(True)
    return x, g


def test_module_autograd_partial_requirements_and_errors():
    ref, fused = make_pair(48, 8, 4, "sum")
    x, g = assert_partial_requirements(ref, fused)
    # A retained graph gives the same gradients twice.
    for m in (ref, fused):
        m.zero_grad(set_to_none=True)
    xf = x.clone().requires_grad_()
    out = fused(xf)
    out.backward(g, retain_graph=True)
    first = xf.grad.clone()
    out.backward(g)
    torch.testing.assert_close(xf.grad, 2 * first)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_module_autograd_under_activation_checkpointing(monkeypatch, reentrant, layout):
    # torch.utils.checkpoint drops the forward's saved tensors and runs the forward again in the
    # backward: the same output and gradients, to the bit, as without it, and BatchNorm's running
    # statistics updated as often as the reference's (twice: non-reentrant, the inner graph's
    # backward once ran a third forward).
    calls = []
    real = training.training_bam
    monkeypatch.setattr(training, "training_bam", lambda *a: calls.append(1) or real(*a))
    ref, fused = make_pair(48, 8, 4, "sum")
    x, g = make_layout(torch.randn(3, 48, 9, 13), layout), torch.randn(3, 48, 9, 13)
    results = []
    for model in (fused, fused, ref):
        model.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        plain = not results
        out = model(xg) if plain else torch.utils.checkpoint.checkpoint(model, xg, use_reentrant=reentrant)
        out.backward(g)
        results.append((out, xg.grad, [p.grad for p in model.parameters()]))
        if plain:
            assert len(calls) == 1
            fused.load_state_dict(ref.state_dict())  # (the running statistics as the reference's)
    assert len(calls) == 3  # once plain, twice under the checkpoint
    (out_p, dx_p, dw_p), (out_c, dx_c, dw_c), (out_r, dx_r, _) = results
    torch.testing.assert_close(out_c, out_p, rtol=0, atol=0)
    torch.testing.assert_close(dx_c, dx_p, rtol=0, atol=0)
    for a, b in zip(dw_c, dw_p, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(out_c, out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_c, dx_r, rtol=1e-4, atol=1e-5)
    for (name, br), bf in zip(ref.named_buffers(), fused.buffers(), strict=True):
        torch.testing.assert_close(bf, br, msg=name)


def test_module_autograd_where_saved_tensor_hooks_are_disabled():
    # (the checkpointing fix pushes hooks of its own; where none may be pushed it does without)
    ref, fused = make_pair(48, 8, 4, "sum")
    x, g = torch.randn(3, 48, 9, 13), torch.randn(3, 48, 9, 13)
    with torch.autograd.graph.disable_saved_tensors_hooks("no hooks here"):
        out_r, out_f, xr, xf = run_both(ref, fused, x, g)
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5)


def test_second_derivative_under_activation_checkpointing():
    # A gradient penalty through a non-reentrant checkpoint: the reference's gradients; the
    # reference's region runs three times (a recompute per backward pass), ours twice (the
    # create_graph backward recomputes as PyTorch ops on copies of the statistics), as the README says.
    ref, fused = make_pair(48, 8, 4, "sum")
    x, g = torch.randn(3, 48, 9, 13), torch.randn(3, 48, 9, 13)
    results = []
    for model in (ref, fused):
        xg = x.clone().requires_grad_()
        out = torch.utils.checkpoint.checkpoint(model, xg, use_reentrant=False)
        (dx,) = torch.autograd.grad(out, xg, g, create_graph=True)
        (dx**2).sum().backward()
        results.append((dx.detach(), xg.grad))
    (dx_r, dxx_r), (dx_f, dxx_f) = results
    torch.testing.assert_close(dx_f, dx_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dxx_f, dxx_r, rtol=1e-4, atol=1e-4 * float(dxx_r.abs().max()))
    bn_r, bn_f = (m.channel_att.gate_c.gate_c_bn_1.num_batches_tracked.item() for m in (ref, fused))
    assert (bn_r, bn_f) == (3, 2)


def test_module_autograd_empty_batch_takes_the_module_path():
    _, fused = make_pair(16, 4, 1, "sum")
    fused.eval()
    x = torch.randn(0, 16, 5, 5, requires_grad=True)
    assert training.reason(x) == "x is empty"
    fused(x).sum().backward()
    assert x.grad.shape == x.shape


def test_module_autograd_without_extension_runs_the_reference(no_extension):  # noqa: F811
    ref = randomize_(RefBAM(48, 8, 4))
    fused = bam_fused.BAM(48, 8, 4)  # backend "auto": the reference, with one warning
    fused.load_state_dict(ref.state_dict())
    x, g = torch.randn(2, 48, 9, 13), torch.randn(2, 48, 9, 13)
    with pytest.warns(RuntimeWarning, match="simulated"):
        out_r, out_f, xr, xf = run_both(ref, fused, x, g)
    torch.testing.assert_close(out_f, out_r)
    torch.testing.assert_close(xf.grad, xr.grad)
    assert "simulated" in bam_fused.info()["kernels"]["branch autograd (CPU)"]["reason"]


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_training_mode_without_autograd_matches_reference(monkeypatch, context):
    # BatchNorm calibration passes: batch statistics and running-stat updates, no graph; the
    # stock layers with no warning (not as "layers the eval op does not compute").
    ref, fused = make_pair(37, 16, 4, "sum")
    x = torch.randn(3, 37, 7, 9)
    monkeypatch.setattr(_backends, "_warned", set())
    with context(), warnings.catch_warnings():
        warnings.simplefilter("error")
        out_r, out_f = ref(x), fused(x)
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)
    for (name, br), bf in zip(ref.named_buffers(), fused.buffers(), strict=True):
        torch.testing.assert_close(bf, br, msg=name)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_training_mode_without_autograd_builds_no_graph(monkeypatch, layout):
    # With gradients off the inner graph of the branch layers would be dropped unused: it is not
    # built (2-6% of such a call at 8 x 256 x 56x56); with gradients on it is. BatchNorm
    # recalibration as torch.optim.swa_utils.update_bn runs it (train mode, no_grad, momentum
    # None while it runs) gives the reference's statistics.
    built = []
    forward = training._TrainingBAM.forward

    def spy(ctx, *args):
        out = forward(ctx, *args)
        built.append(ctx.graph[2].grad_fn is not None)  # the channel branch's output
        return out

    monkeypatch.setattr(training._TrainingBAM, "forward", staticmethod(spy))
    ref, fused = make_pair(37, 16, 4, "sum")
    batches = [make_layout(torch.randn(3, 37, 7, 9), layout) for _ in range(3)]
    torch.optim.swa_utils.update_bn(batches, ref)
    torch.optim.swa_utils.update_bn(batches, fused)
    assert built == [False] * 3
    for (name, br), bf in zip(ref.named_buffers(), fused.buffers(), strict=True):
        torch.testing.assert_close(bf, br, msg=name)
    fused(batches[0].requires_grad_()).sum().backward()
    assert built == [False] * 3 + [True]


def test_verify_kink_rule_admits_a_few_switched_pixels_only():
    from bam_fused.verify import KINK_PIXEL_FRACTION, compare_through_relu

    truth = torch.randn(2, 8, 20, 20, dtype=torch.float64)
    eager = truth.float()
    few = truth.float().clone()
    few[1, :, 3, 4] += 0.2  # one switched ReLU: one pixel, every channel
    suffix, result = compare_through_relu(few, truth, eager)
    assert result.passed and suffix == "(kink)"
    many = truth.float().clone()
    n_bad = int(KINK_PIXEL_FRACTION * 2 * 20 * 20) + 1
    many.view(2, 8, -1)[:, :, : (n_bad + 1) // 2] += 0.2
    suffix, result = compare_through_relu(many, truth, eager)
    assert not result.passed and suffix == ""
    suffix, result = compare_through_relu(truth.float(), truth, eager)
    assert result.passed and suffix == ""


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_reduce_pool_ops_opcheck(layout):
    # Schemas (dx is mutated in place and declared so) and fake kernels, as torch.compile sees them.
    fwd, bwd = ops()
    x = make_layout(torch.randn(2, 12, 5, 7), layout)
    w, b = torch.randn(3, 12), torch.randn(3)
    dy, dmean = make_layout(torch.randn(2, 3, 5, 7), layout), torch.randn(2, 12)
    torch.library.opcheck(fwd.default, (x, w, b, False))
    torch.library.opcheck(bwd.default, (x, dy, dmean, w, make_layout(torch.randn(2, 12, 5, 7), layout)))
    torch.library.opcheck(bwd.default, (x, dy, dmean, w, None))


@pytest.mark.parametrize("n,c,h,w,cr", SHAPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bf16_weight_gradient_is_exact_in_bf16_products(monkeypatch, n, c, h, w, cr, layout):
    """bf16 x and bf16-representable dy (what a bf16 model's backward brings): avx512_bf16
    computes dW with bf16 products, which are exact, so dW matches float64 as the fp32 path does
    and db keeps the fp32 path's bits. dy that bf16 cannot hold takes the fp32 path: the same
    bits as avx512."""
    isa_env(monkeypatch, "avx512_bf16")
    _, bwd = ops()
    g = torch.Generator().manual_seed(n * 100 + c)
    x = make_layout(torch.randn(n, c, h, w, generator=g).bfloat16(), layout)
    dy = make_layout(torch.randn(n, cr, h, w, generator=g).bfloat16().float(), layout)
    dmean, wr = torch.randn(n, c, generator=g), torch.randn(cr, c, generator=g)
    dw, db = bwd(x, dy, dmean, wr, None)
    dw_want = torch.einsum("nrhw,nchw->rc", dy.double(), x.double())
    scale = max(1.0, float(dw_want.abs().max())) if dw_want.numel() else 1.0
    torch.testing.assert_close(dw.double(), dw_want, rtol=1e-5, atol=1e-5 * scale)
    monkeypatch.setenv("BAM_FUSED_CPU_ISA", "avx512")
    dw_fp32, db_fp32 = bwd(x, dy, dmean, wr, None)
    assert torch.equal(db, db_fp32)
    if h * w >= 63:  # the bf16 path ran: it sums pixel pairs, so some dW bits differ from fp32's order
        assert not torch.equal(dw, dw_fp32)
    dy_fp32 = dy + 1e-3  # not bf16 values: the fp32 path
    monkeypatch.setenv("BAM_FUSED_CPU_ISA", "avx512_bf16")
    ours = bwd(x, dy_fp32, dmean, wr, None)
    monkeypatch.setenv("BAM_FUSED_CPU_ISA", "avx512")
    assert all(torch.equal(a, b) for a, b in zip(ours, bwd(x, dy_fp32, dmean, wr, None), strict=True))


@pytest.mark.parametrize("n,c,h,w,cr", SHAPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bf16_input_gradient_is_exact_in_bf16_products(monkeypatch, n, c, h, w, cr, layout):
    """bf16 x with bf16-representable dy and W (a bf16 model's backward): avx512_bf16 computes
    dx += W^T dy + dmean / HW with bf16 products, which are exact, so dx differs from the fp32
    path only where the fp32 sums' order moves a rounding to bf16 (one ulp). W that bf16 cannot
    hold takes the fp32 path: the same bits as avx512."""
    isa_env(monkeypatch, "avx512_bf16")
    _, bwd = ops()
    g = torch.Generator().manual_seed(n * 100 + c + 7)
    x = make_layout(torch.randn(n, c, h, w, generator=g).bfloat16(), layout)
    dy = make_layout(torch.randn(n, cr, h, w, generator=g).bfloat16().float(), layout)
    dmean, wr = torch.randn(n, c, generator=g), torch.randn(cr, c, generator=g).bfloat16().float()
    dx0 = make_layout(torch.randn(n, c, h, w, generator=g).bfloat16(), layout)

    def dx_of(isa, weights):
        monkeypatch.setenv("BAM_FUSED_CPU_ISA", isa)
        dx = dx0.clone()
        bwd(x, dy, dmean, weights, dx)
        return dx

    ours, fp32 = dx_of("avx512_bf16", wr), dx_of("avx512", wr)
    want = dx0.double() + torch.einsum("nrhw,rc->nchw", dy.double(), wr.double())
    want += dmean.double()[:, :, None, None] / (h * w)
    if ours.numel() > 0:
        torch.testing.assert_close(ours.double(), want, rtol=1e-2, atol=1e-2)
        ulp = ours.float().abs().clamp_min(1e-30) * 2.0**-7
        assert bool(((ours.float() - fp32.float()).abs() <= ulp).all())
        assert (ours != fp32).float().mean() < 1e-3
    not_bf16 = wr + 1e-3
    assert torch.equal(dx_of("avx512_bf16", not_bf16), dx_of("avx512", not_bf16))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bf16_input_gradient_reads_denormals_as_zero(monkeypatch, layout):
    """The path ran, and what it gives up: vdpbf16ps reads a denormal dy (bf16 holds 2^-133) as
    zero, where fp32 products keep 2^-133 * 2^100."""
    isa_env(monkeypatch, "avx512_bf16")
    _, bwd = ops()
    x = make_layout(torch.randn(2, 40, 3, 5).bfloat16(), layout)
    dy = torch.zeros(2, 6, 3, 5)
    dy[1, 2, 1, 3] = 2.0**-133
    dy = make_layout(dy, layout)
    wr = torch.full((6, 40), 2.0**100)
    results = {}
    for isa in ("avx512_bf16", "avx512"):
        monkeypatch.setenv("BAM_FUSED_CPU_ISA", isa)
        dx = make_layout(torch.zeros(2, 40, 3, 5).bfloat16(), layout)
        bwd(x, dy, torch.zeros(2, 40), wr, dx)
        results[isa] = dx
    assert not results["avx512_bf16"].any()
    assert torch.equal(results["avx512"][1, :, 1, 3].float(), torch.full((40,), 2.0**-33))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_module_output_can_be_changed_in_place_before_backward(layout, mode):
    """nn.ReLU(inplace=True) after a BAM: before 2026-11-26 autograd refused ("Output 0 of
    _TrainingBAM is a view and is being modified inplace")."""
    ref, fused = make_pair(48, 8, 2, "sum")
    results = []
    for m in (ref, fused):
        m.train(mode == "train")
        x = make_layout(torch.randn(3, 48, 9, 13, generator=torch.Generator().manual_seed(0)), layout)
        x.requires_grad_()
        out = torch.nn.ReLU(inplace=True)(m(x))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), x.grad))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
