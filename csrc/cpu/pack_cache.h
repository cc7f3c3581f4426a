// Packed weights of the CPU eval kernels, kept from call to call (pack_cache.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <string>

namespace bam_fused {

// What a packing computes from the weights (with its block: output channels per register block).
enum class Packing { kConv1x1, kConv1x1Pairs, kDilated, kDilatedPairs, kWinograd };

// pack(), or what an earlier call packed from weights at the same address with the same sizes,
// dtype, packing and block, and the same bytes (compared with a copy kept of them, so no write to
// the weights can make it stale: in-place, through .data or numpy alike). Off with
// BAM_FUSED_CPU_PACK_CACHE=off. For the eval ops, whose (folded) weights stay the same from call
// to call; the training ops pack on every call.
at::Tensor cached_packing(const at::Tensor& w, Packing packing, int64_t block,
                          const std::function<at::Tensor()>& pack);

// BAM_FUSED_CPU_PACK_CACHE: auto (keep packings) or off.
std::string cpu_pack_cache_choice();
// Entries held now, and packings reused so far (build_info: bam-fused info, tests).
int64_t pack_cache_entries();
int64_t pack_cache_hits();

}  // namespace bam_fused
