// conv1x1_pool.h, conv1x1_grad.h and dilated_conv.h for AVX-512 (x86-64-v4): 16-lane vectors,
// 8 output channels x 3 pixel vectors of accumulators (24 + 3 + 1 of 32 zmm registers).
//
// The library headers, isa.h and simd.h come first, without the target options below: code that
// other files also compile (inline functions, templates) must not carry AVX-512.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "simd.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi2"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi2")
#endif

#include "conv1x1_grad.h"
#include "conv1x1_pool.h"
#include "dilated_conv.h"

namespace bam_fused {
namespace {

struct Avx512 {
  typedef float V __attribute__((vector_size(64)));
  static constexpr int kPV = 3, kCo = 8, kAcc = 24;
  // dW blocking (conv1x1_grad.h): NCHW 4 dy rows x 4 x rows (16 lane sums in one tree),
  // channels_last 6 dy rows x 4 vectors.
  static constexpr int kGR = 4, kGC = 4, kWR = 6, kWCv = 4;
  // One broadcast load; GCC lowers the generic (s - V{}) to a ymm broadcast and an insert.
  static BAM_INLINE V splat(float s) { return _mm512_set1_ps(s); }
};

}  // namespace

BAM_DEFINE_CONV1X1_POOL(avx512, Avx512)
BAM_DEFINE_CONV1X1_GRAD(avx512, Avx512)
BAM_DEFINE_DILATED_CONV(avx512, Avx512)

}  // namespace bam_fused

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
