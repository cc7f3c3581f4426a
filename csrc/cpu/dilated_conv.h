// The CPU spatial branch after the pass over x, torch-free: one dilated 3x3 conv (zero padding
// = dilation) + bias + ReLU (or no ReLU, for training) on channels_last y (N, H, W, Cr) fp32,
// optionally followed by the final 1x1 conv to one channel in the same epilogue (then the
// conv's output never reaches memory). Further down: the conv's weight gradient (training).
//
// Blocks of kPx consecutive pixels (row-major over H x W, so a block may span rows and the
// last one is the only partial block) accumulate kPx pixels x kCv output vectors in registers
// with cl_block (conv1x1_pool.h): one broadcast input times kCv weight vectors per step. Per
// tap, when every pixel of the block reads inside the map, its inputs are y shifted by
// (dh * W + dw) pixels, read in place; when only some do, they are staged with zeros into an L1
// buffer (Cr floats per pixel against Cr x Cr multiply-adds); when none does, the tap is
// skipped. Every output is one fixed-order sum over (tap, input channel): results do not
// depend on the thread count.
//
// The arithmetic comes from a policy P: FloatConv below (fp32 y, weights and outputs), or the
// bf16 one of conv1x1_pool_avx512bf16.cpp (y, weights and outputs in bf16, channel pairs). P
// gives the unit of y (a float, or a 32-bit pair of bf16), the block product, and how an
// output vector is rounded and stored.
//
// Included by the per-instruction-set files after conv1x1_pool.h (K traits, cl_block).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cache_hint.h"
#include "conv1x1_pool.h"
#include "isa.h"

namespace bam_fused {

// y, weights and outputs are fp32 (FloatConv), or bf16 (the bf16 policy): in, w and out point
// to P's types.
struct DilatedConvJob {
  int64_t H, W, Cr, dilation, chunk_px, chunks;  // chunks = ceil(H * W / chunk_px) per sample
  const void* in;        // (N, H, W, Cr)
  const void* w;         // packed (9 taps, cob_n, Cr inputs (bf16: Cr / 2 pairs), kCo outputs), zeros past Cr
  const float* bias;     // (cob_n * kCo), zeros past Cr
  void* out;             // (N, H, W, Cr): relu(conv + bias); nullptr: the final 1x1 conv instead
  const float* w_final;  // (cob_n * kCo), zeros past Cr: spatial = w_final . relu(conv + bias) + b_final
  float b_final;
  float* spatial;        // (N, H, W) when out is nullptr
  int cl_vectors;        // output vectors per register block (1, 2 or 4): kCo = cl_vectors * lanes
  bool relu = true;      // false: out = conv + bias (training: a BatchNorm follows, spatial_train_cpu.cpp)
  // fp32 only: Winograd's F(2x2, 3x3) (winograd_conv.h); then w holds the transformed weights
  // (16 positions, cob_n, Cr inputs, kCo outputs), w_direct the direct conv's (for tiles with
  // non-finite inputs), and a chunk is chunk_px tiles of 2x2 outputs.
  bool winograd = false;
  const void* w_direct = nullptr;
  // Memory to prefetch while the conv computes (cache_hint.h), spread over its `tasks` tasks;
  // the bytes prefetched are added to *prefetched (if given).
  CacheHint prefetch{};
  int64_t tasks = 0;
  std::atomic<int64_t>* prefetched = nullptr;
};

// Tasks [begin, end) of N * chunks, each one chunk of one sample.
#define BAM_DECLARE_DILATED_CONV(ISA) \
  void dilated_conv_##ISA(const DilatedConvJob& j, int64_t begin, int64_t end);
BAM_DECLARE_DILATED_CONV(avx512)
BAM_DECLARE_DILATED_CONV(avx2)
BAM_DECLARE_DILATED_CONV(generic)
// bf16 y, weights (channel pairs) and outputs, Cr of 16, 32, 64 or 128 (conv1x1_pool_avx512bf16.cpp).
BAM_DECLARE_DILATED_CONV(avx512bf16)

// The weight gradient of one fp32 dilated 3x3 conv (zero padding = dilation) in training
// (spatial_train_cpu.cpp), for Cr of 16, 32 or 64: per task (one chunk of one sample's pixels),
// part[task] (9 taps, Cr outputs, Cr inputs) = the sum over the task's pixels p of
// dy[p][o] * in[p shifted by the tap][i]. The launcher adds the partials in task order: results
// do not depend on the thread count.
struct DilatedGradJob {
  int64_t H, W, Cr, dilation, chunk_px, chunks;
  const float* in;  // (N, H, W, Cr): the conv's input
  const float* dy;  // (N, H, W, Cr): the gradient of its output
  float* part;      // (N * chunks, 9, Cr, Cr)
};
#define BAM_DECLARE_DILATED_GRAD(ISA) \
  void dilated_conv_grad_weight_##ISA(const DilatedGradJob& j, int64_t begin, int64_t end);
BAM_DECLARE_DILATED_GRAD(avx512)
BAM_DECLARE_DILATED_GRAD(avx2)
BAM_DECLARE_DILATED_GRAD(generic)

namespace {  // NOLINT: internal linkage on purpose (see conv1x1_pool.h)

// The fp32 policy: y, weights and outputs are floats, one unit per channel.
template <typename K>
struct FloatConv {
  using V = typename K::V;
  using Unit = float;  // of y and of the packed weights
  static constexpr int64_t units(int64_t Cr) { return Cr; }
  template <int kCv, int kPx, typename In>
  static BAM_INLINE void block(In&& in, const Unit* w, int64_t units, V (&acc)[kPx][kCv]) {
    cl_block<K, kCv, kPx>(in, w, units, acc);
  }
  // dst[0, n) = src[0, n), in vectors: one pixel's input channels.
  static BAM_INLINE void copy(Unit* dst, const Unit* src, int64_t n) {
    constexpr int kL = kLanes<K>;
    int64_t c = 0;
    for (; c + kL <= n; c += kL) vstore<V>(dst + c, vload<V>(src + c));
    for (; c < n; ++c) dst[c] = src[c];
  }
  static BAM_INLINE V round(V r) { return r; }  // outputs stay fp32
  template <int kCv>
  static BAM_INLINE void store(void* out, int64_t at, const V (&r)[kCv], int64_t nco) {
    float o[kCv * kLanes<K>];
    for (int v = 0; v < kCv; ++v) vstore<V>(o + v * kLanes<K>, r[v]);
    std::memcpy(static_cast<float*>(out) + at, o, nco * sizeof(float));
  }
};

// Pixels [p0, p1) of sample n. buf holds kPx pixels of y's units. kCr: Cr as a constant (0:
// j.Cr), so that the kPx pixels' inputs are constant offsets from one pointer (with a run-time
// Cr, GCC kept a pointer per pixel and reloaded half of them from the stack: 0.84 against 0.70
// ms for oneDNN at Cr = 16, 56x56, N = 8, two convs).
template <typename K, typename P, int kCv, int kCr>
BAM_INLINE void dilated_conv_chunk(const DilatedConvJob& j, int64_t n, int64_t p0, int64_t p1,
                                   typename P::Unit* buf, PrefetchDrip& drip) {
  using V = typename K::V;
  using Unit = typename P::Unit;
  constexpr int kL = kLanes<K>, kPx = K::kAcc / kCv, kCo = kCv * kL;
  const int64_t H = j.H, W = j.W, HW = H * W, Cr = kCr > 0 ? kCr : j.Cr, d = j.dilation;
  const int64_t U = P::units(Cr), cob_n = (Cr + kCo - 1) / kCo;  // y's units per pixel
  const Unit* in = static_cast<const Unit*>(j.in) + n * HW * U;
  int64_t h = p0 / W, w = p0 % W;  // of the block's first pixel
  for (int64_t p = p0; p < p1; p += kPx) {
    drip.step();
    const int64_t np = std::min<int64_t>(kPx, p1 - p);
    int64_t ph[kPx], pw[kPx];  // each pixel's row and column (past np: a row no tap reaches)
    for (int i = 0; i < kPx; ++i) {
      ph[i] = i < np ? h : -H - 1 - d;
      pw[i] = w;
      if (++w == W) w = 0, ++h;
    }
    float s[kPx] = {};
    for (int64_t cob = 0; cob < cob_n; ++cob) {
      V acc[kPx][kCv] = {};
      const Unit* wcob = static_cast<const Unit*>(j.w) + cob * U * kCo;
      for (int tap = 0; tap < 9; ++tap) {
        const int64_t dh = (tap / 3 - 1) * d, dw = (tap % 3 - 1) * d;
        const Unit* wt = wcob + tap * cob_n * U * kCo;
        int valid = 0;
        for (int i = 0; i < kPx; ++i)
          valid += ph[i] + dh >= 0 && ph[i] + dh < H && pw[i] + dw >= 0 && pw[i] + dw < W;
        if (valid == 0) continue;
        if (valid == kPx) {
          // Every pixel's input is the pixel dh rows and dw columns away: one shift of y.
          const Unit* src = in + (p + dh * W + dw) * U;
          P::template block<kCv, kPx>([&](int i, int64_t c) { return src[i * U + c]; }, wt, U, acc);
          continue;
        }
        for (int i = 0; i < kPx; ++i) {  // some pixels read zero padding: stage the inputs
          const int64_t hh = ph[i] + dh, ww = pw[i] + dw;
          if (hh >= 0 && hh < H && ww >= 0 && ww < W) {
            P::copy(buf + i * U, in + (hh * W + ww) * U, U);
          } else {
            std::fill(buf + i * U, buf + (i + 1) * U, Unit{});
          }
        }
        P::template block<kCv, kPx>([&](int i, int64_t c) { return buf[i * U + c]; }, wt, U, acc);
      }
      const int64_t co0 = cob * kCo, nco = std::min<int64_t>(kCo, Cr - co0);
      V b[kCv], wf[kCv] = {};
      for (int v = 0; v < kCv; ++v) {
        b[v] = vload<V>(j.bias + co0 + v * kL);
        if (j.out == nullptr) wf[v] = vload<V>(j.w_final + co0 + v * kL);
      }
      for (int64_t i = 0; i < np; ++i) {
        V r[kCv];
        for (int v = 0; v < kCv; ++v) {
          const V t = acc[i][v] + b[v];
          r[v] = P::round(j.relu ? (t < 0 ? V{} : t) : t);  // relu: NaN stays NaN, as in torch
        }
        if (j.out != nullptr) {
          P::template store<kCv>(j.out, ((n * HW) + p + i) * Cr + co0, r, nco);
        } else {
          if (nco < kCo) {  // padded channels: zero weights times an infinite input give NaN, not 0
            float o[kCo];
            for (int v = 0; v < kCv; ++v) vstore<V>(o + v * kL, r[v]);
            std::fill(o + nco, o + kCo, 0.f);
            for (int v = 0; v < kCv; ++v) r[v] = vload<V>(o + v * kL);
          }
          V t = r[0] * wf[0];
          for (int v = 1; v < kCv; ++v) t += r[v] * wf[v];
          s[i] += K::hsum(t);  // a tree of vector halves, as the Winograd conv's final sums
        }
      }
    }
    if (j.out == nullptr)
      for (int64_t i = 0; i < np; ++i) j.spatial[n * HW + p + i] = s[i] + j.b_final;
  }
}

template <typename K, typename P, int kCv, int kCr = 0>
BAM_INLINE void dilated_conv_tasks(const DilatedConvJob& j, int64_t begin, int64_t end) {
  constexpr int kPx = K::kAcc / kCv;
  std::vector<typename P::Unit> buf(kPx * P::units(j.Cr));
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / j.chunks, p0 = task % j.chunks * j.chunk_px, p1 = std::min(j.H * j.W, p0 + j.chunk_px);
    PrefetchDrip drip(j.prefetch, task, j.tasks, (p1 - p0 + kPx - 1) / kPx);
    dilated_conv_chunk<K, P, kCv, kCr>(j, n, p0, p1, buf.data(), drip);
    drip.count(j.prefetched);
  }
}

}  // namespace
}  // namespace bam_fused

#include "winograd_conv.h"  // after the direct conv, which it falls back to for non-finite inputs

namespace bam_fused {
namespace {  // NOLINT

// Cr as a constant for BAM's usual reduced channels (C / 16 or C / 8 of ResNet's 256-1024);
// with kConstantOnly (the bf16 policy) the others are not instantiated.
template <typename K, typename P = FloatConv<K>, bool kConstantOnly = false>
BAM_INLINE void dilated_conv_any(const DilatedConvJob& j, int64_t b, int64_t e) {
  if constexpr (std::is_same_v<P, FloatConv<K>>) {
    if (j.winograd) return winograd_any<K>(j, b, e);
  }
  switch (j.Cr) {
    case 16: return dilated_conv_tasks<K, P, cl_vectors_for(16, kLanes<K>), 16>(j, b, e);
    case 32: return dilated_conv_tasks<K, P, cl_vectors_for(32, kLanes<K>), 32>(j, b, e);
    case 64: return dilated_conv_tasks<K, P, cl_vectors_for(64, kLanes<K>), 64>(j, b, e);
    case 128: return dilated_conv_tasks<K, P, cl_vectors_for(128, kLanes<K>), 128>(j, b, e);
    default: break;
  }
  if constexpr (!kConstantOnly) {
    if (j.cl_vectors == 4) return dilated_conv_tasks<K, P, 4>(j, b, e);
    if (j.cl_vectors == 2) return dilated_conv_tasks<K, P, 2>(j, b, e);
    dilated_conv_tasks<K, P, 1>(j, b, e);
  }
}

constexpr int pow2_floor(int v) { return v >= 16 ? 16 : v >= 8 ? 8 : v >= 4 ? 4 : v >= 2 ? 2 : 1; }

// kO outputs x kIv input vectors of accumulators (kO a power of two dividing kCr, within K's
// accumulator budget); one input vector load per kIv and one broadcast of dy per output.
template <typename K, int kCr>
BAM_INLINE void dilated_grad_weight_tasks(const DilatedGradJob& j, int64_t begin, int64_t end) {
  using V = typename K::V;
  constexpr int kL = kLanes<K>, kIv = std::min(kCr / kL, 4), kO = pow2_floor(std::min(kCr, K::kAcc / kIv));
  static_assert(kCr % (kIv * kL) == 0 && kCr % kO == 0);
  const int64_t H = j.H, W = j.W, HW = H * W, d = j.dilation;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / j.chunks, p0 = task % j.chunks * j.chunk_px, p1 = std::min(HW, p0 + j.chunk_px);
    const float* in = j.in + n * HW * kCr;
    const float* dy = j.dy + n * HW * kCr;
    float* part = j.part + task * 9 * kCr * kCr;
    for (int tap = 0; tap < 9; ++tap) {
      const int64_t dh = (tap / 3 - 1) * d, dw = (tap % 3 - 1) * d;
      for (int o0 = 0; o0 < kCr; o0 += kO) {
        for (int i0 = 0; i0 < kCr; i0 += kIv * kL) {
          V acc[kO][kIv] = {};
          // Row by row: the pixels whose shifted pixel lies inside the map (else zero padding)
          // are one run of columns, with no test per pixel.
          for (int64_t row0 = p0; row0 < p1;) {
            const int64_t h = row0 / W, w0 = row0 % W, row1 = std::min(p1, row0 - w0 + W);
            const int64_t lo = std::max(w0, -dw), hi = std::min(w0 + row1 - row0, W - dw);
            if (h + dh >= 0 && h + dh < H && lo < hi) {
              const float* src = in + ((h + dh) * W + lo + dw) * kCr + i0;
              const float* g = dy + (h * W + lo) * kCr + o0;
              for (int64_t k = 0; k < hi - lo; ++k, src += kCr, g += kCr) {
                V a[kIv];
                for (int v = 0; v < kIv; ++v) a[v] = vload<V>(src + v * kL);
                for (int o = 0; o < kO; ++o) {
                  const V b = K::splat(g[o]);
                  for (int v = 0; v < kIv; ++v) acc[o][v] += b * a[v];
                }
              }
            }
            row0 = row1;
          }
          for (int o = 0; o < kO; ++o)
            for (int v = 0; v < kIv; ++v) vstore<V>(part + (tap * kCr + o0 + o) * kCr + i0 + v * kL, acc[o][v]);
        }
      }
    }
  }
}

template <typename K>
BAM_INLINE void dilated_grad_weight_any(const DilatedGradJob& j, int64_t b, int64_t e) {
  switch (j.Cr) {
    case 16: return dilated_grad_weight_tasks<K, 16>(j, b, e);
    case 32: return dilated_grad_weight_tasks<K, 32>(j, b, e);
    case 64: return dilated_grad_weight_tasks<K, 64>(j, b, e);
    default: break;  // the launcher sends other channel counts to oneDNN
  }
}

}  // namespace

#define BAM_DEFINE_DILATED_CONV(ISA, K)                                                                \
  void dilated_conv_##ISA(const DilatedConvJob& j, int64_t b, int64_t e) { dilated_conv_any<K>(j, b, e); } \
  void dilated_conv_grad_weight_##ISA(const DilatedGradJob& j, int64_t b, int64_t e) {                \
    dilated_grad_weight_any<K>(j, b, e);                                                           \
  }

}  // namespace bam_fused
