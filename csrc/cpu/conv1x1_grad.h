// The backward of the CPU pass over x, torch-free: for y = W x + b per pixel (the 1x1 reduce
// conv of training mode) and the pooled means m = mean(x), given dy and dm,
//   dx += W^T dy + dm / HW   (in place, on the gate's dx: no separate gradient to add)
//   dW  = sum over pixels of dy x^T,   db = sum over pixels of dy.
// Both are small GEMMs over all pixels; each runs over its own big tensor (dx: dx and dy;
// dW: x and dy), so they are two passes, each reading its tensor once.
//
// dx reuses the forward's register tiles with the roles swapped (dy is the input, W^T the
// weights, C the outputs). dW has a chunk of pixels x a block of channels per task and writes
// one partial (Cr, C) per (sample, chunk), summed in a fixed order afterwards: results do not
// depend on the thread count.
//
// Included by the per-instruction-set files under their target options, like conv1x1_pool.h
// (same traits K, plus the dW blocking: NCHW kGR rows of dy x kGC rows of x, kGR x kGC = lanes;
// channels_last kWR rows of dy x kWCv vectors of channels).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "conv1x1_pool.h"
#include "simd.h"

namespace bam_fused {

// Pixels per dW task (a multiple of kChunkQuantum): long chunks amortise the lane sums of NCHW.
constexpr int64_t kGradChunkPx = 1152;
// Channels per dW task: a multiple of every blocking below (kGC, kWCv x lanes).
constexpr int64_t kGradGroupC = 192;

struct Conv1x1GradJob {
  int64_t C, HW, Cr;
  int64_t chunk_px, chunks;      // dx tasks: the forward's chunking (chunk_range)
  int64_t wchunk_px, wchunks;    // dW tasks: pixels per chunk, chunks per sample
  int64_t groups;                // dW tasks: ceil(C / kGradGroupC) channel groups per chunk
  const float* wt;    // packed W^T: (ceil(C / kCo), Cr, kCo), zero rows past C (channels_last: kCo =
                      // cl_vectors * lanes)
  const float* dy;    // (N, Cr, HW), or (N, HW, Cr) for channels_last x
  const float* dm;    // (N, C): d mean / HW
  float* dw_part;     // (N * wchunks, Cr, C)
  float* db_part;     // (N * wchunks, Cr)
  int cl_vectors;
};

#define BAM_DECLARE_CONV1X1_GRAD(ISA)                                                                        \
  void conv1x1_grad_input_##ISA(const Conv1x1GradJob& j, bool cl, float* dx, int64_t begin, int64_t end);  \
  void conv1x1_grad_input_##ISA(const Conv1x1GradJob& j, bool cl, Bf16* dx, int64_t begin, int64_t end);   \
  void conv1x1_grad_input_##ISA(const Conv1x1GradJob& j, bool cl, Fp16* dx, int64_t begin, int64_t end);   \
  void conv1x1_grad_weight_##ISA(const Conv1x1GradJob& j, bool cl, const float* x, int64_t begin,           \
                                 int64_t end);                                                             \
  void conv1x1_grad_weight_##ISA(const Conv1x1GradJob& j, bool cl, const Bf16* x, int64_t begin,            \
                                 int64_t end);                                                             \
  void conv1x1_grad_weight_##ISA(const Conv1x1GradJob& j, bool cl, const Fp16* x, int64_t begin,            \
                                 int64_t end);
BAM_DECLARE_CONV1X1_GRAD(avx512)
BAM_DECLARE_CONV1X1_GRAD(avx2)
BAM_DECLARE_CONV1X1_GRAD(generic)
// dW of bf16 x with bf16-representable dy, in exact bf16 products (conv1x1_pool_avx512bf16.cpp).
void conv1x1_grad_weight_avx512bf16(const Conv1x1GradJob& j, bool cl, const Bf16* x, int64_t begin, int64_t end);
// dx of bf16 x with bf16-representable dy and W, in exact bf16 products; wt: W^T in channel
// pairs, packed (ceil(C / kCo), ceil(Cr / 2), kCo) for the avx512 blocking (channels_last: kCo =
// cl_vectors * 16).
void conv1x1_grad_input_avx512bf16(const Conv1x1GradJob& j, bool cl, const uint32_t* wt, Bf16* dx, int64_t begin,
                                   int64_t end);

namespace {  // NOLINT: internal linkage on purpose (see conv1x1_pool.h)

// One vector of T from/to memory, in fp32: bfloat16 in vector integer code (simd.h's rounding:
// nearest-even, NaN -> 0x7FC0), half through small loops.
template <typename V>
struct IntVec {  // integer vectors with V's lane count
  typedef uint32_t U32 __attribute__((vector_size(sizeof(V))));
  typedef uint16_t U16 __attribute__((vector_size(sizeof(V) / 2)));
};
template <typename V>
using U32 = typename IntVec<V>::U32;
template <typename V>
using U16 = typename IntVec<V>::U16;

template <typename V, typename T>
BAM_INLINE V vld(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return vload<V>(p);
  } else if constexpr (std::is_same_v<T, Bf16>) {
    U16<V> h;
    std::memcpy(&h, p, sizeof(h));
    const U32<V> u = __builtin_convertvector(h, U32<V>) << 16;
    V v;
    std::memcpy(&v, &u, sizeof(v));
    return v;
  } else {
    constexpr int kL = sizeof(V) / sizeof(float);
    float t[kL];
    for (int l = 0; l < kL; ++l) t[l] = ld(p + l);
    return vload<V>(t);
  }
}
// v's lanes as bfloat16 bits, rounded as simd.h's st rounds them (nearest even, NaN -> 0x7FC0).
template <typename V>
BAM_INLINE U16<V> bf16_bits(V v) {
  U32<V> u;
  std::memcpy(&u, &v, sizeof(u));
  const U32<V> rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const U32<V> bits = v != v ? U32<V>{} + 0x7FC0u : rounded;
  return __builtin_convertvector(bits, U16<V>);
}

template <typename V, typename T>
BAM_INLINE void vst(T* p, V v) {
  if constexpr (std::is_same_v<T, float>) {
    vstore<V>(p, v);
  } else if constexpr (std::is_same_v<T, Bf16>) {
    const U16<V> h = bf16_bits<V>(v);
    std::memcpy(p, &h, sizeof(h));
  } else {
    constexpr int kL = sizeof(V) / sizeof(float);
    float t[kL];
    vstore<V>(t, v);
    for (int l = 0; l < kL; ++l) st(p + l, t[l]);
  }
}

// ---- dx, NCHW: rows of C x chunk pixels; acc[o][v] starts from dx + dm and gains W^T dy.
template <typename K, int kPV, typename T>
BAM_INLINE void grad_input_tile(const Conv1x1GradJob& j, const float* dyt, int64_t dys, T* dx, const float* dm,
                                int64_t p, int64_t np) {
  using V = typename K::V;
  constexpr int kL = kLanes<K>, kW = kPV * kL;
  const int64_t C = j.C, HW = j.HW, cob_n = (C + K::kCo - 1) / K::kCo;
  for (int64_t cob = 0; cob < cob_n; ++cob) {
    const int64_t c0 = cob * K::kCo, nc = std::min<int64_t>(K::kCo, C - c0);
    if (np == kW && nc == K::kCo) {  // whole tile: dx's vectors directly
      V acc[K::kCo][kPV];
      for (int o = 0; o < K::kCo; ++o) {
        const T* row = dx + (c0 + o) * HW + p;
        // Rows are HW apart: too many streams for the hardware prefetcher (as in the forward).
        constexpr int kLine = 64 / sizeof(T);
#pragma GCC unroll 8
        for (int l = 0; l < kW; l += kLine) __builtin_prefetch(row + 2 * kW + l, 1);
        const V d = K::splat(dm[c0 + o]);
        for (int v = 0; v < kPV; ++v) acc[o][v] = vld<V>(row + v * kL) + d;
      }
      conv_tile<K, kPV, false>(dyt, dys, j.Cr, j.wt + cob * j.Cr * K::kCo, nullptr, acc);
      for (int o = 0; o < K::kCo; ++o)
        for (int v = 0; v < kPV; ++v) vst<V>(dx + (c0 + o) * HW + p + v * kL, acc[o][v]);
      continue;
    }
    float io[K::kCo][kW];
    for (int64_t o = 0; o < K::kCo; ++o) {
      if (o < nc) {
        const T* src = dx + (c0 + o) * HW + p;
        const float d = dm[c0 + o];
        if (np == kW) {
#pragma GCC unroll 4
          for (int i = 0; i < kW; ++i) io[o][i] = ld(src + i) + d;
        } else {
          for (int64_t i = 0; i < np; ++i) io[o][i] = ld(src + i) + d;
          std::fill(io[o] + np, io[o] + kW, 0.f);
        }
      } else {
        std::fill(io[o], io[o] + kW, 0.f);
      }
    }
    V acc[K::kCo][kPV];
    for (int o = 0; o < K::kCo; ++o)
      for (int v = 0; v < kPV; ++v) acc[o][v] = vload<V>(io[o] + v * kL);
    conv_tile<K, kPV, false>(dyt, dys, j.Cr, j.wt + cob * j.Cr * K::kCo, nullptr, acc);
    for (int o = 0; o < K::kCo; ++o)
      for (int v = 0; v < kPV; ++v) vstore<V>(io[o] + v * kL, acc[o][v]);
    for (int64_t o = 0; o < nc; ++o) {
      T* dst = dx + (c0 + o) * HW + p;
      if (np == kW) {
#pragma GCC unroll 4
        for (int i = 0; i < kW; ++i) st(dst + i, io[o][i]);
      } else {
        for (int64_t i = 0; i < np; ++i) st(dst + i, io[o][i]);
      }
    }
  }
}

template <typename K, typename T>
BAM_INLINE void grad_input_tasks(const Conv1x1GradJob& j, T* dx, int64_t begin, int64_t end) {
  constexpr int kP = kTilePx<K>, kL = kLanes<K>;
  const int64_t C = j.C, HW = j.HW, Cr = j.Cr;
  std::vector<float> buf(Cr * kP);  // a last, partial tile of dy, zero-padded
  for (int64_t task = begin; task < end; ++task) {
    const auto [n, p0, p1] = chunk_range(j, task);
    const float* dy = j.dy + n * Cr * HW;
    T* dxn = dx + n * C * HW;
    const float* dm = j.dm + n * C;
    for (int64_t p = p0; p < p1; p += kP) {
      const int64_t np = std::min<int64_t>(kP, p1 - p);
      const float* dyt = dy + p;
      int64_t dys = HW;
      if (np < kP) {
        for (int64_t r = 0; r < Cr; ++r) {
          std::copy(dy + r * HW + p, dy + r * HW + p + np, buf.data() + r * kP);
          std::fill(buf.data() + r * kP + np, buf.data() + (r + 1) * kP, 0.f);
        }
        dyt = buf.data(), dys = kP;
      }
      with_tile_vectors<K>((np + kL - 1) / kL,
                           [&]<int kPV>() { grad_input_tile<K, kPV>(j, dyt, dys, dxn, dm, p, np); });
    }
  }
}

// ---- dx, channels_last: pixels x channel vectors; acc[i][v] += dy[pixel i][r] * W^T[r][v]
// (cl_block of conv1x1_pool.h, dy as the input).
template <typename K, int kCv, typename T>
BAM_INLINE void grad_input_cl_tasks(const Conv1x1GradJob& j, T* dx, int64_t begin, int64_t end) {
  using V = typename K::V;
  constexpr int kL = kLanes<K>, kPx = K::kAcc / kCv, kCo = kCv * kL;
  const int64_t C = j.C, HW = j.HW, Cr = j.Cr, cob_n = (C + kCo - 1) / kCo;
  for (int64_t task = begin; task < end; ++task) {
    const auto [n, p0, p1] = chunk_range(j, task);
    const float* dy = j.dy + n * HW * Cr;
    T* dxn = dx + n * HW * C;
    const float* dm = j.dm + n * C;
    for (int64_t p = p0; p < p1; p += kPx) {
      const int64_t np = std::min<int64_t>(kPx, p1 - p);
      const float* di[kPx];
      for (int i = 0; i < kPx; ++i) di[i] = dy + (p + std::min<int64_t>(i, np - 1)) * Cr;  // past np: discarded
      for (int64_t cob = 0; cob < cob_n; ++cob) {
        const int64_t c0 = cob * kCo, nc = std::min<int64_t>(kCo, C - c0);
        const float* w = j.wt + cob * Cr * kCo;
        if (np == kPx && nc == kCo) {  // whole tile: dx's vectors directly
          V acc[kPx][kCv];
          // Two tiles ahead: the loads of dx stalled on memory without it.
          constexpr int kLine = 64 / sizeof(T);
          for (int i = 0; i < kPx; ++i)
#pragma GCC unroll 8
            for (int c = 0; c < kCo; c += kLine) __builtin_prefetch(dxn + (p + 2 * kPx + i) * C + c0 + c, 1);
          for (int v = 0; v < kCv; ++v) {
            const V d = vload<V>(dm + c0 + v * kL);
            for (int i = 0; i < kPx; ++i) acc[i][v] = vld<V>(dxn + (p + i) * C + c0 + v * kL) + d;
          }
          cl_block<K, kCv, kPx>([&](int i, int64_t r) { return di[i][r]; }, w, Cr, acc);
          for (int i = 0; i < kPx; ++i)
            for (int v = 0; v < kCv; ++v) vst<V>(dxn + (p + i) * C + c0 + v * kL, acc[i][v]);
          continue;
        }
        float io[kPx][kCo] = {};
        for (int64_t i = 0; i < np; ++i) {
          const T* src = dxn + (p + i) * C + c0;
          if (nc == kCo) {
#pragma GCC unroll 4
            for (int c = 0; c < kCo; ++c) io[i][c] = ld(src + c) + dm[c0 + c];
          } else {
            for (int64_t c = 0; c < nc; ++c) io[i][c] = ld(src + c) + dm[c0 + c];
          }
        }
        V acc[kPx][kCv];
        for (int i = 0; i < kPx; ++i)
          for (int v = 0; v < kCv; ++v) acc[i][v] = vload<V>(io[i] + v * kL);
        cl_block<K, kCv, kPx>([&](int i, int64_t r) { return di[i][r]; }, w, Cr, acc);
        for (int i = 0; i < kPx; ++i)
          for (int v = 0; v < kCv; ++v) vstore<V>(io[i] + v * kL, acc[i][v]);
        for (int64_t i = 0; i < np; ++i) {
          T* dst = dxn + (p + i) * C + c0;
          if (nc == kCo) {
#pragma GCC unroll 4
            for (int c = 0; c < kCo; ++c) st(dst + c, io[i][c]);
          } else {
            for (int64_t c = 0; c < nc; ++c) st(dst + c, io[i][c]);
          }
        }
      }
    }
  }
}

// dW task `task`: sample n, dW chunk k, channel group [g0, g1); pixels [p0, p1).
struct GradWeightRange {
  int64_t n, k, g0, g1, p0, p1;
};
BAM_INLINE GradWeightRange grad_weight_range(const Conv1x1GradJob& j, int64_t task) {
  const int64_t g = task % j.groups, nk = task / j.groups, k = nk % j.wchunks, n = nk / j.wchunks;
  const int64_t p0 = k * j.wchunk_px;
  return {n, k, g * kGradGroupC, std::min(j.C, (g + 1) * kGradGroupC), p0, std::min(j.HW, p0 + j.wchunk_px)};
}

// Lane sums of kL accumulators at once: a tree of shuffles and adds, kL - 1 of each pair of
// shuffles and an add, where summing each one's lanes would take kL - 1 dependent adds. Level
// by level, pairs of vectors that each hold L / B partial sums B lanes wide become one vector
// holding 2L / B sums B / 2 lanes wide, in order; lane i of the result is the sum of a[i].
template <int L, int B, int kHalf>
constexpr int fold_lane(int t) {
  const int h = B / 2, q = t / h, w = t % h, nb = L / B;
  return q < nb ? q * B + kHalf * h + w : L + (q - nb) * B + kHalf * h + w;
}
// Lanes I... of the concatenation (x, y). __builtin_shufflevector is clang's and GCC >= 12's;
// older GCC has __builtin_shuffle with a mask vector.
template <typename V, int... I>
BAM_INLINE V shuffle2(V x, V y) {
#if defined(__clang__) || __GNUC__ >= 12
  return V(__builtin_shufflevector(x, y, I...));
#else
  typedef int32_t Mask __attribute__((vector_size(sizeof(V))));
  return __builtin_shuffle(x, y, Mask{I...});
#endif
}
template <typename V, int L, int B, size_t... T>
BAM_INLINE V fold_pair(V x, V y, std::index_sequence<T...>) {
  return shuffle2<V, fold_lane<L, B, 0>(T)...>(x, y) + shuffle2<V, fold_lane<L, B, 1>(T)...>(x, y);
}
template <typename V, int L, int B>
BAM_INLINE V fold_all(V* a) {
  for (int i = 0; i < B / 2; ++i) a[i] = fold_pair<V, L, B>(a[2 * i], a[2 * i + 1], std::make_index_sequence<L>{});
  if constexpr (B > 2) {
    return fold_all<V, L, B / 2>(a);
  } else {
    return a[0];
  }
}
template <typename V>
BAM_INLINE V lane_sums(V* a) {  // a: kL vectors, overwritten
  constexpr int kL = sizeof(V) / sizeof(float);
  if constexpr (kL == 1) {
    return a[0];
  } else {
    return fold_all<V, kL, kL>(a);
  }
}

template <typename V>
BAM_INLINE float lane_sum(V v) {
  constexpr int kL = sizeof(V) / sizeof(float);
  float l[kL];
  std::memcpy(l, &v, sizeof(V));
  float s = 0.f;
  for (int i = 0; i < kL; ++i) s += l[i];
  return s;
}

// ---- dW, NCHW: acc[r][c] (kGR rows of dy x kGC rows of x) lane-wise over the chunk's pixel
// vectors, then summed over lanes. The chunk's x rows (and dy rows) are staged as fp32,
// zero-padded to whole vectors, where they are not already.
template <typename K, typename T>
BAM_INLINE void grad_weight_tasks(const Conv1x1GradJob& j, const T* x, int64_t begin, int64_t end) {
  using V = typename K::V;
  constexpr int kL = kLanes<K>, kR = K::kGR, kC = K::kGC;
  static_assert(kGradGroupC % kC == 0, "a channel group must hold whole blocks");
  static_assert(kR * kC == kL, "one block of accumulators is summed as one vector of lane sums");
  const int64_t C = j.C, HW = j.HW, Cr = j.Cr;
  const int64_t wpad = (j.wchunk_px + kL - 1) / kL * kL;
  std::vector<float> xbuf(kGradGroupC * wpad), dybuf(Cr * wpad);
  for (int64_t task = begin; task < end; ++task) {
    const GradWeightRange t = grad_weight_range(j, task);
    const int64_t np = t.p1 - t.p0, nv = (np + kL - 1) / kL, nc = t.g1 - t.g0;
    const T* xn = x + t.n * C * HW;
    const float* dyn = j.dy + t.n * Cr * HW;
    const float* xs = nullptr;
    const float* dys = dyn + t.p0;
    int64_t xstride = HW, dystride = HW;
    if constexpr (std::is_same_v<T, float>) {
      if (np % kL == 0) xs = xn + t.g0 * HW + t.p0;
    }
    if (xs == nullptr) {
      for (int64_t c = 0; c < nc; ++c) {
        const T* src = xn + (t.g0 + c) * HW + t.p0;
        float* dst = xbuf.data() + c * wpad;
        for (int64_t i = 0; i < np; ++i) dst[i] = ld(src + i);
        std::fill(dst + np, dst + nv * kL, 0.f);
      }
      xs = xbuf.data(), xstride = wpad;
    }
    if (np % kL != 0) {
      for (int64_t r = 0; r < Cr; ++r) {
        std::copy(dyn + r * HW + t.p0, dyn + r * HW + t.p1, dybuf.data() + r * wpad);
        std::fill(dybuf.data() + r * wpad + np, dybuf.data() + r * wpad + nv * kL, 0.f);
      }
      dys = dybuf.data(), dystride = wpad;
    }
    float* dw = j.dw_part + (t.n * j.wchunks + t.k) * Cr * C;
    for (int64_t c0 = 0; c0 < nc; c0 += kC) {
      const float* xr[kC];
      for (int c = 0; c < kC; ++c) xr[c] = xs + std::min<int64_t>(c0 + c, nc - 1) * xstride;  // past nc: discarded
      for (int64_t r0 = 0; r0 < Cr; r0 += kR) {
        const float* dr[kR];
        for (int r = 0; r < kR; ++r) dr[r] = dys + std::min<int64_t>(r0 + r, Cr - 1) * dystride;
        V acc[kR][kC] = {};
        for (int64_t v = 0; v < nv; ++v) {
          V dv[kR];
#pragma GCC unroll 8
          for (int r = 0; r < kR; ++r) dv[r] = vload<V>(dr[r] + v * kL);
#pragma GCC unroll 8
          for (int c = 0; c < kC; ++c) {
            // x rows are HW apart: too many streams for the hardware prefetcher (as in the forward).
            if (r0 == 0) __builtin_prefetch(xr[c] + v * kL + 512 / sizeof(float));
            const V xv = vload<V>(xr[c] + v * kL);
#pragma GCC unroll 8
            for (int r = 0; r < kR; ++r) acc[r][c] += dv[r] * xv;
          }
        }
        float sums[kL];
        vstore<V>(sums, lane_sums<V>(&acc[0][0]));  // sums[r * kC + c] is the sum of acc[r][c]
        for (int64_t r = 0; r < std::min<int64_t>(kR, Cr - r0); ++r)
          for (int64_t c = 0; c < std::min<int64_t>(kC, nc - c0); ++c)
            dw[(r0 + r) * C + t.g0 + c0 + c] = sums[r * kC + c];
      }
    }
    if (t.g0 == 0) {  // db, once per chunk
      float* db = j.db_part + t.n * j.wchunks * Cr + t.k * Cr;
      for (int64_t r = 0; r < Cr; ++r) {
        V s{};
        for (int64_t v = 0; v < nv; ++v) s += vload<V>(dys + r * dystride + v * kL);
        db[r] = lane_sum(s);
      }
    }
  }
}

// ---- dW, channels_last: acc[r][v] (kWR rows of dy x kWCv channel vectors) over the chunk's
// pixels, one broadcast dy value per FMA group; no lane sums. Channel tails are staged.
template <typename K, typename T>
BAM_INLINE void grad_weight_cl_tasks(const Conv1x1GradJob& j, const T* x, int64_t begin, int64_t end) {
  using V = typename K::V;
  constexpr int kL = kLanes<K>, kR = K::kWR, kCv = K::kWCv, kCo = kCv * kL;
  static_assert(kGradGroupC % kCo == 0, "a channel group must hold whole blocks");
  const int64_t C = j.C, HW = j.HW, Cr = j.Cr;
  std::vector<float> xbuf(j.wchunk_px * kGradGroupC);
  for (int64_t task = begin; task < end; ++task) {
    const GradWeightRange t = grad_weight_range(j, task);
    const int64_t np = t.p1 - t.p0, nc = t.g1 - t.g0, ncp = (nc + kCo - 1) / kCo * kCo;
    const T* xn = x + t.n * HW * C;
    const float* dyn = j.dy + t.n * HW * Cr + t.p0 * Cr;
    const float* xs = nullptr;
    int64_t xstride = C;
    if constexpr (std::is_same_v<T, float>) {
      if (nc % kCo == 0) xs = xn + t.p0 * C + t.g0;
    }
    if (xs == nullptr) {
      for (int64_t i = 0; i < np; ++i) {
        const T* src = xn + (t.p0 + i) * C + t.g0;
        float* dst = xbuf.data() + i * ncp;
        for (int64_t c = 0; c < nc; ++c) dst[c] = ld(src + c);
        std::fill(dst + nc, dst + ncp, 0.f);
      }
      xs = xbuf.data(), xstride = ncp;
    }
    float* dw = j.dw_part + (t.n * j.wchunks + t.k) * Cr * C;
    for (int64_t c0 = 0; c0 < ncp; c0 += kCo) {
      for (int64_t r0 = 0; r0 < Cr; r0 += kR) {
        int64_t rr[kR];
        for (int r = 0; r < kR; ++r) rr[r] = std::min<int64_t>(r0 + r, Cr - 1);  // past Cr: discarded
        V acc[kR][kCv] = {};
        for (int64_t i = 0; i < np; ++i) {
          V xv[kCv];
#pragma GCC unroll 8
          for (int v = 0; v < kCv; ++v) xv[v] = vload<V>(xs + i * xstride + c0 + v * kL);
          const float* dyi = dyn + i * Cr;
#pragma GCC unroll 16
          for (int r = 0; r < kR; ++r) {
            const V db = K::splat(dyi[rr[r]]);
#pragma GCC unroll 8
            for (int v = 0; v < kCv; ++v) acc[r][v] += db * xv[v];
          }
        }
        const int64_t ncb = std::min<int64_t>(kCo, nc - c0);
        for (int64_t r = 0; r < std::min<int64_t>(kR, Cr - r0); ++r) {
          float out[kCo];
          for (int v = 0; v < kCv; ++v) vstore<V>(out + v * kL, acc[r][v]);
          std::memcpy(dw + (r0 + r) * C + t.g0 + c0, out, ncb * sizeof(float));
        }
      }
    }
    if (t.g0 == 0) {  // db, once per chunk: pixel by pixel in a fixed order
      float* db = j.db_part + t.n * j.wchunks * Cr + t.k * Cr;
      std::fill(db, db + Cr, 0.f);
      for (int64_t i = 0; i < np; ++i)
        for (int64_t r = 0; r < Cr; ++r) db[r] += dyn[i * Cr + r];
    }
  }
}

template <typename K, typename T>
BAM_INLINE void grad_input_any(const Conv1x1GradJob& j, bool cl, T* dx, int64_t begin, int64_t end) {
  if (!cl) return grad_input_tasks<K>(j, dx, begin, end);
  if (j.cl_vectors == 4) return grad_input_cl_tasks<K, 4>(j, dx, begin, end);
  if (j.cl_vectors == 2) return grad_input_cl_tasks<K, 2>(j, dx, begin, end);
  grad_input_cl_tasks<K, 1>(j, dx, begin, end);
}

template <typename K, typename T>
BAM_INLINE void grad_weight_any(const Conv1x1GradJob& j, bool cl, const T* x, int64_t begin, int64_t end) {
  if (cl) return grad_weight_cl_tasks<K>(j, x, begin, end);
  grad_weight_tasks<K>(j, x, begin, end);
}

}  // namespace

#define BAM_DEFINE_CONV1X1_GRAD(ISA, K)                                                                       \
  void conv1x1_grad_input_##ISA(const Conv1x1GradJob& j, bool cl, float* dx, int64_t b, int64_t e) {       \
    grad_input_any<K>(j, cl, dx, b, e);                                                                    \
  }                                                                                                        \
  void conv1x1_grad_input_##ISA(const Conv1x1GradJob& j, bool cl, Bf16* dx, int64_t b, int64_t e) {        \
    grad_input_any<K>(j, cl, dx, b, e);                                                                    \
  }                                                                                                        \
  void conv1x1_grad_input_##ISA(const Conv1x1GradJob& j, bool cl, Fp16* dx, int64_t b, int64_t e) {        \
    grad_input_any<K>(j, cl, dx, b, e);                                                                    \
  }                                                                                                        \
  void conv1x1_grad_weight_##ISA(const Conv1x1GradJob& j, bool cl, const float* x, int64_t b, int64_t e) { \
    grad_weight_any<K>(j, cl, x, b, e);                                                                    \
  }                                                                                                        \
  void conv1x1_grad_weight_##ISA(const Conv1x1GradJob& j, bool cl, const Bf16* x, int64_t b, int64_t e) {  \
    grad_weight_any<K>(j, cl, x, b, e);                                                                    \
  }                                                                                                        \
  void conv1x1_grad_weight_##ISA(const Conv1x1GradJob& j, bool cl, const Fp16* x, int64_t b, int64_t e) {  \
    grad_weight_any<K>(j, cl, x, b, e);                                                                    \
  }

}  // namespace bam_fused
