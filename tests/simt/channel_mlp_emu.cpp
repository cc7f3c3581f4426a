// Drives csrc/cuda/channel_mlp.cuh through simt_emu.h.
// stdin: int64 N, P, C, Cr, then float part (N*P*C), w0 (Cr*C), b0 (Cr), w1 (C*Cr), b1 (C).
// stdout: float pooled (N*C), then out (N*C).
#include <cstdio>
#include <vector>

#include "simt_emu.h"
#include "cuda/channel_mlp.cuh"

using namespace bam_fused::cuda;

int main() {
  int64_t hdr[4];
  if (std::fread(hdr, sizeof(int64_t), 4, stdin) != 4) return 2;
  const int64_t N = hdr[0], P = hdr[1], C = hdr[2], Cr = hdr[3];
  std::vector<float> part(N * P * C), w0(Cr * C), b0(Cr), w1(C * Cr), b1(C);
  if (!simt_read(part) || !simt_read(w0) || !simt_read(b0) || !simt_read(w1) || !simt_read(b1)) return 2;
  std::vector<float> pooled(N * C, -1.f), h(N * Cr, -1.f), out(N * C, -1.f);
  simt_launch(dim3(N), kMlpThreads, [&] {
    channel_mlp_kernel(part.data(), w0.data(), b0.data(), w1.data(), b1.data(), pooled.data(), h.data(), out.data(), P,
                       C, Cr);
  });
  std::fwrite(pooled.data(), 4, pooled.size(), stdout);
  std::fwrite(out.data(), 4, out.size(), stdout);
  return 0;
}
