// ATen launcher of the CUDA reduce/pool kernel: checks, stream, device guard, checked launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../ops.h"
#include "reduce_pool.cuh"

namespace bam_fused {

std::tuple<at::Tensor, at::Tensor> reduce_pool_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const int64_t Cr = w.size(0);
  const bool channels_last = !x.is_contiguous();
  const int64_t n_pb = (HW + cuda::kPixels - 1) / cuda::kPixels;
  const int64_t n_groups = (Cr + cuda::kGroup - 1) / cuda::kGroup;
  auto opts = x.options().dtype(at::kFloat);
  auto pooled_part = at::zeros({N, n_pb, C}, opts);
  auto y = at::empty({N, Cr, H, W}, opts);
  if (N * HW > 0 && C > 0) {
    TORCH_CHECK(N * n_pb <= INT32_MAX && n_groups <= 65535, "bam_fused_C::branches: x is too large for one launch: ",
                x.sizes());
    const dim3 grid(static_cast<unsigned>(N * n_pb), static_cast<unsigned>(n_groups));
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bam_reduce_pool_cuda", [&] {
      auto launch = [&](auto kernel) {
        kernel<<<grid, cuda::kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<float>(),
                                                    b.const_data_ptr<float>(), y.mutable_data_ptr<float>(),
                                                    pooled_part.mutable_data_ptr<float>(), C, HW, Cr, n_pb);
      };
      if (channels_last)
        launch(cuda::reduce_pool_kernel<scalar_t, true>);
      else
        launch(cuda::reduce_pool_kernel<scalar_t, false>);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    y.zero_();
  }
  auto pooled = pooled_part.sum(1).div_(static_cast<double>(std::max<int64_t>(HW, 1)));
  return {pooled, y};
}

}  // namespace bam_fused
