"""`bam-fused bench`: eager reference, torch.compile of the reference and fused, side by side.

Every row reports its time against the copy bandwidth measured in the same run on the same
tensor (GB/s = bytes / time; bytes per benchmark are the roofline traffic of DESIGN.md). On the
CPU the copy and the contenders take turns (interleaved_ms), so that a drift in the machine's
speed reaches them alike.

    gate_fwd      2|x|   read x, write out
    gate_fwd_bwd  5|x|   forward, then read g and x, write dx
    bam_eval      3|x|   branches read x once, the gate reads x and writes out
    bam_train     9|x|   forward 3|x|, gate backward 3|x|, branch backward 3|x| (read x, update dx)
    resnet50      -      end to end: how much of the network's time its BAMs cost
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__
from .info import _triton_version, cpu_huge_pages, device_name
from .models import resnet50_bam
from .modules import BAM
from .ops.gate import bam_gate
from .reference import BAM as RefBAM
from .reference import bam_gate_reference
from .testing import DTYPES, as_layout, randomize_

ROOFLINE_BYTES = {"gate_fwd": 2, "gate_fwd_bwd": 5, "bam_eval": 3, "bam_train": 9}
CONTENDERS = ("eager", "compiled", "fused")


@dataclass
class Row:
    bench: str
    shape: tuple
    dtype: str
    layout: str
    contender: str
    median_ms: float
    iqr_ms: float
    gbps: float | None
    pct_copy: float | None
    roofline_ratio: float | None
    copy_gbps: float | None
    speedup: dict = field(default_factory=dict)  # fused over each contender (fused rows only)
    # CUDA only: the same call replayed as a CUDA graph, i.e. GPU time without Python and
    # launch overhead (what CUDA graphs or torch.compile's "reduce-overhead" give a user).
    graph_ms: float | None = None
    graph_pct_copy: float | None = None
    graph_speedup: dict = field(default_factory=dict)
    device: str = ""
    device_name: str = ""
    torch: str = torch.__version__
    triton: str | None = None
    bam_fused: str = __version__
    note: str = ""


# -- timing ------------------------------------------------------------------------------
def keep_freed_memory() -> bool:
    """Asks glibc to keep freed memory instead of returning it to the OS (CPU runs).

    With the defaults, a freed 25 MB tensor at the top of the heap is trimmed and the next
    allocation faults every 4 KiB page back in: on the VM this was measured on that cost
    more than the kernels (eager BAM 30 ms instead of 8, fused 24 instead of 6), and which
    contender paid it depended on allocation order. Returns whether the setting took.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def time_ms(fn: Callable[[], object], device: torch.device, budget_s: float = 0.4) -> tuple[float, float]:
    """(median, interquartile range) in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        q25, med, q75 = triton.testing.do_bench(fn, quantiles=[0.25, 0.5, 0.75], rep=int(budget_s * 1000))
        return med, q75 - q25
    import torch.utils.benchmark as tb

    fn()  # warm-up: allocator, caches, lazy compilation
    m = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=budget_s
    )
    return m.median * 1e3, m.iqr * 1e3


CPU_TURNS = 3  # turns per contender of interleaved_ms on the CPU


def interleaved_ms(
    fns: dict[str, Callable[[], object]], device: torch.device, budget_s: float = 0.4, turns: int = CPU_TURNS
) -> dict[str, tuple[float, float]]:
    """(median, interquartile range) in milliseconds of each of fns. On the CPU they take `turns`
    turns in order, budget_s / turns each, and each one's blocks of all its turns are pooled:
    a VM's speed can drift by 1.5x within minutes, and one contender after the other charged a
    slow spell to whichever ran in it. On CUDA one turn each (time_ms)."""
    if device.type == "cuda" or turns <= 1:
        return {k: time_ms(f, device, budget_s) for k, f in fns.items()}
    import torch.utils.benchmark as tb

    for f in fns.values():
        f()  # warm-up: allocator, caches, lazy compilation
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(turns):
        for k, f in fns.items():
            timer = tb.Timer(stmt="fn()", globals={"fn": f}, num_threads=torch.get_num_threads())
            times[k].extend(timer.blocked_autorange(min_run_time=budget_s / turns).times)
    out = {}
    for k, t in times.items():
        q1, _, q3 = statistics.quantiles(t, n=4, method="inclusive") if len(t) > 1 else (t[0],) * 3
        out[k] = (statistics.median(t) * 1e3, (q3 - q1) * 1e3)
    return out


def graph_ms(fn: Callable[[], object], budget_s: float = 0.4) -> float:
    """Median time of fn captured in a CUDA graph and replayed (warmed up on a side stream
    first, as torch.cuda.graph requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay, torch.device("cuda"), budget_s)[0]


def copy_of(x: torch.Tensor) -> Callable[[], object]:
    """A copy of x into a tensor of its own, the bandwidth yardstick of every row."""
    dst = torch.empty_like(x)
    return lambda: dst.copy_(x)


def copy_gbps(x: torch.Tensor, ms: float) -> float:
    """GB/s of a copy of x (read and write) that took ms milliseconds."""
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


# -- the benchmarks: each returns {contender: thunk} --------------------------------------
def _compile(fn):
    # Dynamo's cache is per code object: every shape and dtype of the sweep recompiles the
    # same reference function, and past the default limit it would silently run eager.
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 256))
    return torch.compile(fn, dynamic=False)


def gate_contenders(shape, dtype, layout, device, backward: bool) -> dict[str, Callable]:
    n, c, h, w = shape
    x = as_layout(torch.randn(shape, device=device, dtype=dtype), layout).requires_grad_(backward)
    ca = torch.randn(n, c, device=device, dtype=dtype, requires_grad=backward)
    sa = torch.randn(n, h, w, device=device, dtype=dtype, requires_grad=backward)
    g = as_layout(torch.randn(shape, device=device, dtype=dtype), layout)
    compiled = _compile(bam_gate_reference)
    fns = {
        "eager": lambda: bam_gate_reference(x, ca, sa),
        "compiled": lambda: compiled(x, ca, sa),
        "fused": lambda: bam_gate(x, ca, sa),
    }
    if not backward:
        return {k: (lambda f=f: _no_grad(f)) for k, f in fns.items()}
    return {k: (lambda f=f: f().backward(g)) for k, f in fns.items()}


def _no_grad(f):
    with torch.no_grad():
        return f()


def bam_contenders(shape, dtype, layout, device, train: bool) -> dict[str, Callable]:
    n, c, h, w = shape
    ref = randomize_(RefBAM(c)).to(device=device, dtype=dtype).train(train)
    fused = BAM(c).to(device=device, dtype=dtype).train(train)
    fused.load_state_dict(ref.state_dict())
    compiled = _compile(ref)
    x = as_layout(torch.randn(shape, device=device, dtype=dtype), layout).requires_grad_(train)
    g = as_layout(torch.randn(shape, device=device, dtype=dtype), layout)
    modules = {"eager": ref, "compiled": compiled, "fused": fused}
    if not train:
        return {k: (lambda m=m: _no_grad(lambda: m(x))) for k, m in modules.items()}
    return {k: (lambda m=m: m(x).backward(g)) for k, m in modules.items()}


def resnet_contenders(batch: int, dtype, layout, device, with_compile: bool) -> dict[str, Callable]:
    """ResNet-50 eval forward at 224x224: without BAM, with the reference BAMs, with fused."""
    import torchvision

    plain = torchvision.models.resnet50().to(device=device, dtype=dtype).eval()
    with_ref = resnet50_bam(backend="reference").to(device=device, dtype=dtype).eval()
    with_fused = resnet50_bam(backend="auto").to(device=device, dtype=dtype).eval()
    with_fused.load_state_dict(with_ref.state_dict())
    x = as_layout(torch.randn(batch, 3, 224, 224, device=device, dtype=dtype), layout)
    models = {"no_bam": plain, "eager": with_ref, "fused": with_fused}
    if layout == "channels_last":
        for m in models.values():
            m.to(memory_format=torch.channels_last)
    if with_compile:
        models["compiled"] = _compile(with_ref)
    return {k: (lambda m=m: _no_grad(lambda: m(x))) for k, m in models.items()}


# -- the sweep -------------------------------------------------------------------------------
@dataclass
class Plan:
    device: torch.device
    shapes: list
    dtypes: list
    layouts: list
    resnet_batch: int
    compile_resnet: bool
    budget_s: float


def plan(device: torch.device, quick: bool) -> Plan:
    if device.type == "cuda":
        shapes = [(32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14)]
        return Plan(device, shapes, ["fp32", "bf16"], ["nchw", "channels_last"] if not quick else ["nchw"],
                    32, not quick, 0.2 if quick else 0.5)  # fmt: skip
    shapes = [(8, 256, 56, 56)] + ([] if quick else [(8, 512, 28, 28), (8, 1024, 14, 14)])
    dtypes = ["fp32"] if quick else ["fp32", "bf16"]
    layouts = ["nchw"] if quick else ["nchw", "channels_last"]
    return Plan(device, shapes, dtypes, layouts, 1 if quick else 8, False, 0.3 if quick else 1.0)


def tasks(p: Plan) -> list[tuple[str, tuple, str, str]]:
    out = []
    for shape in p.shapes:
        for dtype in p.dtypes:
            for layout in p.layouts:
                for bench in ROOFLINE_BYTES:
                    out.append((bench, shape, dtype, layout))
    out.append(("resnet50", (p.resnet_batch, 3, 224, 224), p.dtypes[0], p.layouts[0]))
    return out


def run_task(p: Plan, bench: str, shape: tuple, dtype_name: str, layout: str) -> list[Row]:
    device, dtype = p.device, DTYPES[dtype_name]
    meta = dict(device=str(device), device_name=device_name(device), triton=_triton_version())
    if bench == "resnet50":
        fns = resnet_contenders(shape[0], dtype, layout, device, p.compile_resnet)
        times = interleaved_ms(fns, device, p.budget_s)
        base = times.pop("no_bam")[0]
        rows = []
        for k, (med, iqr) in times.items():
            note = f"BAM share {100 * (med - base) / med:.1f}% of {med:.2f} ms (no-BAM net {base:.2f} ms)"
            rows.append(Row(bench, shape, dtype_name, layout, k, med, iqr, None, None, None, None, note=note, **meta))
        _speedups(rows)
        if not p.compile_resnet:
            note = "skipped: compiling ResNet-50 is slow here (--quick or CPU)"
            nan = float("nan")
            rows.append(Row(bench, shape, dtype_name, layout, "compiled", nan, nan, None, None, None, None, note=note,
                            **meta))  # fmt: skip
        return rows
    if bench.startswith("gate"):
        fns = gate_contenders(shape, dtype, layout, device, backward=bench == "gate_fwd_bwd")
    else:
        fns = bam_contenders(shape, dtype, layout, device, train=bench == "bam_train")
    probe = torch.empty(shape, device=device, dtype=dtype).normal_()
    moved = ROOFLINE_BYTES[bench] * probe.numel() * probe.element_size()
    times = interleaved_ms({"copy": copy_of(probe), **fns}, device, p.budget_s)  # on the CPU in turns
    bw = copy_gbps(probe, times.pop("copy")[0])
    rows = []
    for k, f in fns.items():
        med, iqr = times[k]
        gbps = moved / (med * 1e-3) / 1e9
        row = Row(bench, shape, dtype_name, layout, k, med, iqr, gbps, 100 * gbps / bw,
                  med / (moved / (bw * 1e9) * 1e3), bw, **meta)  # fmt: skip
        if device.type == "cuda":
            try:
                row.graph_ms = graph_ms(f, p.budget_s)
                row.graph_pct_copy = 100 * moved / (row.graph_ms * 1e-3) / 1e9 / bw
            except RuntimeError as exc:  # a contender that cannot be captured keeps its plain time
                row.note = f"no CUDA graph: {str(exc).splitlines()[0][:120]}"
        rows.append(row)
    _speedups(rows)
    return rows


def _speedups(rows: list[Row]) -> None:
    fused = next(r for r in rows if r.contender == "fused")
    fused.speedup = {r.contender: r.median_ms / fused.median_ms for r in rows if r.contender != "fused"}
    if fused.graph_ms:
        fused.graph_speedup = {r.contender: r.graph_ms / fused.graph_ms for r in rows
                               if r.contender != "fused" and r.graph_ms}  # fmt: skip


def run(p: Plan, progress: bool = True) -> list[Row]:
    rows: list[Row] = []
    for bench, shape, dtype, layout in progress_bar(tasks(p), "bench", progress):
        rows += run_task(p, bench, shape, dtype, layout)
    return rows


# -- reporting ---------------------------------------------------------------------------------
def format_table(rows: list[Row]) -> str:
    head = (f"{'bench':13s} {'shape':18s} {'dtype':5s} {'layout':13s} {'contender':9s} {'median ms':>10s} "
            f"{'iqr ms':>8s} {'GB/s':>8s} {'% copy':>7s} {'x roof':>7s}  speed-up of fused")  # fmt: skip
    lines = [head, "-" * len(head)]

    def graph(r: Row) -> str:
        if not r.graph_ms:
            return ""
        ups = ", ".join(f"{k} {v:.2f}x" for k, v in r.graph_speedup.items())
        return f"  [graph {r.graph_ms:.3f} ms, {r.graph_pct_copy:.0f}% copy{', ' + ups if ups else ''}]"

    for r in rows:

        def num(v, fmt):
            return format(v, fmt) if v is not None else "-"

        sp = ", ".join(f"{k} {v:.2f}x" for k, v in r.speedup.items())
        lines.append(
            f"{r.bench:13s} {str(tuple(r.shape)):18s} {r.dtype:5s} {r.layout:13s} {r.contender:9s} "
            f"{r.median_ms:10.3f} {r.iqr_ms:8.3f} {num(r.gbps, '8.1f')} {num(r.pct_copy, '7.1f')} "
            f"{num(r.roofline_ratio, '7.2f')}  {sp}{graph(r)}{('  ' + r.note) if r.note else ''}"
        )
    return "\n".join(lines)


def markdown_summary(rows: list[Row]) -> str:
    """One line per benchmark case: the three contenders' medians, fused's bandwidth, speed-ups;
    on CUDA also the CUDA-graph replay times (GPU time alone) and the speed-ups between them."""
    graphs = any(r.graph_ms for r in rows)
    timed = "eager ms | compiled ms | fused ms | fused % copy | vs eager | vs compiled |"
    head = "| bench | shape | dtype | layout | " + timed + (" graph: " + timed if graphs else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    by_case: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        by_case.setdefault((r.bench, tuple(r.shape), r.dtype, r.layout), {})[r.contender] = r

    def timed(same: dict[str, Row], ms_of: Callable[[Row], float | None], pct: float | None, ups: dict) -> list:
        """The cells of one timing: each contender's ms, fused's % of copy, fused's speed-ups."""
        ms = [ms_of(same[k]) if k in same else None for k in CONTENDERS]
        cells = ["-" if v is None or v != v else f"{v:.3f}" for v in ms]
        cells.append("-" if pct is None else f"{pct:.0f}%")
        return cells + [f"{ups[k]:.2f}x" if k in ups else "-" for k in ("eager", "compiled")]

    for (bench, shape, dtype, layout), same in by_case.items():
        fused = same.get("fused")
        if fused is None:
            continue
        cells = [bench, "x".join(map(str, shape)), dtype, layout]
        cells += timed(same, lambda r: r.median_ms, fused.pct_copy, fused.speedup)
        if graphs:
            cells += timed(same, lambda r: r.graph_ms, fused.graph_pct_copy, fused.graph_speedup)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: list[Row], out_dir: Path, extra_meta: dict | None = None) -> list[Path]:
    """results.json, summary.md and two plots; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": rows[0].device if rows else None,
        "device_name": rows[0].device_name if rows else None,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "bam_fused": __version__,
        "cpu_threads": torch.get_num_threads(),
        "cpu_huge_pages": cpu_huge_pages(),  # (the CPU pass reads NCHW x faster from huge pages)
        **(extra_meta or {}),
    }
    path = out_dir / "results.json"
    path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1, default=str))
    summary = out_dir / "summary.md"
    summary.write_text(f"Device: {meta['device_name']} ({meta['device']}), torch {meta['torch']}, "
                       f"triton {meta['triton']}, bam_fused {meta['bam_fused']}, {meta['cpu_threads']} CPU threads\n\n"
                       + markdown_summary(rows) + "\n")  # fmt: skip
    return [path, summary, *_plots(rows, out_dir, meta)]


def progress_bar(items: list, desc: str, enabled: bool = True):
    """tqdm where it is installed (it is optional on bare GPU machines)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, disable=not enabled, unit="case")


def _plots(rows: list[Row], out_dir: Path, meta: dict) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots written")
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = [b for b in (*ROOFLINE_BYTES, "resnet50") if any(r.bench == b for r in rows)]

    def case(r: Row) -> str:
        return f"{'x'.join(map(str, r.shape[1:]))}\n{r.dtype} {r.layout.replace('channels_last', 'CL')}"

    def panels(title: str, ylabel: str, series, hline=None) -> plt.Figure:
        fig, axes = plt.subplots(len(benches), 1, figsize=(11, 2.6 * len(benches)), squeeze=False)
        for ax, bench in zip(axes[:, 0], benches, strict=True):
            mine = [r for r in rows if r.bench == bench]
            labels = list(dict.fromkeys(case(r) for r in mine))
            width = 0.8 / len(series)
            for i, (name, value) in enumerate(series):
                vals = [next((value(r) for r in mine if case(r) == lab and value(r) is not None), float("nan"))
                        for lab in labels]  # fmt: skip
                ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))], vals, width, label=name)
            if hline is not None:
                ax.axhline(hline, color="k", lw=0.8)
            ax.set_xticks(range(len(labels)), labels, fontsize=7)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(bench, fontsize=9, loc="left")
        axes[0, 0].legend(fontsize=8)
        fig.suptitle(f"{title} on {meta['device_name']} (torch {meta['torch']})", fontsize=10)
        fig.tight_layout()
        return fig

    def speedup_of(other):
        return lambda r: r.speedup.get(other) if r.contender == "fused" else None

    def pct_of(contender):
        return lambda r: r.pct_copy if r.contender == contender else None

    written = []
    for name, fig in (
        ("speedup.png", panels("Speed-up of fused", "x faster", [(f"vs {o}", speedup_of(o)) for o in
                                                                ("eager", "compiled")], hline=1.0)),
        ("bandwidth.png", panels("Roofline traffic / time as % of copy bandwidth", "% of copy",
                                 [(c, pct_of(c)) for c in CONTENDERS])),
    ):  # fmt: skip
        written.append(out_dir / name)
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written
