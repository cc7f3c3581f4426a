"""BAM.forward's short path for a repeated eager eval call (BAM._eval_again): taken when nothing
has changed since the full routing chose the eval call, and stepped aside from on every change
that routing would see. Each test runs both calls the routing can choose: the CPU's eval op, and
CUDA's (attention_cuda.eval_forward: the attention maps, then the Triton gate) pointed at CPU
tensors, which the Triton interpreter runs; tests/test_cuda.py runs the latter on a GPU."""

import copy
import pickle

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from helpers import make_layout
from test_branches import make_pair
from torch.utils._python_dispatch import TorchDispatchMode

import bam_fused
from bam_fused import _backends, modules
from bam_fused.ops import attention_cuda
from bam_fused.ops.branches import load_op
from bam_fused.ops.gate import memory_format

pytestmark = pytest.mark.skipif(bam_fused._ext.reason() is not None, reason="needs the extension")


def _interpreted_triton_route(x, impl):
    """modules._triton_eval_route as on CUDA, for CPU tensors: eager calls whose gate is fused."""
    return impl != "reference" and not (
        torch.compiler.is_compiling() or _backends.dispatch_mode() or torch.jit.is_tracing()
    )


@pytest.fixture(params=["op", "triton"])
def route(request, monkeypatch):
    """The eval call the routing chooses: "op", the CPU's eval op; "triton", CUDA's
    attention_cuda.eval_forward on CPU tensors. Returns (the name, eval_forward's calls)."""
    calls = []
    monkeypatch.setattr(_backends, "_warned", set())  # (a test may expect a once-only warning)
    if request.param == "triton":
        if not _backends.triton_interpreted():
            pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1 before import)")
        run = attention_cuda.eval_forward

        def counted(*args):
            calls.append(1)
            return run(*args)

        monkeypatch.setattr(attention_cuda, "eval_forward", counted)
        monkeypatch.setattr(modules, "_triton_eval_route", _interpreted_triton_route)
    return request.param, calls


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [0, 1, 3])
@pytest.mark.parametrize("combine", ["sum", "product"])
def test_repeated_calls_take_the_short_path_with_the_same_bits(routed, route, layout, dtype, n, combine):
    ref, fused = make_pair(37, 2, 8, combine, backend="fused")
    fused.to(dtype)
    x = make_layout(torch.randn(n, 37, 7, 9).to(dtype), layout)
    with torch.inference_mode():
        first = fused(x)
        assert len(routed) == 1 and fused._fold_state.call is not None
        again = fused(x)
        other = fused(make_layout(torch.randn(n, 37, 5, 4).to(dtype), layout))  # any H, W, N take it too
        want = ref.to(dtype).double()(x.double())  # (the weights rounded as the fused module's)
    assert len(routed) == 1
    assert route[1] == ([1, 1, 1] if route[0] == "triton" else [])
    assert torch.equal(first, again) and again.stride() == first.stride() and other.shape == (n, 37, 5, 4)
    assert first.dtype == dtype and first.is_contiguous(memory_format=memory_format(x))
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(first.double(), want, rtol=tol, atol=tol)


def _hook_fires(fused, ref, x, routed):
    seen = []
    fused.spatial_att.gate_s.gate_s_conv_final.register_forward_hook(lambda *_: seen.append(1))
    out = fused(x)
    assert seen == [1]
    return out, ref(x)


def _global_hook_fires(fused, ref, x, routed):
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: seen.append(1))
    try:
        out = fused(x)
    finally:
        handle.remove()
    assert seen  # the branches ran as modules
    return out, ref(x)


def _weights_in_place(fused, ref, x, routed):
    for m in (fused, ref):
        m.spatial_att.gate_s.gate_s_conv_di_1.weight.mul_(1.5)  # as an optimizer step does
        m.channel_att.gate_c.gate_c_bn_1.running_mean.add_(0.2)
    return fused(x), ref(x)


def _weights_through_data(fused, ref, x, routed):
    # Writes through .data bump no version counter (old optimizers, EMA updates, weight loaders):
    # the fold's bytes comparison sees them.
    for m in (fused, ref):
        m.spatial_att.gate_s.gate_s_conv_di_1.weight.data.mul_(1.5)
        m.channel_att.gate_c.gate_c_fc_0.weight.data[0, 0] += 0.5
    return fused(x), ref(x)


def _statistics_through_data(fused, ref, x, routed):
    for m in (fused, ref):
        m.spatial_att.gate_s.gate_s_bn_di_0.running_var.data.mul_(3.0)
    return fused(x), ref(x)


def _eps_changed(fused, ref, x, routed):
    for m in (fused, ref):
        m.spatial_att.gate_s.gate_s_bn_reduce0.eps = 0.5
    return fused(x), ref(x)


def _conv_geometry_changed(fused, ref, x, routed):
    # Dilation 1 with padding 1 keeps the map's size: a conv the eval op no longer computes.
    for m in (fused, ref):
        conv = m.spatial_att.gate_s.gate_s_conv_di_0
        conv.dilation, conv.padding = (1, 1), (1, 1)
    with pytest.warns(RuntimeWarning, match="run as the module's layers"):
        out = fused(x)
    return out, ref(x)


def _hook_on_a_container(fused, ref, x, routed):
    seen = []
    fused.spatial_att.register_forward_pre_hook(lambda *_: seen.append(1))
    out = fused(x)
    assert seen == [1]
    return out, ref(x)


def _hooked_layer_swapped_in(fused, ref, x, routed):
    # The hook comes before a call that finds no hooks; the layer after it.
    seen = []
    conv = copy.deepcopy(fused.spatial_att.gate_s.gate_s_conv_final)
    conv.register_forward_hook(lambda *_: seen.append(1))
    fused(x)
    fused.spatial_att.gate_s.gate_s_conv_final = conv
    out = fused(x)
    assert seen == [1]
    return out, ref(x)


def _vmap(fused, ref, x, routed):
    with pytest.warns(RuntimeWarning, match="torch.func transform"):
        out = torch.vmap(lambda t: fused(t.unsqueeze(0)).squeeze(0))(x)
    return out, ref(x)


def _forward_ad(fused, ref, x, routed):
    tangent = torch.randn_like(x)
    with torch.inference_mode(False), fwAD.dual_level():
        with pytest.warns(RuntimeWarning, match="forward-mode AD"):
            got = fwAD.unpack_dual(fused(fwAD.make_dual(x.clone(), tangent)))
        want = fwAD.unpack_dual(ref(fwAD.make_dual(x.clone(), tangent)))
    torch.testing.assert_close(got.tangent, want.tangent, rtol=1e-5, atol=1e-5)
    return got.primal, want.primal


class _Counting(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _dispatch_mode(fused, ref, x, routed):
    with _Counting() as mode:
        out = fused(x)
    assert any("bam_fused_C" in str(op) for op in mode.ops)  # the mode saw the op
    return out, ref(x)


def _layer_replaced(fused, ref, x, routed):
    bn = torch.nn.BatchNorm2d(6).eval()
    bn.running_var.fill_(4.0)
    for m in (fused, ref):
        m.spatial_att.gate_s.gate_s_bn_reduce0 = bn
    return fused(x), ref(x)


def _reference_backend(fused, ref, x, routed):
    fused.backend = "reference"
    return fused(x), ref(x)


def _training_mode(fused, ref, x, routed):
    return fused.train()(x), ref.train()(x)


def _gradients_wanted(fused, ref, x, routed):
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.clone().requires_grad_()
        out = fused(xg)
        assert out.requires_grad
        return out.detach(), ref(xg).detach()


def _deep_copy(fused, ref, x, routed):
    twin = copy.deepcopy(fused)
    assert twin._fold_state is None  # derived state is not copied
    return twin(x), ref(x)


def _pickled(fused, ref, x, routed):
    twin = pickle.loads(pickle.dumps(fused))
    assert twin._fold_state is None
    return twin(x), ref(x)


def _jit_trace(fused, ref, x, routed):
    with torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(fused, x.clone(), check_trace=False)
        return traced(x.clone()), ref(x.clone())


@pytest.mark.parametrize(
    "change",
    [
        _hook_fires,
        _global_hook_fires,
        _weights_in_place,
        _weights_through_data,
        _statistics_through_data,
        _eps_changed,
        _conv_geometry_changed,
        _hook_on_a_container,
        _hooked_layer_swapped_in,
        _vmap,
        _forward_ad,
        _dispatch_mode,
        _layer_replaced,
        _reference_backend,
        _training_mode,
        _gradients_wanted,
        _deep_copy,
        _pickled,
        _jit_trace,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_the_short_path_steps_aside_on_any_change(routed, route, change):
    ref, fused = make_pair(48, 2, 8)
    x = torch.randn(2, 48, 9, 13)
    with torch.no_grad():
        fused(x), fused(x)
        assert len(routed) == 1  # warmed up: the short path is in use
        assert len(route[1]) == (2 if route[0] == "triton" else 0)
        got, want = change(fused, ref, x, routed)
    assert len(routed) >= 2 or change in (_deep_copy, _pickled), "the change went unseen"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(2, 47, 9, 13), "must have 48 channels"),
        (torch.randn(2, 48, 0, 13), "H, W >= 1"),
        (torch.randn(48, 9, 13), "must be 4-D"),
        (torch.randn(2, 48, 9, 13, device="meta"), "x is on meta but this BAM's parameters are on cpu"),
    ],
)
def test_bad_x_after_warm_up_gets_the_full_paths_error(route, x, match):
    _, fused = make_pair(48, 2, 8)
    with torch.no_grad():
        fused(torch.randn(2, 48, 9, 13))
        with pytest.raises(ValueError, match=match):
            fused(x)


def test_fx_tracing_after_warm_up_records_the_reference():
    ref, fused = make_pair(48, 2, 8)
    x = torch.randn(2, 48, 9, 13)
    with torch.no_grad():
        fused(x)
        with pytest.warns(RuntimeWarning, match="symbolic tracing"):
            gm = torch.fx.symbolic_trace(fused)
        assert not any("bam_fused_C" in str(n.target) for n in gm.graph.nodes)
        torch.testing.assert_close(gm(x), ref(x), rtol=1e-5, atol=1e-5)


def test_a_different_layout_still_gets_its_own_layout():
    _, fused = make_pair(48, 2, 8)
    with torch.no_grad():
        fused(torch.randn(2, 48, 9, 13))
        out = fused(make_layout(torch.randn(2, 48, 9, 13), "channels_last"))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_eager_calls_do_not_recompile_the_compiled_module():
    """The short path's state changes with eager calls (a fold, the op): compiled code must not
    read it (Dynamo guarded on it, and the eager calls forced a recompile)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    _, fused = make_pair(48, 2, 8)
    counter = CompileCounter()
    compiled = torch.compile(fused, backend=counter)
    x = torch.randn(2, 48, 9, 13)
    with torch.no_grad():
        want = compiled(x)
        fused(x), fused(x)  # the short path set up
        fused.spatial_att.gate_s.gate_s_conv_final.weight.mul_(1.0)  # and refolded
        fused(x)
        torch.testing.assert_close(compiled(x), want)
    assert counter.frame_count == 1


def _variants(ts):
    """Lists like ts but for one thing each: (what differs, the list)."""
    flipped = ts[0].clone()
    flipped.view(-1)[-1] = torch.nextafter(flipped.view(-1)[-1], torch.tensor(1e9))  # one ulp, last element
    signed = ts[1].clone()
    signed.view(-1)[0] = -0.0 if signed.view(-1)[0].item() == 0 else 0.0
    yield "one ulp", [flipped, *ts[1:]]
    yield "the sign of a zero", [ts[0], signed, *ts[2:]]
    yield "the dtype, same bytes", [ts[0].view(torch.int32), *ts[1:]]
    yield "the sizes, same bytes", [ts[0].view(4, 3), *ts[1:]]
    yield "one tensor fewer", ts[:-1]
    yield "one tensor more", [*ts, torch.zeros(1)]
    yield "the order", [ts[1], ts[0], *ts[2:]]


def test_same_bytes_sees_any_change_of_the_tensors():
    """BAM.folded()'s check (the ops bytes_of and same_bytes): exact, whatever the strides."""
    load_op("bytes_of")
    ops = torch.ops.bam_fused_C
    nan = torch.tensor([float("nan"), 1.0])
    ts = [torch.randn(3, 4), torch.zeros(5, dtype=torch.bfloat16), torch.empty(0, 2), torch.randn(2, 3).t(), nan]
    copy = ops.bytes_of(ts)
    assert copy.dtype == torch.uint8 and copy.dim() == 1
    assert ops.same_bytes(ts, copy)
    assert ops.same_bytes([t.clone() for t in ts], copy)  # new tensors, same contents (NaN bits too)
    assert ops.same_bytes([], ops.bytes_of([]))
    for what, other in _variants(ts):
        assert not ops.same_bytes(other, copy), what
        assert not ops.same_bytes(ts, ops.bytes_of(other)), what


@pytest.mark.parametrize("threads", [1, 2])
def test_same_bytes_sees_one_bit_in_megabytes(threads):
    # From 256 KB in all the elements are compared over the threads in 64 KB pieces, none across
    # two tensors: a flipped bit anywhere (a piece's edge, a tensor's last byte) is seen.
    load_op("bytes_of")
    ops = torch.ops.bam_fused_C
    ts = [torch.randn(300_000), torch.randn(70_001), torch.randn(3), torch.randn(2, 3, dtype=torch.cfloat).conj()]
    copy = ops.bytes_of(ts)
    assert torch.equal(copy, ops.bytes_of([*ts[:3], ts[3].resolve_conj()]))  # a conj view: its values
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert ops.same_bytes(ts, copy)
        for i, pos in [(0, 0), (0, 65535), (0, 65536), (0, 1_199_999), (1, 140_000), (1, 280_003), (2, 11)]:
            b = ts[i].view(torch.uint8)
            b[pos] ^= 1
            assert not ops.same_bytes(ts, copy), (i, pos)
            b[pos] ^= 1
        assert ops.same_bytes(ts, copy)
    finally:
        torch.set_num_threads(old)


def test_same_bytes_rejects_what_it_cannot_compare():
    load_op("bytes_of")
    ops = torch.ops.bam_fused_C
    ts = [torch.randn(3)]
    with pytest.raises(RuntimeError, match="copy must be a contiguous 1-D uint8 CPU tensor"):
        ops.same_bytes(ts, torch.zeros(4))
    with pytest.raises(RuntimeError, match="tensors must be dense CPU tensors, got one on meta"):
        ops.same_bytes([torch.randn(3, device="meta")], ops.bytes_of(ts))
    with pytest.raises(RuntimeError, match="not strided"):
        ops.bytes_of([torch.randn(3).to_sparse()])


def test_fold_snapshot_without_the_extension_compares_copies(monkeypatch):
    """Where the extension does not load, folded() keeps copies and compares them in Python."""
    _, fused = make_pair(48, 2, 8)
    _, tensors = bam_fused._fold.fold_key(fused)
    monkeypatch.setattr(bam_fused._ext, "reason", lambda: "simulated")
    copy_ = bam_fused._fold.snapshot(tensors)
    assert isinstance(copy_, list) and bam_fused._fold.unchanged(tensors, copy_)
    with torch.no_grad():
        tensors[3].data.view(-1)[0] += 1.0
    assert not bam_fused._fold.unchanged(tensors, copy_)
    assert not bam_fused._fold.unchanged(tensors[:-1], copy_)
