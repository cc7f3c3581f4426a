// The fp32 dilated 3x3 conv of dilated_conv.h by Winograd's F(2x2, 3x3), torch-free: 16 products
// per 2x2 outputs and (input, output) channel pair where the direct conv takes 36, plus two
// small transforms; so about 1.7x fewer operations in all at BAM's 16-32 reduced channels.
//
// With dilation d the conv is a plain 3x3 conv on each lattice of pixels d apart, so a tile's
// 2x2 outputs are (h0 + r d, w0 + s d), r, s in {0, 1}, read from the 4x4 inputs (h0 + (a - 1) d,
// w0 + (b - 1) d), zero outside the map. Base rows h0 are those with floor(h0 / d) even: each band
// of 2d rows has d of them, and their tiles cover the band once (tile_base below); columns
// likewise. Past the map's last band the tiles' missing outputs are not stored.
//
// Per group of kT tiles: the inputs' transform B^T d B into U (16 positions x kT tiles x Cr),
// then per position and output block the channel products U x G with cl_block (the direct conv's
// register blocking: broadcast input times kCv weight vectors), then the outputs' transform
// A^T M A, bias, ReLU, and the store or the final 1x1 conv. The weights G g G^T are transformed
// once by the launcher (in double). Each output is a fixed-order computation: results do not
// depend on the thread count; they differ from the direct conv's by rounding (the transforms'
// additions), well within fp32's 1e-5 of the float64 reference (tests/test_cpu_spatial.py).
// A tile whose inputs are not all finite is computed by the direct conv instead: the transforms
// subtract inputs, so an infinite one would give NaN (inf - inf) where the conv gives +-inf.
//
// Included by dilated_conv.h after DilatedConvJob, for its fp32 policy only (the bf16 one stays
// direct: bf16 inputs through the transforms would round differently from oneDNN's bf16 convs).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "conv1x1_pool.h"
#include "dilated_conv.h"
#include "isa.h"

namespace bam_fused {
namespace {  // NOLINT: internal linkage on purpose (see conv1x1_pool.h)

// The t-th base row (or column) of tiles with dilation d, and how many there are in n rows.
BAM_INLINE int64_t tile_base(int64_t t, int64_t d) { return t / d * 2 * d + t % d; }
BAM_INLINE int64_t tile_bases(int64_t n, int64_t d) { return n / (2 * d) * d + std::min(n % (2 * d), d); }

// u = B^T d B for B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], on vectors or floats (row-major 4x4).
template <typename T>
BAM_INLINE void winograd_in(const T (&d)[16], T (&u)[16]) {
  T t[16];
  for (int b = 0; b < 4; ++b) {
    t[b] = d[b] - d[8 + b];
    t[4 + b] = d[4 + b] + d[8 + b];
    t[8 + b] = d[8 + b] - d[4 + b];
    t[12 + b] = d[4 + b] - d[12 + b];
  }
  for (int a = 0; a < 4; ++a) {
    const T* r = t + 4 * a;
    u[4 * a] = r[0] - r[2];
    u[4 * a + 1] = r[1] + r[2];
    u[4 * a + 2] = r[2] - r[1];
    u[4 * a + 3] = r[1] - r[3];
  }
}

// y = A^T m A for A^T = [1 1 1 0; 0 1 -1 -1]: the tile's 2x2 outputs (row-major).
template <typename T>
BAM_INLINE void winograd_out(const T (&m)[16], T (&y)[4]) {
  T t[8];
  for (int b = 0; b < 4; ++b) {
    t[b] = m[b] + m[4 + b] + m[8 + b];
    t[4 + b] = m[4 + b] - m[8 + b] - m[12 + b];
  }
  for (int r = 0; r < 2; ++r) {
    const T* q = t + 4 * r;
    y[2 * r] = q[0] + q[1] + q[2];
    y[2 * r + 1] = q[1] - q[2] - q[3];
  }
}

// 0 when the 16 values are finite and their sum does not overflow, else NaN: a sum in a tree
// (a chain of 16 dependent additions cost a fifth of the Winograd conv's time).
template <typename T>
BAM_INLINE T not_finite(const T (&d)[16]) {
  T s[8];
  for (int k = 0; k < 8; ++k) s[k] = d[k] + d[k + 8];
  for (int k = 0; k < 4; ++k) s[k] += s[k + 4];
  const T all = (s[0] + s[2]) + (s[1] + s[3]);
  return all - all;
}

// The direct conv of one tile's outputs (each inside the map), one pixel at a time: rare, and
// out of line (inlined, it slowed the Winograd loops by a sixth).
template <typename K, int kCv, int kCr>
__attribute__((noinline)) void direct_outputs(const DilatedConvJob& direct, int64_t n, const bool (&inside)[4],
                                              const int64_t (&at)[4], float* buf) {
  PrefetchDrip none;
  for (int q = 0; q < 4; ++q)
    if (inside[q]) dilated_conv_chunk<K, FloatConv<K>, kCv, kCr>(direct, n, at[q], at[q] + 1, buf, none);
}

// Tiles per group: the direct conv's pixels per register block, at most 12 (U and M of 16
// positions x kT tiles then stay near L1 at AVX-512's 16 channels).
template <typename K, int kCv>
constexpr int kWinogradTiles = std::min(K::kAcc / kCv, 12);

// Tiles [t0, t1) of sample n (row-major over tile_bases(H) x tile_bases(W)); j.w holds the
// transformed weights (16 positions, cob_n, Cr inputs, kCo outputs), zeros past Cr outputs.
// U: 16 x kT x Cp floats (Cp: Cr rounded up to whole vectors), M: 16 x kT x cob_n * kCo; direct:
// j with the direct conv's weights, and buf its staging buffer.
template <typename K, int kCv, int kCr>
BAM_INLINE void winograd_chunk(const DilatedConvJob& j, const DilatedConvJob& direct, int64_t n, int64_t t0,
                               int64_t t1, const int64_t* row_base, const int64_t* col_base, float* U, float* M,
                               float* buf, PrefetchDrip& drip) {
  using V = typename K::V;
  constexpr int kL = kLanes<K>, kT = kWinogradTiles<K, kCv>, kCo = kCv * kL;
  const int64_t H = j.H, W = j.W, HW = H * W, Cr = kCr > 0 ? kCr : j.Cr, d = j.dilation;
  const int64_t Cp = (Cr + kL - 1) / kL * kL, cob_n = (Cr + kCo - 1) / kCo, Cop = cob_n * kCo;
  const int64_t TW = tile_bases(W, d);
  const float* in = static_cast<const float*>(j.in) + n * HW * Cr;
  const float* wt = static_cast<const float*>(j.w);
  int64_t off[16];  // of input k from input 0, in floats
  for (int k = 0; k < 16; ++k) off[k] = (k / 4 * d * W + k % 4 * d) * Cr;
  int64_t tr = t0 / TW, tc = t0 % TW;  // the next tile's row and column of tiles
  for (int64_t t = t0; t < t1; t += kT) {
    const int nt = static_cast<int>(std::min<int64_t>(kT, t1 - t));
    int64_t h0[kT], w0[kT];
    bool finite[kT];  // whether all the tile's inputs are finite
    for (int i = 0; i < nt; ++i) {
      h0[i] = row_base[tr], w0[i] = col_base[tc];
      if (++tc == TW) tc = 0, ++tr;
    }
    for (int i = 0; i < nt; ++i) {  // U[position][i][c] = (B^T d B)[position] of channel c
      // Each input pixel's channels (nullptr in the zero padding): constant offsets from the
      // tile's first input inside the map, the usual case away from the borders.
      const float* src[16];
      const bool all_inside = h0[i] >= d && h0[i] + 2 * d < H && w0[i] >= d && w0[i] + 2 * d < W;
      const float* base = all_inside ? in + ((h0[i] - d) * W + w0[i] - d) * Cr : in;  // never before in
      for (int k = 0; k < 16; ++k) {
        const int64_t hh = h0[i] + (k / 4 - 1) * d, ww = w0[i] + (k % 4 - 1) * d;
        src[k] = all_inside ? base + off[k] : hh >= 0 && hh < H && ww >= 0 && ww < W ? in + (hh * W + ww) * Cr : nullptr;
      }
      float* u = U + i * Cp;
      int64_t c = 0;
      V nf{};  // sum - sum of the inputs: 0 while they are finite, else NaN (or an overflow: also direct)
      if (all_inside) {
        for (; c + kL <= Cr; c += kL) {
          V dv[16], uv[16];
          for (int k = 0; k < 16; ++k) dv[k] = vload<V>(base + off[k] + c);
          nf += not_finite(dv);
          winograd_in(dv, uv);
          for (int k = 0; k < 16; ++k) vstore<V>(u + k * kT * Cp + c, uv[k]);
        }
      }
      for (; c + kL <= Cr; c += kL) {
        V dv[16], uv[16];
        for (int k = 0; k < 16; ++k) dv[k] = src[k] != nullptr ? vload<V>(src[k] + c) : V{};
        nf += not_finite(dv);
        winograd_in(dv, uv);
        for (int k = 0; k < 16; ++k) vstore<V>(u + k * kT * Cp + c, uv[k]);
      }
      float nfs = K::hsum(nf);  // (lanes are 0 or NaN: any order finds a NaN)
      if constexpr (kCr == 0) {  // the constant channel counts are whole vectors
        for (; c < Cr; ++c) {      // channels past the last whole vector
          float ds[16], us[16];
          for (int k = 0; k < 16; ++k) ds[k] = src[k] != nullptr ? src[k][c] : 0.f;
          nfs += not_finite(ds);
          winograd_in(ds, us);
          for (int k = 0; k < 16; ++k) u[k * kT * Cp + c] = us[k];
        }
      }
      finite[i] = nfs == 0.f;
    }
    for (int64_t cob = 0; cob < cob_n; ++cob) {
      for (int k = 0; k < 16; ++k) {  // M[k][i][o] = sum over c of U[k][i][c] G[k][c][o]
        drip.step();
        V acc[kT][kCv] = {};
        const float* u = U + k * kT * Cp;
        cl_block<K, kCv, kT>([&](int i, int64_t c) { return u[i * Cp + c]; }, wt + (k * cob_n + cob) * Cr * kCo, Cr,
                             acc);
        // All kT tiles, also past nt in the last group (U holds defined values there, and those
        // M rows are never read): without the bound the stores need no branches.
        for (int i = 0; i < kT; ++i)
          for (int v = 0; v < kCv; ++v) vstore<V>(M + (k * kT + i) * Cop + cob * kCo + v * kL, acc[i][v]);
      }
    }
    for (int i = 0; i < nt; ++i) {
      bool inside[4];
      int64_t at[4];  // each output's pixel in the sample
      for (int q = 0; q < 4; ++q) {
        const int64_t hh = h0[i] + q / 2 * d, ww = w0[i] + q % 2 * d;
        inside[q] = hh < H && ww < W;
        at[q] = hh * W + ww;
      }
      if (!finite[i]) {
        direct_outputs<K, kCv, kCr>(direct, n, inside, at, buf);
        continue;
      }
      V s[4] = {};  // the final conv's products, lane-wise
      for (int64_t co = 0; co < Cop; co += kL) {
        V mv[16], yv[4];
        for (int k = 0; k < 16; ++k) mv[k] = vload<V>(M + (k * kT + i) * Cop + co);
        winograd_out(mv, yv);
        const V b = vload<V>(j.bias + co);
        const int64_t nco = std::min<int64_t>(kL, Cr - co);
        for (int q = 0; q < 4; ++q) {
          const V r = yv[q] + b;
          yv[q] = j.relu ? (r < 0 ? V{} : r) : r;  // relu: NaN stays NaN, as in torch
        }
        if (j.out == nullptr) {
          const V wf = vload<V>(j.w_final + co);  // zeros past Cr
          for (int q = 0; q < 4; ++q) s[q] += yv[q] * wf;
          continue;
        }
        for (int q = 0; q < 4; ++q) {
          if (!inside[q] || nco <= 0) continue;
          float* dst = static_cast<float*>(j.out) + (n * HW + at[q]) * Cr + co;
          if (nco == kL) {
            vstore<V>(dst, yv[q]);
          } else {
            float o[kL];
            vstore<V>(o, yv[q]);
            std::memcpy(dst, o, nco * sizeof(float));
          }
        }
      }
      if (j.out == nullptr) {
        for (int q = 0; q < 4; ++q) {
          if (!inside[q]) continue;
          // Lanes summed in a tree of halves, not one after the other: 1.02-1.03x for a whole
          // fp32 BAM eval at 8 x 256 x 56x56 and 1.02x at 8 x 512 x 28x28 (paired, 2-core Zen 4,
          // 2026-11-28), with the finiteness sum above; other rounding, the same bits every call.
          const float sum = K::hsum(s[q]);
          j.spatial[n * HW + at[q]] = sum + j.b_final;
        }
      }
    }
  }
}

// Tasks [begin, end) of N * chunks, each chunk_px tiles of one sample.
template <typename K, int kCv, int kCr = 0>
BAM_INLINE void winograd_tasks(const DilatedConvJob& j, int64_t begin, int64_t end) {
  constexpr int kL = kLanes<K>, kT = kWinogradTiles<K, kCv>, kCo = kCv * kL;
  const int64_t Cr = kCr > 0 ? kCr : j.Cr, Cp = (Cr + kL - 1) / kL * kL, Cop = (Cr + kCo - 1) / kCo * kCo;
  const int64_t TH = tile_bases(j.H, j.dilation), TW = tile_bases(j.W, j.dilation), tiles = TH * TW;
  // Each row and column of tiles' first output (tile_base), looked up rather than divided per tile.
  std::vector<int64_t> row_base(TH), col_base(TW);
  for (int64_t t = 0; t < TH; ++t) row_base[t] = tile_base(t, j.dilation);
  for (int64_t t = 0; t < TW; ++t) col_base[t] = tile_base(t, j.dilation);
  std::vector<float> U(16 * kT * Cp), M(16 * kT * Cop);  // zeros: a partial group reads defined values
  std::vector<float> buf(K::kAcc / kCv * Cr);
  DilatedConvJob direct = j;
  direct.w = j.w_direct, direct.winograd = false;
  const int64_t cob_n = Cop / kCo;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / j.chunks, t0 = task % j.chunks * j.chunk_px, t1 = std::min(tiles, t0 + j.chunk_px);
    PrefetchDrip drip(j.prefetch, task, j.tasks, (t1 - t0 + kT - 1) / kT * cob_n * 16);  // per product position
    winograd_chunk<K, kCv, kCr>(j, direct, n, t0, t1, row_base.data(), col_base.data(), U.data(), M.data(),
                                buf.data(), drip);
    drip.count(j.prefetched);
  }
}

template <typename K>
BAM_INLINE void winograd_any(const DilatedConvJob& j, int64_t b, int64_t e) {
  switch (j.Cr) {
    case 16: return winograd_tasks<K, cl_vectors_for(16, kLanes<K>), 16>(j, b, e);
    case 32: return winograd_tasks<K, cl_vectors_for(32, kLanes<K>), 32>(j, b, e);
    case 64: return winograd_tasks<K, cl_vectors_for(64, kLanes<K>), 64>(j, b, e);
    case 128: return winograd_tasks<K, cl_vectors_for(128, kLanes<K>), 128>(j, b, e);
    default: break;
  }
  if (j.cl_vectors == 4) return winograd_tasks<K, 4>(j, b, e);
  if (j.cl_vectors == 2) return winograd_tasks<K, 2>(j, b, e);
  winograd_tasks<K, 1>(j, b, e);
}

}  // namespace
}  // namespace bam_fused
