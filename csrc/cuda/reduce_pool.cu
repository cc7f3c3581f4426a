// ATen launcher of the CUDA reduce/pool kernels: checks, plan, stream, device guard, checked launches.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../check.h"
#include "../ops.h"
#include "reduce_pool.cuh"

namespace bam_fused {

int cuda_multiprocessors(int device) {
  // Cached per device: the attribute query is cheap but not free, and this runs every call.
  static int cache[64] = {};
  if (device < 0 || device >= 64) device = 0;
  if (cache[device] == 0) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    cache[device] = sms;
  }
  return cache[device];
}

namespace {

template <typename scalar_t, int kRows>
void launch_reduce_pool(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, at::Tensor& y,
                        at::Tensor& y_part, at::Tensor& pooled_part, const cuda::ReducePoolPlan& plan,
                        bool y_channels_last, cudaStream_t stream) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), Cr = w.size(0);
  const bool channels_last = !x.is_contiguous();
  const dim3 grid(static_cast<unsigned>(N * plan.pixel_blocks), static_cast<unsigned>(plan.row_groups),
                  static_cast<unsigned>(plan.splits));
  const auto* xp = x.const_data_ptr<scalar_t>();
  // Vector loads need 4-element alignment of every row start (NCHW rows are HW long).
  const bool vec = HW % 4 == 0 && reinterpret_cast<uintptr_t>(xp) % (4 * sizeof(scalar_t)) == 0;
  float* part = plan.splits > 1 ? y_part.mutable_data_ptr<float>() : nullptr;
  auto kernel = channels_last ? cuda::reduce_pool_kernel<scalar_t, true, kRows>
                              : cuda::reduce_pool_kernel<scalar_t, false, kRows>;
  kernel<<<grid, cuda::kThreads, 0, stream>>>(xp, w.const_data_ptr<float>(), b.const_data_ptr<float>(),
                                              y.mutable_data_ptr<float>(), part,
                                              pooled_part.mutable_data_ptr<float>(), N, C, HW, Cr,
                                              plan.pixel_blocks, plan.chunks_per_split, vec,
                                              1.f / static_cast<float>(HW), y_channels_last);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> reduce_pool_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                                    bool y_channels_last) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), Cr = w.size(0);
  const int64_t sms = cuda_multiprocessors(x.device().index());
  const auto plan = cuda::plan_reduce_pool(N, C, HW, Cr, 2 * sms);
  auto opts = x.options().dtype(at::kFloat);
  auto pooled_part = at::empty({N, plan.pixel_blocks, C}, opts);
  auto y = at::empty({N, Cr, x.size(2), x.size(3)},
                     opts.memory_format(y_channels_last ? at::MemoryFormat::ChannelsLast
                                                        : at::MemoryFormat::Contiguous));
  if (N * HW > 0 && C > 0) {
    BAM_CHECK(N * plan.pixel_blocks <= INT32_MAX && plan.row_groups <= 65535 && plan.splits <= 65535 &&
                  y.numel() / cuda::kThreads < INT32_MAX,
              "bam_fused_C::branches: x is too large for one launch: ", x.sizes());
    auto y_part = plan.splits > 1 ? at::empty({plan.splits, N, Cr, HW}, opts) : at::Tensor();
    auto stream = c10::cuda::getCurrentCUDAStream();
    auto launch = [&](auto tag) {
      using scalar_t = decltype(tag);
      const bool cl = y_channels_last;
      switch (plan.rows) {
        case 16: launch_reduce_pool<scalar_t, 16>(x, w, b, y, y_part, pooled_part, plan, cl, stream); break;
        case 32: launch_reduce_pool<scalar_t, 32>(x, w, b, y, y_part, pooled_part, plan, cl, stream); break;
        default: launch_reduce_pool<scalar_t, 64>(x, w, b, y, y_part, pooled_part, plan, cl, stream); break;
      }
    };
    switch (x.scalar_type()) {  // float64 x is upcast work for the CPU kernel, not this one
      case at::kFloat: launch(float{}); break;
      case at::kHalf: launch(at::Half{}); break;
      case at::kBFloat16: launch(at::BFloat16{}); break;
      default: BAM_CHECK(false, "bam_fused_C::branches: the CUDA kernel takes float32, float16 or bfloat16 x, got ",
                         x.scalar_type());
    }
    if (plan.splits > 1) {
      const int64_t numel = y.numel();
      cuda::reduce_finish_kernel<<<static_cast<unsigned>(cuda::ceil_div(numel, cuda::kThreads)), cuda::kThreads, 0,
                                   stream>>>(y_part.const_data_ptr<float>(), b.const_data_ptr<float>(),
                                             y.mutable_data_ptr<float>(), numel, Cr, HW, plan.splits,
                                             y_channels_last);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  } else {
    y.zero_();
    pooled_part.zero_();
  }
  return {pooled_part, y};  // partial means: the kernel scaled the partial sums by 1/HW
}

}  // namespace bam_fused
