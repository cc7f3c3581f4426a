// The AVX-512 register blocking of the CPU kernels (conv1x1_pool.h, conv1x1_grad.h,
// dilated_conv.h), shared by conv1x1_pool_avx512.cpp and conv1x1_pool_avx512bf16.cpp: the
// launcher packs weights for this blocking (blocking() in reduce_pool_cpu.cpp), so both must
// use the same. Included after a file's AVX-512 target options; internal linkage, like the
// kernel headers.
#pragma once

#include <immintrin.h>

#include "simd.h"

namespace bam_fused {
namespace {  // NOLINT: internal linkage on purpose (each ISA file its own copy)

// 16-lane vectors, 8 output channels x 3 pixel vectors of accumulators (24 + 3 + 1 of 32 zmm
// registers).
struct Avx512 {
  typedef float V __attribute__((vector_size(64)));
  static constexpr int kPV = 3, kCo = 8, kAcc = 24;
  // dW blocking (conv1x1_grad.h): NCHW 4 dy rows x 4 x rows (16 lane sums in one tree),
  // channels_last 6 dy rows x 4 vectors.
  static constexpr int kGR = 4, kGC = 4, kWR = 6, kWCv = 4;
  // One broadcast load; GCC lowers the generic (s - V{}) to a ymm broadcast and an insert.
  static BAM_INLINE V splat(float s) { return _mm512_set1_ps(s); }
  // The sum of the lanes in a tree of halves, lane i + lane i + kL / 2 first (the dilated convs'
  // final 1x1 conv and the Winograd finiteness check): the same order under every ISA.
  static BAM_INLINE float hsum(V v) { return _mm512_reduce_add_ps(v); }
};

}  // namespace
}  // namespace bam_fused
