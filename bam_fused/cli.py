"""`bam-fused info | verify | bench`."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def _device_arg(text: str) -> str:
    """--device: auto, cpu, cuda or cuda:<i> (argparse reports anything else as a usage error)."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:<i>, got {text!r}")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bam-fused: --device cuda asked for, but no CUDA device is visible")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise SystemExit(f"bam-fused: --device {name} asked for, but {count} CUDA device(s) are visible")
    return device


def _out_dir(name: str | None) -> Path | None:
    """--out, made and tried before the run: a full bench takes an hour on a small CPU, and its
    results were lost when the folder could not be written at the end."""
    if name is None:
        return None
    out = Path(name)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise SystemExit(f"bam-fused: --out {name}: cannot write there ({e.strerror or e})") from None
    return out


def cmd_info(args: argparse.Namespace) -> int:
    from .info import format_info, info

    data = info()
    print(json.dumps(data, indent=1, default=str) if args.json else format_info(data))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from . import verify
    from .bench import progress_bar

    device = _device(args.device)
    out = _out_dir(args.out)
    dtypes = list(verify.DTYPES) if args.dtype == "all" else [args.dtype]
    paths, why_not = verify.active_paths(device)
    for line in why_not:
        print(f"inactive: {line}")
    if not paths:
        print(f"bam-fused verify: no fused path is active on {device}; nothing was checked")
        return 1
    torch.manual_seed(0)
    rows = []
    for thunk, _label in progress_bar(verify.cases(device, args.quick, dtypes), "verify", sys.stderr.isatty()):
        rows += thunk()
    print(verify.format_rows(rows))
    failed = [r for r in rows if not r.passed]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed ({', '.join(paths)} on {device})")
    if out is not None:
        (out / "verify.json").write_text(json.dumps(verify.to_json(rows), indent=1))
    return 1 if failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    device = _device(args.device)
    out = _out_dir(args.out)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    meta = {"malloc": "system defaults"}
    if device.type == "cpu" and not args.system_malloc:
        took = bench.keep_freed_memory()
        meta["malloc"] = "glibc keeps freed memory (mallopt)" if took else "system defaults (mallopt unavailable)"
        print(f"allocator: glibc keeps freed memory ({'on' if took else 'unavailable'}; --system-malloc to keep "
              "its defaults): timings measure kernels, not page faults")  # fmt: skip
    p = bench.plan(device, args.quick)
    if args.dtype != "default":
        p.dtypes = [args.dtype]
    start = time.perf_counter()
    rows = bench.run(p, progress=not args.no_progress)
    print(bench.format_table(rows))
    print(f"\n{len(rows)} rows on {rows[0].device_name if rows else device} in {time.perf_counter() - start:.0f} s")
    if out is not None:
        for path in bench.write_results(rows, out, meta):
            print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bam-fused", description="Fused BAM kernels: status, verification, speed.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, device, which kernels are active and why others are not")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("verify", help="every active fused path against the float64 reference")
    p.add_argument("--device", default="auto", type=_device_arg, help="auto (default), cpu or cuda[:i]")
    p.add_argument("--dtype", default="all", choices=["all", "fp32", "fp16", "bf16"])
    p.add_argument("--quick", action="store_true", help="a small subset of shapes")
    p.add_argument("--out", help="also write verify.json here")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("bench", help="eager reference vs torch.compile of it vs fused")
    p.add_argument("--device", default="auto", type=_device_arg, help="auto (default), cpu or cuda[:i]")
    p.add_argument("--dtype", default="default", choices=["default", "fp32", "fp16", "bf16"])
    p.add_argument("--quick", action="store_true", help="one shape: about two minutes on a 2-core CPU")
    p.add_argument("--out", help="write results.json, speedup.png and bandwidth.png here")
    p.add_argument("--threads", type=_positive_int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--system-malloc", action="store_true", help="CPU: leave glibc's trimming of freed memory on")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
