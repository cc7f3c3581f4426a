"""Small builders the tests share."""

import os
import subprocess
import sys
import threading

import pytest
import torch

from bam_fused import _ext
from bam_fused.testing import as_layout

needs_ext = pytest.mark.skipif(_ext.reason() is not None, reason="extension unavailable")

LAYOUTS = ("nchw", "channels_last", "strided")


def make_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout; "strided" is neither NCHW nor channels_last."""
    if layout != "strided":
        return as_layout(x, layout)
    big = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)
    big[..., ::2] = x
    out = big[..., ::2]
    if x.numel() > 0 and x.shape[3] > 1:  # with W == 1 every stride order is dense
        assert not out.is_contiguous() and not out.is_contiguous(memory_format=torch.channels_last)
    return out


def bf16_products(dtype: torch.dtype, isa: str | None = None) -> bool:
    """Whether the CPU branches compute in bf16 (README, "bf16 on the CPU": the pass's products
    with weights rounded to bf16, then bf16 dilated convs): bf16 x under the avx512_bf16
    instruction set (isa, or what BAM_FUSED_CPU_ISA picks now)."""
    if isa is None:
        from bam_fused import _ext

        isa = _ext.build_info()["cpu_isa"]
    return isa == "avx512_bf16" and dtype == torch.bfloat16


def gate_inputs(n=2, c=37, h=7, w=9, dtype=torch.float32, device="cpu", layout="nchw", requires_grad=False):
    x = make_layout(torch.randn(n, c, h, w, dtype=dtype, device=device), layout)
    ca = torch.randn(n, c, dtype=dtype, device=device)
    sa = torch.randn(n, h, w, dtype=dtype, device=device)
    if requires_grad:
        for t in (x, ca, sa):
            t.requires_grad_()
    return x, ca, sa


def run_python(*args: str, timeout: float = 300, triton_interpret: bool = True) -> str:
    """The stdout of `python <args>` in a fresh process, which must exit 0. triton_interpret=False
    runs it without TRITON_INTERPRET (conftest sets it without a GPU): ahead-of-time compiles,
    whose kernels the interpreter would replace."""
    env = None if triton_interpret else {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def run_aot(module: str) -> list[dict]:
    """The JSON results of `python -m <module> --arch 80 90` (an AOT compile check)."""
    import json

    return json.loads(run_python("-m", module, "--arch", "80", "90", timeout=900, triton_interpret=False))


def record_channels_last(monkeypatch, module, op_name: str) -> list[bool]:
    """Patches module.load_op so that the op op_name records, on each call, whether its x came
    channels_last; returns the list it appends to."""
    layouts: list[bool] = []
    real = module.load_op

    def recording(name="branches"):
        op = real(name)
        if name != op_name:
            return op
        return lambda x, *args: layouts.append(x.is_contiguous(memory_format=torch.channels_last)) or op(x, *args)

    monkeypatch.setattr(module, "load_op", recording)
    return layouts


def assert_same_forward_backward(want, got, x: torch.Tensor, grad_rtol: float = 1e-5) -> None:
    """got(x) matches want(x), and so does x's gradient under one random output gradient."""
    xw, xg = (x.clone().requires_grad_() for _ in range(2))
    out_w, out_g = want(xw), got(xg)
    torch.testing.assert_close(out_g, out_w, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out_w)
    out_w.backward(g)
    out_g.backward(g)
    torch.testing.assert_close(xg.grad, xw.grad, rtol=grad_rtol, atol=1e-5)


# Which code runs the CPU dilated convs: ours directly, ours by Winograd's F(2x2, 3x3), oneDNN's.
SPATIAL_CONVS = ("kernel", "winograd", "library")


def spatial_env(monkeypatch, convs: str) -> None:
    """Sets BAM_FUSED_CPU_SPATIAL and BAM_FUSED_CPU_WINOGRAD for one of SPATIAL_CONVS."""
    monkeypatch.setenv("BAM_FUSED_CPU_SPATIAL", "library" if convs == "library" else "kernel")
    monkeypatch.setenv("BAM_FUSED_CPU_WINOGRAD", "on" if convs == "winograd" else "off")


THREADS = 4


def run_threads(work, threads: int = THREADS) -> None:
    """work(k) for k < threads, in that many threads at once (released together), the interpreter
    switching between them every microsecond rather than every 5 ms, so that their Python steps
    interleave; re-raises the first error (an assertion in a thread fails the test)."""
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def target(k: int) -> None:
        try:
            start.wait()
            work(k)
        except BaseException as e:  # noqa: BLE001 (re-raised below, in the test's thread)
            errors.append(e)

    workers = [threading.Thread(target=target, args=(k,)) for k in range(threads)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    if errors:
        raise errors[0]


def bench_row(contender: str, median_ms: float, **fields):
    """A bam_fused.bench.Row of contender and median_ms; fields set any others (the rest are
    placeholders: a CPU's bam_eval row at 2x32x7x9 fp32 NCHW, 1.0 for each figure)."""
    from bam_fused import bench

    row = dict(bench="bam_eval", shape=(2, 32, 7, 9), dtype="fp32", layout="nchw", iqr_ms=0.0, gbps=1.0,
               pct_copy=1.0, roofline_ratio=1.0, copy_gbps=1.0, device="cpu")  # fmt: skip
    return bench.Row(contender=contender, median_ms=median_ms, **{**row, **fields})
