"""BAM with autograd under torch.compile on the CPU (ops/training_compiled.py): the pass over x
and the stock spatial layers as custom ops with their own autograd, traced into one graph. Against
the reference (outputs, gradients, running statistics over two steps), with the graph checked for
the ops, and the cases where the layers must run as modules instead."""

import copy

import pytest
import test_training_tail
import torch
import torch._functorch.config
import torch._inductor.config
from helpers import make_layout, record_channels_last
from test_training_cpu import assert_partial_requirements, make_pair
from test_training_tail import assert_same_training, hook_bn, leaky
from torch import nn

from bam_fused.ops import training_compiled
from bam_fused.testing import compare

PASS_OP, TAIL_OP = "bam_fused.reduce_pool_train.default", "bam_fused.spatial_train.default"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # every test compiles BAM.forward anew (the recompile limit is per code object)
    # Inductor's on-disk caches would serve graphs compiled before an op's tags changed.
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


def compiled(module, backend="aot_eager", **kwargs):
    """torch.compile(module, fullgraph=True) through `backend`, and the set of ops its graphs call."""
    seen = set()

    def recording(gm, example_inputs):
        # (subgraphs too: a checkpointed region is a higher-order op's GraphModule)
        graphs = [m.graph for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]
        seen.update(str(node.target) for graph in graphs for node in graph.nodes if node.op == "call_function")
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


class Checkpointed(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)


def test_compiled_training_under_activation_checkpointing():
    # torch.compile of a checkpointed region recomputes inside its graphs (the running
    # statistics move once): the ops there too, and the same as the compiled reference.
    ref, fused = make_pair(48, 8, 2, "sum")
    model, seen = compiled(Checkpointed(fused))
    ref_model, _ = compiled(Checkpointed(ref))
    assert_same_training(ref_model, model, torch.randn(3, 48, 9, 13), torch.randn(3, 48, 9, 13))
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
    assert TAIL_OP not in seen, seen
    if change is hook_bn:
        assert len(test_training_tail.HOOKED) == 4  # two steps, the reference's and ours
        assert PASS_OP not in seen, seen  # a hooked layer: the branches run as modules
    else:
        assert PASS_OP in seen, seen


def test_compiled_training_in_bf16_runs_the_layers():
    ref, fused = make_pair(48, 8, 2, "sum", torch.bfloat16)
    model, seen = compiled(fused)
    x = torch.randn(2, 48, 9, 13).bfloat16()
    out_r, out_f = ref(x), model(x)
    assert out_f.dtype == torch.bfloat16
    torch.testing.assert_close(out_f.float(), out_r.float(), rtol=2e-2, atol=2e-2)
    assert PASS_OP in seen and TAIL_OP not in seen, seen


def test_compiled_training_ops_opcheck_and_any_layout():
    ops = training_compiled.FLEXIBLE
    x = torch.randn(2, 12, 5, 6)
    w, b = torch.randn(4, 12), torch.randn(4)
    # Not test_aot_dispatch_*: they compare every output, and the third is never initialised (a
    # token for the gradient); the module tests above compile and compare what the op computes.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    c, s = torch.randn(2, 12, requires_grad=True), torch.randn(2, 30, requires_grad=True)
    dy, dmean, grad = torch.randn(2, 4, 5, 6), torch.randn(2, 12), torch.randn(2, 12, 5, 6)
    cl = torch.channels_last
    gate_dx, want_dc, want_ds = ops.gate_backward(grad, x, c.detach(), s.detach(), True)
    want_dx = gate_dx.clone()
    want_dw, want_db = ops.reduce_pool_backward(x, dy, dmean, w.detach(), want_dx)  # adds into want_dx
    for xx in (x, x.contiguous(memory_format=cl)):
        args = (xx.detach().requires_grad_(), w.requires_grad_(), b)
        torch.library.opcheck(ops.reduce_pool, args, test_utils=utils)
        token = torch.randn_like(xx).requires_grad_()
        torch.library.opcheck(ops.gate, (xx.detach().requires_grad_(), token, c, s, True))
        for dx in (torch.randn_like(xx), None):  # dx mutated in place (declared), or not wanted
            torch.library.opcheck(ops.reduce_pool_backward, (xx.detach(), dy, dmean, w.detach(), dx))
        # grad, dy and dx in either layout, whatever x's (Inductor may hand them so): same values.
        for other in (torch.contiguous_format, cl):
            dx, dc, ds = ops.gate_backward(grad.contiguous(memory_format=other), xx, c.detach(), s.detach(), True)
            assert dx.is_contiguous(memory_format=training_compiled.memory_format(xx))
            torch.testing.assert_close((dx, dc, ds), (gate_dx, want_dc, want_ds))
            dx = dx.contiguous(memory_format=other)
            dw, db = ops.reduce_pool_backward(xx, dy.contiguous(memory_format=other), dmean, w.detach(), dx)
            torch.testing.assert_close((dx, dw, db), (want_dx, want_dw, want_db))
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
    assert_partial_requirements(ref, fused, model)
    assert {PASS_OP, TAIL_OP} <= seen, seen


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_compiled_model_with_inductor_layouts_matches_reference(monkeypatch, layout):
    # Inside a model, Inductor lays activations out channels_last around convolutions: the ops
    # take x as it comes (flexible_layout), with no copy back to NCHW, and must give the same
    # results in either layout.
    layouts = record_channels_last(monkeypatch, training_compiled, "reduce_pool")

    def model(bam):
        torch.manual_seed(1)
        layers = [nn.Conv2d(48, 48, 1), nn.BatchNorm2d(48), nn.ReLU(), bam, nn.Conv2d(48, 48, 1)]
        return nn.Sequential(*layers)

    ref, fused = make_pair(48, 8, 2, "sum")
    m_ref, m_fused = model(ref), model(fused)
    compiled_model, seen = compiled(m_fused, backend="inductor")
    x = make_layout(torch.randn(3, 48, 9, 13), layout)
    for _ in range(2):
        for m in (m_ref, m_fused):
            m.zero_grad(set_to_none=True)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn(3, 48, 9, 13)
        out_r, out_f = m_ref(xr), compiled_model(xf)
        out_r.backward(g)
        out_f.backward(g)
        torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5 * max(1.0, float(xr.grad.abs().max())))
        scale = max(1.0, max(float(p.grad.abs().max()) for p in m_ref.parameters()))
        for (name, pr), pf in zip(m_ref.named_parameters(), m_fused.parameters(), strict=True):
            if name.endswith(("reduce0.bias", "conv_di_0.bias", "conv_di_1.bias", "fc_0.bias")):
                continue  # zero in theory (a BatchNorm follows)
            torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
        for (name, br), bf in zip(m_ref.named_buffers(), m_fused.buffers(), strict=True):
            torch.testing.assert_close(bf, br, msg=name)
    assert {PASS_OP, TAIL_OP} <= seen, seen
    assert layouts and all(layouts), "x did not reach the pass in Inductor's channels_last layout"


def _bf16_model(bam):
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(48, 48, 1), nn.BatchNorm2d(48), nn.ReLU(), bam, nn.Conv2d(48, 48, 1)).bfloat16()


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_bf16_training_in_a_model(monkeypatch, dynamic):
    """The module's own spatial layers (bf16) take the flexible ops too: x reaches the pass as
    Inductor lays it out, channels_last, for NCHW input (a fixed-layout set had copied it to NCHW
    and back). Against float64 over changing shapes, dynamic ones included."""
    layouts = record_channels_last(monkeypatch, training_compiled, "reduce_pool")
    ref, fused = make_pair(48, 8, 2, "sum", torch.bfloat16)
    eager, ours = _bf16_model(ref), _bf16_model(fused)
    compiled_model = torch.compile(ours, fullgraph=True, dynamic=dynamic)
    for n, h, w in ((2, 7, 9), (3, 9, 13)):
        x = torch.randn(n, 48, h, w).bfloat16()
        xe, xo, x64 = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
        g = torch.randn(n, 48, h, w).bfloat16()
        outs = [m(t) for m, t in ((eager, xe), (compiled_model, xo), (copy.deepcopy(eager).double(), x64))]
        for out, grad in zip(outs, (g, g, g.double()), strict=True):
            out.backward(grad)
        for got, truth, bf16 in ((outs[1], outs[2], outs[0]), (xo.grad, x64.grad, xe.grad)):
            result = compare(got, truth, bf16)
            assert result.passed, result
    assert layouts and all(layouts), "x did not reach the pass in Inductor's channels_last layout"
