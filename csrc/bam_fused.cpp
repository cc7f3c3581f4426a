// Op schemas (TORCH_LIBRARY), the device-independent part of the branch op, and build info.
#include <ATen/ATen.h>
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "ops.h"

namespace bam_fused {

std::tuple<at::Tensor, at::Tensor> branches(const at::Tensor& x, const at::Tensor& w_reduce,
                                            const at::Tensor& b_reduce, at::TensorList w_dilated,
                                            at::TensorList b_dilated, int64_t dilation,
                                            const at::Tensor& w_final, const at::Tensor& b_final) {
  TORCH_CHECK(x.dim() == 4, "bam_fused_C::branches: x must be 4-D (N, C, H, W), got sizes ", x.sizes());
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "bam_fused_C::branches: x must be NCHW- or channels_last-contiguous, got strides ", x.strides());
  const int64_t C = x.size(1);
  TORCH_CHECK(w_reduce.dim() == 2 && w_reduce.size(1) == C && w_reduce.scalar_type() == at::kFloat &&
                  w_reduce.is_contiguous(),
              "bam_fused_C::branches: w_reduce must be contiguous fp32 (Cr, ", C, "), got ", w_reduce.sizes(), " ",
              w_reduce.scalar_type());
  const int64_t Cr = w_reduce.size(0);
  TORCH_CHECK(b_reduce.numel() == Cr && b_reduce.scalar_type() == at::kFloat && b_reduce.is_contiguous(),
              "bam_fused_C::branches: b_reduce must be contiguous fp32 (", Cr, ",), got ", b_reduce.sizes());
  TORCH_CHECK(w_dilated.size() == b_dilated.size(), "bam_fused_C::branches: w_dilated and b_dilated differ in length");
  TORCH_CHECK(dilation >= 1, "bam_fused_C::branches: dilation must be >= 1, got ", dilation);
  TORCH_CHECK(w_final.numel() == Cr && b_final.numel() == 1 && w_final.scalar_type() == at::kFloat &&
                  b_final.scalar_type() == at::kFloat,
              "bam_fused_C::branches: w_final must be fp32 with ", Cr, " elements and b_final fp32 with 1, got ",
              w_final.numel(), " ", w_final.scalar_type(), " and ", b_final.numel(), " ", b_final.scalar_type());
  for (const auto& t : {w_reduce, b_reduce, w_final, b_final})
    TORCH_CHECK(t.device() == x.device(), "bam_fused_C::branches: weights must be on x's device ", x.device());

  for (size_t i = 0; i < w_dilated.size(); ++i) {
    TORCH_CHECK(w_dilated[i].dim() == 4 && w_dilated[i].size(0) == Cr && w_dilated[i].size(1) == Cr &&
                    w_dilated[i].size(2) == 3 && w_dilated[i].size(3) == 3 && w_dilated[i].scalar_type() == at::kFloat,
                "bam_fused_C::branches: w_dilated[", i, "] must be fp32 (", Cr, ", ", Cr, ", 3, 3), got ",
                w_dilated[i].sizes(), " ", w_dilated[i].scalar_type());
    TORCH_CHECK(b_dilated[i].numel() == Cr && b_dilated[i].scalar_type() == at::kFloat,
                "bam_fused_C::branches: b_dilated[", i, "] must be fp32 with ", Cr, " elements, got ",
                b_dilated[i].sizes(), " ", b_dilated[i].scalar_type());
    TORCH_CHECK(w_dilated[i].device() == x.device() && b_dilated[i].device() == x.device(),
                "bam_fused_C::branches: weights must be on x's device ", x.device());
  }

  at::Tensor pooled, y;
#ifdef BAM_FUSED_WITH_CUDA
  std::tie(pooled, y) = x.is_cuda() ? reduce_pool_cuda(x, w_reduce, b_reduce) : reduce_pool_cpu(x, w_reduce, b_reduce);
#else
  TORCH_CHECK(x.is_cpu(), "bam_fused_C::branches: this build has no CUDA kernels, x is on ", x.device());
  std::tie(pooled, y) = reduce_pool_cpu(x, w_reduce, b_reduce);
#endif
  at::Tensor spatial;
#ifdef BAM_FUSED_WITH_CUDA
  // On CUDA our kernel runs the dilated convs and the final conv (spatial_convs.cuh says why).
  if (x.is_cuda() && !w_dilated.empty())
    spatial = spatial_convs_cuda(y, w_dilated, b_dilated, dilation, w_final, b_final);
#endif
  if (!spatial.defined()) {
    // On the CPU the library's convs are the right tool: the map is about 1/16 of x's bytes.
    for (size_t i = 0; i < w_dilated.size(); ++i)
      y = at::conv2d(y, w_dilated[i], b_dilated[i].reshape({Cr}), 1, dilation, dilation).relu_();
    spatial = at::conv2d(y, w_final.reshape({1, Cr, 1, 1}), b_final.reshape({1})).squeeze(1);
  }
  return {pooled, spatial};
}

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
  d["available"] = true;
#ifdef BAM_FUSED_WITH_CUDA
  d["with_cuda"] = true;
#ifdef BAM_FUSED_CUDA_ARCHS
  d["cuda_archs"] = BAM_FUSED_CUDA_ARCHS;
#endif
#else
  d["with_cuda"] = false;
#endif
  d["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                       std::to_string(TORCH_VERSION_PATCH);
  d["compiler"] = __VERSION__;
  return d;
}

}  // namespace

TORCH_LIBRARY(bam_fused_C, m) {
  m.def("gate_forward(Tensor x, Tensor row, Tensor col, bool product) -> Tensor");
  m.def("gate_backward(Tensor grad, Tensor x, Tensor row, Tensor col, bool product) -> (Tensor, Tensor, Tensor)");
  m.def(
      "branches(Tensor x, Tensor w_reduce, Tensor b_reduce, Tensor[] w_dilated, Tensor[] b_dilated, int dilation, "
      "Tensor w_final, Tensor b_final) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bam_fused_C, CPU, m) { m.impl("branches", &branches); }
#ifdef BAM_FUSED_WITH_CUDA
TORCH_LIBRARY_IMPL(bam_fused_C, CUDA, m) { m.impl("branches", &branches); }
#endif

}  // namespace bam_fused

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("build_info", &bam_fused::build_info, "How this extension was built"); }
