"""Which kernel runs where, and why the others do not: the one place that decides.

"auto" never fails: where a fused kernel cannot run it uses the reference and warns once,
saying why. An explicit backend either runs its kernel or raises an error saying why not.
"""

from __future__ import annotations

import functools
import importlib
import sys
import warnings
from types import ModuleType

import torch
from torch.autograd import forward_ad

from . import _ext, env

_warned: set[str] = set()


class BackendUnavailable(RuntimeError):
    """An explicitly requested kernel cannot run here; the message says why."""


def _caller_stacklevel() -> int:
    """warnings.warn's stacklevel for the first frame outside bam_fused and torch (the user's call:
    the warning then points at it, and filters by module apply)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("bam_fused", "torch"):
        frame, level = frame.f_back, level + 1
    return level


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=_caller_stacklevel())


@functools.cache
def _triton() -> tuple[ModuleType | None, str | None]:
    if env.flag("BAM_FUSED_DISABLE_TRITON"):
        return None, "disabled by BAM_FUSED_DISABLE_TRITON=1"
    try:
        return importlib.import_module("bam_fused.ops.gate_triton"), None
    except ImportError as exc:
        return None, f"Triton is not importable ({exc})"


def triton_interpreted() -> bool:
    """Whether the Triton kernels were decorated under TRITON_INTERPRET=1 (Triton reads the
    variable when the kernels are defined, so setting it later changes nothing)."""
    module, _ = _triton()
    return module is not None and type(module._gate_fwd_kernel).__name__ == "InterpretedFunction"


def triton_reason(device: torch.device) -> str | None:
    """Why the Triton gate cannot run on this device, or None when it can."""
    module, why = _triton()
    if module is None:
        return why
    if device.type == "cuda" or triton_interpreted():
        return None
    return f"Triton kernels run on CUDA devices (on {device.type} only under TRITON_INTERPRET=1)"


def cpp_reason(device: torch.device) -> str | None:
    """Why the C++ CPU gate cannot run on this device, or None when it can."""
    if device.type != "cpu":
        return f"the C++ gate kernels are CPU kernels, x is on {device}"
    return _ext.reason()


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPP_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _dtype_reason(impl: str, dtype: torch.dtype) -> str | None:
    allowed = TRITON_DTYPES if impl == "triton" else CPP_DTYPES
    if dtype in allowed:
        return None
    names = ", ".join(str(d).replace("torch.", "") for d in allowed)
    return f"the {impl} gate supports {names}; x has dtype {str(dtype).replace('torch.', '')}"


TRACING = "torch.jit.trace records no autograd.Function and no Triton launch"


ONNX_EXPORT = "torch.onnx.export runs: ONNX has no bam_fused ops, so the graph holds the reference's"


def transform_reason() -> str | None:
    """Why an active autograd transform, a torch.jit trace or an ONNX export rules out the fused
    kernels (None when nothing does). Their first derivatives are written by hand, with no
    batching or forward-mode rules; torch.compile traces them as custom ops, so it is not asked
    about (but torch.onnx.export's torch.export is: ONNX has no translation for our ops)."""
    if torch.onnx.is_in_onnx_export():
        return ONNX_EXPORT
    if torch.compiler.is_compiling():
        return None
    if torch._C._functorch.maybe_current_level() is not None:
        return "a torch.func transform is active (vmap, grad, jvp, ...): the fused kernels have no batching rules"
    if getattr(forward_ad, "_current_level", -1) >= 0:
        return "forward-mode AD is active (a dual_level): the fused kernels have no forward-mode derivatives"
    if torch.jit.is_tracing():
        return TRACING
    return None


def dispatch_mode() -> bool:
    """Whether a TorchDispatchMode (FakeTensorMode, FlopCounterMode, ...) is active. Then the
    kernels go through dispatcher ops, which have fake kernels, not through Python launches of
    Triton kernels on whatever tensors the mode hands out."""
    return torch._C._len_torch_dispatch_stack() > 0


FX_TRACING = "torch.fx symbolic tracing records the reference's ops (the kernels need real tensors)"


def fx_traced(backend: str, x: object) -> bool:
    """Whether x is a torch.fx Proxy: symbolic tracing (torchvision's create_feature_extractor, FX
    quantization), where the graph can hold only the reference's ops. "auto" then says so once; an
    explicit backend raises."""
    if not isinstance(x, torch.fx.Proxy):
        return False
    if backend not in ("auto", "reference"):
        raise BackendUnavailable(f"backend={backend!r} cannot run: {FX_TRACING}")
    if backend == "auto":
        warn_once("fx", f"bam_fused: using the reference: {FX_TRACING}")
    return True


def gate_impl(backend: str, x: torch.Tensor, *, traceable: bool = False) -> str:
    """Resolves a bam_gate backend to the kernel that runs: "triton", "cpp" or "reference".

    ``traceable``: the caller runs a dispatcher op with no autograd (BAM's CPU eval op), which a
    torch.jit trace records as it is."""
    why = transform_reason() if backend != "reference" else None
    if why is not None and not (traceable and why == TRACING):
        if backend != "auto":
            raise BackendUnavailable(f"backend={backend!r} cannot run: {why}")
        if not torch.compiler.is_compiling():  # (Dynamo cannot trace warnings.warn)
            warn_once(f"transform:{why}", f"bam_fused: using the reference: {why}")
        return "reference"
    return _gate_impl(backend, x.device.type, x.dtype)


# A constant for torch.compile: the answer depends only on the arguments and the
# environment, and compiled graphs already guard on x's device and dtype.
@torch.compiler.assume_constant_result
def _gate_impl(backend: str, device_type: str, dtype: torch.dtype) -> str:
    device = torch.device(device_type)
    if backend == "reference":
        return "reference"
    if backend in ("triton", "cpp"):
        why = _dtype_reason(backend, dtype)  # a property of the kernel, whatever the machine
        if why is not None:
            raise TypeError(f"x: {why}")
        why = (triton_reason if backend == "triton" else cpp_reason)(device)
        if why is not None:
            raise BackendUnavailable(f"backend={backend!r} cannot run: {why}")
        return backend
    impl = "triton" if device_type == "cuda" else "cpp"
    why = (triton_reason if impl == "triton" else cpp_reason)(device) or _dtype_reason(impl, dtype)
    if why is None:
        return impl
    warn_once(f"gate:{device_type}:{dtype}:{why}", f"bam_fused: using the reference gate: {why}")
    return "reference"


@torch.compiler.assume_constant_result
def branch_kernel_reason(device_type: str) -> str | None:
    """Why the branch op cannot run on this device type, or None when it can."""
    if device_type not in ("cpu", "cuda"):
        return f"no branch kernel for {device_type}"
    try:
        importlib.import_module("bam_fused.ops.branches").load_op()  # the op and its fake kernel
    except _ext.ExtensionUnavailable as exc:
        return str(exc)
    if device_type == "cuda" and not _ext.has_cuda_kernels():
        return "the extension was built without CUDA kernels"
    return None


def kernels(impl: str) -> ModuleType:
    """The module holding gate_forward / gate_backward for a kernel impl."""
    if impl == "triton":
        module, why = _triton()
        if module is None:
            raise BackendUnavailable(why)
        return module
    return importlib.import_module("bam_fused.ops.gate_cpp")
