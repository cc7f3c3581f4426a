// Drives csrc/cuda/reduce_pool.cuh through simt_emu.h, with the launcher's plan.
// stdin: int64 N, C, HW, Cr, channels_last, min_blocks, y_channels_last, then float x (N*C*HW, in the given
// layout), w (Cr*C), b (Cr). stdout: int64 rows, pixel_blocks, splits, then float y (N*Cr*HW,
// NCHW or, with y_channels_last, NHWC)
// and pooled partials (N * pixel_blocks * C), scaled by 1/HW.
#include <cstdio>
#include <vector>

#include "simt_emu.h"
#include "cuda/reduce_pool.cuh"

using namespace bam_fused::cuda;

bool y_cl = false;

template <bool kCL, int kRows>
void run(const ReducePoolPlan& p, const float* x, const float* w, const float* b, float* y, float* y_part,
         float* pooled, int64_t N, int64_t C, int64_t HW, int64_t Cr) {
  const dim3 grid(N * p.pixel_blocks, p.row_groups, p.splits);
  simt_launch(grid, kThreads, [&] {
    reduce_pool_kernel<float, kCL, kRows>(x, w, b, y, p.splits > 1 ? y_part : nullptr, pooled, N, C, HW, Cr,
                                          p.pixel_blocks, p.chunks_per_split, HW % 4 == 0, 1.f / HW, y_cl);
  });
}

template <bool kCL>
void run_rows(const ReducePoolPlan& p, const float* x, const float* w, const float* b, float* y, float* y_part,
              float* pooled, int64_t N, int64_t C, int64_t HW, int64_t Cr) {
  if (p.rows == 16) run<kCL, 16>(p, x, w, b, y, y_part, pooled, N, C, HW, Cr);
  else if (p.rows == 32) run<kCL, 32>(p, x, w, b, y, y_part, pooled, N, C, HW, Cr);
  else run<kCL, 64>(p, x, w, b, y, y_part, pooled, N, C, HW, Cr);
}

int main() {
  int64_t hdr[7];
  if (std::fread(hdr, sizeof(int64_t), 7, stdin) != 7) return 2;
  y_cl = hdr[6] != 0;
  const int64_t N = hdr[0], C = hdr[1], HW = hdr[2], Cr = hdr[3];
  const bool cl = hdr[4] != 0;
  std::vector<float> x(N * C * HW), w(Cr * C), b(Cr);
  if (!simt_read(x) || !simt_read(w) || !simt_read(b)) return 2;
  const ReducePoolPlan p = plan_reduce_pool(N, C, HW, Cr, hdr[5]);
  std::vector<float> y(N * Cr * HW, -1.f), y_part(p.splits * N * Cr * HW, -1.f), pooled(N * p.pixel_blocks * C, -1.f);
  if (cl) run_rows<true>(p, x.data(), w.data(), b.data(), y.data(), y_part.data(), pooled.data(), N, C, HW, Cr);
  else run_rows<false>(p, x.data(), w.data(), b.data(), y.data(), y_part.data(), pooled.data(), N, C, HW, Cr);
  if (p.splits > 1) {
    const int64_t numel = N * Cr * HW;
    simt_launch(dim3(ceil_div(numel, kThreads)), kThreads,
                [&] { reduce_finish_kernel(y_part.data(), b.data(), y.data(), numel, Cr, HW, p.splits, y_cl); });
  }
  const int64_t meta[3] = {p.rows, p.pixel_blocks, p.splits};
  std::fwrite(meta, sizeof(int64_t), 3, stdout);
  std::fwrite(y.data(), 4, y.size(), stdout);
  std::fwrite(pooled.data(), 4, pooled.size(), stdout);
  return 0;
}
