// The bf16 gate's split-exp rows (gate_cpu.cpp) on CPUs with AVX512-BF16: forward out = x * (1 +
// s), backward dx = g * (1 + s) and dz = g * x * s * (1 - s), with s = 1 / (1 + er * ecol), in
// fp32 as the generic code computes them (the same FMA and division, the same order of
// products), with x and g widened from bf16 and the results rounded to bf16 by
// vcvtne2ps2bf16, 32 a vector. The generic code's rounding (c10::BFloat16's, nearest even, in
// integer steps) held about half of the bf16 gate forward's perf samples at 8 x 256 x 56x56 and
// a third of the backward's (2-core Zen 4, 2026-11-28). The backward's row sums of dz are
// summed in 16 lanes, so they differ from the generic loop's by rounding; dx and the column
// sums are the same bits.
//
// The instruction rounds to nearest even too, but reads denormals as zero and keeps a NaN's sign
// and payload, where c10::BFloat16 keeps denormals and writes every NaN as 0x7FC0: a vector with
// a NaN or a denormal result rounds lane by lane as c10 does. So the bits are the generic code's.
#include <cstdint>
#include <cstring>

#include "isa.h"
#include "simd.h"

#if BAM_X86
#include <immintrin.h>

BAM_TARGET_BEGIN("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,bmi2")

namespace bam_fused {
namespace {

// 16 bf16 at p (the lanes outside m read as zeros) as fp32.
__m512 widen(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// lo, hi (16 floats each) rounded to 32 bf16, lo's first.
__m512i to_bf16(__m512 lo, __m512 hi) {
  constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;  // vfpclassps: QNaN, denormal, SNaN
  if ((_mm512_fpclass_ps_mask(lo, kNanOrDenormal) | _mm512_fpclass_ps_mask(hi, kNanOrDenormal)) == 0)
    return _mm512_castps_si512(reinterpret_cast<__m512>(_mm512_cvtne2ps_pbh(hi, lo)));
  alignas(64) float f[32];
  alignas(64) Bf16 b[32];
  _mm512_store_ps(f, lo);
  _mm512_store_ps(f + 16, hi);
  for (int i = 0; i < 32; ++i) st(b + i, f[i]);  // the generic code's rounding (c10's)
  return _mm512_load_si512(b);
}

}  // namespace

void gate_split_row_avx512bf16(const uint16_t* x, const float* ecol, float er, uint16_t* out, int64_t L,
                               bool stream) {
  const __m512 one = _mm512_set1_ps(1.f), erv = _mm512_set1_ps(er);
  const auto value = [&](__m512 xv, __m512 ev) {
    return _mm512_mul_ps(xv, _mm512_add_ps(one, _mm512_div_ps(one, _mm512_fmadd_ps(erv, ev, one))));
  };
  // n <= 32 elements at l: two halves of 16, masked.
  const auto values = [&](int64_t l, int64_t n) {
    const int64_t n0 = n < 16 ? n : 16, n1 = n - n0;
    const auto m0 = static_cast<__mmask16>((1u << n0) - 1), m1 = static_cast<__mmask16>((1u << n1) - 1);
    return to_bf16(value(widen(x + l, m0), _mm512_maskz_loadu_ps(m0, ecol + l)),
                   value(widen(x + l + 16, m1), _mm512_maskz_loadu_ps(m1, ecol + l + 16)));
  };
  const auto part = [&](int64_t l, int64_t n) {  // n < 32 elements at l
    _mm512_mask_storeu_epi16(out + l, static_cast<__mmask32>((uint64_t{1} << n) - 1), values(l, n));
  };
  int64_t l = 0;
  if (stream && reinterpret_cast<uintptr_t>(out) % 2 == 0) {  // non-temporal stores need 64-byte aligned vectors
    const int64_t head = static_cast<int64_t>((64 - reinterpret_cast<uintptr_t>(out) % 64) % 64) / 2;
    if (head > 0) {
      l = head < L ? head : L;
      part(0, l);
    }
    for (; l + 32 <= L; l += 32) _mm512_stream_si512(reinterpret_cast<__m512i*>(out + l), values(l, 32));
  }
  for (; l + 32 <= L; l += 32) _mm512_storeu_si512(out + l, values(l, 32));
  if (l < L) part(l, L - l);
}

float gate_bwd_split_row_avx512bf16(const uint16_t* g, const uint16_t* x, const float* ecol, float er, uint16_t* dx,
                                    float* dcol, int64_t L) {
  const __m512 one = _mm512_set1_ps(1.f), erv = _mm512_set1_ps(er);
  __m512 rsum = _mm512_setzero_ps();
  // 16 elements at l (lanes outside m: zeros, unused): dcol updated, dx's fp32 value returned.
  const auto half = [&](int64_t l, __mmask16 m) {
    const __m512 gv = widen(g + l, m), xv = widen(x + l, m);
    const __m512 s = _mm512_div_ps(one, _mm512_fmadd_ps(erv, _mm512_maskz_loadu_ps(m, ecol + l), one));
    const __m512 dz = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(gv, xv), s), _mm512_sub_ps(one, s));
    rsum = _mm512_add_ps(rsum, dz);
    _mm512_mask_storeu_ps(dcol + l, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, dcol + l), dz));
    return _mm512_mul_ps(gv, _mm512_add_ps(one, s));
  };
  const auto block = [&](int64_t l, int64_t n) {  // n <= 32 elements at l
    const int64_t n0 = n < 16 ? n : 16, n1 = n - n0;
    const auto m0 = static_cast<__mmask16>((1u << n0) - 1), m1 = static_cast<__mmask16>((1u << n1) - 1);
    const __m512 lo = half(l, m0), hi = half(l + 16, m1);
    _mm512_mask_storeu_epi16(dx + l, static_cast<__mmask32>((uint64_t{1} << n) - 1), to_bf16(lo, hi));
  };
  int64_t l = 0;
  for (; l + 32 <= L; l += 32) block(l, 32);
  if (l < L) block(l, L - l);
  return _mm512_reduce_add_ps(rsum);
}

}  // namespace bam_fused

BAM_TARGET_END
#endif
