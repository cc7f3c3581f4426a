// Byte comparisons of the eval path's weight checks (BAM.folded()'s same_bytes, the packed-weight
// cache), over the threads when they are large: at C = 1024 a BAM's layers hold about 1.1 MB,
// compared with as much again in the kept copy on every call.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <iterator>

namespace bam_fused {

// n bytes at a to compare with n bytes at b.
struct ByteSpan {
  const char* a;
  const char* b;
  int64_t n;
};

// Below this many bytes in all one thread compares: a parallel region costs a few microseconds.
constexpr int64_t kParallelCompareBytes = int64_t{256} << 10;
constexpr int64_t kCompareGrainBytes = int64_t{64} << 10;

// Whether every span's two ranges hold the same bytes.
template <typename Spans>
bool same_memory(const Spans& spans) {
  int64_t total = 0;
  for (const ByteSpan& s : spans) total += s.n;
  if (total < kParallelCompareBytes) {
    return std::all_of(std::begin(spans), std::end(spans), [](const ByteSpan& s) {
      return s.n == 0 || std::memcmp(s.a, s.b, static_cast<size_t>(s.n)) == 0;
    });
  }
  // Pieces of at most kCompareGrainBytes, none across two spans, shared out to the threads.
  c10::SmallVector<ByteSpan, 64> pieces;
  for (const ByteSpan& s : spans) {
    for (int64_t off = 0; off < s.n; off += kCompareGrainBytes) {
      pieces.push_back({s.a + off, s.b + off, std::min(kCompareGrainBytes, s.n - off)});
    }
  }
  std::atomic<bool> differ{false};
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end && !differ.load(std::memory_order_relaxed); ++i) {
      const ByteSpan& p = pieces[i];
      if (std::memcmp(p.a, p.b, static_cast<size_t>(p.n)) != 0) differ.store(true, std::memory_order_relaxed);
    }
  });
  return !differ.load();
}

inline bool same_memory(const void* a, const void* b, int64_t n) {
  const ByteSpan one[1] = {{static_cast<const char*>(a), static_cast<const char*>(b), n}};
  return same_memory(one);
}

}  // namespace bam_fused
