// CPU half of the branch op's read of x: pooled channel means and relu(W x + b) per pixel, in
// one pass over x (conv1x1_pool.h), NCHW or channels_last, in the widest instruction set the
// CPU has. y comes out channels_last: oneDNN's dilated convs then run NHWC without reorders.
// At N = 8, C = 256, 56x56 fp32 (2-core AVX-512 CPU) oneDNN's 1x1 conv alone took 1.7 ms on
// NCHW x (it reorders x into a fresh 25 MB buffer per call) and 0.97 ms on channels_last x,
// plus 0.2-0.36 ms for the mean; the single pass takes about 0.65 ms.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <string>
#include <utility>

#include "../ops.h"
#include "conv1x1_pool.h"

namespace bam_fused {
namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BAM_X86 1
#else
#define BAM_X86 0
#endif

enum class Isa { kAvx512 = 0, kAvx2 = 1, kGeneric = 2 };  // widest first
constexpr const char* kIsaNames[] = {"avx512", "avx2", "generic"};  // indexed by Isa

Isa best_isa() {
#if BAM_X86
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("bmi2"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
      return Isa::kAvx2;
    return Isa::kGeneric;
  }();
  return best;
#else
  return Isa::kGeneric;
#endif
}

// BAM_FUSED_CPU_ISA (auto|avx512|avx2|generic), read on every call so that tests can run each
// variant: the instruction set of the CPU pass over x. Asking for more than the CPU has is an
// error.
Isa chosen_isa() {
  const char* raw = std::getenv("BAM_FUSED_CPU_ISA");
  const std::string v = raw == nullptr ? "auto" : raw;
  const Isa best = best_isa();
  if (v == "auto" || v.empty()) return best;
  const int isas = static_cast<int>(std::size(kIsaNames));
  int want = 0;
  while (want < isas && v != kIsaNames[want]) ++want;
  TORCH_CHECK(want < isas,
              "environment variable BAM_FUSED_CPU_ISA must be auto, avx512, avx2 or generic, got '", v, "'");
  TORCH_CHECK(want >= static_cast<int>(best),
              "environment variable BAM_FUSED_CPU_ISA asks for ", v, ", which this CPU does not support");
  return static_cast<Isa>(want);
}

template <typename T>
void conv1x1_pool(Isa isa, bool cl, const Conv1x1PoolJob& j, const T* x, int64_t begin, int64_t end) {
#if BAM_X86
  if (isa == Isa::kAvx512)
    return cl ? conv1x1_pool_cl_avx512(j, x, begin, end) : conv1x1_pool_avx512(j, x, begin, end);
  if (isa == Isa::kAvx2) return cl ? conv1x1_pool_cl_avx2(j, x, begin, end) : conv1x1_pool_avx2(j, x, begin, end);
#endif
  cl ? conv1x1_pool_cl_generic(j, x, begin, end) : conv1x1_pool_generic(j, x, begin, end);
}

// The register blocking: output channels per block of NCHW x, vector lanes.
std::pair<int64_t, int64_t> blocking(Isa isa) {
#if BAM_X86
  if (isa == Isa::kAvx512) return {conv1x1_pool_avx512_kco(), conv1x1_pool_avx512_lanes()};
  if (isa == Isa::kAvx2) return {conv1x1_pool_avx2_kco(), conv1x1_pool_avx2_lanes()};
#endif
  return {conv1x1_pool_generic_kco(), conv1x1_pool_generic_lanes()};
}

// (Cr, C) -> (ceil(Cr / kCo), C, kCo), zero rows past Cr: one channel's kCo weights adjacent.
at::Tensor pack_weights(const at::Tensor& w, int64_t kCo) {
  const int64_t Cr = w.size(0), C = w.size(1), blocks = (Cr + kCo - 1) / kCo;
  auto padded = at::zeros({blocks * kCo, C}, w.options());
  padded.narrow(0, 0, Cr).copy_(w);
  return padded.view({blocks, kCo, C}).transpose(1, 2).contiguous();
}

template <typename T, typename S>
void run_parallel(Isa isa, bool cl, const Conv1x1PoolJob& j, const at::Tensor& x, int64_t tasks) {
  static_assert(sizeof(T) == sizeof(S));
  const T* xp = reinterpret_cast<const T*>(x.const_data_ptr<S>());
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) { conv1x1_pool(isa, cl, j, xp, begin, end); });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> reduce_pool_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), Cr = w.size(0);
  const Isa isa = chosen_isa();
  const bool cl = !x.is_contiguous();  // then channels_last-contiguous (the op checked)
  const auto [kco, lanes] = blocking(isa);
  const int64_t vectors = (Cr + lanes - 1) / lanes, cl_vectors = vectors <= 1 ? 1 : vectors <= 2 ? 2 : 4;
  // Chunks of kChunkPx pixels; smaller for batches under 4, so that batch 1 at 14x14 runs 5
  // tasks of 48 pixels, not one of 192 and one of 4 (0.37 -> 0.34 ms for the whole BAM). The
  // shape alone sets them: results do not depend on the thread count.
  const int64_t per_sample = N >= 4 ? 1 : (8 + N - 1) / std::max<int64_t>(N, 1);
  const int64_t want = (HW + per_sample - 1) / per_sample;
  const int64_t chunk_px = std::clamp((want + kChunkQuantum - 1) / kChunkQuantum * kChunkQuantum, kChunkQuantum,
                                      kChunkPx);
  // One chunk even without pixels: its partial is 0 * (1 / 0) = NaN, the mean of nothing, as in torch.
  const int64_t chunks = std::max<int64_t>(1, (HW + chunk_px - 1) / chunk_px);
  auto part = at::empty({N, chunks, C}, x.options().dtype(at::kFloat));
  // channels_last y: oneDNN's dilated convs run NHWC without reorders (0.33 against 0.42 ms at 56x56).
  auto y = at::empty({N, Cr, x.size(2), x.size(3)},
                     x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::ChannelsLast));
  const at::Tensor wp = pack_weights(w, cl ? cl_vectors * lanes : kco);
  const Conv1x1PoolJob j{C, HW, Cr, chunk_px, chunks, wp.const_data_ptr<float>(), b.const_data_ptr<float>(),
                         y.mutable_data_ptr<float>(), part.mutable_data_ptr<float>(), 1.f / static_cast<float>(HW),
                         static_cast<int>(cl_vectors)};
  switch (x.scalar_type()) {
    case at::kFloat:
      run_parallel<float, float>(isa, cl, j, x, N * chunks);
      break;
    case at::kBFloat16:
      run_parallel<Bf16, at::BFloat16>(isa, cl, j, x, N * chunks);
      break;
    case at::kHalf:
      run_parallel<Fp16, at::Half>(isa, cl, j, x, N * chunks);
      break;
    default:
      TORCH_CHECK(false, "bam_fused: the branch op takes fp32, fp16 or bf16 x, got ", x.scalar_type());
  }
  return {part, y};
}

std::string cpu_isa() {
  try {
    return kIsaNames[static_cast<int>(chosen_isa())];
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();  // a bad BAM_FUSED_CPU_ISA: info shows why, ops raise
  }
}

}  // namespace bam_fused
