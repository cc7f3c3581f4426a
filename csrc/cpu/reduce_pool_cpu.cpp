// CPU half of the branch op's read of x: pooled channel means and relu(W x + b) per pixel, in
// one pass over x (conv1x1_pool.h), NCHW or channels_last, in the widest instruction set the
// CPU has. y comes out channels_last: oneDNN's dilated convs then run NHWC without reorders.
// At N = 8, C = 256, 56x56 fp32 (2-core AVX-512 CPU) oneDNN's 1x1 conv alone took 1.7 ms on
// NCHW x (it reorders x into a fresh 25 MB buffer per call) and 0.97 ms on channels_last x,
// plus 0.2-0.36 ms for the mean; the single pass takes about 0.65 ms.
//
// Also the pass's backward for training (conv1x1_grad.h): dx += W^T dy + dmean / HW in place and
// dW, db. At the same shape MKL's GEMMs through torch.matmul took 1.65 (dx) + 1.76 ms (dW);
// these kernels about 0.8 + 0.9.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <string>
#include <utility>

#include "../check.h"
#include "../env_choice.h"
#include "../ops.h"
#include "conv1x1_grad.h"
#include "conv1x1_pool.h"
#include "isa.h"
#include "pack_cache.h"
#include "parallel_chunks.h"

namespace bam_fused {
namespace {

constexpr const char* kIsaNames[] = {"avx512_bf16", "avx512", "avx2", "generic"};  // indexed by Isa

Isa best_isa() {
#if BAM_X86
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("bmi2"))
      return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
      return Isa::kAvx2;
    return Isa::kGeneric;
  }();
  return best;
#else
  return Isa::kGeneric;
#endif
}

}  // namespace

// BAM_FUSED_CPU_ISA (auto|avx512_bf16|avx512|avx2|generic), read on every call so that tests can
// run each variant: the instruction set of the CPU pass over x, its backward, our dilated convs
// and the fp32 gate forward's reciprocal. Asking for more than the CPU has is an error.
Isa chosen_isa() {
  const std::string v = env_choice("BAM_FUSED_CPU_ISA", {"auto", "avx512_bf16", "avx512", "avx2", "generic"});
  const Isa best = best_isa();
  if (v == "auto") return best;
  int want = 0;
  while (v != kIsaNames[want]) ++want;  // env_choice allowed only these
  BAM_CHECK(want >= static_cast<int>(best),
            "environment variable BAM_FUSED_CPU_ISA asks for ", v, ", which this CPU does not support");
  return static_cast<Isa>(want);
}

namespace {

template <typename T>
void conv1x1_pool(Isa isa, bool cl, const Conv1x1PoolJob& j, const T* x, int64_t begin, int64_t end) {
#if BAM_X86
  if constexpr (std::is_same_v<T, Bf16>) {
    if (isa == Isa::kAvx512Bf16)
      return cl ? conv1x1_pool_cl_avx512bf16(j, x, begin, end) : conv1x1_pool_avx512bf16(j, x, begin, end);
  }
  if (avx512_vectors(isa))
    return cl ? conv1x1_pool_cl_avx512(j, x, begin, end) : conv1x1_pool_avx512(j, x, begin, end);
  if (isa == Isa::kAvx2) return cl ? conv1x1_pool_cl_avx2(j, x, begin, end) : conv1x1_pool_avx2(j, x, begin, end);
#endif
  cl ? conv1x1_pool_cl_generic(j, x, begin, end) : conv1x1_pool_generic(j, x, begin, end);
}

template <typename T>
void conv1x1_grad_input(Isa isa, bool cl, const Conv1x1GradJob& j, T* dx, int64_t begin, int64_t end) {
#if BAM_X86
  if (avx512_vectors(isa)) return conv1x1_grad_input_avx512(j, cl, dx, begin, end);
  if (isa == Isa::kAvx2) return conv1x1_grad_input_avx2(j, cl, dx, begin, end);
#endif
  conv1x1_grad_input_generic(j, cl, dx, begin, end);
}

template <typename T>
void conv1x1_grad_weight(Isa isa, bool cl, const Conv1x1GradJob& j, const T* x, int64_t begin, int64_t end) {
#if BAM_X86
  if (avx512_vectors(isa)) return conv1x1_grad_weight_avx512(j, cl, x, begin, end);
  if (isa == Isa::kAvx2) return conv1x1_grad_weight_avx2(j, cl, x, begin, end);
#endif
  conv1x1_grad_weight_generic(j, cl, x, begin, end);
}

// (Cr, C) -> (ceil(Cr / kCo), C, kCo), zero rows past Cr: one channel's kCo weights adjacent.
at::Tensor pack_weights(const at::Tensor& w, int64_t kCo) {
  const int64_t Cr = w.size(0), C = w.size(1), blocks = (Cr + kCo - 1) / kCo;
  auto padded = at::zeros({blocks * kCo, C}, w.options());
  padded.narrow(0, 0, Cr).copy_(w);
  return padded.view({blocks, kCo, C}).transpose(1, 2).contiguous();
}

// pack_weights for the bf16 dot products: w rounded to bf16 (nearest even), input channels in
// pairs (c even in the low half, a zero channel past an odd C), (ceil(Cr / kCo), ceil(C / 2), kCo).
at::Tensor pack_weight_pairs(const at::Tensor& w, int64_t kCo) {
  const int64_t Cr = w.size(0), C = w.size(1), blocks = (Cr + kCo - 1) / kCo, C2 = (C + 1) / 2;
  auto padded = at::zeros({blocks * kCo, 2 * C2}, w.options().dtype(at::kBFloat16));
  padded.narrow(0, 0, Cr).narrow(1, 0, C).copy_(w);
  return padded.view(at::kInt).view({blocks, kCo, C2}).transpose(1, 2).contiguous();
}

// Whether the pass over x multiplies in bf16 under isa (cpu_bf16_products).
bool bf16_products(Isa isa, const at::Tensor& x) {
  return isa == Isa::kAvx512Bf16 && x.scalar_type() == at::kBFloat16;
}

// Whether every element of t (contiguous fp32) is a bf16 value: the low 16 bits are zero.
bool bf16_representable(const at::Tensor& t) {
  const auto* u = reinterpret_cast<const uint32_t*>(t.const_data_ptr<float>());
  return at::parallel_reduce(
      0, t.numel(), 1 << 16, true,
      [&](int64_t begin, int64_t end, bool ok) {
        uint32_t low = 0;
        for (int64_t i = begin; i < end; ++i) low |= u[i];
        return ok && (low & 0xFFFFu) == 0;
      },
      [](bool a, bool b) { return a && b; });
}

// Calls f with x's storage type (fp32, Bf16 or Fp16) as T and its data pointer.
template <typename F>
void with_storage(const at::Tensor& x, const char* what, F&& f) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return f(x.data_ptr<float>());
    case at::kBFloat16:
      return f(reinterpret_cast<Bf16*>(x.data_ptr<at::BFloat16>()));
    case at::kHalf:
      return f(reinterpret_cast<Fp16*>(x.data_ptr<at::Half>()));
    default:
      BAM_CHECK(false, "bam_fused: ", what, " must be fp32, fp16 or bf16, got ", x.scalar_type());
  }
}

}  // namespace

// The register blocking: output channels per block of NCHW x, vector lanes.
std::pair<int64_t, int64_t> blocking(Isa isa) {
#if BAM_X86
  if (avx512_vectors(isa)) return {conv1x1_pool_avx512_kco(), conv1x1_pool_avx512_lanes()};
  if (isa == Isa::kAvx2) return {conv1x1_pool_avx2_kco(), conv1x1_pool_avx2_lanes()};
#endif
  return {conv1x1_pool_generic_kco(), conv1x1_pool_generic_lanes()};
}

// Pixels per pooled partial (a task of the pass and of dx). Chunks of kChunkPx pixels; smaller
// for batches under 4, so that batch 1 at 14x14 runs 5 tasks of 48 pixels, not one of 192 and
// one of 4 (0.37 -> 0.34 ms for the whole BAM). The shape alone sets them: results do not
// depend on the thread count.
int64_t chunk_pixels(int64_t N, int64_t HW) {
  const int64_t per_sample = N >= 4 ? 1 : (8 + N - 1) / std::max<int64_t>(N, 1);
  const int64_t want = (HW + per_sample - 1) / per_sample;
  return std::clamp((want + kChunkQuantum - 1) / kChunkQuantum * kChunkQuantum, kChunkQuantum, kChunkPx);
}

std::tuple<at::Tensor, at::Tensor> reduce_pool_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                                   bool relu, bool cache_weights, int64_t batch) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), Cr = w.size(0);
  const Isa isa = chosen_isa();
  const bool cl = !x.is_contiguous();  // then channels_last-contiguous (the op checked)
  const auto [kco, lanes] = blocking(isa);
  const int64_t cl_vectors = cl_vectors_for(Cr, lanes);
  const int64_t chunk_px = chunk_pixels(batch > 0 ? batch : N, HW);
  // One chunk even without pixels: its partial is 0 * (1 / 0) = NaN, the mean of nothing, as in torch.
  const int64_t chunks = std::max<int64_t>(1, (HW + chunk_px - 1) / chunk_px);
  auto part = at::empty({N, chunks, C}, x.options().dtype(at::kFloat));
  // channels_last y: oneDNN's dilated convs run NHWC without reorders (0.33 against 0.42 ms at 56x56).
  auto y = at::empty({N, Cr, x.size(2), x.size(3)},
                     x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t block_co = cl ? cl_vectors * lanes : kco;
  // bf16 x on AVX512-BF16: bf16 products (conv1x1_pool_avx512bf16.cpp), bf16 weight pairs.
  const bool bf16_dot = bf16_products(isa, x);
  const auto pack = [&] { return bf16_dot ? pack_weight_pairs(w, block_co) : pack_weights(w, block_co); };
  const at::Tensor wp =
      cache_weights ? cached_packing(w, bf16_dot ? Packing::kConv1x1Pairs : Packing::kConv1x1, block_co, pack) : pack();
  Conv1x1PoolJob j{C, HW, Cr, chunk_px, chunks, bf16_dot ? nullptr : wp.const_data_ptr<float>(),
                   b.const_data_ptr<float>(), y.mutable_data_ptr<float>(), part.mutable_data_ptr<float>(),
                   1.f / static_cast<float>(HW), static_cast<int>(cl_vectors), relu};
  if (bf16_dot) j.w_pairs = reinterpret_cast<const uint32_t*>(wp.const_data_ptr<int32_t>());
  with_storage(x, "x", [&](auto* xp) {
    using T = std::remove_pointer_t<decltype(xp)>;
    const T* xc = xp;
    parallel_chunks(N, chunks, chunk_px, HW,
                    [&](int64_t begin, int64_t end) { conv1x1_pool(isa, cl, j, xc, begin, end); });
  });
  return {part, y};
}

std::tuple<at::Tensor, at::Tensor> reduce_pool_backward_cpu(const at::Tensor& x, const at::Tensor& dy,
                                                            const at::Tensor& dmean, const at::Tensor& w,
                                                            const std::optional<at::Tensor>& dx) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), Cr = w.size(0);
  const Isa isa = chosen_isa();
  const bool cl = !x.is_contiguous();  // then channels_last-contiguous (the op checked; dy and dx alike)
  const auto [kco, lanes] = blocking(isa);
  const int64_t cl_vectors = cl_vectors_for(C, lanes);
  const int64_t chunk_px = chunk_pixels(N, HW), chunks = std::max<int64_t>(1, (HW + chunk_px - 1) / chunk_px);
  // dW chunks: up to kGradChunkPx pixels, whole multiples of kChunkQuantum, evenly spread.
  const int64_t wchunks = std::max<int64_t>(1, (HW + kGradChunkPx - 1) / kGradChunkPx);
  const int64_t wchunk_px = std::max<int64_t>(
      kChunkQuantum, ((HW + wchunks - 1) / wchunks + kChunkQuantum - 1) / kChunkQuantum * kChunkQuantum);
  const int64_t groups = (C + kGradGroupC - 1) / kGradGroupC;
  const at::Tensor dm = dmean * (1.f / static_cast<float>(HW));
  auto dw_part = at::empty({N * wchunks, Cr, C}, x.options().dtype(at::kFloat));
  auto db_part = at::empty({N * wchunks, Cr}, x.options().dtype(at::kFloat));
  // bf16 x on AVX512-BF16 and dy bf16-representable (a bf16 model's: the gradient of y cast to
  // bf16): products of x or W with dy in bf16 are exact, so only the summation order differs
  // from fp32 (and denormals read as zero). dx takes them when W is a bf16 model's too (then wt
  // holds W^T in bf16 pairs).
  const bool exact_dy = bf16_products(isa, x) && bf16_representable(dy);
  const bool bf16_dx = dx.has_value() && exact_dy && bf16_representable(w);
  const int64_t dx_block = cl ? cl_vectors * lanes : kco;
  const at::Tensor wt = !dx.has_value() ? at::Tensor()
                        : bf16_dx       ? pack_weight_pairs(w.t(), dx_block)
                                        : pack_weights(w.t(), dx_block);
  const Conv1x1GradJob j{C, HW, Cr, chunk_px, chunks, wchunk_px, wchunks, groups,
                         wt.defined() && !bf16_dx ? wt.const_data_ptr<float>() : nullptr, dy.const_data_ptr<float>(),
                         dm.const_data_ptr<float>(), dw_part.mutable_data_ptr<float>(),
                         db_part.mutable_data_ptr<float>(), static_cast<int>(cl_vectors)};
#if BAM_X86
  if (exact_dy) {
    const Bf16* xb = reinterpret_cast<const Bf16*>(x.const_data_ptr<at::BFloat16>());
    at::parallel_for(0, N * wchunks * groups, 1,
                     [&](int64_t begin, int64_t end) { conv1x1_grad_weight_avx512bf16(j, cl, xb, begin, end); });
  } else
#endif
  {
    with_storage(x, "x", [&](auto* xp) {
      using T = std::remove_pointer_t<decltype(xp)>;
      const T* xc = xp;
      at::parallel_for(0, N * wchunks * groups, 1,
                       [&](int64_t begin, int64_t end) { conv1x1_grad_weight(isa, cl, j, xc, begin, end); });
    });
  }
#if BAM_X86
  if (bf16_dx) {
    const auto* wtp = reinterpret_cast<const uint32_t*>(wt.const_data_ptr<int32_t>());
    Bf16* dxp = reinterpret_cast<Bf16*>(dx->data_ptr<at::BFloat16>());
    parallel_chunks(N, chunks, chunk_px, HW,
                    [&](int64_t begin, int64_t end) { conv1x1_grad_input_avx512bf16(j, cl, wtp, dxp, begin, end); });
  } else
#endif
  if (dx.has_value()) {
    with_storage(*dx, "dx", [&](auto* dxp) {
      parallel_chunks(N, chunks, chunk_px, HW,
                      [&](int64_t begin, int64_t end) { conv1x1_grad_input(isa, cl, j, dxp, begin, end); });
    });
  }
  // The partials in a fixed order (not at::sum, whose order may follow the thread count).
  auto dw = at::zeros({Cr, C}, dw_part.options());
  auto db = at::zeros({Cr}, db_part.options());
  const int64_t parts = N * wchunks;
  const float* dwp = dw_part.const_data_ptr<float>();
  float* dwo = dw.mutable_data_ptr<float>();
  at::parallel_for(0, Cr * C, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t t = 0; t < parts; ++t)
      for (int64_t i = begin; i < end; ++i) dwo[i] += dwp[t * Cr * C + i];
  });
  const float* dbp = db_part.const_data_ptr<float>();
  float* dbo = db.mutable_data_ptr<float>();
  for (int64_t t = 0; t < parts; ++t)
    for (int64_t r = 0; r < Cr; ++r) dbo[r] += dbp[t * Cr + r];
  return {dw, db};
}

bool cpu_bf16_products(const at::Tensor& x) { return x.is_cpu() && bf16_products(chosen_isa(), x); }

std::string cpu_isa() {
  try {
    return kIsaNames[static_cast<int>(chosen_isa())];
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();  // a bad BAM_FUSED_CPU_ISA: info shows why, ops raise
  }
}

}  // namespace bam_fused
