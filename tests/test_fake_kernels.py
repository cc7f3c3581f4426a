"""Every op's fake kernel against the op itself: the outputs' structure, shapes, dtypes, strides.

Shape tools run models under FakeTensorMode and torch.compile traces through the fakes, so a fake
that disagrees with its op sends wrong shapes or layouts downstream. torch.library.opcheck's
fake-tensor test lets some such fakes through (a fake returning None for an op that returns one
tensor passes it), hence this comparison, over every op the package registers.
"""

import pytest
import torch
from helpers import needs_ext
from torch._subclasses import FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map_only

import bam_fused
from bam_fused import _ext
from bam_fused.ops import branches, training_compiled
from bam_fused.ops import gate as gate_module
from bam_fused.testing import randomize_

pytestmark = needs_ext

# Ops without a fake kernel: the CPU bookkeeping of BAM's folding cache and the build's CUDA
# layout choice, which take no activations and which no traced or faked path calls.
NO_FAKE = {"bam_fused_C::bytes_of", "bam_fused_C::same_bytes", "bam_fused_C::cuda_y_channels_last"}


def cases(channels_last: bool) -> dict:
    """{op name: (op, args)}: a BAM with C = 32, Cr = 4, two convs with dilation 2, x 2x32x5x6."""
    cpp = branches.load_op
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    f = randomize_(bam_fused.BAM(32, 8, 2)).eval().folded()
    x = torch.randn(2, 32, 5, 6).contiguous(memory_format=fmt)
    spatial = (f["red_w"], f["red_b"], f["dil_w"], f["dil_b"], 2, f["fin_w"], f["fin_b"])
    mlp = (f["fc0_w"], f["fc0_b"], f["fc1_w"], f["fc1_b"])
    x3 = x.permute(0, 2, 3, 1).reshape(2, 30, 32) if channels_last else x.view(2, 32, 30)
    row, col = torch.randn(x3.shape[:2]), torch.randn(x3.shape[0], x3.shape[2])
    c, s = torch.randn(2, 32), torch.randn(2, 30)
    w, b = f["red_w"].reshape(4, 32), f["red_b"]
    means, y = cpp("reduce_pool")(x, w, b, False)
    dy = torch.randn(2, 4, 5, 6).contiguous(memory_format=fmt)
    bn_w, bn_b = [torch.rand(4) + 0.5 for _ in range(3)], [torch.randn(4) for _ in range(3)]
    running = ([None, torch.randn(4), None], [None, torch.rand(4) + 0.5, None])
    conv_w, conv_b = [torch.randn(4, 4, 3, 3) for _ in range(2)], [torch.randn(4) for _ in range(2)]
    fin_w, fin_b = torch.randn(1, 4, 1, 1), torch.randn(1)
    train = (y, bn_w, bn_b, [1e-5] * 3, *running, conv_w, conv_b, 2, fin_w, fin_b)
    _, maps, stats = cpp("spatial_train")(*train)
    flexible = training_compiled.FLEXIBLE
    return {
        "bam_fused_C::gate_forward": (cpp("gate_forward"), (x3, row, col, True)),
        "bam_fused_C::gate_backward": (cpp("gate_backward"), (torch.randn_like(x3), x3, row, col, False)),
        "bam_fused_C::branches": (cpp("branches"), (x, *spatial)),
        "bam_fused_C::attention": (cpp("attention"), (x, *spatial, *mlp)),
        "bam_fused_C::bam_eval": (cpp("bam_eval"), (x, *spatial, *mlp, True)),
        "bam_fused_C::attention_tail": (cpp("attention_tail"), (torch.randn(2, 3, 32), y, *spatial[2:], *mlp)),
        "bam_fused_C::reduce_pool": (cpp("reduce_pool"), (x, w, b, False)),
        "bam_fused_C::reduce_pool_backward": (cpp("reduce_pool_backward"), (x, dy, means, w, torch.randn_like(x))),
        "bam_fused_C::spatial_train": (cpp("spatial_train"), train),
        "bam_fused_C::spatial_train_backward": (
            cpp("spatial_train_backward"),
            (torch.randn(2, 5, 6), y, maps, stats, bn_w, bn_b, conv_w, 2, fin_w, [True, False, True], channels_last),
        ),
        "bam_fused::gate": (gate_module._gate_op, (x, c, s, True, "cpp")),
        "bam_fused::gate_backward": (gate_module._gate_backward_op, (torch.randn_like(x), x, c, s, False, "cpp")),
        "bam_fused::bam_eval_flexible": (branches.bam_eval_flexible, (x, *spatial, *mlp, False)),
        "bam_fused::reduce_pool_train": (flexible.reduce_pool, (x, w, b)),
        "bam_fused::reduce_pool_train_backward": (flexible.reduce_pool_backward, (x, dy, means, w, None)),
        "bam_fused::gate_train": (flexible.gate, (x, torch.empty_like(x), c, s, True)),
        "bam_fused::gate_train_backward": (flexible.gate_backward, (torch.randn_like(x), x, c, s, True)),
        "bam_fused::spatial_train": (training_compiled._spatial_train, (*train, channels_last)),
    }


def described(out) -> tuple:
    """What a fake must reproduce of an op's result: its structure and, per tensor, the shape, the
    dtype and the strides of the dimensions longer than 1 (the others' strides do not matter)."""
    leaves, spec = tree_flatten(out)

    def one(t):
        if not isinstance(t, torch.Tensor):
            return t
        strides = tuple(st for st, size in zip(t.stride(), t.shape, strict=True) if size > 1)
        return tuple(t.shape), t.dtype, strides

    return spec, [one(t) for t in leaves]


def test_every_op_is_checked():
    names = {n for n in torch._C._dispatch_get_all_op_names() if n.split("::")[0] in ("bam_fused", "bam_fused_C")}
    assert names == set(cases(False)) | NO_FAKE


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name", sorted(cases(False)) if _ext.reason() is None else [])
def test_fake_kernel_matches_the_op(name, channels_last):
    op, args = cases(channels_last)[name]
    with torch.no_grad():
        real = op(*tree_map_only(torch.Tensor, torch.clone, args))  # (clones: some ops add into dx)
        with FakeTensorMode() as mode:
            fake = op(*tree_map_only(torch.Tensor, mode.from_tensor, args))
    assert described(fake) == described(real)
