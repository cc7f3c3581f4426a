"""Builds the optional C++/CUDA extension bam_fused._C (metadata lives in pyproject.toml).

CPU sources always; CUDA sources when torch has CUDA and nvcc is found, or when
BAM_FUSED_FORCE_CUDA=1 (=0 never builds it). BAM_FUSED_SKIP_EXT=1 builds nothing (the package then falls back to a
JIT build or the reference). TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" when no GPU is visible.
Install with: pip install --no-build-isolation -e .
"""

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in {"1", "true", "yes", "on"}


def find_cuda_home() -> None:
    # torch guesses CUDA_HOME from nvcc's folder, which is wrong when nvcc is a wrapper
    # script outside the toolkit (then libcudart is not found).
    if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def extensions() -> tuple[list, dict]:
    if flag("BAM_FUSED_SKIP_EXT"):
        return [], {}
    find_cuda_home()
    import torch
    from torch.utils import cpp_extension

    force = os.environ.get("BAM_FUSED_FORCE_CUDA", "").strip()
    if force:  # 1: build the CUDA part whatever is found; 0: never
        with_cuda = flag("BAM_FUSED_FORCE_CUDA")
    else:
        with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    sources = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))]
    sources.append("csrc/bam_fused.cpp")
    # -fopenmp: at::parallel_for is inline and runs serially in a file compiled without it
    # (the CPU gate was single-threaded until 2026-11-26); linking libgomp reuses the copy
    # torch has loaded (same soname). -fno-trapping-math lets GCC if-convert (and so
    # vectorise) the clamps in fast_math.h.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else ["-fopenmp-simd"]  # Apple clang: no OpenMP
    cxx = ["-O3", *openmp, "-fno-math-errno", "-fno-trapping-math"]
    nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native GPU")
        defines = ["-DBAM_FUSED_WITH_CUDA", f'-DBAM_FUSED_CUDA_ARCHS="{archs}"']
        cxx += defines
        nvcc += defines
        sources += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "cuda").glob("*.cu"))]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls(
        name="bam_fused._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=[f for f in openmp if f == "-fopenmp"],
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
