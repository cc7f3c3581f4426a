"""The CUDA branch kernels (csrc/cuda/reduce_pool.cuh, spatial_convs.cuh) executed on the CPU by a small SIMT
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


def build(tmp_path_factory, name: str) -> Path:
    if CXX is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("simt") / name
    proc = subprocess.run(
        [CXX, "-std=c++20", "-O1", "-pthread", "-x", "c++", "-I", str(ROOT / "csrc"),
         str(ROOT / "tests" / "simt" / f"{name}.cpp"), "-o", str(exe)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exe


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return build(tmp_path_factory, "reduce_pool_emu")


@pytest.fixture(scope="module")
def spatial_emulator(tmp_path_factory):
    return build(tmp_path_factory, "spatial_convs_emu")


@pytest.mark.parametrize("y_channels_last", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "n,c,hw,cr,min_blocks,rows,splits",
    [(2, 37, 63, 5, 1, 16, 1),  # odd everything, scalar loads
     (2, 64, 20, 24, 1, 32, 1),  # 32-row tiles, vector loads (HW % 4 == 0)
     (1, 70, 130, 65, 1, 64, 1),  # two pixel blocks, a ragged channel chunk, two row groups
     (1, 200, 36, 40, 64, 64, 3),  # channel splits (3, 3 and 1 chunks) and the finishing kernel
     (3, 5, 1, 1, 1, 16, 1)],  # one pixel
)  # fmt: skip
@pytest.mark.parametrize("nan", [False, True])
def test_reduce_pool_kernel_emulated(
    emulator, n, c, hw, cr, min_blocks, rows, splits, channels_last, y_channels_last, nan
):
    rng = np.random.default_rng(n * 1000 + c)
    x = rng.standard_normal((n, c, hw), dtype=np.float32)
    if nan:  # NaN stays NaN through the ReLU, as in torch (fmaxf made it 0)
        x[-1, c // 2, hw // 2] = np.nan
    w = (rng.standard_normal((cr, c)) / np.sqrt(c)).astype(np.float32)
    b = (rng.standard_normal(cr) * 0.1).astype(np.float32)
    stored = np.ascontiguousarray(x.transpose(0, 2, 1) if channels_last else x)
    header = struct.pack("7q", n, c, hw, cr, int(channels_last), min_blocks, int(y_channels_last))
    proc = subprocess.run([str(emulator)], input=header + stored.tobytes() + w.tobytes() + b.tobytes(),
                          capture_output=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    got_rows, n_pb, got_splits = struct.unpack("3q", proc.stdout[:24])
    assert (got_rows, got_splits) == (rows, splits), "the plan picked another tiling than this case is meant to test"
    out = np.frombuffer(proc.stdout[24:], dtype=np.float32)
    assert out.size == n * cr * hw + n * n_pb * c
    y = (
        out[: n * cr * hw].reshape(n, hw, cr).transpose(0, 2, 1)
        if y_channels_last
        else out[: n * cr * hw].reshape(n, cr, hw)
    )
    pooled_part = out[n * cr * hw :].reshape(n, n_pb, c)
    want_y = np.maximum(np.einsum("rc,ncp->nrp", w.astype(np.float64), x.astype(np.float64)) + b[None, :, None], 0)
    assert np.isnan(y).any() == nan
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    assert (pooled_part != -1).all(), "every (sample, pixel block, channel) partial is written"
    np.testing.assert_allclose(pooled_part.sum(1), x.astype(np.float64).mean(2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "n,cr,h,w,dilation,convs,min_blocks,px,groups,wide",
    [(2, 5, 7, 9, 4, 2, 1, 2, 1, 0),  # odd map, two pixels per thread, one partly used block
     (1, 20, 9, 13, 1, 1, 1000, 1, 2, 0),  # one conv, a ragged second channel group, the group sum
     (2, 33, 6, 5, 2, 3, 1, 2, 3, 0),  # three convs, three groups, a one-channel weight slice
     (1, 3, 1, 1, 4, 2, 1, 2, 1, 0),  # one pixel: every tap but the centre is padding
     (1, 4, 3, 3, 5, 2, 1, 2, 1, 0),  # dilation larger than the map
     # 64-bit plane indexing (planes past 2^31 pixels), forced on small maps
     (2, 5, 7, 9, 4, 2, 1, 1, 1, 1),
     (2, 33, 6, 5, 2, 3, 1, 1, 3, 1)],
)  # fmt: skip
@pytest.mark.parametrize("w_channels_last", [False, True])
@pytest.mark.parametrize("nan", [False, True])
def test_spatial_convs_kernel_emulated(
    spatial_emulator, n, cr, h, w, dilation, convs, min_blocks, px, groups, wide, w_channels_last, nan
):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(n * 100 + cr)
    y = rng.standard_normal((n, cr, h, w), dtype=np.float32)
    if nan:  # NaN reaches exactly the dilated neighbours, through ReLUs that keep it, as torch's do
        y[0, 0, h // 2, w // 2] = np.nan
    ws = [(rng.standard_normal((cr, cr, 3, 3)) / np.sqrt(9 * cr)).astype(np.float32) for _ in range(convs)]
    bs = [(rng.standard_normal(cr) * 0.1).astype(np.float32) for _ in range(convs)]
    w_fin = rng.standard_normal(cr, dtype=np.float32)
    b_fin = rng.standard_normal(1, dtype=np.float32)
    blob = struct.pack("9q", n, cr, h, w, dilation, convs, min_blocks, int(w_channels_last), wide) + y.tobytes()
    stored = [np.ascontiguousarray(wi.transpose(0, 2, 3, 1) if w_channels_last else wi) for wi in ws]
    blob += (
        b"".join(wi.tobytes() + bi.tobytes() for wi, bi in zip(stored, bs, strict=True))
        + w_fin.tobytes()
        + b_fin.tobytes()
    )
    proc = subprocess.run([str(spatial_emulator)], input=blob, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got_px, got_groups = struct.unpack("2q", proc.stdout[:16])
    assert (got_px, got_groups) == (px, groups), "the plan picked another tiling than this case is meant to test"
    got = np.frombuffer(proc.stdout[16:], dtype=np.float32).reshape(n, h, w)

    t = torch.from_numpy(y).double()
    for wi, bi in zip(ws, bs, strict=True):
        t = F.conv2d(t, torch.from_numpy(wi).double(), torch.from_numpy(bi).double(), padding=dilation,
                     dilation=dilation).relu()  # fmt: skip
    want = (t * torch.from_numpy(w_fin).double().view(1, cr, 1, 1)).sum(1) + float(b_fin[0])
    assert np.isnan(got).any() == nan
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def mlp_emulator(tmp_path_factory):
    return build(tmp_path_factory, "channel_mlp_emu")


@pytest.mark.parametrize("n,p,c,cr", [(2, 3, 37, 5), (1, 1, 300, 19), (3, 2, 8, 9)])  # C > threads, Cr > warps
def test_channel_mlp_kernel_emulated(mlp_emulator, n, p, c, cr):
    rng = np.random.default_rng(n * 10 + c)
    part = rng.standard_normal((n, p, c), dtype=np.float32)
    w0 = (rng.standard_normal((cr, c)) / np.sqrt(c)).astype(np.float32)
    b0 = rng.standard_normal(cr, dtype=np.float32)
    w1 = rng.standard_normal((c, cr), dtype=np.float32)
    b1 = rng.standard_normal(c, dtype=np.float32)
    blob = struct.pack("4q", n, p, c, cr) + b"".join(a.tobytes() for a in (part, w0, b0, w1, b1))
    proc = subprocess.run([str(mlp_emulator)], input=blob, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.frombuffer(proc.stdout, dtype=np.float32).reshape(2, n, c)
    mean = part.astype(np.float64).sum(1)
    want = np.maximum(mean @ w0.T.astype(np.float64) + b0, 0) @ w1.T.astype(np.float64) + b1
    np.testing.assert_allclose(got[0], mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], want, rtol=1e-4, atol=1e-4)
