// conv1x1_pool.h, conv1x1_grad.h and dilated_conv.h for AVX2 + FMA (x86-64-v3): 8-lane
// vectors, 4 output channels x 3 pixel vectors of accumulators (12 + 3 + 1 of 16 ymm
// registers).
//
// The library headers, isa.h and simd.h come first, without the target options below: code that
// other files also compile (inline functions, templates) must not carry AVX2.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "simd.h"

#if BAM_X86
#include <immintrin.h>

BAM_TARGET_BEGIN("avx2,fma,bmi2")

#include "conv1x1_grad.h"
#include "conv1x1_pool.h"
#include "dilated_conv.h"

namespace bam_fused {
namespace {

struct Avx2 {
  typedef float V __attribute__((vector_size(32)));
  static constexpr int kPV = 3, kCo = 4, kAcc = 12;
  // dW blocking (conv1x1_grad.h): NCHW 2 dy rows x 4 x rows (8 lane sums in one tree),
  // channels_last 6 dy rows x 2 vectors.
  static constexpr int kGR = 2, kGC = 4, kWR = 6, kWCv = 2;
  static BAM_INLINE V splat(float s) { return _mm256_set1_ps(s); }
  // The sum of the lanes in a tree of halves, lane i + lane i + kL / 2 first (the dilated convs'
  // final 1x1 conv and the Winograd finiteness check): the same order under every ISA.
  static BAM_INLINE float hsum(V v) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
  }
};

}  // namespace

BAM_DEFINE_CONV1X1_POOL(avx2, Avx2)
BAM_DEFINE_CONV1X1_GRAD(avx2, Avx2)
BAM_DEFINE_DILATED_CONV(avx2, Avx2)

}  // namespace bam_fused

BAM_TARGET_END
#endif
