"""pytest-benchmark suite: the same contenders as `bam-fused bench`, one test each.

    make bench-suite            # or: .venv/bin/python -m pytest benchmarks
    pytest benchmarks --benchmark-group-by=param:bench --benchmark-columns=median,iqr,ops

Groups put eager, compiled and fused side by side per benchmark; GB/s and the copy bandwidth
are in `bam-fused bench` (this suite reports times only).
"""

import pytest
import torch

from bam_fused import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = (32, 256, 56, 56) if DEVICE.type == "cuda" else (8, 256, 56, 56)


def _synced(fn):
    if DEVICE.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


def _contenders(name: str):
    if name == "gate_fwd":
        return bench.gate_contenders(SHAPE, torch.float32, "nchw", DEVICE, backward=False)
    if name == "gate_fwd_bwd":
        return bench.gate_contenders(SHAPE, torch.float32, "nchw", DEVICE, backward=True)
    return bench.bam_contenders(SHAPE, torch.float32, "nchw", DEVICE, train=name == "bam_train")


@pytest.mark.parametrize("contender", bench.CONTENDERS)
@pytest.mark.parametrize("bench_name", list(bench.ROOFLINE_BYTES))
def test_bench(benchmark, bench_name, contender):
    fn = _synced(_contenders(bench_name)[contender])
    fn()  # warm-up (and compilation for "compiled")
    benchmark.group = f"{bench_name} {SHAPE} fp32 on {DEVICE.type}"
    benchmark.extra_info.update(shape=SHAPE, device=str(DEVICE), roofline_bytes=bench.ROOFLINE_BYTES[bench_name])
    benchmark(fn)


def test_copy_baseline(benchmark):
    x = torch.randn(SHAPE, device=DEVICE)
    y = torch.empty_like(x)
    benchmark.group = "copy baseline"
    benchmark(_synced(lambda: y.copy_(x)))
