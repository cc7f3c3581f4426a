// A BAM's folded weights stay the same across eval calls, but packing them for our kernels
// (zero padding to whole register blocks, transposes: a few ATen ops each) took about 43 us for
// one dilated conv at Cr = 64 (two of them and the 1x1 conv: about 10% of a batch-1 BAM at
// 1024 x 14 x 14 on a 2-core AVX2 CPU).
// Comparing the weights' bytes with a kept copy costs a few microseconds and cannot be fooled
// by writes that bypass version counters.
#include "pack_cache.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <vector>

#include "../env_choice.h"
#include "same_memory.h"

namespace bam_fused {
namespace {

struct Entry {
  const void* data;  // where the weights were
  Packing packing;
  int64_t block;
  at::Tensor source;  // a copy of the weights it was packed from, in their layout when dense
  at::Tensor packed;
  uint64_t last_use;
};

// Enough for every BAM of a ResNet at each packing (5 a BAM), bounded in bytes too.
constexpr size_t kMaxEntries = 64;
constexpr int64_t kMaxBytes = int64_t{64} << 20;

// Never destroyed: tensors freed from static destructors at exit could outlive torch's allocator.
struct Cache {
  std::mutex mutex;
  std::vector<Entry> entries;
  uint64_t clock_ticks = 0;
  int64_t hits = 0;
};
Cache& cache() {
  static Cache* c = new Cache();
  return *c;
}

// src: the weights' bytes to compare (w itself when dense, else a contiguous copy).
bool matches(const Entry& e, const at::Tensor& w, const at::Tensor& src, Packing packing, int64_t block) {
  return e.data == w.const_data_ptr() && e.packing == packing && e.block == block &&
         e.source.sizes() == src.sizes() && e.source.strides() == src.strides() &&
         e.source.scalar_type() == src.scalar_type();
}

int64_t bytes(const Entry& e) { return static_cast<int64_t>(e.source.nbytes() + e.packed.nbytes()); }

}  // namespace

std::string cpu_pack_cache_choice() { return env_choice("BAM_FUSED_CPU_PACK_CACHE", {"auto", "off"}); }

at::Tensor cached_packing(const at::Tensor& w, Packing packing, int64_t block,
                          const std::function<at::Tensor()>& pack) {
  if (cpu_pack_cache_choice() == "off" || w.numel() == 0) return pack();
  // Dense weights (the folded dilated ones are channels_last) are compared in their own layout:
  // a contiguous copy per call cost two ATen ops.
  const at::Tensor src = w.is_non_overlapping_and_dense() ? w : w.contiguous();
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    for (Entry& e : c.entries) {
      const bool same_bytes =
          matches(e, w, src, packing, block) &&
          same_memory(e.source.const_data_ptr(), src.const_data_ptr(), static_cast<int64_t>(src.nbytes()));
      if (same_bytes) {
        e.last_use = ++c.clock_ticks;
        ++c.hits;
        return e.packed;
      }
    }
  }
  at::Tensor packed = pack();
  Entry fresh{w.const_data_ptr(), packing, block, src.clone(at::MemoryFormat::Preserve), packed, 0};
  std::lock_guard<std::mutex> lock(c.mutex);
  fresh.last_use = ++c.clock_ticks;
  auto& entries = c.entries;
  entries.erase(std::remove_if(entries.begin(), entries.end(),
                               [&](const Entry& e) { return matches(e, w, src, packing, block); }),
                entries.end());
  entries.push_back(std::move(fresh));
  int64_t total = 0;
  for (const Entry& e : entries) total += bytes(e);
  while (entries.size() > 1 && (entries.size() > kMaxEntries || total > kMaxBytes)) {
    auto oldest = std::min_element(entries.begin(), entries.end(),
                                   [](const Entry& a, const Entry& b) { return a.last_use < b.last_use; });
    total -= bytes(*oldest);
    entries.erase(oldest);
  }
  return packed;
}

int64_t pack_cache_entries() {
  std::lock_guard<std::mutex> lock(cache().mutex);
  return static_cast<int64_t>(cache().entries.size());
}

int64_t pack_cache_hits() {
  std::lock_guard<std::mutex> lock(cache().mutex);
  return cache().hits;
}

}  // namespace bam_fused
