// Runs CUDA kernels on the CPU, one block at a time, one std::thread per CUDA thread, so that
// their indexing, shared-memory and warp-shuffle logic can be tested without a GPU. Not a
// memory-model emulator: it checks what the kernel computes, not how fast or how racy.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) float4 {
  float x, y, z, w;
};

inline thread_local dim3 threadIdx, blockIdx;
inline std::barrier<>* simt_barrier = nullptr;
inline float simt_shuffle_slots[1024];

#define __global__
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__
#define __align__(n) __attribute__((aligned(n)))

inline void __syncthreads() { simt_barrier->arrive_and_wait(); }

// Every thread of the block calls this together (true for uniform code, as in our kernels).
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const unsigned t = threadIdx.x;
  simt_shuffle_slots[t] = v;
  __syncthreads();
  const float r = simt_shuffle_slots[t ^ static_cast<unsigned>(lane_mask)];
  __syncthreads();
  return r;
}

// simt_launch(grid, threads, [&] { kernel(args...); }): blocks run one after another.
inline void simt_launch(dim3 grid, unsigned threads, const std::function<void()>& body) {
  for (unsigned bz = 0; bz < grid.z; ++bz)
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::barrier<> bar(threads);
      simt_barrier = &bar;
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (unsigned t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
          threadIdx = dim3(t);
          blockIdx = dim3(bx, by, bz);
          body();
        });
      for (auto& th : pool) th.join();
    }
}

// Reads v.size() floats from stdin (the drivers' input); false if they are not all there.
inline bool simt_read(std::vector<float>& v) { return std::fread(v.data(), 4, v.size(), stdin) == v.size(); }
