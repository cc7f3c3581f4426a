// Declarations shared by the op registrations (bam_fused.cpp) and the device kernels.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace bam_fused {

// (N, C) channel means and relu(w @ x + b) as (N, Cr, H, W) fp32, in one pass over x.
// x is NCHW- or channels_last-contiguous; w is (Cr, C) and b (Cr,) fp32.
std::tuple<at::Tensor, at::Tensor> reduce_pool_cpu(const at::Tensor& x, const at::Tensor& w,
                                                   const at::Tensor& b);
#ifdef BAM_FUSED_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> reduce_pool_cuda(const at::Tensor& x, const at::Tensor& w,
                                                    const at::Tensor& b);
// The dilated 3x3 convs (bias, ReLU) on y (N, Cr, H, W) fp32 and the final 1x1 conv: (N, H, W).
at::Tensor spatial_convs_cuda(const at::Tensor& y, at::TensorList w_dilated, at::TensorList b_dilated,
                              int64_t dilation, const at::Tensor& w_final, const at::Tensor& b_final);
// Multiprocessors of a CUDA device (cached).
int cuda_multiprocessors(int device);
#endif

// The whole eval-mode branch op: pooled means (N, C) and the spatial map (N, H, W), fp32.
std::tuple<at::Tensor, at::Tensor> branches(const at::Tensor& x, const at::Tensor& w_reduce,
                                            const at::Tensor& b_reduce, at::TensorList w_dilated,
                                            at::TensorList b_dilated, int64_t dilation,
                                            const at::Tensor& w_final, const at::Tensor& b_final);

}  // namespace bam_fused
