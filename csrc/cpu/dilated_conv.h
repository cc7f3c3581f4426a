// The CPU spatial branch after the pass over x, torch-free: one dilated 3x3 conv (zero padding
// = dilation) + bias + ReLU on channels_last y (N, H, W, Cr) fp32, optionally followed by the
// final 1x1 conv to one channel in the same epilogue (then the conv's output never reaches
// memory).
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
// Included by the per-instruction-set files after conv1x1_pool.h (K traits, cl_block).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "conv1x1_pool.h"
#include "isa.h"

namespace bam_fused {

struct DilatedConvJob {
  int64_t H, W, Cr, dilation, chunk_px, chunks;  // chunks = ceil(H * W / chunk_px) per sample
  const float* in;       // (N, H, W, Cr)
  const float* w;        // packed (9 taps, cob_n, Cr inputs, kCo outputs), zeros past Cr outputs
  const float* bias;     // (cob_n * kCo), zeros past Cr
  float* out;            // (N, H, W, Cr): relu(conv + bias); nullptr: the final 1x1 conv instead
  const float* w_final;  // (cob_n * kCo), zeros past Cr: spatial = w_final . relu(conv + bias) + b_final
  float b_final;
  float* spatial;        // (N, H, W) when out is nullptr
  int cl_vectors;        // output vectors per register block (1, 2 or 4): kCo = cl_vectors * lanes
};

// Tasks [begin, end) of N * chunks, each one chunk of one sample.
#define BAM_DECLARE_DILATED_CONV(ISA) \
  void dilated_conv_##ISA(const DilatedConvJob& j, int64_t begin, int64_t end);
BAM_DECLARE_DILATED_CONV(avx512)
BAM_DECLARE_DILATED_CONV(avx2)
BAM_DECLARE_DILATED_CONV(generic)

namespace {  // NOLINT: internal linkage on purpose (see conv1x1_pool.h)

// dst[0, n) = src[0, n), in vectors: one pixel's Cr input channels.
template <typename K>
BAM_INLINE void copy_pixel(float* dst, const float* src, int64_t n) {
  using V = typename K::V;
  constexpr int kL = kLanes<K>;
  int64_t c = 0;
  for (; c + kL <= n; c += kL) vstore<V>(dst + c, vload<V>(src + c));
  for (; c < n; ++c) dst[c] = src[c];
}

// Pixels [p0, p1) of sample n. buf holds kPx * Cr floats. kCr: Cr as a constant (0: j.Cr),
// so that the kPx pixels' inputs are constant offsets from one pointer (with a run-time Cr,
// GCC kept a pointer per pixel and reloaded half of them from the stack: 0.84 against
// 0.70 ms for oneDNN at Cr = 16, 56x56, N = 8, two convs).
template <typename K, int kCv, int kCr>
BAM_INLINE void dilated_conv_chunk(const DilatedConvJob& j, int64_t n, int64_t p0, int64_t p1, float* buf) {
  using V = typename K::V;
  constexpr int kL = kLanes<K>, kPx = K::kAcc / kCv, kCo = kCv * kL;
  const int64_t H = j.H, W = j.W, HW = H * W, Cr = kCr > 0 ? kCr : j.Cr, d = j.dilation;
  const int64_t cob_n = (Cr + kCo - 1) / kCo;
  const float* in = j.in + n * HW * Cr;
  int64_t h = p0 / W, w = p0 % W;  // of the block's first pixel
  for (int64_t p = p0; p < p1; p += kPx) {
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
      const float* wcob = j.w + cob * Cr * kCo;
      for (int tap = 0; tap < 9; ++tap) {
        const int64_t dh = (tap / 3 - 1) * d, dw = (tap % 3 - 1) * d;
        const float* wt = wcob + tap * cob_n * Cr * kCo;
        int valid = 0;
        for (int i = 0; i < kPx; ++i)
          valid += ph[i] + dh >= 0 && ph[i] + dh < H && pw[i] + dw >= 0 && pw[i] + dw < W;
        if (valid == 0) continue;
        if (valid == kPx) {
          // Every pixel's input is the pixel dh rows and dw columns away: one shift of y.
          const float* src = in + (p + dh * W + dw) * Cr;
          cl_block<K, kCv, kPx>([&](int i, int64_t c) { return src[i * Cr + c]; }, wt, Cr, acc);
          continue;
        }
        for (int i = 0; i < kPx; ++i) {  // some pixels read zero padding: stage the inputs
          const int64_t hh = ph[i] + dh, ww = pw[i] + dw;
          if (hh >= 0 && hh < H && ww >= 0 && ww < W) {
            copy_pixel<K>(buf + i * Cr, in + (hh * W + ww) * Cr, Cr);
          } else {
            std::fill(buf + i * Cr, buf + (i + 1) * Cr, 0.f);
          }
        }
        cl_block<K, kCv, kPx>([&](int i, int64_t c) { return buf[i * Cr + c]; }, wt, Cr, acc);
      }
      const int64_t co0 = cob * kCo, nco = std::min<int64_t>(kCo, Cr - co0);
      V b[kCv], wf[kCv];
      for (int v = 0; v < kCv; ++v) {
        b[v] = vload<V>(j.bias + co0 + v * kL);
        if (j.out == nullptr) wf[v] = vload<V>(j.w_final + co0 + v * kL);
      }
      for (int64_t i = 0; i < np; ++i) {
        V r[kCv];
        for (int v = 0; v < kCv; ++v) {
          const V t = acc[i][v] + b[v];
          r[v] = t < 0 ? V{} : t;  // relu: NaN stays NaN, as in torch
        }
        if (j.out != nullptr) {
          float o[kCo];
          for (int v = 0; v < kCv; ++v) vstore<V>(o + v * kL, r[v]);
          std::memcpy(j.out + ((n * HW) + p + i) * Cr + co0, o, nco * sizeof(float));
        } else {
          V t = r[0] * wf[0];
          for (int v = 1; v < kCv; ++v) t += r[v] * wf[v];
          float lanes[kL];
          vstore<V>(lanes, t);
          for (int l = 0; l < kL; ++l) s[i] += lanes[l];  // padded channels add 0 * 0
        }
      }
    }
    if (j.out == nullptr)
      for (int64_t i = 0; i < np; ++i) j.spatial[n * HW + p + i] = s[i] + j.b_final;
  }
}

template <typename K, int kCv, int kCr = 0>
BAM_INLINE void dilated_conv_tasks(const DilatedConvJob& j, int64_t begin, int64_t end) {
  constexpr int kPx = K::kAcc / kCv;
  std::vector<float> buf(kPx * j.Cr);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / j.chunks, p0 = task % j.chunks * j.chunk_px;
    dilated_conv_chunk<K, kCv, kCr>(j, n, p0, std::min(j.H * j.W, p0 + j.chunk_px), buf.data());
  }
}

// Cr as a constant for BAM's usual reduced channels (C / 16 or C / 8 of ResNet's 256-1024).
template <typename K>
BAM_INLINE void dilated_conv_any(const DilatedConvJob& j, int64_t b, int64_t e) {
  switch (j.Cr) {
    case 16: return dilated_conv_tasks<K, cl_vectors_for(16, kLanes<K>), 16>(j, b, e);
    case 32: return dilated_conv_tasks<K, cl_vectors_for(32, kLanes<K>), 32>(j, b, e);
    case 64: return dilated_conv_tasks<K, cl_vectors_for(64, kLanes<K>), 64>(j, b, e);
    case 128: return dilated_conv_tasks<K, cl_vectors_for(128, kLanes<K>), 128>(j, b, e);
    default: break;
  }
  if (j.cl_vectors == 4) return dilated_conv_tasks<K, 4>(j, b, e);
  if (j.cl_vectors == 2) return dilated_conv_tasks<K, 2>(j, b, e);
  dilated_conv_tasks<K, 1>(j, b, e);
}

}  // namespace

#define BAM_DEFINE_DILATED_CONV(ISA, K) \
  void dilated_conv_##ISA(const DilatedConvJob& j, int64_t b, int64_t e) { dilated_conv_any<K>(j, b, e); }

}  // namespace bam_fused
