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

inline float sigmoid(float a) { return 1.0f / (1.0f + exp_approx(-a)); }
inline double sigmoid(double a) { return 1.0 / (1.0 + std::exp(-a)); }

}  // namespace bam_fused
