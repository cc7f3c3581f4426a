"""BAM with autograd under torch.compile on the CPU (ops/training_compiled.py): the pass over x
and the stock spatial layers as custom ops with their own autograd, traced into one graph. Against
the reference (outputs, gradients, running statistics over two steps), with the graph checked for
the ops, and the cases where the layers must run as modules instead."""

import pytest
import test_training_tail
import torch
from helpers import make_layout
from test_training_cpu import make_pair, run_both
from test_training_tail import assert_same_training, hook_bn, leaky
from torch import nn

from bam_fused.ops import training_compiled

PASS_OP, TAIL_OP = "bam_fused.reduce_pool_train.default", "bam_fused.spatial_train.default"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # every test compiles BAM.forward anew (the recompile limit is per code object)
    yield
    torch._dynamo.reset()


def compiled(module, backend="aot_eager", **kwargs):
    """torch.compile(module, fullgraph=True) through `backend`, and the set of ops its graphs call."""
    seen = set()

    def recording(gm, example_inputs):
        seen.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return torch._dynamo.backends.registry.lookup_backend(backend)(gm, example_inputs)

    return torch.compile(module, fullgraph=True, backend=recording, **kwargs), seen


def set_momentum(modules, momentum):
    for m in modules:
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = momentum  # None: the cumulative average over num_batches_tracked


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_compiled_training_runs_the_ops_and_matches_reference(layout, combine, momentum):
    ref, fused = make_pair(48, 8, 2, combine)
    set_momentum((ref, fused), momentum)
    model, seen = compiled(fused)
    x = make_layout(torch.randn(3, 48, 9, 13), layout)
    assert_same_training(ref, model, x, torch.randn(3, 48, 9, 13))
    assert {PASS_OP, TAIL_OP} <= seen, seen


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_compiled_training_with_inductor_keeps_the_gradient_layout(layout):
    # Inductor lays out what it computes as it likes: x's gradient must still come back in x's
    # layout (with the module path it came back channels_last for NCHW x, and accumulating it into
    # x.grad took 5 ms at 56x56).
    ref, fused = make_pair(48, 8, 2, "sum")
    model, seen = compiled(fused, backend="inductor")
    x = make_layout(torch.randn(3, 48, 9, 13), layout)
    assert_same_training(ref, model, x, torch.randn(3, 48, 9, 13))
    assert {PASS_OP, TAIL_OP} <= seen, seen
    xg = x.clone().requires_grad_()
    model(xg).sum().backward()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert xg.grad.is_contiguous(memory_format=fmt)


def test_compiled_frozen_batchnorm_and_eval_mode_with_gradients():
    ref, fused = make_pair(48, 8, 2, "sum")
    for m in (ref, fused):
        m.spatial_att.gate_s.gate_s_bn_di_1.eval()
    model, seen = compiled(fused)
    x = torch.randn(2, 48, 7, 9)
    assert_same_training(ref, model, x, torch.randn(2, 48, 7, 9))
    for m in (ref, fused):
        m.eval()
    assert_same_training(ref, model, x, torch.randn(2, 48, 7, 9), steps=1)
    assert {PASS_OP, TAIL_OP} <= seen, seen


def test_compiled_training_without_affine_running_stats_or_biases():
    # Missing weights and biases go to the op as ones and zeros: the same values, no gradient kept.
    ref, fused = make_pair(48, 8, 2, "product")
    for m in (ref, fused):
        gs = m.spatial_att.gate_s
        gs.gate_s_bn_di_0 = nn.BatchNorm2d(6, track_running_stats=False)
        gs.gate_s_bn_di_1 = nn.BatchNorm2d(6, affine=False)
        torch.manual_seed(5)
        gs.gate_s_conv_di_0 = nn.Conv2d(6, 6, 3, padding=2, dilation=2, bias=False)
        gs.gate_s_conv_final = nn.Conv2d(6, 1, 1, bias=False)
    model, seen = compiled(fused)
    x = torch.randn(2, 48, 7, 9)
    assert_same_training(ref, model, x, torch.randn(2, 48, 7, 9))
    assert {PASS_OP, TAIL_OP} <= seen, seen


def test_compiled_training_with_dynamic_shapes():
    ref, fused = make_pair(48, 8, 2, "sum")
    set_momentum((ref, fused), None)
    model, seen = compiled(fused, dynamic=True)
    for n, h, w in ((2, 7, 9), (3, 9, 13)):
        assert_same_training(ref, model, torch.randn(n, 48, h, w), torch.randn(n, 48, h, w), steps=1)
    assert {PASS_OP, TAIL_OP} <= seen, seen


@pytest.mark.parametrize("change", [hook_bn, leaky], ids=lambda f: f.__name__)
def test_compiled_training_runs_the_layers_when_they_are_not_stock(change):
    test_training_tail.HOOKED.clear()
    ref, fused = make_pair(48, 8, 2, "sum")
    for m in (ref, fused):
        change(m)
    model, seen = compiled(fused)
    x = torch.randn(2, 48, 7, 9)
    assert_same_training(ref, model, x, torch.randn(2, 48, 7, 9))
    assert PASS_OP in seen and TAIL_OP not in seen, seen
    if change is hook_bn:
        assert len(test_training_tail.HOOKED) == 4  # two steps, the reference's and ours


def test_compiled_training_in_bf16_runs_the_layers():
    ref, fused = make_pair(48, 8, 2, "sum", torch.bfloat16)
    model, seen = compiled(fused)
    x = torch.randn(2, 48, 9, 13).bfloat16()
    out_r, out_f = ref(x), model(x)
    assert out_f.dtype == torch.bfloat16
    torch.testing.assert_close(out_f.float(), out_r.float(), rtol=2e-2, atol=2e-2)
    assert PASS_OP in seen and TAIL_OP not in seen, seen


def test_compiled_training_ops_opcheck():
    x = torch.randn(2, 12, 5, 6)
    w, b = torch.randn(4, 12), torch.randn(4)
    # Not test_aot_dispatch_*: they compare every output, and the third is never initialised (a
    # token for the gradient); the module tests above compile and compare what the op computes.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    c, s = torch.randn(2, 12, requires_grad=True), torch.randn(2, 30, requires_grad=True)
    dy, dmean = torch.randn(2, 4, 5, 6), torch.randn(2, 12)
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        args = (xx.detach().requires_grad_(), w.requires_grad_(), b)
        torch.library.opcheck(training_compiled._reduce_pool, args, test_utils=utils)
        token = torch.randn_like(xx).requires_grad_()
        torch.library.opcheck(training_compiled._gate, (xx.detach().requires_grad_(), token, c, s, True))
        dy_x = dy.contiguous(memory_format=torch.channels_last) if xx is not x else dy
        for dx in (torch.randn_like(xx), None):  # dx mutated in place (declared), or not wanted
            torch.library.opcheck(training_compiled._reduce_pool_backward, (xx.detach(), dy_x, dmean, w.detach(), dx))
    y = torch.randn(2, 4, 5, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    bn_w = [torch.rand(4, requires_grad=True) + 0.5 for _ in range(3)]
    bn_b = [torch.randn(4, requires_grad=True) for _ in range(3)]
    conv_w = [torch.randn(4, 4, 3, 3, requires_grad=True) for _ in range(2)]
    conv_b = [torch.randn(4, requires_grad=True), torch.zeros(4)]
    fin_w, fin_b = torch.randn(1, 4, 1, 1, requires_grad=True), torch.randn(1, requires_grad=True)
    for cl in (False, True):
        args = (y, bn_w, bn_b, [1e-5] * 3, [None, torch.zeros(4), None], [None, torch.ones(4), None],
                conv_w, conv_b, 2, fin_w, fin_b, cl)  # fmt: skip
        torch.library.opcheck(training_compiled._spatial_train, args)


def test_compiled_training_with_partial_requirements():
    # (retain_graph is not tested: torch.compile refuses it after a first backward without it,
    # for the reference as well: "donated buffers".)
    ref, fused = make_pair(48, 8, 4, "sum")
    model, seen = compiled(fused)
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
    assert {PASS_OP, TAIL_OP} <= seen, seen
