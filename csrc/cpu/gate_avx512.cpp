// The fp32 gate's split-exp rows (gate_cpu.cpp) for AVX-512: out = x * (1 + 1 / (1 + er * ecol))
// with the reciprocal from vrcp14ps and one Newton step instead of a division. vdivps took a
// quarter of the gate's samples at 8 x 256 x 56x56 (2-core Zen 4, perf, 2026-11-28).
// The step's error stays near an ulp of s (rcp14's 2^-14 squared, plus rounding); the argument
// 1 + er * ecol lies in [1, 1 + e^80] on this path (|row|, |col| <= kSplitExpLimit), so the
// reciprocal stays normal and the step finite.
#include <cstdint>

#include "isa.h"

#if BAM_X86
#include <immintrin.h>

BAM_TARGET_BEGIN("avx512f,fma")

namespace bam_fused {

void gate_split_row_avx512(const float* x, const float* ecol, float er, float* out, int64_t L, bool stream) {
  const __m512 one = _mm512_set1_ps(1.f), erv = _mm512_set1_ps(er);
  const auto value = [&](__m512 xv, __m512 ev) {
    const __m512 d = _mm512_fmadd_ps(erv, ev, one);
    __m512 r = _mm512_rcp14_ps(d);
    r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, one), r);
    return _mm512_mul_ps(xv, _mm512_add_ps(one, r));
  };
  const auto part = [&](int64_t l, int64_t n) {  // n < 16 elements at l
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    _mm512_mask_storeu_ps(out + l, m, value(_mm512_maskz_loadu_ps(m, x + l), _mm512_maskz_loadu_ps(m, ecol + l)));
  };
  int64_t l = 0;
  if (stream) {  // non-temporal stores need 64-byte aligned vectors: a partial head first
    const int64_t head = static_cast<int64_t>((64 - reinterpret_cast<uintptr_t>(out) % 64) % 64) / 4;
    if (reinterpret_cast<uintptr_t>(out) % 4 == 0 && head > 0) {
      part(0, head < L ? head : L);
      l = head < L ? head : L;
    }
    if (reinterpret_cast<uintptr_t>(out + l) % 64 == 0) {
      for (; l + 16 <= L; l += 16) _mm512_stream_ps(out + l, value(_mm512_loadu_ps(x + l), _mm512_loadu_ps(ecol + l)));
    }
  }
  for (; l + 16 <= L; l += 16) _mm512_storeu_ps(out + l, value(_mm512_loadu_ps(x + l), _mm512_loadu_ps(ecol + l)));
  if (l < L) part(l, L - l);
}

}  // namespace bam_fused

BAM_TARGET_END
#endif
