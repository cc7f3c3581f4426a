"""The CPU eval ops keep their packed weights from call to call (csrc/cpu/pack_cache.cpp),
reused only for weights with the same bytes, whoever wrote them."""

import pytest
import torch
from helpers import spatial_env
from test_cpu_pass import ISAS, isa_env

from bam_fused import _ext
from bam_fused.ops.branches import load_op


def counters() -> tuple[int, int]:
    info = _ext.build_info()
    return info["cpu_pack_cache_entries"], info["cpu_pack_cache_hits"]


def branch_args(c: int, cr: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w_reduce, b_reduce = torch.randn(cr, c, generator=g) / c**0.5, torch.randn(cr, generator=g) * 0.1
    w_dil = [torch.randn(cr, cr, 3, 3, generator=g) / (3 * cr**0.5) for _ in range(2)]
    b_dil = [torch.randn(cr, generator=g) * 0.1 for _ in range(2)]
    return [w_reduce, b_reduce, w_dil, b_dil, 4, torch.randn(cr, generator=g), torch.randn(1, generator=g)]


# Packings per call: the 1x1 conv's, then each dilated conv's (the direct conv's too with Winograd).
@pytest.mark.parametrize("ours,packings", [("kernel", 3), ("winograd", 5)])
def test_second_call_reuses_every_packing(monkeypatch, ours, packings):
    spatial_env(monkeypatch, ours)  # Winograd on or off, whatever the instruction set
    x = torch.randn(2, 48, 9, 13)
    args = branch_args(48, 16, 1000 + packings)  # weights no other test packs
    op = load_op()
    entries0, hits0 = counters()
    first = op(x, *args)
    entries1, hits1 = counters()
    # Nothing reused; up to `packings` new entries (fewer where one replaced a stale entry that a
    # freed tensor left at the same address).
    assert hits1 == hits0 and entries1 <= min(entries0 + packings, 64)
    second = op(x, *args)
    assert counters() == (entries1, hits1 + packings)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    monkeypatch.setenv("BAM_FUSED_CPU_PACK_CACHE", "off")
    op(x, *args)
    assert counters() == (entries1, hits1 + packings)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("ours", ["kernel", "winograd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["w_reduce", "w_dilated0", "w_dilated1"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_weights_written_behind_autograd_are_repacked(monkeypatch, isa, ours, dtype, which, layout):
    # Writes through .numpy() (or .data) leave the version counter alone: only the bytes tell.
    # channels_last dilated weights (the module's folded ones) are compared in their own layout.
    isa_env(monkeypatch, isa)
    spatial_env(monkeypatch, ours)
    x = torch.randn(2, 48, 9, 13).to(dtype)
    args = branch_args(48, 16, 7)
    if layout == "channels_last":
        args[2] = [w.contiguous(memory_format=torch.channels_last) for w in args[2]]
    op = load_op()
    before = op(x, *args)
    target = args[0] if which == "w_reduce" else args[2][int(which[-1])]
    target.numpy()[:2] *= -3.0
    monkeypatch.setenv("BAM_FUSED_CPU_PACK_CACHE", "off")
    want = op(x, *args)  # packed afresh
    monkeypatch.delenv("BAM_FUSED_CPU_PACK_CACHE")
    got = op(x, *args)
    assert not torch.equal(want[1], before[1])  # the write changed the map
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("where", [0, -1])
def test_large_weights_written_behind_autograd_are_repacked(where):
    # 1024 x 64 reduce weights (256 KB) are compared over the threads in 64 KB pieces: a write to
    # the first or the last element is seen all the same.
    x = torch.randn(1, 1024, 5, 5)
    args = branch_args(1024, 64, 13)
    op = load_op()
    before = op(x, *args)
    args[0].numpy().reshape(-1)[where] += 1.0
    got = op(x, *args)
    args[0] = args[0].clone()  # other weights at another address: packed afresh
    want = op(x, *args)
    assert not torch.equal(want[1], before[1])  # the write changed the map
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("ours", ["kernel", "winograd"])
def test_same_bytes_in_another_layout_are_repacked(monkeypatch, ours):
    # A transposed view starts at the same address with the same bytes, but they mean other weights.
    spatial_env(monkeypatch, ours)
    x = torch.randn(2, 48, 9, 13)
    args = branch_args(48, 16, 11)
    op = load_op()
    op(x, *args)
    args[2] = [args[2][0].transpose(0, 1), args[2][1]]
    got = op(x, *args)
    monkeypatch.setenv("BAM_FUSED_CPU_PACK_CACHE", "off")
    want = op(x, *args)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_bad_variable_is_named(monkeypatch):
    monkeypatch.setenv("BAM_FUSED_CPU_PACK_CACHE", "yes")
    with pytest.raises(RuntimeError, match="BAM_FUSED_CPU_PACK_CACHE must be auto or off, got 'yes'"):
        load_op()(torch.randn(1, 48, 9, 13), *branch_args(48, 16, 1))
