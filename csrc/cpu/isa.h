// Choices shared by the CPU kernels' launchers (reduce_pool_cpu.cpp, spatial_cpu.cpp): the
// instruction set and the register and task blocking. Torch-free: the per-instruction-set
// files include it too.
#pragma once

#include <cstdint>
#include <utility>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BAM_X86 1  // the AVX-512 and AVX2 files have code
#else
#define BAM_X86 0
#endif

// The per-instruction-set files compile their functions for that set (and only those files: the
// rest of the extension must run on any x86-64): BAM_TARGET_BEGIN("avx2,fma") after the
// includes, BAM_TARGET_END at the end. A function the target misses fails to compile (its
// intrinsics do not inline), so a typo here cannot pass unnoticed.
#define BAM_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define BAM_TARGET_BEGIN(t) BAM_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#define BAM_TARGET_END BAM_PRAGMA(clang attribute pop)
#else
#define BAM_TARGET_BEGIN(t) BAM_PRAGMA(GCC push_options) BAM_PRAGMA(GCC target(t))
#define BAM_TARGET_END BAM_PRAGMA(GCC pop_options)
#endif

namespace bam_fused {

// Widest first. kAvx512Bf16 is kAvx512 plus the bf16 dot products of the pass over bf16 x
// (conv1x1_pool_avx512bf16.cpp); every other kernel runs its avx512 code there.
enum class Isa { kAvx512Bf16 = 0, kAvx512 = 1, kAvx2 = 2, kGeneric = 3 };
constexpr bool avx512_vectors(Isa isa) { return isa == Isa::kAvx512Bf16 || isa == Isa::kAvx512; }

// BAM_FUSED_CPU_ISA (auto|avx512_bf16|avx512|avx2|generic), read on every call so that tests can
// run each variant. Asking for more than the CPU has is an error.
Isa chosen_isa();
// The register blocking: output channels per block of NCHW x, vector lanes.
std::pair<int64_t, int64_t> blocking(Isa isa);
// Output channels per channels_last register block, in vectors: 1, 2 or 4 (constexpr: the
// kernels also instantiate it for constant channel counts).
constexpr int64_t cl_vectors_for(int64_t channels, int64_t lanes) {
  const int64_t vectors = (channels + lanes - 1) / lanes;
  return vectors <= 1 ? 1 : vectors <= 2 ? 2 : 4;
}
// Pixels per task of N samples of HW pixels: a multiple of kChunkQuantum (conv1x1_pool.h), set
// by the shape alone, so results do not depend on the thread count.
int64_t chunk_pixels(int64_t N, int64_t HW);

}  // namespace bam_fused
