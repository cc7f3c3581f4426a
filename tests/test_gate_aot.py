"""Every Triton gate configuration the launchers use compiles for sm_80 and sm_90 without a
GPU, with zero register spills and 16-byte vector loads where rows are 16-element aligned."""

import subprocess

import pytest
import torch
from helpers import run_aot

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from bam_fused.ops import gate_aot, gate_triton  # noqa: E402


@pytest.fixture(scope="module")
def aot_results():
    return run_aot("bam_fused.ops.gate_aot")


def test_every_config_compiles_for_both_archs(aot_results):
    seen = {(r["arch"], r["kernel"], r["dtype"], r["constexprs"]["PRODUCT"]) for r in aot_results}
    for arch in (80, 90):
        for kernel in ("fwd", "bwd"):
            for dtype in ("fp32", "fp16", "bf16"):
                for product in (False, True):
                    assert (arch, kernel, dtype, product) in seen


def test_the_backward_candidates_compile(aot_results):
    # The tiles gpu_probe.py's gate step times against the launcher's (gate_triton.BWD_CANDIDATES)
    # compile too, with zero spills and 16-byte loads (the tests below cover every row): a GPU
    # session's minutes go to timing them, not to a compile error.
    candidates = [r for r in aot_results if r["candidate"]]
    for arch in (80, 90):
        for dtype in ("fp32", "bf16"):
            mine = [r for r in candidates if r["arch"] == arch and r["dtype"] == dtype]
            assert {(r["constexprs"]["ACC_2D"], r["constexprs"]["STAGES"]) for r in mine} == {
                (acc_2d, stages) for _, _, acc_2d, stages in gate_triton.BWD_CANDIDATES
            }
    assert all(r["constexprs"]["STAGES"] == 1 for r in aot_results if r["kernel"] == "bwd" and not r["candidate"])


def test_64_bit_offsets_compile(aot_results):
    assert {r["arch"] for r in aot_results if r["constexprs"]["INT64"]} == {80, 90}


def test_zero_register_spills(aot_results):
    spilled = [r for r in aot_results if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, spilled
    assert all(0 < r["registers"] <= 255 for r in aot_results)


def test_vector_loads_on_aligned_rows(aot_results):
    aligned = [r for r in aot_results if r["l_div16"]]
    assert aligned and all(r["vector_loads"] for r in aligned), [r for r in aligned if not r["vector_loads"]]


def test_refuses_to_compile_under_the_interpreter(monkeypatch):
    # TRITON_INTERPRET=1 replaces the kernels with Python: nothing would reach ptxas.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        gate_aot.compile_ptx(None, 80)


def test_spill_figures_are_read_from_ptxas(monkeypatch):
    # ptxas -v's report (its words, from a run of the pass kernel with maxnreg=32 on sm_80): each
    # figure from its own field, and the target's name as ptxas spells it.
    log = (
        "ptxas info    : 0 bytes gmem\n"
        "ptxas info    : Compiling entry function '_pass_kernel' for 'sm_80'\n"
        "ptxas info    : Function properties for _pass_kernel\n"
        "    360 bytes stack frame, 448 bytes spill stores, 492 bytes spill loads\n"
        "ptxas info    : Used 32 registers, used 1 barriers, 360 bytes cumulative stack size, 456 bytes cmem[0]\n"
    )
    commands = []

    def ptxas(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr=log)

    monkeypatch.setattr(gate_aot, "_ptxas", lambda: "ptxas")
    monkeypatch.setattr(gate_aot.subprocess, "run", ptxas)
    assert gate_aot._spills("// ptx", 80) == (32, 448, 492)
    assert gate_aot._spills("// ptx", 90) == (32, 448, 492)
    assert [c[:3] for c in commands] == [["ptxas", "-v", "--gpu-name=sm_80"], ["ptxas", "-v", "--gpu-name=sm_90a"]]


def test_launch_source_specialises_as_triton_does():
    # Triton's launcher compiles integers equal to 1 as constants and marks 16-byte aligned
    # pointers and integers divisible by 16; the AOT sources are built by the same rule.
    x, row, col = (torch.empty(s, device="meta") for s in ((2, 48, 196), (2, 48), (2, 196)))
    const = dict(PRODUCT=False, BLOCK_R=16, BLOCK_L=256, L_DIV=4, INT64=False)
    src, options = gate_aot.launch_source(
        gate_triton._gate_fwd_kernel, (x, row, col, x, 48, 196, 3, 1), dict(const, num_warps=8)
    )
    names = list(src.signature)
    assert names == gate_triton._gate_fwd_kernel.arg_names
    assert src.signature["x_ptr"] == "*fp32" and src.signature["R"] == src.signature["L"] == "i32"
    assert {names[i] for (i,) in src.constants} == {"n_lb", *const}  # n_lb == 1
    assert src.constants[(names.index("n_lb"),)] == 1 and src.constants[(names.index("BLOCK_L"),)] == 256
    assert {names[i] for (i,) in src.attrs} == {"x_ptr", "row_ptr", "col_ptr", "out_ptr", "R"}  # not 196, 3
    assert options == {"num_warps": 8}


@triton.jit(do_not_specialize=["n"], do_not_specialize_on_alignment=["q"])
def _unspecialised(p, q, n, m, B: tl.constexpr):
    pass


def test_launch_source_keeps_do_not_specialize():
    t = torch.empty(64)
    src, options = gate_aot.launch_source(_unspecialised, (t, t, 32, 32), {"B": 4})
    assert src.signature == {"p": "*fp32", "q": "*fp32", "n": "i32", "m": "i32", "B": "constexpr"}
    assert set(src.attrs) == {(0,), (3,)}  # p and m; not q (alignment) nor n (value)
    assert src.constants == {(4,): 4} and options == {}


def test_recorded_launches_run_nothing_and_put_the_kernels_back():
    kernel = gate_triton._gate_fwd_kernel
    x, row, col = (torch.empty(s, device="meta") for s in ((1, 4, 16), (1, 4), (1, 16)))
    with pytest.raises(ValueError), gate_aot.recorded_launches((gate_triton, "_gate_fwd_kernel")) as launches:
        gate_triton.gate_forward(x, row, col, True)  # meta tensors: a real launch would fail
        raise ValueError
    assert gate_triton._gate_fwd_kernel is kernel
    ((fn, args, kwargs),) = launches
    assert fn is kernel and all(a is b for a, b in zip(args[:3], (x, row, col), strict=True))
    assert kwargs["PRODUCT"] is True


def test_every_variant_is_one_launch_as_recorded(aot_results):
    # 14x14 NCHW (L = 196: one block of columns) compiles n_lb == 1 as a constant, as the runtime does.
    assert any("n_lb" in r["equal_to_1"] and r["L"] == 196 for r in aot_results)
    assert all(("L" in r["divisible"]) == (r["L"] % 16 == 0) for r in aot_results)
