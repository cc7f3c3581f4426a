// Host-side helpers shared by the CUDA kernel headers (torch-free).
#pragma once

#include <cstdint>

namespace bam_fused {
namespace cuda {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace bam_fused
