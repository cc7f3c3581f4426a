"""The Triton pass over x, spatial convs and channel MLP compile for sm_80 and sm_90 without a
GPU in every variant their launchers pick: zero register spills, tensor cores, wide copies."""

import pytest
from helpers import run_aot, run_python

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def aot_results():
    return run_aot("bam_fused.ops.pass_aot")


def test_every_variant_compiles_for_both_archs(aot_results):
    seen = {(r["arch"], r["dtype"], r["x_cl"], r["y_cl"], r["cr_pad"], r["row"])
            for r in aot_results if r["kernel"] == "pass"}  # fmt: skip
    assert len(seen) == 2 * 3 * (1 + 2) * 2 * 3  # NCHW twice: rows divisible by 16, and 14x14 rows
    assert {(r["arch"], r["y_cl"]) for r in aot_results if r["kernel"] == "finish"} == {
        (a, c) for a in (80, 90) for c in (False, True)
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
        "cfg = next(c for c in pass_aot.configs() if c['kernel'] == 'pass'); src, warps = pass_aot._source(cfg); "
        "print(*gate_aot.compile_ptx(src, 80, num_warps=warps, maxnreg=32)[1:])"
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
    # the alignment (a stride or Cr it cannot prove gives 4-byte stores), also for 14x14 NCHW x,
    # whose NCHW y rows (HW = 196) take the constant ROW as x's do.
    rows = [r for r in aot_results if r["kernel"] == "pass"]
    assert any(r["row"] for r in rows)
    assert rows and all(r["wide_stores"] for r in rows), [r for r in rows if not r["wide_stores"]]


def test_mlp_kernels_compile_for_both_archs(aot_results):
    seen = {(r["arch"], r["kernel"], r.get("relu")) for r in aot_results if r["kernel"] in ("means", "layer")}
    assert seen == {(a, k, r) for a in (80, 90) for k, r in (("means", None), ("layer", True), ("layer", False))}


def test_pass_convs_and_mlp_layers_run_on_tensor_cores(aot_results):
    passes = [r for r in aot_results if r["kernel"] in ("pass", "conv", "layer")]
    assert passes and all(r["tensor_cores"] for r in passes), [r for r in passes if not r["tensor_cores"]]


def test_relus_keep_nan(aot_results):
    # torch's ReLU keeps NaN; PTX max.f32 (tl.maximum's default) returns the other operand.
    assert all(r["max_drops_nan"] == 0 for r in aot_results), [r for r in aot_results if r["max_drops_nan"]]
    relus = [r for r in aot_results if r["kernel"] in ("pass", "finish", "conv") or r.get("relu")]
    assert relus and all(r["max_keeps_nan"] for r in relus), [r for r in relus if not r["max_keeps_nan"]]
