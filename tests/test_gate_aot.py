"""Every Triton gate configuration the launchers use compiles for sm_80 and sm_90 without a
GPU, with zero register spills and 16-byte vector loads where rows are 16-element aligned."""

import subprocess

import pytest
from helpers import run_aot


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
    gate_aot = pytest.importorskip("bam_fused.ops.gate_aot")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        gate_aot.compile_ptx(None, 80)


def test_spill_figures_are_read_from_ptxas(monkeypatch):
    # ptxas -v's report (its words, from a run of the pass kernel with maxnreg=32 on sm_80): each
    # figure from its own field, and the target's name as ptxas spells it.
    gate_aot = pytest.importorskip("bam_fused.ops.gate_aot")
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
