// CPU half of the branch op's pass over x: channel means and relu(W x + b) per pixel.
//
// Each task takes a fixed block of pixels of one sample, brings it into cache once (as fp32),
// sums it into per-block channel partials and multiplies it by W with BLAS. The partials are
// added in a fixed order afterwards, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../ops.h"

namespace bam_fused {
namespace {

// Pixels per block: the fp32 block (C x P) stays within about 256 KiB of cache.
int64_t pixels_per_block(int64_t C) { return std::clamp<int64_t>((65536 / std::max<int64_t>(C, 1)) / 16 * 16, 16, 512); }

template <typename T>
void load_block(const T* src, int64_t rows, int64_t cols, int64_t ld, float* dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[i * cols + j] = static_cast<float>(src[i * ld + j]);
}

struct Problem {
  int64_t C, HW, Cr, P, n_pb;
  bool channels_last;
  const at::Tensor* w;
  const float* b;
  float* y;       // (N, Cr, HW)
  float* pooled;  // (N, n_pb, C) partial sums
};

// One block of P pixels of sample n: channel partial sums and relu(W x + b).
template <typename scalar_t>
void reduce_pool_block(const Problem& pr, const scalar_t* x, int64_t task, std::vector<float>& xbuf,
                       std::vector<float>& ybuf) {
  const int64_t C = pr.C, HW = pr.HW, Cr = pr.Cr;
  const int64_t n = task / pr.n_pb, p0 = (task % pr.n_pb) * pr.P, np = std::min(pr.P, HW - p0);
  const scalar_t* xs = x + n * C * HW;
  float* part = pr.pooled + task * C;
  // fp32 blocks are used in place; other dtypes are converted into the buffer once.
  const float* xb;
  int64_t ld;
  if constexpr (std::is_same_v<scalar_t, float>) {
    xb = pr.channels_last ? xs + p0 * C : xs + p0;
    ld = pr.channels_last ? C : HW;
  } else {
    xbuf.resize(pr.P * C);
    if (pr.channels_last)
      load_block(xs + p0 * C, np, C, C, xbuf.data());
    else
      load_block(xs + p0, C, np, HW, xbuf.data());
    xb = xbuf.data();
    ld = pr.channels_last ? C : np;
  }
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  // BLAS (through ATen) multiplies the block while it is in cache; inside parallel_for it
  // runs single-threaded.
  auto y_block = at::from_blob(ybuf.data(), {Cr, np}, opts);
  if (!pr.channels_last) {  // C rows of np pixels
    for (int64_t c = 0; c < C; ++c) {
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t p = 0; p < np; ++p) acc += xb[c * ld + p];
      part[c] = acc;
    }
    at::mm_out(y_block, *pr.w, at::from_blob(const_cast<float*>(xb), {C, np}, {ld, 1}, opts));
  } else {  // np pixels of C channels
    std::fill(part, part + C, 0.f);
    for (int64_t p = 0; p < np; ++p) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) part[c] += xb[p * ld + c];
    }
    at::mm_out(y_block, *pr.w, at::from_blob(const_cast<float*>(xb), {np, C}, {ld, 1}, opts).t());
  }
  for (int64_t r = 0; r < Cr; ++r) {
    float* yr = pr.y + (n * Cr + r) * HW + p0;
    const float bias = pr.b[r];
    for (int64_t p = 0; p < np; ++p) yr[p] = std::max(ybuf[r * np + p] + bias, 0.f);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> reduce_pool_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const int64_t Cr = w.size(0);
  const int64_t P = pixels_per_block(C);
  const int64_t n_pb = (HW + P - 1) / P;
  auto pooled_part = at::empty({N, n_pb, C}, x.options().dtype(at::kFloat));
  auto y = at::empty({N, Cr, x.size(2), x.size(3)}, x.options().dtype(at::kFloat));
  const Problem pr{C, HW, Cr, P, n_pb, !x.is_contiguous(), &w, b.const_data_ptr<float>(),
                   y.mutable_data_ptr<float>(), pooled_part.mutable_data_ptr<float>()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bam_reduce_pool_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, N * n_pb, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> xbuf, ybuf(P * Cr);
      for (int64_t task = begin; task < end; ++task) reduce_pool_block<scalar_t>(pr, xp, task, xbuf, ybuf);
    });
  });
  auto pooled = pooled_part.sum(1).div_(static_cast<double>(std::max<int64_t>(HW, 1)));
  return {pooled, y};
}

}  // namespace bam_fused
