// conv1x1_pool.h, conv1x1_grad.h and dilated_conv.h for any CPU: 4-lane vectors (SSE2, NEON),
// 4 output channels x 3 pixel vectors of accumulators.
#include "conv1x1_grad.h"
#include "conv1x1_pool.h"
#include "dilated_conv.h"

namespace bam_fused {
namespace {

struct Generic {
  typedef float V __attribute__((vector_size(16)));
  static constexpr int kPV = 3, kCo = 4, kAcc = 12;
  // dW blocking (conv1x1_grad.h): NCHW 2 dy rows x 2 x rows (4 lane sums in one tree),
  // channels_last 6 dy rows x 2 vectors.
  static constexpr int kGR = 2, kGC = 2, kWR = 6, kWCv = 2;
  static BAM_INLINE V splat(float s) { return s - V{}; }  // x - 0 == x, signed zeros included
  // The sum of the lanes in a tree of halves, lane i + lane i + kL / 2 first (the dilated convs'
  // final 1x1 conv and the Winograd finiteness check): the same order under every ISA.
  static BAM_INLINE float hsum(V v) { return (v[0] + v[2]) + (v[1] + v[3]); }
};

}  // namespace

BAM_DEFINE_CONV1X1_POOL(generic, Generic)
BAM_DEFINE_CONV1X1_GRAD(generic, Generic)
BAM_DEFINE_DILATED_CONV(generic, Generic)

}  // namespace bam_fused
