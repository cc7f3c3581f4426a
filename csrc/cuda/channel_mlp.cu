// ATen launcher of the channel MLP kernel (channel_mlp.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../check.h"
#include "../ops.h"
#include "channel_mlp.cuh"

namespace bam_fused {

std::tuple<at::Tensor, at::Tensor> channel_mlp_cuda(const at::Tensor& part, const at::Tensor& w0,
                                                    const at::Tensor& b0, const at::Tensor& w1,
                                                    const at::Tensor& b1) {
  const c10::cuda::CUDAGuard guard(part.device());
  const int64_t N = part.size(0), P = part.size(1), C = part.size(2), Cr = w0.size(0);
  auto opts = part.options().dtype(at::kFloat);
  auto pooled = at::empty({N, C}, opts);
  auto out = at::empty({N, C}, opts);
  if (N == 0 || C == 0) return {pooled, out};
  BAM_CHECK(N <= INT32_MAX, "bam_fused_C::attention: batch too large for one launch: ", N);
  auto h = at::empty({N, Cr}, opts);
  cuda::channel_mlp_kernel<<<static_cast<unsigned>(N), cuda::kMlpThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      part.const_data_ptr<float>(), w0.const_data_ptr<float>(), b0.const_data_ptr<float>(), w1.const_data_ptr<float>(),
      b1.const_data_ptr<float>(), pooled.mutable_data_ptr<float>(), h.mutable_data_ptr<float>(),
      out.mutable_data_ptr<float>(), P, C, Cr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {pooled, out};
}

}  // namespace bam_fused
