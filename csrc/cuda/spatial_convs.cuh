// CUDA kernels of the spatial branch after the reduce conv, free of torch headers.
//
// On the small (N, Cr, H, W) fp32 map y: a 3x3 conv with dilation d and zero padding d, plus
// bias and ReLU; the last one also applies the final 1x1 conv to one channel, so its
// (N, Cr, H, W) output never reaches memory. With Cr = C/16 these convs do little work
// (Cr*Cr*9 FMAs per pixel), where the library's implicit-GEMM kernels are badly shaped and
// add layout transposes around themselves.
//
// A block of 128 threads owns kOut output channels (grid.y walks them) and 128 * kPx pixels
// of the flattened (N, H*W) map; each thread keeps a (kPx x kOut) tile of sums in registers.
// The block stages the weights of kIn input channels at a time in shared memory as
// [ci][tap][co], so that every 16-byte shared-memory load (the same address across the warp,
// a broadcast) feeds 4 * kPx FMAs. Inputs are read straight from global memory: neighbouring
// threads read neighbouring pixels, and y is small enough to stay in L2.
//
// With more than one output-channel group the final 1x1 conv is split too: each group writes
// its partial dot product and sum_groups_kernel adds them in a fixed order (no atomics:
// results are bitwise repeatable).
#pragma once

#include <cstdint>

#include "common.cuh"

namespace bam_fused {
namespace cuda {

constexpr int kConvThreads = 128;
constexpr int kOut = 16;  // output channels per block
constexpr int kIn = 16;   // input channels per shared-memory weight slice

struct SpatialPlan {
  int px;                 // pixels per thread (kPx of the instantiation to launch)
  bool wide;              // planes past int32 indexing: 64-bit tap offsets (Idx), one pixel per thread
  int64_t pixel_blocks;   // grid.x
  int64_t groups;         // grid.y: output-channel groups of kOut
};

// min_blocks: how many 128-thread blocks keep the GPU busy. Two pixels per thread halve the
// shared-memory loads per FMA, but only where there are blocks enough to fill the GPU. Planes
// of over 2^31 pixels (beyond any GPU's memory today) take one: two pixels' 64-bit tap offsets
// would not fit in registers.
inline SpatialPlan plan_spatial(int64_t N, int64_t HW, int64_t Cr, int64_t min_blocks) {
  SpatialPlan p{};
  p.groups = ceil_div(Cr, kOut);
  p.wide = HW > INT32_MAX;
  p.px = !p.wide && ceil_div(N * HW, 2 * kConvThreads) * p.groups >= min_blocks ? 2 : 1;
  p.pixel_blocks = ceil_div(N * HW, p.px * kConvThreads);
  return p;
}

// in: (N, Cr, H, W); w: (Cr, Cr, 3, 3) with strides w_co, w_ci, w_kh, w_kw (any layout); b: (Cr,).
// kFinal false: out (N, Cr, H, W) = relu(conv(in) + b).
// kFinal true: out[group] (N, H, W) = sum over the group's channels co of
//   w_fin[co] * relu(conv(in)[co] + b[co]), plus b_fin[0] in group 0; out is (groups, N, H, W).
// Idx indexes one (H, W) plane: int32_t unless H * W does not fit (the launcher picks).
template <int kPx, bool kFinal, typename Idx>
__global__ void __launch_bounds__(kConvThreads, 4) dilated_conv_kernel(
    const float* __restrict__ in, const float* __restrict__ w, const float* __restrict__ b,
    const float* __restrict__ w_fin, const float* __restrict__ b_fin, float* __restrict__ out, int64_t N,
    int64_t Cr, int64_t H, int64_t W, int64_t dil, int64_t w_co, int64_t w_ci, int64_t w_kh, int64_t w_kw) {
  __shared__ __align__(16) float ws[kIn][9][kOut];
  const int tid = threadIdx.x;
  const int64_t HW = H * W, total = N * HW;
  const int64_t co0 = static_cast<int64_t>(blockIdx.y) * kOut;

  // Per pixel: its sample's first plane, and per tap the element the tap reads within a plane,
  // or -1 where it falls in the zero padding (or the pixel is past the map). Worked out once
  // here, so that the inner loop spends one compare and one address per load (SASS: the loop
  // went from 546 instructions, 53% FMAs, to 399, 72%, when the offsets left it).
  const float* plane0[kPx];
  Idx tap[kPx][9];
#pragma unroll
  for (int i = 0; i < kPx; ++i) {
    const int64_t q = (static_cast<int64_t>(blockIdx.x) * kPx + i) * kConvThreads + tid;
    const int64_t n = q < total ? q / HW : 0;
    const Idx p = q < total ? static_cast<Idx>(q - n * HW) : 0;
    const Idx h = p / static_cast<Idx>(W), x = p - h * static_cast<Idx>(W);
    plane0[i] = in + n * Cr * HW;
#pragma unroll
    for (int t = 0; t < 9; ++t) {
      const int64_t hh = h + (t / 3 - 1) * dil, xx = x + (t % 3 - 1) * dil;
      const bool ok = q < total && hh >= 0 && hh < H && xx >= 0 && xx < W;
      tap[i][t] = ok ? static_cast<Idx>(hh * W + xx) : Idx(-1);
    }
  }

  float acc[kPx][kOut];
#pragma unroll
  for (int i = 0; i < kPx; ++i)
#pragma unroll
    for (int k = 0; k < kOut; ++k) acc[i][k] = 0.f;

  const bool ci_fast = w_ci == 1;
  for (int64_t ci0 = 0; ci0 < Cr; ci0 += kIn) {
    __syncthreads();  // the previous slice is consumed
    for (int e = tid; e < kIn * 9 * kOut; e += kConvThreads) {
      // Consecutive e walk the weights' densest axis: taps (NCHW) or input channels
      // (channels_last, w_ci == 1), so that a warp's loads are contiguous. Constant divisors.
      const int co = e / (9 * kIn), ci = ci_fast ? e % kIn : e / 9 % kIn, t = ci_fast ? e / kIn % 9 : e % 9;
      const bool ok = co0 + co < Cr && ci0 + ci < Cr;
      ws[ci][t][co] = ok ? w[(co0 + co) * w_co + (ci0 + ci) * w_ci + (t / 3) * w_kh + (t % 3) * w_kw] : 0.f;
    }
    __syncthreads();
    const int n_in = Cr - ci0 < kIn ? static_cast<int>(Cr - ci0) : kIn;
    const float* plane[kPx];
#pragma unroll
    for (int i = 0; i < kPx; ++i) plane[i] = plane0[i] + ci0 * HW;
#pragma unroll 1
    for (int ci = 0; ci < n_in; ++ci) {
#pragma unroll
      for (int t = 0; t < 9; ++t) {
        float v[kPx];
#pragma unroll
        for (int i = 0; i < kPx; ++i) v[i] = tap[i][t] >= 0 ? plane[i][tap[i][t]] : 0.f;
#pragma unroll
        for (int k = 0; k < kOut; k += 4) {
          const float4 wv = *reinterpret_cast<const float4*>(&ws[ci][t][k]);
#pragma unroll
          for (int i = 0; i < kPx; ++i) {
            acc[i][k] = fmaf(wv.x, v[i], acc[i][k]);
            acc[i][k + 1] = fmaf(wv.y, v[i], acc[i][k + 1]);
            acc[i][k + 2] = fmaf(wv.z, v[i], acc[i][k + 2]);
            acc[i][k + 3] = fmaf(wv.w, v[i], acc[i][k + 3]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kPx; ++i) plane[i] += HW;
    }
  }

#pragma unroll
  for (int i = 0; i < kPx; ++i) {
    const int64_t q = (static_cast<int64_t>(blockIdx.x) * kPx + i) * kConvThreads + tid;
    if (q >= total) continue;
    if (kFinal) {
      float s = blockIdx.y == 0 ? b_fin[0] : 0.f;
#pragma unroll
      for (int k = 0; k < kOut; ++k)
        if (co0 + k < Cr) s = fmaf(w_fin[co0 + k], relu(acc[i][k] + b[co0 + k]), s);
      out[blockIdx.y * total + q] = s;
    } else {
      // The pixel's offset in the input, n * Cr * HW + p, is the same in out; tap 4 is the
      // pixel itself (always inside).
      float* o = out + (plane0[i] - in) + tap[i][4] + co0 * HW;
#pragma unroll
      for (int k = 0; k < kOut; ++k)
        if (co0 + k < Cr) o[k * HW] = relu(acc[i][k] + b[co0 + k]);
    }
  }
}

// out[e] = sum over g of part[g][e], groups in order, for e over numel.
__global__ void __launch_bounds__(kConvThreads) sum_groups_kernel(const float* __restrict__ part,
                                                                  float* __restrict__ out, int64_t numel,
                                                                  int64_t groups) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kConvThreads + threadIdx.x;
  if (e >= numel) return;
  float s = 0.f;
  for (int64_t g = 0; g < groups; ++g) s += part[g * numel + e];
  out[e] = s;
}

}  // namespace cuda
}  // namespace bam_fused
