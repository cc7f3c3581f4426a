// Threads over the chunk tasks of the CPU kernels, split by work rather than by count.
//
// A task is one chunk of one sample: `chunk` units (pixels, or Winograd tiles) of the sample's
// `units`, so a sample's last chunk is often short. at::parallel_for splits by count, which
// left one thread idle while the other ran its extra chunks: 1 x 56x56 in 17 chunks of 192
// pixels (the last 64) went 9 : 7.33 chunks of work, the other thread waiting 18% of the pass
// (bam_eval runs such single-sample groups, eval_group). Here each thread's range starts at the
// task nearest its share of all units: 8.33 : 8. Which thread runs a task never changes its
// result (each task's partials are fixed by the shape), so the bits stay the same.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace bam_fused {

// Runs f(begin, end) over tasks [0, N * chunks) in parallel, each thread one range of tasks with
// about an equal share of the N * units units; chunks = ceil(units / chunk) (at least 1).
template <typename F>
void parallel_chunks(int64_t N, int64_t chunks, int64_t chunk, int64_t units, const F& f) {
  const int64_t tasks = N * chunks;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  if (threads <= 1 || units <= 0 || at::in_parallel_region()) {
    if (tasks > 0) f(int64_t{0}, tasks);
    return;
  }
  // The first task of thread t: the task whose first unit is nearest t's share of all units.
  const auto first_task = [&](int64_t t) {
    const int64_t target = N * units * t / threads, n = target / units, r = target % units;
    const int64_t k = r / chunk, lo = k * chunk, hi = std::min(units, lo + chunk);
    return n * chunks + k + (hi - r < r - lo ? 1 : 0);
  };
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t begin = first_task(t), end = t + 1 == threads ? tasks : first_task(t + 1);
      if (begin < end) f(begin, end);
    }
  });
}

}  // namespace bam_fused
