"""The Triton kernels of the CUDA eval path against float64: the pass over x
(ops/pass_triton.py) and its plan, the dilated convs (ops/spatial_triton.py), the channel MLP
(ops/mlp_triton.py); the extension op that finishes the job after the Triton pass
(attention_tail); the choice between the paths (ops/attention_cuda.py). Interpreted on the CPU
without a GPU, compiled on one."""

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA
from helpers import make_layout, needs_ext, run_threads

import bam_fused
from bam_fused import _backends
from bam_fused.ops import attention_cuda
from bam_fused.testing import randomize_

pt = pytest.importorskip("bam_fused.ops.pass_triton")
st = pytest.importorskip("bam_fused.ops.spatial_triton")


@pytest.fixture
def device():
    if _backends.triton_interpreted():
        return "cpu"
    if HAS_CUDA:
        return "cuda"
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")


def truth(x, w, b):
    x64 = x.double()
    y = torch.einsum("rc,nchw->nrhw", w.double(), x64) + b.double()[None, :, None, None]
    return x64.mean((2, 3)), y.relu()


# (N, C, H, W, Cr): odd sizes; Cr off the power-of-two pads; enough channels for splits
# (the interpreter's plan assumes 4 multiprocessors); one pixel; Cr at MAX_CR; NCHW rows
# passed as a constant (HW a multiple of 4, not of 16: 120, 14x14, and 10x10 split in two).
SHAPES = [(2, 37, 7, 9, 5), (1, 300, 5, 3, 20), (3, 200, 11, 13, 64), (2, 16, 1, 1, 1), (1, 130, 9, 15, 16),
          (2, 70, 12, 10, 24), (1, 48, 14, 14, 40), (1, 256, 10, 10, 16)]  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("y_channels_last", [False, True])
def test_pass_matches_float64(device, shape, dtype, layout, y_channels_last):
    n, c, h, wd, cr = shape
    x = make_layout(torch.randn(n, c, h, wd, device=device).to(dtype), layout)
    w = torch.randn(cr, c, device=device) / c**0.5
    b = torch.randn(cr, device=device) * 0.2
    part, y = pt.reduce_pool(x, w, b, y_channels_last)
    mean, want = truth(x.cpu(), w.cpu(), b.cpu())
    block_p = pt.DEFAULTS[(layout == "channels_last", pt.cr_pad(cr))].block_p
    assert part.shape == (n, max(1, -(-h * wd // block_p)), c) and part.dtype == torch.float32
    assert y.shape == (n, cr, h, wd) and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last if y_channels_last else torch.contiguous_format)
    # 3xTF32 (compiled) or fp32 (interpreted) products, fp32 sums: float32-level error.
    torch.testing.assert_close(part.sum(1).cpu().double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.cpu().double(), want, rtol=1e-5, atol=1e-5)


def test_constant_row_only_for_rows_of_4k_not_16k():
    assert pt._constant_row(196) == 196  # 14x14
    assert pt._constant_row(120) == 120
    assert pt._constant_row(256) == 0  # Triton specialises on 16 itself
    assert pt._constant_row(49) == 0  # 7x7: no 16-byte rows at all
    assert pt._constant_row(1) == pt._constant_row(2) == 0


@pytest.mark.parametrize("config", [*pt.DEFAULTS.values(), *pt.CANDIDATES], ids=str)
def test_every_config(device, config):
    x = torch.randn(2, 150, 13, 11, device=device)
    w, b = torch.randn(24, 150, device=device) / 150**0.5, torch.randn(24, device=device)
    part, y = pt.reduce_pool(x, w, b, True, config)
    mean, want = truth(x.cpu(), w.cpu(), b.cpu())
    torch.testing.assert_close(part.sum(1).cpu().double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.cpu().double(), want, rtol=1e-5, atol=1e-5)


def test_empty_batch_and_empty_map(device):
    w, b = torch.randn(4, 16, device=device), torch.randn(4, device=device)
    part, y = pt.reduce_pool(torch.randn(0, 16, 3, 3, device=device), w, b, False)
    assert part.shape == (0, 1, 16) and y.shape == (0, 4, 3, 3)
    part, y = pt.reduce_pool(torch.randn(2, 16, 0, 3, device=device), w, b, True)
    assert part.shape == (2, 1, 16) and bool((part == 0).all()) and y.shape == (2, 4, 0, 3)


@pytest.mark.parametrize("programs,c,target", [(2, 37, 16), (1, 300, 16), (128, 1024, 528), (800, 256, 528),
                                               (1, 64, 1000), (10, 4096, 10**6)])  # fmt: skip
def test_split_plan(programs, c, target):
    splits, c_split = pt.plan_splits(programs, c, target)
    assert splits >= 1 and c_split % pt.SPLIT_ALIGN == 0
    assert (splits - 1) * c_split < c <= splits * c_split  # every split has channels; all covered
    slices = -(-c // pt.SPLIT_ALIGN)
    assert splits == 1 or c_split >= 2 * pt.SPLIT_ALIGN or slices < 4  # at least two slices each
    if programs >= target:
        assert splits == 1


def test_split_results_equal_unsplit(device, monkeypatch):
    # The same x through one split and through several: same function, fp32 rounding apart.
    x = torch.randn(1, 512, 3, 5, device=device)
    w, b = torch.randn(32, 512, device=device) / 512**0.5, torch.randn(32, device=device)
    monkeypatch.setattr(pt, "_multiprocessors", lambda dev: 0)
    part1, y1 = pt.reduce_pool(x, w, b, False)
    monkeypatch.setattr(pt, "_multiprocessors", lambda dev: 64)
    assert pt.plan_splits(1, 512, 256)[0] > 1
    part2, y2 = pt.reduce_pool(x, w, b, False)
    torch.testing.assert_close(part1, part2, rtol=0, atol=0)  # channel sums do not depend on splits
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)


# (N, Cr, H, W, dilation, convs): every padded Cr, dilation past the map, one pixel, 1-3 convs.
CONV_SHAPES = [(2, 5, 7, 9, 4, 2), (1, 16, 9, 13, 1, 2), (2, 32, 5, 6, 2, 1), (1, 64, 7, 7, 3, 3),
               (2, 20, 1, 1, 4, 2), (3, 48, 14, 14, 4, 2)]  # fmt: skip


@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("y_layout", ["nchw", "channels_last"])
def test_spatial_convs_match_float64(device, shape, y_layout):
    n, cr, h, wd, d, convs = shape
    y = make_layout(torch.randn(n, cr, h, wd, device=device).relu(), y_layout)
    ws = [torch.randn(cr, cr, 3, 3, device=device) / (3 * cr**0.5) for _ in range(convs)]
    ws[0] = ws[0].contiguous(memory_format=torch.channels_last)  # the fold's layout, and a plain one
    bs = [torch.randn(cr, device=device) * 0.1 for _ in range(convs)]
    wf, bf = torch.randn(cr, device=device), torch.randn(1, device=device)
    spatial = st.spatial_map(y, ws, bs, d, wf, bf)
    want = y.cpu().double()
    for w, b in zip(ws, bs, strict=True):
        want = F.conv2d(want, w.cpu().double(), b.cpu().double(), padding=d, dilation=d).relu()
    want = (want * wf.cpu().double()[None, :, None, None]).sum(1) + bf.cpu().double()
    assert spatial.shape == (n, h, wd) and spatial.dtype == torch.float32
    torch.testing.assert_close(spatial.cpu().double(), want, rtol=1e-5, atol=1e-5)


def test_spatial_convs_huge_dilation_is_zero_padding(device):
    y = torch.randn(1, 8, 5, 6, device=device).relu()
    w, b = [torch.randn(8, 8, 3, 3, device=device)], [torch.randn(8, device=device)]
    wf, bf = torch.randn(8, device=device), torch.randn(1, device=device)
    torch.testing.assert_close(st.spatial_map(y, w, b, 2**30, wf, bf), st.spatial_map(y, w, b, 6, wf, bf))


def test_spatial_convs_empty_batch(device):
    w = [torch.randn(8, 8, 3, 3, device=device)]
    out = st.spatial_map(torch.randn(0, 8, 5, 5, device=device), w, [torch.randn(8, device=device)], 4,
                         torch.randn(8, device=device), torch.randn(1, device=device))  # fmt: skip
    assert out.shape == (0, 5, 5)


def folded_bam(c, r, dilation, convs=2):
    ref = randomize_(bam_fused.reference.BAM(c, r, dilation, num_dilated_convs=convs)).eval()
    fused = bam_fused.BAM(c, r, dilation, num_dilated_convs=convs, backend="fused").eval()
    fused.load_state_dict(ref.state_dict())
    return ref, fused, fused.folded()


@needs_ext
@pytest.mark.parametrize("c,r,dilation,convs", [(48, 8, 1, 2), (37, 4, 4, 2), (64, 16, 2, 1), (32, 8, 3, 0)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("overlap", ["auto", "on"])
def test_triton_paths_equal_attention_op(device, c, r, dilation, convs, layout, overlap, monkeypatch):
    # overlap "on": on a GPU the all-Triton path runs the channel MLP on a side stream; the
    # interpreter (CPU tensors) has no streams and ignores it.
    monkeypatch.setenv("BAM_FUSED_CUDA_OVERLAP", overlap)
    ref, fused, f = folded_bam(c, r, dilation, convs)
    x = make_layout(torch.randn(2, c, 9, 13), layout)
    if device == "cuda":
        fused, x = fused.cuda(), x.cuda()
        f = fused.folded()
    with torch.no_grad():
        want_c, want_s = attention_cuda._run_kernel(x, f, dilation)
        ref64 = ref.double()
        truth_c = ref64.channel_att(x.cpu().double()).reshape(x.shape[:2])
        truth_s = ref64.spatial_att(x.cpu().double())[:, 0]
        for run in (attention_cuda._run_triton_pass, attention_cuda._run_triton):
            got_c, got_s = run(x, f, dilation)
            torch.testing.assert_close(got_c.cpu().double(), truth_c, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got_s.cpu().double(), truth_s, rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(got_c, want_c, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got_s, want_s, rtol=1e-3, atol=1e-3)


@needs_ext
def test_attention_tail_checks_its_inputs():
    _, _, f = folded_bam(32, 8, 4)
    tail = torch.ops.bam_fused_C.attention_tail
    part, y = torch.randn(2, 1, 32), torch.randn(2, 4, 5, 5)
    rest = (f["dil_w"], f["dil_b"], 4, f["fin_w"], f["fin_b"], f["fc0_w"], f["fc0_b"], f["fc1_w"], f["fc1_b"])
    tail(part, y, *rest)  # fine
    with pytest.raises(RuntimeError, match="part must be contiguous fp32"):
        tail(part.double(), y, *rest)
    with pytest.raises(RuntimeError, match="part must be contiguous fp32 .* P >= 1"):
        tail(torch.randn(2, 0, 32), y, *rest)
    with pytest.raises(RuntimeError, match="y must be NCHW- or channels_last-contiguous fp32 \\(2, Cr, H, W\\)"):
        tail(part, torch.randn(3, 4, 5, 5), *rest)
    with pytest.raises(RuntimeError, match="y must be"):
        tail(part, torch.randn(2, 4, 5, 10)[..., ::2], *rest)
    with pytest.raises(RuntimeError, match="w_fc0 must be contiguous fp32"):
        tail(torch.randn(2, 1, 33), y, *rest)
    with pytest.raises(RuntimeError, match="w_final must be fp32 with 5 elements"):
        tail(part, torch.randn(2, 5, 5, 5), *rest)
    bad = ([f["dil_w"][0].double(), f["dil_w"][1]],) + rest[1:]
    with pytest.raises(RuntimeError, match="w_dilated\\[0\\] must be fp32 \\(4, 4, 3, 3\\)"):
        tail(part, y, *bad)


@pytest.mark.parametrize("n,p,c,hidden", [(2, 1, 37, 3), (32, 13, 512, 32), (17, 2, 1024, 64), (3, 5, 64, 4),
                                           (1, 1, 16, 1)])  # fmt: skip
def test_channel_mlp_matches_float64(device, n, p, c, hidden):
    mt = pytest.importorskip("bam_fused.ops.mlp_triton")
    part = torch.randn(n, p, c, device=device) / p  # partial means: they sum over p
    w0, b0 = torch.randn(hidden, c, device=device) / c**0.5, torch.randn(hidden, device=device) * 0.1
    w1, b1 = torch.randn(c, hidden, device=device) / hidden**0.5, torch.randn(c, device=device) * 0.1
    out = mt.channel_mlp(part, w0, b0, w1, b1)
    mean = part.cpu().double().sum(1)
    want = (mean @ w0.cpu().double().T + b0.cpu().double()).relu() @ w1.cpu().double().T + b1.cpu().double()
    assert out.shape == (n, c) and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-5, atol=1e-5)


def test_channel_mlp_empty_batch(device):
    mt = pytest.importorskip("bam_fused.ops.mlp_triton")
    w0, w1 = torch.randn(4, 64, device=device), torch.randn(64, 4, device=device)
    out = mt.channel_mlp(torch.randn(0, 1, 64, device=device), w0, torch.randn(4, device=device), w1,
                         torch.randn(64, device=device))  # fmt: skip
    assert out.shape == (0, 64)


# Non-finite inputs. torch's ReLU keeps NaN; tl.maximum is maxnum (PTX max.f32 and the
# interpreter's np.fmax return the other operand), which turned a NaN into 0 and hid it.


@pytest.mark.parametrize("split", [False, True], ids=["one_split", "splits"])
def test_pass_relu_keeps_nan(device, monkeypatch, split):
    x = torch.randn(1, 512, 3, 5, device=device)
    x[0, 100, 1, 3] = float("nan")
    w, b = torch.randn(32, 512, device=device) / 512**0.5, torch.randn(32, device=device)
    monkeypatch.setattr(pt, "_multiprocessors", lambda dev: 64 if split else 0)
    assert (pt.plan_splits(1, 512, 4 * pt._multiprocessors(x.device))[0] > 1) == split  # finishing ReLU, or pass
    _, y = pt.reduce_pool(x, w, b, False)
    want = torch.zeros(1, 32, 3, 5, dtype=torch.bool)
    want[0, :, 1, 3] = True
    assert torch.equal(y.isnan().cpu(), want)


def test_spatial_convs_keep_nan(device):
    y = torch.rand(1, 20, 9, 11, device=device)
    y[0, 5, 4, 5] = float("nan")
    w, b = [torch.randn(20, 20, 3, 3, device=device)], [torch.randn(20, device=device)]
    spatial = st.spatial_map(y, w, b, 2, torch.randn(20, device=device), torch.randn(1, device=device))
    want = torch.zeros(1, 9, 11, dtype=torch.bool)
    want[0, 2:7:2, 3:8:2] = True  # the pixels whose dilated taps read it
    assert torch.equal(spatial.isnan().cpu(), want)


def test_channel_mlp_keeps_nan(device):
    mt = pytest.importorskip("bam_fused.ops.mlp_triton")
    part = torch.rand(2, 1, 64, device=device)
    part[1, 0, 7] = float("nan")
    w0, w1 = torch.randn(4, 64, device=device), torch.randn(64, 4, device=device)
    out = mt.channel_mlp(part, w0, torch.randn(4, device=device), w1, torch.randn(64, device=device))
    assert not out[0].isnan().any() and out[1].isnan().all()


@pytest.mark.parametrize("cr", [16, 20])  # 20: padded to 32 channels
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")  # the padded channels' 0 x inf
def test_spatial_convs_infinite_input_like_float64(device, cr):
    # fp32 products ("ieee"): 3xTF32 splits inf into inf + (inf - inf) = NaN, on the GPU only.
    y = torch.rand(1, cr, 7, 9, device=device)
    y[0, 3, 3, 4] = float("inf")
    w, b = [torch.randn(cr, cr, 3, 3, device=device)], [torch.randn(cr, device=device)]
    wf, bf = torch.rand(cr, device=device), torch.randn(1, device=device)  # > 0: inf, not inf - inf
    spatial = st.spatial_map(y, w, b, 1, wf, bf, precision="ieee")
    v = F.conv2d(y.cpu().double(), w[0].cpu().double(), b[0].cpu().double(), padding=1).relu()
    want = (v * wf.cpu().double()[None, :, None, None]).sum(1) + bf.cpu().double()
    assert want.isinf().any() and not want.isnan().any()
    torch.testing.assert_close(spatial.cpu().double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)


@needs_ext
def test_attention_tail_opcheck():
    _, _, f = folded_bam(32, 8, 4)
    y = torch.randn(2, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    args = (torch.randn(2, 3, 32), y, f["dil_w"], f["dil_b"], 4, f["fin_w"], f["fin_b"],
            f["fc0_w"], f["fc0_b"], f["fc1_w"], f["fc1_b"])  # fmt: skip
    from bam_fused.ops.branches import load_op

    torch.library.opcheck(load_op("attention_tail"), args, test_utils=("test_schema", "test_faketensor"))


def test_eval_mode_variable_is_checked(monkeypatch):
    monkeypatch.setenv("BAM_FUSED_CUDA_EVAL", "fastest")
    with pytest.raises(ValueError, match="BAM_FUSED_CUDA_EVAL must be one of"):
        attention_cuda.mode()
    monkeypatch.setenv("BAM_FUSED_CUDA_EVAL", " Triton-Pass ")
    assert attention_cuda.mode() == "triton-pass"
    monkeypatch.delenv("BAM_FUSED_CUDA_EVAL")
    assert attention_cuda.mode() == "auto"


def test_choice_rules(monkeypatch):
    x = torch.randn(2, 64, 5, 5)
    narrow = {"red_w": torch.randn(4, 64), "dil_w": [None, None]}
    wide = {"red_w": torch.randn(pt.MAX_CR + 1, 64), "dil_w": [None, None]}
    monkeypatch.setattr(_backends, "triton_reason", lambda dev: None)
    for wanted in ("kernel", "triton-pass", "triton"):
        monkeypatch.setenv("BAM_FUSED_CUDA_EVAL", wanted)
        assert attention_cuda.choice(x, narrow, 4) == wanted
        assert attention_cuda.choice(x, wide, 4) == "kernel"  # more reduced channels than Triton takes
    monkeypatch.setenv("BAM_FUSED_CUDA_EVAL", "auto")
    monkeypatch.setattr(attention_cuda, "_chosen", {})
    assert attention_cuda.choice(x, narrow, 4) == "kernel"  # nothing to time off CUDA: not cached
    assert not attention_cuda._chosen
    monkeypatch.setattr(_backends, "triton_reason", lambda dev: "no Triton")
    monkeypatch.setenv("BAM_FUSED_CUDA_EVAL", "triton")
    assert attention_cuda.choice(x, narrow, 4) == "kernel"


def fake_timers(monkeypatch, graph: dict, plain: dict) -> list:
    """auto's two timers answer from the tables (path function name -> ms, or an exception to
    raise); returns the list of the names they were asked for."""
    calls = []

    def timer(table):
        def fake(fn):
            name = fn.__defaults__[0].__name__
            calls.append(name)
            if isinstance(table[name], Exception):
                raise table[name]
            return table[name]

        return fake

    monkeypatch.setenv("BAM_FUSED_CUDA_EVAL", "auto")
    monkeypatch.setattr(attention_cuda, "_chosen", {})
    monkeypatch.setattr(_backends, "triton_reason", lambda dev: None)
    monkeypatch.setattr(_backends, "_warned", set())
    monkeypatch.setattr(attention_cuda, "_graph_ms", timer(graph))
    monkeypatch.setattr(attention_cuda, "_plain_ms", timer(plain))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return calls


def test_auto_keeps_one_pick_for_plain_calls_and_one_for_graphs(monkeypatch):
    # H100, 2026-11-27, 28x28 fp32: the all-Triton path had the least GPU time (132 us) and by
    # far the most per plain call (about 1 ms: eight Triton launches on a slow host).
    graph = {"_run_kernel": 2.0, "_run_triton_pass": 1.5, "_run_triton": 1.0}
    plain = {"_run_kernel": 2.5, "_run_triton_pass": 3.0, "_run_triton": 9.0}
    calls = fake_timers(monkeypatch, graph, plain)
    synced = []  # the timings done at each synchronize: x must be ready before the first
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(len(calls)))
    kind = ["graph"]
    monkeypatch.setattr(attention_cuda, "_call_kind", lambda x: kind[0])
    _, fused, _ = folded_bam(64, 16, 4)
    f, x = fused.folded(), torch.randn(2, 64, 7, 9)
    assert attention_cuda.choice(x, f, 4) == "kernel"  # first met inside a capture: nothing timed
    assert not calls and not attention_cuda._chosen
    kind[0] = "plain"
    assert attention_cuda.choice(x, f, 4) == "kernel"  # the least plain-call time
    assert sorted(calls) == sorted(2 * list(graph))  # each path timed both ways, once
    assert synced == [0]
    kind[0] = "graph"
    assert attention_cuda.choice(x, f, 4) == "triton"  # the least GPU time
    kind[0] = "plain"
    assert attention_cuda.choice(x, f, 4) == "kernel" and len(calls) == 6  # kept
    assert attention_cuda.picks(x, f) == attention_cuda.Picks(plain="kernel", graph="triton")
    plain.update(_run_triton_pass=1.0)
    assert attention_cuda.choice(x[:1], f, 4) == "triton-pass"  # another shape: timed again
    assert len(calls) == 12 and synced == [0, 6]
    kind[0] = None  # CPU tensors (the interpreter): an untimed shape runs the kernel, uncached
    assert attention_cuda.choice(x[:, :, :3], f, 4) == "kernel" and len(attention_cuda._chosen) == 2


def test_triton_paths_need_tf32_tensor_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert not attention_cuda._has_tf32(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert attention_cuda._has_tf32(torch.device("cuda"))
    assert attention_cuda._has_tf32(torch.device("cpu"))  # the interpreter


@pytest.mark.parametrize("fails_in", ["graph", "plain"])
def test_auto_skips_a_triton_path_that_fails(monkeypatch, fails_in):
    graph = {"_run_kernel": 2.0, "_run_triton_pass": 3.0, "_run_triton": 1.0}
    plain = {"_run_kernel": 2.0, "_run_triton_pass": 1.0, "_run_triton": 0.5}
    (graph if fails_in == "graph" else plain)["_run_triton"] = RuntimeError("out of resources")
    fake_timers(monkeypatch, graph, plain)
    kind = ["plain"]
    monkeypatch.setattr(attention_cuda, "_call_kind", lambda x: kind[0])
    _, fused, _ = folded_bam(64, 16, 4)
    x = torch.randn(2, 64, 7, 9)
    with pytest.warns(RuntimeWarning, match="auto skips triton: RuntimeError: out of resources"):
        assert attention_cuda.choice(x, fused.folded(), 4) == "triton-pass"
    kind[0] = "graph"
    assert attention_cuda.choice(x, fused.folded(), 4) == "kernel"


def test_auto_raises_the_kernels_own_error(monkeypatch):
    fake_timers(monkeypatch, {"_run_kernel": ValueError("bad x")}, {})
    monkeypatch.setattr(attention_cuda, "_call_kind", lambda x: "plain")
    _, fused, _ = folded_bam(64, 16, 4)
    with pytest.raises(ValueError, match="bad x"):
        attention_cuda.choice(torch.randn(2, 64, 7, 9), fused.folded(), 4)


def test_auto_times_again_after_the_kernels_error(monkeypatch):
    # A failed timing leaves no pick behind: once the cause is gone, the shape is timed, not
    # pinned to the placeholder kept while it was timed.
    graph = {"_run_kernel": ValueError("bad variable"), "_run_triton_pass": 1.0, "_run_triton": 3.0}
    plain = {"_run_kernel": 2.0, "_run_triton_pass": 1.0, "_run_triton": 3.0}
    fake_timers(monkeypatch, graph, plain)
    monkeypatch.setattr(attention_cuda, "_call_kind", lambda x: "plain")
    _, fused, _ = folded_bam(64, 16, 4)
    x, f = torch.randn(2, 64, 7, 9), fused.folded()
    with pytest.raises(ValueError, match="bad variable"):
        attention_cuda.choice(x, f, 4)
    assert attention_cuda.picks(x, f) is None
    graph["_run_kernel"] = 2.0
    assert attention_cuda.choice(x, f, 4) == "triton-pass"


def test_threads_meeting_an_untimed_shape_wait_for_its_picks(monkeypatch):
    # The timing captures CUDA graphs: other threads must not launch meanwhile (nor time the shape
    # again), and they get the picks, not the placeholder "kernel" kept while timing.
    import time

    graph = {"_run_kernel": 2.0, "_run_triton_pass": 1.0, "_run_triton": 3.0}
    calls = fake_timers(monkeypatch, graph, dict(graph))
    fake_graph_ms, inner = attention_cuda._graph_ms, []

    def graph_ms(fn):
        time.sleep(0.02)
        inner.append(attention_cuda.choice(x, f, 4))  # a path calling back while its thread times
        return fake_graph_ms(fn)

    monkeypatch.setattr(attention_cuda, "_graph_ms", graph_ms)
    monkeypatch.setattr(attention_cuda, "_call_kind", lambda x: "plain")
    _, fused, _ = folded_bam(64, 16, 4)
    x, f = torch.randn(2, 64, 7, 9), fused.folded()
    got = []
    run_threads(lambda k: got.append(attention_cuda.choice(x, f, 4)))
    assert got == 4 * ["triton-pass"]
    assert len(calls) == 6  # three paths, both ways, once
    assert inner == 3 * ["kernel"]  # the calls back ran the kernel, untimed


def test_side_streams_are_per_thread(monkeypatch):
    # Under CUDA graph capture the channel MLP forks onto a side stream: two threads capturing at
    # once must not share one (the fork would join both captures). Fake streams: the logic only.
    import contextlib
    import threading

    class FakeStream:
        device = torch.device("cuda", 0)

        def wait_stream(self, other):
            pass

    class FakeTensor:
        def record_stream(self, stream):
            pass

    entered = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream())
    monkeypatch.setattr(
        torch.cuda, "stream", lambda s: entered.append((threading.current_thread(), s)) or contextlib.nullcontext()
    )

    def call(k: int) -> None:
        for _ in range(3):
            side, main = attention_cuda.run_beside(FakeTensor, lambda: "main", (FakeTensor(),), True)
            assert isinstance(side, FakeTensor) and main == "main"

    run_threads(call, threads=3)  # (all alive at once)
    by_thread: dict[threading.Thread, set[int]] = {}
    for thread, stream in entered:
        by_thread.setdefault(thread, set()).add(id(stream))
    assert len(entered) == 9 and len(by_thread) == 3
    assert all(len(ids) == 1 for ids in by_thread.values())  # each thread keeps its stream
    assert len(set().union(*by_thread.values())) == 3  # and no two threads share one


def test_run_beside_orders_the_two_streams(monkeypatch):
    # What keeps the forked work right (fake streams and tensors log what is asked of them): the
    # side stream starts after the current stream's work so far; its inputs are recorded on it
    # before main() runs (the allocator must not reuse them while it reads); the current stream
    # waits for it, and its output is recorded on the current stream, which reads it later.
    import contextlib

    log = []

    class FakeStream:
        device = torch.device("cuda", 0)

        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            log.append(f"{self.name} waits for {other.name}")

    class FakeTensor:
        def __init__(self, name):
            self.name = name

        def record_stream(self, stream):
            log.append(f"{self.name} on {stream.name}")

    @contextlib.contextmanager
    def on(stream):
        log.append(f"enter {stream.name}")
        yield
        log.append(f"leave {stream.name}")

    current = FakeStream("current")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream("side"))
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(attention_cuda, "_this_thread", attention_cuda._ThreadState())

    def side():
        log.append("side()")
        return FakeTensor("side's output")

    def main():
        log.append("main()")
        return "main's output"

    got = attention_cuda.run_beside(side, main, (FakeTensor("input 1"), FakeTensor("input 2")), True)
    assert got[0].name == "side's output" and got[1] == "main's output"
    assert log == [
        "side waits for current", "enter side", "side()", "leave side", "input 1 on side", "input 2 on side",
        "main()", "current waits for side", "side's output on current",
    ]  # fmt: skip
    log.clear()
    assert attention_cuda.run_beside(side, main, (FakeTensor("input"),), False)[1] == "main's output"
    assert log == ["side()", "main()"]  # no fork: one after the other, on the current stream


def test_plain_ms_is_the_best_round_of_back_to_back_calls(monkeypatch):
    import types

    # Three rounds of ten calls took 30, 20 and 25 ms: 2 ms a call, after one call to warm up.
    clock = iter([0.0, 0.030, 1.0, 1.020, 2.0, 2.025])
    monkeypatch.setattr(attention_cuda, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    assert attention_cuda._plain_ms(lambda: events.append("call")) == pytest.approx(2.0)
    assert events == ["call", "sync"] + 3 * (10 * ["call"] + ["sync"])  # each round waits for its GPU work


def test_graph_ms_falls_back_to_plain_calls(monkeypatch):
    import triton.testing

    asked = []
    monkeypatch.setattr(attention_cuda, "_plain_ms", lambda fn: 7.0)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, **kw: asked.append(kw) or 3)
    got = attention_cuda._graph_ms(lambda: None)
    assert got == 3.0 and isinstance(got, float) and asked == [{"rep": 5, "return_mode": "median"}]

    def refuse(fn, **kw):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", refuse)
    assert attention_cuda._graph_ms(lambda: None) == 7.0  # an op that cannot be captured: plain calls


def test_call_kind(monkeypatch):
    assert attention_cuda._call_kind(torch.randn(2)) is None  # the interpreter: nothing to time

    class FakeCuda:
        device = torch.device("cuda", 0)

    for capturing, want in [(False, "plain"), (True, "graph")]:
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda capturing=capturing: capturing)
        assert attention_cuda._call_kind(FakeCuda()) == want


@needs_ext
def test_y_layout_is_the_tails(monkeypatch):
    monkeypatch.setattr(attention_cuda, "_y_layouts", {})
    for cr, convs in [(16, 2), (64, 1), (5, 0)]:
        want = bool(torch.ops.bam_fused_C.cuda_y_channels_last(cr, convs))
        assert attention_cuda._y_channels_last(cr, convs) is want
        assert attention_cuda._y_channels_last(cr, convs) is want  # kept
    assert len(attention_cuda._y_layouts) == 3


def test_triton_launches_switch_to_the_tensors_gpu(monkeypatch):
    import contextlib

    from bam_fused.ops import gate_triton

    assert isinstance(gate_triton.on_device_of(torch.randn(2)), contextlib.nullcontext)

    class FakeCuda:  # a tensor on cuda:1 while cuda:0 is current
        is_cuda = True
        device = torch.device("cuda", 1)

    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextlib.nullcontext())
    gate_triton.on_device_of(FakeCuda())
    assert entered == [torch.device("cuda", 1)]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert isinstance(gate_triton.on_device_of(FakeCuda()), contextlib.nullcontext)


def test_overlap_variable(monkeypatch):
    # BAM_FUSED_CUDA_OVERLAP as the all-Triton path reads it (auto: only under CUDA graph capture,
    # which nothing here is; tests/test_cuda.py runs the side stream on a GPU).
    for raw, want in [("off", False), ("on", True), ("ON", True), ("auto", False), ("", False)]:
        monkeypatch.setenv("BAM_FUSED_CUDA_OVERLAP", raw)
        assert attention_cuda.overlap() is want, raw
    monkeypatch.setenv("BAM_FUSED_CUDA_OVERLAP", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert attention_cuda.overlap() is True  # under CUDA graph capture
    monkeypatch.setenv("BAM_FUSED_CUDA_OVERLAP", "sometimes")
    wanted = r"BAM_FUSED_CUDA_OVERLAP must be one of \('auto', 'on', 'off'\), got 'sometimes'"
    with pytest.raises(ValueError, match=wanted):
        attention_cuda.overlap()
