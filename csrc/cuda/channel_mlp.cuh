// CUDA kernel of BAM's channel branch after the pooling, free of torch headers.
//
// From the pooled partial means (N, P, C) that the pass over x leaves (reduce_pool.cuh): the
// means themselves, then relu(W0 @ mean + b0) (Cr values), then W1 @ that + b1 (C values), one
// block per sample. The library runs this tiny MLP as several launches, each with little to
// do (N rows); here it is one. Fixed summation orders: results are bitwise repeatable.
// Each block walks the weights with few loads in flight, so it is only used where they are
// small (C x hidden <= 256 x 16; measurements beside the dispatch in bam_fused.cpp).
#pragma once

#include <cstdint>

#include "common.cuh"

namespace bam_fused {
namespace cuda {

constexpr int kMlpThreads = 256;

// grid: N blocks. part: (N, P, C); w0: (Cr, C); b0: (Cr,); w1: (C, Cr); b1: (C,).
// Writes pooled (N, C), the hidden activations h (N, Cr, scratch) and out (N, C). pooled and
// h are read back by the block after a barrier, so they are plain (coherent) pointers.
__global__ void __launch_bounds__(kMlpThreads) channel_mlp_kernel(
    const float* __restrict__ part, const float* __restrict__ w0, const float* __restrict__ b0,
    const float* __restrict__ w1, const float* __restrict__ b1, float* pooled, float* h, float* __restrict__ out,
    int64_t P, int64_t C, int64_t Cr) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  constexpr int kWarps = kMlpThreads / 32;
  const int64_t n = blockIdx.x;
  float* pn = pooled + n * C;
  float* hn = h + n * Cr;
  for (int64_t c = tid; c < C; c += kMlpThreads) {
    float s = 0.f;
    for (int64_t p = 0; p < P; ++p) s += part[(n * P + p) * C + c];
    pn[c] = s;
  }
  __syncthreads();
  // Warp w takes rows j0 + w; every warp runs the same trip count (whole-warp shuffles).
  for (int64_t j0 = 0; j0 < Cr; j0 += kWarps) {
    const int64_t j = j0 + warp;
    float s = 0.f;
    if (j < Cr)
      for (int64_t c = lane; c < C; c += 32) s = fmaf(w0[j * C + c], pn[c], s);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0 && j < Cr) hn[j] = relu(s + b0[j]);
  }
  __syncthreads();
  for (int64_t c = tid; c < C; c += kMlpThreads) {
    float s = b1[c];
    for (int64_t j = 0; j < Cr; ++j) s = fmaf(w1[c * Cr + j], hn[j], s);
    out[n * C + c] = s;
  }
}

}  // namespace cuda
}  // namespace bam_fused
