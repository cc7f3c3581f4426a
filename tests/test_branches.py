"""The branch op and the fused BAM module against the reference."""

import copy
import warnings

import pytest
import torch
from helpers import LAYOUTS, bf16_products, make_layout, spatial_env
from test_cpu_pass import isa_env

import bam_fused
from bam_fused import _backends, _ext
from bam_fused.ops import bam_branches
from bam_fused.reference import BAM as RefBAM
from bam_fused.testing import compare, randomize_

GRID = [(48, 9, 13, 1, 8), (48, 9, 13, 2, 16), (48, 9, 13, 4, 16), (64, 7, 7, 4, 8), (37, 7, 9, 4, 16)]


def make_pair(c, dilation, r, combine="sum", convs=2, backend="auto"):
    ref = randomize_(RefBAM(c, r, dilation, convs, combine)).eval()
    fused = bam_fused.BAM(c, r, dilation, convs, combine, backend=backend).eval()
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@pytest.mark.parametrize("c,h,w,dilation,r", GRID)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_branch_op_matches_reference(c, h, w, dilation, r, layout, dtype):
    ref, fused = make_pair(c, dilation, r)
    x = make_layout(torch.randn(2, c, h, w).to(dtype), layout)
    f = fused.folded()
    pooled, spatial = bam_branches(x, f["red_w"], f["red_b"], f["dil_w"], f["dil_b"], dilation, f["fin_w"], f["fin_b"])
    assert pooled.dtype == spatial.dtype == torch.float32
    assert pooled.shape == (2, c) and spatial.shape == (2, h, w)
    ref64 = ref.double()
    x64 = x.double()
    with torch.no_grad():
        torch.testing.assert_close(pooled.double(), x64.mean((2, 3)), rtol=1e-5, atol=1e-6)
        want = ref64.spatial_att(x64)[:, 0]
        if bf16_products(dtype):
            # The branches compute in bf16 as a bf16 model does: eager bf16's error is the yardstick.
            eager = ref.to(dtype).spatial_att(x)[:, 0]
            result = compare(spatial, want, eager)
            assert result.passed, result
        else:
            assert compare(spatial, want).max_abs <= 1e-4 * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("c,h,w,dilation,r", GRID)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_bam_eval_matches_reference(c, h, w, dilation, r, layout, combine, dtype):
    ref, fused = make_pair(c, dilation, r, combine, backend="fused")
    x = make_layout(torch.randn(3, c, h, w).to(dtype), layout)
    with torch.no_grad():
        out = fused(x)
        truth = ref.double()(x.double())
        eager = ref.to(dtype)(x)
    assert out.dtype == dtype
    cl = layout == "channels_last"
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    result = compare(out, truth, eager)
    assert result.passed, result


@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_training_mode_fused_gate_forward_backward(combine, layout):
    ref, fused = make_pair(48, 4, 8, combine, backend="fused")
    ref.train()
    fused.train()
    x = make_layout(torch.randn(4, 48, 9, 13), layout)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(x.shape)
    out_r, out_f = ref(xr), fused(xf)
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)
    out_r.backward(g)
    out_f.backward(g)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5)
    for (name, pr), pf in zip(ref.named_parameters(), fused.parameters(), strict=True):
        # Biases followed by BatchNorm have a gradient of exactly zero in theory; what is
        # left is float32 cancellation noise of the size of the other gradients' rounding.
        torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-4, atol=1e-4, msg=name)
    # Running statistics were updated identically.
    for (name, br), bf in zip(ref.named_buffers(), fused.buffers(), strict=True):
        torch.testing.assert_close(bf, br, msg=name)


def test_eval_with_gradients_uses_modules_and_gives_input_gradients():
    ref, fused = make_pair(48, 4, 8)
    x = torch.randn(2, 48, 9, 13, requires_grad=True)
    fused(x).sum().backward()
    xr = x.detach().clone().requires_grad_()
    ref(xr).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)


def test_folding_cache_follows_weight_updates_state_dict_and_mode():
    ref, fused = make_pair(48, 2, 8)
    x = torch.randn(2, 48, 9, 13)
    with torch.no_grad():
        fused(x)
        first = fused.folded()
        assert fused.folded() is first  # cached
        for m in (fused, ref):
            m.spatial_att.gate_s.gate_s_conv_di_1.weight.mul_(1.5)  # in-place update, as an optimizer does
            m.channel_att.gate_c.gate_c_bn_1.running_var.add_(0.3)
        assert fused.folded() is not first
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
        other = randomize_(RefBAM(48, 8, 2)).eval()
        fused.load_state_dict(other.state_dict())
        torch.testing.assert_close(fused(x), other(x), rtol=1e-5, atol=1e-5)
        # A mode change alone keeps the fold on the CPU (the key holds every layer's mode; serving
        # code calls .eval() per request), a training step in between does not.
        loaded = fused.folded()
        fused.train().eval()
        assert fused.folded() is loaded
        with torch.enable_grad():
            for m in (fused, other):
                m.train()(x).sum().backward()
                m.eval()
        assert fused.folded() is not loaded
        torch.testing.assert_close(fused(x), other(x), rtol=1e-5, atol=1e-5)
        # A replaced parameter (not an in-place update) refreshes the fold too.
        for m in (fused, other):
            m.spatial_att.gate_s.gate_s_conv_final.weight = torch.nn.Parameter(torch.full((1, 6, 1, 1), 0.3))
        torch.testing.assert_close(fused(x), other(x), rtol=1e-5, atol=1e-5)
        # So does a replaced layer.
        conv = torch.nn.Conv2d(6, 6, 3, padding=2, dilation=2)
        for m in (fused, other):
            m.spatial_att.gate_s.gate_s_conv_di_0 = conv
        torch.testing.assert_close(fused(x), other(x), rtol=1e-5, atol=1e-5)
        # And a conversion (.to, .half, ...): a round trip changes the weights by rounding, and
        # its new tensors could land where the cached fold's were.
        fused(x)
        fused.half()
        assert fused._fold_state is None
        other.half().float()
        torch.testing.assert_close(fused.float()(x), other(x), rtol=1e-5, atol=1e-5)


def test_folding_cache_off_the_cpu_is_dropped_by_a_mode_change():
    """Off the CPU the cache compares versions, not bytes (a write through .data bumps none), so
    .eval() is the documented way to refold: it drops such a fold (meta tensors: any machine)."""
    fused = bam_fused.BAM(48, 8, 2).to("meta").eval()
    first = fused.folded()
    assert fused.folded() is first and fused._fold_state.src is None
    fused.eval()
    assert fused.folded() is not first


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "old_weight_norm"])
def test_folding_follows_parametrized_and_hooked_weights(kind):
    """torch.nn.utils.parametrize computes a weight from tensors the fold's key does not watch
    (a stale fold was 0.27 off after an in-place update of weight_norm's g): such layers are
    folded anew on every call. The older torch.nn.utils.weight_norm sets the weight in a forward
    pre-hook: with a hook the branches run as modules."""
    ref, fused = make_pair(48, 2, 8)
    x = torch.randn(2, 48, 9, 13)
    for m in (ref, fused):
        torch.manual_seed(5)  # spectral_norm starts its power iteration from random vectors
        conv, fc = m.spatial_att.gate_s.gate_s_conv_di_0, m.channel_att.gate_c.gate_c_fc_0
        if kind == "weight_norm":
            torch.nn.utils.parametrizations.weight_norm(conv)
            torch.nn.utils.parametrizations.weight_norm(fc)
        elif kind == "spectral_norm":
            torch.nn.utils.parametrizations.spectral_norm(conv)
        else:
            torch.nn.utils.weight_norm(conv)
        m.eval()  # spectral_norm's power iteration runs on every weight read in training mode
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
        assert fused.folded()["unsupported"] is None  # the op folds parametrized layers too
        for m in (ref, fused):  # in place, as an optimizer does (spectral_norm ignores a scaling)
            conv = m.spatial_att.gate_s.gate_s_conv_di_0
            old = kind == "old_weight_norm"
            first = conv.weight_g if old else next(iter(conv.parametrizations.weight.parameters()))
            first.add_(0.5 * torch.randn(first.shape, generator=torch.Generator().manual_seed(6)))
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)


def _dilated(**kw):
    torch.manual_seed(3)
    return torch.nn.Conv2d(6, 6, **kw)


class _DoubledBatchNorm(torch.nn.BatchNorm2d):
    """A BatchNorm subclass with a forward of its own."""

    def forward(self, x):
        return 2 * super().forward(x)


LAYER_CHANGES = {
    "other dilation": ("gate_s_conv_di_0", lambda: _dilated(kernel_size=3, padding=1, dilation=1)),
    "reflect padding": (
        "gate_s_conv_di_1", lambda: _dilated(kernel_size=3, padding=2, dilation=2, padding_mode="reflect")
    ),
    "5x5 conv": ("gate_s_conv_di_1", lambda: _dilated(kernel_size=5, padding=2)),
    "grouped conv": ("gate_s_conv_di_0", lambda: _dilated(kernel_size=3, padding=2, dilation=2, groups=2)),
    "leaky relu": ("gate_s_relu_di_0", lambda: torch.nn.LeakyReLU(0.2)),
    "batchnorm in training mode": ("gate_s_bn_di_1", lambda: torch.nn.BatchNorm2d(6).train()),
    "batchnorm without running stats": (
        "gate_s_bn_reduce0", lambda: torch.nn.BatchNorm2d(6, track_running_stats=False)
    ),
    "final conv without bias": ("gate_s_conv_final", lambda: torch.nn.Conv2d(6, 1, 1, bias=False)),
    # Same-padded, so the map keeps its size and only the checks below tell them from the stock conv.
    "same-padded conv of another dilation": (
        "gate_s_conv_di_0", lambda: _dilated(kernel_size=3, padding="same", dilation=1)
    ),
    "same-padded 5x5 conv": ("gate_s_conv_di_1", lambda: _dilated(kernel_size=5, padding="same", dilation=2)),
    "batchnorm subclass": ("gate_s_bn_di_0", lambda: _DoubledBatchNorm(6).eval()),
}  # fmt: skip


@pytest.mark.parametrize("change", list(LAYER_CHANGES))
def test_eval_with_layers_the_op_does_not_compute_runs_them(monkeypatch, change):
    """The eval op folds the reference's layers; a replaced one (another dilation or padding
    mode was folded as the stock conv: 0.14 off, silently; a 5x5 conv raised inside the op)
    runs as the module's layers, with one warning, and the fused gate."""
    name, make = LAYER_CHANGES[change]
    ref, fused = make_pair(48, 2, 8)
    with torch.no_grad():
        fused(torch.randn(2, 48, 9, 13))  # a cached fold of the stock layers must not survive
    layer = make()
    for m in (ref, fused):
        setattr(m.spatial_att.gate_s, name, copy.deepcopy(layer))
    x = torch.randn(3, 48, 9, 13)
    monkeypatch.setattr(_backends, "_warned", set())
    with torch.no_grad(), pytest.warns(RuntimeWarning, match=f"run as the module's layers: {name}"):
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    assert fused.folded()["unsupported"].startswith(name)
    # The stock layer back: the op again.
    stock = make_pair(48, 2, 8)[1].spatial_att.gate_s._modules[name]
    setattr(fused.spatial_att.gate_s, name, stock)
    assert fused.folded()["unsupported"] is None


def _append_relu(m, container):
    getattr(m, container).add_module(f"{container}_relu_extra", torch.nn.ReLU())


def _drop_second_dilated_conv(m):
    for kind in ("conv", "bn", "relu"):
        delattr(m.spatial_att.gate_s, f"gate_s_{kind}_di_1")


def _linear_without_bias(m, name):
    """gate_c's Linear `name` replaced by one without bias that shares its weight."""
    old = m.channel_att.gate_c._modules[name]
    new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    new.weight = old.weight
    setattr(m.channel_att.gate_c, name, new)


LAYER_LISTS = {
    "gate_c with a layer more": (
        lambda m: _append_relu(m.channel_att, "gate_c"), "gate_c does not hold the reference's four layers"
    ),
    "gate_s with a layer more": (
        lambda m: _append_relu(m.spatial_att, "gate_s"), "gate_s does not hold the reference's 10 layers"
    ),
    "gate_s with a dilated conv less": (
        _drop_second_dilated_conv, "gate_s does not hold the reference's 10 layers"
    ),
    "final linear without bias": (
        lambda m: _linear_without_bias(m, "gate_c_fc_final"), "gate_c_fc_final is not what the eval op computes"
    ),
}  # fmt: skip


@pytest.mark.parametrize("change", list(LAYER_LISTS))
def test_eval_with_other_layer_lists_runs_them(monkeypatch, change):
    """Extra, missing or bias-free layers (a ReLU appended to a container is of a kind the op
    knows, so only the list of names tells it apart) run as the module's layers."""
    edit, why = LAYER_LISTS[change]
    ref, fused = make_pair(48, 2, 8)
    with torch.no_grad():
        fused(torch.randn(2, 48, 9, 13))  # a cached fold of the stock layers must not survive
    for m in (ref, fused):
        edit(m)
    x = torch.randn(3, 48, 9, 13)
    monkeypatch.setattr(_backends, "_warned", set())
    with torch.no_grad(), pytest.warns(RuntimeWarning, match=f"run as the module's layers: {why}"):
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)


def test_first_linear_without_bias_keeps_the_op():
    # The reference's gate_c_fc_0 may go without bias (a BatchNorm follows it): the op folds it.
    ref, fused = make_pair(48, 2, 8)
    for m in (ref, fused):
        _linear_without_bias(m, "gate_c_fc_0")
    x = torch.randn(3, 48, 9, 13)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    assert fused.folded()["unsupported"] is None


def test_batch_zero_and_one_pixel():
    ref, fused = make_pair(32, 4, 8)
    with torch.no_grad():
        assert fused(torch.randn(0, 32, 5, 5)).shape == (0, 32, 5, 5)
        x = torch.randn(3, 32, 1, 1)
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)


def test_float64_runs_through_reference_branches():
    ref, fused = make_pair(32, 4, 8)
    x = torch.randn(2, 32, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused.double()(x), ref.double()(x), rtol=1e-10, atol=1e-10)


def test_fallback_when_extension_is_missing(no_extension):
    ref, fused = make_pair(48, 4, 8)
    x = torch.randn(2, 48, 9, 13)
    with pytest.warns(RuntimeWarning, match="using the reference gate: simulated"):
        with torch.no_grad():
            out = fused(x)
    with torch.no_grad():
        torch.testing.assert_close(out, ref(x), rtol=1e-6, atol=1e-6)
    info = bam_fused.info()
    assert not info["kernels"]["gate (C++, CPU)"]["active"]
    assert "simulated" in info["kernels"]["branches (C++, CPU)"]["reason"]
    strict = bam_fused.BAM(48, 8, backend="fused").eval()
    with pytest.raises(_backends.BackendUnavailable, match="backend='cpp' cannot run: simulated"):
        strict(x)


def test_branch_op_bad_inputs():
    _, fused = make_pair(32, 4, 8)
    f = fused.folded()
    x = torch.randn(2, 32, 5, 5)
    args = (f["red_b"], f["dil_w"], f["dil_b"], 4, f["fin_w"], f["fin_b"])
    with pytest.raises(ValueError, match=r"w_reduce must have shape \(Cr, 32\)"):
        bam_branches(x, f["red_w"][:, :16], *args)
    with pytest.raises(ValueError, match="dilation must be an integer >= 1, got 0"):
        bam_branches(x, f["red_w"], f["red_b"], f["dil_w"], f["dil_b"], 0, f["fin_w"], f["fin_b"])
    with pytest.raises(ValueError, match="w_dilated and b_dilated must have one entry per conv"):
        bam_branches(x, f["red_w"], f["red_b"], f["dil_w"], f["dil_b"][:1], 4, f["fin_w"], f["fin_b"])
    with pytest.raises(ValueError, match="b_reduce is on meta but x is on cpu"):
        bam_branches(x, f["red_w"], f["red_b"].to("meta"), *args[1:])
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        bam_branches(x.long(), f["red_w"], *args)
    with pytest.raises(TypeError, match=r"w_reduce must be a dense \(strided\) tensor, got layout sparse_coo"):
        bam_branches(x, f["red_w"].to_sparse(), *args)
    with pytest.raises(ValueError, match=r"x must have H, W >= 1"):
        bam_branches(x[:, :, :0], f["red_w"], *args)


def _strided(t):  # the same values, not contiguous
    return torch.stack([t, t], -1)[..., 0]


@pytest.mark.parametrize("cr", [1, 2])
def test_branch_op_takes_conv_shaped_strided_and_float64_weights(cr):
    _, fused = make_pair(16 * cr, 4, 16)
    f = fused.folded()
    x = torch.randn(2, 16 * cr, 5, 7)
    want = bam_branches(x, f["red_w"], f["red_b"], f["dil_w"], f["dil_b"], 4, f["fin_w"], f["fin_b"])
    got = bam_branches(
        x, f["red_w"].double()[:, :, None, None], _strided(f["red_b"]), [_strided(w.double()) for w in f["dil_w"]],
        [_strided(b) for b in f["dil_b"]], 4, f["fin_w"].reshape(1, cr, 1, 1), _strided(f["fin_b"]).double(),
    )  # fmt: skip
    for a, b in zip(got, want, strict=True):  # (fp32 values through fp64: exact)
        assert torch.equal(a, b)
    args = (f["red_b"], f["dil_w"], f["dil_b"], 4, f["fin_w"], f["fin_b"])
    for bad in (f["red_w"][:, :, None], f["red_w"][:, :, None, None].expand(cr, 16 * cr, 1, 2)):
        with pytest.raises(ValueError, match=rf"w_reduce must have shape \(Cr, {16 * cr}\) or \(Cr, {16 * cr}, 1, 1\)"):
            bam_branches(x, bad, *args)
    with pytest.raises(TypeError, match="b_reduce must have a floating dtype"):
        bam_branches(x, f["red_w"], f["red_b"].long(), *args[1:])


def test_branch_op_own_checks():
    # The op checks what bam_branches does not (it is also called directly by BAM).
    _, fused = make_pair(32, 4, 8)
    f = fused.folded()
    op = bam_fused.ops.branches.load_op()
    x = torch.randn(2, 32, 5, 5)
    rest = (f["dil_w"], f["dil_b"], 4, f["fin_w"], f["fin_b"])
    with pytest.raises(RuntimeError, match="w_reduce must have at least one row"):
        op(x, f["red_w"][:0], f["red_b"][:0], [], [], 4, f["fin_w"][:0], f["fin_b"])
    with pytest.raises(RuntimeError, match=r"b_dilated\[1\] must be fp32 with 4 elements"):
        op(x, f["red_w"], f["red_b"], f["dil_w"], [f["dil_b"][0], f["dil_b"][1][:2]], 4, f["fin_w"], f["fin_b"])
    with pytest.raises(RuntimeError, match="w_final must be fp32"):
        op(x, f["red_w"], f["red_b"], *rest[:3], f["fin_w"].double(), f["fin_b"])


def test_branch_op_opcheck():
    _, fused = make_pair(16, 2, 4)
    f = fused.folded()
    op = bam_fused.ops.branches.load_op()
    for x in (torch.randn(2, 16, 5, 7), torch.randn(2, 16, 5, 7).to(memory_format=torch.channels_last)):
        args = (x, f["red_w"].reshape(4, 16).contiguous(), f["red_b"], f["dil_w"], f["dil_b"], 2,
                f["fin_w"].reshape(-1).contiguous(), f["fin_b"])  # fmt: skip
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def attention_args(x, f, dilation):
    return (x, f["red_w"], f["red_b"], f["dil_w"], f["dil_b"], dilation, f["fin_w"], f["fin_b"],
            f["fc0_w"], f["fc0_b"], f["fc1_w"], f["fc1_b"])  # fmt: skip


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_attention_op_gives_both_maps(layout):
    ref, fused = make_pair(48, 2, 8)
    x = make_layout(torch.randn(3, 48, 9, 13), layout)
    channel, spatial = bam_fused.ops.branches.load_op("attention")(*attention_args(x, fused.folded(), 2))
    with torch.no_grad():
        ref64, x64 = ref.double(), x.double()
        torch.testing.assert_close(channel.double(), ref64.channel_att(x64), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(spatial.double(), ref64.spatial_att(x64)[:, 0], rtol=1e-4, atol=1e-5)


def test_attention_op_bad_mlp_weights():
    _, fused = make_pair(16, 2, 4)
    f = dict(fused.folded())
    op = bam_fused.ops.branches.load_op("attention")
    x = torch.randn(2, 16, 5, 7)
    bad_inputs = [("fc0_w", f["fc0_w"][:, :8], "w_fc0"), ("fc1_b", f["fc1_b"][:3], "b_fc1"),
                  ("fc1_w", f["fc1_w"].double(), "w_fc1"), ("fc0_b", f["fc0_b"].half(), "b_fc0")]  # fmt: skip
    for key, bad, needle in bad_inputs:
        with pytest.raises(RuntimeError, match=needle):
            op(*attention_args(x, {**f, key: bad}, 2))


def test_attention_op_opcheck():
    _, fused = make_pair(16, 2, 4)
    op = bam_fused.ops.branches.load_op("attention")
    for x in (torch.randn(2, 16, 5, 7), torch.randn(2, 16, 5, 7).to(memory_format=torch.channels_last)):
        torch.library.opcheck(op, attention_args(x, fused.folded(), 2), test_utils=("test_schema", "test_faketensor"))


# Cr 16 (C 48 / 3): our dilated convs under auto; Cr 6 (48 / 8): oneDNN's.
@pytest.mark.parametrize("r", [3, 8])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("combine", ["sum", "product"])
def test_bam_eval_op_is_the_attention_op_then_the_gate(r, layout, dtype, combine):
    _, fused = make_pair(48, 4, r, combine)
    x = make_layout(torch.randn(3, 48, 9, 13).to(dtype), layout)
    f = fused.folded()
    out = bam_fused.ops.branches.load_op("bam_eval")(*attention_args(x, f, 4), combine == "product")
    channel, spatial = bam_fused.ops.branches.load_op("attention")(*attention_args(x, f, 4))
    assert out.dtype == dtype
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    assert torch.equal(out, bam_fused.ops.bam_gate(x, channel, spatial, combine, backend="cpp"))
    with torch.no_grad():
        assert torch.equal(fused(x), out)  # the module's eval path on the CPU is this op
        # Other strides: the module makes x NCHW-contiguous first, with the same bits.
        assert torch.equal(fused(make_layout(x, "strided")), fused(x.contiguous()))


def test_bam_eval_op_errors_name_it():
    _, fused = make_pair(16, 2, 4)
    f = fused.folded()
    op = bam_fused.ops.branches.load_op("bam_eval")
    x = torch.randn(2, 16, 5, 7)
    with pytest.raises(RuntimeError, match=r"bam_fused_C::bam_eval: x must be 4-D"):
        op(*attention_args(x[0], f, 2), False)
    with pytest.raises(RuntimeError, match=r"bam_fused_C::bam_eval: w_reduce must be contiguous fp32 \(Cr, 16\)"):
        op(*attention_args(x, {**f, "red_w": f["red_w"][0, 0]}, 2), False)
    with pytest.raises(RuntimeError, match=r"bam_fused_C::bam_eval: w_fc1 must be contiguous fp32"):
        op(*attention_args(x, {**f, "fc1_w": f["fc1_w"].double()}, 2), False)
    with pytest.raises(RuntimeError, match=r"x must be fp32, fp16 or bf16"):
        op(*attention_args(x.double(), f, 2), False)
    with pytest.raises(RuntimeError, match=r"bam_fused_C::bam_eval: x must be NCHW- or channels_last-contiguous"):
        op(*attention_args(x.transpose(2, 3), f, 2), False)


def test_bam_eval_op_opcheck():
    _, fused = make_pair(64, 2, 4)  # Cr 16: our dilated convs
    op = bam_fused.ops.branches.load_op("bam_eval")
    for x in (torch.randn(2, 64, 5, 7), torch.randn(2, 64, 5, 7).to(memory_format=torch.channels_last)):
        for product in (False, True):
            args = (*attention_args(x, fused.folded(), 2), product)
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


# Auto's choice of the CPU dilated convs in eval: ours at 16 and 32 reduced channels, at 64 under
# AVX2 (where our Winograd conv beat oneDNN's), below 16 on small maps (N * H * W * Cr <= 25088:
# ResNet-18/34's first two BAMs at batch 1-2 / 1-4) and above 32 under AVX-512 on small maps
# (N * H * W * Cr <= 50176), oneDNN's otherwise. The two differ in rounding, which tells them
# apart. isa None: the CPU's own.
@pytest.mark.parametrize(
    "n,c,h,w,isa,ours",
    [(1, 64, 56, 56, None, True), (2, 64, 56, 56, None, True), (3, 64, 56, 56, None, False),
     (4, 128, 28, 28, None, True), (5, 128, 28, 28, None, False), (8, 256, 14, 14, None, True),
     (1, 1024, 14, 14, "avx2", True), (2, 1024, 14, 14, "avx2", True), (1, 1024, 14, 14, "generic", False),
     (1, 2048, 7, 7, "avx2", False), (4, 1024, 14, 14, "avx512", True), (5, 1024, 14, 14, "avx512", False),
     (1, 1024, 14, 14, "avx512_bf16", True), (8, 2048, 7, 7, "avx512", True), (9, 2048, 7, 7, "avx512", False)],
)  # fmt: skip
def test_cpu_eval_auto_picks_the_dilated_convs_by_channels_and_map(monkeypatch, n, c, h, w, isa, ours):
    if isa is not None:
        isa_env(monkeypatch, isa)
    fused = bam_fused.BAM(c, backend="fused").eval()
    randomize_(fused)
    x = torch.randn(n, c, h, w)
    out = {}
    for choice in ("auto", "kernel", "library"):
        monkeypatch.setenv("BAM_FUSED_CPU_SPATIAL", choice)
        with torch.no_grad():
            out[choice] = fused(x)
    assert not torch.equal(out["kernel"], out["library"])
    assert torch.equal(out["auto"], out["kernel" if ours else "library"])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_fused_bam_eval_at_64_reduced_channels(monkeypatch, layout, n, isa):
    # Auto runs our convs there under AVX2 and, on these small maps, under AVX-512 (Winograd from
    # N*H*W >= 784): the whole BAM against float64.
    isa_env(monkeypatch, isa)
    ref = randomize_(RefBAM(1024, 16, 4)).eval()
    fused = bam_fused.BAM(1024, 16, 4, backend="fused").eval()
    fused.load_state_dict(ref.state_dict())
    x = make_layout(torch.randn(n, 1024, 14, 15), layout)
    with torch.no_grad():
        eager = ref(x)
        result = compare(fused(x), ref.double()(x.double()), eager)
    assert result.passed, result


# Reduced channels 16 and 32, where auto runs our CPU dilated convs (csrc/cpu/dilated_conv.h)
# at any map size; the GRID above has smaller ones, which oneDNN runs on large maps only.
@pytest.mark.parametrize("c,r,h,w,dilation,convs", [(256, 16, 7, 9, 4, 2), (64, 2, 13, 5, 2, 1), (128, 8, 9, 13, 1, 3),
                                                   (256, 8, 3, 2, 4, 2)])  # fmt: skip
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [0, 1, 2])
def test_fused_bam_eval_with_our_cpu_dilated_convs(c, r, h, w, dilation, convs, layout, dtype, n):
    ref = randomize_(RefBAM(c, r, dilation, convs)).eval()
    fused = bam_fused.BAM(c, r, dilation, convs, backend="fused").eval()
    fused.load_state_dict(ref.state_dict())
    assert c // r in (16, 32)
    x = make_layout(torch.randn(n, c, h, w).to(dtype), layout)
    with torch.no_grad():
        out = fused(x)
        truth = ref.double()(x.double())
        eager = ref.to(dtype)(x)
    assert out.shape == x.shape and out.dtype == dtype
    result = compare(out, truth, eager)
    assert result.passed, result


@pytest.fixture
def three_threads():
    """Three threads, so that bam_eval runs samples one a thread and a rest in groups at n = 5."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


def counted(fused, x, *counters):
    """fused(x) without autograd, and how much each of build_info's counters grew meanwhile."""
    before = _ext.build_info()
    with torch.no_grad():
        out = fused(x)
    after = _ext.build_info()
    return out, tuple(after[k] - before[k] for k in counters)


def eval_plan(mode, n, sample_bytes, threads, grouped):
    """bam_eval's walk of a batch of n (csrc/bam_fused.cpp, eval_plan): (samples run one a thread,
    groups run after them)."""
    if mode == "off" or not grouped:
        return 0, 1
    if mode == "images":
        return 0, n
    per_group = min(max((4 << 20) // sample_bytes, 1), n)  # about 4 MiB of x a group
    llc = _ext.build_info()["cpu_last_level_cache_bytes"]
    by_thread = mode == "threads" or (mode == "auto" and threads * sample_bytes <= llc)
    first = n // threads * threads if by_thread and threads > 1 else 0
    return first, -(-(n - first) // per_group)


# bam_eval on the CPU takes the batch sample by sample one a thread, then in groups of samples
# (BAM_FUSED_CPU_GROUPS), each with the whole batch's kernel choices: the same bits as the whole
# batch at once. At n = 5 a group of one sample would otherwise chunk the pooled sums differently
# (chunk_pixels), and at 1024 x 14x15 under AVX2 run the direct dilated convs instead of Winograd.
# With oneDNN's convs (library, and bf16 products below 16 reduced channels, which our bf16 convs
# do not cover) there are no groups. Three threads: three samples one a thread, two in groups.
@pytest.mark.parametrize(
    "c,r,h,w,dilation,convs,spatial,isa",
    [(48, 16, 9, 13, 4, 2, "kernel", None), (37, 16, 7, 9, 2, 1, "kernel", None),
     (256, 16, 7, 9, 4, 2, "winograd", None), (64, 8, 9, 13, 4, 2, "library", None),
     (1024, 16, 14, 15, 4, 2, "auto", "avx2")],
)  # fmt: skip
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("combine", ["sum", "product"])
def test_cpu_eval_groups_give_the_whole_batchs_bits(monkeypatch, three_threads, c, r, h, w, dilation, convs, spatial,
                                                      isa, layout, dtype, combine):  # fmt: skip
    if isa is not None:
        isa_env(monkeypatch, isa)
    if spatial != "auto":
        spatial_env(monkeypatch, spatial)
    ref, fused = make_pair(c, dilation, r, combine, convs)
    x = make_layout(torch.randn(5, c, h, w).to(dtype), layout)
    out, runs = {}, {}
    modes = ("off", "images", "groups", "threads", "auto")
    for mode in modes:
        monkeypatch.setenv("BAM_FUSED_CPU_GROUPS", mode)
        out[mode], runs[mode] = counted(fused, x, "cpu_eval_thread_samples", "cpu_eval_groups")
    grouped = spatial != "library" and not (bf16_products(dtype) and c // r not in (16, 32, 64, 128))
    sample = x[0].numel() * x.element_size()
    assert runs == {m: eval_plan(m, 5, sample, three_threads, grouped) for m in modes}
    if grouped:
        assert runs["threads"] == (3, 2 if sample > 2 << 20 else 1)
    for mode in modes:
        assert torch.equal(out[mode], out["off"]), mode
    with torch.no_grad():
        result = compare(out["threads"], ref.double()(x.double()), ref.to(dtype)(x))
    assert result.passed, result


def test_cpu_eval_auto_runs_samples_by_thread_only_where_they_fit_the_cache(monkeypatch, three_threads):
    """auto: samples one a thread while the threads' samples fit the last-level cache together
    (256 x 28x28 here), groups beyond (one sample of just over a third of the cache a group)."""
    llc = _ext.build_info()["cpu_last_level_cache_bytes"]
    if llc > 64 << 20:
        pytest.skip(f"a {llc >> 20} MiB last-level cache: a batch past it is too large for a test")
    _, fused = make_pair(256, 4, 16, convs=1)  # 16 reduced channels: our convs, so groups
    side = int((llc // 3 // (256 * 4)) ** 0.5) + 1  # 3 threads' samples just past the cache
    monkeypatch.setenv("BAM_FUSED_CPU_GROUPS", "auto")
    for hw, want in ((28, (3, 0)), (side, (0, 3))):
        x = torch.randn(3, 256, hw, hw)
        _, got = counted(fused, x, "cpu_eval_thread_samples", "cpu_eval_groups")
        assert got == want == eval_plan("auto", 3, x[0].numel() * 4, three_threads, True), hw


def test_cpu_eval_error_in_a_thread_reaches_the_caller(monkeypatch, three_threads):
    """A bad variable read by the convs inside a thread's sample raises from the op, named."""
    _, fused = make_pair(48, 4, 16)
    monkeypatch.setenv("BAM_FUSED_CPU_GROUPS", "threads")
    monkeypatch.setenv("BAM_FUSED_CPU_WINOGRAD", "yes")
    with pytest.raises(RuntimeError, match="BAM_FUSED_CPU_WINOGRAD must be auto, on or off, got 'yes'"):
        with torch.no_grad():
            fused(torch.randn(3, 48, 9, 13))


# bam_eval's variables, read on every call (also with the batch in one group); bam-fused info
# shows why a value is refused where build_info reports the variable.
@pytest.mark.parametrize(
    "name,allowed,info",
    [("BAM_FUSED_CPU_GROUPS", "auto, threads, groups, images or off", None),
     ("BAM_FUSED_CPU_PREFETCH", "auto, on or off", "cpu_prefetch")],
)  # fmt: skip
def test_cpu_eval_variables_are_checked(monkeypatch, name, allowed, info):
    _, fused = make_pair(48, 4, 16)
    monkeypatch.setenv(name, "yes")
    message = f"{name} must be {allowed}, got 'yes'"
    with pytest.raises(RuntimeError, match=message), torch.no_grad():
        fused(torch.randn(2, 48, 9, 13))
    if info is not None:
        assert message in _ext.build_info()[info]


# bam_eval on the CPU prefetches each next group of x while the current group's dilated convs
# compute (BAM_FUSED_CPU_PREFETCH, csrc/cpu/cache_hint.h): every line of the next groups, spread
# over the convs' tasks, and the same bits as without. Winograd and direct convs, several tasks
# a conv (29 x 31), one conv, groups of two samples with a short last one (groups: 7 samples of
# 1.8 MiB), channels_last, bf16 (with fp32 convs under AVX2; our bf16 ones at 16 reduced channels
# under AVX512-BF16); the library's convs run no groups, so nothing to prefetch. Auto prefetches
# but for NCHW x under AVX-512 (isa None: the CPU's own).
@pytest.mark.parametrize(
    "c,h,w,convs,spatial,n,layout,dtype,isa",
    [(48, 29, 31, 2, "winograd", 4, "nchw", torch.float32, None),
     (48, 29, 31, 2, "winograd", 4, "nchw", torch.float32, "avx2"),
     (48, 29, 31, 2, "winograd", 4, "nchw", torch.float32, "avx512"),
     (48, 29, 31, 2, "kernel", 3, "channels_last", torch.float32, None),
     (48, 29, 31, 2, "kernel", 3, "channels_last", torch.float32, "avx512"),
     (37, 9, 13, 1, "winograd", 2, "nchw", torch.bfloat16, "avx2"),
     (256, 9, 13, 1, "kernel", 2, "channels_last", torch.bfloat16, None),
     (512, 30, 31, 2, "auto", 7, "nchw", torch.float32, None),
     (48, 9, 13, 2, "library", 3, "nchw", torch.float32, None)],
)  # fmt: skip
def test_cpu_eval_prefetches_the_next_groups_x(monkeypatch, c, h, w, convs, spatial, n, layout, dtype, isa):
    if isa is not None:
        isa_env(monkeypatch, isa)
    if spatial != "auto":
        spatial_env(monkeypatch, spatial)
    monkeypatch.setenv("BAM_FUSED_CPU_GROUPS", "groups" if spatial == "auto" else "images")
    _, fused = make_pair(c, 4, 16, convs=convs)
    x = make_layout(torch.randn(n, c, h, w).to(dtype), layout)
    out, fetched, groups = {}, {}, {}
    for mode in ("off", "on", "auto"):
        monkeypatch.setenv("BAM_FUSED_CPU_PREFETCH", mode)
        out[mode], (fetched[mode], groups[mode]) = counted(fused, x, "cpu_prefetched_bytes", "cpu_eval_groups")
    assert torch.equal(out["on"], out["off"]) and torch.equal(out["auto"], out["off"])
    auto_on = layout == "channels_last" or not _ext.build_info()["cpu_isa"].startswith("avx512")
    assert fetched["off"] == 0 and fetched["auto"] == (fetched["on"] if auto_on else 0)
    sample = x[0].numel() * x.element_size()
    if spatial == "library":
        assert groups["on"] == 1 and fetched["on"] == 0
        return
    # All samples but the first group's, in whole 64-byte lines: at most a line more per conv
    # and group (each conv prefetches its share of the next group from a line boundary).
    assert groups["on"] > 1
    first = min(max((4 << 20) // sample, 1), n) if spatial == "auto" else 1  # samples in a group
    assert groups["on"] == -(-n // first)
    want = (n - first) * sample
    assert want <= fetched["on"] < want + 64 * convs * groups["on"], (fetched, want)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpu_eval_threads_prefetch_their_next_sample(monkeypatch, three_threads, layout):
    """With samples one a thread, each thread's convs prefetch its own next sample's x (three
    threads, seven samples: two each one a thread, the seventh in a group): every line of the
    samples after each thread's first, at most a line more per conv and sample; the same bits."""
    spatial_env(monkeypatch, "winograd")
    monkeypatch.setenv("BAM_FUSED_CPU_GROUPS", "threads")
    _, fused = make_pair(48, 4, 16, convs=2)
    x = make_layout(torch.randn(7, 48, 29, 31), layout)
    out, fetched = {}, {}
    for mode in ("off", "on"):
        monkeypatch.setenv("BAM_FUSED_CPU_PREFETCH", mode)
        out[mode], (fetched[mode], by_thread) = counted(fused, x, "cpu_prefetched_bytes", "cpu_eval_thread_samples")
        assert by_thread == 6
    assert torch.equal(out["on"], out["off"])
    want = (6 - three_threads) * x[0].numel() * x.element_size()
    assert fetched["off"] == 0 and want <= fetched["on"] < want + 64 * 2 * 3, (fetched, want)


def test_cpu_variables_ignore_case_and_spaces_as_python_does(monkeypatch):
    """The extension reads its variables as bam_fused/env.py does (BAM_FUSED_CUDA_OVERLAP is read
    by both): " Images " is images, one group a sample."""
    _, fused = make_pair(48, 4, 16)
    monkeypatch.setenv("BAM_FUSED_CPU_GROUPS", " Images ")
    assert counted(fused, torch.randn(3, 48, 9, 13), "cpu_eval_groups")[1] == (3,)


@pytest.mark.parametrize("change", ["leaky relu", "other dilation"])
def test_compiled_eval_with_layers_the_op_does_not_compute(change):
    """The same under torch.compile(fullgraph=True): no warning there (Dynamo cannot trace one)."""
    name, make = LAYER_CHANGES[change]
    ref, fused = make_pair(48, 2, 8)
    for m in (ref, fused):
        setattr(m.spatial_att.gate_s, name, copy.deepcopy(make()))
    torch._dynamo.reset()
    model = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 48, 9, 13)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_eval_follows_a_layers_own_mode(monkeypatch):
    """A BatchNorm put back in training mode inside an eval BAM (no tensor changes) normalises
    with batch statistics: the cached fold must not serve it."""
    ref, fused = make_pair(48, 2, 8)
    x = torch.randn(3, 48, 9, 13)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
        for m in (ref, fused):
            m.spatial_att.gate_s.gate_s_bn_di_0.train()
        monkeypatch.setattr(_backends, "_warned", set())
        with pytest.warns(RuntimeWarning, match="gate_s_bn_di_0 is not what the eval op computes"):
            torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
