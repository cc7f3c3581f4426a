"""The Triton pass over x, spatial convs and channel MLP compile for sm_80 and sm_90 without a
GPU in every variant their launchers pick: zero register spills, tensor cores, wide copies."""

import itertools

import pytest
import torch
from helpers import run_aot, run_python

pytest.importorskip("triton")
from bam_fused.ops import gate_aot, mlp_triton, pass_aot, pass_triton, spatial_triton  # noqa: E402


@pytest.fixture(scope="module")
def aot_results():
    return run_aot("bam_fused.ops.pass_aot")


def test_every_variant_compiles_for_both_archs(aot_results):
    seen = {(r["arch"], r["dtype"], r["x_cl"], r["y_cl"], r["cr_pad"], r["hw"])
            for r in aot_results if r["kernel"] == "pass"}  # fmt: skip
    assert len(seen) == 2 * 3 * 2 * 2 * 3 * 2  # HW divisible by 16, and 14x14's 196
    assert {(r["arch"], r["row"]) for r in aot_results if r["kernel"] == "pass" and not r["x_cl"]} == {
        (a, row) for a in (80, 90) for row in (0, 196)
    }
    assert {(r["arch"], r["y_cl"], r["hw"]) for r in aot_results if r["kernel"] == "finish"} == {
        (a, c, hw) for a in (80, 90) for c in (False, True) for hw in (3136, 196)
    }


def test_zero_register_spills(aot_results):
    spilled = [r for r in aot_results if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, spilled
    assert all(0 < r["registers"] <= 255 for r in aot_results)


def test_spills_are_seen():
    """The zero-spill tests could pass on anything if spills went unseen: the pass kernel squeezed
    into 32 registers (a limit ptxas meets by spilling on sm_80) must report spill stores and
    loads."""
    code = (
        "from bam_fused.ops import gate_aot, pass_aot; "
        "cfg = next(c for c in pass_aot.configs() if c['kernel'] == 'pass'); src, options = pass_aot._source(cfg); "
        "print(*gate_aot.compile_ptx(src, 80, **options, maxnreg=32)[1:])"
    )
    out = run_python("-c", code, timeout=600, triton_interpret=False)
    registers, spill_stores, spill_loads = map(int, out.split())
    assert registers <= 32 and spill_stores > 0 and spill_loads > 0, out


def test_convs_compile_for_both_archs(aot_results):
    seen = {(r["arch"], r["cr_pad"], r["final"]) for r in aot_results if r["kernel"] == "conv"}
    assert len(seen) == 2 * 3 * 2


def test_no_4_byte_copies(aot_results):
    # The pass stages its tiles in 16-byte (8-byte for 16-bit 14x14 rows) copies, in both
    # layouts, and so do the convs on channels_last y (as the Triton path writes it); 4-byte
    # copies (Triton unable to prove alignment) made the NCHW 14x14 pass twice as slow.
    rows = [r for r in aot_results if r["kernel"] in ("pass", "conv")]
    assert rows and all(r["narrow_copies"] == 0 for r in rows), [r for r in rows if r["narrow_copies"]]


def test_pass_writes_y_in_wide_stores(aot_results):
    # y (fp32, either layout) leaves in 16-byte stores: Triton proved the stride-1 dimension and
    # the alignment (a stride or Cr it cannot prove gives 4-byte stores), also for 14x14 maps,
    # whose NCHW y rows (HW = 196) take the constant ROW, whatever x's layout.
    rows = [r for r in aot_results if r["kernel"] == "pass"]
    assert any(r["row"] for r in rows)
    assert rows and all(r["wide_stores"] for r in rows), [r for r in rows if not r["wide_stores"]]


def test_mlp_kernels_compile_for_both_archs(aot_results):
    seen = {
        (r["arch"], r["kernel"], r.get("relu"), r.get("block_k"))
        for r in aot_results
        if r["kernel"] in ("means", "layer")
    }
    want = [
        ("means", None, None),
        ("layer", True, 64),
        ("layer", False, 16),
        ("layer", False, 32),
        ("layer", False, 64),
    ]
    assert seen == {(a, *k) for a in (80, 90) for k in want}


def test_pass_convs_and_mlp_layers_run_on_tensor_cores(aot_results):
    passes = [r for r in aot_results if r["kernel"] in ("pass", "conv", "layer")]
    assert passes and all(r["tensor_cores"] for r in passes), [r for r in passes if not r["tensor_cores"]]


def test_relus_keep_nan(aot_results):
    # torch's ReLU keeps NaN; PTX max.f32 (tl.maximum's default) returns the other operand.
    assert all(r["max_drops_nan"] == 0 for r in aot_results), [r for r in aot_results if r["max_drops_nan"]]
    relus = [r for r in aot_results if r["kernel"] in ("pass", "finish", "conv") or r.get("relu")]
    assert relus and all(r["max_keeps_nan"] for r in relus), [r for r in relus if not r["max_keeps_nan"]]


def _variant(src, options: dict) -> tuple:
    # (Triton's defaults where a launch gives no options: 4 warps, 3 stages)
    return src.signature, src.constants, src.attrs, options.get("num_warps", 4), options.get("num_stages", 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_aot_compiles_what_the_launchers_launch(monkeypatch, dtype):
    """The AOT checks are only as good as their mirror of the runtime: every Triton launch of the
    CUDA eval path at ResNet-50's BAM shapes (N = 8, 132 multiprocessors: channel splits), both
    x and y layouts, is one of pass_aot's variants to the letter (types, constants,
    divisibility, warps, stages, by Triton's own specialisation rule). Nothing runs."""
    monkeypatch.setattr(pass_triton, "_multiprocessors", lambda device: 132)
    kernels = [(pass_triton, "_pass_kernel"), (pass_triton, "_finish_kernel"), (spatial_triton, "_dilated_conv_kernel"),
               (mlp_triton, "_means_kernel"), (mlp_triton, "_layer_kernel")]  # fmt: skip
    n = 8
    with gate_aot.recorded_launches(*kernels) as launches:
        for hw, cr in ((56, 16), (28, 32), (14, 64)):
            c = 16 * cr
            for x_format, y_cl in itertools.product((torch.contiguous_format, torch.channels_last), (False, True)):
                x = torch.empty(n, c, hw, hw, dtype=dtype, memory_format=x_format)
                part, y = pass_triton.reduce_pool(x, torch.empty(cr, c), torch.empty(cr), y_cl)
                ws = [torch.empty(cr, cr, 3, 3, memory_format=torch.channels_last) for _ in range(2)]
                spatial_triton.spatial_map(y, ws, [torch.empty(cr)] * 2, 4, torch.empty(cr), torch.empty(1))
                mlp_triton.channel_mlp(part, torch.empty(cr, c), torch.empty(cr), torch.empty(c, cr), torch.empty(c))
    assert {fn.__name__ for fn, _, _ in launches} == {getattr(m, name).__name__ for m, name in kernels}
    compiled = [_variant(*pass_aot._source(cfg)) for cfg in pass_aot.configs()]
    missing = [(fn.__name__, kwargs) for fn, args, kwargs in launches
               if _variant(*gate_aot.launch_source(fn, args, kwargs)) not in compiled]  # fmt: skip
    assert not missing, missing
