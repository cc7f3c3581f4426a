// CPU launcher of the spatial branch after the pass over x (dilated_conv.h): each dilated 3x3
// conv (bias, ReLU) in our vector code, the final 1x1 conv in the last one's epilogue.
// Against oneDNN's NHWC convs plus a matrix-vector product for the final conv, it skips
// oneDNN's per-call setup and the last conv's output in memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "../ops.h"
#include "dilated_conv.h"
#include "isa.h"

namespace bam_fused {
namespace {

void dilated_conv(Isa isa, const DilatedConvJob& j, int64_t begin, int64_t end) {
#if BAM_X86
  if (avx512_vectors(isa)) return dilated_conv_avx512(j, begin, end);
  if (isa == Isa::kAvx2) return dilated_conv_avx2(j, begin, end);
#endif
  dilated_conv_generic(j, begin, end);
}

// (Cr, Cr, 3, 3) -> (9 taps, cob_n, Cr inputs, kCo outputs), zeros past Cr outputs.
at::Tensor pack_dilated(const at::Tensor& w, int64_t kCo) {
  const int64_t Cr = w.size(0), cob_n = (Cr + kCo - 1) / kCo;
  auto padded = at::zeros({cob_n * kCo, Cr, 3, 3}, w.options());
  padded.narrow(0, 0, Cr).copy_(w);
  // (cob, o, i, kh, kw) -> (kh, kw, cob, i, o)
  return padded.view({cob_n, kCo, Cr, 3, 3}).permute({3, 4, 0, 2, 1}).contiguous();
}

// v (Cr elements) zero-padded to n.
at::Tensor padded(const at::Tensor& v, int64_t n) {
  auto out = at::zeros({n}, v.options());
  out.narrow(0, 0, v.numel()).copy_(v.reshape({-1}));
  return out;
}

}  // namespace

at::Tensor spatial_convs_cpu(const at::Tensor& y_in, at::TensorList w_dilated, at::TensorList b_dilated,
                             int64_t dilation, const at::Tensor& w_final, const at::Tensor& b_final) {
  at::Tensor y = y_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = y.size(0), Cr = y.size(1), H = y.size(2), W = y.size(3);
  const Isa isa = chosen_isa();
  const int64_t lanes = blocking(isa).second, cl_vectors = cl_vectors_for(Cr, lanes);
  const int64_t kCo = cl_vectors * lanes, cob_n = (Cr + kCo - 1) / kCo;
  const int64_t chunk_px = chunk_pixels(N, H * W), chunks = std::max<int64_t>(1, (H * W + chunk_px - 1) / chunk_px);
  // Dilations past the map reach only padding: any such dilation gives the same result.
  const int64_t d = std::min(dilation, std::max(H, W));
  const at::Tensor wf = padded(w_final, cob_n * kCo);
  auto spatial = at::empty({N, H, W}, y.options().memory_format(at::MemoryFormat::Contiguous));
  if (spatial.numel() == 0) return spatial;  // no pixels (the kernels divide by W)
  for (size_t i = 0; i < w_dilated.size(); ++i) {
    const bool last = i + 1 == w_dilated.size();
    const at::Tensor wp = pack_dilated(w_dilated[i], kCo), bp = padded(b_dilated[i], cob_n * kCo);
    at::Tensor out = last ? at::Tensor() : at::empty_like(y);
    const DilatedConvJob j{H, W, Cr, d, chunk_px, chunks, y.const_data_ptr<float>(), wp.const_data_ptr<float>(),
                           bp.const_data_ptr<float>(), last ? nullptr : out.mutable_data_ptr<float>(),
                           wf.const_data_ptr<float>(), b_final.item<float>(),
                           last ? spatial.mutable_data_ptr<float>() : nullptr, static_cast<int>(cl_vectors)};
    at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) { dilated_conv(isa, j, begin, end); });
    if (!last) y = out;
  }
  return spatial;
}

}  // namespace bam_fused
