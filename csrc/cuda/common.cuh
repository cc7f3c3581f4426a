// Helpers shared by the CUDA kernel headers (torch-free).
#pragma once

#include <cstdint>

namespace bam_fused {
namespace cuda {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#ifdef __CUDACC__
#define BAM_HOST_DEVICE __host__ __device__
#else
#define BAM_HOST_DEVICE  // the SIMT emulator of tests/simt
#endif

// ReLU as torch's: NaN stays NaN (fmaxf(NaN, 0.f) is 0, which hid a NaN input).
BAM_HOST_DEVICE inline float relu(float v) { return v < 0.f ? 0.f : v; }

}  // namespace cuda
}  // namespace bam_fused
