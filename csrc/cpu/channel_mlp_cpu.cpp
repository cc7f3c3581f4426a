// The channel MLP of the CPU eval ops: w1 @ relu(w0 @ mean + b0) + b1 per sample, from the pass's
// pooled partial means. Plain loops, vectorised per instruction set (BAM_CLONES): as ATen ops
// (a sum over the partials, two linears and a ReLU: about ten dispatches with their views and
// allocations) it cost more than its arithmetic at the small shapes a BAM sees (C = 256, hidden
// 16, batch 1: 2 x 4K multiply-adds).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../ops.h"
#include "simd.h"

namespace bam_fused {
namespace {

constexpr int kLanes = 16;  // partial sums per dot product: whole vectors for SSE, AVX2 and AVX-512

struct MlpJob {
  int64_t P, C, hidden;
  const float *part, *w0, *b0, *w1, *b1;  // part (N, P, C), w0 (hidden, C), w1 (C, hidden)
  float* out;                             // (N, C)
};

// a . b over n floats: kLanes running sums (each in order), then added in a fixed tree, so the
// result depends on neither the thread count nor the batch.
BAM_INLINE float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  for (int l = 0; i + l < n; ++l) acc[l] += a[i + l] * b[i + l];
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// Samples [begin, end); mean (C) and hid (hidden) are this thread's scratch.
BAM_CLONES void mlp_samples(const MlpJob& j, int64_t begin, int64_t end, float* mean, float* hid) {
  for (int64_t n = begin; n < end; ++n) {
    const float* part = j.part + n * j.P * j.C;
    std::copy(part, part + j.C, mean);
    for (int64_t p = 1; p < j.P; ++p)  // the partials in order: the same sum for any thread count
      for (int64_t c = 0; c < j.C; ++c) mean[c] += part[p * j.C + c];
    for (int64_t h = 0; h < j.hidden; ++h) {
      const float v = j.b0[h] + dot(j.w0 + h * j.C, mean, j.C);
      hid[h] = v < 0.f ? 0.f : v;  // ReLU; NaN stays NaN, as in torch
    }
    float* out = j.out + n * j.C;
    for (int64_t c = 0; c < j.C; ++c) out[c] = j.b1[c] + dot(j.w1 + c * j.hidden, hid, j.hidden);
  }
}

}  // namespace

at::Tensor channel_mlp_cpu(const at::Tensor& part, const at::Tensor& w0, const at::Tensor& b0, const at::Tensor& w1,
                           const at::Tensor& b1) {
  const int64_t N = part.size(0), P = part.size(1), C = part.size(2), hidden = w0.size(0);
  auto out = at::empty({N, C}, part.options());
  const MlpJob j{P, C, hidden, part.const_data_ptr<float>(), w0.const_data_ptr<float>(), b0.const_data_ptr<float>(),
                 w1.const_data_ptr<float>(), b1.const_data_ptr<float>(), out.mutable_data_ptr<float>()};
  // Threads only for batches with at least ~64K multiply-adds a task: a fork costs more than a
  // sample at C = 256.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, 2 * C * hidden + P * C));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(C + hidden);
    mlp_samples(j, begin, end, scratch.data(), scratch.data() + C);
  });
  return out;
}

}  // namespace bam_fused
