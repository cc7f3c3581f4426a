"""bam_fused.BAM: the reference BAM's parameters and keys, routed to the fused kernels.

Data path (backend "fused", or "auto" where the kernels are available):
- eval mode without autograd: attention op = branch op (one pass over x: pooled means and
  spatial map, with BatchNorm folded into the weights) -> channel MLP on (N, C), then the
  fused gate; on the CPU all of it in one op (bam_fused_C::bam_eval); on CUDA,
  ops/attention_cuda.py picks that op or the Triton kernels (BAM_FUSED_CUDA_EVAL), then the
  Triton gate (eval_forward). A repeated eager call skips the routing (BAM._eval_again);
- with autograd (training, or gradients wanted), on the CPU: ops/training.py (one pass over x
  for the reduce conv and the means, the rest of the branches as the module's layers or, when
  they are the stock ones, two C++ ops; the fused gate; dx accumulated in place backward);
  under torch.compile the same kernels as custom ops with their own autograd
  (ops/training_compiled.py);
- otherwise (CUDA with autograd, float64, hooks, layers a fused path does not compute: _layers.py):
  the branches as PyTorch modules -> fused gate.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import _C, nn
from torch.autograd import forward_ad
from torch.utils.hooks import RemovableHandle

from . import _backends, _fold, _layers, reference
from ._checks import check_choice, check_feature_map
from .ops import attention_cuda, training, training_compiled
from .ops.branches import BRANCH_DTYPES, bam_eval_flexible, load_op
from .ops.gate import bam_gate, memory_format

MODULE_BACKENDS = ("auto", "fused", "reference")
_STRIDED = torch.strided  # (a global: _eval_again reads it on every call)


def _triton_eval_route(x: torch.Tensor, impl: str) -> bool:
    """Whether an eval call that the branch op can compute runs attention_cuda.eval_forward: on
    CUDA, where the gate is Triton's, and eagerly (under torch.compile or a dispatch mode the ops
    with fake kernels run instead). tests/test_eval_fast_path.py points it at CPU tensors too,
    which the Triton interpreter runs."""
    return impl == "triton" and x.is_cuda and not (torch.compiler.is_compiling() or _backends.dispatch_mode())


class _FoldState(NamedTuple):
    """A cached fold and what it was made from. Replaced whole, never changed, and read once per
    use, so that Python threads sharing a module (a serving process) each see one consistent fold."""

    folded: dict  # BAM.folded()'s result
    key: list  # _fold.fold_key's key at the fold
    src: torch.Tensor | list[torch.Tensor] | None  # _fold.snapshot of the layers' tensors (None off the CPU)
    # Once forward has chosen it for an eager eval call: (x's device, the eval op or function,
    # its arguments between x and the combine flag), which _eval_again calls next time.
    call: tuple | None = None


def _warn_layers(why: str) -> None:
    if not torch.compiler.is_compiling():  # (Dynamo cannot trace warnings.warn)
        _backends.warn_once(f"layers:{why}", f"bam_fused: BAM branches run as the module's layers: {why}")


class BAM(reference.BAM):
    """Bottleneck Attention Module with fused kernels.

    Same signature, parameters and state_dict keys as ``bam_fused.reference.BAM``, plus
    ``backend``: "auto" (fused where available, else the reference with one warning saying
    why), "fused" (raise if the fused kernels cannot run) or "reference".
    """

    # The cached fold (a _FoldState), else None; a class default for modules pickled before it existed.
    _fold_state: _FoldState | None = None
    # RemovableHandle.next_id when _eval_again last found no hooks: every module hook, global or
    # on a layer, is registered with a new handle, so while the id stands no hook has come.
    _hook_stamp = -1

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
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        # Checked on every assignment: a typo set later ("refrence") must not run the kernels silently.
        self._backend = check_choice("backend", value, MODULE_BACKENDS)
        state = self._fold_state
        if state is not None:
            self._fold_state = state._replace(call=None)  # (the routing decides anew)

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
            if _layers.has_hooks(m):
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
    def folded(self) -> dict:
        """The eval-mode weights with every BatchNorm folded in, fp32, in the shapes the branch
        op takes: red_w (Cr, C), red_b, dil_w[i] (Cr, Cr, 3, 3), dil_b[i], fin_w (Cr,), fin_b (1,),
        and the channel MLP's fc0_w, fc0_b, fc1_w, fc1_b; "unsupported": None, or why the op
        cannot compute these layers (then nothing else)."""
        # Under torch.compile and torch.jit.trace the fold is part of the graph, read from the
        # parameters on every call; under a dispatch mode (FakeTensorMode) they have no data.
        cache = not (torch.compiler.is_compiling() or torch.jit.is_tracing() or _backends.dispatch_mode())
        if cache:
            key, tensors = _fold.fold_key(self)
            state = self._fold_state  # read once: another thread may replace it meanwhile
            if state is not None and key == state.key and _fold.unchanged(tensors, state.src):
                return state.folded
        why = _layers.op_reason(self)
        folded = {"unsupported": why} if why is not None else _fold.fold(self)
        if cache:
            self._fold_state = _FoldState(folded, key, _fold.snapshot(tensors))
        return folded

    def _load_from_state_dict(self, *args, **kwargs):
        self._fold_state = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse: bool = True):
        self._fold_state = None  # .to(), .half(), .cuda(): the tensors change
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> BAM:
        state = self._fold_state
        if state is not None and state.src is None:
            # Off the CPU the cache watches versions, not bytes: .eval() is how a write through
            # .data reaches it (README). On the CPU the key (every layer's mode) and the bytes see
            # everything, so a repeated .eval() keeps the fold (serving code often calls it per
            # request: refolding and repacking made a batch-1 call 2-3x slower).
            self._fold_state = None
        return super().train(mode)

    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        state["_fold_state"], state["_hook_stamp"] = None, -1  # derived; rebuilt on first use
        return state

    # -- forward -------------------------------------------------------------------------
    def _device(self) -> torch.device | None:
        """Where the parameters are (None without any)."""
        try:  # quick, for the stock layers (and without running a parametrization)
            w = _layers.raw_weight(self.channel_att.gate_c.gate_c_fc_0)
        except AttributeError:
            w = None
        w = next(self.parameters(), None) if w is None else w
        return None if w is None else w.device

    def _eval_again(self, x: torch.Tensor) -> torch.Tensor | None:
        """The eager eval call that forward's routing below last chose (the CPU's eval op, or on
        CUDA the attention maps and the Triton gate), again, with fewer Python steps, while
        nothing it depends on has changed: the folded weights and layers (the fold key, and on
        the CPU the layers' bytes), no hooks, no autograd, no transform or dispatch mode, an x on
        the same device that forward would route there (else None, and forward decides as usual,
        raising what it raises).

        On the CPU, after a large call the interpreter's objects are out of cache, and every
        step costs a miss or more: the full routing took 0.46 ms more than the op itself at
        8 x 256 x 56x56 (7% of the call); this path saves about 0.2 ms of it (paired, 2-core AVX2
        CPU, 2026-11-27). On CUDA, plain calls are bound by the host: the routing took 100-270 us
        of a 0.6 ms call at 1 x 1024 x 14x14 on the H200's host (2026-11-29)."""
        if torch.compiler.is_compiling():  # first: Dynamo then reads (and guards on) none of this
            return None
        state = self._fold_state  # read once: another thread may replace it meanwhile
        if state is None or state.call is None or type(x) is not torch.Tensor:  # (an fx Proxy, a subclass)
            return None
        # transform_reason()'s and dispatch_mode()'s checks, read straight from torch._C (each
        # lookup in torch's namespaces is a miss or more here). Not its ONNX flag: TorchScript's
        # export is a jit trace, torch.export's runs under Dynamo or a dispatch mode, on fake tensors.
        if (
            _C.is_grad_enabled()
            or self.training
            or _C._is_tracing()  # (before reading x's sizes)
            or _C._functorch.maybe_current_level() is not None
            or _C._len_torch_dispatch_stack()
            or getattr(forward_ad, "_current_level", -1) >= 0
            or x.layout is not _STRIDED  # (sparse, mkldnn: forward's checks say why not)
            or x.dtype not in BRANCH_DTYPES
        ):
            return None
        device, op, weights = state.call
        shape = x.shape
        if x.device != device or len(shape) != 4 or shape[1] != self.gate_channels or shape[2] == 0 or shape[3] == 0:
            return None
        stamp = RemovableHandle.next_id
        if stamp != self._hook_stamp:
            if self._hooked():
                return None
            self._hook_stamp = stamp
        key, tensors = _fold.fold_key(self)
        if key != state.key or not _fold.unchanged(tensors, state.src):
            return None
        xc = x if x.is_contiguous() else x.contiguous(memory_format=memory_format(x))
        return op(xc, *weights, self.combine == "product")

    def _remember_call(self, f: dict, device: torch.device, op, weights: tuple) -> None:
        """Keeps forward's choice, op(x, *weights, product), for _eval_again's next calls, when f
        is the cached fold (not one made under a trace, which is not cached)."""
        state = self._fold_state
        if state is not None and state.folded is f and state.call is None:
            self._fold_state = state._replace(call=(device, op, weights))

    def _op_weights(self, f: dict) -> tuple:
        """The attention and eval ops' arguments after x, from the folded weights f."""
        return (f["red_w"], f["red_b"], f["dil_w"], f["dil_b"], self.dilation, f["fin_w"], f["fin_b"],
                f["fc0_w"], f["fc0_b"], f["fc1_w"], f["fc1_b"])  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._eval_again(x)
        if out is not None:
            return out
        if _backends.fx_traced(self.backend, x):
            return super().forward(x)  # the reference's ops
        check_feature_map(x, self.gate_channels, pixels=True)
        device = self._device()
        if device is not None and x.device != device:
            raise ValueError(f"x is on {x.device} but this BAM's parameters are on {device}; move one of them")
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
            _warn_layers(f["unsupported"])
            use_op = False
        if use_op:
            xc = x.contiguous(memory_format=memory_format(x))
            if _triton_eval_route(x, impl):
                # The attention maps by the extension's op or the Triton kernels (attention_cuda.py,
                # BAM_FUSED_CUDA_EVAL), then the Triton gate, with no autograd to record.
                out = attention_cuda.eval_forward(xc, f, self.dilation, self.combine == "product")
                self._remember_call(f, x.device, attention_cuda.eval_forward, (f, self.dilation))
                return out
            if x.device.type == "cpu":
                # The whole forward in one op (bam_eval): the attention op, then the gate, with no
                # Python between them.
                # Under torch.compile the same op, taking x in Inductor's layout; exported programs
                # keep the C++ op itself, which runs without Python.
                if torch.compiler.is_exporting():
                    op = torch.ops.bam_fused_C.bam_eval
                elif torch.compiler.is_compiling():
                    op = bam_eval_flexible
                else:
                    op = load_op("bam_eval")
                    self._remember_call(f, x.device, op, self._op_weights(f))
                return op(xc, *self._op_weights(f), self.combine == "product")
            else:
                # The folded weights are known-good: call the op itself, not bam_branches's checks.
                # It runs the branch op and the channel MLP (on CUDA one kernel, not several launches).
                op = torch.ops.bam_fused_C.attention if torch.compiler.is_compiling() else load_op("attention")
                channel, spatial = op(xc, *self._op_weights(f))
        elif impl == "cpp" and training.reason(x) is None:
            why = _layers.autograd_reason(self)
            if why is None:
                # Autograd on the CPU: one pass over x forward, dx in place backward (ops/training.py);
                # under torch.compile the pass over x as a custom op (ops/training_compiled.py).
                if torch.compiler.is_compiling():
                    return training_compiled.compiled_training_bam(self, x, self.combine)
                return training.training_bam(self, x, self.combine)
            if f is None:  # (an eval call that wanted the op has said why already)
                _warn_layers(why)
            channel, spatial = self.channel_att(x), self.spatial_att(x)
        else:
            channel, spatial = self.channel_att(x), self.spatial_att(x)
        return bam_gate(x, channel, spatial, self.combine, backend=impl)
