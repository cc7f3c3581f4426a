"""Compiles every Triton gate kernel configuration the launchers use, ahead of time, for
real GPU targets (no GPU needed), and reports registers, spills and vector loads.

    python -m bam_fused.ops.gate_aot [--arch 80 90]

Must run without TRITON_INTERPRET=1 (the interpreter replaces the kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import gate_triton as gt

# The shapes the launchers are tuned for (ResNet BAM stages) plus odd ones.
SHAPES = [(32, 64, 56, 56), (32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (2, 37, 7, 9), (1, 5, 1, 1)]
DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _ptxas() -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            return get_ptxas(90).path
        except TypeError:  # older Triton: no argument
            return get_ptxas().path
    except Exception:
        found = shutil.which("ptxas") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "ptxas")
        return found


def _spills(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ptxas -v."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        res = subprocess.run(
            [_ptxas(), "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    log = res.stderr + res.stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return regs, int(spill.group(1)), int(spill.group(2))


def compile_ptx(src: ASTSource, arch: int, **options) -> tuple[str, int, int, int]:
    """(PTX, registers, spill store bytes, spill load bytes) of src compiled for sm_<arch>."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels")
    ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm["ptx"]
    return (ptx, *_spills(ptx, arch))


def main_for(compile_all, doc: str) -> None:
    """The command line of an AOT module: --arch, then its results as JSON."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    print(json.dumps(compile_all(tuple(parser.parse_args().arch)), indent=1))


def configs() -> list[dict]:
    """Each distinct (kernel, dtype, constexprs, num_warps) the launchers pick for SHAPES."""
    seen, out = set(), []
    for n, c, h, w in SHAPES:
        for R, L in ((c, h * w), (h * w, c)):  # NCHW, channels_last
            f, b = gt.fwd_config(R, L), gt.bwd_config(n, R, L)
            for dtype in DTYPES:
                # 64-bit offsets (tensors past 2^31 elements) for one shape: same code path.
                int64s = (False, True) if (n, c, h, w) == SHAPES[1] else (False,)
                for product, int64 in ((p, i) for p in (False, True) for i in int64s):
                    common = dict(PRODUCT=product, L_DIV=gt._pow2_divisor(L), INT64=int64)
                    for kernel, cfg in (("fwd", f), ("bwd", b)):
                        const = dict(common, BLOCK_R=cfg.block_r, BLOCK_L=cfg.block_l)
                        key = (kernel, dtype, tuple(sorted(const.items())), cfg.num_warps, L % 16 == 0)
                        if key not in seen:
                            seen.add(key)
                            out.append(dict(kernel=kernel, dtype=dtype, constexprs=const, num_warps=cfg.num_warps,
                                            l_div16=L % 16 == 0))  # fmt: skip
    return out


def _source(cfg: dict) -> ASTSource:
    p = DTYPES[cfg["dtype"]]
    if cfg["kernel"] == "fwd":
        fn = gt._gate_fwd_kernel
        sig = {"x_ptr": p, "row_ptr": "*fp32", "col_ptr": "*fp32", "out_ptr": p, "R": "i32", "L": "i32",
               "n_rb": "i32", "n_lb": "i32"}  # fmt: skip
        pointers = (0, 1, 2, 3)
    else:
        fn = gt._gate_bwd_kernel
        sig = {"g_ptr": p, "x_ptr": p, "row_ptr": "*fp32", "col_ptr": "*fp32", "dx_ptr": p, "drow_part_ptr": "*fp32",
               "dcol_part_ptr": "*fp32", "R": "i32", "L": "i32", "n_lb": "i32", "n_rc": "i32",
               "rows_per_chunk": "i32"}  # fmt: skip
        pointers = (0, 1, 2, 3, 4, 5, 6)
    names = list(sig)
    for k in cfg["constexprs"]:
        sig[k] = "constexpr"
    # What the runtime specialises on: 16-byte aligned pointers, L divisible by 16 when it is.
    attrs = {(i,): [["tt.divisibility", 16]] for i in pointers}
    if cfg["l_div16"]:
        attrs[(names.index("L"),)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=sig, constexprs=dict(cfg["constexprs"]), attrs=attrs)


def compile_all(archs=(80, 90)) -> list[dict]:
    results = []
    for arch in archs:
        for cfg in configs():
            ptx, regs, spill_st, spill_ld = compile_ptx(_source(cfg), arch, num_warps=cfg["num_warps"])
            results.append(dict(cfg, arch=arch, registers=regs, spill_stores=spill_st, spill_loads=spill_ld,
                                vector_loads="ld.global.v4" in ptx or "ld.global.nc.v4" in ptx))  # fmt: skip
    return results


if __name__ == "__main__":
    main_for(compile_all, __doc__)
