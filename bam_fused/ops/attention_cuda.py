"""BAM's eval-mode attention maps on CUDA, and which kernels compute them
(BAM_FUSED_CUDA_EVAL, read on every call so that benchmarks can compare them in one process):

- ``kernel``: the extension's attention op end to end: its CUDA-core pass over x
  (csrc/cuda/reduce_pool.cuh), the dilated convs as BAM_FUSED_CUDA_SPATIAL says, the MLP;
- ``triton-pass``: the Triton tensor-core pass over x (ops/pass_triton.py), then the op's tail
  (the same dilated convs and MLP) on its outputs;
- ``triton``: the Triton pass, the Triton tensor-core dilated convs (ops/spatial_triton.py) and
  channel MLP (ops/mlp_triton.py); BAM_FUSED_CUDA_SPATIAL does not apply;
- ``auto`` (default): the first call for each (device, shape, Cr, dtype, layout) times the
  three (GPU time, as CUDA graph replays) and keeps the fastest for the process (about a
  fifth of a second, once per shape).

All compute the same function up to float32 rounding (3xTF32 in the Triton kernels). The
Triton kernels take up to pass_triton.MAX_CR reduced channels and need TF32 tensor cores
(sm_80+); wider reductions, older GPUs, processes without Triton, and untimed shapes met during
CUDA graph capture (where nothing can be timed) run the kernel. Under auto, a Triton path that
fails to compile or launch is skipped with one warning.
"""

from __future__ import annotations

import os

import torch

from .. import _backends
from .branches import load_op

MODES = ("auto", "kernel", "triton-pass", "triton")
_chosen: dict[tuple, str] = {}
_y_layouts: dict[tuple, bool] = {}


def mode() -> str:
    raw = os.environ.get("BAM_FUSED_CUDA_EVAL", "auto").strip().lower() or "auto"
    if raw not in MODES:
        raise ValueError(f"environment variable BAM_FUSED_CUDA_EVAL must be one of {MODES}, got {raw!r}")
    return raw


def _y_channels_last(cr: int, num_dilated: int) -> bool:
    """The layout of y the op's tail reads without a copy (it depends on BAM_FUSED_CUDA_SPATIAL)."""
    key = (cr, num_dilated, os.environ.get("BAM_FUSED_CUDA_SPATIAL"))
    if key not in _y_layouts:
        _y_layouts[key] = bool(torch.ops.bam_fused_C.cuda_y_channels_last(cr, num_dilated))
    return _y_layouts[key]


def _run_kernel(x: torch.Tensor, f: dict, dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    return load_op("attention")(
        x, f["red_w"], f["red_b"], f["dil_w"], f["dil_b"], dilation, f["fin_w"], f["fin_b"],
        f["fc0_w"], f["fc0_b"], f["fc1_w"], f["fc1_b"],
    )  # fmt: skip


def _run_triton_pass(x: torch.Tensor, f: dict, dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    from .gate_triton import on_device_of  # Triton is optional: imported only where it runs
    from .pass_triton import reduce_pool

    tail = load_op("attention_tail")  # loads the extension, which _y_channels_last asks
    with on_device_of(x):
        part, y = reduce_pool(x, f["red_w"], f["red_b"], _y_channels_last(f["red_w"].shape[0], len(f["dil_w"])))
    return tail(
        part, y, f["dil_w"], f["dil_b"], dilation, f["fin_w"], f["fin_b"],
        f["fc0_w"], f["fc0_b"], f["fc1_w"], f["fc1_b"],
    )  # fmt: skip


def _run_triton(x: torch.Tensor, f: dict, dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not f["dil_w"]:  # only the final 1x1 conv: nothing for the conv kernel to do
        return _run_triton_pass(x, f, dilation)
    from .gate_triton import on_device_of
    from .mlp_triton import channel_mlp
    from .pass_triton import reduce_pool
    from .spatial_triton import spatial_map

    with on_device_of(x):
        part, y = reduce_pool(x, f["red_w"], f["red_b"], y_channels_last=True)
        spatial = spatial_map(y, f["dil_w"], f["dil_b"], dilation, f["fin_w"], f["fin_b"])
        return channel_mlp(part, f["fc0_w"], f["fc0_b"], f["fc1_w"], f["fc1_b"]), spatial


_RUNS = {"kernel": _run_kernel, "triton-pass": _run_triton_pass, "triton": _run_triton}


def _time_ms(fn) -> float:
    """GPU time of fn in ms: replays of a CUDA graph of it. Timed as plain calls, the paths with
    more launches lost on host overhead (H200, triton 3.6, 2026-11-26: auto kept the kernel at
    28x28 where the Triton path's GPU time was 146 against 187 us)."""
    import triton.testing

    try:
        # rep: milliseconds of replays per measurement (ten of them): about 0.1 s per path.
        return float(triton.testing.do_bench_cudagraph(fn, rep=5, return_mode="median"))
    except Exception:  # capture refused (an op that cannot be captured): plain calls instead
        return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


def _has_tf32(device: torch.device) -> bool:
    """Tensor cores with TF32 (sm_80 and later), which the Triton kernels' 3xTF32 products need;
    the interpreter (CPU tensors) has no such limit."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


def choice(x: torch.Tensor, f: dict, dilation: int) -> str:
    """Which kernels run for this x: one of "kernel", "triton-pass", "triton" (see the module docstring)."""
    wanted = mode()
    if wanted == "kernel" or _backends.triton_reason(x.device) is not None:
        return "kernel"
    from .pass_triton import MAX_CR

    if f["red_w"].shape[0] > MAX_CR or not _has_tf32(x.device):
        return "kernel"
    if wanted != "auto":
        return wanted
    key = (x.device, tuple(x.shape), f["red_w"].shape[0], len(f["dil_w"]), x.dtype, x.is_contiguous(),
           os.environ.get("BAM_FUSED_CUDA_SPATIAL"))  # fmt: skip
    if key not in _chosen:
        if x.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return "kernel"
        _chosen[key] = "kernel"  # while timing: a re-entrant call must not time again
        torch.cuda.synchronize(x.device)  # the timing runs on a stream of its own: x must be ready
        times = {}
        for name, run in _RUNS.items():
            try:
                times[name] = _time_ms(lambda run=run: run(x, f, dilation))
            except Exception as exc:
                if name == "kernel":  # the extension's own error (bad input or variable): raise it
                    raise
                # A Triton path that cannot run here (a compiler or resource error): skip it.
                why = f"{type(exc).__name__}: {exc}"
                _backends.warn_once(f"eval:{name}:{why}", f"bam_fused: BAM_FUSED_CUDA_EVAL=auto skips {name}: {why}")
        _chosen[key] = min(times, key=times.get)
    return _chosen[key]


def attention(x: torch.Tensor, f: dict, dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel MLP's output (N, C) and the spatial map (N, H, W), fp32, of an eval-mode BAM
    with folded weights f (BAM.folded()) on x (NCHW- or channels_last-contiguous)."""
    return _RUNS[choice(x, f, dilation)](x, f, dilation)
