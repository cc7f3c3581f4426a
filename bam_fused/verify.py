"""`bam-fused verify`: every active fused path against the float64 reference, one row per case."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from . import _backends
from .modules import BAM
from .ops.gate import bam_gate
from .reference import BAM as RefBAM
from .testing import DTYPES, as_layout, compare, gate_comparisons, gate_second_order_comparisons, randomize_

LAYOUTS = ("nchw", "channels_last")
# (C, H, W): the ResNet BAM stages, then odd shapes.
RESNET_SHAPES = [(256, 56, 56), (512, 28, 28), (1024, 14, 14)]
ODD_SHAPES = [(37, 7, 9), (48, 9, 13), (5, 1, 1)]


@dataclass
class Row:
    path: str
    shape: tuple
    dtype: str
    layout: str
    combine: str
    quantity: str
    max_abs: float
    max_rel: float
    tolerance: float
    passed: bool


def active_paths(device: torch.device) -> tuple[list[str], list[str]]:
    """(fused paths that run on device, reasons for the ones that do not)."""
    kernels = (["triton"] if device.type == "cuda" else ["cpp"]) + (
        ["triton"] if device.type == "cpu" and _backends.triton_interpreted() else []
    )
    reasons = {f"gate[{impl}]": (_backends.triton_reason if impl == "triton" else _backends.cpp_reason)(device)
               for impl in kernels}  # fmt: skip
    reasons["bam"] = _backends.branch_kernel_reason(device.type)
    paths = [path for path, why in reasons.items() if why is None]
    why_not = [f"{path}: {why}" for path, why in reasons.items() if why is not None]
    return paths, why_not


def _rows(path, shape, dtype, layout, combine, results: Iterable[tuple[str, object]]) -> list[Row]:
    return [
        Row(path, shape, dtype, layout, combine, q, r.max_abs, r.max_rel, r.tolerance, r.passed) for q, r in results
    ]


# A ReLU input within float32 rounding of zero takes either side of the kink depending on
# summation order, so the fused path and eager PyTorch may each differ from the float64 truth
# there: the gradient jumps at up to 25 pixels (two dilated 3x3 convs downstream), all channels.
# In eval mode the jump stays there. In training mode BatchNorm's backward (batch statistics)
# spreads a little of it over every element, so a training gradient can be compared element by
# element only where a switch is improbable: under this many ReLU inputs per layer (N x H x W x
# C / r). The ResNet shapes have 10^5.
TRAIN_GRAD_MAX_RELU_INPUTS = 10_000
# Eval-mode gradients: at most this fraction of the (n, h, w) positions beyond the tolerance.
KINK_PIXEL_FRACTION = 0.01


def compare_through_relu(out: torch.Tensor, truth: torch.Tensor, eager: torch.Tensor) -> tuple[str, object]:
    """(quantity suffix, Comparison) for an eval-mode gradient of x (N, C, H, W): compare()'s
    verdict, or a pass marked "(kink)" when the elements beyond its tolerance sit at no more
    than KINK_PIXEL_FRACTION of the (n, h, w) positions (see above)."""
    result = compare(out, truth, eager)
    if result.passed or out.dtype not in (torch.float32, torch.float64):
        return "", result
    err = (out.detach().double().cpu() - truth.detach().double().cpu()).abs()
    pixels = (err > result.tolerance).any(dim=1)
    if int(pixels.sum()) <= KINK_PIXEL_FRACTION * pixels.numel():
        result.passed = True
        return "(kink)", result
    return "", result


def check_gate(impl: str, device, shape, dtype_name: str, layout: str, combine: str) -> list[Row]:
    dtype = DTYPES[dtype_name]
    n, c, h, w = shape
    x = as_layout(torch.randn(shape, device=device).to(dtype), layout)
    ca = torch.randn(n, c, device=device, dtype=dtype)
    sa = torch.randn(n, h, w, device=device, dtype=dtype)
    g = as_layout(torch.randn(shape, device=device).to(dtype), layout)
    fn = functools.partial(bam_gate, combine=combine, backend=impl)
    results = gate_comparisons(fn, x, ca, sa, combine, g)
    results += gate_second_order_comparisons(fn, x, ca, sa, combine, g)  # (create_graph=True)
    return _rows(f"gate[{impl}]", shape, dtype_name, layout, combine, results)


def check_bam(device, shape, dtype_name: str, layout: str, combine: str) -> list[Row]:
    """Eval forward (branch op + gate), and again (the module's short path for repeated calls,
    which must give the same bits); eval-mode gradients of x; train forward, and its gradient of
    x where a switched ReLU is improbable (TRAIN_GRAD_MAX_RELU_INPUTS)."""
    dtype = DTYPES[dtype_name]
    n, c, h, w = shape
    r = 16 if c >= 32 else 1
    # Weights rounded to dtype once; the float64 truth uses the same rounded weights.
    eager = randomize_(RefBAM(c, r, combine=combine)).to(device=device, dtype=dtype)
    truth = copy.deepcopy(eager).double()
    fused = BAM(c, r, combine=combine, backend="fused").to(device=device, dtype=dtype)
    fused.load_state_dict(eager.state_dict())
    x = as_layout(torch.randn(shape, device=device).to(dtype), layout)
    modules = {"fused": fused, "truth": truth, "eager": eager}
    with torch.no_grad():
        outs = {k: m.eval()(x.to(torch.float64 if k == "truth" else dtype)) for k, m in modules.items()}
        second = fused(x)
    again = compare(second, outs["truth"], outs["eager"])
    again.passed = again.passed and torch.equal(second, outs["fused"])  # the same bits as the first call
    rows = _rows("bam[eval]", shape, dtype_name, layout, combine,
                 [("out", compare(outs["fused"], outs["truth"], outs["eager"])), ("out again", again)])  # fmt: skip
    g = torch.randn(shape, device=device)

    def forward_backward(train: bool) -> dict:
        res = {}
        for k, m in modules.items():
            dt = torch.float64 if k == "truth" else dtype
            xi = x.detach().to(dt).requires_grad_()
            out = m.train(train)(xi)
            out.backward(g.to(dt))
            res[k] = (out, xi.grad)
        return res

    res = forward_backward(train=False)  # gradients wanted: the autograd path in eval mode
    suffix, d_x = compare_through_relu(res["fused"][1], res["truth"][1], res["eager"][1])
    rows += _rows("bam[grad]", shape, dtype_name, layout, combine, [("d_x" + suffix, d_x)])
    if n > 1:  # BatchNorm's batch statistics need more than one sample
        res = forward_backward(train=True)
        results = [("out", compare(res["fused"][0], res["truth"][0], res["eager"][0]))]
        if n * h * w * (c // r) <= TRAIN_GRAD_MAX_RELU_INPUTS:
            results.append(("d_x", compare(res["fused"][1], res["truth"][1], res["eager"][1])))
        rows += _rows("bam[train]", shape, dtype_name, layout, combine, results)
    return rows


def cases(device: torch.device, quick: bool, dtypes: list[str]) -> list[tuple[Callable[[], list[Row]], str]]:
    """The grid, as (thunk, label) pairs, for the active paths on device."""
    paths, _ = active_paths(device)
    n_big = 8 if device.type == "cuda" else 2
    shapes = [(n_big, *s) for s in (RESNET_SHAPES[:1] if quick else RESNET_SHAPES)]
    shapes += [(2, *ODD_SHAPES[0]), (1, *ODD_SHAPES[1])] + ([] if quick else [(3, *ODD_SHAPES[2])])
    out = []
    for path in paths:
        for shape in shapes:
            if path == "gate[triton]" and device.type == "cpu" and shape[0] * shape[1] * shape[2] * shape[3] > 1e5:
                continue  # the interpreter is slow: small shapes only
            for dtype in dtypes:
                for layout in LAYOUTS:
                    for combine in ("sum", "product"):
                        label = f"{path} {shape} {dtype} {layout} {combine}"
                        if path == "bam":
                            thunk = functools.partial(check_bam, device, shape, dtype, layout, combine)
                        else:
                            thunk = functools.partial(check_gate, path[5:-1], device, shape, dtype, layout, combine)
                        out.append((thunk, label))
    return out


def format_rows(rows: list[Row]) -> str:
    head = f"{'path':13s} {'shape':20s} {'dtype':5s} {'layout':13s} {'combine':8s} {'quantity':10s} " \
           f"{'max_abs':>9s} {'max_rel':>9s} {'tol':>9s}  result"  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.path:13s} {str(tuple(r.shape)):20s} {r.dtype:5s} {r.layout:13s} {r.combine:8s} {r.quantity:10s} "
            f"{r.max_abs:9.2e} {r.max_rel:9.2e} {r.tolerance:9.2e}  {'pass' if r.passed else 'FAIL'}"
        )
    return "\n".join(lines)


def to_json(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
