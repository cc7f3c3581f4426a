// Memory to bring into the cache while a compute-bound kernel runs, torch-free.
//
// bam_eval (csrc/bam_fused.cpp) takes the batch in groups of samples; the dilated convs of one
// group compute on the small y and leave the memory idle, while the next group's pass over x
// will wait on it. So the convs' tasks prefetch the next group's x, a few lines per step of
// their loops, and that pass finds it in the cache. AVX2, 2-core Zen 3 (32 MB L3), fp32, N = 8,
// paired in one process, 2026-11-27: the whole BAM eval 1.05-1.09x at 256 x 56x56 (one sample
// a group; 1.13x on one thread), 1.045x at 1024 x 14x14 (five), 0.97-1.01x at 512 x 28x28 (two).
#pragma once

#include <atomic>
#include <cstdint>

namespace bam_fused {

// A span of bytes to prefetch (none when bytes <= 0).
struct CacheHint {
  const void* data = nullptr;
  int64_t bytes = 0;
};

// Task `task` of `tasks`' share of a hint, in whole 64-byte lines, prefetched over `steps`
// calls of step() (into L2: prefetcht1; AMD's L2 spills into its L3). Prefetches never fault,
// so a share may reach into a partial line past the span's end.
class PrefetchDrip {
 public:
  PrefetchDrip() = default;  // prefetches nothing
  PrefetchDrip(const CacheHint& hint, int64_t task, int64_t tasks, int64_t steps) {
    if (hint.data == nullptr || hint.bytes <= 0 || tasks <= 0 || steps <= 0) return;
    const int64_t lines = (hint.bytes + kLine - 1) / kLine, first = lines * task / tasks;
    next_ = static_cast<const char*>(hint.data) + first * kLine;
    left_ = lines_ = lines * (task + 1) / tasks - first;
    per_step_ = (left_ + steps - 1) / steps;
  }
  inline void step() {
    for (int64_t i = 0; i < per_step_ && left_ > 0; ++i, --left_, next_ += kLine) __builtin_prefetch(next_, 0, 2);
  }
  // Adds the bytes prefetched (whole lines) to *count, if given: once, after the last step.
  void count(std::atomic<int64_t>* count) const {
    if (count != nullptr) count->fetch_add((lines_ - left_) * kLine, std::memory_order_relaxed);
  }

 private:
  static constexpr int64_t kLine = 64;
  const char* next_ = nullptr;
  int64_t lines_ = 0, left_ = 0, per_step_ = 0;
};

}  // namespace bam_fused
