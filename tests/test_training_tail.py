"""The spatial branch after the reduce conv with autograd on the CPU (training, or eval mode
with gradients) as two C++ ops (bam_fused_C::spatial_train and its backward,
csrc/cpu/spatial_train_cpu.cpp): against the module's own layers in float64, inside BAM against
the reference (gradients and running statistics), and the cases where the layers must run as
modules instead."""

import copy

import pytest
import torch
from helpers import SPATIAL_CONVS, make_layout, spatial_env
from test_cpu_pass import ISAS, isa_env
from test_training_cpu import BIASES_BEFORE_BATCHNORM, make_pair, run_both
from torch import nn

from bam_fused.ops import training
from bam_fused.ops.branches import load_op


def tail_layers(cr, k, dilation, affine=True):
    layers = [nn.BatchNorm2d(cr, affine=affine), nn.ReLU()]
    for _ in range(k):
        layers += [
            nn.Conv2d(cr, cr, 3, padding=dilation, dilation=dilation),
            nn.BatchNorm2d(cr, affine=affine),
            nn.ReLU(),
        ]
    layers.append(nn.Conv2d(cr, 1, 1))
    seq = nn.Sequential(*layers)
    with torch.no_grad():
        for m in seq:
            if isinstance(m, nn.BatchNorm2d) and affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
    return seq


def op_args(seq):
    bns = [m for m in seq if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in seq if isinstance(m, nn.Conv2d)]

    def f(t):
        return None if t is None else t.detach().float()

    return bns, convs, [f(b.weight) for b in bns], [f(b.bias) for b in bns], [f(c.weight) for c in convs[:-1]]


def run_ops(seq, y, dilation, ds, channels_last):
    bns, convs, bn_w, bn_b, conv_w = op_args(seq)
    fin = convs[-1]
    frozen = [not b.training for b in bns]  # eval-mode BatchNorms: their running statistics
    rm = [b.running_mean.float() if f else None for b, f in zip(bns, frozen, strict=True)]
    rv = [b.running_var.float() if f else None for b, f in zip(bns, frozen, strict=True)]
    s, maps, stats = load_op("spatial_train")(
        y.float().contiguous(memory_format=torch.channels_last), bn_w, bn_b, [b.eps for b in bns], rm, rv, conv_w,
        [c.bias.detach().float() for c in convs[:-1]], dilation, fin.weight.detach().float(), fin.bias.detach().float(),
    )  # fmt: skip
    dy, grads = load_op("spatial_train_backward")(
        ds, y.float(), maps, stats, bn_w, bn_b, conv_w, dilation, fin.weight.detach().float(),
        [not f for f in frozen], channels_last,
    )  # fmt: skip
    return s, maps, stats, dy, grads


# (N, Cr, H, W, dilated convs, dilation): Cr off the vector width (2, 6: the scalar sweeps), a
# multiple of 4 at run time (8, 12), the constant ones (16, 32, 64); no dilated conv; a
# dilation past the map (8 > 7, 9: every off-centre tap reads padding).
TAIL_SHAPES = [(3, 2, 7, 9, 2, 4), (2, 6, 9, 13, 2, 2), (3, 8, 7, 9, 1, 1), (2, 12, 5, 6, 3, 2),
               (2, 16, 14, 14, 2, 4), (3, 32, 7, 9, 2, 4), (2, 64, 7, 9, 2, 2), (2, 16, 7, 9, 0, 4),
               (2, 16, 7, 9, 2, 8)]  # fmt: skip


@pytest.mark.parametrize("n,cr,h,w,k,dilation", TAIL_SHAPES)
@pytest.mark.parametrize("convs", SPATIAL_CONVS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_ops_match_the_layers_in_float64(monkeypatch, n, cr, h, w, k, dilation, convs, channels_last):
    spatial_env(monkeypatch, convs)
    torch.manual_seed(0)
    seq = tail_layers(cr, k, dilation).double().train()
    y = torch.randn(n, cr, h, w, dtype=torch.float64, requires_grad=True)
    ds = torch.randn(n, h, w, dtype=torch.float64)
    want = seq(y)
    params = list(seq.parameters())
    want_grads = torch.autograd.grad(want, [y, *params], ds.view(n, 1, h, w))
    s, maps, stats, dy, grads = run_ops(seq, y.detach(), dilation, ds.float(), channels_last)
    assert len(maps) == 2 * k + 1 and stats.shape == (3, k + 1, cr)
    torch.testing.assert_close(s.double(), want.detach().view(n, h, w), rtol=1e-4, atol=1e-4)
    # The batch statistics: the first BatchNorm's are y's.
    torch.testing.assert_close(stats[0, 0].double(), y.detach().mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats[2, 0].double(), y.detach().var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)
    assert dy.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    scale = max(1.0, max(float(g.abs().max()) for g in want_grads))
    torch.testing.assert_close(dy.double(), want_grads[0], rtol=1e-4, atol=1e-5 * scale)
    # grads: (bn weight, bn bias, conv weight, conv bias) per dilated conv, then the last
    # BatchNorm's and the final conv's; the module's parameters in the same order.
    assert len(grads) == len(params)
    for i, (got, ref) in enumerate(zip(grads, want_grads[1:], strict=True)):
        torch.testing.assert_close(got.double().view_as(ref), ref, rtol=1e-4, atol=1e-5 * scale, msg=str(i))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "n,cr,h,w,dilation", [(2, 16, 11, 13, 4), (3, 32, 7, 9, 2), (2, 64, 5, 6, 1), (1, 16, 3, 4, 8)]
)
@pytest.mark.parametrize("ours", ["kernel", "winograd"])
def test_our_weight_gradient_in_every_instruction_set(monkeypatch, isa, n, cr, h, w, dilation, ours):
    # Our dilated convs (direct or Winograd), their input and weight gradients (16, 32 and 64
    # channels: the blockings of one, two and four input vectors), against the layers in float64.
    isa_env(monkeypatch, isa)
    spatial_env(monkeypatch, ours)
    torch.manual_seed(5)
    seq = tail_layers(cr, 2, dilation).double().train()
    y = torch.randn(n, cr, h, w, dtype=torch.float64, requires_grad=True)
    ds = torch.randn(n, h, w, dtype=torch.float64)
    want = seq(y)
    want_grads = torch.autograd.grad(want, [y, *seq.parameters()], ds.view(n, 1, h, w))
    s, _, _, dy, grads = run_ops(seq, y.detach(), dilation, ds.float(), True)
    scale = max(1.0, max(float(g.abs().max()) for g in want_grads))
    torch.testing.assert_close(dy.double(), want_grads[0], rtol=1e-4, atol=1e-5 * scale)
    for i, (got, ref) in enumerate(zip(grads, want_grads[1:], strict=True)):
        torch.testing.assert_close(got.double().view_as(ref), ref, rtol=1e-4, atol=1e-5 * scale, msg=str(i))


@pytest.mark.parametrize("convs", SPATIAL_CONVS)
def test_ops_do_not_depend_on_the_thread_count(monkeypatch, convs):
    spatial_env(monkeypatch, convs)
    torch.manual_seed(1)
    seq = tail_layers(16, 2, 4).train()
    y, ds = torch.randn(3, 16, 23, 29), torch.randn(3, 23, 29)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_ops(seq, y, 4, ds, False)
    finally:
        torch.set_num_threads(threads)
    many = run_ops(seq, y, 4, ds, False)
    *same_one, grads_one = one
    *same_many, grads_many = many
    for a, b in zip(same_one, same_many, strict=True):  # the map, maps, statistics, dy
        for ta, tb in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b], strict=True):
            assert torch.equal(ta, tb)
    for i, (ga, gb) in enumerate(zip(grads_one, grads_many, strict=True)):
        if convs == "library" and i % 4 in (2, 3) and i < 8:
            # oneDNN's conv weight and bias gradients: their sums follow its threads.
            torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-4)
        else:
            assert torch.equal(ga, gb), i


@pytest.mark.parametrize("frozen", [(1,), (0, 2), (0, 1, 2)])
@pytest.mark.parametrize("convs", SPATIAL_CONVS)
def test_ops_with_batchnorms_in_eval_mode_match_the_layers(monkeypatch, frozen, convs):
    # Frozen BatchNorms (fine-tuning) or a whole BAM in eval mode with gradients: running statistics.
    spatial_env(monkeypatch, convs)
    torch.manual_seed(6)
    seq = tail_layers(16, 2, 2).double().train()
    bns = [m for m in seq if isinstance(m, nn.BatchNorm2d)]
    for k in frozen:
        bns[k].running_mean.normal_(0, 0.5)
        bns[k].running_var.uniform_(0.5, 2.0)
        bns[k].eval()
    before = [(b.running_mean.clone(), b.running_var.clone()) for b in bns]
    n = 1 if len(frozen) == 3 else 2  # all frozen: one pixel per channel is fine (no batch statistics)
    h, w = (1, 1) if n == 1 else (7, 9)
    y = torch.randn(n, 16, h, w, dtype=torch.float64, requires_grad=True)
    ds = torch.randn(n, h, w, dtype=torch.float64)
    want = seq(y)
    want_grads = torch.autograd.grad(want, [y, *seq.parameters()], ds.view(n, 1, h, w))
    s, _, stats, dy, grads = run_ops(seq, y.detach(), 2, ds.float(), False)
    torch.testing.assert_close(s.double(), want.detach().view(n, h, w), rtol=1e-4, atol=1e-4)
    for k in frozen:
        torch.testing.assert_close(stats[0, k].double(), before[k][0], rtol=0, atol=1e-7)
    scale = max(1.0, max(float(g.abs().max()) for g in want_grads))
    torch.testing.assert_close(dy.double(), want_grads[0], rtol=1e-4, atol=1e-5 * scale)
    for i, (got, ref) in enumerate(zip(grads, want_grads[1:], strict=True)):
        torch.testing.assert_close(got.double().view_as(ref), ref, rtol=1e-4, atol=1e-5 * scale, msg=str(i))


def test_ops_without_affine_batchnorm():
    torch.manual_seed(2)
    seq = tail_layers(8, 2, 2, affine=False).double().train()
    y = torch.randn(2, 8, 9, 13, dtype=torch.float64, requires_grad=True)
    ds = torch.randn(2, 9, 13, dtype=torch.float64)
    want = seq(y)
    params = list(seq.parameters())
    want_grads = torch.autograd.grad(want, [y, *params], ds.view(2, 1, 9, 13))
    s, _, _, dy, grads = run_ops(seq, y.detach(), 2, ds.float(), False)
    torch.testing.assert_close(s.double(), want.detach().view(2, 9, 13), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dy.double(), want_grads[0], rtol=1e-4, atol=1e-5)
    # Without affine, the op still returns a (weight, bias) pair per BatchNorm (unused).
    convs = [g for i, g in enumerate(grads) if i % 4 in (2, 3)]
    for got, ref in zip(convs, want_grads[1:], strict=True):
        torch.testing.assert_close(got.double().view_as(ref), ref, rtol=1e-4, atol=1e-5)


NONE = [None] * 3  # batch statistics in all three BatchNorms


def test_ops_reject_bad_arguments():
    seq = tail_layers(4, 2, 2).train()
    bns, convs, bn_w, bn_b, conv_w = op_args(seq)
    fin_w, fin_b = convs[-1].weight.detach(), convs[-1].bias.detach()
    fwd, bwd = load_op("spatial_train"), load_op("spatial_train_backward")
    y = torch.randn(2, 4, 5, 6)
    biases = [c.bias.detach() for c in convs[:-1]]
    with pytest.raises(RuntimeError, match="y must be fp32"):
        fwd(y.double(), bn_w, bn_b, [1e-5] * 3, NONE, NONE, conv_w, biases, 2, fin_w, fin_b)
    with pytest.raises(RuntimeError, match="bn_weight and bn_bias need 3 entries"):
        fwd(y, bn_w[:2], bn_b, [1e-5] * 3, NONE, NONE, conv_w, biases, 2, fin_w, fin_b)
    with pytest.raises(RuntimeError, match="eps needs 3 entries"):
        fwd(y, bn_w, bn_b, [1e-5], NONE, NONE, conv_w, biases, 2, fin_w, fin_b)
    with pytest.raises(RuntimeError, match=r"conv_weight\[1\] must be fp32 \(4, 4, 3, 3\)"):
        fwd(y, bn_w, bn_b, [1e-5] * 3, NONE, NONE, [conv_w[0], conv_w[1][:, :3]], biases, 2, fin_w, fin_b)
    with pytest.raises(RuntimeError, match=r"bn_bias\[0\] must be fp32 with 4 elements"):
        fwd(y, bn_w, [torch.zeros(5), *bn_b[1:]], [1e-5] * 3, NONE, NONE, conv_w, biases, 2, fin_w, fin_b)
    with pytest.raises(RuntimeError, match="dilation must be >= 1"):
        fwd(y, bn_w, bn_b, [1e-5] * 3, NONE, NONE, conv_w, biases, 0, fin_w, fin_b)
    with pytest.raises(RuntimeError, match=r"running_mean\[1\] and running_var\[1\] must both be given"):
        fwd(y, bn_w, bn_b, [1e-5] * 3, [None, torch.zeros(4), None], NONE, conv_w, biases, 2, fin_w, fin_b)
    with pytest.raises(RuntimeError, match=r"running_mean\[0\] and running_var\[0\] must be fp32 with 4"):
        fwd(y, bn_w, bn_b, [1e-5] * 3, [torch.zeros(3), None, None], [torch.ones(3), None, None], conv_w, biases, 2,
            fin_w, fin_b)  # fmt: skip
    with pytest.raises(RuntimeError, match="more than one value per channel"):
        fwd(y[:1, :, :1, :1], bn_w, bn_b, [1e-5] * 3, NONE, NONE, conv_w, biases, 2, fin_w, fin_b)
    s, maps, stats = fwd(y, bn_w, bn_b, [1e-5] * 3, NONE, NONE, conv_w, biases, 2, fin_w, fin_b)
    ds = torch.randn(2, 5, 6)
    with pytest.raises(RuntimeError, match="maps must be spatial_train's 5 maps"):
        bwd(ds, y, maps[:4], stats, bn_w, bn_b, conv_w, 2, fin_w, [True] * 3, False)
    with pytest.raises(RuntimeError, match="maps must be spatial_train's"):
        bwd(ds, y, [m.contiguous() for m in maps], stats, bn_w, bn_b, conv_w, 2, fin_w, [True] * 3, False)
    with pytest.raises(RuntimeError, match="ds must be fp32 with N \\* H \\* W = 60"):
        bwd(ds[:1], y, maps, stats, bn_w, bn_b, conv_w, 2, fin_w, [True] * 3, False)
    with pytest.raises(RuntimeError, match="batch_stats needs 3 entries"):
        bwd(ds, y, maps, stats, bn_w, bn_b, conv_w, 2, fin_w, [True], False)
    with pytest.raises(RuntimeError, match="stats must be"):
        bwd(ds, y, maps, stats[:2], bn_w, bn_b, conv_w, 2, fin_w, [True] * 3, False)


def test_ops_opcheck():
    seq = tail_layers(4, 2, 2).train()
    bns, convs, bn_w, bn_b, conv_w = op_args(seq)
    fin_w, fin_b = convs[-1].weight.detach(), convs[-1].bias.detach()
    y = torch.randn(2, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    args = (
        y,
        bn_w,
        bn_b,
        [1e-5] * 3,
        [None, torch.zeros(4), None],
        [None, torch.ones(4), None],
        conv_w,
        [c.bias.detach() for c in convs[:-1]],
        2,
        fin_w,
        fin_b,
    )
    fwd, bwd = load_op("spatial_train"), load_op("spatial_train_backward")
    torch.library.opcheck(fwd.default, args)
    _, maps, stats = fwd(*args)
    for cl in (False, True):
        torch.library.opcheck(
            bwd.default, (torch.randn(2, 5, 6), y, maps, stats, bn_w, bn_b, conv_w, 2, fin_w, [True, False, True], cl)
        )


def count_tail_ops(monkeypatch):
    calls = []
    real = training.load_op
    monkeypatch.setattr(training, "load_op", lambda name: calls.append(name) or real(name))
    return calls


def assert_same_training(ref, fused, x, g, steps=2):
    """Both modules trained `steps` times on x: outputs, x's and the parameters' gradients, and the
    buffers (running statistics) match."""
    for _ in range(steps):
        for m in (ref, fused):
            m.zero_grad(set_to_none=True)
        out_r, out_f, xr, xf = run_both(ref, fused, x, g)
        torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5 * max(1.0, float(xr.grad.abs().max())))
        scale = max(1.0, max(float(p.grad.abs().max()) for p in ref.parameters()))
        for (name, pr), pf in zip(ref.named_parameters(), fused.parameters(), strict=True):
            # Biases before a BatchNorm in training mode: zero in theory, rounding noise in fact.
            atol = (1e-4 if name.endswith(BIASES_BEFORE_BATCHNORM) else 1e-5) * scale
            torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-4, atol=atol, msg=name)
        for (name, br), bf in zip(ref.named_buffers(), fused.buffers(), strict=True):
            torch.testing.assert_close(bf, br, msg=name)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("momentum", [0.1, None, 0.7])
def test_bam_training_runs_the_ops_and_matches_reference(monkeypatch, layout, momentum):
    calls = count_tail_ops(monkeypatch)
    ref, fused = make_pair(48, 8, 2, "sum")
    for m in (ref, fused):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = momentum  # None: the cumulative average over num_batches_tracked
    x = make_layout(torch.randn(3, 48, 9, 13), layout)
    assert_same_training(ref, fused, x, torch.randn(3, 48, 9, 13))
    assert calls.count("spatial_train") == 2 and calls.count("spatial_train_backward") == 2


def test_bam_training_with_batchnorm_without_running_stats_or_affine(monkeypatch):
    calls = count_tail_ops(monkeypatch)
    ref, fused = make_pair(48, 8, 2, "product")
    for m in (ref, fused):
        gs = m.spatial_att.gate_s
        gs.gate_s_bn_di_0 = nn.BatchNorm2d(6, track_running_stats=False)
        gs.gate_s_bn_di_1 = nn.BatchNorm2d(6, affine=False)
    x = torch.randn(2, 48, 7, 9)
    assert_same_training(ref, fused, x, torch.randn(2, 48, 7, 9))
    assert "spatial_train" in calls
    # In eval mode (gradients wanted) the BatchNorm without running statistics still normalises
    # with the batch's.
    calls.clear()
    assert_same_training(ref.eval(), fused.eval(), x, torch.randn(2, 48, 7, 9))
    assert "spatial_train" in calls


def test_bam_with_frozen_batchnorms_and_in_eval_mode_runs_the_ops(monkeypatch):
    calls = count_tail_ops(monkeypatch)
    ref, fused = make_pair(48, 8, 2, "sum")
    for m in (ref, fused):
        m.spatial_att.gate_s.gate_s_bn_di_1.eval()  # fine-tuning with frozen statistics
    x = torch.randn(2, 48, 7, 9)
    assert_same_training(ref, fused, x, torch.randn(2, 48, 7, 9))
    assert calls.count("spatial_train") == 2
    for m in (ref, fused):
        m.eval()  # gradients in eval mode (saliency, attacks, gradient checks): running statistics
    assert_same_training(ref, fused, x, torch.randn(2, 48, 7, 9), steps=1)
    assert calls.count("spatial_train") == 3
    # One pixel per channel: fine in eval mode.
    assert_same_training(ref, fused, x[:1, :, :1, :1], torch.randn(1, 48, 1, 1), steps=1)
    assert calls.count("spatial_train") == 4


def test_bam_training_with_convs_without_bias(monkeypatch):
    calls = count_tail_ops(monkeypatch)
    ref, fused = make_pair(48, 8, 4, "sum")
    di, fin = nn.Conv2d(6, 6, 3, padding=4, dilation=4, bias=False), nn.Conv2d(6, 1, 1, bias=False)
    for m in (ref, fused):
        m.spatial_att.gate_s.gate_s_conv_di_0 = copy.deepcopy(di)
        m.spatial_att.gate_s.gate_s_conv_final = copy.deepcopy(fin)
    x = torch.randn(2, 48, 9, 13)
    assert_same_training(ref, fused, x, torch.randn(2, 48, 9, 13))
    assert "spatial_train" in calls


def hook_bn(m):
    m.spatial_att.gate_s.gate_s_bn_di_0.register_forward_hook(lambda mod, i, o: HOOKED.append(mod))


def leaky(m):
    m.spatial_att.gate_s.gate_s_relu_di_0 = nn.LeakyReLU(0.1)


class MyBatchNorm(nn.BatchNorm2d):
    pass


def subclass(m):
    m.spatial_att.gate_s.gate_s_bn_reduce0 = MyBatchNorm(6)


def mixed_dilations(m):
    torch.manual_seed(4)  # the same weights in both modules
    m.spatial_att.gate_s.gate_s_conv_di_1 = nn.Conv2d(6, 6, 3, padding=1)  # the op takes one dilation


def final_3x3(m):
    torch.manual_seed(4)
    m.spatial_att.gate_s.gate_s_conv_final = nn.Conv2d(6, 1, 3, padding=1)  # the op's is 1x1


class DoubledConv(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


def final_subclass(m):
    torch.manual_seed(4)
    m.spatial_att.gate_s.gate_s_conv_final = DoubledConv(6, 1, 1)  # a forward of its own


HOOKED: list = []


@pytest.mark.parametrize(
    "change", [hook_bn, leaky, subclass, mixed_dilations, final_3x3, final_subclass], ids=lambda f: f.__name__
)
def test_bam_training_runs_the_layers_when_they_are_not_stock(monkeypatch, change):
    calls = count_tail_ops(monkeypatch)
    HOOKED.clear()
    ref, fused = make_pair(48, 8, 2, "sum")
    for m in (ref, fused):
        change(m)
    x = torch.randn(2, 48, 7, 9)
    assert_same_training(ref, fused, x, torch.randn(2, 48, 7, 9), steps=1)
    assert "spatial_train" not in calls
    if change is hook_bn:
        # A hooked layer: the branches run as modules (every layer's hooks fire), the pass too.
        assert len(HOOKED) == 2 and "reduce_pool" not in calls  # the reference's and ours
    else:
        assert "reduce_pool" in calls


def test_bam_training_with_a_padded_final_conv_raises_as_the_reference():
    """A 1x1 final conv with padding makes a larger map: an error, not the op's 1x1 conv."""
    for m in make_pair(48, 8, 2, "sum"):
        m.spatial_att.gate_s.gate_s_conv_final = nn.Conv2d(6, 1, 1, padding=1)
        with pytest.raises(RuntimeError, match="is invalid for input of size 198"):
            m(torch.randn(2, 48, 7, 9, requires_grad=True))


def test_bam_training_runs_the_layers_under_global_hooks_and_autocast(monkeypatch):
    calls = count_tail_ops(monkeypatch)
    _, fused = make_pair(48, 8, 2, "sum")
    x = torch.randn(2, 48, 7, 9, requires_grad=True)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda mod, i, o: seen.append(type(mod)))
    try:
        fused(x).sum().backward()
    finally:
        handle.remove()
    assert nn.BatchNorm2d in seen and "spatial_train" not in calls
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused(x).sum().backward()
    assert "spatial_train" not in calls
    fused(x).sum().backward()
    assert "spatial_train" in calls


def test_bam_training_on_one_pixel_raises_batchnorms_error():
    _, fused = make_pair(48, 8, 2, "sum")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(torch.randn(1, 48, 1, 1, requires_grad=True))


def test_bam_training_refuses_weights_changed_before_backward():
    _, fused = make_pair(48, 8, 2, "sum")
    x = torch.randn(2, 48, 7, 9, requires_grad=True)
    out = fused(x)
    with torch.no_grad():
        fused.spatial_att.gate_s.gate_s_conv_di_1.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
