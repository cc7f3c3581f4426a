// Drives csrc/cuda/reduce_pool.cuh through simt_emu.h. stdin: int64 N, C, HW, Cr, channels_last,
// then float x (N*C*HW, in the given layout), w (Cr*C), b (Cr). stdout: float y (N*Cr*HW) and
// pooled partials (N * n_pb * C).
#include <cstdio>
#include <vector>

#include "simt_emu.h"
#include "cuda/reduce_pool.cuh"

int main() {
  int64_t hdr[5];
  if (std::fread(hdr, sizeof(int64_t), 5, stdin) != 5) return 2;
  const int64_t N = hdr[0], C = hdr[1], HW = hdr[2], Cr = hdr[3];
  const bool cl = hdr[4] != 0;
  std::vector<float> x(N * C * HW), w(Cr * C), b(Cr);
  if (std::fread(x.data(), 4, x.size(), stdin) != x.size()) return 2;
  if (std::fread(w.data(), 4, w.size(), stdin) != w.size()) return 2;
  if (std::fread(b.data(), 4, b.size(), stdin) != b.size()) return 2;
  using namespace bam_fused::cuda;
  const int64_t n_pb = (HW + kPixels - 1) / kPixels, groups = (Cr + kGroup - 1) / kGroup;
  std::vector<float> y(N * Cr * HW, -1.f), pooled(N * n_pb * C, -1.f);
  simt_launch(dim3(N * n_pb, groups), kThreads, [&] {
    if (cl)
      reduce_pool_kernel<float, true>(x.data(), w.data(), b.data(), y.data(), pooled.data(), C, HW, Cr, n_pb);
    else
      reduce_pool_kernel<float, false>(x.data(), w.data(), b.data(), y.data(), pooled.data(), C, HW, Cr, n_pb);
  });
  std::fwrite(y.data(), 4, y.size(), stdout);
  std::fwrite(pooled.data(), 4, pooled.size(), stdout);
  return 0;
}
