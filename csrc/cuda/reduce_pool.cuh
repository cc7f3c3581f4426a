// CUDA kernel of the branch op's pass over x, free of torch headers.
//
// One block of 256 threads takes 128 pixels of one sample and walks the channels in chunks of
// 32: it stages the (32 x 128) slice of x in shared memory (coalesced for either layout), sums
// it into per-block channel partials (the pooling), and multiplies it by the matching slice of
// W. Each warp owns the output channels r = warp + 8k of its group; each lane four pixels.
// No atomics: the pooling partials are summed afterwards in a fixed order.
#pragma once

#include <cstdint>

namespace bam_fused {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPixels = 128;                   // pixels per block
constexpr int kChunk = 32;                     // channels per shared-memory slice
constexpr int kRowsPerWarp = 8;                // output channels per warp and group
constexpr int kGroup = kWarps * kRowsPerWarp;  // output channels per block (grid.y splits more)

template <typename scalar_t, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads) reduce_pool_kernel(
    const scalar_t* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, float* __restrict__ pooled_part, int64_t C, int64_t HW, int64_t Cr, int64_t n_pb) {
  __shared__ float xs[kChunk][kPixels + 1];
  __shared__ float ws[kGroup][kChunk + 1];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t n = blockIdx.x / n_pb, pb = blockIdx.x % n_pb;
  const int64_t p0 = pb * kPixels;
  const int64_t r_base = static_cast<int64_t>(blockIdx.y) * kGroup;
  const bool writes_pool = blockIdx.y == 0;
  const scalar_t* xn = x + n * C * HW;

  float acc[kRowsPerWarp][4];
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[k][j] = 0.f;

  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
#pragma unroll 4
    for (int i = tid; i < kChunk * kPixels; i += kThreads) {
      // Consecutive threads read consecutive addresses in either layout.
      const int c = kChannelsLast ? i % kChunk : i / kPixels;
      const int p = kChannelsLast ? i / kChunk : i % kPixels;
      float v = 0.f;
      if (c0 + c < C && p0 + p < HW)
        v = static_cast<float>(kChannelsLast ? xn[(p0 + p) * C + c0 + c] : xn[(c0 + c) * HW + p0 + p]);
      xs[c][p] = v;
    }
    for (int i = tid; i < kGroup * kChunk; i += kThreads) {
      const int r = i / kChunk, c = i % kChunk;
      ws[r][c] = (r_base + r < Cr && c0 + c < C) ? w[(r_base + r) * C + c0 + c] : 0.f;
    }
    __syncthreads();
    if (writes_pool) {
      // Warp w sums channels 4w .. 4w+3 of the slice over the block's pixels.
#pragma unroll
      for (int cc = 0; cc < kChunk / kWarps; ++cc) {
        const int c = warp * (kChunk / kWarps) + cc;
        float s = xs[c][lane] + xs[c][lane + 32] + xs[c][lane + 64] + xs[c][lane + 96];
#pragma unroll
        for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (lane == 0 && c0 + c < C) pooled_part[(n * n_pb + pb) * C + c0 + c] = s;
      }
    }
#pragma unroll 4
    for (int c = 0; c < kChunk; ++c) {
      float xv[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) xv[j] = xs[c][lane + 32 * j];
#pragma unroll
      for (int k = 0; k < kRowsPerWarp; ++k) {
        const float wv = ws[warp + kWarps * k][c];
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[k][j] = fmaf(wv, xv[j], acc[k][j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const int64_t r = r_base + warp + kWarps * k;
    if (r >= Cr) continue;
    const float bias = b[r];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t p = p0 + lane + 32 * j;
      if (p < HW) y[(n * Cr + r) * HW + p] = fmaxf(acc[k][j] + bias, 0.f);
    }
  }
}

}  // namespace cuda
}  // namespace bam_fused
