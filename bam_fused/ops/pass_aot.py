"""Compiles the Triton kernels of the CUDA eval path ahead of time for real GPU targets (no GPU
needed): the pass over x (ops/pass_triton.py), the spatial convs (ops/spatial_triton.py) and
the channel MLP (ops/mlp_triton.py), in every variant their launchers can pick. Reports
registers, spills, whether the tensor cores are used (mma/wgmma in the PTX), 4-byte copies, wide
stores and float max instructions (the ReLUs must keep NaN).

    python -m bam_fused.ops.pass_aot [--arch 80 90]

Must run without TRITON_INTERPRET=1 (the interpreter replaces the kernels).
"""

from __future__ import annotations

import re

from triton.compiler import ASTSource

from . import mlp_triton as mt
from . import pass_triton as pt
from . import spatial_triton as sp
from .gate_aot import compile_ptx, main_for

# Global-to-shared copies of fewer than 16 bytes (Triton stages tiles with cp.async).
_NARROW = re.compile(r"cp\.async\.c[ag]\.shared\.global \[[^]]*\], \[[^]]*\], 0x4[,;]")
# Float max in PTX: plain max returns the other operand of a NaN (maxnum), max.NaN keeps it.
_MAX_DROPS_NAN = re.compile(r"\bmax(?:\.ftz)?\.(?:f32|f16|bf16|f16x2|bf16x2)\b")
_MAX_KEEPS_NAN = re.compile(r"\bmax(?:\.ftz)?\.NaN\.")
# Stores to global memory of 2, 4 or 8 elements at once (st.global.v4.b32: 16 bytes of fp32).
_WIDE_STORE = re.compile(r"\bst\.global(?:\.[a-z]+)*\.v[248]\.")
DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


# Pixels per map: HW divisible by 16 (56x56, 28x28) and not (14x14: 196, a multiple of 4).
HWS = (3136, 196)


def configs() -> list[dict]:
    """The launcher's configuration (DEFAULTS) in every dtype, x layout, y layout, Cr pad and
    kind of HW (14x14's as the constant ROW); the finishing kernel in both layouts."""
    out = []
    for dtype in DTYPES:
        for x_cl in (False, True):
            for y_cl in (False, True):
                for pad in (16, 32, 64):
                    for hw in HWS:
                        row = hw if hw % 16 else 0
                        out.append(dict(kernel="pass", dtype=dtype, x_cl=x_cl, y_cl=y_cl, cr_pad=pad, hw=hw, row=row,
                                        config=pt.DEFAULTS[(x_cl, pad)]))  # fmt: skip
    out += [dict(kernel="finish", y_cl=y_cl, hw=hw) for y_cl in (False, True) for hw in HWS]
    # The convs read channels_last y (spatial_map makes it so) and channels_last weights (the fold's).
    out += [dict(kernel="conv", y_cl=True, cr_pad=pad, final=final) for pad in sp.CONFIGS for final in (False, True)]
    # The channel MLP: the means, and each layer (hidden units per program: BLOCK_H or BLOCK_C;
    # the second layer's K, the hidden units, is Cr: BLOCK_K 16, 32 or 64).
    out += [dict(kernel="means"), dict(kernel="layer", relu=True, block_k=64)]
    out += [dict(kernel="layer", relu=False, block_k=k) for k in (16, 32, 64)]
    return out


def _options(num_warps: int, num_stages: int = 3) -> dict:
    """A launch's compile options; 3 stages is Triton's default, which the launchers keep."""
    return {"num_warps": num_warps, "num_stages": num_stages}


def _source(cfg: dict) -> tuple[ASTSource, dict]:
    """The kernel source of cfg as its launcher specialises it, and the launch's options."""
    if cfg["kernel"] == "finish":
        sig = {"part_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*fp32", "numel": "i32", "CR": "i32", "HW": "i32",
               "splits": "i32", "CHANNELS_LAST": "constexpr", "BLOCK": "constexpr"}  # fmt: skip
        const = {"CHANNELS_LAST": cfg["y_cl"], "BLOCK": 1024}
        # Pointers, y's size (a multiple of Cr) and Cr; HW where it is a multiple of 16.
        attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4) + ((5,) if cfg["hw"] % 16 == 0 else ())}
        return ASTSource(fn=pt._finish_kernel, signature=sig, constexprs=const, attrs=attrs), _options(4)
    if cfg["kernel"] == "means":
        sig = {"part_ptr": "*fp32", "mean_ptr": "*fp32", "N": "i32", "P": "i32", "C": "i32",
               "BLOCK_N": "constexpr", "BLOCK_C": "constexpr"}  # fmt: skip
        attrs = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]], (4,): [["tt.divisibility", 16]]}
        const = {"BLOCK_N": mt.BLOCK_N, "BLOCK_C": mt.BLOCK_C}
        return ASTSource(fn=mt._means_kernel, signature=sig, constexprs=const, attrs=attrs), _options(4)
    if cfg["kernel"] == "layer":
        sig = {"a_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": "*fp32", "N": "i32", "K": "i32",
               "M": "i32", "RELU": "constexpr", "BLOCK_N": "constexpr", "BLOCK_M": "constexpr",
               "BLOCK_K": "constexpr", "PRECISION": "constexpr"}  # fmt: skip
        attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 5, 6)}
        const = {"RELU": cfg["relu"], "BLOCK_N": mt.BLOCK_N, "BLOCK_M": mt.BLOCK_H if cfg["relu"] else mt.BLOCK_C,
                 "BLOCK_K": cfg["block_k"], "PRECISION": "tf32x3"}  # fmt: skip
        return ASTSource(fn=mt._layer_kernel, signature=sig, constexprs=const, attrs=attrs), _options(4)
    if cfg["kernel"] == "conv":
        sig = {"y_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "wf_ptr": "*fp32", "bf_ptr": "*fp32",
               "out_ptr": "*fp32", "H": "i32", "W": "i32", "CR": "i32", "n_pb": "i32", "dilation": "i32",
               "sy_n": "i32", "sy_c": "i32", "sy_h": "i32", "sy_w": "i32", "sw_o": "i32", "sw_i": "i32",
               "sw_h": "i32", "sw_w": "i32", "so_n": "i32", "so_c": "i32", "so_p": "i32"}  # fmt: skip
        block_p, warps = sp.CONFIGS[cfg["cr_pad"]]
        const = {"sy_c" if cfg["y_cl"] else "sy_w": 1, "sw_i": 1, "CR_PAD": cfg["cr_pad"], "BLOCK_P": block_p,
                 "BLOCK_K": min(cfg["cr_pad"], sp.BLOCK_K), "FINAL": cfg["final"], "PRECISION": "tf32x3"}  # fmt: skip
        if not cfg["final"]:
            const["so_c"] = 1
        for k in const:
            sig[k] = "constexpr"
        # As the runtime specialises them for Cr a multiple of 16: channel counts and strides.
        names = list(sig)
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(6)}
        for name in ("CR", "sy_n", "sy_c", "sy_h", "sy_w", "sw_o", "sw_h", "sw_w", "so_n", "so_c", "so_p"):
            if name not in const:
                attrs[(names.index(name),)] = [["tt.divisibility", 16]]
        return ASTSource(fn=sp._dilated_conv_kernel, signature=sig, constexprs=const, attrs=attrs), _options(warps)
    c = cfg["config"]
    sig = {"x_ptr": DTYPES[cfg["dtype"]], "w_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*fp32", "part_ptr": "*fp32",
           "C": "i32", "HW": "i32", "CR": "i32", "n_pb": "i32", "c_split": "i32", "inv_hw": "fp32",
           "sx_n": "i32", "sx_c": "i32", "sx_p": "i32", "sy_n": "i32", "sy_c": "i32", "sy_p": "i32",
           "sy_split": "i32", "raw": "u1"}  # fmt: skip
    names = list(sig)
    # What the runtime specialises on: stride 1 along the contiguous dimension (a constexpr),
    # 16-byte aligned pointers, and C, HW and the other strides divisible by 16 (ResNet shapes).
    const = {"sx_c" if cfg["x_cl"] else "sx_p": 1, "sy_c" if cfg["y_cl"] else "sy_p": 1,
             "CR_PAD": cfg["cr_pad"], "BLOCK_P": c.block_p, "BLOCK_C": c.block_c, "PRECISION": "tf32x3",
             "ROW": cfg["row"], "C_DIV": 16, "X_CL": cfg["x_cl"], "Y_CL": cfg["y_cl"]}  # fmt: skip
    for k in const:
        sig[k] = "constexpr"
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}
    # By 16 (c_split always: whole 64-channel slices; CR as ResNet-50's 16, 32 and 64; the sample
    # strides C * HW and Cr * HW); HW and the NCHW channel strides (HW too) unless the case is 14x14.
    hw_bound = {"HW", "sx_c", "sy_c"} if cfg["hw"] % 16 else set()
    for name in ("C", "HW", "CR", "c_split", "sx_n", "sx_c", "sx_p", "sy_n", "sy_c", "sy_p", "sy_split"):
        if name not in const and name not in hw_bound:
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=pt._pass_kernel, signature=sig, constexprs=const, attrs=attrs)
    return src, _options(c.num_warps, c.num_stages)


def compile_all(archs=(80, 90)) -> list[dict]:
    results = []
    for arch in archs:
        for cfg in configs():
            src, options = _source(cfg)
            ptx, regs, spill_st, spill_ld = compile_ptx(src, arch, **options)
            row = {k: (str(v) if k == "config" else v) for k, v in cfg.items()}
            results.append(dict(row, arch=arch, registers=regs, spill_stores=spill_st, spill_loads=spill_ld,
                                tensor_cores="mma.sync" in ptx or "wgmma" in ptx,
                                narrow_copies=len(_NARROW.findall(ptx)), wide_stores=len(_WIDE_STORE.findall(ptx)),
                                max_drops_nan=len(_MAX_DROPS_NAN.findall(ptx)),
                                max_keeps_nan=len(_MAX_KEEPS_NAN.findall(ptx))))  # fmt: skip
    return results


if __name__ == "__main__":
    main_for(compile_all, __doc__)
