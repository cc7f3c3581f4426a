// ATen launcher of the spatial branch's dilated convs (spatial_convs.cuh): checks, plan,
// stream, device guard, checked launches.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "../check.h"
#include "../ops.h"
#include "spatial_convs.cuh"

namespace bam_fused {

namespace {

template <int kPx, bool kFinal, typename Idx>
void launch_conv(const at::Tensor& in, const at::Tensor& w, const at::Tensor& b, const at::Tensor& w_fin,
                 const at::Tensor& b_fin, at::Tensor& out, int64_t dilation, const cuda::SpatialPlan& plan,
                 cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.pixel_blocks), static_cast<unsigned>(plan.groups));
  cuda::dilated_conv_kernel<kPx, kFinal, Idx><<<grid, cuda::kConvThreads, 0, stream>>>(
      in.const_data_ptr<float>(), w.const_data_ptr<float>(), b.const_data_ptr<float>(),
      kFinal ? w_fin.const_data_ptr<float>() : nullptr, kFinal ? b_fin.const_data_ptr<float>() : nullptr,
      out.mutable_data_ptr<float>(), in.size(0), in.size(1), in.size(2), in.size(3), dilation, w.stride(0), w.stride(1),
      w.stride(2), w.stride(3));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kFinal>
void launch_conv_px(const at::Tensor& in, const at::Tensor& w, const at::Tensor& b, const at::Tensor& w_fin,
                    const at::Tensor& b_fin, at::Tensor& out, int64_t dilation, const cuda::SpatialPlan& plan,
                    cudaStream_t stream) {
  if (plan.wide)
    launch_conv<1, kFinal, int64_t>(in, w, b, w_fin, b_fin, out, dilation, plan, stream);
  else if (plan.px == 2) launch_conv<2, kFinal, int32_t>(in, w, b, w_fin, b_fin, out, dilation, plan, stream);
  else launch_conv<1, kFinal, int32_t>(in, w, b, w_fin, b_fin, out, dilation, plan, stream);
}

}  // namespace

at::Tensor spatial_convs_cuda(const at::Tensor& y, at::TensorList w_dilated, at::TensorList b_dilated,
                              int64_t dilation, const at::Tensor& w_final, const at::Tensor& b_final) {
  BAM_CHECK(!w_dilated.empty(), "bam_fused_C::branches: the CUDA spatial kernel needs at least one dilated conv");
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t N = y.size(0), Cr = y.size(1), H = y.size(2), W = y.size(3), HW = H * W;
  auto opts = y.options().dtype(at::kFloat);
  auto spatial = at::empty({N, H, W}, opts);
  if (N * HW == 0) return spatial;
  // Past the map's size every off-centre tap falls in the zero padding: the same result, and the
  // kernel's tap arithmetic cannot overflow.
  dilation = std::min(dilation, std::max(H, W));
  const auto plan = cuda::plan_spatial(N, HW, Cr, 2 * cuda_multiprocessors(y.device().index()));
  BAM_CHECK(plan.pixel_blocks <= INT32_MAX && plan.groups <= 65535,
            "bam_fused_C::branches: the spatial map is too large for one launch: ", y.sizes());
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor cur = y.contiguous();
  for (size_t i = 0; i + 1 < w_dilated.size(); ++i) {
    auto next = at::empty_like(cur);
    launch_conv_px<false>(cur, w_dilated[i], b_dilated[i].contiguous(), w_final, b_final, next,
                          dilation, plan, stream);
    cur = next;
  }
  auto part = plan.groups > 1 ? at::empty({plan.groups, N, H, W}, opts) : spatial;
  launch_conv_px<true>(cur, w_dilated.back(), b_dilated.back().contiguous(), w_final.contiguous(),
                       b_final.contiguous(), part, dilation, plan, stream);
  if (plan.groups > 1) {
    const int64_t numel = N * HW;
    cuda::sum_groups_kernel<<<static_cast<unsigned>(cuda::ceil_div(numel, cuda::kConvThreads)),
                              cuda::kConvThreads, 0, stream>>>(part.const_data_ptr<float>(),
                                                               spatial.mutable_data_ptr<float>(), numel, plan.groups);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return spatial;
}

}  // namespace bam_fused
