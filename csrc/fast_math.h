// Elementwise math shared by the CPU kernels. Plain C++ that compilers vectorise (no libm
// calls in the hot loop): expf after Cephes, about 2 ulp, with NaN passing through.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace bam_fused {

inline float exp_approx(float x) {
  // Comparisons, not fminf/fmaxf, so that NaN stays NaN.
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  const float z = std::floor(1.44269504088896341f * x + 0.5f);
  x -= z * 0.693359375f;
  x -= z * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * x + 1.3981999507e-3f;
  p = p * x + 8.3334519073e-3f;
  p = p * x + 4.1665795894e-2f;
  p = p * x + 1.6666665459e-1f;
  p = p * x + 5.0000001201e-1f;
  p = p * x * x + x + 1.0f;
  const int32_t bits = (static_cast<int32_t>(z) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// The argument is clamped to +-80 so that sigmoid never returns a denormal (x86 handles those
// in microcode, about a hundred times slower); sigmoid(-80) = 1.8e-35 is far below fp32's
// resolution of 1 + s, so the gate x * (1 + s) is unchanged. NaN passes through.
inline float sigmoid(float a) {
  a = a < -80.f ? -80.f : a;
  a = a > 80.f ? 80.f : a;
  return 1.0f / (1.0f + exp_approx(-a));
}
inline double sigmoid(double a) { return 1.0 / (1.0 + std::exp(-a)); }
inline double exp_approx(double x) { return std::exp(x); }

// With combine = sum, exp(-(r + c)) = exp(-r) * exp(-c): one exp per row and per column
// instead of one per element. Both factors stay normal (no overflow, no denormal) while
// |r|, |c| <= kSplitExpLimit, which the callers check before taking this path.
constexpr float kSplitExpLimit = 40.f;

}  // namespace bam_fused
