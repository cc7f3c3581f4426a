// The CPU pass over bf16 x (conv1x1_pool.h), the bf16 dilated convs (dilated_conv.h) and the
// pass's backward where its products are exact (conv1x1_grad.h: dW, dx) with AVX512-BF16 dot
// products: vdpbf16ps adds two bf16 products per fp32 lane, twice the multiply-adds of an fp32
// FMA per instruction (2-core AVX-512 VM: 481 against 237 GFLOP/s per core). Weights are rounded
// to bf16 (nearest even), as a bf16 model's own are; each product is exact in fp32, the sums are
// fp32 (in the instruction's order: odd channel, then even; denormals read and written as zero).
// The pass's pooled sums read x exactly, in the order of the avx512 pass: the same bits.
//
// Input channels go in pairs (c, c + 1), as the instruction takes them: channels_last x and y
// hold a pair in one 32-bit word (one broadcast per pixel); NCHW tiles are interleaved into
// pairs once per tile, and the pairs then serve every block of output channels. The backward
// pairs what it sums over: dy's rows for dx, pixels for dW.
//
// GCC keeps an accumulator array in registers only while every index into it is a constant
// (after unrolling): a run-time index anywhere (a store loop to np or nc) made it store the
// whole array at every step of the inner loop. Hence the constant-bound loops with a test
// inside, and the local copies.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "simd.h"

#if BAM_X86
#include <immintrin.h>

BAM_TARGET_BEGIN("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,bmi2")

#include "avx512_traits.h"  // the blocking the launcher packs the weights for
#include "conv1x1_grad.h"
#include "conv1x1_pool.h"
#include "dilated_conv.h"

namespace bam_fused {
namespace {

using V = Avx512::V;
constexpr int kL = 16, kCo = Avx512::kCo;

// acc += pairs . weights, lane by lane (two bf16 products per fp32 lane).
BAM_INLINE V dot2(V acc, __m512i pairs, __m512i weights) {
  return (V)_mm512_dpbf16_ps((__m512)acc, (__m512bh)pairs, (__m512bh)weights);
}
// 16 bf16 from p (lanes outside m read as zeros), each in the low half of a 32-bit lane.
BAM_INLINE __m512i widen(const Bf16* p, __mmask16 m) { return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)); }
BAM_INLINE V as_fp32(__m512i low_halves) { return (V)_mm512_slli_epi32(low_halves, 16); }
// Pair words lo | hi << 16 from two vectors of bf16 in low halves (widen's).
BAM_INLINE __m512i pair_low_halves(__m512i lo, __m512i hi) { return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)); }
// Pair words from two vectors of fp32 that hold bf16 values (their high halves, exact).
BAM_INLINE __m512i pair_high_halves(__m512 lo, __m512 hi) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  return _mm512_or_si512(_mm512_srli_epi32((__m512i)lo, 16), _mm512_and_si512((__m512i)hi, high));
}
// The first n of 16 lanes (none for n <= 0, all for n >= 16): the mask of a vector that holds
// the n elements left.
BAM_INLINE __mmask16 first_lanes(int64_t n) {
  return static_cast<__mmask16>((1u << std::clamp<int64_t>(n, 0, kL)) - 1u);
}

// NCHW: np pixels from p (kPV vectors of them) as channel pairs, pairs[(c / 2 * kPV + v) * 16 +
// lane] = x[c] | x[c + 1] << 16 (zeros past np and past C), and their pooled sums added to
// pool (C x 16 lanes) as conv_tile adds them: the tile's vectors first, then pool.
//
// With prefetch, also the next tile's rows (the lines of its first and last byte in each row:
// 96 bytes, 2 lines, 3 at some offsets): its dot products (dot_tile) then run while DRAM
// streams. Without it, 45% of the pass's samples sat on the widening loads of x (perf, 8 x 256
// x 56x56 bf16, 2-core Zen 4): 256 rows HW apart are too many streams for the hardware
// prefetcher, as for the fp32 pass (conv_tile). Paired A/B, whole bf16 BAM eval, 2026-11-28,
// this form: 1.09x at 8 x 256 x 56x56, 1.02x at 8 x 1024 x 14x14 (one run each). Prefetching for
// every tile: 1.12x / 1.15x and 0.98-1.00x there (so a chunk's last tile now prefetches nothing:
// its next tile is another chunk's), 1.02x at 2 x 56x56, 1.00x at 1 x 56x56 and 1 x 1024 x 14x14,
// 1.01-1.02x at 8 x 512 x 28x28; a third line a row: 1.13x / 1.19x / 1.13x at 8 x 256 x 56x56.
template <int kPV>
BAM_INLINE void pair_tile(const Bf16* x, int64_t C, int64_t HW, int64_t p, int64_t np, uint32_t* pairs, float* pool,
                          bool prefetch) {
  __mmask16 mask[kPV];
  for (int v = 0; v < kPV; ++v) mask[v] = first_lanes(np - v * kL);
  constexpr int kTileBytes = Avx512::kPV * kL * 2;  // a full tile's share of a row
  for (int64_t c = 0; c < C; c += 2) {
    const bool pair = c + 1 < C;
    const Bf16* row = x + c * HW + p;
    if (prefetch) {  // the next tile's share of rows c and c + 1: its first and last line
      for (int64_t r = c; r < std::min<int64_t>(c + 2, C); ++r) {
        const char* next = reinterpret_cast<const char*>(x + r * HW + p) + kTileBytes;
        __builtin_prefetch(next, 0, 2);
        __builtin_prefetch(next + kTileBytes - 1, 0, 2);
      }
    }
    V s0{}, s1{};
#pragma GCC unroll 4
    for (int v = 0; v < kPV; ++v) {
      const __m512i lo = widen(row + v * kL, mask[v]);
      const __m512i hi = pair ? widen(row + HW + v * kL, mask[v]) : _mm512_setzero_si512();
      _mm512_storeu_si512(pairs + (c / 2 * kPV + v) * kL, pair_low_halves(lo, hi));
      s0 = v == 0 ? as_fp32(lo) : s0 + as_fp32(lo);
      s1 = v == 0 ? as_fp32(hi) : s1 + as_fp32(hi);
    }
    vstore<V>(pool + c * kL, vload<V>(pool + c * kL) + s0);
    if (pair) vstore<V>(pool + (c + 1) * kL, vload<V>(pool + (c + 1) * kL) + s1);
  }
}

// NCHW, pixels in lanes: acc[o][v] += pairs[k][vector v] . w[k][o] (w's pair broadcast) over k <
// K input pairs; pairs as pair_tile lays them out, w a block of (blocks, K, kCo) weight pairs.
// The product of the pass (x's channel pairs) and of dx (dy's row pairs).
template <int kPV>
BAM_INLINE void dot_pairs(const uint32_t* pairs, const uint32_t* w, int64_t K, V (&acc)[kCo][kPV]) {
  for (int64_t k = 0; k < K; ++k) {
    __m512i xv[kPV];
#pragma GCC unroll 4
    for (int v = 0; v < kPV; ++v) xv[v] = _mm512_loadu_si512(pairs + (k * kPV + v) * kL);
#pragma GCC unroll 16
    for (int o = 0; o < kCo; ++o) {
      const __m512i wb = _mm512_set1_epi32(static_cast<int>(w[k * kCo + o]));
#pragma GCC unroll 4
      for (int v = 0; v < kPV; ++v) acc[o][v] = dot2(acc[o][v], xv[v], wb);
    }
  }
}

// NCHW: every block of kCo output channels of a paired tile, into y.
template <int kPV>
BAM_INLINE void dot_tile(const Conv1x1PoolJob& j, const uint32_t* pairs, int64_t p, int64_t np, float* y) {
  const int64_t C2 = (j.C + 1) / 2, cob_n = (j.Cr + kCo - 1) / kCo;
  for (int64_t cob = 0; cob < cob_n; ++cob) {
    V acc[kCo][kPV] = {};
    dot_pairs<kPV>(pairs, j.w_pairs + cob * C2 * kCo, C2, acc);
    store_tile_block<Avx512, kPV>(j, acc, cob, p, np, y);
  }
}

void pass_nchw(const Conv1x1PoolJob& j, const Bf16* x, int64_t begin, int64_t end) {
  constexpr int kP = Avx512::kPV * kL;
  std::vector<uint32_t> pairs((j.C + 1) / 2 * kP);
  std::vector<float> pool(j.C * kL);
  for (int64_t task = begin; task < end; ++task) {
    const ChunkRange r = chunk_range(j, task);
    const Bf16* xs = x + r.n * j.C * j.HW;
    float* y = j.y + r.n * j.Cr * j.HW;
    std::fill(pool.begin(), pool.end(), 0.f);
    for (int64_t p = r.p0; p < r.p1; p += kP) {
      const int64_t np = std::min<int64_t>(kP, r.p1 - p);
      with_tile_vectors<Avx512>((np + kL - 1) / kL, [&]<int kPV>() {
        pair_tile<kPV>(xs, j.C, j.HW, p, np, pairs.data(), pool.data(), p + kP < r.p1);
        dot_tile<kPV>(j, pairs.data(), p, np, y);
      });
    }
    finish_pool<Avx512>(j, pool.data(), j.part + task * j.C);
  }
}

// channels_last: pooled sums of np pixel rows from xt (C apart) added to part, in the order of
// conv1x1_pool_cl_chunk: the rows in registers first, then part.
BAM_INLINE void pool_rows(const Bf16* xt, int64_t C, int64_t np, float* part) {
  int64_t c = 0;
  for (; c + kL <= C; c += kL) {
    V s = as_fp32(widen(xt + c, 0xFFFF));
    for (int64_t i = 1; i < np; ++i) s += as_fp32(widen(xt + i * C + c, 0xFFFF));
    vstore<V>(part + c, vload<V>(part + c) + s);
  }
  for (; c < C; ++c)
    for (int64_t i = 0; i < np; ++i) part[c] += ld(xt + i * C + c);
}

// bf16 channel pairs: y's units and the packed weights are 32-bit words holding channels
// (c, c + 1) (c in the low half). The product of the channels_last pass and, as the policy of
// dilated_conv.h, of the bf16 dilated convs (outputs rounded to bf16 as oneDNN's bf16 convs
// round them).
struct Bf16Conv {
  using Unit = uint32_t;
  static constexpr int64_t units(int64_t Cr) { return Cr / 2; }
  // acc[i][v] += in(i, c2) (broadcast) . w[c2][vector v], over the input pairs: cl_block's loop.
  // With kPf, also prefetches the kPx * pairs words from pf, a share every pair (as cl_block).
  template <int kCv, int kPx, bool kPf = false, typename In>
  static BAM_INLINE void block(In&& in, const uint32_t* w, int64_t pairs, V (&acc)[kPx][kCv],
                               const char* pf = nullptr) {
    constexpr int kCoCl = kCv * kL;
    V a[kPx][kCv];  // a local copy whose address is never taken: GCC then keeps it in registers
#pragma GCC unroll 32
    for (int i = 0; i < kPx; ++i)
      for (int v = 0; v < kCv; ++v) a[i][v] = acc[i][v];
    for (int64_t c2 = 0; c2 < pairs; ++c2) {
      if constexpr (kPf) prefetch_share<kPx>(pf, c2);
      __m512i wv[kCv];
#pragma GCC unroll 4
      for (int v = 0; v < kCv; ++v) wv[v] = _mm512_loadu_si512(w + c2 * kCoCl + v * kL);
#pragma GCC unroll 32
      for (int i = 0; i < kPx; ++i) {
        const __m512i xb = _mm512_set1_epi32(static_cast<int>(in(i, c2)));
#pragma GCC unroll 4
        for (int v = 0; v < kCv; ++v) a[i][v] = dot2(a[i][v], xb, wv[v]);
      }
    }
#pragma GCC unroll 32
    for (int i = 0; i < kPx; ++i)
      for (int v = 0; v < kCv; ++v) acc[i][v] = a[i][v];
  }
  static BAM_INLINE void copy(Unit* dst, const Unit* src, int64_t n) { std::memcpy(dst, src, n * sizeof(Unit)); }
  // r rounded to bf16 (nearest even; denormals to zero), back in fp32.
  static BAM_INLINE V round(V r) { return as_fp32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh((__m512)r))); }
  // nco bf16 outputs from r (already rounded) at element `at` of out.
  template <int kCv>
  static BAM_INLINE void store(void* out, int64_t at, const V (&r)[kCv], int64_t nco) {
    Bf16* o = static_cast<Bf16*>(out) + at;
    for (int v = 0; v < kCv; ++v)
      _mm256_mask_storeu_epi16(o + v * kL, first_lanes(nco - v * kL), (__m256i)_mm512_cvtneps_pbh((__m512)r[v]));
  }
};

// channels_last, kCv output vectors per block: kPx pixels x kCv vectors of accumulators.
// The pooled sums' widening loads (the tile's first touch) held 48% of the pass's perf samples
// at 8 x 256 x 56x56 (2-core Zen 4) until the first output block prefetched the tile kClAhead
// tiles on: paired, whole bf16 channels_last BAM eval 1.08x / 1.08x there, 1.045x at 8 x 1024 x
// 14x14, 1.00x at 8 x 512 x 28x28, 1.01x at 1-2 x 256 x 56x56; a training step 1.05x (2026-11-28).
template <int kCv>
void pass_cl(const Conv1x1PoolJob& j, const Bf16* x, int64_t begin, int64_t end) {
  constexpr int kPx = Avx512::kAcc / kCv, kCoCl = kCv * kL;
  const int64_t C = j.C, C2 = (C + 1) / 2, cob_n = (j.Cr + kCoCl - 1) / kCoCl;
  std::vector<uint32_t> buf(kPx * C2);  // a last, partial tile or odd C: pairs zero-padded
  for (int64_t task = begin; task < end; ++task) {
    const ChunkRange r = chunk_range(j, task);
    const Bf16* xs = x + r.n * C * j.HW;
    float* y = j.y + r.n * j.Cr * j.HW;
    float* part = j.part + task * C;
    std::fill(part, part + C, 0.f);
    for (int64_t p = r.p0; p < r.p1; p += kPx) {
      const int64_t np = std::min<int64_t>(kPx, r.p1 - p);
      const Bf16* rows = xs + p * C;
      pool_rows(rows, C, np, part);
      const void* xt = rows;  // pixel i's pair c2 at xt + (i * C2 + c2) words when C is even
      if (C % 2 != 0 || np < kPx) {
        std::fill(buf.begin(), buf.end(), 0u);
        for (int64_t i = 0; i < np; ++i) std::memcpy(buf.data() + i * C2, rows + i * C, C * sizeof(Bf16));
        xt = buf.data();
      }
      const auto* xw = static_cast<const uint32_t*>(xt);
      for (int64_t cob = 0; cob < cob_n; ++cob) {
        V acc[kPx][kCv] = {};
        const auto in = [&](int i, int64_t c2) { return xw[i * C2 + c2]; };
        if (cob == 0) {  // and the tile kClAhead tiles on, into L2 (as the fp32 pass; conv1x1_pool.h)
          Bf16Conv::block<kCv, kPx, true>(in, j.w_pairs, C2, acc,
                                          reinterpret_cast<const char*>(xs + (p + kClAhead * kPx) * C));
        } else {
          Bf16Conv::block<kCv, kPx>(in, j.w_pairs + cob * C2 * kCoCl, C2, acc);
        }
        store_cl_block<Avx512, kCv, kPx>(j, acc, cob, p, np, y);
      }
    }
    for (int64_t c = 0; c < C; ++c) part[c] *= j.inv_hw;
  }
}

// dW of the NCHW pass for bf16 x and bf16-representable dy (the launcher checks): every
// product is exact, so this is the fp32 dW up to summation order. acc[r][c] (kGR rows of dy x
// kGC rows of x) gains a pixel pair per lane per vdpbf16ps, 32 pixels a vector, read from x in
// place (the last vector masked); dy is packed to bf16 pairs once per task. db as the fp32 path
// sums it (the same bits).
void grad_weight_nchw(const Conv1x1GradJob& j, const Bf16* x, int64_t begin, int64_t end) {
  constexpr int kR = Avx512::kGR, kC = Avx512::kGC, kP2 = 2 * kL;
  static_assert(kR * kC == kL, "one block of accumulators is summed as one vector of lane sums");
  const int64_t C = j.C, HW = j.HW, Cr = j.Cr;
  const int64_t wpad = (j.wchunk_px + kP2 - 1) / kP2 * kP2;
  std::vector<uint32_t> dybuf(Cr * wpad / 2);  // dy rows as bf16 pixel pairs, zero-padded
  for (int64_t task = begin; task < end; ++task) {
    const GradWeightRange t = grad_weight_range(j, task);
    const int64_t np = t.p1 - t.p0, nv = (np + kP2 - 1) / kP2, nc = t.g1 - t.g0;
    const Bf16* xn = x + t.n * C * HW + t.p0;
    const float* dyn = j.dy + t.n * Cr * HW + t.p0;
    const auto tail = static_cast<__mmask32>(np % kP2 == 0 ? ~0u : (1u << (np % kP2)) - 1u);
    for (int64_t r = 0; r < Cr; ++r) {
      for (int64_t v = 0; v < nv; ++v) {
        const float* src = dyn + r * HW + v * kP2;
        const __m512 lo = _mm512_maskz_loadu_ps(first_lanes(np - v * kP2), src);
        const __m512 hi = _mm512_maskz_loadu_ps(first_lanes(np - v * kP2 - kL), src + kL);
        _mm512_storeu_si512(dybuf.data() + (r * wpad + v * kP2) / 2, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    }
    float* dw = j.dw_part + (t.n * j.wchunks + t.k) * Cr * C;
    for (int64_t c0 = 0; c0 < nc; c0 += kC) {
      const Bf16* xr[kC];
      for (int c = 0; c < kC; ++c) xr[c] = xn + (t.g0 + std::min<int64_t>(c0 + c, nc - 1)) * HW;  // past nc: discarded
      for (int64_t r0 = 0; r0 < Cr; r0 += kR) {
        const uint32_t* dr[kR];
        for (int r = 0; r < kR; ++r) dr[r] = dybuf.data() + std::min<int64_t>(r0 + r, Cr - 1) * wpad / 2;
        V a[kR][kC] = {};
        for (int64_t v = 0; v < nv; ++v) {
          const __mmask32 m = v + 1 == nv ? tail : ~0u;
          __m512i dv[kR];
#pragma GCC unroll 8
          for (int r = 0; r < kR; ++r) dv[r] = _mm512_loadu_si512(dr[r] + v * kL);
#pragma GCC unroll 8
          for (int c = 0; c < kC; ++c) {
            // x rows are HW apart: too many streams for the hardware prefetcher (as in the forward).
            if (r0 == 0) __builtin_prefetch(xr[c] + v * kP2 + 256);
            const __m512i xv = _mm512_maskz_loadu_epi16(m, xr[c] + v * kP2);
#pragma GCC unroll 8
            for (int r = 0; r < kR; ++r) a[r][c] = dot2(a[r][c], dv[r], xv);
          }
        }
        V acc[kR * kC];
        for (int r = 0; r < kR; ++r)
          for (int c = 0; c < kC; ++c) acc[r * kC + c] = a[r][c];
        float sums[kL];
        vstore<V>(sums, lane_sums<V>(acc));  // sums[r * kC + c] is the sum of a[r][c]
        for (int64_t r = 0; r < std::min<int64_t>(kR, Cr - r0); ++r)
          for (int64_t c = 0; c < std::min<int64_t>(kC, nc - c0); ++c)
            dw[(r0 + r) * C + t.g0 + c0 + c] = sums[r * kC + c];
      }
    }
    if (t.g0 == 0) {  // db, once per chunk, as grad_weight_tasks sums it: 16-pixel vectors, then lanes
      float* db = j.db_part + t.n * j.wchunks * Cr + t.k * Cr;
      const int64_t nv16 = (np + kL - 1) / kL;
      for (int64_t r = 0; r < Cr; ++r) {
        V s{};
        for (int64_t v = 0; v < nv16; ++v)
          s += (V)_mm512_maskz_loadu_ps(first_lanes(np - v * kL), dyn + r * HW + v * kL);
        db[r] = lane_sum(s);
      }
    }
  }
}

// v rounded to bf16 as vst rounds it (bf16_bits: the fp32 path's bits), the lanes in m stored at p.
BAM_INLINE void store_bf16(Bf16* p, V v, __mmask16 m) {
  const U16<V> h = bf16_bits<V>(v);
  __m256i bits;
  std::memcpy(&bits, &h, sizeof(bits));
  _mm256_mask_storeu_epi16(p, m, bits);
}

// dx of channels_last bf16 x, dx += W^T dy + dm, for bf16-representable dy and W (the launcher
// checks): every product is exact, so this is the fp32 path up to summation order (and
// denormal dy or W, read as zero). Bf16Conv::block with dy as the input: each pixel's dy in
// channel pairs (packed to bf16 once per tile), W^T in pairs (wt, pack_weight_pairs of W^T).
template <int kCv>
void grad_input_cl(const Conv1x1GradJob& j, const uint32_t* wt, Bf16* dx, int64_t begin, int64_t end) {
  constexpr int kPx = Avx512::kAcc / kCv, kCoCl = kCv * kL;
  const int64_t C = j.C, HW = j.HW, Cr = j.Cr, R2 = (Cr + 1) / 2, cob_n = (C + kCoCl - 1) / kCoCl;
  std::vector<uint32_t> dyb(kPx * R2);  // the tile's dy as pairs; zeros past Cr and past np
  for (int64_t task = begin; task < end; ++task) {
    const ChunkRange r = chunk_range(j, task);
    const float* dy = j.dy + r.n * HW * Cr;
    Bf16* dxn = dx + r.n * HW * C;
    const float* dm = j.dm + r.n * C;
    for (int64_t p = r.p0; p < r.p1; p += kPx) {
      const int64_t np = std::min<int64_t>(kPx, r.p1 - p);
      for (int64_t i = 0; i < kPx; ++i) {
        const float* src = dy + (p + i) * Cr;
        for (int64_t c = 0; c < 2 * R2; c += 2 * kL) {  // 32 channels -> 16 pairs
          const int64_t left = i < np ? Cr - c : 0;
          const __m512 lo = _mm512_maskz_loadu_ps(first_lanes(left), src + c);
          const __m512 hi = _mm512_maskz_loadu_ps(first_lanes(left - kL), src + c + kL);
          _mm512_mask_storeu_epi32(dyb.data() + i * R2 + c / 2, first_lanes(R2 - c / 2),
                                   (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
      }
      for (int64_t cob = 0; cob < cob_n; ++cob) {
        const int64_t c0 = cob * kCoCl;
        // Two tiles ahead, as the fp32 path: the loads of dx stall on memory without it.
        for (int i = 0; i < kPx; ++i)
#pragma GCC unroll 4
          for (int c = 0; c < kCoCl; c += 32) __builtin_prefetch(dxn + (p + 2 * kPx + i) * C + c0 + c, 1);
        V acc[kPx][kCv];
        for (int v = 0; v < kCv; ++v) {
          const __mmask16 m = first_lanes(C - c0 - v * kL);
          const V d = (V)_mm512_maskz_loadu_ps(m, dm + c0 + v * kL);
          for (int i = 0; i < kPx; ++i) {
            const Bf16* src = dxn + (p + std::min<int64_t>(i, np - 1)) * C + c0 + v * kL;  // past np: discarded
            acc[i][v] = as_fp32(widen(src, m)) + d;
          }
        }
        Bf16Conv::block<kCv, kPx>([&](int i, int64_t r2) { return dyb[i * R2 + r2]; }, wt + cob * R2 * kCoCl, R2, acc);
        for (int64_t i = 0; i < np; ++i)
          for (int v = 0; v < kCv; ++v)
            store_bf16(dxn + (p + i) * C + c0 + v * kL, acc[i][v], first_lanes(C - c0 - v * kL));
      }
    }
  }
}

// dx of one NCHW tile (np pixels from p, kPV vectors of them), as grad_input_cl but with pixels
// in lanes (the roles of the NCHW pass's dot_tile): dy as pairs over r per pixel (bf16 values,
// so the high halves of their fp32 bits are exact), W^T pairs broadcast, dx read and rounded as
// the fp32 path does.
template <int kPV>
BAM_INLINE void grad_input_tile(const Conv1x1GradJob& j, const uint32_t* wt, const float* dy, Bf16* dx,
                                const float* dm, int64_t p, int64_t np, uint32_t* pairs) {
  const int64_t C = j.C, HW = j.HW, Cr = j.Cr, R2 = (Cr + 1) / 2;
  __mmask16 mask[kPV];
  for (int v = 0; v < kPV; ++v) mask[v] = first_lanes(np - v * kL);
  for (int64_t r2 = 0; r2 < R2; ++r2) {
    const float* lo_row = dy + 2 * r2 * HW + p;
    const bool pair = 2 * r2 + 1 < Cr;
    for (int v = 0; v < kPV; ++v) {
      const __m512 lo = _mm512_maskz_loadu_ps(mask[v], lo_row + v * kL);
      const __m512 hi = pair ? _mm512_maskz_loadu_ps(mask[v], lo_row + HW + v * kL) : _mm512_setzero_ps();
      _mm512_storeu_si512(pairs + (r2 * kPV + v) * kL, pair_high_halves(lo, hi));
    }
  }
  for (int64_t c0 = 0; c0 < C; c0 += kCo) {
    const int64_t nc = std::min<int64_t>(kCo, C - c0);
    // acc through constant indices only (o < nc inside): a run-time bound kept it in memory,
    // stored at every step of dot_pairs.
    V acc[kCo][kPV] = {};
#pragma GCC unroll 16
    for (int o = 0; o < kCo; ++o) {
      if (o >= nc) continue;  // rows past C: zero weights, discarded
      const Bf16* row = dx + (c0 + o) * HW + p;
      // Rows are HW apart: too many streams for the hardware prefetcher (as in the fp32 path).
      for (int l = 0; l < kPV * kL; l += 32) __builtin_prefetch(row + 2 * kPV * kL + l, 1);
      const V d = _mm512_set1_ps(dm[c0 + o]);
#pragma GCC unroll 4
      for (int v = 0; v < kPV; ++v) acc[o][v] = as_fp32(widen(row + v * kL, mask[v])) + d;
    }
    dot_pairs<kPV>(pairs, wt + c0 * R2, R2, acc);  // block c0 / kCo of (blocks, R2, kCo)
#pragma GCC unroll 16
    for (int o = 0; o < kCo; ++o) {
      if (o >= nc) continue;
#pragma GCC unroll 4
      for (int v = 0; v < kPV; ++v) store_bf16(dx + (c0 + o) * HW + p + v * kL, acc[o][v], mask[v]);
    }
  }
}

void grad_input_nchw(const Conv1x1GradJob& j, const uint32_t* wt, Bf16* dx, int64_t begin, int64_t end) {
  constexpr int kP = Avx512::kPV * kL;
  std::vector<uint32_t> pairs((j.Cr + 1) / 2 * kP);
  for (int64_t task = begin; task < end; ++task) {
    const ChunkRange r = chunk_range(j, task);
    const float* dy = j.dy + r.n * j.Cr * j.HW;
    Bf16* dxn = dx + r.n * j.C * j.HW;
    for (int64_t p = r.p0; p < r.p1; p += kP) {
      const int64_t np = std::min<int64_t>(kP, r.p1 - p);
      with_tile_vectors<Avx512>((np + kL - 1) / kL, [&]<int kPV>() {
        grad_input_tile<kPV>(j, wt, dy, dxn, j.dm + r.n * j.C, p, np, pairs.data());
      });
    }
  }
}

// dW of channels_last bf16 x for bf16-representable dy, as grad_weight_nchw: exact products, fp32
// sums in another order. Pixels go in pairs (p, p + 1), as the instruction takes them: the task's
// x and dy are interleaved into pixel pairs once (xp: pair q's channel c at q * ncp + c; dyp: pair
// q's dy row r at q * Cr + r), then acc[r][v] (kWR rows of dy x kWCv channel vectors) gains one
// pixel pair per vdpbf16ps. db as the fp32 path sums it (the same bits).
void grad_weight_cl(const Conv1x1GradJob& j, const Bf16* x, int64_t begin, int64_t end) {
  constexpr int kR = Avx512::kWR, kCv = Avx512::kWCv, kCoW = kCv * kL;
  static_assert(kGradGroupC % kCoW == 0, "a channel group must hold whole blocks");
  const int64_t C = j.C, HW = j.HW, Cr = j.Cr;
  const int64_t max_pairs = (j.wchunk_px + 1) / 2;
  std::vector<uint32_t> xp(max_pairs * kGradGroupC), dyp(max_pairs * Cr);
  for (int64_t task = begin; task < end; ++task) {
    const GradWeightRange t = grad_weight_range(j, task);
    const int64_t np = t.p1 - t.p0, nq = (np + 1) / 2, nc = t.g1 - t.g0, ncp = (nc + kCoW - 1) / kCoW * kCoW;
    const Bf16* xn = x + t.n * HW * C + t.p0 * C + t.g0;
    const float* dyn = j.dy + t.n * HW * Cr + t.p0 * Cr;
    for (int64_t q = 0; q < nq; ++q) {
      const bool pair = 2 * q + 1 < np;  // else the partner is zero
      for (int64_t c = 0; c < ncp; c += kL) {
        const __mmask16 m = first_lanes(nc - c);
        const __m512i lo = widen(xn + 2 * q * C + c, m);
        const __m512i hi = pair ? widen(xn + (2 * q + 1) * C + c, m) : _mm512_setzero_si512();
        _mm512_storeu_si512(xp.data() + q * ncp + c, pair_low_halves(lo, hi));
      }
      for (int64_t r = 0; r < Cr; r += kL) {  // dy holds bf16 values: the high halves are exact
        const __mmask16 m = first_lanes(Cr - r);
        const __m512 lo = _mm512_maskz_loadu_ps(m, dyn + 2 * q * Cr + r);
        const __m512 hi = pair ? _mm512_maskz_loadu_ps(m, dyn + (2 * q + 1) * Cr + r) : _mm512_setzero_ps();
        _mm512_mask_storeu_epi32(dyp.data() + q * Cr + r, m, pair_high_halves(lo, hi));
      }
    }
    float* dw = j.dw_part + (t.n * j.wchunks + t.k) * Cr * C;
    for (int64_t c0 = 0; c0 < ncp; c0 += kCoW) {
      for (int64_t r0 = 0; r0 < Cr; r0 += kR) {
        int64_t rr[kR];
        for (int r = 0; r < kR; ++r) rr[r] = std::min<int64_t>(r0 + r, Cr - 1);  // past Cr: discarded
        V acc[kR][kCv] = {};
        for (int64_t q = 0; q < nq; ++q) {
          __m512i xv[kCv];
#pragma GCC unroll 4
          for (int v = 0; v < kCv; ++v) xv[v] = _mm512_loadu_si512(xp.data() + q * ncp + c0 + v * kL);
          const uint32_t* dq = dyp.data() + q * Cr;
#pragma GCC unroll 8
          for (int r = 0; r < kR; ++r) {
            const __m512i db = _mm512_set1_epi32(static_cast<int>(dq[rr[r]]));
#pragma GCC unroll 4
            for (int v = 0; v < kCv; ++v) acc[r][v] = dot2(acc[r][v], db, xv[v]);
          }
        }
        // Out through constant indices: a run-time index into acc kept it in memory, stored
        // at every step of the loop above (0.72 against 0.53 ms for fp32 at 14x14).
        float out[kR][kCoW];
        for (int r = 0; r < kR; ++r)
          for (int v = 0; v < kCv; ++v) vstore<V>(out[r] + v * kL, acc[r][v]);
        const int64_t ncb = std::min<int64_t>(kCoW, nc - c0);
        for (int64_t r = 0; r < std::min<int64_t>(kR, Cr - r0); ++r)
          std::memcpy(dw + (r0 + r) * C + t.g0 + c0, out[r], ncb * sizeof(float));
      }
    }
    if (t.g0 == 0) {  // db, once per chunk: pixel by pixel in a fixed order, as grad_weight_cl_tasks
      float* db = j.db_part + t.n * j.wchunks * Cr + t.k * Cr;
      std::fill(db, db + Cr, 0.f);
      for (int64_t i = 0; i < np; ++i)
        for (int64_t r = 0; r < Cr; ++r) db[r] += dyn[i * Cr + r];
    }
  }
}

}  // namespace

void conv1x1_grad_weight_avx512bf16(const Conv1x1GradJob& j, bool cl, const Bf16* x, int64_t begin, int64_t end) {
  cl ? grad_weight_cl(j, x, begin, end) : grad_weight_nchw(j, x, begin, end);
}

void conv1x1_grad_input_avx512bf16(const Conv1x1GradJob& j, bool cl, const uint32_t* wt, Bf16* dx, int64_t begin,
                                   int64_t end) {
  if (!cl) return grad_input_nchw(j, wt, dx, begin, end);
  if (j.cl_vectors == 4) return grad_input_cl<4>(j, wt, dx, begin, end);
  if (j.cl_vectors == 2) return grad_input_cl<2>(j, wt, dx, begin, end);
  grad_input_cl<1>(j, wt, dx, begin, end);
}

void conv1x1_pool_avx512bf16(const Conv1x1PoolJob& j, const Bf16* x, int64_t begin, int64_t end) {
  pass_nchw(j, x, begin, end);
}

void conv1x1_pool_cl_avx512bf16(const Conv1x1PoolJob& j, const Bf16* x, int64_t begin, int64_t end) {
  if (j.cl_vectors == 4) return pass_cl<4>(j, x, begin, end);
  if (j.cl_vectors == 2) return pass_cl<2>(j, x, begin, end);
  pass_cl<1>(j, x, begin, end);
}

void dilated_conv_avx512bf16(const DilatedConvJob& j, int64_t begin, int64_t end) {
  dilated_conv_any<Avx512, Bf16Conv, true>(j, begin, end);
}

}  // namespace bam_fused

BAM_TARGET_END
#endif
