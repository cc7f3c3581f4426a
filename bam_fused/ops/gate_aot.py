"""Compiles every Triton gate kernel configuration the launchers use, ahead of time, for
real GPU targets (no GPU needed), and reports registers, spills and vector loads.

    python -m bam_fused.ops.gate_aot [--arch 80 90]

Must run without TRITON_INTERPRET=1 (the interpreter replaces the kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

from . import gate_triton as gt

# The shapes the launchers are tuned for (ResNet BAM stages) plus odd ones.
SHAPES = [(32, 64, 56, 56), (32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (2, 37, 7, 9), (1, 5, 1, 1)]
# Where the backward's candidate tiles (gate_triton.BWD_CANDIDATES) are compiled too: the shapes
# gpu_probe.py's gate step times them at, fp32 and bf16, the sum.
CANDIDATE_SHAPES = [(32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


@contextlib.contextmanager
def recorded_launches(*kernels: tuple[object, str]) -> Iterator[list[tuple]]:
    """Within it, the kernels named (module, attribute) are not run when launched: each launch
    is recorded as (kernel, positional arguments, keyword arguments) in the list it yields."""
    launches: list[tuple] = []

    class Recorder:
        def __init__(self, fn) -> None:
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.fn, args, kwargs))

    saved = [(module, name, getattr(module, name)) for module, name in kernels]
    try:
        for module, name, fn in saved:
            setattr(module, name, Recorder(fn))
        yield launches
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


_OPTIONS = ("num_warps", "num_stages")


def launch_source(fn, args: tuple, kwargs: dict) -> tuple[ASTSource, dict]:
    """The source Triton's launcher compiles for fn[grid](*args, **kwargs), and its options: by
    Triton's own rule (native_specialize_impl, which the JIT launcher calls), constexpr
    parameters and integers equal to 1 are constants, and 16-byte aligned pointers and integers
    divisible by 16 are marked so."""
    if not isinstance(fn, triton.runtime.JITFunction):  # the interpreter's stand-in (TRITON_INTERPRET=1)
        fn = triton.runtime.JITFunction(fn.fn, **fn.kwargs)
    values = dict(zip(fn.arg_names, args, strict=False)) | kwargs
    sig, const, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr:
            kind, spec = "constexpr", None
        else:
            specialize, align = not param.do_not_specialize, not param.do_not_specialize_on_alignment
            kind, spec = native_specialize_impl(BaseBackend, value, param.is_const, specialize, align)
        sig[param.name] = kind
        if kind == "constexpr":
            const[param.name] = value
        elif spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    return src, {k: v for k, v in kwargs.items() if k in _OPTIONS}


def variant_key(src: ASTSource, options: dict) -> tuple:
    """What makes two launches one compiled kernel: the function, its parameters' types,
    constants and divisibility, and the options (Triton's defaults where a launch gives none)."""
    types = (repr(src.signature), repr(src.constants), repr(src.attrs))  # (dicts: not hashable)
    return src.fn.__name__, *types, options.get("num_warps", 4), options.get("num_stages", 3)


def configs() -> list[dict]:
    """Each distinct kernel variant the launchers compile for SHAPES, in both layouts, every
    dtype, sum and product, and with 64-bit offsets for one shape, then the backward's candidate
    tiles at CANDIDATE_SHAPES ("candidate": True): the launches themselves, recorded with meta
    tensors (nothing runs; the backward chunks its rows for the interpreter's 512 programs, which
    changes only integer arguments)."""
    out, seen = [], set()

    def add(launches, kernels, dtype: str, R: int, L: int, candidate: bool = False) -> None:
        """Each recorded launch whose compiled kernel is not in out yet, as a row."""
        for (fn, args, kwargs), kernel in zip(launches, kernels, strict=True):
            src, options = launch_source(fn, args, kwargs)
            key = variant_key(src, options)
            if key not in seen:
                seen.add(key)
                out.append(_row(kernel, dtype, R, L, fn, src, kwargs, options, candidate))

    for n, c, h, w in SHAPES:
        for R, L in ((c, h * w), (h * w, c)):  # NCHW, channels_last
            # 64-bit offsets (tensors past 2^31 elements) for one shape: same code path.
            batches = (n, gt.INT32_LIMIT // (R * L) + 1) if (n, c, h, w) == SHAPES[1] else (n,)
            for dtype, batch, product in itertools.product(DTYPES, batches, (False, True)):
                x, row, col = _meta_problem(batch, R, L, dtype)
                with recorded_launches((gt, "_gate_fwd_kernel"), (gt, "_gate_bwd_kernel")) as launches:
                    gt.gate_forward(x, row, col, product)
                    gt.gate_backward(x, x, row, col, product)
                add(launches, ("fwd", "bwd"), dtype, R, L)
    for n, c, h, w in CANDIDATE_SHAPES:
        for (R, L), dtype in itertools.product(((c, h * w), (h * w, c)), ("fp32", "bf16")):
            x, row, col = _meta_problem(n, R, L, dtype)
            candidates = gt.candidate_bwd_configs(n, R, L)
            with recorded_launches((gt, "_gate_bwd_kernel")) as launches:
                for cfg in candidates:
                    gt.gate_backward(x, x, row, col, False, cfg)
            add(launches, ["bwd"] * len(candidates), dtype, R, L, candidate=True)
    return out


def _meta_problem(n: int, R: int, L: int, dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, R, L) in dtype, row (N, R) and col (N, L) in fp32: meta tensors, for recorded launches."""
    x = torch.empty(n, R, L, dtype=DTYPES[dtype], device="meta")
    return x, torch.empty(n, R, device="meta"), torch.empty(n, L, device="meta")


def _row(kernel, dtype, R, L, fn, src, kwargs, options, candidate: bool = False) -> dict:
    """configs()'s entry for one recorded launch."""
    names = fn.arg_names
    return dict(kernel=kernel, dtype=dtype, R=R, L=L, **options, l_div16=L % 16 == 0, candidate=candidate,
                constexprs={k: v for k, v in kwargs.items() if k not in _OPTIONS},
                equal_to_1=[names[i[0]] for i in src.constants if names[i[0]] not in kwargs],
                divisible=[names[i[0]] for i in src.attrs], source=src)  # fmt: skip


def _vector_loads(ptx: str) -> bool:
    """Whether the kernel reads x in 16-byte vectors: plain loads, or a pipelined loop's cp.async."""
    pipelined = re.search(r"cp\.async\.\w+\.shared\.global[^;]*0x10,", ptx)
    return "ld.global.v4" in ptx or "ld.global.nc.v4" in ptx or pipelined is not None


def compile_all(archs=(80, 90)) -> list[dict]:
    results = []
    for arch in archs:
        for cfg in configs():
            src, row = cfg["source"], {k: v for k, v in cfg.items() if k != "source"}
            ptx, regs, spill_st, spill_ld = compile_ptx(src, arch, num_warps=cfg["num_warps"])
            results.append(dict(row, arch=arch, registers=regs, spill_stores=spill_st, spill_loads=spill_ld,
                                vector_loads=_vector_loads(ptx)))  # fmt: skip
    return results


if __name__ == "__main__":
    main_for(compile_all, __doc__)
