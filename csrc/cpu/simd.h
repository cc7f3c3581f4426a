// Shared by the CPU kernels, torch-free (the per-instruction-set files include it under
// their own target options): clone and inline macros, and conversions between storage and
// math types that compilers vectorise.
#pragma once

#include <cstdint>
#include <cstring>

namespace bam_fused {

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && __GNUC__ >= 12
// One copy of each hot loop per instruction set, chosen at load time (GCC ifunc; the
// x86-64-v* levels need GCC 12, older compilers build the default copy only).
#define BAM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BAM_CLONES
#endif
#define BAM_INLINE inline __attribute__((always_inline))
#define BAM_INLINE_LAMBDA __attribute__((always_inline))  // after a lambda's parameter list

// Loads and stores between storage and math types, written so that compilers vectorise them
// (c10's conversions branch and stay scalar). Rounding is c10's: nearest-even; NaN becomes
// 0x7FC0 (bfloat16) or 0x7E00 (half).
// 16-bit storage types, layout-compatible with c10::BFloat16 and c10::Half.
struct Bf16 {
  uint16_t bits;
};
struct Fp16 {
  uint16_t bits;
};

BAM_INLINE float ld(const float* p) { return *p; }
BAM_INLINE double ld(const double* p) { return *p; }
BAM_INLINE float ld(const Bf16* p) {
  uint16_t b;
  std::memcpy(&b, p, sizeof(b));
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
BAM_INLINE float as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
BAM_INLINE uint32_t as_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
// IEEE half <-> float without branches (after F. Giesen's public-domain versions).
BAM_INLINE float ld(const Fp16* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  constexpr uint32_t kShiftedExp = 0x7c00u << 13;
  const uint32_t o = ((h & 0x7fffu) << 13) + ((127u - 15u) << 23);
  const uint32_t exp = (static_cast<uint32_t>(h & 0x7c00u)) << 13;
  const uint32_t inf_nan = o + ((128u - 16u) << 23);
  const uint32_t subnormal = as_bits(as_float(o + (1u << 23)) - as_float(113u << 23));
  const uint32_t bits = exp == kShiftedExp ? inf_nan : (exp == 0 ? subnormal : o);
  return as_float(bits | (static_cast<uint32_t>(h & 0x8000u) << 16));
}
BAM_INLINE void st(float* p, float v) { *p = v; }
BAM_INLINE void st(double* p, double v) { *p = v; }
BAM_INLINE void st(Bf16* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t b = v != v ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
  std::memcpy(p, &b, sizeof(b));
}
BAM_INLINE void st(Fp16* p, float v) {
  uint32_t f = as_bits(v);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  constexpr uint32_t kDenormMagic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t big = f > (255u << 23) ? 0x7e00u : 0x7c00u;  // NaN or overflow to inf
  const uint32_t small = as_bits(as_float(f) + as_float(kDenormMagic)) - kDenormMagic;
  const uint32_t normal = (f + ((15u - 127u) << 23) + 0xfffu + ((f >> 13) & 1u)) >> 13;
  const uint32_t o = f >= ((127u + 16u) << 23) ? big : (f < (113u << 23) ? small : normal);
  const uint16_t h = static_cast<uint16_t>(o | (sign >> 16));
  std::memcpy(p, &h, sizeof(h));
}

}  // namespace bam_fused
