"""Finds the compiled C++/CUDA extension, or JIT-builds it once, or says why neither worked.

The build is never required: a missing extension means the reference path plus one warning.
The extension registers the ``bam_fused_C`` ops (gate forward/backward on the CPU, the branch
op on CPU and CUDA) and a pybind11 ``build_info()``.
"""

from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path
from types import ModuleType

from . import env

_ROOT = Path(__file__).resolve().parent.parent
_CSRC = _ROOT / "csrc"


class ExtensionUnavailable(RuntimeError):
    """The compiled extension could not be imported or built; the message says why."""


def sources(with_cuda: bool) -> list[str]:
    files = sorted(str(p) for p in (_CSRC / "cpu").glob("*.cpp")) + [str(_CSRC / "bam_fused.cpp")]
    if with_cuda:
        files += sorted(str(p) for p in (_CSRC / "cuda").glob("*.cu"))
    return files


def _jit_build() -> ModuleType:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, load

    if not _CSRC.is_dir():
        raise ExtensionUnavailable(f"no sources to JIT-build from ({_CSRC} is missing)")
    with_cuda = torch.cuda.is_available() and CUDA_HOME is not None
    linux = sys.platform.startswith("linux")
    return load(
        name="bam_fused_C",
        sources=sources(with_cuda),
        # The same flags as setup.py (which says why -fopenmp matters).
        extra_cflags=["-O3", "-fopenmp" if linux else "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"]
        + (["-DBAM_FUSED_WITH_CUDA"] if with_cuda else []),
        extra_ldflags=["-fopenmp"] if linux else [],
        extra_cuda_cflags=["-O3", "--use_fast_math", "-DBAM_FUSED_WITH_CUDA"],
        extra_include_paths=[str(_CSRC)],
        verbose=env.flag("BAM_FUSED_VERBOSE_BUILD"),
    )


@functools.cache
def load() -> ModuleType:
    """Returns the extension module, raising ExtensionUnavailable with the reason."""
    if env.flag("BAM_FUSED_DISABLE_EXT"):
        raise ExtensionUnavailable("disabled by BAM_FUSED_DISABLE_EXT=1")
    try:
        return importlib.import_module("bam_fused._C")
    except ImportError as exc:
        prebuilt_error = f"bam_fused._C is not importable ({exc})"
    if not env.flag("BAM_FUSED_JIT", default=True):
        raise ExtensionUnavailable(f"{prebuilt_error}; JIT build disabled by BAM_FUSED_JIT=0")
    try:
        return _jit_build()
    except Exception as exc:  # any build failure means: fall back, and say why
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExtensionUnavailable(f"{prebuilt_error}; JIT build failed: {first}") from exc


def reason() -> str | None:
    """Why the extension is unavailable, or None when it loads."""
    try:
        load()
    except ExtensionUnavailable as exc:
        return str(exc)
    return None


def build_info() -> dict:
    try:
        return dict(load().build_info())
    except ExtensionUnavailable as exc:
        return {"available": False, "reason": str(exc)}


def has_cuda_kernels() -> bool:
    return bool(build_info().get("with_cuda", False))
