"""The CUDA kernels compile for sm_80 and sm_90 with zero register spills (no GPU needed),
and the extension in use was built with them when the toolkit is present."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bam_fused import _ext

ROOT = Path(__file__).resolve().parent.parent
NVCC = shutil.which("nvcc") or (
    str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    if (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc").exists()
    else None
)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")

# The kernel header is torch-free: instantiate it for each storage type and layout.
INSTANTIATE = """
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "cuda/reduce_pool.cuh"
#include "cuda/spatial_convs.cuh"
#include "cuda/channel_mlp.cuh"
namespace bam_fused { namespace cuda {
#define INST(T, R) \\
  template __global__ void reduce_pool_kernel<T, false, R>(const T*, const float*, const float*, float*, float*, \\
      float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, float, bool); \\
  template __global__ void reduce_pool_kernel<T, true, R>(const T*, const float*, const float*, float*, float*, \\
      float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, float, bool);
#define INST_ROWS(T) INST(T, 16) INST(T, 32) INST(T, 64)
INST_ROWS(float) INST_ROWS(__half) INST_ROWS(__nv_bfloat16)
#define INST_CONV(P, F, I) template __global__ void dilated_conv_kernel<P, F, I>(const float*, const float*, \\
      const float*, const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, \\
      int64_t, int64_t, int64_t);
INST_CONV(1, false, int32_t) INST_CONV(2, false, int32_t) INST_CONV(1, true, int32_t) INST_CONV(2, true, int32_t)
INST_CONV(1, false, int64_t) INST_CONV(1, true, int64_t)
}}
"""
# reduce_pool: storage types x layouts x row tiles, and its finishing kernel;
# spatial_convs: pixels per thread x (middle, final) conv with int32 plane indexing, the two
# one-pixel int64 ones (wide planes), and the group sum; channel_mlp.
KERNELS = 3 * 2 * 3 + 1 + 2 * 2 + 2 + 1 + 1


@needs_nvcc
@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_kernels_compile_without_spills(tmp_path, arch):
    src = tmp_path / "inst.cu"
    src.write_text(INSTANTIATE)
    proc = subprocess.run(
        [NVCC, "-O3", "--use_fast_math", f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", "-I", str(ROOT / "csrc"),
         str(src), "-o", str(tmp_path / "inst.cubin")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(spills) == KERNELS, log
    assert all(s == ("0", "0") for s in spills), log
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    assert regs and max(regs) <= 255


@needs_nvcc
@pytest.mark.skipif(os.environ.get("BAM_FUSED_FORCE_CUDA") == "0", reason="CUDA build turned off")
def test_extension_was_built_with_cuda_for_sm80_and_sm90():
    info = _ext.build_info()
    assert info.get("available"), info
    assert info.get("with_cuda"), "nvcc is here, so the build should include the CUDA kernels"
    archs = info.get("cuda_archs", "")
    if os.environ.get("TORCH_CUDA_ARCH_LIST") is None and "native" not in archs:
        assert "8.0" in archs and "9.0" in archs, archs
