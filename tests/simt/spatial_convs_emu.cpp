// Drives csrc/cuda/spatial_convs.cuh through simt_emu.h, as the launcher (spatial_convs.cu) does.
// stdin: int64 N, Cr, H, W, dilation, convs, min_blocks, w_channels_last, wide (1: take the
// 64-bit plane indexing that the plan keeps for planes past 2^31 pixels), then float y
// (N*Cr*H*W, NCHW), per conv w (Cr*Cr*9 as (co, ci, kh, kw), or channels_last: (co, kh, kw, ci))
// and b (Cr), then w_fin (Cr) and b_fin (1). stdout: int64 px, groups, then float spatial (N*H*W).
#include <cstdio>
#include <vector>

#include "simt_emu.h"
#include "cuda/spatial_convs.cuh"

using namespace bam_fused::cuda;

int64_t w_strides[4];  // co, ci, kh, kw

template <int kPx, bool kFinal, typename Idx>
void conv(const SpatialPlan& p, const float* in, const float* w, const float* b, const float* wf, const float* bf,
          float* out, int64_t N, int64_t Cr, int64_t H, int64_t W, int64_t dil) {
  simt_launch(dim3(p.pixel_blocks, p.groups), kConvThreads,
              [&] {
                dilated_conv_kernel<kPx, kFinal, Idx>(in, w, b, wf, bf, out, N, Cr, H, W, dil, w_strides[0], w_strides[1],
                                                 w_strides[2], w_strides[3]);
              });
}

template <bool kFinal>
void conv_px(const SpatialPlan& p, const float* in, const float* w, const float* b, const float* wf,
             const float* bf, float* out, int64_t N, int64_t Cr, int64_t H, int64_t W, int64_t dil) {
  if (p.wide) conv<1, kFinal, int64_t>(p, in, w, b, wf, bf, out, N, Cr, H, W, dil);
  else if (p.px == 2) conv<2, kFinal, int32_t>(p, in, w, b, wf, bf, out, N, Cr, H, W, dil);
  else conv<1, kFinal, int32_t>(p, in, w, b, wf, bf, out, N, Cr, H, W, dil);
}

int main() {
  int64_t hdr[9];
  if (std::fread(hdr, sizeof(int64_t), 9, stdin) != 9) return 2;
  const int64_t N = hdr[0], Cr = hdr[1], H = hdr[2], W = hdr[3], dil = hdr[4], convs = hdr[5];
  const int64_t numel = N * H * W;
  const int64_t nchw[4] = {Cr * 9, 9, 3, 1}, nhwc[4] = {Cr * 9, 1, 3 * Cr, Cr};
  for (int k = 0; k < 4; ++k) w_strides[k] = hdr[7] ? nhwc[k] : nchw[k];
  std::vector<float> cur(N * Cr * H * W), wf(Cr), bf(1);
  std::vector<std::vector<float>> ws, bs;
  if (!simt_read(cur)) return 2;
  for (int64_t i = 0; i < convs; ++i) {
    ws.emplace_back(Cr * Cr * 9);
    bs.emplace_back(Cr);
    if (!simt_read(ws.back()) || !simt_read(bs.back())) return 2;
  }
  if (!simt_read(wf) || !simt_read(bf) || convs < 1) return 2;
  SpatialPlan p = plan_spatial(N, H * W, Cr, hdr[6]);
  if (hdr[8]) {  // as the plan makes it for a plane past 2^31 pixels
    p.wide = true;
    p.px = 1;
    p.pixel_blocks = ceil_div(numel, kConvThreads);
  }
  for (int64_t i = 0; i + 1 < convs; ++i) {
    std::vector<float> next(cur.size(), -1.f);
    conv_px<false>(p, cur.data(), ws[i].data(), bs[i].data(), nullptr, nullptr, next.data(), N, Cr, H, W, dil);
    cur.swap(next);
  }
  std::vector<float> part(p.groups * numel, -1.f), spatial(numel, -1.f);
  conv_px<true>(p, cur.data(), ws.back().data(), bs.back().data(), wf.data(), bf.data(), part.data(), N, Cr, H, W,
                dil);
  simt_launch(dim3(ceil_div(numel, kConvThreads)), kConvThreads,
              [&] { sum_groups_kernel(part.data(), spatial.data(), numel, p.groups); });
  const int64_t meta[2] = {p.px, p.groups};
  std::fwrite(meta, sizeof(int64_t), 2, stdout);
  std::fwrite(spatial.data(), 4, spatial.size(), stdout);
  return 0;
}
