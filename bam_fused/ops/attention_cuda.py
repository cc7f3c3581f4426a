"""BAM's eval-mode attention maps on CUDA, and which kernels compute them
(BAM_FUSED_CUDA_EVAL, read on every call so that benchmarks can compare them in one process):

- ``kernel``: the extension's attention op end to end: its CUDA-core pass over x
  (csrc/cuda/reduce_pool.cuh), the dilated convs as BAM_FUSED_CUDA_SPATIAL says, the MLP;
- ``triton-pass``: the Triton tensor-core pass over x (ops/pass_triton.py), then the op's tail
  (the same dilated convs and MLP) on its outputs;
- ``triton``: the Triton pass, the Triton tensor-core dilated convs (ops/spatial_triton.py) and
  channel MLP (ops/mlp_triton.py); BAM_FUSED_CUDA_SPATIAL does not apply;
- ``auto`` (default): the first call for each (device, shape, Cr, dtype, layout) times the
  three twice and keeps two picks for the process (about a third of a second, once per shape):
  for plain calls, the fastest back-to-back plain calls (host work and GPU time together, as an
  eager model pays them); for calls captured in a CUDA graph, the least GPU time (graph
  replays). They differ where the host is slow: on the H100 of 2026-11-27 the all-Triton path
  took 132 us of GPU time at 28x28 (the least) but about 1 ms per plain call (eight Triton
  launches).

All compute the same function up to float32 rounding (3xTF32 in the Triton kernels). The
Triton kernels take up to pass_triton.MAX_CR reduced channels and need TF32 tensor cores
(sm_80+); wider reductions, older GPUs, processes without Triton, and untimed shapes met during
CUDA graph capture (where nothing can be timed) run the kernel. Under auto, a Triton path that
fails to compile or launch is skipped with one warning.
"""

from __future__ import annotations

import os
import threading
import time
from typing import NamedTuple

import torch

from .. import _backends, env
from .branches import load_op
from .gate import _forward as _gate_forward  # (the gate's kernels on x and its maps, no autograd)

MODES = ("auto", "kernel", "triton-pass", "triton")


class Picks(NamedTuple):
    """auto's choice for one shape: for plain calls, and for calls captured in a CUDA graph."""

    plain: str
    graph: str


_chosen: dict[tuple, Picks] = {}
# Held while a shape is timed. The timing captures CUDA graphs, which another thread's CUDA work
# (an allocation, a synchronize) can break or be broken by, so other threads meeting an untimed
# shape wait for the picks rather than launch meanwhile.
_timing = threading.RLock()


class _ThreadState(threading.local):
    """What each thread keeps apart: the shapes it is timing (a call made meanwhile, a path calling
    back, runs the kernel), and its side stream per device (two threads capturing CUDA graphs at
    once must not fork onto one stream: it would join both captures)."""

    def __init__(self) -> None:
        self.timing: set[tuple] = set()
        self.side_streams: dict[torch.device, torch.cuda.Stream] = {}


_this_thread = _ThreadState()
_y_layouts: dict[tuple, bool] = {}


def mode() -> str:
    return env.choice("BAM_FUSED_CUDA_EVAL", MODES)


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
        mlp_inputs = (part, f["fc0_w"], f["fc0_b"], f["fc1_w"], f["fc1_b"])
        return run_beside(
            lambda: channel_mlp(*mlp_inputs),
            lambda: spatial_map(y, f["dil_w"], f["dil_b"], dilation, f["fin_w"], f["fin_b"]),
            mlp_inputs,
            x.device.type == "cuda" and overlap(),  # CPU tensors: the Triton interpreter
        )


def overlap() -> bool:
    """Whether the channel MLP runs on a side stream beside the dilated convs
    (BAM_FUSED_CUDA_OVERLAP, as the extension reads it: auto = under CUDA graph capture)."""
    wanted = env.choice("BAM_FUSED_CUDA_OVERLAP", ("auto", "on", "off"))
    if wanted == "auto":
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return wanted == "on"


def run_beside(side, main, side_inputs: tuple, fork: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(side(), main()); with fork, side() runs on a side stream forked from the current one and
    joined back (the extension's run_beside, csrc/cuda/side_stream.cu): the channel MLP and the
    dilated convs each leave most of the GPU idle."""
    if not fork:
        return side(), main()
    current = torch.cuda.current_stream()
    streams = _this_thread.side_streams
    if current.device not in streams:
        streams[current.device] = torch.cuda.Stream(current.device)  # (one of torch's pool of streams)
    other = streams[current.device]
    other.wait_stream(current)
    with torch.cuda.stream(other):
        from_side = side()
    # The caching allocator reuses a freed block in its stream's order: what the side stream
    # read must wait for it (recorded before main() runs, which may raise), and what it wrote
    # (read later on the current stream) for this one.
    for t in side_inputs:
        t.record_stream(other)
    from_main = main()
    current.wait_stream(other)
    from_side.record_stream(current)
    return from_side, from_main


_RUNS = {"kernel": _run_kernel, "triton-pass": _run_triton_pass, "triton": _run_triton}


def _graph_ms(fn) -> float:
    """GPU time of fn in ms: replays of a CUDA graph of it (no host work in it)."""
    import triton.testing

    try:
        # rep: milliseconds of replays per measurement (ten of them): about 0.1 s per path.
        return float(triton.testing.do_bench_cudagraph(fn, rep=5, return_mode="median"))
    except Exception:  # capture refused (an op that cannot be captured): plain calls instead
        return _plain_ms(fn)


def _plain_ms(fn, calls: int = 10, rounds: int = 3) -> float:
    """Wall time per call of back-to-back plain calls, in ms: the host's launches overlap the GPU's
    work as in an eager model, so this is about max(host time, GPU time). The best of a few rounds
    (interference only adds). Not triton's do_bench: it clears the L2 cache between calls, and
    the GPU's time on that hides host time."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e3


def _time_paths(x: torch.Tensor, f: dict, dilation: int) -> Picks:
    """Times every path on x both ways; a Triton path that fails is skipped with one warning."""
    from .gate_triton import on_device_of

    plain, graph = {}, {}
    with on_device_of(x):  # x's GPU current: the timers' streams and synchronize() are that device's
        torch.cuda.synchronize()  # the graph timing runs on a stream of its own: x must be ready
        for name, run in _RUNS.items():
            call = lambda run=run: run(x, f, dilation)  # noqa: E731
            try:
                graph[name] = _graph_ms(call)
                plain[name] = _plain_ms(call)
            except Exception as exc:
                if name == "kernel":  # the extension's own error (bad input or variable): raise it
                    raise
                # A Triton path that cannot run here (a compiler or resource error): skip it.
                graph.pop(name, None)
                why = f"{type(exc).__name__}: {exc}"
                _backends.warn_once(f"eval:{name}:{why}", f"bam_fused: BAM_FUSED_CUDA_EVAL=auto skips {name}: {why}")
    return Picks(min(plain, key=plain.get), min(graph, key=graph.get))


def _call_kind(x: torch.Tensor) -> str | None:
    """The kind of call: "plain", "graph" (inside a CUDA graph capture: nothing can be timed), or None for
    CPU tensors (the interpreter: nothing to time either)."""
    if x.device.type != "cuda":
        return None
    return "graph" if torch.cuda.is_current_stream_capturing() else "plain"


def _has_tf32(device: torch.device) -> bool:
    """Tensor cores with TF32 (sm_80 and later), which the Triton kernels' 3xTF32 products need;
    the interpreter (CPU tensors) has no such limit."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


def _key(x: torch.Tensor, f: dict) -> tuple:
    return (x.device, tuple(x.shape), f["red_w"].shape[0], len(f["dil_w"]), x.dtype, x.is_contiguous(),
            os.environ.get("BAM_FUSED_CUDA_SPATIAL"))  # fmt: skip


def picks(x: torch.Tensor, f: dict) -> Picks | None:
    """auto's two picks for this x, once timed (for probes and tests)."""
    return _chosen.get(_key(x, f))


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
    key = _key(x, f)
    kind = _call_kind(x)
    timed = _chosen.get(key)
    if timed is None:
        if kind != "plain":  # timed at the shape's first plain call
            return "kernel"
        mine = _this_thread.timing
        if key in mine:  # a call made while this thread times this shape
            return "kernel"
        with _timing:
            timed = _chosen.get(key)  # (another thread may have timed it while this one waited)
            if timed is None:
                mine.add(key)
                try:
                    timed = _chosen[key] = _time_paths(x, f, dilation)
                finally:
                    mine.discard(key)  # (after an error the next call times again)
    return timed.graph if kind == "graph" else timed.plain


def attention(x: torch.Tensor, f: dict, dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel MLP's output (N, C) and the spatial map (N, H, W), fp32, of an eval-mode BAM
    with folded weights f (BAM.folded()) on x (NCHW- or channels_last-contiguous)."""
    return _RUNS[choice(x, f, dilation)](x, f, dilation)


def eval_forward(x: torch.Tensor, f: dict, dilation: int, product: bool) -> torch.Tensor:
    """A whole eval-mode BAM forward with no autograd to record (BAM.forward's route on CUDA, and
    its short path for repeated calls): the attention maps, then the Triton gate's forward kernel
    on them, without bam_gate's checks (the maps are ours: fp32, the right shapes and device).
    x NCHW- or channels_last-contiguous; the result in x's dtype and layout."""
    channel, spatial = attention(x, f, dilation)
    n, _, h, w = x.shape
    return _gate_forward(x, channel.contiguous(), spatial.reshape(n, h * w).contiguous(), product, "triton")
