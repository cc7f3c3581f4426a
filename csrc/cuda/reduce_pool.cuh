// CUDA kernels of the branch op's pass over x, free of torch headers.
//
// y = relu(W x + b) (the 1x1 reduce conv, W is (Cr, C)) and the channel sums of x, reading x
// once. A block of 256 threads owns kPixels pixels of one sample and kRows output channels;
// it walks its channels in chunks of 32, staging the (32 x kPixels) slice of x in shared memory
// (coalesced for either layout), sums it into per-block channel partials (the pooling) and
// multiplies it by the matching slice of W. Each thread keeps a (kRows/kRowGroups x 4) tile of
// y in registers, so every pair of 16-byte shared-memory loads feeds 16 or 32 FMAs. The
// global loads of the next chunk are issued into registers before the FMAs on the current
// one (a software pipeline), so that the block's loads and arithmetic overlap.
//
// When the grid would not fill the GPU (few pixels, e.g. 14x14 maps), the channels are split
// over blockIdx.z and each split writes raw partial sums; reduce_finish_kernel adds them in a
// fixed order and applies bias and ReLU. No atomics: results are bitwise repeatable.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace bam_fused {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kChunk = 32;  // channels per shared-memory slice

template <int kRows>
struct Tile {
  static_assert(kRows == 16 || kRows == 32 || kRows == 64, "kRows is 16, 32 or 64");
  static constexpr int kRowGroups = kRows == 16 ? 4 : 8;      // threads along the rows
  static constexpr int kRowsPerThread = kRows / kRowGroups;   // 4, 4 or 8
  static constexpr int kPixelGroups = kThreads / kRowGroups;  // threads along the pixels
  static constexpr int kPixels = 4 * kPixelGroups;            // 256, 128 or 128 pixels per block
};

// How a launch is laid out; computed on the host (the launcher and the emulator tests).
struct ReducePoolPlan {
  int rows;                  // kRows of the instantiation to launch
  int64_t pixel_blocks;      // per sample
  int64_t row_groups;        // grid.y
  int64_t splits;            // grid.z: channel splits (1: the kernel writes y itself)
  int64_t chunks_per_split;  // channel chunks of kChunk per split
};

// min_blocks: how many blocks fill the GPU (a couple per multiprocessor).
inline ReducePoolPlan plan_reduce_pool(int64_t N, int64_t C, int64_t HW, int64_t Cr, int64_t min_blocks) {
  ReducePoolPlan p{};
  p.rows = Cr <= 16 ? 16 : (Cr <= 32 ? 32 : 64);
  const int64_t pixels = p.rows == 16 ? Tile<16>::kPixels : Tile<32>::kPixels;
  p.pixel_blocks = ceil_div(HW, pixels);
  p.row_groups = ceil_div(Cr, p.rows);
  const int64_t chunks = ceil_div(C, kChunk);
  const int64_t blocks = N * p.pixel_blocks * p.row_groups;
  // Split only as far as needed, and keep at least two chunks per split.
  int64_t splits = blocks > 0 ? ceil_div(min_blocks, blocks) : 1;
  splits = splits < 1 ? 1 : splits;
  const int64_t most = chunks / 2 > 1 ? chunks / 2 : 1;
  splits = splits > most ? most : splits;
  p.chunks_per_split = ceil_div(chunks, splits);
  p.splits = ceil_div(chunks, p.chunks_per_split);
  return p;
}

// Four consecutive elements, loaded as one vector where the caller knows they are aligned.
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

// grid: (N * pixel_blocks, row_groups, splits). y: (N, Cr, HW) fp32 when splits == 1, or
// (N, HW, Cr) with y_channels_last (the layout the library's convs run in without transposes);
// y_part: splits x y's layout, raw sums otherwise (then y is unused). pooled_part:
// (N, pixel_blocks, C) channel sums over each block's pixels times inv_hw (so that summing
// over the pixel blocks gives the means), written by row group 0.
template <typename scalar_t, bool kChannelsLast, int kRows>
__global__ void __launch_bounds__(kThreads, 2) reduce_pool_kernel(
    const scalar_t* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, float* __restrict__ y_part, float* __restrict__ pooled_part, int64_t N, int64_t C,
    int64_t HW, int64_t Cr, int64_t pixel_blocks, int64_t chunks_per_split, bool vec_loads, float inv_hw,
    bool y_channels_last) {
  using T = Tile<kRows>;
  constexpr int kTR = T::kRowsPerThread, kPG = T::kPixelGroups, kPixels = T::kPixels;
  // +4 floats per row keeps rows 16-byte aligned for the vector reads below. (The
  // channels_last staging stores of a warp, 32 channels at one pixel, then meet 4-way bank
  // conflicts; +1 would avoid them but break the alignment. Not measured either way.)
  __shared__ __align__(16) float xs[kChunk][kPixels + 4];
  __shared__ __align__(16) float ws[kChunk][kRows + 4];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t n = blockIdx.x / pixel_blocks, pb = blockIdx.x % pixel_blocks;
  const int64_t p0 = pb * kPixels;
  const int64_t r_base = static_cast<int64_t>(blockIdx.y) * kRows;
  const int64_t split = blockIdx.z;
  const int64_t c_begin = split * chunks_per_split * kChunk;
  const int64_t c_stop = c_begin + chunks_per_split * kChunk;
  const int64_t c_end = c_stop < C ? c_stop : C;
  const bool writes_pool = blockIdx.y == 0;
  const scalar_t* xn = x + n * C * HW;
  // Compute mapping: a warp shares its rows (ws reads broadcast), its lanes take
  // consecutive groups of 4 pixels (conflict-free 16-byte xs reads).
  const int rg = tid / kPG, pg = tid % kPG;

  float acc[kTR][4];
#pragma unroll
  for (int k = 0; k < kTR; ++k)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[k][j] = 0.f;

  // Software pipeline: the loads of the next chunk (x and W) are issued into registers
  // before the FMAs on this one, so they are in flight while the block computes; each
  // iteration stores them to shared memory at its start. Raw storage values are kept (half
  // the registers for 16-bit x) and converted to fp32 on the store.
  // Item k of a thread is one channel and 4 pixels; consecutive threads read consecutive
  // addresses in either layout. NCHW: channel c_t + k * kCStep, pixels 4 * q_t .. + 3.
  // channels_last: channel `lane`, pixels 4 * warp + 32 * k .. + 3.
  constexpr int kItems = kChunk * kPG / kThreads;     // 8 or 4
  constexpr int kWItems = kRows * kChunk / kThreads;  // 2, 4 or 8
  constexpr int kCStep = kThreads / kPG;              // NCHW: channels between items
  const int c_t = kChannelsLast ? lane : tid / kPG;
  const int q_t = kChannelsLast ? warp : tid % kPG;
  const int64_t p_t = p0 + 4 * q_t;
  // W's slice (L2-resident) is prefetched too where registers allow (no spills).
  constexpr bool kPrefetchW = kWItems <= 4;
  Vec4<scalar_t> xr[kItems];
  float wr[kWItems];
  auto load_w = [&](int64_t c0) {
#pragma unroll
    for (int k = 0; k < kWItems; ++k) {
      const int i = tid + k * kThreads, r = i / kChunk, c = i % kChunk;
      wr[k] = (r_base + r < Cr && c0 + c < c_end) ? w[(r_base + r) * C + c0 + c] : 0.f;
    }
  };
  auto load_chunk = [&](int64_t c0) {
    if (kChannelsLast) {
      // Pixels p_t + 32 * k + j exist for 32 * k + j < rem (none when the channel does not).
      const int64_t left = c0 + c_t < c_end ? HW - p_t : 0;
      const int rem = static_cast<int>(left < kPixels ? left : kPixels);
      const scalar_t* src = xn + p_t * C + c0 + c_t;
#pragma unroll
      for (int k = 0; k < kItems; ++k, src += 32 * C)  // one running pointer: fewer registers
#pragma unroll
        for (int j = 0; j < 4; ++j) xr[k].v[j] = 32 * k + j < rem ? src[j * C] : static_cast<scalar_t>(0.f);
    } else {
      const scalar_t* base = xn + (c0 + c_t) * HW + p_t;
      const bool vec = vec_loads && p_t + 3 < HW;
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const scalar_t* src = base + k * kCStep * HW;
        const bool c_ok = c0 + c_t + k * kCStep < c_end;
        if (c_ok && vec) {
          xr[k] = *reinterpret_cast<const Vec4<scalar_t>*>(src);
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j) xr[k].v[j] = c_ok && p_t + j < HW ? src[j] : static_cast<scalar_t>(0.f);
        }
      }
    }
    if (kPrefetchW) load_w(c0);
  };

  if (c_begin < c_end) load_chunk(c_begin);
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kChunk) {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int c = kChannelsLast ? c_t : c_t + k * kCStep;
      const int px = kChannelsLast ? 4 * q_t + 32 * k : 4 * q_t;
#pragma unroll
      for (int j = 0; j < 4; ++j) xs[c][px + j] = static_cast<float>(xr[k].v[j]);
    }
    if (!kPrefetchW) load_w(c0);
#pragma unroll
    for (int k = 0; k < kWItems; ++k) {
      const int i = tid + k * kThreads;
      ws[i % kChunk][i / kChunk] = wr[k];
    }
    __syncthreads();
    if (c0 + kChunk < c_end) load_chunk(c0 + kChunk);
    if (writes_pool) {
      // Warp w sums channels 4w .. 4w+3 of the slice over the block's pixels.
#pragma unroll
      for (int cc = 0; cc < kChunk / 8; ++cc) {
        const int c = warp * (kChunk / 8) + cc;
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < kPixels / 32; ++k) s += xs[c][lane + 32 * k];
#pragma unroll
        for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (lane == 0 && c0 + c < c_end) pooled_part[(n * pixel_blocks + pb) * C + c0 + c] = s * inv_hw;
      }
    }
#pragma unroll 8
    for (int c = 0; c < kChunk; ++c) {
      float xv[4], wv[kTR];
#pragma unroll
      for (int j = 0; j < 4; ++j) xv[j] = xs[c][4 * pg + j];
#pragma unroll
      for (int k = 0; k < kTR; ++k) wv[k] = ws[c][rg * kTR + k];
#pragma unroll
      for (int k = 0; k < kTR; ++k)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[k][j] = fmaf(wv[k], xv[j], acc[k][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int k = 0; k < kTR; ++k) {
    const int64_t r = r_base + rg * kTR + k;
    if (r >= Cr) continue;
    const float bias = y_part == nullptr ? b[r] : 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t p = p0 + 4 * pg + j;
      if (p >= HW) continue;
      if (y_part == nullptr)
        y[y_channels_last ? (n * HW + p) * Cr + r : (n * Cr + r) * HW + p] = relu(acc[k][j] + bias);
      else
        y_part[split * N * Cr * HW + (y_channels_last ? (n * HW + p) * Cr + r : (n * Cr + r) * HW + p)] = acc[k][j];
    }
  }
}

// y[e] = relu(sum over splits of y_part[s][e] + b[r]), splits in order; y and each split of
// y_part are (N, Cr, HW) or, with y_channels_last, (N, HW, Cr) (same layout: coalesced).
__global__ void __launch_bounds__(kThreads) reduce_finish_kernel(const float* __restrict__ y_part,
                                                                 const float* __restrict__ b, float* __restrict__ y,
                                                                 int64_t numel, int64_t Cr, int64_t HW,
                                                                 int64_t splits, bool y_channels_last) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= numel) return;
  float s = 0.f;
  for (int64_t k = 0; k < splits; ++k) s += y_part[k * numel + e];
  y[e] = relu(s + b[y_channels_last ? e % Cr : (e / HW) % Cr]);
}

}  // namespace cuda
}  // namespace bam_fused
