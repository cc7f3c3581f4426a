// CPU kernels of the fused gate on the (N, R, L) view of x (L contiguous; see
// bam_fused/ops/gate_triton.py): out = x * (1 + sigmoid(row[n, r] (+) col[n, l])).
//
// The forward streams whole rows. The backward cuts rows into fixed tiles, independent of the
// thread count, and writes per-tile partial column sums that are added in a fixed order
// afterwards: results are bitwise the same for any number of threads.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <type_traits>
#include <vector>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../check.h"
#include "../env_choice.h"
#include "../fast_math.h"
#include "../ops.h"
#include "isa.h"
#include "simd.h"

namespace bam_fused {

// The dispatcher's 16-bit types, through simd.h's conversions.
static_assert(sizeof(at::BFloat16) == sizeof(Bf16) && sizeof(at::Half) == sizeof(Fp16));
BAM_INLINE float ld(const at::BFloat16* p) { return ld(reinterpret_cast<const Bf16*>(p)); }
BAM_INLINE float ld(const at::Half* p) { return ld(reinterpret_cast<const Fp16*>(p)); }
BAM_INLINE void st(at::BFloat16* p, float v) { st(reinterpret_cast<Bf16*>(p), v); }
BAM_INLINE void st(at::Half* p, float v) { st(reinterpret_cast<Fp16*>(p), v); }

namespace {

constexpr int64_t kTileR = 32;  // rows per backward tile (fixed: results do not depend on threads)

template <typename T>
struct Tile {
  const T* x;       // (R, L) of sample n
  const T* g;       // backward only
  T* out;           // out or dx
  int64_t r0, r1, L;  // rows [r0, r1) of L columns
  // Split-exp rows by the ISA's row function, not the generic loop: forward gate_split_row_avx512
  // (fp32 under AVX-512) or gate_split_row_avx512bf16 (bf16 under AVX512-BF16); backward
  // gate_bwd_split_row_avx512bf16 (bf16 under AVX512-BF16).
  bool row_kernel = false;
};

// Row elements per streamed chunk: computed into an L1 buffer, then stored past the caches.
constexpr int64_t kStreamChunk = 512;

// dst[0, n) = src[0, n) with non-temporal stores where dst is 16-byte aligned: a large output
// then costs one write to memory, not a read for ownership plus a write, and does not evict
// x from the cache. SSE2 only, which every x86-64 CPU has (so it suits every clone).
template <typename T>
BAM_INLINE void stream_copy(T* dst, const T* src, int64_t n) {
#if defined(__SSE2__)
  auto* d = reinterpret_cast<char*>(dst);
  const auto* s = reinterpret_cast<const char*>(src);
  int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  const int64_t head = std::min<int64_t>(bytes, (16 - reinterpret_cast<uintptr_t>(d) % 16) % 16);
  std::memcpy(d, s, head);
  d += head, s += head, bytes -= head;
  for (; bytes >= 16; d += 16, s += 16, bytes -= 16)
    _mm_stream_si128(reinterpret_cast<__m128i*>(d), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  std::memcpy(d, s, bytes);
#else
  std::memcpy(dst, src, n * sizeof(T));
#endif
}

// out[l] = value(l) for l < L: plain stores, or with kStream through an L1 buffer and
// stream_copy (the caller fences).
template <typename T, bool kStream, typename F>
BAM_INLINE void write_row(T* out, int64_t L, F&& value) {
  if constexpr (!kStream) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) st(out + l, value(l));
  } else {
    alignas(64) T buf[kStreamChunk];
    for (int64_t l0 = 0; l0 < L; l0 += kStreamChunk) {
      const int64_t n = std::min(kStreamChunk, L - l0);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) st(buf + i, value(l0 + i));
      stream_copy(out + l0, buf, n);
    }
  }
}

// ecol[l] = exp(-col[l]) and erow[r - t.r0] = exp(-row[r]) when every |col| <= kSplitExpLimit
// (sum only), else both nullptr.
template <typename T, typename A, bool kProduct, bool kStream>
BAM_INLINE void fwd_tile(const Tile<T>& t, const A* row, const A* col, const A* ecol, const A* erow) {
  for (int64_t r = t.r0; r < t.r1; ++r) {
    const A rv = row[r];
    const T* xr = t.x + r * t.L;
    T* outr = t.out + r * t.L;
    if (!kProduct && ecol != nullptr && std::abs(rv) <= A(kSplitExpLimit)) {
      const A er = erow[r - t.r0];
#if BAM_X86
      if constexpr (std::is_same_v<T, float>) {
        if (t.row_kernel) {
          gate_split_row_avx512(xr, ecol, er, outr, t.L, kStream);
          continue;
        }
      }
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (t.row_kernel) {
          gate_split_row_avx512bf16(reinterpret_cast<const uint16_t*>(xr), ecol, er, reinterpret_cast<uint16_t*>(outr),
                                    t.L, kStream);
          continue;
        }
      }
#endif
      write_row<T, kStream>(outr, t.L, [&](int64_t l) BAM_INLINE_LAMBDA {
        return ld(xr + l) * (A(1) + A(1) / (A(1) + er * ecol[l]));
      });
      continue;
    }
    write_row<T, kStream>(outr, t.L, [&](int64_t l) BAM_INLINE_LAMBDA {
      const A a = kProduct ? rv * col[l] : rv + col[l];
      return ld(xr + l) * (A(1) + sigmoid(a));  // the reference's form and rounding
    });
  }
}

// Writes dx and returns dz = g * x * s * (1 - s) for one element.
template <typename T, typename A>
BAM_INLINE A bwd_element(const T* g, const T* x, T* dx, A s) {
  const A gv = ld(g);
  st(dx, gv * (A(1) + s));
  return gv * ld(x) * s * (A(1) - s);
}

// Writes dx; drow[r] gets row r's sum over the columns; dcol[l] accumulates the tile's sum
// over its rows. Two loops rather than a select inside one, which would compute both.
template <typename T, typename A, bool kProduct>
BAM_INLINE void bwd_tile(const Tile<T>& t, const A* row, const A* col, const A* ecol, A* drow, A* dcol) {
  for (int64_t r = t.r0; r < t.r1; ++r) {
    const A rv = row[r];
    const T* xr = t.x + r * t.L;
    const T* gr = t.g + r * t.L;
    T* dxr = t.out + r * t.L;
    A rsum = 0;
    if (!kProduct && ecol != nullptr && std::abs(rv) <= A(kSplitExpLimit)) {
      const A er = exp_approx(-rv);
#if BAM_X86
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (t.row_kernel) {
          drow[r] = gate_bwd_split_row_avx512bf16(reinterpret_cast<const uint16_t*>(gr),
                                                  reinterpret_cast<const uint16_t*>(xr), ecol, er,
                                                  reinterpret_cast<uint16_t*>(dxr), dcol, t.L);
          continue;
        }
      }
#endif
#pragma omp simd reduction(+ : rsum)
      for (int64_t l = 0; l < t.L; ++l) {
        const A dz = bwd_element(gr + l, xr + l, dxr + l, A(1) / (A(1) + er * ecol[l]));
        rsum += dz;
        dcol[l] += dz;
      }
    } else {
#pragma omp simd reduction(+ : rsum)
      for (int64_t l = 0; l < t.L; ++l) {
        const A cv = col[l];
        const A dz = bwd_element(gr + l, xr + l, dxr + l, sigmoid(kProduct ? rv * cv : rv + cv));
        rsum += kProduct ? dz * cv : dz;
        dcol[l] += kProduct ? dz * rv : dz;
      }
    }
    drow[r] = rsum;
  }
}

// Fills ecol with exp(-col); returns whether the split-exp path is valid for this column set.
template <typename A>
BAM_INLINE bool split_exp(const A* col, int64_t L, A* ecol) {
  bool ok = true;
  for (int64_t l = 0; l < L; ++l) ok &= std::abs(col[l]) <= A(kSplitExpLimit);  // false for NaN
  if (!ok) return false;
#pragma omp simd
  for (int64_t l = 0; l < L; ++l) ecol[l] = exp_approx(-col[l]);
  return true;
}

#define BAM_DEFINE_TILES(NAME, T, A, P)                                                             \
  BAM_CLONES void fwd_##NAME(const Tile<T>& t, const A* row, const A* col, const A* ecol, const A* erow, \
                             bool nt) {                                                             \
    nt ? fwd_tile<T, A, P, true>(t, row, col, ecol, erow) : fwd_tile<T, A, P, false>(t, row, col, ecol, erow); \
  }                                                                                                 \
  BAM_CLONES void bwd_##NAME(const Tile<T>& t, const A* row, const A* col, const A* ecol, A* drow,  \
                             A* dcol) {                                                             \
    bwd_tile<T, A, P>(t, row, col, ecol, drow, dcol);                                               \
  }

BAM_CLONES bool split_exp_f32(const float* col, int64_t L, float* ecol) { return split_exp(col, L, ecol); }

// out[i] = exp(-v[i]) for i < n in vectors: the forward's row factors for a range of rows. One
// scalar call a row had 3% of a channels_last BAM's perf samples at 8 x 256 x 56x56 (a row a
// pixel); in vectors the whole BAM took 1.015x / 1.020x less time (paired; NCHW 1.00x).
// Values past kSplitExpLimit get a finite, unused factor (fwd_tile checks each row).
BAM_CLONES void exp_neg_f32(const float* v, int64_t n, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = exp_approx(-v[i]);
}
inline void exp_neg_any(const float* v, int64_t n, float* out) { exp_neg_f32(v, n, out); }
inline void exp_neg_any(const double* v, int64_t n, double* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = exp_approx(-v[i]);
}
BAM_CLONES bool split_exp_f64(const double* col, int64_t L, double* ecol) { return split_exp(col, L, ecol); }
inline bool split_exp_any(const float* col, int64_t L, float* ecol) { return split_exp_f32(col, L, ecol); }
inline bool split_exp_any(const double* col, int64_t L, double* ecol) { return split_exp_f64(col, L, ecol); }

BAM_DEFINE_TILES(f32_sum, float, float, false)
BAM_DEFINE_TILES(f32_prod, float, float, true)
BAM_DEFINE_TILES(f16_sum, at::Half, float, false)
BAM_DEFINE_TILES(f16_prod, at::Half, float, true)
BAM_DEFINE_TILES(bf16_sum, at::BFloat16, float, false)
BAM_DEFINE_TILES(bf16_prod, at::BFloat16, float, true)
BAM_DEFINE_TILES(f64_sum, double, double, false)
BAM_DEFINE_TILES(f64_prod, double, double, true)

template <typename T>
struct Kernels;
#define BAM_KERNELS(T, A, NAME)                                                                  \
  template <>                                                                                    \
  struct Kernels<T> {                                                                            \
    using acc = A;                                                                               \
    static void fwd(bool p, const Tile<T>& t, const A* r, const A* c, const A* e, const A* er, bool nt) { \
      p ? fwd_##NAME##_prod(t, r, c, e, er, nt) : fwd_##NAME##_sum(t, r, c, e, er, nt);          \
    }                                                                                            \
    static void bwd(bool p, const Tile<T>& t, const A* r, const A* c, const A* e, A* dr, A* dc) { \
      p ? bwd_##NAME##_prod(t, r, c, e, dr, dc) : bwd_##NAME##_sum(t, r, c, e, dr, dc);          \
    }                                                                                            \
  };
BAM_KERNELS(float, float, f32)
BAM_KERNELS(at::Half, float, f16)
BAM_KERNELS(at::BFloat16, float, bf16)
BAM_KERNELS(double, double, f64)

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& row, const at::Tensor& col) {
  BAM_CHECK(x.dim() == 3 && x.is_contiguous(), op, ": x must be a contiguous (N, R, L) tensor, got sizes ",
            x.sizes(), " strides ", x.strides());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  BAM_CHECK(row.dim() == 2 && row.size(0) == x.size(0) && row.size(1) == x.size(1) && row.is_contiguous() &&
                row.scalar_type() == acc,
            op, ": row must be contiguous (N, R) = ", x.size(0), "x", x.size(1), " ", acc, ", got ", row.sizes(),
            " ", row.scalar_type());
  BAM_CHECK(col.dim() == 2 && col.size(0) == x.size(0) && col.size(1) == x.size(2) && col.is_contiguous() &&
                col.scalar_type() == acc,
            op, ": col must be contiguous (N, L) = ", x.size(0), "x", x.size(2), " ", acc, ", got ", col.sizes(),
            " ", col.scalar_type());
  BAM_CHECK(x.device().is_cpu() && row.device().is_cpu() && col.device().is_cpu(), op,
            ": all tensors must be on the CPU");
}

// Orders this thread's non-temporal stores before the parallel region ends.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace

namespace {

// "32768K" / "1M" / "512" (sysfs cache sizes) in bytes; 0 when unreadable.
int64_t parse_cache_size(const std::string& s) {
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (end == s.c_str() || v <= 0) return 0;
  const int64_t unit = *end == 'K' ? 1 << 10 : *end == 'M' ? 1 << 20 : *end == 'G' ? 1 << 30 : 1;
  return static_cast<int64_t>(v) * unit;
}

std::string read_line(const std::string& path) {
  std::ifstream f(path);
  std::string line;
  std::getline(f, line);
  return line;
}

}  // namespace

// The size of CPU 0's last-level cache: from sysfs (what lscpu reports), else sysconf, else a
// common server L3. sysfs first: on a 2-core Zen 4 VM (2026-11-28) glibc's sysconf reported a
// 320 MB L3 where sysfs and lscpu said 32 MB, which turned the stream stores off.
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int level = 0;
    int64_t size = 0;
    for (int i = 0; i < 16; ++i) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
      const std::string l = read_line(dir + "level");
      if (l.empty()) break;
      const int64_t s = parse_cache_size(read_line(dir + "size"));
      if (std::atoi(l.c_str()) >= level && s > 0) level = std::atoi(l.c_str()), size = s;
    }
    if (size > 0) return size;
#if defined(_SC_LEVEL3_CACHE_SIZE)
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (l3 > 0) return int64_t{l3};
#endif
    return int64_t{32} << 20;
  }();
  return bytes;
}

// Whether an output of `bytes` bytes is written with non-temporal stores
// (BAM_FUSED_CPU_STREAM_STORES: auto|on|off, read on every call so that tests can run both).
// auto: when it is at least half the last-level cache, where it would evict x and the cache
// could not hold it for the next layer anyway. Paired A/B, off -> on, whole BAM eval fp32,
// 2-core Zen 4 (32 MB L3), 2026-11-28: 1.03x at 8 x 256 x 56x56 (25.7 MB out; 1.07x with
// samples one a thread, eval_plan), 0.985x at 8 x 512 x 28x28 (12.8 MB).
bool stream_stores(int64_t bytes) {
  const std::string v = env_choice("BAM_FUSED_CPU_STREAM_STORES", {"auto", "on", "off"});
  if (v != "auto") return v == "on";
#if defined(__SSE2__)
  return bytes >= last_level_cache_bytes() / 2;
#else
  return false;
#endif
}

at::Tensor gate_forward_cpu(const at::Tensor& x, const at::Tensor& row, const at::Tensor& col, bool product) {
  check_inputs("bam_fused_C::gate_forward", x, row, col);
  auto out = at::empty_like(x);
  gate_forward_into(x, row, col, product, out, stream_stores(out.nbytes()));
  return out;
}

void gate_forward_into(const at::Tensor& x, const at::Tensor& row, const at::Tensor& col, bool product,
                       const at::Tensor& out, bool nt) {
  const int64_t N = x.size(0), R = x.size(1), L = x.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bam_gate_forward_cpu", [&] {
    using K = Kernels<scalar_t>;
    using A = typename K::acc;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const A* rp = row.const_data_ptr<A>();
    const A* cp = col.const_data_ptr<A>();
    const Isa isa = chosen_isa();
    const bool row_kernel = BAM_X86 && ((std::is_same_v<scalar_t, float> && avx512_vectors(isa)) ||
                                        (std::is_same_v<scalar_t, at::BFloat16> && isa == Isa::kAvx512Bf16));
    // Whole rows, so that each thread streams one contiguous range of memory.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1));
    at::parallel_for(0, N * R, grain, [&](int64_t begin, int64_t end) {
      std::vector<A> ecol(product ? 0 : L), erow;
      for (int64_t nr = begin; nr < end;) {
        const int64_t n = nr / R, r0 = nr % R, r1 = std::min(R, r0 + (end - nr));
        const bool split = !product && split_exp_any(cp + n * L, L, ecol.data());
        if (split) {
          erow.resize(r1 - r0);
          exp_neg_any(rp + n * R + r0, r1 - r0, erow.data());
        }
        Tile<scalar_t> t{xp + n * R * L, nullptr, op + n * R * L, r0, r1, L, row_kernel};
        K::fwd(product, t, rp + n * R, cp + n * L, split ? ecol.data() : nullptr, split ? erow.data() : nullptr, nt);
        nr += r1 - r0;
      }
      if (nt) stream_fence();
    });
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                 const at::Tensor& row, const at::Tensor& col,
                                                                 bool product) {
  check_inputs("bam_fused_C::gate_backward", x, row, col);
  BAM_CHECK(grad.sizes() == x.sizes() && grad.is_contiguous() && grad.scalar_type() == x.scalar_type(),
            "bam_fused_C::gate_backward: grad must be contiguous with x's sizes ", x.sizes(), " and dtype ",
            x.scalar_type(), ", got ", grad.sizes(), " ", grad.scalar_type());
  auto dx = at::empty_like(x);
  const int64_t N = x.size(0), R = x.size(1), L = x.size(2);
  const int64_t n_rt = (R + kTileR - 1) / kTileR;
  // Row sums are complete per tile; column sums get one partial per tile of rows, added
  // below in a fixed order.
  auto drow = at::empty({N, R}, row.options());
  auto dcol_part = at::zeros({N, n_rt, L}, col.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bam_gate_backward_cpu", [&] {
    using K = Kernels<scalar_t>;
    using A = typename K::acc;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const A* rp = row.const_data_ptr<A>();
    const A* cp = col.const_data_ptr<A>();
    A* drp = drow.mutable_data_ptr<A>();
    A* dcp = dcol_part.mutable_data_ptr<A>();
    // bf16 split-exp rows by gate_bwd_split_row_avx512bf16 (fp32 keeps the division: memory-bound).
    const bool row_kernel = BAM_X86 && std::is_same_v<scalar_t, at::BFloat16> && chosen_isa() == Isa::kAvx512Bf16;
    at::parallel_for(0, N * n_rt, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> ecol(product ? 0 : L);
      int64_t ecol_n = -1;
      bool split = false;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t rt = task % n_rt, n = task / n_rt;
        if (!product && n != ecol_n) {
          split = split_exp_any(cp + n * L, L, ecol.data());
          ecol_n = n;
        }
        const int64_t off = n * R * L;
        Tile<scalar_t> t{xp + off, gp + off, dxp + off, rt * kTileR, std::min(R, (rt + 1) * kTileR), L, row_kernel};
        K::bwd(product, t, rp + n * R, cp + n * L, split ? ecol.data() : nullptr, drp + n * R, dcp + task * L);
      }
    });
  });
  return {dx, drow, dcol_part.sum(1)};
}

}  // namespace

TORCH_LIBRARY_IMPL(bam_fused_C, CPU, m) {
  m.impl("gate_forward", &gate_forward_cpu);
  m.impl("gate_backward", &gate_backward_cpu);
}

}  // namespace bam_fused
