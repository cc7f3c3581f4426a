"""CPU probes that `bam-fused bench` does not cover: where a fused BAM's time goes, and paired
A/B runs of the extension's switches. This VM's memory speed drifts between (and within) runs,
so both interleave their contenders and report medians; the A/B also reports the median of
per-round ratios, which drifts less than either time.

    python benchmarks/cpu_probe.py stages                          # pass, convs + MLP, gate, whole BAM
    python benchmarks/cpu_probe.py ab BAM_FUSED_CPU_SPATIAL library kernel
    python benchmarks/cpu_probe.py ab BAM_FUSED_CPU_STREAM_STORES off on --shape 8,256,56,56
    python benchmarks/cpu_probe.py ab BAM_FUSED_CPU_WINOGRAD off on --train   # training steps
    python benchmarks/cpu_probe.py compiled [--in-model]           # training steps under torch.compile

Eval mode, N = 8 at the ResNet-50 BAM shapes unless --shape says otherwise; fp32 unless --dtype
says otherwise (bf16: the module and x in bf16, as the bench's bf16 rows). In bf16 the stages'
convs run in fp32 (attention_tail takes fp32 y), not in bf16 as the module's do under
avx512_bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable

import torch

import bam_fused
from bam_fused.bench import keep_freed_memory
from bam_fused.ops.branches import load_op
from bam_fused.testing import as_layout, randomize_

SHAPES = [(8, 256, 56, 56), (8, 512, 28, 28), (8, 1024, 14, 14)]


def median_ms(fn: Callable[[], object], calls: int = 7) -> float:
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_bam(shape: tuple, layout: str, dtype: torch.dtype = torch.float32) -> tuple[bam_fused.BAM, torch.Tensor]:
    """A fused BAM and x, both in dtype (as the bench's bf16 rows: the module converted too)."""
    n, c, h, w = shape
    bam = randomize_(bam_fused.BAM(c, backend="fused")).to(dtype).eval()
    return bam, as_layout(torch.randn(n, c, h, w).to(dtype), layout)


def stages(shape: tuple, layout: str, reps: int, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Median ms of each stage, run in sequence as the module runs them (so each finds the
    cache the previous one left), and of the whole module."""
    bam, x = make_bam(shape, layout, dtype)
    n, c, h, w = shape
    f = bam.folded()
    reduce_pool, tail = load_op("reduce_pool"), load_op("attention_tail")
    gate = torch.ops.bam_fused_C.gate_forward
    x3 = x.reshape(n, c, h * w) if layout == "nchw" else x.permute(0, 2, 3, 1).reshape(n, h * w, c)
    times: dict[str, list[float]] = {"pass": [], "convs+mlp": [], "gate": [], "bam": []}
    with torch.inference_mode():
        bam(x)
        for _ in range(reps * 7):
            t0 = time.perf_counter()
            means, y = reduce_pool(x, f["red_w"], f["red_b"], True)
            t1 = time.perf_counter()
            ch, sp = tail(means.view(n, 1, c), y, f["dil_w"], f["dil_b"], bam.dilation, f["fin_w"], f["fin_b"],
                          f["fc0_w"], f["fc0_b"], f["fc1_w"], f["fc1_b"])  # fmt: skip
            t2 = time.perf_counter()
            if layout == "nchw":
                gate(x3, ch, sp.view(n, h * w), False)
            else:  # the (N, HW, C) view: rows are pixels
                gate(x3, sp.view(n, h * w), ch, False)
            t3 = time.perf_counter()
            bam(x)
            t4 = time.perf_counter()
            for key, a, b in zip(times, (t0, t1, t2, t3), (t1, t2, t3, t4), strict=True):
                times[key].append((b - a) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def ab(
    shape: tuple,
    layout: str,
    var: str,
    values: list[str],
    reps: int,
    dtype: torch.dtype = torch.float32,
    train: bool = False,
) -> dict[str, tuple[float, float]]:
    """Whole fused BAM eval (train: a training step, forward + backward) under each value of
    `var`, interleaved: value -> (median ms, median speed-up over the first value)."""
    bam, x = make_bam(shape, layout, dtype)
    if train:
        bam.train()
        x.requires_grad_()
        g = torch.randn_like(x)

        def step() -> object:
            return bam(x).backward(g)
    else:

        def step() -> object:
            return bam(x)

    runs: dict[str, list[float]] = {v: [] for v in values}
    old = os.environ.get(var)
    try:
        with contextlib.nullcontext() if train else torch.inference_mode():
            for _ in range(reps):
                for v in values:
                    os.environ[var] = v
                    runs[v].append(median_ms(step))
    finally:
        if old is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old
    base = runs[values[0]]
    return {
        v: (statistics.median(t), statistics.median(b / a for a, b in zip(t, base, strict=True)))
        for v, t in runs.items()
    }


def _in_model(c: int, bam: torch.nn.Module | None) -> torch.nn.Module:
    """1x1 conv, BatchNorm, ReLU, the BAM (or nothing), 1x1 conv: a BAM among the convolutions
    around which Inductor lays activations out channels_last."""
    torch.manual_seed(1)
    layers = [torch.nn.Conv2d(c, c, 1), torch.nn.BatchNorm2d(c), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, *([bam] if bam is not None else []), torch.nn.Conv2d(c, c, 1)).train()


def compiled(
    shape: tuple, layout: str, reps: int, dtype: torch.dtype = torch.float32, in_model: bool = False
) -> dict[str, tuple]:
    """A training step (forward + backward) of the fused BAM in eager mode and under torch.compile,
    and of torch.compile of the reference, interleaved: name -> (median ms, median speed-up of
    the compiled fused BAM over it). in_model: each inside _in_model, and the model without a BAM
    (eager and compiled) for the BAM's share."""
    from bam_fused.reference import BAM as RefBAM

    # Each shape compiles anew: the contenders share code objects (nn.Sequential.forward in a
    # model), and three shapes' entries passed Dynamo's recompile limit, after which the compiled
    # contenders ran eagerly.
    torch._dynamo.reset()
    n, c, h, w = shape
    ref = randomize_(RefBAM(c)).to(dtype).train()
    fused = bam_fused.BAM(c, backend="fused").to(dtype).train()
    fused.load_state_dict(ref.state_dict())
    if in_model:
        ref, fused, bare = (_in_model(c, m).to(dtype) for m in (ref, fused, None))
    steps = {"fused": fused, "fused compiled": torch.compile(fused), "reference compiled": torch.compile(ref)}
    if in_model:
        steps |= {"no BAM": bare, "no BAM compiled": torch.compile(bare)}
    x = as_layout(torch.randn(shape, dtype=dtype), layout).requires_grad_()
    g = as_layout(torch.randn(shape, dtype=dtype), layout)
    for m in steps.values():
        for _ in range(2):  # compile, then warm up
            m(x).backward(g)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for name, m in steps.items():
            t0 = time.perf_counter()
            m(x).backward(g)
            times[name].append((time.perf_counter() - t0) * 1e3)
    ours = times["fused compiled"]
    return {
        k: (statistics.median(t), statistics.median(a / b for a, b in zip(t, ours, strict=True)))
        for k, t in times.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["stages", "ab", "compiled"])
    parser.add_argument("var", nargs="?", help="ab: the environment variable")
    parser.add_argument("values", nargs="*", help="ab: its values, the first one the baseline")
    parser.add_argument("--shape", help="N,C,H,W (default: the three ResNet-50 BAM shapes)")
    parser.add_argument("--layout", choices=["nchw", "channels_last"], default="nchw")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="of x and the module")
    parser.add_argument("--reps", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--in-model", action="store_true", help="compiled: each BAM between 1x1 convs")
    parser.add_argument("--train", action="store_true", help="ab: training steps (forward + backward), not eval")
    args = parser.parse_args(argv)
    if args.what == "ab" and (args.var is None or len(args.values) < 2):
        parser.error("ab needs a variable and at least two values")
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    shapes = [tuple(int(v) for v in args.shape.split(","))] if args.shape else SHAPES
    for shape in shapes:
        if args.what == "compiled":
            runs = compiled(shape, args.layout, args.reps, DTYPES[args.dtype], args.in_model)
            for name, (ms, up) in runs.items():
                print(f"{shape} {args.dtype} {args.layout} {name}: {ms:.3f} ms, fused compiled {up:.3f}x faster")
        elif args.what == "stages":
            st = stages(shape, args.layout, args.reps, DTYPES[args.dtype])
            print(f"{shape} {args.dtype} {args.layout}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in st.items()))
        else:
            runs = ab(shape, args.layout, args.var, args.values, args.reps, DTYPES[args.dtype], args.train)
            mode = "train" if args.train else "eval"
            for v, (ms, up) in runs.items():
                print(
                    f"{shape} {args.dtype} {args.layout} {mode} {args.var}={v}: {ms:.3f} ms, "
                    f"speed-up over {args.values[0]} {up:.3f}x"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
