"""bam_fused.BAM: the reference BAM's parameters and keys, routed to the fused kernels.

Data path (backend "fused", or "auto" where the kernels are available):
- eval mode without autograd: attention op = branch op (one pass over x: pooled means and
  spatial map, with BatchNorm folded into the weights) -> channel MLP on (N, C), then the
  fused gate; on the CPU all of it in one op (bam_fused_C::bam_eval); on CUDA,
  ops/attention_cuda.py picks that op or the Triton kernels (BAM_FUSED_CUDA_EVAL);
- with autograd (training, or gradients wanted), on the CPU: ops/training.py (one pass over x
  for the reduce conv and the means, the rest of the branches as the module's layers or, when
  they are the stock ones, two C++ ops; the fused gate; dx accumulated in place backward);
  under torch.compile the same kernels as custom ops with their own autograd
  (ops/training_compiled.py);
- otherwise (CUDA with autograd, float64): the branches as PyTorch modules -> fused gate.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _backends, reference
from ._checks import check_choice, check_feature_map
from .ops import attention_cuda, training, training_compiled
from .ops.branches import BRANCH_DTYPES, bam_eval_flexible, load_op
from .ops.gate import bam_gate, memory_format

MODULE_BACKENDS = ("auto", "fused", "reference")


def _fold_bn(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and shift with bn(y) == y * scale + shift in eval mode, in fp32."""
    var, mean = bn.running_var.float(), bn.running_mean.float()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.float()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    return scale, shift


def _fold_linear(weight: torch.Tensor, bias: torch.Tensor | None, bn) -> tuple[torch.Tensor, torch.Tensor]:
    """Folds bn(weight @ y + bias) into one (weight, bias) pair, fp32. Works for convs too."""
    scale, shift = _fold_bn(bn)
    w = weight.float() * scale.view(-1, *([1] * (weight.dim() - 1)))
    b = shift if bias is None else bias.float() * scale + shift
    return w, b


def _exactly(m: nn.Module, cls: type) -> bool:
    """m is a cls itself (not a subclass with its own forward), or one with torch.nn.utils.parametrize
    parametrizations (which makes a subclass for it)."""
    t = type(m)
    return t is cls or ("parametrizations" in m._modules and t.__bases__ == (cls,))


# The branch op runs the library's convs channels_last (cuDNN's or oneDNN's NHWC kernels, no
# transposes) or our CUDA kernel, which reads any strides: channels_last weights spare a
# reorder per call (oneDNN, batch 1, 64 x 14 x 14: 0.072 against 0.088 ms per conv).
_DILATED_WEIGHT_FORMAT = torch.channels_last


class BAM(reference.BAM):
    """Bottleneck Attention Module with fused kernels.

    Same signature, parameters and state_dict keys as ``bam_fused.reference.BAM``, plus
    ``backend``: "auto" (fused where available, else the reference with one warning saying
    why), "fused" (raise if the fused kernels cannot run) or "reference".
    """

    def __init__(
        self,
        gate_channels: int,
        reduction_ratio: int = 16,
        dilation: int = 4,
        num_dilated_convs: int = 2,
        combine: str = "sum",
        backend: str = "auto",
    ) -> None:
        super().__init__(gate_channels, reduction_ratio, dilation, num_dilated_convs, combine)
        self.backend = check_choice("backend", backend, MODULE_BACKENDS)
        self._folded: dict | None = None
        self._folded_key: list | None = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"

    # -- routing -----------------------------------------------------------------------
    def _gate_impl(self, x: torch.Tensor) -> str:
        if self.backend == "reference":
            return "reference"
        backend = self.backend if self.backend == "auto" else "triton" if x.device.type == "cuda" else "cpp"
        # On the CPU the eval forward is one dispatcher op with no autograd: a torch.jit trace
        # records it (and the BatchNorm fold before it).
        traceable = torch.jit.is_tracing() and x.device.type == "cpu" and self._branch_mode_reason(x) is None
        return _backends.gate_impl(backend, x, traceable=traceable)

    def _hooked(self) -> bool:
        """Whether a module hook is registered on one of this BAM's layers (or globally). The fused
        paths skip the layers' forwards, so the branches then run as modules and every hook fires
        as in the reference (attention maps are often read this way)."""
        g = nn.modules.module
        if (g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks):  # fmt: skip
            return True
        # Through _modules and without modules()'s generator: every call asks (11 -> 3 us).
        stack = list(self._modules.values())
        while stack:
            m = stack.pop()
            if m is None:
                continue
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                return True
            stack.extend(m._modules.values())
        return False

    def _branch_mode_reason(self, x: torch.Tensor) -> str | None:
        """Why this call must run the branches as PyTorch modules, or None when the op fits."""
        if self.training:
            return "training mode needs BatchNorm batch statistics"
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return "gradients are wanted (the branch op is inference-only)"
        if x.dtype not in BRANCH_DTYPES:
            return f"the branch op supports float32, float16 and bfloat16, x is {x.dtype}"
        return None

    # -- BatchNorm folding, cached until a weight, buffer or the mode changes -------------
    def _fold_inputs(self) -> list[tuple[nn.Module, nn.Module | None]]:
        """(layer, BatchNorm after it or None) for every layer the fold reads (once _op_reason has
        found the reference's layers)."""
        gc, gs = self._branch_layers()
        pairs = [(gc["gate_c_fc_0"], gc["gate_c_bn_1"]), (gc["gate_c_fc_final"], None),
                 (gs["gate_s_conv_reduce0"], gs["gate_s_bn_reduce0"])]  # fmt: skip
        pairs += [(gs[f"gate_s_conv_di_{i}"], gs[f"gate_s_bn_di_{i}"]) for i in range(self.num_dilated_convs)]
        return pairs + [(gs["gate_s_conv_final"], None)]

    def _branch_layers(self) -> tuple[dict, dict] | None:
        """gate_c's and gate_s's layers by name (their _modules, where assignments land), or None
        when channel_att or spatial_att is not the reference's kind of container."""
        ca, sa = self._modules.get("channel_att"), self._modules.get("spatial_att")
        if type(ca) is not reference.ChannelGate or type(sa) is not reference.SpatialGate:
            return None
        gc, gs = ca._modules.get("gate_c"), sa._modules.get("gate_s")
        if type(gc) is not nn.Sequential or type(gs) is not nn.Sequential:
            return None
        return gc._modules, gs._modules

    def _op_reason(self) -> str | None:
        """Why the eval op cannot compute these branches (None when it can). It computes the
        reference's layers: Linear, BatchNorm with running statistics (folded), ReLU; a 1x1
        reduce conv, 3x3 convs with zero padding = dilation = self.dilation, a 1x1 conv to one
        channel. Anything else runs as modules: a replaced layer used to be folded as if it
        were the stock one (another dilation or padding mode: 0.14 off, silently)."""
        layers = self._branch_layers()
        if layers is None:
            return "channel_att or spatial_att is not the reference's container"
        gc, gs = layers
        k, d = self.num_dilated_convs, self.dilation
        names = ["gate_s_conv_reduce0", "gate_s_bn_reduce0", "gate_s_relu_reduce0"]
        names += [f"gate_s_{kind}_di_{i}" for i in range(k) for kind in ("conv", "bn", "relu")]
        if list(gc) != ["gate_c_fc_0", "gate_c_bn_1", "gate_c_relu_1", "gate_c_fc_final"]:
            return "gate_c does not hold the reference's four layers"
        if list(gs) != [*names, "gate_s_conv_final"]:
            return f"gate_s does not hold the reference's {len(names) + 1} layers"
        for name, m in {**gc, **gs}.items():
            kind = name.split("_")[2]
            if kind == "fc":
                ok = _exactly(m, nn.Linear) and (m.bias is not None or name == "gate_c_fc_0")
            elif kind == "bn":
                ok = (any(_exactly(m, c) for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm))
                      and not m.training and m.running_mean is not None and m.running_var is not None)  # fmt: skip
            elif kind == "relu":
                ok = type(m) is nn.ReLU
            else:
                one = not name.startswith("gate_s_conv_di_")
                ok = _exactly(m, nn.Conv2d) and m.stride == (1, 1) and m.groups == 1 and (
                    (m.kernel_size == (1, 1) and m.padding == (0, 0)) if one
                    else (m.kernel_size == (3, 3) and m.dilation == (d, d) and m.padding == (d, d)
                          and m.padding_mode == "zeros")
                )  # fmt: skip
                ok = ok and (name != "gate_s_conv_final" or (m.out_channels == 1 and m.bias is not None))
            if not ok:
                # (No repr(m): Dynamo cannot trace a conv's.)
                return f"{name} is not what the eval op computes (a {type(m).__name__}, training={m.training})"
        return None

    def _fold_key(self) -> list:
        # Every layer of the branches (identity, mode) and every tensor of theirs, read each time
        # (straight from _modules, _parameters and _buffers, where assignments land), so that
        # replaced layers or tensors, in-place updates (_version) and a layer's own .train()
        # refresh the fold. Flat, without a tuple per tensor.
        layers = self._branch_layers()
        if layers is None:
            return [object()]  # never equal: _op_reason says why the op cannot run
        key: list = [self.training]
        add = key.append  # appends, not tuples: 12 -> 6 us a call
        for group in layers:
            for m in group.values():
                add(id(m))
                add(m.training)
                if "parametrizations" in m._modules:
                    # A parametrized weight (torch.nn.utils.parametrize: weight_norm, spectral_norm) is
                    # computed from tensors this key does not watch: fold it anew on every call.
                    add(object())
                for d in (m._parameters, m._buffers):
                    for t in d.values():
                        if t is None:
                            add(None)
                        else:
                            add(t.data_ptr())
                            add(t._version)
        return key

    def folded(self) -> dict:
        """The eval-mode weights with every BatchNorm folded in, fp32, in the shapes the branch
        op takes: red_w (Cr, C), red_b, dil_w[i] (Cr, Cr, 3, 3), dil_b[i], fin_w (Cr,), fin_b (1,),
        and the channel MLP's fc0_w, fc0_b, fc1_w, fc1_b; "unsupported": None, or why the op
        cannot compute these layers (then nothing else)."""
        # Under torch.compile and torch.jit.trace the fold is part of the graph, read from the
        # parameters on every call.
        cache = not (torch.compiler.is_compiling() or torch.jit.is_tracing())
        if cache:
            key = self._fold_key()
            if self._folded is not None and key == self._folded_key:
                return self._folded
        why = self._op_reason()
        if why is not None:
            folded = {"unsupported": why}
            if cache:
                self._folded, self._folded_key = folded, key
            return folded
        with torch.no_grad():
            (fc0, bn1), (fc1, _), (red, red_bn), *dilated, (fin, _) = self._fold_inputs()
            fc0_w, fc0_b = _fold_linear(fc0.weight, fc0.bias, bn1)
            red_w, red_b = _fold_linear(red.weight, red.bias, red_bn)
            dil = [_fold_linear(conv.weight, conv.bias, bn) for conv, bn in dilated]
            folded = {
                "fc0_w": fc0_w.contiguous(), "fc0_b": fc0_b.contiguous(),
                "fc1_w": fc1.weight.float().contiguous(), "fc1_b": fc1.bias.float().contiguous(),
                "red_w": red_w.reshape(red_w.shape[0], -1).contiguous(), "red_b": red_b.contiguous(),
                "dil_w": [w.contiguous(memory_format=_DILATED_WEIGHT_FORMAT) for w, _ in dil],
                "dil_b": [b.contiguous() for _, b in dil],
                "fin_w": fin.weight.float().reshape(-1).contiguous(), "fin_b": fin.bias.float().reshape(-1),
                "unsupported": None,
            }  # fmt: skip
        if cache:
            self._folded, self._folded_key = folded, key
        return folded

    def _load_from_state_dict(self, *args, **kwargs):
        self._folded = self._folded_key = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse: bool = True):
        self._folded = self._folded_key = None  # .to(), .half(), .cuda(): the tensors change
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> BAM:
        self._folded = self._folded_key = None
        return super().train(mode)

    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        state["_folded"] = state["_folded_key"] = None  # derived; rebuilt on first use
        return state

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(x, self.gate_channels, pixels=True)
        weight = self.channel_att.gate_c.gate_c_fc_0.weight
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but this BAM's parameters are on {weight.device}; move one of them")
        impl = self._gate_impl(x)
        if impl == "reference":
            return reference.bam_gate_reference(x, self.channel_att(x), self.spatial_att(x), self.combine)
        if self._hooked():
            return bam_gate(x, self.channel_att(x), self.spatial_att(x), self.combine, backend=impl)
        use_op = self._branch_mode_reason(x) is None
        if use_op:
            why = _backends.branch_kernel_reason(x.device.type)
            if why is not None:
                if self.backend == "fused":
                    raise _backends.BackendUnavailable(f"backend='fused' cannot run the branch op: {why}")
                if not torch.compiler.is_compiling():
                    _backends.warn_once(f"branches:{why}", f"bam_fused: BAM branches run as PyTorch modules: {why}")
                use_op = False
        f = self.folded() if use_op else None
        if f is not None and f["unsupported"] is not None:
            # Layers the op does not compute: as the module's layers (the autograd path's pass
            # over x on the CPU, which runs the rest as layers), then the fused gate.
            if not torch.compiler.is_compiling():  # (Dynamo cannot trace warnings.warn)
                why = f["unsupported"]
                _backends.warn_once(f"layers:{why}", f"bam_fused: BAM branches run as the module's layers: {why}")
            use_op = False
        if use_op:
            xc = x.contiguous(memory_format=memory_format(x))
            if x.is_cuda and not torch.compiler.is_compiling():
                # The extension's op or the Triton kernels (attention_cuda.py, BAM_FUSED_CUDA_EVAL).
                channel, spatial = attention_cuda.attention(xc, f, self.dilation)
            elif x.device.type == "cpu":
                # The whole forward in one op (bam_eval): the attention op, then the gate, with no
                # Python between them.
                # Under torch.compile the same op, taking x in Inductor's layout; exported programs
                # keep the C++ op itself, which runs without Python.
                if torch.compiler.is_exporting():
                    op = torch.ops.bam_fused_C.bam_eval
                else:
                    op = bam_eval_flexible if torch.compiler.is_compiling() else load_op("bam_eval")
                return op(
                    xc, f["red_w"], f["red_b"], f["dil_w"], f["dil_b"], self.dilation, f["fin_w"], f["fin_b"],
                    f["fc0_w"], f["fc0_b"], f["fc1_w"], f["fc1_b"], self.combine == "product",
                )  # fmt: skip
            else:
                # The folded weights are known-good: call the op itself, not bam_branches's checks.
                # It runs the branch op and the channel MLP (on CUDA one kernel, not several launches).
                op = torch.ops.bam_fused_C.attention if torch.compiler.is_compiling() else load_op("attention")
                channel, spatial = op(
                    xc, f["red_w"], f["red_b"], f["dil_w"], f["dil_b"],
                    self.dilation, f["fin_w"], f["fin_b"], f["fc0_w"], f["fc0_b"], f["fc1_w"], f["fc1_b"],
                )  # fmt: skip
        elif impl == "cpp" and training.reason(self, x) is None:
            # Autograd on the CPU: one pass over x forward, dx in place backward (ops/training.py);
            # under torch.compile the pass over x as a custom op (ops/training_compiled.py).
            if torch.compiler.is_compiling():
                return training_compiled.compiled_training_bam(self, x, self.combine)
            return training.training_bam(self, x, self.combine)
        else:
            channel, spatial = self.channel_att(x), self.spatial_att(x)
        return bam_gate(x, channel, spatial, self.combine, backend=impl)
