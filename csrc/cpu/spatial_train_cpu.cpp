// The CPU spatial branch in training, after the reduce conv: BatchNorm with batch statistics,
// ReLU, the dilated convs and the final 1x1 conv, forward (bam_fused_C::spatial_train) and
// backward (spatial_train_backward), fp32. ops/training.py runs them in place of the module's
// layers when those are the stock ones; it updates the running statistics.
//
// As PyTorch layers this part is many small ops on maps of 1/16 of x's size (ATen's BatchNorm
// and ReLU, oneDNN's convs and their backward, a 1x1 conv to one channel). Here the maps are
// channels_last, viewed as (M = N * H * W pixels, Cr): a BatchNorm with its ReLU is two sweeps
// forward and two backward; the dilated convs, their input gradients (the conv with
// transposed, flipped weights) and weight gradients run in our vector code (dilated_conv.h)
// where the eval path runs ours (cpu_spatial_kernel: 16 and 32 channels in auto), else in
// oneDNN.
//
// Per-channel sums are taken in float over fixed blocks of kBlockPx pixels, then over the
// blocks in order in double: results do not depend on the thread count (except oneDNN's conv
// weight and bias gradients where oneDNN runs, whose sums follow its threads, as in PyTorch).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "../check.h"
#include "../ops.h"
#include "conv1x1_pool.h"  // vload, vstore
#include "simd.h"

namespace bam_fused {
namespace {

constexpr int64_t kBlockPx = 256;

// The sweeps below run on T: 4-float vectors (GCC's vector extension, SSE2 in this file's
// baseline code) when Cr is a multiple of 4, else floats. Written out rather than left to the
// auto-vectoriser: it kept the ReLU masks as branches and ran scalar, 7 ms for one backward at
// 56x56. The same expressions serve both types, so a pixel's bits do not depend on which ran.
using Vec4 = float __attribute__((vector_size(16)));

template <typename T>
constexpr int64_t kWidth = sizeof(T) / sizeof(float);
// relu(y * scale + shift): NaN stays NaN, as in torch.relu.
template <typename T>
BAM_INLINE T bn_relu(T y, T scale, T shift) {
  const T u = y * scale + shift;
  return u < 0.f ? T{} : u;
}

// f(kCr, T{}): Cr as a constant for BAM's usual reduced channels (kCr 0: run-time Cr), and the
// sweeps' type.
template <typename F>
void with_channels(int64_t Cr, const F& f) {
  switch (Cr) {
    case 16: return f(std::integral_constant<int64_t, 16>{}, Vec4{});
    case 32: return f(std::integral_constant<int64_t, 32>{}, Vec4{});
    case 64: return f(std::integral_constant<int64_t, 64>{}, Vec4{});
    default: break;
  }
  if (Cr % 4 == 0) return f(std::integral_constant<int64_t, 0>{}, Vec4{});
  f(std::integral_constant<int64_t, 0>{}, 0.f);
}

// kSums x Cr sums over the M pixels: add(p0, p1, acc) adds pixels [p0, p1) into acc (kSums x Cr
// floats, zero at first) for each block of kBlockPx pixels. Returns kSums x Cr doubles.
template <int kSums, typename Add>
std::vector<double> channel_sums(int64_t M, int64_t Cr, const Add& add) {
  const int64_t blocks = (M + kBlockPx - 1) / kBlockPx, stride = kSums * Cr;
  std::vector<float> part(blocks * stride, 0.f);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) add(b * kBlockPx, std::min(M, (b + 1) * kBlockPx), part.data() + b * stride);
  });
  std::vector<double> sums(stride, 0.0);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t i = 0; i < stride; ++i) sums[i] += part[b * stride + i];
  return sums;
}

// One BatchNorm layer in training (batch statistics) followed by ReLU. Its affine map is
// computed the same way forward and backward (so the backward's ReLU mask is the forward's),
// and as PyTorch's CPU BatchNorm computes it: scale = invstd * gamma, shift = beta - mean * scale.
struct BnRelu {
  int64_t M, Cr;
  const float* mean;    // (Cr,)
  const float* invstd;  // (Cr,)
  std::vector<float> scale, shift;

  BnRelu(int64_t M_, int64_t Cr_, const float* mean_, const float* invstd_, const std::optional<at::Tensor>& gamma,
         const std::optional<at::Tensor>& beta)
      : M(M_), Cr(Cr_), mean(mean_), invstd(invstd_), scale(Cr_), shift(Cr_) {
    const float* g = gamma ? gamma->const_data_ptr<float>() : nullptr;
    const float* b = beta ? beta->const_data_ptr<float>() : nullptr;
    for (int64_t c = 0; c < Cr; ++c) {
      scale[c] = g ? invstd[c] * g[c] : invstd[c];
      shift[c] = (b ? b[c] : 0.f) - mean[c] * scale[c];
    }
  }

  void forward(const float* y, float* a) const {
    with_channels(Cr, [&](auto kCr, auto t) {
      using T = decltype(t);
      constexpr int64_t L = kWidth<T>;
      const int64_t cr = kCr ? kCr() : Cr;
      const float *sc = scale.data(), *sh = shift.data();
      at::parallel_for(0, M, kBlockPx, [&](int64_t p0, int64_t p1) {
        for (int64_t i = p0 * cr; i < p1 * cr; i += cr)
          for (int64_t c = 0; c < cr; c += L)
            vstore<T>(a + i + c, bn_relu(vload<T>(y + i + c), vload<T>(sc + c), vload<T>(sh + c)));
      });
    });
  }

  // dy from da, the gradient of a: da[p * Cr + c], or (ds != nullptr) ds[p] * wf[c]; dgamma and
  // dbeta (Cr,). ReLU passes da where relu(u) <= 0 is false (torch's threshold_backward: NaN
  // passes); BatchNorm's backward as PyTorch's CPU kernel writes it:
  // (du - (y - mean) * proj - grad_mean) * invstd * gamma.
  // dy is written channels_last, or NCHW when nchw_hw (H * W) is not 0. With running
  // statistics (!batch_stats: a BatchNorm in eval mode) the mean and invstd are constants:
  // dy = du * invstd * gamma.
  void backward(const float* da, const float* ds, const float* wf, const float* y, const float* gamma, float* dy,
                float* dgamma, float* dbeta, int64_t nchw_hw, bool batch_stats) const {
    if (ds != nullptr) return backward_impl<true>(ds, wf, y, gamma, dy, dgamma, dbeta, nchw_hw, batch_stats);
    backward_impl<false>(da, nullptr, y, gamma, dy, dgamma, dbeta, nchw_hw, batch_stats);
  }

  template <bool kOuter>
  void backward_impl(const float* da, const float* wf, const float* y, const float* gamma, float* dy, float* dgamma,
                     float* dbeta, int64_t nchw_hw, bool batch_stats) const {
    std::vector<float> grad_mean(Cr), proj(Cr), grad_scale(Cr);
    with_channels(Cr, [&](auto kCr, auto t) {
      using T = decltype(t);
      constexpr int64_t L = kWidth<T>;
      const int64_t cr = kCr ? kCr() : Cr;
      const float *sc = scale.data(), *sh = shift.data(), *mu = mean;
      // The gradient of u at pixel p (element i = p * cr), channels [c, c + L).
      const auto du = [&](int64_t p, int64_t i, int64_t c) BAM_INLINE_LAMBDA {
        const T g = kOuter ? da[p] * vload<T>(wf + c) : vload<T>(da + i + c);
        return bn_relu(vload<T>(y + i + c), vload<T>(sc + c), vload<T>(sh + c)) <= 0.f ? T{} : g;
      };
      const std::vector<double> s = channel_sums<2>(M, cr, [&](int64_t p0, int64_t p1, float* acc) {
        for (int64_t p = p0; p < p1; ++p)
          for (int64_t c = 0; c < cr; c += L) {
            const int64_t i = p * cr;
            const T g = du(p, i, c);
            vstore<T>(acc + c, vload<T>(acc + c) + g);
            vstore<T>(acc + cr + c, vload<T>(acc + cr + c) + g * (vload<T>(y + i + c) - vload<T>(mu + c)));
          }
      });
      for (int64_t c = 0; c < cr; ++c) {
        dbeta[c] = static_cast<float>(s[c]);
        dgamma[c] = static_cast<float>(s[cr + c] * invstd[c]);
        grad_mean[c] = batch_stats ? static_cast<float>(s[c] / M) : 0.f;
        proj[c] = batch_stats ? static_cast<float>(s[cr + c] / M * invstd[c] * invstd[c]) : 0.f;
        grad_scale[c] = gamma ? invstd[c] * gamma[c] : invstd[c];
      }
      const float *gm = grad_mean.data(), *pj = proj.data(), *gs = grad_scale.data();
      at::parallel_for(0, M, kBlockPx, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p)
          for (int64_t c = 0; c < cr; c += L) {
            const int64_t i = p * cr;
            const T r = (du(p, i, c) - (vload<T>(y + i + c) - vload<T>(mu + c)) * vload<T>(pj + c) - vload<T>(gm + c)) *
                        vload<T>(gs + c);
            if (nchw_hw == 0) {
              vstore<T>(dy + i + c, r);
            } else {  // the reduce conv's backward takes dy laid out like x: spares a transpose
              float lanes[L];
              vstore<T>(lanes, r);
              const int64_t n = p / nchw_hw, hw = p % nchw_hw;
              for (int64_t l = 0; l < L; ++l) dy[(n * cr + c + l) * nchw_hw + hw] = lanes[l];
            }
          }
      });
    });
  }
};

// Batch statistics of y (M, Cr): mean, invstd = 1 / sqrt(var + eps) and the biased var, each
// (Cr,). One sweep over y: per block of kBlockPx pixels (in L1) its sum, then its squared
// deviations from its own mean; the blocks merged in order in double (Chan et al.'s pairwise
// update), so no E[y^2] - mean^2 cancellation.
void batch_statistics(const float* y, int64_t M, int64_t Cr, double eps, float* mean, float* invstd, float* var) {
  const int64_t blocks = (M + kBlockPx - 1) / kBlockPx;
  std::vector<float> part(blocks * 2 * Cr);  // per block: sum (Cr), squared deviations (Cr)
  with_channels(Cr, [&](auto kCr, auto t) {
    using T = decltype(t);
    constexpr int64_t L = kWidth<T>;
    const int64_t cr = kCr ? kCr() : Cr;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> block_mean(cr);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t p0 = b * kBlockPx, p1 = std::min(M, p0 + kBlockPx);
        float *sum = part.data() + b * 2 * cr, *dev = sum + cr;
        for (int64_t c = 0; c < cr; c += L) vstore<T>(sum + c, T{}), vstore<T>(dev + c, T{});
        for (int64_t i = p0 * cr; i < p1 * cr; i += cr)
          for (int64_t c = 0; c < cr; c += L) vstore<T>(sum + c, vload<T>(sum + c) + vload<T>(y + i + c));
        for (int64_t c = 0; c < cr; ++c) block_mean[c] = sum[c] / static_cast<float>(p1 - p0);
        for (int64_t i = p0 * cr; i < p1 * cr; i += cr)
          for (int64_t c = 0; c < cr; c += L) {
            const T d = vload<T>(y + i + c) - vload<T>(block_mean.data() + c);
            vstore<T>(dev + c, vload<T>(dev + c) + d * d);
          }
      }
    });
  });
  for (int64_t c = 0; c < Cr; ++c) {
    double total = 0.0;
    for (int64_t b = 0; b < blocks; ++b) total += part[b * 2 * Cr + c];
    const double mu = total / M;
    double m2 = 0.0;
    for (int64_t b = 0; b < blocks; ++b) {
      const double n = static_cast<double>(std::min(M, (b + 1) * kBlockPx) - b * kBlockPx);
      const double d = static_cast<double>(part[b * 2 * Cr + c]) / n - mu;
      m2 += part[b * 2 * Cr + Cr + c] + n * d * d;
    }
    mean[c] = static_cast<float>(mu);
    var[c] = static_cast<float>(m2 / M);
    invstd[c] = static_cast<float>(1.0 / std::sqrt(m2 / M + eps));
  }
}

// The dilated convs: ours where the eval path uses ours (cpu_spatial_kernel: Cr 16 and 32 in
// auto), else oneDNN's. Ours takes the dilation clamped to the map (no tap reaches further).
struct DilatedConvs {
  int64_t Cr, d;
  bool ours;

  at::Tensor forward(const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& b) const {
    if (ours) return dilated_conv_cpu(a, w, b.has_value() ? *b : at::zeros({Cr}, a.options()), d, /*relu=*/false);
    return at::convolution(a, w, b, {1, 1}, {d, d}, {d, d}, false, {0, 0}, 1)
        .contiguous(at::MemoryFormat::ChannelsLast);
  }

  // The gradients of the conv's input (channels_last), weight and bias, from dy.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& dy, const at::Tensor& a,
                                                          const at::Tensor& w) const {
    if (!ours) {
      auto [da, dw, db] = at::convolution_backward(dy, a, w, at::IntArrayRef({Cr}), {1, 1}, {d, d}, {d, d}, false,
                                                   {0, 0}, 1, {true, true, true});
      return {da.contiguous(at::MemoryFormat::ChannelsLast), dw.contiguous(), db};
    }
    // Ours: the input gradient is the conv with the weights transposed and flipped (zero
    // padding = dilation keeps the map's size); the weight gradient ours at 16, 32 and 64
    // channels (then the same bits for any thread count), else oneDNN's.
    at::Tensor da = dilated_conv_cpu(dy, w.transpose(0, 1).flip({2, 3}), at::zeros({Cr}, dy.options()), d, false);
    if (!cpu_dilated_grad_weight_kernel(Cr)) {
      auto [unused, dw, db] = at::convolution_backward(dy, a, w, at::IntArrayRef({Cr}), {1, 1}, {d, d}, {d, d}, false,
                                                       {0, 0}, 1, {false, true, true});
      return {da, dw.contiguous(), db};
    }
    const int64_t M = dy.numel() / Cr;
    const std::vector<double> s = channel_sums<1>(M, Cr, [&](int64_t p0, int64_t p1, float* acc) {
      const float* g = dy.const_data_ptr<float>();
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t c = 0; c < Cr; ++c) acc[c] += g[p * Cr + c];
    });
    at::Tensor db = at::empty({Cr}, dy.options().memory_format(at::MemoryFormat::Contiguous));
    for (int64_t c = 0; c < Cr; ++c) db.mutable_data_ptr<float>()[c] = static_cast<float>(s[c]);
    return {da, dilated_conv_grad_weight_cpu(dy, a, d), db};
  }
};

at::Tensor channels_last_fp32(const at::Tensor& t) {
  return t.to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast);
}

std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// Checks shared by both ops: K dilated convs, K + 1 BatchNorms, all fp32 on the CPU.
void check_layers(const char* op, int64_t Cr, const c10::List<std::optional<at::Tensor>>& bn_weight,
                  const c10::List<std::optional<at::Tensor>>& bn_bias, at::TensorList conv_weight,
                  int64_t dilation, const at::Tensor& final_weight) {
  const size_t K = conv_weight.size();
  BAM_CHECK(bn_weight.size() == K + 1 && bn_bias.size() == K + 1, op, ": bn_weight and bn_bias need ", K + 1,
            " entries (one per BatchNorm: conv_weight has ", K, "), got ", bn_weight.size(), " and ", bn_bias.size());
  BAM_CHECK(dilation >= 1, op, ": dilation must be >= 1, got ", dilation);
  const auto vec = [&](const std::optional<at::Tensor>& t, const char* name, size_t i) {
    BAM_CHECK(!t.has_value() || (t->numel() == Cr && t->scalar_type() == at::kFloat && t->is_cpu()), op, ": ", name,
              "[", i, "] must be fp32 with ", Cr, " elements on the CPU, got ", t->sizes(), " ", t->scalar_type());
  };
  for (size_t k = 0; k <= K; ++k) {
    vec(bn_weight.get(k), "bn_weight", k);
    vec(bn_bias.get(k), "bn_bias", k);
  }
  for (size_t k = 0; k < K; ++k)
    BAM_CHECK(conv_weight[k].sizes() == at::IntArrayRef({Cr, Cr, 3, 3}) &&
                  conv_weight[k].scalar_type() == at::kFloat && conv_weight[k].is_cpu(),
              op, ": conv_weight[", k, "] must be fp32 (", Cr, ", ", Cr, ", 3, 3) on the CPU, got ",
              conv_weight[k].sizes(), " ", conv_weight[k].scalar_type());
  BAM_CHECK(final_weight.numel() == Cr && final_weight.scalar_type() == at::kFloat && final_weight.is_cpu(), op,
            ": final_weight must be fp32 with ", Cr, " elements on the CPU, got ", final_weight.sizes(), " ",
            final_weight.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> spatial_train(
    const at::Tensor& y, const c10::List<std::optional<at::Tensor>>& bn_weight,
    const c10::List<std::optional<at::Tensor>>& bn_bias, at::ArrayRef<double> eps,
    const c10::List<std::optional<at::Tensor>>& running_mean, const c10::List<std::optional<at::Tensor>>& running_var,
    at::TensorList conv_weight, const c10::List<std::optional<at::Tensor>>& conv_bias, int64_t dilation,
    const at::Tensor& final_weight, const std::optional<at::Tensor>& final_bias) {
  const char* op = "bam_fused_C::spatial_train";
  BAM_CHECK(y.dim() == 4 && y.scalar_type() == at::kFloat && y.is_cpu(), op,
            ": y must be fp32 (N, Cr, H, W) on the CPU, got ", y.sizes(), " ", y.scalar_type(), " on ", y.device());
  const int64_t N = y.size(0), Cr = y.size(1), H = y.size(2), W = y.size(3), M = N * H * W;
  const size_t K = conv_weight.size();
  check_layers(op, Cr, bn_weight, bn_bias, conv_weight, dilation, final_weight);
  BAM_CHECK(eps.size() == K + 1, op, ": eps needs ", K + 1, " entries, got ", eps.size());
  BAM_CHECK(conv_bias.size() == K, op, ": conv_bias needs ", K, " entries, got ", conv_bias.size());
  for (size_t k = 0; k < K; ++k) {
    const auto b = conv_bias.get(k);
    BAM_CHECK(!b.has_value() || (b->numel() == Cr && b->scalar_type() == at::kFloat), op, ": conv_bias[", k,
              "] must be fp32 with ", Cr, " elements");
  }
  BAM_CHECK(!final_bias.has_value() || (final_bias->numel() == 1 && final_bias->scalar_type() == at::kFloat), op,
            ": final_bias must be fp32 with 1 element");
  BAM_CHECK(running_mean.size() == K + 1 && running_var.size() == K + 1, op,
            ": running_mean and running_var need ", K + 1, " entries, got ", running_mean.size(), " and ",
            running_var.size());
  bool any_batch_stats = false;
  for (size_t k = 0; k <= K; ++k) {
    const auto rm = running_mean.get(k), rv = running_var.get(k);
    BAM_CHECK(rm.has_value() == rv.has_value(), op, ": running_mean[", k, "] and running_var[", k,
              "] must both be given (the BatchNorm's running statistics) or both be None (batch statistics)");
    BAM_CHECK(!rm.has_value() || (rm->numel() == Cr && rm->scalar_type() == at::kFloat && rv->numel() == Cr &&
                                  rv->scalar_type() == at::kFloat),
              op, ": running_mean[", k, "] and running_var[", k, "] must be fp32 with ", Cr, " elements");
    any_batch_stats |= !rm.has_value();
  }
  // PyTorch's BatchNorm raises here too: one value per channel has no variance.
  BAM_CHECK(M > 1 || !any_batch_stats, op,
            ": BatchNorm needs more than one value per channel in training, got N * H * W = ", M);

  auto stats = at::empty({3, static_cast<int64_t>(K) + 1, Cr}, y.options().dtype(at::kFloat));
  float* st = stats.mutable_data_ptr<float>();
  std::vector<at::Tensor> maps;  // y_0 (dropped below: it may be y itself), a_0, y_1, ..., y_K, a_K
  at::Tensor cur = channels_last_fp32(y);
  const DilatedConvs convs{Cr, dilation, cpu_spatial_kernel(Cr, false)};
  for (size_t k = 0; k <= K; ++k) {
    float *mean = st + k * Cr, *invstd = st + (K + 1 + k) * Cr, *var = st + (2 * (K + 1) + k) * Cr;
    const auto rm = running_mean.get(k), rv = running_var.get(k);
    if (rm.has_value()) {  // a BatchNorm in eval mode: its running statistics
      const at::Tensor m = rm->contiguous(), v = rv->contiguous();
      for (int64_t c = 0; c < Cr; ++c) {
        mean[c] = m.const_data_ptr<float>()[c];
        var[c] = v.const_data_ptr<float>()[c];
        invstd[c] = static_cast<float>(1.0 / std::sqrt(static_cast<double>(var[c]) + eps[k]));
      }
    } else {
      batch_statistics(cur.const_data_ptr<float>(), M, Cr, eps[k], mean, invstd, var);
    }
    at::Tensor a = at::empty_like(cur);
    BnRelu(M, Cr, mean, invstd, contiguous_or_none(bn_weight.get(k)), contiguous_or_none(bn_bias.get(k)))
        .forward(cur.const_data_ptr<float>(), a.mutable_data_ptr<float>());
    maps.push_back(cur);
    maps.push_back(a);
    if (k < K) cur = convs.forward(a, conv_weight[k], conv_bias.get(k));
  }
  // The final 1x1 conv to one channel: a matrix-vector product over the pixels.
  const at::Tensor pixels = maps.back().permute({0, 2, 3, 1}).reshape({M, Cr});
  const at::Tensor wf = final_weight.reshape({Cr}).contiguous();
  at::Tensor s = final_bias.has_value() ? at::addmv(final_bias->reshape({1}).expand({M}), pixels, wf)
                                        : at::mv(pixels, wf);
  maps.erase(maps.begin());  // an op's outputs must not alias its inputs; the backward takes y
  return {s.view({N, H, W}), maps, stats};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> spatial_train_backward(
    const at::Tensor& ds, const at::Tensor& y, at::TensorList maps_after_y, const at::Tensor& stats,
    const c10::List<std::optional<at::Tensor>>& bn_weight, const c10::List<std::optional<at::Tensor>>& bn_bias,
    at::TensorList conv_weight, int64_t dilation, const at::Tensor& final_weight, const c10::List<bool>& batch_stats,
    bool dy_channels_last) {
  const char* op = "bam_fused_C::spatial_train_backward";
  const size_t K = conv_weight.size();
  BAM_CHECK(maps_after_y.size() == 2 * K + 1, op, ": maps must be spatial_train's ", 2 * K + 1, " maps, got ",
            maps_after_y.size());
  BAM_CHECK(y.dim() == 4 && y.scalar_type() == at::kFloat && y.is_cpu(), op,
            ": y must be fp32 (N, Cr, H, W) on the CPU, got ", y.sizes(), " ", y.scalar_type(), " on ", y.device());
  std::vector<at::Tensor> maps{channels_last_fp32(y)};  // y_0, a_0, ..., y_K, a_K
  maps.insert(maps.end(), maps_after_y.begin(), maps_after_y.end());
  const at::Tensor& y0 = maps[0];
  const int64_t N = y0.size(0), Cr = y0.size(1), H = y0.size(2), W = y0.size(3), M = N * H * W;
  for (const auto& m : maps)
    BAM_CHECK(m.sizes() == y0.sizes() && m.scalar_type() == at::kFloat &&
                  m.is_contiguous(at::MemoryFormat::ChannelsLast) && m.is_cpu(),
              op, ": maps must be spatial_train's (fp32 channels_last ", y0.sizes(), "), got ", m.sizes(), " ",
              m.scalar_type(), " strides ", m.strides());
  BAM_CHECK(stats.sizes() == at::IntArrayRef({3, static_cast<int64_t>(K) + 1, Cr}) &&
                stats.scalar_type() == at::kFloat && stats.is_contiguous(),
            op, ": stats must be spatial_train's (3, ", K + 1, ", ", Cr, ") fp32, got ", stats.sizes());
  BAM_CHECK(ds.numel() == M && ds.scalar_type() == at::kFloat && ds.is_cpu(), op, ": ds must be fp32 with N * H * W = ",
            M, " elements on the CPU, got ", ds.sizes(), " ", ds.scalar_type());
  check_layers(op, Cr, bn_weight, bn_bias, conv_weight, dilation, final_weight);
  BAM_CHECK(batch_stats.size() == K + 1, op, ": batch_stats needs ", K + 1, " entries, got ", batch_stats.size());

  const float* st = stats.const_data_ptr<float>();
  const auto opts = stats.options();
  const DilatedConvs convs{Cr, dilation, cpu_spatial_kernel(Cr, false)};
  // grads in the module's parameter order: (bn_k weight, bn_k bias, conv_k weight, conv_k bias)
  // for k < K, then bn_K weight, bn_K bias, final weight, final bias.
  std::vector<at::Tensor> grads(4 * K + 4);
  const at::Tensor dsv = ds.reshape({M}).contiguous();
  const at::Tensor a_last = maps[2 * K + 1].permute({0, 2, 3, 1}).reshape({M, Cr});
  grads[4 * K + 2] = at::mv(a_last.t(), dsv).view(final_weight.sizes());
  grads[4 * K + 3] = dsv.sum().view({1});
  const at::Tensor wf = final_weight.reshape({Cr}).contiguous();

  at::Tensor da, dy;
  for (size_t k = K + 1; k-- > 0;) {
    const auto gamma = contiguous_or_none(bn_weight.get(k));
    const BnRelu bn(M, Cr, st + k * Cr, st + (K + 1 + k) * Cr, gamma, contiguous_or_none(bn_bias.get(k)));
    at::Tensor dgamma = at::empty({Cr}, opts), dbeta = at::empty({Cr}, opts);
    dy = at::empty_like(maps[2 * k], k == 0 && !dy_channels_last ? at::MemoryFormat::Contiguous
                                                                   : at::MemoryFormat::ChannelsLast);
    const float* y = maps[2 * k].const_data_ptr<float>();
    const float* g = gamma ? gamma->const_data_ptr<float>() : nullptr;
    float *dyp = dy.mutable_data_ptr<float>(), *dgp = dgamma.mutable_data_ptr<float>();
    float* dbp = dbeta.mutable_data_ptr<float>();
    const int64_t nchw_hw = k == 0 && !dy_channels_last ? H * W : 0;
    if (k == K) {  // a_K's gradient is ds times the final conv's weights
      bn.backward(nullptr, dsv.const_data_ptr<float>(), wf.const_data_ptr<float>(), y, g, dyp, dgp, dbp, nchw_hw,
                  batch_stats.get(k));
    } else {
      bn.backward(da.const_data_ptr<float>(), nullptr, nullptr, y, g, dyp, dgp, dbp, nchw_hw, batch_stats.get(k));
    }
    grads[4 * k] = dgamma;
    grads[4 * k + 1] = dbeta;
    if (k == 0) break;
    auto [da_prev, dw, db] = convs.backward(dy, maps[2 * k - 1], conv_weight[k - 1]);
    grads[4 * (k - 1) + 2] = dw;
    grads[4 * (k - 1) + 3] = db;
    da = da_prev;
  }
  return {dy, grads};
}

}  // namespace bam_fused
