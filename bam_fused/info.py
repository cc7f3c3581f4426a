"""bam_fused.info(): versions, device, which kernels are active and why others are not."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from . import __version__, _backends, _ext


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def cpu_huge_pages(mode_file: str = _THP_MODE) -> str:
    """Linux's transparent huge pages and whether torch asks for them: with x in huge pages the
    CPU pass over NCHW x runs faster (README, "CPU note")."""
    try:
        with open(mode_file) as f:
            mode = next((w[1:-1] for w in f.read().split() if w.startswith("[") and w.endswith("]")), None)
    except OSError:
        return "not available"
    if mode is None:
        return "unknown"
    if mode != "madvise":
        return mode  # always: every large allocation; never: none
    asked = os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"
    return "madvise: " + (
        "torch asks (THP_MEM_ALLOC_ENABLE=1)" if asked else "torch does not ask (THP_MEM_ALLOC_ENABLE=1 would)"
    )


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _eval_mode_reason() -> str | None:
    """Why the CUDA eval path's Triton kernels cannot run here (given a GPU and Triton)."""
    from .ops import attention_cuda

    try:
        mode = attention_cuda.mode()
    except ValueError as exc:
        return str(exc)
    if mode == "kernel":
        return "BAM_FUSED_CUDA_EVAL=kernel"
    if not attention_cuda._has_tf32(torch.device("cuda")):
        return "they need TF32 tensor cores (sm_80 or later)"
    return None


def _winograd_note(setting: str | None) -> str:
    """How our fp32 CPU dilated convs compute, from BAM_FUSED_CPU_WINOGRAD as the extension reads
    it (build_info's cpu_winograd: the value, or why the extension refuses it)."""
    if setting == "on":
        return "fp32 by Winograd F(2x2, 3x3) (BAM_FUSED_CPU_WINOGRAD=on)"
    if setting == "off":
        return "fp32 direct (BAM_FUSED_CPU_WINOGRAD=off)"
    if setting != "auto":
        return f"fp32: {setting}"
    return (
        "fp32 by Winograd F(2x2, 3x3) from 16 channels where H, W >= 2 * dilation (above 16 on N*H*W >= 784), "
        "else direct"
    )


def _cpu_spatial_status(unavailable: str | None, setting: str | None, winograd: str) -> dict[str, Any]:
    """Our CPU dilated convs or oneDNN's, from BAM_FUSED_CPU_SPATIAL as the extension reads it
    (build_info's cpu_spatial: the value, or why the extension refuses it); winograd: how ours
    compute in fp32 (_winograd_note)."""
    if unavailable is not None:
        return {"active": False, "reason": unavailable}
    if setting == "library":
        return {"active": False, "reason": "BAM_FUSED_CPU_SPATIAL=library: oneDNN's convs"}
    if setting not in ("auto", "kernel"):
        return {"active": False, "reason": str(setting)}
    note = (
        "at 16 and 32 reduced channels, in eval at 64 under avx2, on small maps in eval below 16 "
        "(N*H*W*Cr <= 25088) and above 32 under avx512 (N*H*W*Cr <= 50176), oneDNN's "
        "otherwise; in bf16 for bf16 x on avx512_bf16"
        if setting == "auto"
        else "BAM_FUSED_CPU_SPATIAL=kernel"
    )
    return {"active": True, "reason": None, "note": f"{note}; {winograd}"}


def info() -> dict[str, Any]:
    """A dict a user can paste into a bug report: versions, device and kernel status."""
    device = default_device()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def status(reason: str | None) -> dict[str, Any]:
        return {"active": reason is None, "reason": reason}

    cuda_branch = _backends.branch_kernel_reason("cuda")
    if cuda_branch is None and not torch.cuda.is_available():
        cuda_branch = "no CUDA device is visible"
    triton_cuda = _backends.triton_reason(cuda)
    if triton_cuda is None and not torch.cuda.is_available():
        triton_cuda = "no CUDA device is visible"
    extension, branch_cpu = _ext.build_info(), _backends.branch_kernel_reason("cpu")
    return {
        "bam_fused": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "cpu_huge_pages": cpu_huge_pages(),
        "extension": extension,
        "kernels": {
            "gate (Triton, CUDA)": status(triton_cuda),
            "gate (C++, CPU)": status(_backends.cpp_reason(cpu)),
            "branches (C++, CPU)": status(branch_cpu),
            "branches (CUDA)": status(cuda_branch),
            # The Triton pass over x, dilated convs and MLP of the CUDA eval path
            # (ops/attention_cuda.py chooses them or the extension's op per BAM_FUSED_CUDA_EVAL).
            "branches (Triton, CUDA)": status(cuda_branch or triton_cuda or _eval_mode_reason()),
            # BAM with autograd on the CPU (ops/training.py); on CUDA the branches run as modules.
            "branch autograd (CPU)": status(branch_cpu),
            # The CPU dilated convs of the eval path: ours or oneDNN's (BAM_FUSED_CPU_SPATIAL).
            "dilated convs (C++, CPU)": _cpu_spatial_status(
                branch_cpu,
                extension.get("cpu_spatial"),
                _winograd_note(extension.get("cpu_winograd")),
            ),
        },
    }


def format_info(data: dict[str, Any]) -> str:
    lines = []
    for key, value in data.items():
        if key == "kernels":
            lines.append("kernels:")
            for name, st in value.items():
                state = (
                    ("active" + (f" ({st['note']})" if st.get("note") else ""))
                    if st["active"]
                    else "inactive: " + st["reason"]
                )
                lines.append(f"  {name:24s} {state}")
        elif key == "extension":
            lines.append("extension: " + ", ".join(f"{k}={v}" for k, v in value.items()))
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)
