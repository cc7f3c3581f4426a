"""Compiles the Triton kernels of the CUDA eval path ahead of time for real GPU targets (no GPU
needed): the pass over x (ops/pass_triton.py), the spatial convs (ops/spatial_triton.py) and
the channel MLP (ops/mlp_triton.py), in every variant their launchers launch at the shapes
below. Reports registers, spills, whether the tensor cores are used (mma/wgmma in the PTX),
4-byte copies, wide stores and float max instructions (the ReLUs must keep NaN).

    python -m bam_fused.ops.pass_aot [--arch 80 90]

Must run without TRITON_INTERPRET=1 (the interpreter replaces the kernels).
"""

from __future__ import annotations

import itertools
import re
from unittest import mock

import torch

from ..modules import BAM
from . import attention_cuda
from . import mlp_triton as mt
from . import pass_triton as pt
from . import spatial_triton as sp
from .gate_aot import DTYPES, compile_ptx, launch_source, main_for, recorded_launches, variant_key

# Global-to-shared copies of fewer than 16 bytes (Triton stages tiles with cp.async).
_NARROW = re.compile(r"cp\.async\.c[ag]\.shared\.global \[[^]]*\], \[[^]]*\], 0x4[,;]")
# Float max in PTX: plain max returns the other operand of a NaN (maxnum), max.NaN keeps it.
_MAX_DROPS_NAN = re.compile(r"\bmax(?:\.ftz)?\.(?:f32|f16|bf16|f16x2|bf16x2)\b")
_MAX_KEEPS_NAN = re.compile(r"\bmax(?:\.ftz)?\.NaN\.")
# Stores to global memory of 2, 4 or 8 elements at once (st.global.v4.b32: 16 bytes of fp32).
_WIDE_STORE = re.compile(r"\bst\.global(?:\.[a-z]+)*\.v[248]\.")

KERNELS = {"pass": (pt, "_pass_kernel"), "finish": (pt, "_finish_kernel"), "conv": (sp, "_dilated_conv_kernel"),
           "means": (mt, "_means_kernel"), "layer": (mt, "_layer_kernel")}  # fmt: skip
# The shapes launched: ResNet's BAMs (C = 16 Cr: every Cr pad the kernels have) on maps whose
# HW is a multiple of 16 (56x56; 28x28 specialises alike) and on 14x14 maps (HW = 196: the
# constant ROW); batches of 1, 8 (on MULTIPROCESSORS, the channels split and the finishing
# kernel runs) and 32 (no split; and Triton specialises integers equal to 1 and those divisible
# by 16); dilations 4 (the paper's), 1 and 16 (likewise). Also an odd shape (C = 37, 7x9), and
# one batch whose y passes 2^31 elements (64-bit sizes); both are left out of the "resnet" rows.
RESNET = [((n, 16 * cr, size, size), cr) for n in (1, 8, 32) for size in (56, 14) for cr in (16, 32, 64)]
ODD = ((2, 37, 7, 9), 2)
HUGE = ((2**31 // (16 * 56 * 56) + 1, 256, 56, 56), 16)
DILATIONS = (4, 1, 16)
MULTIPROCESSORS = 132  # an H100's or H200's


def launches(shape: tuple, cr: int, dtype: torch.dtype, x_cl: bool, dilation: int = 4) -> list[tuple]:
    """The Triton launches of the CUDA eval path for x of shape (N, C, H, W) of a BAM with cr reduced
    channels, as gate_aot.recorded_launches lists them: the all-Triton path (its y
    channels_last) and the triton-pass path's pass with NCHW y (for an op tail that reads it).
    Meta tensors: nothing is allocated or run."""
    with torch.device("meta"):
        folded = BAM(shape[1], shape[1] // cr, dilation).eval().folded()
        x = torch.empty(shape, dtype=dtype, memory_format=torch.channels_last if x_cl else torch.contiguous_format)
    with (
        mock.patch.object(pt, "_multiprocessors", lambda device: MULTIPROCESSORS),
        recorded_launches(*KERNELS.values()) as recorded,
    ):
        attention_cuda._run_triton(x, folded, dilation)
        pt.reduce_pool(x, folded["red_w"], folded["red_b"], y_channels_last=False)
    return recorded


def _labels(name: str, fn, args: tuple, kwargs: dict, src) -> dict:
    """What tells a variant apart, beside the launch's options: its constexprs (lower-cased),
    x's dtype, HW and the dilation where the kernel takes them, and the parameters Triton made
    constants (equal to 1), marked divisible by 16, or passed as 64-bit."""
    values = dict(zip(fn.arg_names, args, strict=False))
    row = {"kernel": name, **{k.lower(): v for k, v in kwargs.items()}}
    if "x_ptr" in values:
        row["dtype"] = next(k for k, v in DTYPES.items() if v == values["x_ptr"].dtype)
    row |= {k.lower(): values[k] for k in ("HW", "dilation") if k in values}
    names = fn.arg_names
    row["equal_to_1"] = [names[i[0]] for i in src.constants if names[i[0]] not in kwargs]
    row["divisible"] = [names[i[0]] for i in src.attrs]
    return dict(row, i64=[name for name, kind in src.signature.items() if kind == "i64"])


def configs() -> list[dict]:
    """Each distinct variant launched at the shapes above in every dtype and layout: its labels
    (_labels), "resnet" (first launched at a ResNet shape), and its "source" and "options"."""
    out, seen = [], set()
    shapes = [(s, d, True) for s in RESNET for d in DILATIONS] + [(ODD, 4, False), (HUGE, 4, False)]
    for ((shape, cr), dilation, resnet), dtype, x_cl in itertools.product(shapes, DTYPES, (False, True)):
        for fn, args, kwargs in launches(shape, cr, DTYPES[dtype], x_cl, dilation):
            src, options = launch_source(fn, args, kwargs)
            key = variant_key(src, options)
            if key in seen:
                continue
            seen.add(key)
            name = next(k for k, (module, attr) in KERNELS.items() if getattr(module, attr) is fn)
            constexprs = {k: v for k, v in kwargs.items() if k not in options}
            out.append(dict(_labels(name, fn, args, constexprs, src), resnet=resnet, source=src, options=options))
    return out


def compile_all(archs=(80, 90)) -> list[dict]:
    results = []
    for arch in archs:
        for cfg in configs():
            row = {k: v for k, v in cfg.items() if k not in ("source", "options")}
            ptx, regs, spill_st, spill_ld = compile_ptx(cfg["source"], arch, **cfg["options"])
            results.append(dict(row, **cfg["options"], arch=arch, registers=regs, spill_stores=spill_st,
                                spill_loads=spill_ld, tensor_cores="mma.sync" in ptx or "wgmma" in ptx,
                                narrow_copies=len(_NARROW.findall(ptx)), wide_stores=len(_WIDE_STORE.findall(ptx)),
                                max_drops_nan=len(_MAX_DROPS_NAN.findall(ptx)),
                                max_keeps_nan=len(_MAX_KEEPS_NAN.findall(ptx))))  # fmt: skip
    return results


if __name__ == "__main__":
    main_for(compile_all, __doc__)
