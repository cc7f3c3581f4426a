"""Trying to break the public entry points: properties, numerics, compilers, export,
multi-process training, pickling and fallbacks."""

import copy
import functools
import io
import os
import pickle
import socket
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import DEVICES
from helpers import make_layout, needs_ext, record_channels_last
from torch._subclasses import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import bam_fused
from bam_fused import _backends, _ext, cli
from bam_fused.models import insert_bam, resnet18_bam, resnet50_bam
from bam_fused.ops import bam_gate
from bam_fused.reference import BAM as RefBAM
from bam_fused.testing import DTYPES, gate_comparisons, randomize_

# -- property tests ----------------------------------------------------------------------
try:  # hypothesis is a dev dependency; bare GPU machines may lack it
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:
    given = None

if given is not None:

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        n=st.integers(0, 3), c=st.integers(1, 40), h=st.integers(1, 9), w=st.integers(1, 9),
        layout=st.sampled_from(["nchw", "channels_last", "strided"]), dtype=st.sampled_from(list(DTYPES)),
        combine=st.sampled_from(["sum", "product"]),
        backend=st.sampled_from(["cpp", "triton"] if _backends.triton_interpreted() else ["cpp"]),
        scale=st.sampled_from([1.0, 30.0]),
    )  # fmt: skip
    def test_property_gate_matches_reference(n, c, h, w, layout, dtype, combine, backend, scale):
        torch.manual_seed(n * 1000 + c * 100 + h * 10 + w)  # each example reproducible
        dt = DTYPES[dtype]
        x = make_layout(torch.randn(n, c, h, w).to(dt), layout)
        ca = (torch.randn(n, c) * scale).to(dt)
        sa = (torch.randn(n, h, w) * scale).to(dt)
        g = torch.randn(n, c, h, w).to(dt)
        fn = functools.partial(bam_gate, combine=combine, backend=backend)
        for name, result in gate_comparisons(fn, x, ca, sa, combine, g):
            assert result.passed, (name, result)

    @pytest.mark.parametrize("device", DEVICES)
    @settings(max_examples=48, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(
        n=st.integers(0, 3), c=st.integers(1, 70), reduction=st.sampled_from([1, 2, 4, 8, 16]),
        h=st.integers(1, 17), w=st.integers(1, 17), dilation=st.integers(1, 5), convs=st.integers(0, 3),
        combine=st.sampled_from(["sum", "product"]), dtype=st.sampled_from([*DTYPES, "fp64"]),
        layout=st.sampled_from(["nchw", "channels_last", "strided"]), training=st.booleans(), grad=st.booleans(),
    )  # fmt: skip
    def test_property_module_matches_float64_reference(
        device, n, c, reduction, h, w, dilation, convs, combine, dtype, layout, training, grad
    ):
        """The whole module, eval and training, against the float64 reference: its output, x's
        and the parameters' gradients and the BatchNorm statistics are within a few times the
        reference's own error in the same dtype of float64, or within a small tolerance; where
        the reference raises (BatchNorm on one value per channel), so does the module. The
        same examples on every run (derandomize): single-example comparisons of rounding noise
        have rare outliers, which must not make CI fail by chance. Not compared: in training
        mode, the gradients of the biases just before a BatchNorm (the reduce conv's, the
        dilated convs', the first linear layer's), which batch statistics cancel exactly:
        both compute rounding noise scaled by the inverse of the batch's spread."""
        torch.manual_seed(n * 1000 + c * 100 + h * 10 + w)
        dt = torch.float64 if dtype == "fp64" else DTYPES[dtype]
        args = (c, max(1, min(reduction, c)), dilation, convs, combine)
        ref = randomize_(RefBAM(*args)).train(training)
        fused = bam_fused.BAM(*args).train(training)
        fused.load_state_dict(ref.state_dict())
        truth = copy.deepcopy(ref).double()
        ref, fused = ref.to(device, dt), fused.to(device, dt)
        x = torch.randn(n, c, h, w, dtype=dt)
        xr, xf = (make_layout(x.to(device, copy=True), layout).requires_grad_(grad) for _ in range(2))
        xt = x.to(torch.float64, copy=True).requires_grad_(grad)
        # Without gradients as inference runs, under no_grad: then eval mode takes the fused op
        # (the parameters require grad, so with grad enabled it takes the autograd path).
        with warnings.catch_warnings(), torch.set_grad_enabled(grad):
            warnings.simplefilter("ignore")  # (float64 runs the reference, with a warning)
            try:
                yr = ref(xr)
            except Exception as e:
                with pytest.raises(type(e)):
                    fused(xf)
                return
            yf, yt = fused(xf), truth(xt)
        assert yf.dtype == dt and yf.shape == yt.shape and yf.device == xf.device
        pairs = [("output", yr, yf, yt)]
        if grad and n > 0:
            g = torch.randn_like(yt)
            for y, like in ((yr, yr), (yf, yf), (yt, yt)):
                y.backward(g.to(like))
            pairs.append(("x.grad", xr.grad, xf.grad, xt.grad))
            params = zip(ref.named_parameters(), fused.parameters(), truth.parameters(), strict=True)
            pairs += [(name, pr.grad, pf.grad, pt.grad) for (name, pr), pf, pt in params
                      if pt.grad is not None and not (training and _before_batch_norm(name))]  # fmt: skip
        buffers = zip(ref.named_buffers(), fused.buffers(), truth.buffers(), strict=True)
        pairs += [(name, br, bf, bt) for (name, br), bf, bt in buffers]
        tolerance = 1e-4 if dt in (torch.float32, torch.float64) else 0.15
        for name, want, got, true in pairs:
            assert got is not None and got.shape == true.shape, name
            scale = max(1.0, true.abs().max().item() if true.numel() else 1.0)
            e_ref, e_fused = _error(want, true), _error(got, true)
            assert e_fused <= max(tolerance * scale, 4 * e_ref), (name, e_fused, e_ref, scale)

else:

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_property_gate_matches_reference():
        pass

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_property_module_matches_float64_reference():
        pass


def _before_batch_norm(name: str) -> bool:
    return name.endswith(("fc_0.bias", "conv_reduce0.bias")) or ("conv_di_" in name and name.endswith(".bias"))


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference of a (any device, dtype) from b (float64 on the CPU)."""
    return (a.double().cpu() - b).abs().max().item() if b.numel() else 0.0


# -- numerics --------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("combine", ["sum", "product"])
def test_gradcheck_module_float64(training, combine):
    m = randomize_(bam_fused.BAM(8, 2, dilation=1, combine=combine)).double().train(training)
    x = torch.randn(3, 8, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


def test_module_backward_is_bitwise_repeatable():
    m = randomize_(bam_fused.BAM(48, 8)).train()
    x = torch.randn(4, 48, 9, 13)

    def grads():
        xi = x.clone().requires_grad_()
        m.zero_grad()
        m(xi).square().sum().backward()
        return [xi.grad] + [p.grad.clone() for p in m.parameters()]

    first = grads()
    torch.use_deterministic_algorithms(True)
    try:
        second = grads()
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.slow
def test_sixty_four_bit_indexing_cpp_gate():
    """2^31 + elements (4.3 GB in fp16): offsets past int32 must land where they should."""
    n, c, h, w = 1, 33, 8192, 8000
    assert n * c * h * w > 2**31
    x = torch.empty(n, c, h, w, dtype=torch.float16).normal_()
    ca, sa = torch.randn(n, c), torch.randn(n, h, w)
    out = bam_gate(x, ca, sa, backend="cpp")
    for ci, hi, wi in ((0, 0, 0), (32, 8191, 7999), (16, 4095, 123), (32, 0, 5)):
        want = x[0, ci, hi, wi].float() * (1 + torch.sigmoid(ca[0, ci] + sa[0, hi, wi]))
        assert torch.allclose(out[0, ci, hi, wi].float(), want, rtol=2e-3, atol=1e-3)


# -- compilers and export ---------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True])
def test_compile_fullgraph_module(training):
    m = randomize_(bam_fused.BAM(32, 4)).train(training)
    x = torch.randn(2, 32, 6, 7, requires_grad=training)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    ctx = torch.enable_grad() if training else torch.no_grad()
    with ctx:
        out = compiled(x)
        want = copy.deepcopy(m)(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    if training:
        out.sum().backward()
        assert x.grad is not None


def test_compile_fullgraph_module_inductor_eval():
    m = randomize_(bam_fused.BAM(32, 4)).eval()
    x = torch.randn(2, 32, 6, 7)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_compiled_eval_model_takes_x_in_inductors_layout(monkeypatch, layout):
    # Between convolutions Inductor lays activations out channels_last: the eval op takes x so
    # (bam_fused::bam_eval_flexible), with no copy back to NCHW, and gives the same output.
    from bam_fused.ops import branches

    torch._dynamo.reset()
    layouts = record_channels_last(monkeypatch, branches, "bam_eval")
    torch.manual_seed(1)
    bam = randomize_(bam_fused.BAM(32, 4))
    model = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 1), torch.nn.ReLU(), bam, torch.nn.Conv2d(32, 32, 1)).eval()
    x = make_layout(torch.randn(2, 32, 6, 7), layout)
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        want = model(x)
        layouts.clear()  # the eager call runs the C++ op directly, not through the wrapper
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), want, rtol=1e-5, atol=1e-5)
    assert layouts and all(layouts), layouts
    torch._dynamo.reset()
    x = torch.randn(2, 32, 6, 7)
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        f = bam.folded()
        args = (xx, f["red_w"], f["red_b"], f["dil_w"], f["dil_b"], 4, f["fin_w"], f["fin_b"], f["fc0_w"], f["fc0_b"],
                f["fc1_w"], f["fc1_b"], False)  # fmt: skip
        # Inference only (no autograd formula), as bam_fused_C::bam_eval.
        torch.library.opcheck(branches.bam_eval_flexible, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("training", [False, True])
def test_compile_fullgraph_resnet50_bam(training):
    model = resnet50_bam(num_classes=10).train(training)
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    if training:
        compiled(x).sum().backward()
        assert model.layer1.bam.channel_att.gate_c.gate_c_fc_final.weight.grad is not None
    else:
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_export_eval_model():
    model = randomize_(resnet18_bam(num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        exported = torch.export.export(model, (x,))
        ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
        # The C++ op itself (it runs without Python), not torch.compile's flexible-layout wrapper.
        assert "bam_fused_C.bam_eval.default" in ops and not any("flexible" in op for op in ops), ops
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_export_with_gradients_saves_and_loads(training):
    """Exported without torch.no_grad() (parameters that need gradients), BAM takes the autograd
    path's custom ops; until 2026-11-26 its torch.no_grad() block for the running statistics
    became a node that torch.export.save rejected ("wrap_with_set_grad_enabled is missing val
    field")."""
    ref = randomize_(RefBAM(32, 4, 2)).train(training)
    fused = bam_fused.convert(copy.deepcopy(ref))
    x = torch.randn(2, 32, 7, 9)
    exported = torch.export.export(fused, (x,))
    ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "bam_fused.reduce_pool_train.default" in ops, ops
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    x = torch.randn(2, 32, 7, 9)
    torch.testing.assert_close(loaded(x), ref(x), rtol=1e-5, atol=1e-5)
    for name, buf in ref.named_buffers():  # one step's running statistics in training mode
        torch.testing.assert_close(loaded.get_buffer(name), buf, rtol=1e-5, atol=1e-6, msg=name)


def test_aot_inductor_package_runs_the_eval_op(tmp_path):
    """Deployment without Python in the loop: AOTInductor compiles the exported eval BAM to a
    shared library that calls bam_fused_C::bam_eval (the extension must be loaded to run it)."""
    ref = randomize_(RefBAM(32, 4, 2)).eval()
    fused = bam_fused.convert(copy.deepcopy(ref))
    x = torch.randn(2, 32, 7, 9)
    with torch.no_grad():
        exported = torch.export.export(fused, (x,))
        assert "bam_fused_C.bam_eval.default" in {str(n.target) for n in exported.graph.nodes}
        path = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "bam.pt2"))
        runner = torch._inductor.aoti_load_package(path)
        torch.testing.assert_close(runner(x), ref(x), rtol=1e-5, atol=1e-5)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fake_tensor_mode_gives_the_reference_shapes_and_strides(training, layout):
    """Shape and memory tools run models under FakeTensorMode; before 2026-11-26 training raised
    "UnsupportedOperatorException: bam_fused_C.gate_forward.default" (no fake kernel)."""
    results = []
    with FakeTensorMode():
        for m in (RefBAM(32, 4, 2), bam_fused.BAM(32, 4, 2)):
            x = make_layout(torch.empty(2, 32, 7, 9), layout).requires_grad_(training)
            with torch.set_grad_enabled(training):
                out = m.train(training)(x)
                if training:
                    out.sum().backward()
            results.append((out.shape, out.stride(), None if x.grad is None else (x.grad.shape, x.grad.stride())))
        assert m._fold_state is None  # no fold cached from fake tensors (nor keyed on their data_ptr)
    assert results[0] == results[1]


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fake_cuda_tensors_take_the_dispatcher_ops(monkeypatch, training, layout):
    """The CUDA paths under FakeTensorMode, on any machine (fake CUDA tensors need no GPU): with
    Triton taken as available, the eval path and the gate must call ops with fake kernels, not
    launch Triton kernels or time them on fake tensors. (Forward only: autograd's engine needs a
    real CUDA context.)"""
    monkeypatch.setattr(_backends, "triton_reason", lambda device: None)
    results = []
    with FakeTensorMode(), torch.device("cuda"):
        for m in (RefBAM(32, 4, 2), bam_fused.BAM(32, 4, 2, backend="fused")):
            x = make_layout(torch.empty(2, 32, 7, 9), layout).requires_grad_(training)
            with torch.set_grad_enabled(training):
                out = m.train(training)(x)
            results.append((out.device.type, out.shape, out.stride()))
    assert results[0] == results[1]


def test_fake_cuda_eval_without_cuda_branch_kernels_runs_the_layers(monkeypatch):
    """An extension built without CUDA kernels (no nvcc at build time) under a CUDA torch:
    "auto" runs the branches as modules before the Triton gate and says why once; "fused"
    raises. Fake CUDA tensors: any machine."""
    monkeypatch.setattr(_backends, "triton_reason", lambda device: None)
    monkeypatch.setattr(_ext, "has_cuda_kernels", lambda: False)
    monkeypatch.setattr(_backends, "_warned", set())
    with FakeTensorMode(), torch.device("cuda"), torch.no_grad():
        x = torch.empty(2, 32, 7, 9)
        ref = RefBAM(32, 4, 2).eval()(x)
        with pytest.warns(RuntimeWarning, match="run as PyTorch modules: the extension was built without CUDA"):
            out = bam_fused.BAM(32, 4, 2).eval()(x)
        with pytest.raises(_backends.BackendUnavailable, match="cannot run the branch op: the extension was built"):
            bam_fused.BAM(32, 4, 2, backend="fused").eval()(x)
    assert (out.device.type, out.shape, out.stride()) == (ref.device.type, ref.shape, ref.stride())


def test_dispatch_modes_see_the_gate_as_a_custom_op():
    """Under a TorchDispatchMode bam_gate calls its torch.library op (fake kernel, one op), not the
    Python launches behind its eager autograd Function (which on CUDA would launch Triton kernels
    on a mode's fake tensors); the values are the same."""
    x, c, s = (torch.randn(shape, requires_grad=True) for shape in ((2, 37, 7, 9), (2, 37), (2, 7, 9)))
    want = bam_gate(x, c, s)
    want_grads = torch.autograd.grad(want.sum(), (x, c, s))
    with _RecordOps() as mode:
        got = bam_gate(x, c, s)
        got_grads = torch.autograd.grad(got.sum(), (x, c, s))
    assert "bam_fused.gate.default" in mode.seen and "bam_fused.gate_backward.default" in mode.seen, mode.seen
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_warnings_point_at_the_callers_line(monkeypatch):
    """The line that called BAM (not one inside bam_fused or torch's module machinery), so that the
    warning says where and filters by module apply."""
    monkeypatch.setattr(_backends, "_warned", set())
    m = bam_fused.BAM(32, 4, 2).eval()
    m.spatial_att.gate_s.gate_s_relu_di_0 = torch.nn.LeakyReLU()
    with pytest.warns(RuntimeWarning, match="run as the module's layers") as caught, torch.no_grad():
        m(torch.randn(1, 32, 5, 5))
    assert [w.filename for w in caught] == [__file__]


# -- multi-process training ------------------------------------------------------------------
def _small_net() -> torch.nn.Module:
    torch.manual_seed(1)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), bam_fused.BAM(32, 4, dilation=2), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 5),
    )  # fmt: skip
    randomize_(net)
    # Frozen BatchNorm statistics: under DDP each process would otherwise normalise with its
    # own half of the batch, which one process on the whole batch cannot reproduce.
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return net


def _batches():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(8, 3, 10, 11, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(3)]


def _train(net, batches, rank=0, world=1):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for x, y in batches:
        half = x.shape[0] // world
        xs, ys = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xs), ys).backward()
        opt.step()
    return net


def _ddp_worker(rank, world, port, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        net = torch.nn.parallel.DistributedDataParallel(_small_net())
        _train(net, _batches(), rank, world)
        if rank == 0:
            torch.save(net.module.state_dict(), out_path)
    finally:
        dist.destroy_process_group()


def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_path = str(tmp_path / "ddp.pt")
    mp.start_processes(_ddp_worker, args=(2, port, out_path), nprocs=2, join=True, start_method="spawn")
    single = _train(_small_net(), _batches())
    ddp_state = torch.load(out_path)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_sync_batchnorm_conversion_and_pickling():
    m = randomize_(bam_fused.BAM(32, 4)).eval()
    x = torch.randn(2, 32, 5, 6)
    with torch.no_grad():
        want = m(x)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(m))
    bns = [mod for mod in synced.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 4 and all(isinstance(b, torch.nn.SyncBatchNorm) for b in bns)
    with torch.no_grad():
        torch.testing.assert_close(synced(x), want, rtol=1e-5, atol=1e-5)
        m(x)  # fills the fold cache, which must not travel
        restored = pickle.loads(pickle.dumps(m))
        assert restored._fold_state is None
        torch.testing.assert_close(restored(x), want, rtol=0, atol=0)
        torch.testing.assert_close(copy.deepcopy(m)(x), want, rtol=0, atol=0)


# -- edge cases and fallbacks ------------------------------------------------------------------
def test_valid_edge_cases_of_the_module():
    m = randomize_(bam_fused.BAM(16, 4)).eval()
    ref = bam_fused.reference.BAM(16, 4).eval()
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        for x in (torch.randn(0, 16, 5, 5), torch.randn(2, 16, 1, 1), torch.randn(1, 16, 7, 9)[..., ::2]):
            torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)


def test_triton_missing_fallback(monkeypatch):
    monkeypatch.setattr(_backends, "_triton", lambda: (None, "simulated: Triton is not importable"))
    monkeypatch.setattr(_backends, "_warned", set())
    x, ca, sa = torch.randn(2, 8, 3, 3), torch.randn(2, 8), torch.randn(2, 3, 3)
    with pytest.raises(_backends.BackendUnavailable, match="simulated: Triton is not importable"):
        bam_gate(x, ca, sa, backend="triton")
    info = bam_fused.info()
    assert "simulated" in info["kernels"]["gate (Triton, CUDA)"]["reason"]


def _ext_state() -> tuple:
    """_ext.reason(), build_info() and has_cuda_kernels() loaded afresh (and the cache cleared
    after, so that later tests load the real extension again)."""
    _ext.load.cache_clear()
    try:
        return _ext.reason(), _ext.build_info(), _ext.has_cuda_kernels()
    finally:
        _ext.load.cache_clear()


def _failing(exc):
    def fail(*args):
        raise exc

    return fail


def test_jit_build_failure_is_reported(monkeypatch):
    for name in ("BAM_FUSED_DISABLE_EXT", "BAM_FUSED_JIT"):
        monkeypatch.delenv(name, raising=False)
    with monkeypatch.context() as m:
        m.setattr(_ext, "_CSRC", _ext._CSRC / "gone")
        with pytest.raises(_ext.ExtensionUnavailable, match="no sources to JIT-build from"):
            _ext._jit_build()
    monkeypatch.setattr(_ext.importlib, "import_module", _failing(ImportError("gone")))
    monkeypatch.setattr(_ext, "_jit_build", _failing(RuntimeError("ninja: build stopped: subcommand failed.\nmore")))
    why = "bam_fused._C is not importable (gone); JIT build failed: ninja: build stopped: subcommand failed."
    assert _ext_state() == (why, {"available": False, "reason": why}, False)
    monkeypatch.setattr(_ext, "_jit_build", _failing(OSError()))  # no message: its type says what
    assert _ext_state()[0] == "bam_fused._C is not importable (gone); JIT build failed: OSError"
    monkeypatch.setenv("BAM_FUSED_JIT", "0")
    assert _ext_state()[0] == "bam_fused._C is not importable (gone); JIT build disabled by BAM_FUSED_JIT=0"
    monkeypatch.setenv("BAM_FUSED_DISABLE_EXT", "1")
    assert _ext_state()[0] == "disabled by BAM_FUSED_DISABLE_EXT=1"


def test_jit_build_arguments_with_and_without_cuda(monkeypatch):
    """What _jit_build hands torch.utils.cpp_extension.load (no test builds it: that takes minutes)."""
    import torch.utils.cpp_extension as cpp

    calls = []
    monkeypatch.setattr(cpp, "load", lambda **kw: calls.append(kw) or "module")
    for gpu, cuda_home in [(False, "/usr/local/cuda"), (True, None), (True, "/usr/local/cuda")]:
        with_cuda = gpu and cuda_home is not None
        monkeypatch.setattr(cpp, "CUDA_HOME", cuda_home)
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        monkeypatch.setenv("BAM_FUSED_VERBOSE_BUILD", "1" if with_cuda else "0")
        assert _ext._jit_build() == "module"
        kw = calls[-1]
        assert kw["name"] == "bam_fused_C" and kw["sources"] == _ext.sources(with_cuda) and kw["verbose"] is with_cuda
        assert kw["extra_include_paths"] == [str(_ext._CSRC)]
        assert ("-DBAM_FUSED_WITH_CUDA" in kw["extra_cflags"]) is with_cuda
        assert "-DBAM_FUSED_WITH_CUDA" in kw["extra_cuda_cflags"] and "-O3" in kw["extra_cflags"]
        if sys.platform.startswith("linux"):
            assert "-fopenmp" in kw["extra_cflags"] and kw["extra_ldflags"] == ["-fopenmp"]


@needs_ext
def test_extension_loads_and_lists_its_sources():
    why, info, cuda = _ext_state()
    assert why is None and info["with_cuda"] is cuda
    names = [os.path.basename(f) for f in _ext.sources(with_cuda=False)]
    assert "bam_fused.cpp" in names and "gate_cpu.cpp" in names and not any(n.endswith(".cu") for n in names)
    with_cuda = [os.path.basename(f) for f in _ext.sources(with_cuda=True)]
    assert with_cuda[: len(names)] == names and "reduce_pool.cu" in with_cuda


def test_env_flag_values_are_checked(monkeypatch):
    from bam_fused import env

    monkeypatch.delenv("BAM_FUSED_JIT", raising=False)
    assert env.flag("BAM_FUSED_JIT") is False and env.flag("BAM_FUSED_JIT", default=True) is True
    for raw, value in [("1", True), (" Yes ", True), ("TRUE", True), ("on", True), ("0", False), ("", False),
                       (" No", False), ("false", False), ("OFF", False)]:  # fmt: skip
        monkeypatch.setenv("BAM_FUSED_JIT", raw)
        assert env.flag("BAM_FUSED_JIT", default=not value) is value, raw
    monkeypatch.setenv("BAM_FUSED_JIT", "maybe")
    with pytest.raises(ValueError, match="BAM_FUSED_JIT must be 0 or 1, got 'maybe'"):
        env.flag("BAM_FUSED_JIT")


def test_env_choice_values_are_checked(monkeypatch):
    from bam_fused import env

    choices = ("auto", "on", "off")
    monkeypatch.delenv("BAM_FUSED_TEST_CHOICE", raising=False)
    assert env.choice("BAM_FUSED_TEST_CHOICE", choices) == "auto"  # unset: the first
    for raw, value in [("", "auto"), ("  ", "auto"), (" On ", "on"), ("OFF", "off"), ("auto", "auto")]:
        monkeypatch.setenv("BAM_FUSED_TEST_CHOICE", raw)
        assert env.choice("BAM_FUSED_TEST_CHOICE", choices) == value, raw
    monkeypatch.setenv("BAM_FUSED_TEST_CHOICE", " Sometimes")
    wanted = r"BAM_FUSED_TEST_CHOICE must be one of \('auto', 'on', 'off'\), got 'sometimes'"
    with pytest.raises(ValueError, match=wanted):
        env.choice("BAM_FUSED_TEST_CHOICE", choices)


def test_insert_bam_validates_bam_arguments_before_changing_the_model():
    import torchvision

    model = torchvision.models.resnet18(num_classes=3)
    with pytest.raises(ValueError, match="combine must be one of 'sum', 'product', got 'max'"):
        insert_bam(model, combine="max")
    with pytest.raises(ValueError, match="backend must be one of"):
        insert_bam(model, backend="gpu")
    assert not any(isinstance(m, bam_fused.BAM) for m in model.modules())


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["verify", "--dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])


def test_cpu_kernels_are_built_multithreaded():
    # at::parallel_for is inline: in a file built without OpenMP it runs serially.
    info = _ext.build_info()
    if not info.get("available") or not sys.platform.startswith("linux"):
        pytest.skip("extension not available, or not Linux (no OpenMP build)")
    assert info.get("openmp") is True, info


@pytest.mark.skipif(os.cpu_count() is None, reason="unknown CPU count")
def test_cpu_gate_same_bits_for_any_thread_count():
    x, ca, sa = torch.randn(4, 64, 13, 11), torch.randn(4, 64), torch.randn(4, 13, 11)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            xs, cs, ss = (t.clone().requires_grad_() for t in (x, ca, sa))
            out = bam_gate(xs, cs, ss, backend="cpp")
            out.backward(torch.ones_like(out))
            results.append((out, xs.grad, cs.grad, ss.grad))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_sixty_four_bit_indexing_cpu_pass(layout):
    """The CPU pass over x (bf16 products where the CPU has them) on 2^31 + elements (4.4 GB in
    bf16): pooled means and map values far into x land where they should."""
    from helpers import bf16_products

    from bam_fused.ops.branches import load_op

    n, c, h, w = 1, 34, 8192, 7800
    assert n * c * h * w > 2**31
    if layout == "nchw":
        x = torch.empty(n, c, h, w, dtype=torch.bfloat16).normal_()
    else:  # filled while contiguous: normal_ on the permuted view took four times as long
        x = torch.empty(n, h, w, c, dtype=torch.bfloat16).normal_().permute(0, 3, 1, 2)
    wr, br, wf, bf = torch.randn(2, c) / c**0.5, torch.randn(2), torch.randn(2), torch.randn(1)
    pooled, spatial = load_op()(x, wr, br, [], [], 4, wf, bf)
    for ci in (0, 17, 33):
        want = x[0, ci].sum(dtype=torch.float64) / (h * w)
        assert abs(float(pooled[0, ci]) - float(want)) < 1e-5
    w64 = (wr.bfloat16() if bf16_products(x.dtype) else wr).double()
    for hi, wi in ((0, 0), (8191, 7799), (4095, 123), (8000, 7000)):
        y = torch.relu(w64 @ x[0, :, hi, wi].double() + br.double())
        want = float(y @ wf.double() + bf.double())
        assert abs(float(spatial[0, hi, wi]) - want) < 1e-4 * max(1.0, abs(want))


# -- hooks on the layers ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["eval", "eval-grad", "train", "compiled-eval"])
@pytest.mark.parametrize("where", ["spatial_att", "gate_s_conv_reduce0", "global"])
def test_layer_hooks_fire_and_see_the_reference_maps(mode, where):
    """The fused paths skip the layers' forwards (the eval op, the pass over x); with a hook on
    any layer, or a global one, the branches run as modules, so the hook fires as in the
    reference (reading attention maps this way is common) and sees the same values."""
    ref = randomize_(bam_fused.reference.BAM(48, 8, dilation=2)).train(mode == "train")
    fused = bam_fused.convert(copy.deepcopy(ref)).train(mode == "train")
    seen: dict[str, list] = {"ref": [], "fused": []}

    def attach(m, key):
        def hook(mod, inputs, output):
            if where != "global" or mod is m.spatial_att:
                seen[key].append(output.detach().clone())

        if where == "global":
            return torch.nn.modules.module.register_module_forward_hook(hook)
        layer = m.spatial_att if where == "spatial_att" else m.spatial_att.gate_s.gate_s_conv_reduce0
        return layer.register_forward_hook(hook)

    x = torch.randn(2, 48, 7, 9, requires_grad=mode != "eval")
    run = torch.compile(fused, fullgraph=True, backend="aot_eager") if mode == "compiled-eval" else fused
    with torch.set_grad_enabled(mode != "eval" and mode != "compiled-eval"):
        for m, key, fn in ((ref, "ref", ref), (fused, "fused", run)):
            handle = attach(m, key)
            try:
                out = fn(x)
            finally:
                handle.remove()
            seen[key + "_out"] = out
    assert len(seen["fused"]) == len(seen["ref"]) == 1
    torch.testing.assert_close(seen["fused"][0], seen["ref"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["fused_out"], seen["ref_out"], rtol=1e-5, atol=1e-5)
    # With the hook removed the eval op is back: no layer's forward runs.
    calls = []
    original = fused.spatial_att.forward
    fused.spatial_att.forward = lambda t: (calls.append(1), original(t))[1]
    with torch.no_grad():
        fused.eval()(x.detach())
    assert calls == []


@pytest.mark.parametrize("kind", ["full_backward_hook", "full_backward_pre_hook"])
def test_backward_hooks_on_a_layer_fire_as_in_the_reference(kind):
    """A backward hook alone (no forward hook) also makes the branches run as modules: the CPU
    autograd path's C++ tail would skip the layer, and its hook with it."""
    ref = randomize_(bam_fused.reference.BAM(48, 8, dilation=2)).train()
    fused = bam_fused.convert(copy.deepcopy(ref)).train()
    x = torch.randn(2, 48, 7, 9)
    g = torch.randn_like(x)
    seen = []
    for m in (ref, fused):
        layer = m.spatial_att.gate_s.gate_s_conv_di_0
        getattr(layer, f"register_{kind}")(lambda mod, *grads: seen.append(grads[-1][0].clone()))
        m(x.clone().requires_grad_()).backward(g)
    assert len(seen) == 2
    torch.testing.assert_close(seen[1], seen[0], rtol=1e-5, atol=1e-6)
