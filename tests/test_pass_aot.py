"""The Triton pass over x, spatial convs and channel MLP compile for sm_80 and sm_90 without a
GPU in every variant their launchers pick: zero register spills, tensor cores, wide copies."""

import itertools

import pytest
import torch
from helpers import run_aot, run_python

pytest.importorskip("triton")
from bam_fused.ops import gate_aot, pass_aot  # noqa: E402


@pytest.fixture(scope="module")
def aot_results():
    return run_aot("bam_fused.ops.pass_aot")


def test_every_variant_compiles_for_both_archs(aot_results):
    resnet = [r for r in aot_results if r["resnet"]]
    passes = {
        (r["arch"], r["dtype"], r["x_cl"], r["y_cl"], r["cr_pad"], r["hw"]) for r in resnet if r["kernel"] == "pass"
    }
    assert passes == set(
        itertools.product((80, 90), ("fp32", "fp16", "bf16"), (False, True), (False, True), (16, 32, 64), (3136, 196))
    )
    # 14x14's rows as the constant ROW, in either layout of x
    assert {(r["arch"], r["x_cl"], r["row"]) for r in resnet if r["kernel"] == "pass"} == set(
        itertools.product((80, 90), (False, True), (0, 196))
    )
    assert {(r["arch"], r["channels_last"], r["hw"]) for r in resnet if r["kernel"] == "finish"} == set(
        itertools.product((80, 90), (False, True), (3136, 196))
    )
    # The odd shape and the 64-bit sizes (y's size of the split sums passed as i64)
    assert {(r["arch"], r["dtype"]) for r in aot_results if r["kernel"] == "pass" and r["i64"] == ["sy_split"]} == set(
        itertools.product((80, 90), ("fp32", "fp16", "bf16"))
    )
    assert {(r["arch"], r["hw"]) for r in aot_results if r["kernel"] == "pass" and not r["resnet"]} == {
        (a, hw) for a in (80, 90) for hw in (63, 3136)
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
        "cfg = next(c for c in pass_aot.configs() if c['kernel'] == 'pass'); "
        "print(*gate_aot.compile_ptx(cfg['source'], 80, **cfg['options'], maxnreg=32)[1:])"
    )
    out = run_python("-c", code, timeout=600, triton_interpret=False)
    registers, spill_stores, spill_loads = map(int, out.split())
    assert registers <= 32 and spill_stores > 0 and spill_loads > 0, out


def test_convs_compile_for_both_archs(aot_results):
    # (dilation 1 and 16: Triton makes the first a constant and marks the second divisible)
    convs = [r for r in aot_results if r["kernel"] == "conv"]
    seen = {(r["arch"], r["cr_pad"], r["final"], r["dilation"]) for r in convs}
    assert seen == set(itertools.product((80, 90), (16, 32, 64), (False, True), (4, 1, 16)))
    assert all(("dilation" in r["equal_to_1"]) == (r["dilation"] == 1) for r in convs)
    assert all(("dilation" in r["divisible"]) == (r["dilation"] == 16) for r in convs)


def test_no_4_byte_copies(aot_results):
    # The pass stages its tiles in 16-byte (8-byte for 16-bit 14x14 rows) copies, in both
    # layouts, and so do the convs on channels_last y (as the Triton path writes it); 4-byte
    # copies (Triton unable to prove alignment) made the NCHW 14x14 pass twice as slow.
    # (At ResNet's shapes: the odd shape's rows of 63 pixels cannot be read 16 bytes at a time.)
    rows = [r for r in aot_results if r["kernel"] in ("pass", "conv") and r["resnet"]]
    assert rows and all(r["narrow_copies"] == 0 for r in rows), [r for r in rows if r["narrow_copies"]]


def test_pass_writes_y_in_wide_stores(aot_results):
    # y (fp32, either layout) leaves in 16-byte stores: Triton proved the stride-1 dimension and
    # the alignment (a stride or Cr it cannot prove gives 4-byte stores), also for 14x14 maps,
    # whose NCHW y rows (HW = 196) take the constant ROW, whatever x's layout.
    rows = [r for r in aot_results if r["kernel"] == "pass" and r["resnet"]]
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


def test_launches_records_the_whole_eval_path():
    kernels = {fn.__name__ for fn, _, _ in pass_aot.launches((8, 1024, 14, 14), 64, torch.float16, x_cl=True)}
    assert kernels == {getattr(module, name).__name__ for module, name in pass_aot.KERNELS.values()}
    # the triton-pass path's NCHW y as well as the all-Triton path's channels_last y
    pass_launches = [k for fn, _, k in pass_aot.launches((2, 256, 56, 56), 16, torch.float32, False) if "Y_CL" in k]
    assert [k["Y_CL"] for k in pass_launches] == [True, False]


@pytest.fixture(scope="module")
def compiled_variants():
    return {gate_aot.variant_key(c["source"], c["options"]) for c in pass_aot.configs()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_variants_stand_for_every_batch(compiled_variants, dtype):
    """The variants compiled (batches 1, 8 and 32) are every variant launched at ResNet-50's BAM
    shapes whatever the batch: Triton specialises integers on divisibility by 16 and equality
    to 1, and the channel split depends on the grid's size."""
    missing = []
    for n, (size, cr), x_cl in itertools.product(
        (2, 3, 16, 17, 48, 64, 256), ((56, 16), (28, 32), (14, 64)), (False, True)
    ):
        for fn, args, kwargs in pass_aot.launches((n, 16 * cr, size, size), cr, dtype, x_cl):
            if gate_aot.variant_key(*gate_aot.launch_source(fn, args, kwargs)) not in compiled_variants:
                missing.append((n, size, fn.__name__, kwargs))
    assert not missing, missing
