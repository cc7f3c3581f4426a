"""torch.func transforms, forward-mode AD, torch.jit.trace, torch.fx symbolic tracing, ONNX export and
autocast.

The fused kernels have hand-written first derivatives and no batching or forward-mode rules, so
under these transforms the module and bam_gate run the reference ("auto", one warning) or raise
(an explicit backend); the C++ ops themselves refuse autograd they cannot give instead of
dropping it, and run with autocast off."""

import copy
import io
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import DEVICES
from helpers import assert_same_forward_backward

import bam_fused
from bam_fused import _backends, reference
from bam_fused.ops import bam_branches, bam_gate
from bam_fused.ops.branches import load_op
from bam_fused.testing import randomize_

# torch.jit is deprecated in this torch, and tracing our shape checks warns as it does for torch's.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(_backends, "_warned", set())


def _pair(device="cpu", training=False, c=37):
    ref = randomize_(reference.BAM(c, reduction_ratio=8, dilation=2)).to(device).train(training)
    fused = bam_fused.convert(copy.deepcopy(ref)).train(training)
    return ref, fused


def _x(device="cpu", n=3, c=37):
    return torch.randn(n, c, 7, 9, device=device)


def _quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args)


# -- torch.func --------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_mode", [False, True])
def test_vmap_eval_matches_reference(device, grad_mode):
    ref, fused = _pair(device)
    x = _x(device)

    def per_sample(m):
        return torch.vmap(lambda t: m(t.unsqueeze(0)).squeeze(0))

    with torch.set_grad_enabled(grad_mode):
        with pytest.warns(RuntimeWarning, match="using the reference: a torch.func transform is active"):
            out = per_sample(fused)(x)
        expected = per_sample(ref)(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        # Outside the transform the fused path runs again: same values up to rounding.
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)


def test_func_grad_and_per_sample_grads_match_reference():
    ref, fused = _pair()
    x = _x()
    dx = _quiet(torch.func.grad(lambda t: fused(t).square().sum()), x)
    torch.testing.assert_close(dx, torch.func.grad(lambda t: ref(t).square().sum())(x), rtol=0, atol=0)

    # Per-sample parameter gradients (as DP-SGD computes them): vmap over grad over functional_call.
    def per_sample_grads(m):
        params = {k: v.detach() for k, v in m.named_parameters()}
        buffers = {k: v.detach() for k, v in m.named_buffers()}

        def loss(p, t):
            return torch.func.functional_call(m, (p, buffers), (t.unsqueeze(0),)).square().sum()

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)

    got, want = _quiet(per_sample_grads, fused), per_sample_grads(ref)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_func_jvp_eval_matches_reference():
    ref, fused = _pair()
    x, t = _x(), _x()
    _, tangent = _quiet(torch.func.jvp, fused, (x,), (t,))
    torch.testing.assert_close(tangent, torch.func.jvp(ref, (x,), (t,))[1], rtol=0, atol=0)


# -- forward-mode AD ---------------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("grad_mode", [False, True])
def test_forward_ad_matches_reference(training, grad_mode):
    """Eval mode under no_grad used to run the C++ eval op, which dropped the tangent silently."""
    ref, fused = _pair(training=training)
    x, t = _x(), _x()

    def tangent(m):
        with torch.set_grad_enabled(grad_mode), fwAD.dual_level():
            return fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent

    with pytest.warns(RuntimeWarning, match="forward-mode AD is active"):
        got = tangent(fused)
    assert got is not None
    torch.testing.assert_close(got, tangent(ref), rtol=0, atol=0)


# -- explicit backends raise, bam_gate falls back ----------------------------------------------
def test_explicit_backend_raises_under_transforms():
    _, fused = _pair()
    fused.backend = "fused"
    x = _x()
    with pytest.raises(_backends.BackendUnavailable, match="backend='cpp' cannot run: a torch.func transform"):
        torch.vmap(fused)(x.unsqueeze(1))
    c, s = torch.randn(3, 37), torch.randn(3, 7, 9)
    with pytest.raises(_backends.BackendUnavailable, match="backend='cpp' cannot run: forward-mode AD"):
        with fwAD.dual_level():
            bam_gate(fwAD.make_dual(x, torch.ones_like(x)), c, s, backend="cpp")
    with pytest.raises(_backends.BackendUnavailable, match="backend='cpp' cannot run: torch.jit.trace"):
        torch.jit.trace(lambda t: bam_gate(t, c, s, backend="cpp"), (x,), check_trace=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("combine", ["sum", "product"])
def test_gate_under_transforms_matches_reference(device, combine):
    x, c, s = _x(device), torch.randn(3, 37, device=device), torch.randn(3, 7, 9, device=device)
    tx = torch.randn_like(x)

    def gate(t, cc, ss):
        return bam_gate(t, cc, ss, combine)

    def ref(t, cc, ss):
        return reference.bam_gate_reference(t, cc.view(*cc.shape, 1, 1), ss.unsqueeze(-3), combine)

    def one(fn):
        return lambda t, cc, ss: fn(t[None], cc[None], ss[None])[0]

    for transform in (
        lambda fn: torch.vmap(one(fn))(x, c, s),
        lambda fn: torch.func.grad(lambda t: fn(t, c, s).square().sum())(x),
        lambda fn: torch.func.jacrev(lambda cc: fn(x, cc, s).sum(dim=(2, 3)))(c),
        lambda fn: torch.func.jvp(lambda t: fn(t, c, s), (x,), (tx,))[1],
    ):
        torch.testing.assert_close(_quiet(transform, gate), transform(ref), rtol=0, atol=0)


# -- the C++ ops refuse autograd they do not have ----------------------------------------------
def _eval_op_weights(fused):
    """bam_eval's arguments after x."""
    f = fused.folded()
    return (f["red_w"], f["red_b"], f["dil_w"], f["dil_b"], fused.dilation, f["fin_w"], f["fin_b"],
            f["fc0_w"], f["fc0_b"], f["fc1_w"], f["fc1_b"], False)  # fmt: skip


def test_cpp_op_backward_raises_instead_of_empty_gradients():
    _, fused = _pair()
    with torch.no_grad():
        args = _eval_op_weights(fused)
    x = _x().requires_grad_()
    out = load_op("bam_eval")(x, *args)
    with pytest.raises(RuntimeError, match="derivative for bam_fused_C::bam_eval is not implemented"):
        out.sum().backward()


def _branches(fused, x):
    f = fused.folded()
    return bam_branches(x, f["red_w"], f["red_b"], f["dil_w"], f["dil_b"], fused.dilation, f["fin_w"], f["fin_b"])


def test_bam_branches_backward_raises():
    _, fused = _pair()
    mean, spatial = _branches(fused, _x().requires_grad_())
    with pytest.raises(RuntimeError, match="derivative for bam_fused_C::branches is not implemented"):
        (mean.sum() + spatial.sum()).backward()


def test_cpp_op_forward_ad_raises_instead_of_dropping_the_tangent():
    _, fused = _pair()
    with torch.no_grad():
        args = _eval_op_weights(fused)
        match = "forward AD with bam_fused_C::bam_eval that does not support it"
        with fwAD.dual_level(), pytest.raises(RuntimeError, match=match):
            load_op("bam_eval")(fwAD.make_dual(_x(), _x()), *args)


def test_cpp_ops_have_the_not_implemented_autograd_kernel():
    load_op()
    for op in ("gate_forward", "gate_backward", "branches", "attention", "attention_tail", "bam_eval",
               "reduce_pool", "reduce_pool_backward", "spatial_train", "spatial_train_backward"):  # fmt: skip
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bam_fused_C::{op}", "Autograd"), op


# -- torch.jit.trace ---------------------------------------------------------------------------
def _traced_ops(traced) -> set[str]:
    return {node.kind() for node in traced.inlined_graph.nodes()}


def _round_trip(traced):
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    return torch.jit.load(buf)


@pytest.mark.parametrize("warm", [True, False], ids=["after an eager call", "first"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_trace_eval_no_grad_records_the_cpu_op_and_the_fold(layout, warm):
    ref, fused = _pair()
    x = _x().contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    with torch.no_grad():
        if warm:
            fused(x)  # a cached fold must not end up in the trace as constants
        traced = torch.jit.trace(fused, (x,), check_trace=False)
        assert "bam_fused_C::bam_eval" in _traced_ops(traced)
        loaded = _round_trip(traced)
        torch.testing.assert_close(loaded(x), fused(x), rtol=0, atol=0)
        # New weights reach the traced module's fold.
        other = randomize_(copy.deepcopy(ref))
        loaded.load_state_dict(other.state_dict())
        torch.testing.assert_close(loaded(x), other(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [False, True])
def test_trace_with_autograd_records_the_reference(device, training):
    ref, fused = _pair(device, training)
    x = _x(device)
    with pytest.warns(RuntimeWarning, match="using the reference: torch.jit.trace"):
        traced = torch.jit.trace(fused, (x,), check_trace=False)
    assert not any(op.startswith(("bam_fused", "prim::PythonOp")) for op in _traced_ops(traced))
    loaded = _round_trip(traced)  # a trace keeps the mode it was made in: BatchNorm's statistics
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref(x), rtol=0, atol=0)


@pytest.mark.cuda
def test_trace_eval_no_grad_on_cuda_records_no_triton_launch():
    """On CUDA the eval path launches Triton kernels, which a trace would bake in as constants."""
    ref, fused = _pair("cuda")
    x = _x("cuda")
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="torch.jit.trace"):
        traced = torch.jit.trace(fused, (x,), check_trace=False)
        x2 = _x("cuda")
        torch.testing.assert_close(traced(x2), ref(x2), rtol=0, atol=0)


# -- autocast ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial", ["kernel", "library"])
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_eval_op_under_autocast_computes_in_x_dtype(monkeypatch, device, spatial, autocast_dtype):
    """The ops call library ops inside (linear for the MLP, conv2d for oneDNN's dilated convs),
    which autocast would lower: a bf16 channel map then reached the gate and the eval forward
    raised. They run with autocast off, as in x's dtype."""
    monkeypatch.setenv("BAM_FUSED_CPU_SPATIAL", spatial)
    ref, fused = _pair(device, c=64)
    fused.eval()
    x = _x(device, c=64)
    with torch.no_grad():
        expected = fused(x)
        with torch.autocast(device, dtype=autocast_dtype):
            out = fused(x)
            branches = _branches(fused, x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        for got, want in zip(branches, _branches(fused, x), strict=True):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=0, atol=0)


# -- torch.fx symbolic tracing: a graph of Proxies, which can hold the reference's ops only ------
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("training", [False, True])
def test_fx_symbolic_trace_records_the_reference(backend, training):
    """Before 2026-11-26 both modules raised "x must be a torch.Tensor, got Proxy"."""
    ref, fused = _pair(training=training)
    fused.backend = backend
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphs = [torch.fx.symbolic_trace(m) for m in (ref, fused)]
    said = [str(w.message) for w in caught if "torch.fx" in str(w.message)]
    assert len(said) == (backend == "auto"), said
    for gm in graphs:
        assert not any("bam_fused" in str(node.target) for node in gm.graph.nodes)
        assert_same_forward_backward(ref, gm, _x())


class Gated(torch.nn.Module):
    """bam_gate inside a user's module (what a tracer or exporter sees)."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def forward(self, x, c, s):
        return bam_gate(x, c, s, "product", backend=self.backend)


def test_fx_symbolic_trace_of_bam_gate_and_explicit_backends():
    x, c, s = _x(), torch.randn(3, 37, dtype=torch.float64), torch.randn(3, 1, 7, 9)
    gm = torch.fx.symbolic_trace(Gated("auto"))
    torch.testing.assert_close(gm(x, c, s), reference.bam_gate_reference(x, c.float(), s, "product"))
    with pytest.raises(_backends.BackendUnavailable, match="backend='cpp' cannot run: torch.fx"):
        torch.fx.symbolic_trace(Gated("cpp"))
    with pytest.raises(_backends.BackendUnavailable, match="backend='fused' cannot run: torch.fx"):
        torch.fx.symbolic_trace(bam_fused.BAM(37, 8, backend="fused"))


def test_torchvision_feature_extractor_on_a_bam_resnet():
    from torchvision.models.feature_extraction import create_feature_extractor

    from bam_fused.models import resnet18_bam

    model = randomize_(resnet18_bam(num_classes=10)).eval()
    seen = []
    handle = model.layer2.bam.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
    handle.remove()
    extractor = create_feature_extractor(model, return_nodes={"layer2.bam": "bam2"})
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)["bam2"], seen[0], rtol=1e-5, atol=1e-5)


# -- ONNX export: ONNX has no bam_fused ops, so the graph holds the reference's ------------------
def _onnx_bytes(model, args, dynamo):
    if dynamo:
        return torch.onnx.export(model, args, dynamo=True).model_proto.SerializeToString()
    f = io.BytesIO()
    torch.onnx.export(model, args, f, dynamo=False)
    return f.getvalue()


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_of_a_bam_resnet_runs_in_onnxruntime(dynamo):
    """Before 2026-11-26 both exporters failed on bam_fused_C::bam_eval ("unrecognized namespace",
    "missing ONNX function")."""
    ort = pytest.importorskip("onnxruntime")
    from bam_fused.models import resnet18_bam

    model = randomize_(resnet18_bam(num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = ort.InferenceSession(_onnx_bytes(model, (x,), dynamo))
        want = model(x)
    assert any("torch.onnx.export runs" in str(w.message) for w in caught) != dynamo  # (none while Dynamo traces)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


def test_onnx_export_of_bam_gate_and_explicit_backends():
    ort = pytest.importorskip("onnxruntime")

    args = (_x(), torch.randn(3, 37), torch.randn(3, 1, 7, 9))
    session = ort.InferenceSession(_onnx_bytes(Gated("auto"), args, dynamo=False))
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(names, (a.numpy() for a in args), strict=True)))[0]
    torch.testing.assert_close(torch.from_numpy(got), reference.bam_gate_reference(*args, "product"))
    with pytest.raises(_backends.BackendUnavailable, match="backend='cpp' cannot run: torch.onnx.export"):
        _onnx_bytes(Gated("cpp"), args, dynamo=False)
