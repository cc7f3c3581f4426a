// The CPU pass over x, torch-free: per pixel relu(W x + b) (the branch op's 1x1 reduce conv)
// and the pooled channel sums, reading x once. NCHW x below; channels_last x further down.
//
// Each tile of kP pixels meets every channel once: its pixels sum into lane-wise pooled sums
// while the conv accumulates kCo output channels x kP pixels in registers, one broadcast
// weight times kP pixels per FMA. Further blocks of kCo output channels read the tile again
// from L1/L2. Results do not depend on the thread count: each pooled partial covers a chunk
// of chunk_px pixels (set by the shape alone) and is summed in a fixed order, and every y
// element is one fixed-order dot product.
//
// The per-instruction-set files (conv1x1_pool_*.cpp) include this header after their target
// options and give the register blocking (traits K: vector type V, kPV pixel vectors, kCo
// output channels, kAcc accumulators for channels_last x, splat). Everything here has
// internal linkage: each file gets its own copy.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace bam_fused {

// Pixels per pooled partial (a task): a multiple of kChunkQuantum (every tile size divides it),
// at most kChunkPx.
constexpr int64_t kChunkQuantum = 48, kChunkPx = 192;

struct Conv1x1PoolJob {
  int64_t C, HW, Cr, chunk_px, chunks;  // chunks = max(1, ceil(HW / chunk_px)) per sample
  const float* w;             // packed (ceil(Cr / kCo), C, kCo), zero rows past Cr (channels_last x:
                              // kCo = cl_vectors * lanes)
  const float* bias;          // (Cr,)
  float* y;                   // (N, HW, Cr): channels_last, for oneDNN's NHWC dilated convs
  float* part;                // (N, chunks, C): pooled sums times inv_hw
  float inv_hw;
  int cl_vectors;  // channels_last x: output vectors per register block (1, 2 or 4)
  bool relu;       // relu(W x + b) (the folded eval branch) or W x + b (training: BatchNorm follows)
  // The bf16 dot-product pass (conv1x1_pool_avx512bf16.cpp) only: w rounded to bf16, channels
  // in pairs (c even in the low half), packed (blocks, ceil(C / 2), kCo) like w.
  const uint32_t* w_pairs = nullptr;
};

// Tasks [begin, end) of N * chunks, each one chunk of one sample; x is (N, C, HW), or
// (N, HW, C) for the _cl entry points; _kco and _lanes give the register blocking.
#define BAM_DECLARE_CONV1X1_POOL(ISA)                                                                    \
  void conv1x1_pool_##ISA(const Conv1x1PoolJob& j, const float* x, int64_t begin, int64_t end);      \
  void conv1x1_pool_##ISA(const Conv1x1PoolJob& j, const Bf16* x, int64_t begin, int64_t end);       \
  void conv1x1_pool_##ISA(const Conv1x1PoolJob& j, const Fp16* x, int64_t begin, int64_t end);       \
  void conv1x1_pool_cl_##ISA(const Conv1x1PoolJob& j, const float* x, int64_t begin, int64_t end);   \
  void conv1x1_pool_cl_##ISA(const Conv1x1PoolJob& j, const Bf16* x, int64_t begin, int64_t end);    \
  void conv1x1_pool_cl_##ISA(const Conv1x1PoolJob& j, const Fp16* x, int64_t begin, int64_t end);    \
  int64_t conv1x1_pool_##ISA##_kco();                                                                \
  int64_t conv1x1_pool_##ISA##_lanes();
BAM_DECLARE_CONV1X1_POOL(avx512)
BAM_DECLARE_CONV1X1_POOL(avx2)
BAM_DECLARE_CONV1X1_POOL(generic)
// bf16 x on CPUs with AVX512-BF16 (conv1x1_pool_avx512bf16.cpp): the products in bf16 with
// fp32 sums (vdpbf16ps), j.w_pairs for weights; the blocking of avx512.
void conv1x1_pool_avx512bf16(const Conv1x1PoolJob& j, const Bf16* x, int64_t begin, int64_t end);
void conv1x1_pool_cl_avx512bf16(const Conv1x1PoolJob& j, const Bf16* x, int64_t begin, int64_t end);

namespace {  // NOLINT: internal linkage on purpose (see the top of this file)

template <typename K>
constexpr int kLanes = sizeof(typename K::V) / sizeof(float);
template <typename K>
constexpr int kTilePx = K::kPV * kLanes<K>;

// Task `task` of either layout's pass (and of its backward's dx): sample n, pixels [p0, p1).
struct ChunkRange {
  int64_t n, p0, p1;
};
template <typename Job>
BAM_INLINE ChunkRange chunk_range(const Job& j, int64_t task) {
  const int64_t n = task / j.chunks, p0 = task % j.chunks * j.chunk_px;
  return {n, p0, std::min(j.HW, p0 + j.chunk_px)};
}

// Calls f.template operator()<kPV>() with kPV = the pixel vectors a tile of nv vectors needs
// (K::kPV, 2 or 1): a last, partial tile computes only the vectors it has.
template <typename K, typename F>
BAM_INLINE void with_tile_vectors(int64_t nv, F&& f) {
  if (nv == K::kPV) {
    f.template operator()<K::kPV>();
  } else if (nv == 2) {
    f.template operator()<(K::kPV > 2 ? 2 : K::kPV)>();
  } else {
    f.template operator()<1>();
  }
}

template <typename V>
BAM_INLINE V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
BAM_INLINE void vstore(float* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// acc[o][v] += w[c][o] * (pixel vector v of channel c) over all channels, for kPV pixel
// vectors (K::kPV, or fewer in a last, partial tile); with kPool also pool[c] += the tile's
// pixels of channel c, lane-wise.
//
// x rows are HW apart: too many streams for the hardware prefetcher at 56x56, so with prefetch
// (a tile read straight from x) the next tile's rows are prefetched, the channels c with
// c % blocks == block in block `block` of the tile's `blocks` output-channel blocks: spread
// over the whole tile, DRAM keeps streaming while the later blocks compute from cache. All of
// them in the first block, two tiles ahead (as before), stalled that block on full miss queues
// and left the memory idle after it: AVX2, N = 8, C = 256, 56x56, Cr = 16, paired in one
// process, the pass took 1.12-1.18x less time spread (1.06x at C = 512, 28x28; 1.00-1.02x at
// C = 1024, 14x14). prefetcht1 (locality 2) measured a little better than prefetcht0.
template <typename K, int kPV, bool kPool>
BAM_INLINE void conv_tile(const float* xt, int64_t xs, int64_t C, const float* w, float* pool,
                          typename K::V (&acc)[K::kCo][kPV], bool prefetch = false, int block = 0, int blocks = 1) {
  using V = typename K::V;
  constexpr int kL = kLanes<K>, kP = kTilePx<K>;
  int phase = block == 0 ? 0 : blocks - block;  // channel c is prefetched when phase == 0
  for (int64_t c = 0; c < C; ++c) {
    const float* xc = xt + c * xs;
    V xv[kPV];
#pragma GCC unroll 8
    for (int v = 0; v < kPV; ++v) xv[v] = vload<V>(xc + v * kL);
    if (prefetch) {
      if (phase == 0) {
#pragma GCC unroll 8
        for (int l = 0; l < kP; l += 16) __builtin_prefetch(xc + kP + l, 0, 2);
      }
      if (++phase == blocks) phase = 0;
    }
    if (kPool) {
      V s = xv[0];
#pragma GCC unroll 8
      for (int v = 1; v < kPV; ++v) s += xv[v];
      vstore<V>(pool + c * kL, vload<V>(pool + c * kL) + s);
    }
    const float* wc = w + c * K::kCo;
#pragma GCC unroll 16
    for (int o = 0; o < K::kCo; ++o) {
      const V wv = K::splat(wc[o]);
#pragma GCC unroll 8
      for (int v = 0; v < kPV; ++v) acc[o][v] += wv * xv[v];
    }
  }
}

// conv_tile from zero accumulators, out of line: a pass tile's block over all its channels.
// Inlined into conv1x1_tile, GCC 12 kept the ReLU's zero vector (store_tile_block) live across
// the loop and spilled one of AVX2's 12 accumulators to the stack, a store and a reload every
// channel: 1 x 256 x 56x56, x in cache, 1 thread, the pass 0.72 -> 0.42 ms. Here nothing
// follows the loop but the copy out. tests/test_cpu_codegen.py checks the compiled loop for FMAs
// on the stack. The channel groups below stay inline: out of line they took 1.08x longer (1 x
// 512 x 28x28, 1 x 1024 x 14x14), the call's fixed cost; so do dx's loops over only Cr channels
// (not measured out of line).
template <typename K, int kPV, bool kPool, bool kPrefetch>
__attribute__((noinline)) void conv_tile_loop(const float* xt, int64_t xs, int64_t C, const float* w, float* pool,
                                              typename K::V (&acc)[K::kCo][kPV], int block, int blocks) {
  typename K::V a[K::kCo][kPV] = {};
  conv_tile<K, kPV, kPool>(xt, xs, C, w, pool, a, kPrefetch, block, blocks);
  std::memcpy(acc, a, sizeof(a));
}

// Bias, ReLU and the store into channels_last y of one block of accumulators: output channels
// [cob * kCo, +kCo) of the tile's np pixels from p. A transposing copy, small next to the FMAs.
template <typename K, int kPV>
BAM_INLINE void store_tile_block(const Conv1x1PoolJob& j, const typename K::V (&acc)[K::kCo][kPV], int64_t cob,
                                 int64_t p, int64_t np, float* y) {
  using V = typename K::V;
  constexpr int kL = kLanes<K>;
  float out[K::kCo][kPV * kL];
  for (int o = 0; o < K::kCo; ++o) {
    const V b = K::splat(j.bias[std::min(cob * K::kCo + o, j.Cr - 1)]);  // rows past Cr: discarded
    for (int v = 0; v < kPV; ++v) {
      const V r = acc[o][v] + b;
      vstore<V>(out[o] + v * kL, j.relu ? (r < 0 ? V{} : r) : r);  // relu: NaN stays NaN, as in torch
    }
  }
  const int64_t co0 = cob * K::kCo, nco = std::min<int64_t>(K::kCo, j.Cr - co0);
  for (int64_t i = 0; i < np; ++i)
    for (int64_t o = 0; o < nco; ++o) y[(p + i) * j.Cr + co0 + o] = out[o][i];
}

// Channels a tile takes at a time where all of C would not fit L1: about 16 KB of it, so that
// every block of output channels reads its rows from L1. With all of C at once, a tile of
// C = 1024 (96 KB under AVX2) was read from L2 by each of its 16 blocks (Cr = 64). Paired,
// 2-core AVX2 CPU, 2026-11-27: the pass 1.26x at 8x1024x14x14, 1.33x at 8x512x28x28, 1.09x at
// 1x1024x14x14, 1.19x at 1x2048x7x7; the whole BAM eval 1.14x / 1.18x at the first two.
// Unmeasured under AVX-512 (grouped there from C = 257 up, as under AVX2 from C = 342 up).
// Tiles up to kTileL1Bytes, or of up to kTileAllChannels channels, take all channels at once:
// C = 256 keeps the path measured at the shape under AVX-512 too (48-pixel tiles, 48 KB).
constexpr int64_t kTileL1Bytes = 32 << 10, kTileAllChannels = 256;
template <typename K>
constexpr int64_t kTileGroupChannels = std::max<int64_t>(16, (16 << 10) / (kTilePx<K> * 4) / 16 * 16);

// One tile of np pixels from p (kPV vectors cover them): every block of kCo output channels,
// y (channels_last) and, with the first block, the pooled sums. Channels in groups of
// kTileGroupChannels, each block's accumulators held between groups in registers' worth of
// memory: every accumulator still sums its channels in order, so the bits do not change.
template <typename K, int kPV>
BAM_INLINE void conv1x1_tile(const Conv1x1PoolJob& j, const float* xt, int64_t xs, int64_t p, int64_t np, float* y,
                             float* pool) {
  using V = typename K::V;
  constexpr int64_t kG = kTileGroupChannels<K>;
  const int64_t C = j.C, cob_n = (j.Cr + K::kCo - 1) / K::kCo;
  const bool from_x = xs != kTilePx<K>;  // else buf: nothing to prefetch
  if (C <= kTileAllChannels || C * kTilePx<K> * 4 <= kTileL1Bytes) {
    for (int64_t cob = 0; cob < cob_n; ++cob) {
      V acc[K::kCo][kPV];
      const float* w = j.w + cob * C * K::kCo;
      if (cob == 0) {
        from_x ? conv_tile_loop<K, kPV, true, true>(xt, xs, C, w, pool, acc, 0, cob_n)
               : conv_tile_loop<K, kPV, true, false>(xt, xs, C, w, pool, acc, 0, cob_n);
      } else {
        from_x ? conv_tile_loop<K, kPV, false, true>(xt, xs, C, w, pool, acc, cob, cob_n)
               : conv_tile_loop<K, kPV, false, false>(xt, xs, C, w, pool, acc, cob, cob_n);
      }
      store_tile_block<K, kPV>(j, acc, cob, p, np, y);
    }
    return;
  }
  constexpr int64_t kHeldBlocks = 16;  // blocks held at once (6 KB under AVX2); more go in batches
  V held[kHeldBlocks][K::kCo][kPV];
  for (int64_t cb0 = 0; cb0 < cob_n; cb0 += kHeldBlocks) {
    const int64_t cb1 = std::min(cob_n, cb0 + kHeldBlocks);
    for (int64_t c0 = 0; c0 < C; c0 += kG) {
      const int64_t nc = std::min(kG, C - c0);
      for (int64_t cob = cb0; cob < cb1; ++cob) {
        V acc[K::kCo][kPV] = {};
        if (c0 > 0) std::memcpy(acc, held[cob - cb0], sizeof(acc));
        const float* w = j.w + (cob * C + c0) * K::kCo;
        if (cob == 0) {
          conv_tile<K, kPV, true>(xt + c0 * xs, xs, nc, w, pool + c0 * kLanes<K>, acc, from_x, 0, cob_n);
        } else {
          conv_tile<K, kPV, false>(xt + c0 * xs, xs, nc, w, pool, acc, from_x, cob, cob_n);
        }
        if (c0 + nc == C) {
          store_tile_block<K, kPV>(j, acc, cob, p, np, y);
        } else {
          std::memcpy(held[cob - cb0], acc, sizeof(acc));
        }
      }
    }
  }
}

// The pooled partial of a chunk from its lane-wise sums: pool (C x kLanes) -> part (C,).
template <typename K>
BAM_INLINE void finish_pool(const Conv1x1PoolJob& j, const float* pool, float* part) {
  constexpr int kL = kLanes<K>;
  for (int64_t c = 0; c < j.C; ++c) {
    float s = 0.f;
    for (int i = 0; i < kL; ++i) s += pool[c * kL + i];
    part[c] = s * j.inv_hw;
  }
}

// Pixels [p0, p1) of one sample: its rows of y and its pooled partial. buf holds C x kP floats
// (a converted or zero-padded tile), pool C x kLanes (the lane-wise pooled sums).
template <typename K, typename T>
BAM_INLINE void conv1x1_pool_chunk(const Conv1x1PoolJob& j, const T* x, int64_t p0, int64_t p1, float* y,
                                   float* part, float* buf, float* pool) {
  constexpr int kP = kTilePx<K>, kL = kLanes<K>;
  const int64_t C = j.C, HW = j.HW;
  std::fill(pool, pool + C * kL, 0.f);
  for (int64_t p = p0; p < p1; p += kP) {
    const int64_t np = std::min<int64_t>(kP, p1 - p);
    const float* xt = nullptr;
    int64_t xs = kP;
    if constexpr (std::is_same_v<T, float>) {
      if (np == kP) xt = x + p, xs = HW;  // fp32 full tiles straight from x
    }
    if (xt == nullptr) {  // other dtypes and a last, partial tile: fp32 and zero-padded
      for (int64_t c = 0; c < C; ++c) {
        const T* src = x + c * HW + p;
        float* dst = buf + c * kP;
        for (int64_t i = 0; i < np; ++i) dst[i] = ld(src + i);
        for (int64_t i = np; i < kP; ++i) dst[i] = 0.f;
      }
      xt = buf;
    }
    // A last, partial tile computes only the pixel vectors it has (14x14: 4 pixels, not 48).
    with_tile_vectors<K>((np + kL - 1) / kL,
                         [&]<int kPV>() { conv1x1_tile<K, kPV>(j, xt, xs, p, np, y, pool); });
  }
  finish_pool<K>(j, pool, part);
}

template <typename K, typename T>
BAM_INLINE void conv1x1_pool_tasks(const Conv1x1PoolJob& j, const T* x, int64_t begin, int64_t end) {
  std::vector<float> buf(j.C * kTilePx<K>);
  std::vector<float> pool(j.C * kLanes<K>);  // plain floats: std::vector need not align vectors
  for (int64_t task = begin; task < end; ++task) {
    const ChunkRange r = chunk_range(j, task);
    conv1x1_pool_chunk<K, T>(j, x + r.n * j.C * j.HW, r.p0, r.p1, j.y + r.n * j.Cr * j.HW, j.part + task * j.C,
                             buf.data(), pool.data());
  }
}

// channels_last x: each pixel's channels are contiguous, so the conv vectorises over output
// channels: acc[i][v] += x[pixel i][c] (broadcast) * w[c][output vector v], kPx x kCv
// accumulators (K::kAcc in all). The pooled sums are lane-wise over channels directly.
// acc[i][v] += in(i, c) (broadcast) * w[c][output vector v] over the cin input channels, for
// kPx pixels; w holds kCv vectors per channel. in is inlined: one base and a stride for the pass
// (an array of row pointers there was about 6% slower), row pointers for dx.
// With kPf, also prefetches the kPx * cin floats from pf, a share every channel (the pass's tile
// kClAhead tiles on).
template <int kPx>
BAM_INLINE void prefetch_share(const char* pf, int64_t c) {  // channel (or pair) c's share of a tile's lines
  for (int64_t q = c * kPx / 16; q < (c + 1) * kPx / 16; ++q) __builtin_prefetch(pf + q * 64, 0, 2);
}
template <typename K, int kCv, int kPx, bool kPf = false, typename In>
BAM_INLINE void cl_block(In&& in, const float* w, int64_t cin, typename K::V (&acc)[kPx][kCv],
                         const char* pf = nullptr) {
  using V = typename K::V;
  constexpr int kL = kLanes<K>, kCo = kCv * kL;
  for (int64_t c = 0; c < cin; ++c) {
    if constexpr (kPf) prefetch_share<kPx>(pf, c);
    V wv[kCv];
#pragma GCC unroll 8
    for (int v = 0; v < kCv; ++v) wv[v] = vload<V>(w + c * kCo + v * kL);
#pragma GCC unroll 32
    for (int i = 0; i < kPx; ++i) {
      const V xb = K::splat(in(i, c));
#pragma GCC unroll 8
      for (int v = 0; v < kCv; ++v) acc[i][v] += xb * wv[v];
    }
  }
}

// Bias, ReLU and the store into y of one channels_last block: output channels [cob * kCo, +kCo)
// of the np pixels from p.
template <typename K, int kCv, int kPx>
BAM_INLINE void store_cl_block(const Conv1x1PoolJob& j, const typename K::V (&acc)[kPx][kCv], int64_t cob, int64_t p,
                               int64_t np, float* y) {
  using V = typename K::V;
  constexpr int kL = kLanes<K>, kCo = kCv * kL;
  const int64_t Cr = j.Cr, co0 = cob * kCo, nco = std::min<int64_t>(kCo, Cr - co0);
  V b[kCv];
  for (int v = 0; v < kCv; ++v) {
    float lanes[kL];
    for (int l = 0; l < kL; ++l) lanes[l] = j.bias[std::min<int64_t>(co0 + v * kL + l, Cr - 1)];
    b[v] = vload<V>(lanes);
  }
  for (int64_t i = 0; i < np; ++i) {
    float out[kCo];
    for (int v = 0; v < kCv; ++v) {
      const V r = acc[i][v] + b[v];
      vstore<V>(out + v * kL, j.relu ? (r < 0 ? V{} : r) : r);  // relu: NaN stays NaN, as in torch
    }
    std::memcpy(y + (p + i) * Cr + co0, out, nco * sizeof(float));
  }
}

// Tiles ahead that the channels_last pass prefetches, its lines spread over the channel loop of
// the tile's first block of outputs. The tile's first touch (the pooled sums) had about 40% of
// the pass's perf samples: channels_last x at 8 x 256 x 56x56, fp32, 2-core Zen 4, whole BAM
// eval paired 1.11x / 1.11x (1 to 8 tiles ahead: 1.10-1.11x), 1.03x at 8 x 1024 x 14x14, 1.00x
// at 8 x 512 x 28x28, 1.015x at 1 x 256 x 56x56; a training step 1.045x (2026-11-28). (Spread
// over the pooled sums instead, in groups of samples, an earlier try gave the BAM 1.01-1.02x.)
// Unmeasured under AVX2. Prefetches never fault, so tiles past the chunk's end are harmless.
constexpr int64_t kClAhead = 2;

// kC: C as a constant (0: j.C), so that the kPx pixels' inputs are constant offsets from one
// pointer (as in dilated_conv.h).
template <typename K, int kCv, typename T, int kC = 0>
BAM_INLINE void conv1x1_pool_cl_chunk(const Conv1x1PoolJob& j, const T* x, int64_t p0, int64_t p1, float* y,
                                      float* part, float* buf) {
  using V = typename K::V;
  constexpr int kL = kLanes<K>, kPx = K::kAcc / kCv, kCo = kCv * kL;
  static_assert(kChunkQuantum % kPx == 0, "a chunk must hold whole pixel tiles");
  const int64_t C = kC > 0 ? kC : j.C, Cr = j.Cr, cob_n = (Cr + kCo - 1) / kCo;
  std::fill(part, part + C, 0.f);
  for (int64_t p = p0; p < p1; p += kPx) {
    const int64_t np = std::min<int64_t>(kPx, p1 - p);
    const float* xt = nullptr;
    if constexpr (std::is_same_v<T, float>) {
      if (np == kPx) xt = x + p * C;  // fp32 full tiles straight from x
    }
    if (xt == nullptr) {  // other dtypes and a last, partial tile: fp32 and zero-padded
      for (int64_t i = 0; i < np * C; ++i) buf[i] = ld(x + p * C + i);
      std::fill(buf + np * C, buf + kPx * C, 0.f);
      xt = buf;
    }
    // Pooled sums: the tile's pixels in registers first, then one update of part per channel
    // vector (per pixel it cost two loads and a store per vector: about 20% of the pass at
    // Cr = 16). Padded pixels of a last tile are zeros.
    int64_t c = 0;
    for (; c + kL <= C; c += kL) {
      V s = vload<V>(xt + c);
#pragma GCC unroll 8
      for (int i = 1; i < kPx; ++i) s += vload<V>(xt + i * C + c);
      vstore<V>(part + c, vload<V>(part + c) + s);
    }
    for (; c < C; ++c)
      for (int64_t i = 0; i < np; ++i) part[c] += xt[i * C + c];
    for (int64_t cob = 0; cob < cob_n; ++cob) {
      V acc[kPx][kCv] = {};
      if (std::is_same_v<T, float> && cob == 0) {  // and the tile kClAhead tiles on, into L2
        cl_block<K, kCv, kPx, true>([&](int i, int64_t c) { return xt[i * C + c]; }, j.w + cob * C * kCo, C, acc,
                                    reinterpret_cast<const char*>(x + (p + kClAhead * kPx) * C));
      } else {
        cl_block<K, kCv, kPx>([&](int i, int64_t c) { return xt[i * C + c]; }, j.w + cob * C * kCo, C, acc);
      }
      store_cl_block<K, kCv, kPx>(j, acc, cob, p, np, y);
    }
  }
  for (int64_t c = 0; c < C; ++c) part[c] *= j.inv_hw;
}

template <typename K, int kCv, typename T, int kC = 0>
BAM_INLINE void conv1x1_pool_cl_tasks(const Conv1x1PoolJob& j, const T* x, int64_t begin, int64_t end) {
  std::vector<float> buf(j.C * (K::kAcc / kCv));
  for (int64_t task = begin; task < end; ++task) {
    const ChunkRange r = chunk_range(j, task);
    conv1x1_pool_cl_chunk<K, kCv, T, kC>(j, x + r.n * j.C * j.HW, r.p0, r.p1, j.y + r.n * j.Cr * j.HW,
                                         j.part + task * j.C, buf.data());
  }
}

// C as a constant for ResNet's BAM channels where it pays: one output vector per block, whose
// kPx = K::kAcc pixel offsets i * C GCC otherwise computed or reloaded from the stack in the
// inner loop (AVX-512, Cr = 16, N = 8, 56x56, paired: 1.10x); fp32 x only (other dtypes are
// staged in buf). At 2 and 4 vectors per block it measured 0.97-1.02x.
template <typename K, int kCv, typename T>
BAM_INLINE void conv1x1_pool_cl_channels(const Conv1x1PoolJob& j, const T* x, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<T, float> && kCv == 1) {
    switch (j.C) {
      case 256: return conv1x1_pool_cl_tasks<K, kCv, T, 256>(j, x, begin, end);
      case 512: return conv1x1_pool_cl_tasks<K, kCv, T, 512>(j, x, begin, end);
      case 1024: return conv1x1_pool_cl_tasks<K, kCv, T, 1024>(j, x, begin, end);
      default: break;
    }
  }
  conv1x1_pool_cl_tasks<K, kCv, T>(j, x, begin, end);
}

template <typename K, typename T>
BAM_INLINE void conv1x1_pool_cl_any(const Conv1x1PoolJob& j, const T* x, int64_t begin, int64_t end) {
  if (j.cl_vectors == 4) return conv1x1_pool_cl_channels<K, 4, T>(j, x, begin, end);
  if (j.cl_vectors == 2) return conv1x1_pool_cl_channels<K, 2, T>(j, x, begin, end);
  conv1x1_pool_cl_channels<K, 1, T>(j, x, begin, end);
}

}  // namespace

// The entry points of one instruction set, for traits K (in that set's file).
#define BAM_DEFINE_CONV1X1_POOL(ISA, K)                                                                        \
  void conv1x1_pool_##ISA(const Conv1x1PoolJob& j, const float* x, int64_t b, int64_t e) {                  \
    conv1x1_pool_tasks<K>(j, x, b, e);                                                                      \
  }                                                                                                         \
  void conv1x1_pool_##ISA(const Conv1x1PoolJob& j, const Bf16* x, int64_t b, int64_t e) {                   \
    conv1x1_pool_tasks<K>(j, x, b, e);                                                                      \
  }                                                                                                         \
  void conv1x1_pool_##ISA(const Conv1x1PoolJob& j, const Fp16* x, int64_t b, int64_t e) {                   \
    conv1x1_pool_tasks<K>(j, x, b, e);                                                                      \
  }                                                                                                         \
  void conv1x1_pool_cl_##ISA(const Conv1x1PoolJob& j, const float* x, int64_t b, int64_t e) {               \
    conv1x1_pool_cl_any<K>(j, x, b, e);                                                                     \
  }                                                                                                         \
  void conv1x1_pool_cl_##ISA(const Conv1x1PoolJob& j, const Bf16* x, int64_t b, int64_t e) {                \
    conv1x1_pool_cl_any<K>(j, x, b, e);                                                                     \
  }                                                                                                         \
  void conv1x1_pool_cl_##ISA(const Conv1x1PoolJob& j, const Fp16* x, int64_t b, int64_t e) {                \
    conv1x1_pool_cl_any<K>(j, x, b, e);                                                                     \
  }                                                                                                         \
  int64_t conv1x1_pool_##ISA##_kco() { return K::kCo; }                                                     \
  int64_t conv1x1_pool_##ISA##_lanes() { return kLanes<K>; }

}  // namespace bam_fused
