"""The CUDA branch kernel (csrc/cuda/reduce_pool.cuh) executed on the CPU by a small SIMT
emulator (tests/simt/simt_emu.h: one std::thread per CUDA thread, block barriers, shuffles).
It checks the kernel's indexing, shared-memory tiling and warp reductions without a GPU;
tests/test_cuda.py runs the real thing where a GPU exists."""

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CXX = shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("simt") / "reduce_pool_emu"
    proc = subprocess.run(
        [CXX, "-std=c++20", "-O1", "-pthread", "-x", "c++", "-I", str(ROOT / "csrc"),
         str(ROOT / "tests" / "simt" / "reduce_pool_emu.cpp"), "-o", str(exe)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exe


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "n,c,hw,cr,min_blocks,rows,splits",
    [(2, 37, 63, 5, 1, 16, 1),  # odd everything, scalar loads
     (2, 64, 20, 24, 1, 32, 1),  # 32-row tiles, vector loads (HW % 4 == 0)
     (1, 70, 130, 65, 1, 64, 1),  # two pixel blocks, a ragged channel chunk, two row groups
     (1, 200, 36, 40, 64, 64, 3),  # channel splits (3, 3 and 1 chunks) and the finishing kernel
     (3, 5, 1, 1, 1, 16, 1)],  # one pixel
)  # fmt: skip
def test_reduce_pool_kernel_emulated(emulator, n, c, hw, cr, min_blocks, rows, splits, channels_last):
    rng = np.random.default_rng(n * 1000 + c)
    x = rng.standard_normal((n, c, hw), dtype=np.float32)
    w = (rng.standard_normal((cr, c)) / np.sqrt(c)).astype(np.float32)
    b = (rng.standard_normal(cr) * 0.1).astype(np.float32)
    stored = np.ascontiguousarray(x.transpose(0, 2, 1) if channels_last else x)
    header = struct.pack("6q", n, c, hw, cr, int(channels_last), min_blocks)
    proc = subprocess.run([str(emulator)], input=header + stored.tobytes() + w.tobytes() + b.tobytes(),
                          capture_output=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    got_rows, n_pb, got_splits = struct.unpack("3q", proc.stdout[:24])
    assert (got_rows, got_splits) == (rows, splits), "the plan picked another tiling than this case is meant to test"
    out = np.frombuffer(proc.stdout[24:], dtype=np.float32)
    assert out.size == n * cr * hw + n * n_pb * c
    y = out[: n * cr * hw].reshape(n, cr, hw)
    pooled_part = out[n * cr * hw :].reshape(n, n_pb, c)
    want_y = np.maximum(np.einsum("rc,ncp->nrp", w.astype(np.float64), x.astype(np.float64)) + b[None, :, None], 0)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    assert (pooled_part != -1).all(), "every (sample, pixel block, channel) partial is written"
    np.testing.assert_allclose(pooled_part.sum(1) / hw, x.astype(np.float64).mean(2), rtol=1e-5, atol=1e-6)
