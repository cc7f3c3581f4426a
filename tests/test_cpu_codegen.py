"""The CPU pass's inner loops keep their accumulators in registers (and the channels_last one prefetches).

conv_tile_loop (csrc/cpu/conv1x1_pool.h) holds 12 accumulators in AVX2's 16 vector registers.
Inlined into its caller, GCC 12 spilled one of them to the stack: a store and a reload every
channel, which made the pass 1.6x slower with x in cache. This reads the machine code of the
extension in use: the loop must be a function of its own, and none of its FMAs may touch the stack.
"""

import platform
import re
import shutil
import subprocess

import pytest

from bam_fused import _ext

NM, OBJDUMP = shutil.which("nm"), shutil.which("objdump")
pytestmark = [
    pytest.mark.skipif(NM is None or OBJDUMP is None, reason="needs binutils (nm, objdump)"),
    pytest.mark.skipif(_ext.reason() is not None, reason="the extension is not built"),
]

FMA = re.compile(r"\bvfn?m(?:add|sub)\w*p[sd]\b")
STACK = re.compile(r"\(%r[sb]p\b")


def functions(lib: str, name: str) -> list[tuple[str, int, int]]:
    """(demangled name, address, size) of the library's functions whose name contains `name`."""
    out = subprocess.run([NM, "-C", "-S", "--defined-only", lib], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        parts = line.split(maxsplit=3)
        if len(parts) == 4 and parts[2] in "tTwW" and name in parts[3]:
            found.append((parts[3], int(parts[0], 16), int(parts[1], 16)))
    return found


def disassembly(lib: str, address: int, size: int) -> str:
    """objdump's listing of the code at [address, address + size)."""
    return subprocess.run(
        [OBJDUMP, "-d", "--no-show-raw-insn", f"--start-address={address}", f"--stop-address={address + size}", lib],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def stack_fmas(lib: str, address: int, size: int) -> tuple[list[str], list[str]]:
    """The FMA instructions of the code at [address, address + size), and those among them that
    read or write the stack."""
    asm = disassembly(lib, address, size)
    fmas = [line.strip() for line in asm.splitlines() if FMA.search(line)]
    return fmas, [line for line in fmas if STACK.search(line)]


@pytest.mark.skipif(not re.search("x86|amd64", platform.machine(), re.I), reason="x86-64 code")
def test_pass_loop_keeps_its_accumulators_in_registers():
    lib = _ext.load().__file__
    vector = [f for f in functions(lib, "conv_tile_loop<") if "Avx2" in f[0] or "Avx512" in f[0]]
    assert any("Avx2" in name for name, _, _ in vector), f"no out-of-line AVX2 conv_tile_loop in {lib}"
    for name, address, size in vector:
        fmas, spilled = stack_fmas(lib, address, size)
        assert fmas, f"{name}: no FMA found (did the loop change?)"
        assert not spilled, f"{name}: FMAs on the stack (a spilled accumulator):\n" + "\n".join(spilled)


@pytest.mark.skipif(not re.search("x86|amd64", platform.machine(), re.I), reason="x86-64 code")
def test_channels_last_pass_prefetches_ahead_and_keeps_fmas_in_registers():
    """The fp32 channels_last pass (conv1x1_pool_cl_*, its blocks inlined) prefetches the tile
    kClAhead tiles on into L2 (prefetcht1) as it multiplies: 1.11x for a channels_last BAM at
    8 x 256 x 56x56 on AVX-512. Its FMAs stay off the stack."""
    lib = _ext.load().__file__
    fp32 = [f for f in functions(lib, "conv1x1_pool_cl_") if "float const*" in f[0] and "bf16" not in f[0]]
    assert any("avx2" in name for name, _, _ in fp32) and any("avx512" in name for name, _, _ in fp32), fp32
    for name, address, size in fp32:
        assert "prefetcht1" in disassembly(lib, address, size), f"{name}: no prefetcht1 (the prefetch is gone)"
        fmas, spilled = stack_fmas(lib, address, size)
        if "generic" not in name:
            assert fmas, f"{name}: no FMA found (did the loop change?)"
        assert not spilled, f"{name}: FMAs on the stack:\n" + "\n".join(spilled)


@pytest.mark.skipif(not re.search("x86|amd64", platform.machine(), re.I), reason="x86-64 code")
def test_bf16_passes_prefetch_ahead():
    """The bf16 passes (avx512_bf16) prefetch x ahead into L2 (prefetcht1): NCHW the next tile's
    rows (pair_tile, inlined into pass_nchw's tile lambdas; 1.09-1.15x for a bf16 BAM at
    8 x 256 x 56x56), channels_last the tile kClAhead tiles on (pass_cl; 1.08x). Their first
    loads of x held 45-48% of the passes' samples without."""
    lib = _ext.load().__file__
    nchw = [f for f in functions(lib, "pass_nchw(bam_fused::Conv1x1PoolJob const&, bam_fused::Bf16 const*") if
            "operator()" in f[0]]  # fmt: skip
    cl = [f for f in functions(lib, "pass_cl<") if "Bf16 const*" in f[0]]
    assert nchw and cl, f"no bf16 pass functions in {lib} (did pass_nchw or pass_cl change?)"
    for name, address, size in nchw + cl:
        assert "prefetcht1" in disassembly(lib, address, size), f"{name}: no prefetcht1 (the prefetch is gone)"


@pytest.mark.skipif(not re.search("x86|amd64", platform.machine(), re.I), reason="x86-64 code")
@pytest.mark.parametrize("row", ["gate_split_row_avx512bf16", "gate_bwd_split_row_avx512bf16"])
def test_bf16_gate_rounds_with_avx512_bf16(row):
    """The bf16 gate's split-exp rows under avx512_bf16 round 32 results a vcvtne2ps2bf16 rather
    than in integer steps (at 8 x 256 x 56x56 the forward 1.15x / 1.17x, the backward 1.20x)."""
    lib = _ext.load().__file__
    rows = functions(lib, row)
    assert rows, f"no {row} in {lib}"
    for name, address, size in rows:
        assert "vcvtne2ps2bf16" in disassembly(lib, address, size), f"{name}: no vcvtne2ps2bf16"
