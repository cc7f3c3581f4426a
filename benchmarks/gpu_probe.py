"""GPU-only probes that `bam-fused bench` does not cover (run by run_gpu.sh).

    python benchmarks/gpu_probe.py profile   # where a fused BAM's time goes, kernel by kernel
    python benchmarks/gpu_probe.py passes    # the CUDA-core kernels against the Triton ones
    python benchmarks/gpu_probe.py errors    # bad arguments to the ops raise, not crash
    python benchmarks/gpu_probe.py sanitize  # small odd-shaped workloads for compute-sanitizer
    python benchmarks/gpu_probe.py overhead  # where the CPU time of a gate forward+backward and an eval BAM go
    python benchmarks/gpu_probe.py gate      # the gate's kernels alone per dtype, in other tiles too

`profile` prints, per ResNet-50 BAM shape: the copy bandwidth of that tensor, the branch op
alone, the gate alone and the whole fused BAM (eval), each timed plainly and as a CUDA-graph
replay (the difference is launch and Python overhead), plus the CUDA kernels of one BAM call
from torch.profiler, and the BAM with each spatial-conv path (BAM_FUSED_CUDA_SPATIAL).
"""

from __future__ import annotations

import os
import sys
from unittest import mock

import torch
import triton.testing

import bam_fused
from bam_fused.bench import graph_ms
from bam_fused.ops import bam_branches, bam_gate
from bam_fused.ops import gate as gate_module
from bam_fused.testing import as_layout, randomize_

SHAPES = [(32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14)]
SPATIAL_IMPLS = ("kernel", "library")
EVAL_IMPLS = ("kernel", "triton-pass", "triton")


def eval_impl(impl: str):
    """BAM_FUSED_CUDA_EVAL=impl inside the block (ops/attention_cuda.py reads it on every call)."""
    return mock.patch.dict(os.environ, {"BAM_FUSED_CUDA_EVAL": impl})


def spatial_impl(impl: str):
    """BAM_FUSED_CUDA_SPATIAL=impl inside the block (the extension reads it on every call)."""
    return mock.patch.dict(os.environ, {"BAM_FUSED_CUDA_SPATIAL": impl})


def ms(fn) -> float:
    return triton.testing.do_bench(fn, rep=200, return_mode="median")


def cases():
    """(shape, dtype, layout, x, BAM in eval mode, its folded weights) for every probe row."""
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for layout in ("nchw", "channels_last"):
                x = as_layout(torch.randn(shape, device="cuda", dtype=dtype), layout)
                m = randomize_(bam_fused.BAM(shape[1])).cuda().to(dtype).eval()
                yield shape, dtype, layout, x, m, m.folded()


def profile() -> None:
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    head = f"{'shape':18s} {'dtype':5s} {'layout':13s} {'copy GB/s':>9s} {'|x| us':>7s} " \
           f"{'branch':>7s} {'gate':>7s} {'BAM':>7s} {'BAM graph':>9s} {'x 3|x| roof':>11s}"  # fmt: skip
    rows = [head]
    for shape, dtype, layout, x, m, f in cases():
        n, c, h, w = shape
        dst = torch.empty_like(x)
        copy = ms(lambda: dst.copy_(x))  # noqa: B023
        nbytes = x.numel() * x.element_size()
        bw = 2 * nbytes / (copy * 1e-3)
        args = (f["red_w"], f["red_b"], f["dil_w"], f["dil_b"], 4, f["fin_w"], f["fin_b"])
        ca = torch.randn(n, c, device="cuda")
        sa = torch.randn(n, h, w, device="cuda")
        with torch.no_grad():
            t_branch = ms(lambda: bam_branches(x, *args))  # noqa: B023
            t_gate = ms(lambda: bam_gate(x, ca, sa))  # noqa: B023
            t_bam = ms(lambda: m(x))  # noqa: B023
            t_graph = graph_ms(lambda: m(x))  # noqa: B023
        roof = 3 * nbytes / bw * 1e3
        rows.append(f"{str(shape):18s} {str(dtype)[6:]:5s} {layout:13s} {bw / 1e9:9.0f} "
                    f"{nbytes / bw * 1e6:7.1f} {t_branch * 1e3:7.1f} {t_gate * 1e3:7.1f} "
                    f"{t_bam * 1e3:7.1f} {t_graph * 1e3:9.1f} {t_graph / roof:11.2f}")  # fmt: skip
        if dtype == torch.float32 and layout == "nchw":
            cuda_only = [torch.profiler.ProfilerActivity.CUDA]
            with torch.no_grad(), torch.profiler.profile(activities=cuda_only) as p:
                for _ in range(5):
                    m(x)
                torch.cuda.synchronize()
            print(f"-- kernels of 5 fused BAM calls, {shape} fp32 nchw")
            print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    print("times in us; |x| us = one read of x at copy bandwidth; roof = 3|x| at copy bandwidth")
    print("\n".join(rows))
    spatial_impls()
    overlaps()


def spatial_impls() -> None:
    """The whole fused BAM (eval, CUDA graph) with each BAM_FUSED_CUDA_SPATIAL choice, side by side."""
    print("\nBAM eval graph time (us), BAM_FUSED_CUDA_EVAL=kernel, by BAM_FUSED_CUDA_SPATIAL (the default picks "
          "kernel for Cr <= 16)")  # fmt: skip
    print(f"{'shape':18s} {'dtype':8s} {'kernel':>8s} {'library':>8s}")
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, device="cuda", dtype=dtype)
            m = randomize_(bam_fused.BAM(shape[1])).cuda().to(dtype).eval()
            times = []
            for impl in SPATIAL_IMPLS:  # the extension's op: where BAM_FUSED_CUDA_SPATIAL applies
                with spatial_impl(impl), eval_impl("kernel"), torch.no_grad():
                    times.append(graph_ms(lambda: m(x)) * 1e3)  # noqa: B023
            print(f"{str(shape):18s} {str(dtype)[6:]:8s} {times[0]:8.1f} {times[1]:8.1f}")


def overlaps() -> None:
    """The whole fused BAM (eval, fp32 NCHW, CUDA graph) by eval path, with the channel MLP on a
    side stream beside the dilated convs (BAM_FUSED_CUDA_OVERLAP's default under capture) and
    without."""
    print("\nBAM eval graph time (us), fp32 nchw, by BAM_FUSED_CUDA_EVAL: MLP beside the convs / after them "
          "(BAM_FUSED_CUDA_OVERLAP auto / off)")  # fmt: skip
    print(f"{'shape':18s} " + " ".join(f"{impl:>17s}" for impl in EVAL_IMPLS))
    for shape in SHAPES:
        x = torch.randn(shape, device="cuda")
        m = randomize_(bam_fused.BAM(shape[1])).cuda().eval()
        cells = []
        for impl in EVAL_IMPLS:
            times = []
            for overlap in ("auto", "off"):
                with eval_impl(impl), mock.patch.dict(os.environ, {"BAM_FUSED_CUDA_OVERLAP": overlap}), torch.no_grad():
                    times.append(graph_ms(lambda: m(x)) * 1e3)  # noqa: B023
            cells.append(f"{times[0]:8.1f}/{times[1]:<8.1f}")
        print(f"{str(shape):18s} " + " ".join(cells), flush=True)


def passes() -> None:
    """The eval path's pieces: the Triton pass over x in each configuration (the launcher's
    default first; the others in fp32), the rest after a pass (the extension's attention_tail
    against the Triton convs and MLP), and the whole fused BAM (eval) by BAM_FUSED_CUDA_EVAL,
    as CUDA graph replays and as plain calls, with auto's picks for each."""
    from bam_fused.ops import attention_cuda
    from bam_fused.ops import pass_triton as pt
    from bam_fused.ops.branches import load_op
    from bam_fused.ops.mlp_triton import channel_mlp as mlp
    from bam_fused.ops.spatial_triton import spatial_map

    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print("us, all CUDA-graph replays (GPU time); |x| = one read of x at copy bandwidth; pass = Triton pass "
          "alone per config block_p/block_c/warps/stages; tail = after the pass: op's attention_tail | Triton "
          "convs + Triton MLP; BAM = whole eval BAM by BAM_FUSED_CUDA_EVAL; plain calls = the same three as "
          "back-to-back plain calls (wall time per call); auto's two picks")  # fmt: skip
    tail = load_op("attention_tail")
    for shape, dtype, layout, x, m, f in cases():
        dst = torch.empty_like(x)
        read_us = graph_ms(lambda: dst.copy_(x)) * 1e3 / 2  # noqa: B023
        cr = f["red_w"].shape[0]
        cells = []
        # The other configurations in fp32 only: each is a compile (about a second).
        default = pt.DEFAULTS[(layout == "channels_last", pt.cr_pad(cr))]
        for cfg in (default, *(pt.CANDIDATES if dtype == torch.float32 else ())):
            name = f"{cfg.block_p}/{cfg.block_c}/{cfg.num_warps}/{cfg.num_stages}"
            try:
                t = graph_ms(lambda: pt.reduce_pool(x, f["red_w"], f["red_b"], True, cfg)) * 1e3  # noqa: B023
                cells.append(f"{name}={t:.1f}")
            except Exception as exc:  # a config the GPU cannot hold: say so, go on
                cells.append(f"{name}=fail ({type(exc).__name__})")
        with torch.no_grad():
            part, y = pt.reduce_pool(x, f["red_w"], f["red_b"], attention_cuda._y_channels_last(cr, 2))
            part_cl, y_cl = pt.reduce_pool(x, f["red_w"], f["red_b"], True)
            rest = (f["dil_w"], f["dil_b"], 4, f["fin_w"], f["fin_b"])
            fc = (f["fc0_w"], f["fc0_b"], f["fc1_w"], f["fc1_b"])
            t_tail = graph_ms(lambda: tail(part, y, *rest, *fc)) * 1e3  # noqa: B023
            t_conv = graph_ms(lambda: (spatial_map(y_cl, *rest), mlp(part_cl, *fc))) * 1e3  # noqa: B023
        bam, plain = {}, {}
        for impl in EVAL_IMPLS:
            with eval_impl(impl), torch.no_grad():
                bam[impl] = graph_ms(lambda: m(x)) * 1e3  # noqa: B023
                plain[impl] = attention_cuda._plain_ms(lambda: m(x)) * 1e3  # noqa: B023
        with eval_impl("auto"), torch.no_grad():
            attention_cuda.choice(x, f, 4)
            got = attention_cuda.picks(x, f)
        picked = f"{got.plain}/{got.graph}" if got else "untimed"
        print(f"{str(shape):18s} {str(dtype)[6:]:8s} {layout:13s} |x| {read_us:5.1f}  "
              f"BAM kernel {bam['kernel']:6.1f} triton-pass {bam['triton-pass']:6.1f} "
              f"triton {bam['triton']:6.1f} plain calls {plain['kernel']:6.1f} {plain['triton-pass']:6.1f} "
              f"{plain['triton']:6.1f} auto plain/graph->{picked:23s} tail {t_tail:5.1f} | {t_conv:5.1f}  pass "
              + "  ".join(cells), flush=True)  # fmt: skip


def _graph_us(fn) -> float | None:
    """GPU time of fn in us (graph replays, 0.15 s of them), None where it fails (a tile the GPU
    cannot hold)."""
    try:
        return graph_ms(fn, 0.15) * 1e3
    except Exception:
        return None


def gate() -> None:
    """The gate's Triton kernels alone, per dtype and layout, in their default tiles and others
    (CUDA-graph replays, % of a copy of x timed in the same run), and forward + backward through
    autograd with and without accumulating into .grad. In the H100 and H200 runs the bf16
    forward + backward took as long as fp32's (0.384 against 0.241 ms at 56x56 on the H200): this
    says which kernel, and whether other tiles help."""
    from bam_fused.ops import gate_triton as gt

    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print("us (graph replays) and % of copy bandwidth (fwd moves 2|x|, bwd 3|x|); tiles: "
          "rows x columns / warps (bwd: / rows per chunk, +2d: column sums kept per tile position, ACC_2D, "
          "sN: the loop's loads pipelined N deep, STAGES), the launcher's default first")  # fmt: skip
    for shape in SHAPES:
        n, c, h, w = shape
        for dtype in (torch.float32, torch.bfloat16):  # (fp16 stores as many bytes as bf16)
            for layout in ("nchw", "channels_last"):
                x = as_layout(torch.randn(shape, device="cuda", dtype=dtype), layout)
                g = torch.randn_like(x)
                ca, sa = torch.randn(n, c, device="cuda"), torch.randn(n, h * w, device="cuda")
                x3, row, col, _ = gate_module._as_rows(x, ca, sa)
                g3 = gate_module._as_rows(g, ca, sa)[0]
                r, l = x3.shape[1:]
                dst = torch.empty_like(x)
                read_us = graph_ms(lambda: dst.copy_(x)) * 1e3 / 2  # noqa: B023
                f0, b0 = gt.fwd_config(r, l), gt.bwd_config(n, r, l, x.device.index)
                fwds = [f0, gt.FwdConfig(f0.block_r * 2, f0.block_l, 8)]
                # The other backward tiles (gate_triton.BWD_CANDIDATES): each a compile per row of
                # the table (about a second), so few, to fit the step's time box.
                bwds = [b0, *gt.candidate_bwd_configs(n, r, l, x.device.index)]
                cells = []
                for cfg in fwds:
                    us = _graph_us(lambda: gt.gate_forward(x3, row, col, False, cfg))  # noqa: B023
                    cost = "fail" if us is None else f"{us:5.1f} {200 * read_us / us:3.0f}%"
                    cells.append(f"fwd {cfg.block_r}x{cfg.block_l}/{cfg.num_warps} {cost}")
                for cfg in bwds:
                    us = _graph_us(lambda: gt.gate_backward(g3, x3, row, col, False, cfg))  # noqa: B023
                    cost = "fail" if us is None else f"{us:5.1f} {300 * read_us / us:3.0f}%"
                    extra = f"{'+2d' * cfg.acc_2d}{f' s{cfg.stages}' * (cfg.stages > 1)}"
                    tiles = f"{cfg.block_r}x{cfg.block_l}/{cfg.num_warps}/{cfg.rows_per_chunk}{extra}"
                    cells.append(f"bwd {tiles} {cost}")
                xg = x.detach().requires_grad_()
                cg = torch.randn(n, c, device="cuda", dtype=dtype, requires_grad=True)
                sg = torch.randn(n, h, w, device="cuda", dtype=dtype, requires_grad=True)
                acc = graph_ms(lambda: bam_gate(xg, cg, sg).backward(g)) * 1e3  # noqa: B023
                grads = graph_ms(lambda: torch.autograd.grad(bam_gate(xg, cg, sg), (xg, cg, sg), g)) * 1e3  # noqa: B023
                head = f"{str(shape):18s} {str(dtype)[6:]:8s} {layout:13s} |x| {read_us:5.1f}"
                print(
                    f"{head}  fwd+bwd .backward {acc:5.1f} autograd.grad {grads:5.1f}  " + "  ".join(cells), flush=True
                )


# Bad arguments to the extension's ops: each must raise RuntimeError, not crash. On the H200
# machine (its torch 2.11, GCC 13.3; 2026-11-26) every check whose message streamed sizes or
# numbers segfaulted; the checks now build their messages as strings (csrc/check.h).
ERROR_CASES = {
    "x_sizes": "op.reduce_pool(torch.randn(2, 3, 4), torch.randn(2, 3), torch.randn(2), True)",
    "w_sizes": "op.reduce_pool(torch.randn(1, 3, 4, 4), torch.randn(3), torch.randn(2), True)",
    "check_fp32": "op.reduce_pool(torch.randn(1, 3, 4, 4), torch.randn(2, 3).double(), torch.randn(2), True)",
    "check_part": "op.attention_tail(torch.randn(2, 1, 8).double(), torch.randn(2, 4, 3, 3), [], [], 4, "
    "torch.randn(4), torch.randn(1), torch.randn(2, 8), torch.randn(2), torch.randn(8, 2), torch.randn(8))",
    "cuda_x_dtype": "op.branches(torch.randn(1, 32, 4, 4, device='cuda').double(), torch.randn(2, 32, device='cuda'), "
    "torch.randn(2, device='cuda'), [], [], 4, torch.randn(2, device='cuda'), torch.randn(1, device='cuda'))",
    "gate_row": "op.gate_forward(torch.randn(2, 3, 4), torch.randn(2, 3).double(), torch.randn(2, 4), False)",
}


def errors() -> None:
    """Each ERROR_CASES call in a process of its own, all at once (one after another they ran past
    the 60 s box on the H100 of 2026-11-27: each process imports torch and loads the extension):
    prints whether each raised or crashed, and how long it took."""
    import subprocess
    import time
    from concurrent.futures import ThreadPoolExecutor

    def run(call: str) -> tuple[subprocess.CompletedProcess, float]:
        src = "\n".join(["import torch", "from bam_fused import _ext", "_ext.load()", "op = torch.ops.bam_fused_C",
                         "try:", f"    {call}", "except RuntimeError as e:",
                         "    print('raised:', str(e).splitlines()[0][:160])"])  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=120)
        return proc, time.perf_counter() - t0

    with ThreadPoolExecutor(len(ERROR_CASES)) as pool:
        results = list(pool.map(run, ERROR_CASES.values()))
    crashed = 0
    for name, (proc, secs) in zip(ERROR_CASES, results, strict=True):
        crashed += proc.returncode != 0
        print(f"{name:14s} rc={proc.returncode} {secs:5.1f}s {proc.stdout.strip()} {proc.stderr.strip()[-200:]}")
    sys.exit(1 if crashed else 0)


def sanitize() -> None:
    """Odd shapes, both layouts, every dtype: the branch op and the gate forward and backward."""
    for shape in [(2, 37, 7, 9), (2, 48, 9, 13), (3, 130, 17, 11), (2, 8, 1, 1), (2, 1100, 14, 14)]:
        n, c, h, w = shape
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for layout in ("nchw", "channels_last"):
                x = as_layout(torch.randn(shape, device="cuda", dtype=dtype), layout)
                m = randomize_(bam_fused.BAM(c, 8 if c < 64 else 16)).cuda().to(dtype).eval()
                # Every eval path: both spatial paths after each pass over x, and the Triton convs.
                for simpl, eimpl in [(s, e) for s in SPATIAL_IMPLS for e in EVAL_IMPLS[:2]] + [("auto", "triton")]:
                    with spatial_impl(simpl), eval_impl(eimpl), torch.no_grad():
                        m(x)
                m.train()
                xg = x.detach().clone().requires_grad_()
                m(xg).sum().backward()
                ca = torch.randn(n, c, device="cuda", requires_grad=True)
                sa = torch.randn(n, h, w, device="cuda", requires_grad=True)
                bam_gate(xg, ca, sa, combine="product").sum().backward()
    torch.cuda.synchronize()
    print("sanitize workload done")


def print_cprofile(step, rows: int, calls: int = 200) -> None:
    """cProfile of `calls` back-to-back calls of step (the GPU synchronized at the end), its
    top rows by own time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(rows)


def overhead() -> None:
    """cProfile of 200 fused gate forward+backward calls at 14x14 bf16 (GPU time ~70 us,
    plain call time several times that on the first H100 run)."""
    n, c, h, w = 32, 1024, 14, 14
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ca = torch.randn(n, c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    sa = torch.randn(n, h, w, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)

    def step():
        bam_gate(x, ca, sa).backward(g)

    for _ in range(20):
        step()
    torch.cuda.synchronize()
    print_cprofile(step, rows=14)
    print(f"fwd+bwd plain: {ms(step) * 1e3:.1f} us, graphed: {graph_ms(step) * 1e3:.1f} us")
    eval_overhead()


def eval_overhead() -> None:
    """Host time of a plain eval BAM call and of its pieces, per eval path, at a batch small
    enough that the GPU waits for the host (1 x 1024 x 14 x 14 fp32): back-to-back calls, wall
    time per call. Plain calls ran 0.4-1 ms where their GPU time was 0.1-0.17 ms (H100, N = 32).
    Then a cProfile of the module's plain calls."""
    from bam_fused.ops import attention_cuda

    x = torch.randn(1, 1024, 14, 14, device="cuda")
    m = randomize_(bam_fused.BAM(1024)).cuda().eval()
    with torch.no_grad():
        f = m.folded()
        ca, sa = attention_cuda.attention(x, f, 4)
        print("\nus per back-to-back plain call, 1x1024x14x14 fp32 (the GPU time is small here)")
        print(f"folded() {attention_cuda._plain_ms(m.folded, calls=200) * 1e3:.1f}  "
              f"bam_gate {attention_cuda._plain_ms(lambda: bam_gate(x, ca, sa), calls=200) * 1e3:.1f}")  # fmt: skip
        short_path = bam_fused.BAM._eval_again
        for impl in EVAL_IMPLS:
            with eval_impl(impl):
                whole = attention_cuda._plain_ms(lambda: m(x), calls=200) * 1e3
                bam_fused.BAM._eval_again = lambda self, x: None  # every call through the full routing
                try:
                    routed = attention_cuda._plain_ms(lambda: m(x), calls=200) * 1e3
                finally:
                    bam_fused.BAM._eval_again = short_path
                fwd = attention_cuda._plain_ms(lambda: attention_cuda.eval_forward(x, f, 4, False), calls=200) * 1e3
                maps = attention_cuda._plain_ms(lambda: attention_cuda.attention(x, f, 4), calls=200) * 1e3
            print(f"{impl:12s} module {whole:6.1f}  (full routing {routed:6.1f})  "
                  f"eval_forward {fwd:6.1f}  attention maps {maps:6.1f}")  # fmt: skip
        # Where the module's own Python goes (100-270 us a call beyond the maps and the gate on
        # the H200 of 2026-11-29, before the short path for repeated calls): the kernel path's
        # plain calls under cProfile.
        with eval_impl("kernel"):
            print_cprofile(lambda: m(x), rows=16)


if __name__ == "__main__":
    steps = {"profile": profile, "passes": passes, "errors": errors, "sanitize": sanitize, "overhead": overhead,
             "gate": gate}  # fmt: skip
    steps[sys.argv[1]]()
