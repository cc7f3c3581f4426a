// CPU launcher of the spatial branch after the pass over x (dilated_conv.h): each dilated 3x3
// conv (bias, ReLU) in our vector code, the final 1x1 conv in the last one's epilogue; in fp32,
// or in bf16 (conv1x1_pool_avx512bf16.cpp) after the pass's bf16 products.
// Against oneDNN's NHWC convs plus a matrix-vector product for the final conv, it skips
// oneDNN's per-call setup and the last conv's output in memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "../check.h"
#include "../env_choice.h"
#include "../ops.h"
#include "dilated_conv.h"
#include "isa.h"
#include "pack_cache.h"
#include "parallel_chunks.h"

namespace bam_fused {
namespace {

void dilated_conv(Isa isa, bool bf16, const DilatedConvJob& j, int64_t begin, int64_t end) {
#if BAM_X86
  if (bf16) return dilated_conv_avx512bf16(j, begin, end);
  if (avx512_vectors(isa)) return dilated_conv_avx512(j, begin, end);
  if (isa == Isa::kAvx2) return dilated_conv_avx2(j, begin, end);
#endif
  dilated_conv_generic(j, begin, end);
}

void dilated_conv_grad_weight(Isa isa, const DilatedGradJob& j, int64_t begin, int64_t end) {
#if BAM_X86
  if (avx512_vectors(isa)) return dilated_conv_grad_weight_avx512(j, begin, end);
  if (isa == Isa::kAvx2) return dilated_conv_grad_weight_avx2(j, begin, end);
#endif
  dilated_conv_grad_weight_generic(j, begin, end);
}

// (Cr, Cr, 3, 3) -> (3, 3 taps, cob_n, Cr inputs, kCo outputs), zeros past Cr outputs.
at::Tensor pack_dilated(const at::Tensor& w, int64_t kCo) {
  const int64_t Cr = w.size(0), cob_n = (Cr + kCo - 1) / kCo;
  auto padded = at::zeros({cob_n * kCo, Cr, 3, 3}, w.options());
  padded.narrow(0, 0, Cr).copy_(w);
  // (cob, o, i, kh, kw) -> (kh, kw, cob, i, o)
  return padded.view({cob_n, kCo, Cr, 3, 3}).permute({3, 4, 0, 2, 1}).contiguous();
}

// pack_dilated's (3, 3, cob_n, Cr, kCo) in bf16 channel pairs: (3, 3, cob_n, Cr / 2, kCo) words
// holding inputs (2 c2, 2 c2 + 1), the even one in the low half (Cr even).
at::Tensor pair_inputs(const at::Tensor& packed) {
  const int64_t cob_n = packed.size(2), Cr = packed.size(3), kCo = packed.size(4);
  return packed.view({3, 3, cob_n, Cr / 2, 2, kCo})
      .transpose(4, 5)
      .to(at::kBFloat16)
      .contiguous()
      .view(at::kInt)
      .view({3, 3, cob_n, Cr / 2, kCo});
}

// (Cr, Cr, 3, 3) -> Winograd's G g G^T (winograd_conv.h) for G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
// computed in double, as (16 positions, cob_n, Cr inputs, kCo outputs), zeros past Cr outputs.
// Loops, not at::einsum: that took 0.2-0.7 ms a call at Cr = 16-64.
at::Tensor pack_winograd(const at::Tensor& w_in, int64_t kCo) {
  const int64_t Cr = w_in.size(0), cob_n = (Cr + kCo - 1) / kCo;
  const at::Tensor w = w_in.to(at::kFloat).contiguous();
  at::Tensor packed = Cr % kCo == 0 ? at::empty({16, cob_n, Cr, kCo}, w.options())
                                    : at::zeros({16, cob_n, Cr, kCo}, w.options());
  const float* g = w.const_data_ptr<float>();
  float* out = packed.mutable_data_ptr<float>();
  const int64_t stride = cob_n * Cr * kCo;  // between positions
  // G applied to the three entries p, q, r of a row or column.
  const auto G = [](double p, double q, double r, double (&o)[4]) {
    o[0] = p, o[1] = 0.5 * (p + q + r), o[2] = 0.5 * (p - q + r), o[3] = r;
  };
  for (int64_t o = 0; o < Cr; ++o) {
    for (int64_t i = 0; i < Cr; ++i) {
      const float* f = g + (o * Cr + i) * 9;
      double col[3][4];  // G g: column l of g through G
      for (int l = 0; l < 3; ++l) G(f[l], f[3 + l], f[6 + l], col[l]);
      float* dst = out + ((o / kCo) * Cr + i) * kCo + o % kCo;
      for (int a = 0; a < 4; ++a) {
        double u[4];  // row a of G g, through G
        G(col[0][a], col[1][a], col[2][a], u);
        for (int b = 0; b < 4; ++b) dst[(a * 4 + b) * stride] = static_cast<float>(u[b]);
      }
    }
  }
  return packed;
}

// v (fp32, Cr elements) zero-padded to n, rounded to bf16 first with bf16 (as oneDNN's bf16
// convs round biases). A plain vector: as ATen's zeros, narrow and copy it cost a few
// microseconds a tensor, on every call.
std::vector<float> padded(const at::Tensor& v, int64_t n, bool bf16 = false) {
  const at::Tensor c = v.contiguous();
  const float* p = c.const_data_ptr<float>();
  std::vector<float> out(n, 0.f);
  for (int64_t i = 0; i < c.numel(); ++i) out[i] = bf16 ? static_cast<float>(c10::BFloat16(p[i])) : p[i];
  return out;
}

// Bytes our convs have prefetched so far (build_info: tests).
std::atomic<int64_t> prefetched{0};

}  // namespace

std::string cpu_winograd_choice() { return env_choice("BAM_FUSED_CPU_WINOGRAD", {"auto", "on", "off"}); }

namespace {

// The register and task blocking of our dilated convs on an (N, Cr, H, W) map, shared by the
// eval branch's convs and the training convs.
// chunk_px and chunks count tiles of 2x2 outputs with winograd.
struct DilatedBlocking {
  Isa isa;
  int64_t cl_vectors, kCo, cob_n, chunk_px, chunks;
  int64_t units;  // pixels (or Winograd tiles) a sample, in chunks of chunk_px
  int64_t d;  // the dilation: those past the map reach only padding, so any such one gives the same result
  bool winograd;
  bool bf16;  // bf16 products: the weights in bf16 channel pairs (never with winograd)

  // The weights for the job's w and w_direct (the direct conv's, for Winograd tiles with
  // non-finite inputs; undefined without winograd); kept for the next call with `cache`.
  std::pair<at::Tensor, at::Tensor> pack(const at::Tensor& w, bool cache = false) const {
    const auto direct = [&] { return pack_dilated(w, kCo); };
    const auto maybe_cached = [&](Packing p, const std::function<at::Tensor()>& f) {
      return cache ? cached_packing(w, p, kCo, f) : f();
    };
    if (bf16) return {maybe_cached(Packing::kDilatedPairs, [&] { return pair_inputs(direct()); }), at::Tensor()};
    if (!winograd) return {maybe_cached(Packing::kDilated, direct), at::Tensor()};
    return {maybe_cached(Packing::kWinograd, [&] { return pack_winograd(w, kCo); }),
            maybe_cached(Packing::kDilated, direct)};
  }
};

// Whether the fp32 dilated convs take Winograd's F(2x2, 3x3) (BAM_FUSED_CPU_WINOGRAD). Auto picks
// it where it was faster than our direct conv: two convs and the final one, interleaved, 2-core
// AVX2 CPU (Zen 3), 2026-11-26, direct -> Winograd: Cr = 16: 1.54x at N = 8, 56x56 (1.49x at
// N = 1), 1.23x / 1.26x at 28x28, 1.19x / 1.25x at 14x14, 1.13x at 4 x 9x13 (dilation 4);
// Cr = 32: 1.24x at 8 x 28x28, 1.03x at 1 x 28x28, 1.06x at 8 x 14x14, but 0.92x at 1 x 14x14
// (transforming the weights each call outweighs the saving on so few pixels); Cr = 64: 1.21x at
// 8 x 14x14, 0.91x at N = 1; below 16 channels 0.94-1.00x (the outputs pad to a whole vector).
// With the eval ops' packed weights kept between calls (no transform per call) small maps still
// lose: whole BAM eval, Cr = 64, 0.95x / 0.97x at 1 / 2 x 14x14, Cr = 32 0.98x at 1 x 14x14
// (2026-11-27), so the pixel threshold stays.
// Every band of tiles must fit the map: at 7x7 with dilation 4 most tile outputs fall outside
// it (0.65x at Cr = 128).
// Under AVX-512 (2-core Zen 4, 2026-11-28, whole BAM, paired A/B, direct -> Winograd): eval Cr = 16
// at 56x56 1.14-1.18x at N = 8 (channels_last 1.21x), 1.17x / 1.23x at N = 1 / 2; Cr = 32 at 28x28
// 1.07x at N = 8, 1.08-1.09x at N = 1 / 2 / 4; training steps 1.06-1.08x at 8 x 56x56, 1.04x at
// 2 x 56x56, 0.98-1.02x at 28x28. Below 16 channels (eval, Cr = 4 and 8 at N = 1-4) 0.91-1.27x,
// so auto keeps the direct conv there as under AVX2: one rule for every instruction set. (An
// earlier AVX-512 prototype had gained little: 0.65 against 0.69 ms at 56x56.)
bool use_winograd(int64_t N, int64_t Cr, int64_t H, int64_t W, int64_t d) {
  const std::string v = cpu_winograd_choice();
  if (v != "auto") return v == "on";
  constexpr int64_t kMinPixelsAbove16 = 784;
  return Cr >= 16 && H >= 2 * d && W >= 2 * d && (Cr == 16 || N * H * W >= kMinPixelsAbove16);
}

DilatedBlocking dilated_blocking(int64_t N, int64_t Cr, int64_t H, int64_t W, int64_t dilation, bool bf16) {
  const Isa isa = chosen_isa();
  const int64_t lanes = blocking(isa).second, cl_vectors = cl_vectors_for(Cr, lanes), kCo = cl_vectors * lanes;
  const int64_t d = std::min(dilation, std::max(H, W));
  const bool winograd = !bf16 && use_winograd(N, Cr, H, W, d);
  int64_t chunk_px = chunk_pixels(N, H * W), units = H * W;
  if (winograd) {  // 4 outputs a tile, so a quarter as many tiles a chunk (a multiple of 12)
    chunk_px /= 4;
    units = tile_bases(H, d) * tile_bases(W, d);
  }
  const int64_t chunks = std::max<int64_t>(1, (units + chunk_px - 1) / chunk_px);
  return {isa, cl_vectors, kCo, (Cr + kCo - 1) / kCo, chunk_px, chunks, units, d, winograd, bf16};
}

}  // namespace

bool cpu_bf16_spatial_kernel(int64_t Cr) { return Cr == 16 || Cr == 32 || Cr == 64 || Cr == 128; }

bool cpu_dilated_grad_weight_kernel(int64_t Cr) { return Cr == 16 || Cr == 32 || Cr == 64; }

at::Tensor dilated_conv_grad_weight_cpu(const at::Tensor& dy_in, const at::Tensor& in_in, int64_t dilation) {
  const int64_t N = dy_in.size(0), Cr = dy_in.size(1), H = dy_in.size(2), W = dy_in.size(3);
  BAM_CHECK(cpu_dilated_grad_weight_kernel(Cr), "bam_fused: no dilated-conv weight-gradient kernel for ", Cr,
            " channels");
  const at::Tensor dy = dy_in.to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor in = in_in.to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t taps = 9 * Cr * Cr;
  if (N * H * W == 0) return at::zeros({Cr, Cr, 3, 3}, dy.options().memory_format(at::MemoryFormat::Contiguous));
  // Tasks of up to kDwChunk pixels of one sample (set by the shape alone): few partials to add
  // (with the conv's chunks of at most 192 pixels, writing and adding them cost 0.1 ms at
  // Cr = 32, 28x28, N = 8), and each tap's sweep of a task stays in L2.
  constexpr int64_t kDwChunk = 1024;
  const int64_t chunk_px = std::min(H * W, kDwChunk), chunks = (H * W + chunk_px - 1) / chunk_px;
  auto part = at::empty({N * chunks, taps}, dy.options().memory_format(at::MemoryFormat::Contiguous));
  const DilatedGradJob j{H, W, Cr, dilation, chunk_px, chunks, in.const_data_ptr<float>(), dy.const_data_ptr<float>(),
                         part.mutable_data_ptr<float>()};
  const Isa isa = chosen_isa();
  at::parallel_for(0, N * chunks, 1, [&](int64_t b, int64_t e) { dilated_conv_grad_weight(isa, j, b, e); });
  // The partials added in task order (in double), in parallel over the weights.
  auto sum = at::empty({9, Cr, Cr}, part.options());
  const float* pp = part.const_data_ptr<float>();
  float* sp = sum.mutable_data_ptr<float>();
  const int64_t tasks = N * chunks;
  at::parallel_for(0, taps, 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      double s = 0.0;
      for (int64_t t = 0; t < tasks; ++t) s += pp[t * taps + i];
      sp[i] = static_cast<float>(s);
    }
  });
  return sum.permute({1, 2, 0}).reshape({Cr, Cr, 3, 3}).contiguous();  // (tap, o, i) -> (o, i, kh, kw)
}

at::Tensor dilated_conv_cpu(const at::Tensor& y_in, const at::Tensor& w, const at::Tensor& b, int64_t dilation,
                            bool relu) {
  const int64_t N = y_in.size(0), Cr = y_in.size(1), H = y_in.size(2), W = y_in.size(3);
  const at::Tensor y = y_in.to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast);
  auto out = at::empty_like(y);
  if (out.numel() == 0) return out;
  const DilatedBlocking k = dilated_blocking(N, Cr, H, W, dilation, false);
  const auto [wp, wdirect] = k.pack(w.to(at::kFloat));
  const std::vector<float> bp = padded(b.to(at::kFloat), k.cob_n * k.kCo);
  DilatedConvJob j{H, W, Cr, k.d, k.chunk_px, k.chunks, y.const_data_ptr(), wp.const_data_ptr(),
                   bp.data(), out.mutable_data_ptr(), nullptr, 0.f, nullptr,
                   static_cast<int>(k.cl_vectors)};
  j.relu = relu;
  j.winograd = k.winograd;
  if (k.winograd) j.w_direct = wdirect.const_data_ptr();
  parallel_chunks(N, k.chunks, k.chunk_px, k.units,
                  [&](int64_t begin, int64_t end) { dilated_conv(k.isa, false, j, begin, end); });
  return out;
}

int64_t cpu_prefetched_bytes() { return prefetched.load(std::memory_order_relaxed); }

at::Tensor spatial_convs_cpu(const at::Tensor& y_in, at::TensorList w_dilated, at::TensorList b_dilated,
                             int64_t dilation, const at::Tensor& w_final, const at::Tensor& b_final, bool bf16,
                             int64_t batch, CacheHint prefetch) {
  const int64_t N = y_in.size(0), Cr = y_in.size(1), H = y_in.size(2), W = y_in.size(3);
  BAM_CHECK(!bf16 || cpu_bf16_spatial_kernel(Cr), "bam_fused: no bf16 dilated-conv kernel for ", Cr, " channels");
  // bf16: y, the weights and biases rounded to bf16 as oneDNN's bf16 convs round them.
  at::Tensor y = y_in.to(bf16 ? at::kBFloat16 : at::kFloat).contiguous(at::MemoryFormat::ChannelsLast);
  const DilatedBlocking k = dilated_blocking(batch > 0 ? batch : N, Cr, H, W, dilation, bf16);
  const std::vector<float> wf = padded(w_final, k.cob_n * k.kCo);
  const float bf = *b_final.const_data_ptr<float>();  // fp32 (the op checked), not item(): no dispatch
  auto spatial = at::empty({N, H, W}, y.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  if (spatial.numel() == 0) return spatial;  // no pixels (the kernels divide by W)
  const int64_t convs = static_cast<int64_t>(w_dilated.size());
  for (size_t i = 0; i < w_dilated.size(); ++i) {
    const bool last = i + 1 == w_dilated.size();
    const auto [wp, wdirect] = k.pack(w_dilated[i], /*cache=*/true);
    const std::vector<float> bp = padded(b_dilated[i], k.cob_n * k.kCo, bf16);
    at::Tensor out = last ? at::Tensor() : at::empty_like(y);
    DilatedConvJob j{H, W, Cr, k.d, k.chunk_px, k.chunks, y.const_data_ptr(), wp.const_data_ptr(),
                     bp.data(), last ? nullptr : out.mutable_data_ptr(), wf.data(), bf,
                     last ? spatial.mutable_data_ptr<float>() : nullptr, static_cast<int>(k.cl_vectors)};
    j.winograd = k.winograd;
    if (k.winograd) j.w_direct = wdirect.const_data_ptr();
    if (prefetch.bytes > 0) {  // each conv its share
      const int64_t a = prefetch.bytes * static_cast<int64_t>(i) / convs;
      j.prefetch = {static_cast<const char*>(prefetch.data) + a, prefetch.bytes * static_cast<int64_t>(i + 1) / convs - a};
      j.tasks = N * k.chunks;
      j.prefetched = &prefetched;
    }
    parallel_chunks(N, k.chunks, k.chunk_px, k.units,
                    [&](int64_t begin, int64_t end) { dilated_conv(k.isa, bf16, j, begin, end); });
    if (!last) y = out;
  }
  return spatial;
}

}  // namespace bam_fused
