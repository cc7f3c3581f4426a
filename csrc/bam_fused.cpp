// Op schemas (TORCH_LIBRARY), the device-independent part of the branch and attention ops,
// and build info.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <optional>
#include <string>

#include "check.h"
#include "env_choice.h"
#include "cpu/isa.h"
#include "cpu/pack_cache.h"
#include "cpu/same_memory.h"
#include "ops.h"

namespace bam_fused {

#ifdef BAM_FUSED_WITH_CUDA
// Up to this many reduced channels our spatial kernel beats cuDNN's TF32 convs. Whole BAM
// (eval, fp32, N = 32, CUDA graph) on an H200, 2026-11-25, ours vs cuDNN: Cr = 16 (56x56)
// 177 vs 211 us; Cr = 32 (28x28) 188 vs 165; Cr = 64 (14x14) 271 vs 190. On an H100,
// 2026-11-27, after our kernel's inner loop lost a quarter of its instructions: 186 vs 237,
// 179 vs 176, 199 vs 137.
constexpr int64_t kSpatialKernelMaxCr = 16;

// Which code runs the dilated convs on CUDA (BAM_FUSED_CUDA_SPATIAL, read on every call so
// that benchmarks can compare both in one process): our fp32 kernel (spatial_convs.cuh) or
// the library's convs (cuDNN; TF32 where torch.backends.cudnn.allow_tf32 allows it).
bool cuda_spatial_kernel(int64_t Cr) {
  const std::string v = env_choice("BAM_FUSED_CUDA_SPATIAL", {"auto", "kernel", "library"});
  return v == "auto" ? Cr <= kSpatialKernelMaxCr : v == "kernel";
}
#endif

// Which code runs the dilated convs on the CPU for Cr reduced channels (BAM_FUSED_CPU_SPATIAL,
// read on every call so that benchmarks and tests can compare both in one process): our vector
// code (cpu/dilated_conv.h) or oneDNN's convs. Auto picks ours where it was faster: two convs
// and the final one, 2-core AVX-512 CPU, 2026-11-26, ours vs oneDNN (ms): Cr = 16, N = 8, 56x56
// 0.65 vs 0.68 (N = 1: 0.11 vs 0.14); Cr = 32, 28x28 0.48 vs 0.53 (N = 1: 0.099 vs 0.126); but
// Cr = 64, 14x14 0.44 vs 0.42, Cr = 128 1.78 vs 1.42, Cr = 8, 56x56 0.67 vs 0.46.
// Below 16 channels ours pads the outputs to a whole vector (2-4x the products) but skips
// oneDNN's per-call setup, which small maps do not repay: whole BAM eval, paired A/B, oneDNN's ->
// ours, Cr = 4 (64 x 56x56) 1.14x / 0.99x / 0.81x at N = 1 / 2 / 8; Cr = 8 (128 x 28x28) 1.37x /
// 1.20x / 1.04x / 0.92x at N = 1 / 2 / 4 / 8 (ResNet-18/34's first two BAMs). So the eval ops take
// ours there up to kSmallMapValues values per conv output (N * H * W * Cr).
// Cr = 64 under AVX2 (our Winograd conv, packed weights kept between eval calls): whole BAM eval
// at 1024 x 14x14, paired A/B, oneDNN's -> ours, 2-core Zen 3, 2026-11-27: 1.02x / 1.14x / 1.09x /
// 1.10x at N = 1 / 2 / 4 / 8 (a second N = 1 run: 1.07x), channels_last 1.10x / 1.05x at N = 1 / 8.
// So the eval ops take ours at 64 there (not in training, where it is unmeasured; Cr = 128 at
// 7x7: 0.99x at N = 1, left to oneDNN).
// Under AVX-512 (2-core Zen 4, 2026-11-28, same A/B, Winograd from 784 pixels): Cr = 64 at 14x14
// 1.37x / 1.23x / 1.16x at N = 1 / 2 / 4 (channels_last 1.38x / 1.14x at N = 1 / 4) but 0.97-1.01x
// at N = 8 (channels_last 0.94x); Cr = 128 at 7x7 1.14x / 1.04x / 1.00x / 0.92x at N = 1 / 4 / 8 /
// 16. So the eval ops take ours above 32 channels (measured at 64 and 128) up to kAvx512EvalValues
// values per conv output.
constexpr int64_t kSmallMapValues = 25088, kAvx512EvalValues = 50176;
std::string cpu_spatial_choice() { return env_choice("BAM_FUSED_CPU_SPATIAL", {"auto", "kernel", "library"}); }
// bf16 (cpu_bf16_products): the convs round as oneDNN's bf16 ones do, in our bf16 kernel (it
// has Cr 16, 32, 64, 128) or oneDNN's. Auto picks ours at 16 and 32 there too: whole bf16 BAM
// eval, paired A/B, oneDNN's -> ours: 1.17x / 1.11x at Cr 16 / 32 (N = 8, 56x56 / 28x28), 1.17x /
// 1.20x at N = 1; Cr 64 (14x14) 1.04x at N = 8 but 0.92x at N = 1.
bool cpu_spatial_kernel(int64_t Cr, bool bf16, int64_t eval_pixels) {
  const std::string v = cpu_spatial_choice();
  if (v == "auto") {
    if (Cr == 16 || Cr == 32) return true;
    if (bf16 || eval_pixels <= 0 || (Cr > 16 && Cr < 32)) return false;  // (training convs: 16 and 32 only)
    if (Cr < 16) return eval_pixels * Cr <= kSmallMapValues;
    const Isa isa = chosen_isa();  // above 32 channels, by instruction set
    return (Cr == 64 && isa == Isa::kAvx2) || (avx512_vectors(isa) && eval_pixels * Cr <= kAvx512EvalValues);
  }
  return v == "kernel" && (!bf16 || cpu_bf16_spatial_kernel(Cr));
}

namespace {

// Checks of the spatial branch's weights after the reduce conv (Cr reduced channels).
void check_spatial_weights(const char* op, int64_t Cr, at::Device device, at::TensorList w_dilated,
                           at::TensorList b_dilated, int64_t dilation, const at::Tensor& w_final,
                           const at::Tensor& b_final) {
  BAM_CHECK(w_dilated.size() == b_dilated.size(), op, ": w_dilated and b_dilated differ in length");
  BAM_CHECK(dilation >= 1, op, ": dilation must be >= 1, got ", dilation);
  BAM_CHECK(w_final.numel() == Cr && b_final.numel() == 1 && w_final.scalar_type() == at::kFloat &&
                b_final.scalar_type() == at::kFloat,
            op, ": w_final must be fp32 with ", Cr, " elements and b_final fp32 with 1, got ",
            w_final.numel(), " ", w_final.scalar_type(), " and ", b_final.numel(), " ", b_final.scalar_type());
  for (const auto& t : {w_final, b_final})
    BAM_CHECK(t.device() == device, op, ": weights must be on x's device ", device);

  for (size_t i = 0; i < w_dilated.size(); ++i) {
    BAM_CHECK(w_dilated[i].dim() == 4 && w_dilated[i].size(0) == Cr && w_dilated[i].size(1) == Cr &&
                  w_dilated[i].size(2) == 3 && w_dilated[i].size(3) == 3 && w_dilated[i].scalar_type() == at::kFloat,
              op, ": w_dilated[", i, "] must be fp32 (", Cr, ", ", Cr, ", 3, 3), got ",
              w_dilated[i].sizes(), " ", w_dilated[i].scalar_type());
    BAM_CHECK(b_dilated[i].numel() == Cr && b_dilated[i].scalar_type() == at::kFloat,
              op, ": b_dilated[", i, "] must be fp32 with ", Cr, " elements, got ",
              b_dilated[i].sizes(), " ", b_dilated[i].scalar_type());
    BAM_CHECK(w_dilated[i].device() == device && b_dilated[i].device() == device,
              op, ": weights must be on x's device ", device);
  }
}

// Whether the spatial branch on y runs our CUDA kernel (else the library's convs).
[[maybe_unused]] bool spatial_kernel(at::Device device, int64_t Cr, at::TensorList w_dilated) {
#ifdef BAM_FUSED_WITH_CUDA
  return device.is_cuda() && !w_dilated.empty() && cuda_spatial_kernel(Cr);
#else
  return false;
#endif
}

// The spatial branch after the reduce conv: dilated convs (bias, ReLU) and the final 1x1 conv
// on y = relu(reduce conv) (N, Cr, H, W) fp32, giving the spatial map (N, H, W). bf16: the CPU
// dilated convs in bf16, as a bf16 model's (y, weights and biases rounded to bf16, fp32 sums,
// bf16 outputs), ours or oneDNN's; the final conv in fp32. batch: the batch y is a group of
// (0: y's own), whose size sets the CPU kernels' choices (see bam_eval). prefetch: memory our CPU
// convs bring into the cache as they compute (bam_eval's next group of x).
at::Tensor spatial_from_y(at::Tensor y, at::TensorList w_dilated, at::TensorList b_dilated, int64_t dilation,
                          const at::Tensor& w_final, const at::Tensor& b_final, bool bf16 = false,
                          int64_t batch = 0, CacheHint prefetch = {}) {
  const int64_t Cr = y.size(1), N = batch > 0 ? batch : y.size(0);
#ifdef BAM_FUSED_WITH_CUDA
  if (spatial_kernel(y.device(), Cr, w_dilated))
    return spatial_convs_cuda(y, w_dilated, b_dilated, dilation, w_final, b_final);
#endif
  if (y.is_cpu() && !w_dilated.empty() && cpu_spatial_kernel(Cr, bf16, N * y.size(2) * y.size(3)))
    return spatial_convs_cpu(y, w_dilated, b_dilated, dilation, w_final, b_final, bf16, N, prefetch);
  // The library's convs: on the small (N, Cr, H, W) map (about 1/16 of x's bytes).
  const auto compute = [&](const at::Tensor& t) { return bf16 ? t.to(at::kBFloat16) : t; };
  if (!w_dilated.empty()) y = compute(y);
  for (size_t i = 0; i < w_dilated.size(); ++i) {
    const at::Tensor w = compute(w_dilated[i]), bias = compute(b_dilated[i].reshape({Cr}));
    // On the CPU oneDNN's conv directly: conv2d's heuristic sends small batch-1 maps (Cr * H * W
    // < 20480, e.g. 64 x 14 x 14) to a slow native path (0.165 against 0.088 ms per conv).
    y = (y.is_cpu() && at::hasMKLDNN()
             ? at::mkldnn_convolution(y, w, bias, {dilation, dilation}, {1, 1}, {dilation, dilation}, 1)
             : at::conv2d(y, w, bias, 1, dilation, dilation))
            .relu_();
  }
  y = y.to(at::kFloat);  // the final conv in fp32 (a no-op unless bf16)
  if (y.is_cpu() && y.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    // The final 1x1 conv to one channel as a matrix-vector product over NHWC pixels.
    const at::Tensor pixels = y.permute({0, 2, 3, 1}).reshape({-1, Cr});
    return at::addmv(b_final.reshape({1}).expand({pixels.size(0)}), pixels, w_final.reshape({Cr}))
        .view({y.size(0), y.size(2), y.size(3)});
  }
  return at::conv2d(y, w_final.reshape({1, Cr, 1, 1}), b_final.reshape({1})).reshape({y.size(0), y.size(2), y.size(3)});
}

// Checks, then the pass over x: pooled partial means (N, P, C) (they sum to the means over P)
// and y = relu(reduce conv) (N, Cr, H, W) fp32. `op` names the caller in errors.
std::tuple<at::Tensor, at::Tensor> pass_over_x(const char* op, const at::Tensor& x, const at::Tensor& w_reduce,
                                               const at::Tensor& b_reduce, at::TensorList w_dilated,
                                               at::TensorList b_dilated, int64_t dilation,
                                               const at::Tensor& w_final, const at::Tensor& b_final,
                                               int64_t batch = 0) {
  BAM_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got sizes ", x.sizes());
  BAM_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
            op, ": x must be NCHW- or channels_last-contiguous, got strides ", x.strides());
  const int64_t C = x.size(1);
  BAM_CHECK(w_reduce.dim() == 2 && w_reduce.size(1) == C && w_reduce.scalar_type() == at::kFloat &&
                w_reduce.is_contiguous(),
            op, ": w_reduce must be contiguous fp32 (Cr, ", C, "), got ", w_reduce.sizes(), " ",
            w_reduce.scalar_type());
  const int64_t Cr = w_reduce.size(0);
  BAM_CHECK(Cr >= 1, op, ": w_reduce must have at least one row (reduced channel), got ", w_reduce.sizes());
  BAM_CHECK(b_reduce.numel() == Cr && b_reduce.scalar_type() == at::kFloat && b_reduce.is_contiguous(),
            op, ": b_reduce must be contiguous fp32 (", Cr, ",), got ", b_reduce.sizes());
  for (const auto& t : {w_reduce, b_reduce})
    BAM_CHECK(t.device() == x.device(), op, ": weights must be on x's device ", x.device());
  check_spatial_weights(op, Cr, x.device(), w_dilated, b_dilated, dilation, w_final, b_final);

  at::Tensor part, y;
#ifdef BAM_FUSED_WITH_CUDA
  if (x.is_cuda()) {
    // The library's convs run channels_last without layout transposes: y is written so.
    const bool y_channels_last = !spatial_kernel(x.device(), Cr, w_dilated);
    std::tie(part, y) = reduce_pool_cuda(x, w_reduce, b_reduce, y_channels_last);
  } else {
    std::tie(part, y) = reduce_pool_cpu(x, w_reduce, b_reduce, /*relu=*/true, /*cache_weights=*/true, batch);
  }
#else
  BAM_CHECK(x.is_cpu(), op, ": this build has no CUDA kernels, x is on ", x.device());
  std::tie(part, y) = reduce_pool_cpu(x, w_reduce, b_reduce, /*relu=*/true, /*cache_weights=*/true, batch);
#endif
  return {part, y};
}

// A plain function: an earlier lambda form of this check segfaulted while raising on the GPU
// machine (its own torch 2.11 build, 2026-11-25; not reproduced here, this form not yet run there).
void check_fp32(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape, at::Device device) {
  BAM_CHECK(t.sizes() == shape && t.scalar_type() == at::kFloat && t.is_contiguous() && t.device() == device, op,
            ": ", name, " must be contiguous fp32 ", shape, " on ", device, ", got ", t.sizes(), " ",
            t.scalar_type(), " on ", t.device());
}

at::Tensor means(const at::Tensor& part) { return part.size(1) == 1 ? part.select(1, 0) : part.sum(1); }

// The channel MLP w1 @ relu(w0 @ mean + b0) + b1 (N, C) from pooled partial means (N, P, C).
at::Tensor channel_mlp(const at::Tensor& part, const at::Tensor& w_fc0, const at::Tensor& b_fc0,
                       const at::Tensor& w_fc1, const at::Tensor& b_fc1) {
#ifdef BAM_FUSED_WITH_CUDA
  // Our MLP kernel runs one block per sample through the weights. Measured on an H200
  // (2026-11-25, N = 32): 6.8 us at C x hidden = 256 x 16, where the library's launches take
  // about 20 us; but 25 and 83 us at 512 x 32 and 1024 x 64, where the library wins.
  constexpr int64_t kMlpKernelMaxWeights = 256 * 16;
  if (part.is_cuda() && w_fc0.numel() <= kMlpKernelMaxWeights)
    return std::get<1>(channel_mlp_cuda(part, w_fc0, b_fc0, w_fc1, b_fc1));
#endif
  if (part.is_cpu()) return channel_mlp_cpu(part, w_fc0, b_fc0, w_fc1, b_fc1);
  return at::linear(at::linear(means(part), w_fc0, b_fc0).relu_(), w_fc1, b_fc1);
}

// Pooled partial means (N, P, C): they sum to the channel means over P.
void check_part(const char* op, const at::Tensor& part) {
  BAM_CHECK(part.dim() == 3 && part.size(1) >= 1 && part.scalar_type() == at::kFloat && part.is_contiguous(), op,
            ": part must be contiguous fp32 (N, P, C) with P >= 1, got ", part.sizes(), " ", part.scalar_type());
}

// Checks of the channel MLP's weights for C channels.
void check_mlp_weights(const char* op, int64_t C, at::Device device, const at::Tensor& w_fc0,
                       const at::Tensor& b_fc0, const at::Tensor& w_fc1, const at::Tensor& b_fc1) {
  BAM_CHECK(w_fc0.dim() == 2, op, ": w_fc0 must be 2-D (hidden, C), got ", w_fc0.sizes());
  const int64_t hidden = w_fc0.size(0);
  check_fp32(op, "w_fc0", w_fc0, {hidden, C}, device);
  check_fp32(op, "b_fc0", b_fc0, {hidden}, device);
  check_fp32(op, "w_fc1", w_fc1, {C, hidden}, device);
  check_fp32(op, "b_fc1", b_fc1, {C}, device);
}

// Both attention maps from the pass's outputs: the channel MLP's output (N, C) from the pooled
// partial means and the spatial map (N, H, W) from y. On CUDA the MLP may run on a side stream
// beside the dilated convs (cuda_overlap: under CUDA graph capture by default): both are small
// and leave most of the GPU idle.
std::tuple<at::Tensor, at::Tensor> maps_from_pass(const at::Tensor& part, const at::Tensor& y,
                                                  at::TensorList w_dilated, at::TensorList b_dilated,
                                                  int64_t dilation, const at::Tensor& w_final,
                                                  const at::Tensor& b_final, const at::Tensor& w_fc0,
                                                  const at::Tensor& b_fc0, const at::Tensor& w_fc1,
                                                  const at::Tensor& b_fc1, bool bf16 = false, int64_t batch = 0,
                                                  CacheHint prefetch = {}) {
  const auto mlp = [&] { return channel_mlp(part, w_fc0, b_fc0, w_fc1, b_fc1); };
  const auto spatial = [&] {
    return spatial_from_y(y, w_dilated, b_dilated, dilation, w_final, b_final, bf16, batch, prefetch);
  };
#ifdef BAM_FUSED_WITH_CUDA
  if (part.is_cuda() && cuda_overlap(part.device()))
    return run_beside(part.device(), mlp, spatial, {part, w_fc0, b_fc0, w_fc1, b_fc1});
#endif
  at::Tensor channel = mlp();
  return {channel, spatial()};
}

// The attention op's work (channel and spatial maps) for the op named `op`.
std::tuple<at::Tensor, at::Tensor> attention_maps(const char* op, const at::Tensor& x, const at::Tensor& w_reduce,
                                                  const at::Tensor& b_reduce, at::TensorList w_dilated,
                                                  at::TensorList b_dilated, int64_t dilation,
                                                  const at::Tensor& w_final, const at::Tensor& b_final,
                                                  const at::Tensor& w_fc0, const at::Tensor& b_fc0,
                                                  const at::Tensor& w_fc1, const at::Tensor& b_fc1,
                                                  int64_t batch = 0, CacheHint prefetch = {}) {
  BAM_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got sizes ", x.sizes());
  check_mlp_weights(op, x.size(1), x.device(), w_fc0, b_fc0, w_fc1, b_fc1);
  const auto [part, y] =
      pass_over_x(op, x, w_reduce, b_reduce, w_dilated, b_dilated, dilation, w_final, b_final, batch);
  return maps_from_pass(part, y, w_dilated, b_dilated, dilation, w_final, b_final, w_fc0, b_fc0, w_fc1, b_fc1,
                        cpu_bf16_products(x), batch, prefetch);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> branches(const at::Tensor& x, const at::Tensor& w_reduce,
                                            const at::Tensor& b_reduce, at::TensorList w_dilated,
                                            at::TensorList b_dilated, int64_t dilation,
                                            const at::Tensor& w_final, const at::Tensor& b_final) {
  const auto [part, y] = pass_over_x("bam_fused_C::branches", x, w_reduce, b_reduce, w_dilated, b_dilated,
                                     dilation, w_final, b_final);
  return {means(part), spatial_from_y(y, w_dilated, b_dilated, dilation, w_final, b_final, cpu_bf16_products(x))};
}

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& x, const at::Tensor& w_reduce,
                                             const at::Tensor& b_reduce, at::TensorList w_dilated,
                                             at::TensorList b_dilated, int64_t dilation,
                                             const at::Tensor& w_final, const at::Tensor& b_final,
                                             const at::Tensor& w_fc0, const at::Tensor& b_fc0,
                                             const at::Tensor& w_fc1, const at::Tensor& b_fc1) {
  return attention_maps("bam_fused_C::attention", x, w_reduce, b_reduce, w_dilated, b_dilated, dilation, w_final,
                        b_final, w_fc0, b_fc0, w_fc1, b_fc1);
}

namespace {

// The gate of bam_eval into out (x's sizes and layout): NCHW rows are channels, channels_last
// rows are pixels. nt: non-temporal stores (stream_stores of the whole output).
void gate_into(const at::Tensor& x, const at::Tensor& channel, const at::Tensor& spatial, bool product,
               const at::Tensor& out, bool nt) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (x.is_contiguous())
    return gate_forward_into(x.view({N, C, HW}), channel, spatial.view({N, HW}), product, out.view({N, C, HW}), nt);
  gate_forward_into(x.permute({0, 2, 3, 1}).reshape({N, HW, C}), spatial.view({N, HW}), channel, product,
                    out.permute({0, 2, 3, 1}).view({N, HW, C}), nt);
}

// Groups bam_eval has run so far, and samples it has run one a thread (build_info: tests).
std::atomic<int64_t> eval_groups_run{0}, eval_thread_samples_run{0};

// How bam_eval walks the batch (BAM_FUSED_CPU_GROUPS: auto|threads|groups|images|off): samples
// [0, by_thread) one a thread, each through the whole BAM (pass over x, convs, MLP, gate) on its
// own, then the rest in groups of `group` samples, each group through the whole BAM over all
// threads before the next. Either way the gate finds the x it gates in the last-level cache
// instead of reading it from memory a second time. Only where the results are the same bits as
// the whole batch's: each sample or group takes the whole batch's kernel choices (chunks, direct
// or Winograd), which our dilated convs honour and oneDNN's cannot.
// groups: about kGroupBytes of x a group; images: one sample a group; off: the whole batch;
// threads: as many samples one a thread as the thread count divides, the rest as groups.
// auto: threads where each thread's sample fits its share of the last-level cache, else groups.
// Samples one a thread need no barrier between the stages, and the threads drift apart, so that
// one's gate streams out while the other computes. Paired A/B, groups -> threads, whole BAM eval
// fp32, 2 threads, 2-core Zen 4 (32 MB L3), 2026-11-28: N = 8, 256 x 56x56 1.03-1.26x over
// seven runs (the fast ones: the groups caught in a slow state of the VM), channels_last
// 0.99-1.20x, bf16 1.01-1.02x; N = 4 1.05x; N = 3 1.02x; N = 2 1.04-1.06x; 512 x 28x28
// 1.00-1.03x (N = 4: 0.98-1.00x); 1024 x 14x14 1.00-1.02x; 2048 x 7x7 (N = 16) 1.00x; N = 4,
// 256 x 112x112 1.01-1.06x. On a Zen 3 (AVX2) an earlier form measured a median 1.01x
// (0.96-1.07x): unmeasured there in this form.
// groups against the whole batch, 2-core AVX2 CPU (Zen 3), 2026-11-27: 1.04x at 256 x 56x56
// (one sample a group), 1.03x at 512 x 28x28 (two), 1.02x at 1024 x 14x14 (five), 1.00x on
// channels_last x at 56x56; one sample a group at 28x28 took 0.94x (each group pays the ops'
// fixed costs).
struct EvalPlan {
  int64_t by_thread;  // a multiple of the thread count
  int64_t group;      // >= 1
};
EvalPlan eval_plan(const at::Tensor& x, const at::Tensor& w_reduce, at::TensorList w_dilated) {
  constexpr int64_t kGroupBytes = int64_t{4} << 20;
  const std::string v = env_choice("BAM_FUSED_CPU_GROUPS", {"auto", "threads", "groups", "images", "off"});
  const int64_t N = x.size(0), Cr = w_reduce.dim() == 2 ? w_reduce.size(0) : 0;  // else the pass raises
  const bool exact =
      w_dilated.empty() || cpu_spatial_kernel(Cr, cpu_bf16_products(x), N * x.size(2) * x.size(3));
  if (v == "off" || N <= 1 || Cr < 1 || !exact) return {0, std::max<int64_t>(N, 1)};
  if (v == "images") return {0, 1};
  const int64_t sample_bytes = std::max<int64_t>(1, static_cast<int64_t>(x.nbytes()) / N);
  const int64_t group = std::clamp<int64_t>(kGroupBytes / sample_bytes, 1, N);
  const int64_t threads = at::get_num_threads();
  const bool by_thread = threads > 1 && (v == "threads" || (v == "auto" && threads * sample_bytes <=
                                                                               last_level_cache_bytes()));
  return {by_thread ? N / threads * threads : 0, group};
}

// Whether bam_eval prefetches each next group of x while the current group's dilated convs run
// (BAM_FUSED_CPU_PREFETCH: auto|on|off; read on every call; cpu/cache_hint.h says why). Only for
// x laid out whole samples apart, NCHW- or channels_last-contiguous. Auto prefetches but for
// NCHW x under AVX-512: paired A/B, off -> on, whole BAM eval fp32, 2-core Zen 4, 2026-11-28:
// NCHW 0.97-0.99x over five runs at 8 x 256 x 56x56 (why is not known), 0.99x at 8 x 512 x
// 28x28, 1.02x at 8 x 1024 x 14x14; channels_last 1.08x / 1.09x at 56x56. Under AVX2 (Zen 3)
// NCHW gained 1.05-1.09x at 56x56.
std::string cpu_prefetch_choice() { return env_choice("BAM_FUSED_CPU_PREFETCH", {"auto", "on", "off"}); }
bool prefetch_next_group(const at::Tensor& x) {
  const std::string v = cpu_prefetch_choice();
  const bool cl = x.is_contiguous(at::MemoryFormat::ChannelsLast), nchw = x.is_contiguous();
  if (v == "off" || !x.is_cpu() || !(cl || nchw)) return false;
  return v == "on" || cl || !avx512_vectors(chosen_isa());
}

}  // namespace

// The whole eval-mode BAM forward on the CPU, x * (1 + sigmoid(channel (+ or *) spatial)) in
// x's dtype and layout from the folded weights: the attention op, then the gate, sample by sample
// one a thread and group by group of samples (eval_plan). One op boundary for BAM.forward:
// through Python between them (bam_gate's checks and autograd Function) the same kernels took
// 10-30 us more a call (1.00-1.05x, paired, 2 threads).
at::Tensor bam_eval(const at::Tensor& x, const at::Tensor& w_reduce, const at::Tensor& b_reduce,
                    at::TensorList w_dilated, at::TensorList b_dilated, int64_t dilation, const at::Tensor& w_final,
                    const at::Tensor& b_final, const at::Tensor& w_fc0, const at::Tensor& b_fc0,
                    const at::Tensor& w_fc1, const at::Tensor& b_fc1, bool product) {
  const char* op = "bam_fused_C::bam_eval";
  BAM_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got sizes ", x.sizes());
  const int64_t N = x.size(0);
  const auto [by_thread, group] = eval_plan(x, w_reduce, w_dilated);
  auto out = at::empty_like(x);
  const bool nt = stream_stores(out.nbytes());
  const bool prefetch = prefetch_next_group(x);  // the variable checked on every call
  const int64_t sample_bytes = x.stride(0) * static_cast<int64_t>(x.element_size());
  // Samples n .. n + g - 1 of x, for prefetching (x is NCHW- or channels_last-contiguous: checked).
  const auto samples = [&](int64_t n, int64_t g) {
    return prefetch ? CacheHint{static_cast<const char*>(x.const_data_ptr()) + n * sample_bytes, g * sample_bytes}
                    : CacheHint{};
  };
  // Samples n0 .. n0 + g - 1 through the whole BAM, into out.
  const auto run = [&](int64_t n0, int64_t g, CacheHint next) {
    const at::Tensor xg = g == N ? x : x.narrow(0, n0, g);
    const auto [channel, spatial] = attention_maps(op, xg, w_reduce, b_reduce, w_dilated, b_dilated, dilation,
                                                   w_final, b_final, w_fc0, b_fc0, w_fc1, b_fc1, N, next);
    gate_into(xg, channel, spatial, product, g == N ? out : out.narrow(0, n0, g), nt);
  };
  if (by_thread > 0) {
    // Each thread its share of whole samples; the kernels inside run on the calling thread
    // (at::parallel_for does not nest), under this thread's dispatch and grad state.
    const at::ThreadLocalState state;
    at::parallel_for(0, by_thread, 1, [&](int64_t begin, int64_t end) {
      const at::ThreadLocalStateGuard guard(state);
      for (int64_t n = begin; n < end; ++n) run(n, 1, n + 1 < end ? samples(n + 1, 1) : CacheHint{});
    });
    eval_thread_samples_run.fetch_add(by_thread, std::memory_order_relaxed);
    if (by_thread == N) return out;
  }
  for (int64_t n0 = by_thread; n0 < std::max<int64_t>(N, 1); n0 += group) {  // once for an empty batch
    const int64_t g = std::min(group, N - n0);
    run(n0, g, n0 + g < N ? samples(n0 + g, std::min(group, N - n0 - g)) : CacheHint{});  // and the next group
    eval_groups_run.fetch_add(1, std::memory_order_relaxed);
  }
  return out;
}

// The attention op after its pass over x, from that pass's outputs (the Triton pass on CUDA,
// ops/pass_triton.py): pooled partial means part (N, P, C) and y = relu(reduce conv)
// (N, Cr, H, W), both fp32. Returns what attention returns.
std::tuple<at::Tensor, at::Tensor> attention_tail(const at::Tensor& part, const at::Tensor& y,
                                                  at::TensorList w_dilated, at::TensorList b_dilated,
                                                  int64_t dilation, const at::Tensor& w_final,
                                                  const at::Tensor& b_final, const at::Tensor& w_fc0,
                                                  const at::Tensor& b_fc0, const at::Tensor& w_fc1,
                                                  const at::Tensor& b_fc1) {
  const char* op = "bam_fused_C::attention_tail";
  check_part(op, part);
  BAM_CHECK(y.dim() == 4 && y.size(0) == part.size(0) && y.size(1) >= 1 && y.scalar_type() == at::kFloat &&
                y.device() == part.device() &&
                (y.is_contiguous() || y.is_contiguous(at::MemoryFormat::ChannelsLast)),
            op, ": y must be NCHW- or channels_last-contiguous fp32 (", part.size(0), ", Cr, H, W) on ",
            part.device(), ", got ", y.sizes(), " ", y.scalar_type(), " on ", y.device(), " strides ", y.strides());
  check_mlp_weights(op, part.size(2), part.device(), w_fc0, b_fc0, w_fc1, b_fc1);
  check_spatial_weights(op, y.size(1), y.device(), w_dilated, b_dilated, dilation, w_final, b_final);
  return maps_from_pass(part, y, w_dilated, b_dilated, dilation, w_final, b_final, w_fc0, b_fc0, w_fc1, b_fc1);
}

// What bytes_of writes of one tensor: its dtype, dimension count and sizes (a header of int64),
// then its elements' bytes, padded to 8. Whole CPU tensors, dense (contiguous copies otherwise).
namespace {
template <typename Visit>
void tensor_records(at::TensorList tensors, const char* op, Visit&& visit) {
  for (const at::Tensor& t : tensors) {
    BAM_CHECK(t.is_cpu() && t.layout() == at::kStrided, op, ": tensors must be dense CPU tensors, got one on ",
              t.device(), t.layout() == at::kStrided ? "" : " (not strided)");
    // (Three dispatcher calls a tensor when spelled as ops: skipped for the usual plain tensor.)
    const at::Tensor c =
        !t.is_conj() && !t.is_neg() && t.is_contiguous() ? t : t.resolve_conj().resolve_neg().contiguous();
    c10::SmallVector<int64_t, 8> header{static_cast<int64_t>(t.scalar_type()), t.dim()};
    header.append(t.sizes().begin(), t.sizes().end());
    visit(header, c);
  }
}
int64_t padded(int64_t bytes) { return (bytes + 7) / 8 * 8; }
}  // namespace

// One uint8 tensor with each tensor's record (above): BAM.folded()'s copy of the layers' tensors,
// which same_bytes compares them with on later calls.
at::Tensor bytes_of(at::TensorList tensors) {
  const char* op = "bam_fused_C::bytes_of";
  int64_t total = 0;
  tensor_records(tensors, op, [&](const c10::SmallVector<int64_t, 8>& header, const at::Tensor& c) {
    total += static_cast<int64_t>(header.size() * sizeof(int64_t)) + padded(static_cast<int64_t>(c.nbytes()));
  });
  at::Tensor out = at::zeros({total}, at::kByte);
  auto* p = static_cast<char*>(out.data_ptr());
  tensor_records(tensors, op, [&](const c10::SmallVector<int64_t, 8>& header, const at::Tensor& c) {
    std::memcpy(p, header.data(), header.size() * sizeof(int64_t));
    p += header.size() * sizeof(int64_t);
    if (c.nbytes() != 0) std::memcpy(p, c.const_data_ptr(), c.nbytes());
    p += padded(static_cast<int64_t>(c.nbytes()));
  });
  return out;
}

// Whether bytes_of(tensors) would equal copy, without making it: BAM.folded()'s check of its
// cached fold. It sees every write to the layers' tensors, those through .data included (they
// bump no version counter), in one op call (about 40 KB compared at C = 256).
bool same_bytes(at::TensorList tensors, const at::Tensor& copy) {
  const char* op = "bam_fused_C::same_bytes";
  BAM_CHECK(copy.is_cpu() && copy.scalar_type() == at::kByte && copy.dim() == 1 && copy.is_contiguous(), op,
            ": copy must be a contiguous 1-D uint8 CPU tensor (bytes_of's), got ", copy.sizes(), " ",
            copy.scalar_type(), " on ", copy.device());
  const auto* p = static_cast<const char*>(copy.const_data_ptr());
  const char* const end = p + copy.nbytes();
  bool same = true;
  // The headers first; the elements after, all together (over the threads when there are many).
  c10::SmallVector<ByteSpan, 32> spans;
  c10::SmallVector<at::Tensor, 32> keep;  // contiguous copies live until compared
  tensor_records(tensors, op, [&](const c10::SmallVector<int64_t, 8>& header, const at::Tensor& c) {
    const auto h = static_cast<int64_t>(header.size() * sizeof(int64_t));
    const int64_t n = static_cast<int64_t>(c.nbytes());
    same = same && end - p >= h + padded(n) && std::memcmp(p, header.data(), h) == 0;
    if (!same) return;
    if (n != 0) {
      spans.push_back({p + h, static_cast<const char*>(c.const_data_ptr()), n});
      keep.push_back(c);
    }
    p += h + padded(n);
  });
  return same && p == end && same_memory(spans);
}

// Whether attention on CUDA wants y channels_last (the library's convs) rather than NCHW (our
// spatial kernel) for Cr reduced channels and num_dilated dilated convs.
bool cuda_y_channels_last(int64_t cr, int64_t num_dilated) {
#ifdef BAM_FUSED_WITH_CUDA
  return num_dilated == 0 || !cuda_spatial_kernel(cr);
#else
  return true;
#endif
}

// Training mode's pass over x (CPU): the channel means (N, C) and y = w @ x + b, (N, Cr, H, W)
// fp32 channels_last, without BatchNorm or ReLU (they need batch statistics: PyTorch runs them).
std::tuple<at::Tensor, at::Tensor> reduce_pool(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                               bool relu) {
  const char* op = "bam_fused_C::reduce_pool";
  BAM_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got sizes ", x.sizes());
  BAM_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
            op, ": x must be NCHW- or channels_last-contiguous, got strides ", x.strides());
  BAM_CHECK(w.dim() == 2 && w.size(0) >= 1, op, ": w must be 2-D (Cr, C) with Cr >= 1, got ", w.sizes());
  check_fp32(op, "w", w, {w.size(0), x.size(1)}, x.device());
  check_fp32(op, "b", b, {w.size(0)}, x.device());
  auto [part, y] = reduce_pool_cpu(x, w, b, relu);
  return {means(part), y};
}

// Its backward: dw (Cr, C) and db (Cr,) fp32, and, when dx is given, dx += w^T dy + dmean / HW
// in place (dx: x's sizes, dtype and layout; the caller's gradient of x from elsewhere).
std::tuple<at::Tensor, at::Tensor> reduce_pool_backward(const at::Tensor& x, const at::Tensor& dy,
                                                        const at::Tensor& dmean, const at::Tensor& w,
                                                        const std::optional<at::Tensor>& dx) {
  const char* op = "bam_fused_C::reduce_pool_backward";
  BAM_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got sizes ", x.sizes());
  const bool nchw = x.is_contiguous();
  const auto layout = nchw ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  BAM_CHECK(nchw || x.is_contiguous(layout), op, ": x must be NCHW- or channels_last-contiguous, got strides ",
            x.strides());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  BAM_CHECK(w.dim() == 2 && w.size(0) >= 1, op, ": w must be 2-D (Cr, C) with Cr >= 1, got ", w.sizes());
  const int64_t Cr = w.size(0);
  check_fp32(op, "w", w, {Cr, C}, x.device());
  check_fp32(op, "dmean", dmean, {N, C}, x.device());
  BAM_CHECK(dy.sizes() == at::IntArrayRef({N, Cr, H, W}) && dy.scalar_type() == at::kFloat &&
                dy.is_contiguous(layout) && dy.device() == x.device(),
            op, ": dy must be fp32 (", N, ", ", Cr, ", ", H, ", ", W, ") laid out like x (",
            nchw ? "NCHW" : "channels_last", "), got ", dy.sizes(), " ", dy.scalar_type(), " strides ",
            dy.strides());
  if (dx.has_value()) {
    BAM_CHECK(dx->sizes() == x.sizes() && dx->scalar_type() == x.scalar_type() && dx->is_contiguous(layout) &&
                  dx->device() == x.device(),
              op, ": dx must have x's sizes ", x.sizes(), ", dtype ", x.scalar_type(), " and layout, got ",
              dx->sizes(), " ", dx->scalar_type(), " strides ", dx->strides());
  }
  return reduce_pool_backward_cpu(x, dy, dmean, w, dx);
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
  d["cpu_isa"] = cpu_isa();
  try {
    d["cpu_spatial"] = cpu_spatial_choice();  // as the ops read it (info's dilated-convs line)
  } catch (const c10::Error& e) {
    d["cpu_spatial"] = e.what_without_backtrace();  // a bad BAM_FUSED_CPU_SPATIAL: info shows why, ops raise
  }
  try {
    d["cpu_winograd"] = cpu_winograd_choice();
  } catch (const c10::Error& e) {
    d["cpu_winograd"] = e.what_without_backtrace();
  }
  try {
    d["cpu_pack_cache"] = cpu_pack_cache_choice();
  } catch (const c10::Error& e) {
    d["cpu_pack_cache"] = e.what_without_backtrace();
  }
  try {
    d["cpu_prefetch"] = cpu_prefetch_choice();
  } catch (const c10::Error& e) {
    d["cpu_prefetch"] = e.what_without_backtrace();
  }
  d["cpu_pack_cache_entries"] = pack_cache_entries();
  d["cpu_pack_cache_hits"] = pack_cache_hits();
  d["cpu_eval_groups"] = eval_groups_run.load(std::memory_order_relaxed);
  d["cpu_eval_thread_samples"] = eval_thread_samples_run.load(std::memory_order_relaxed);
  d["cpu_prefetched_bytes"] = cpu_prefetched_bytes();
  d["cpu_last_level_cache_bytes"] = last_level_cache_bytes();  // the auto rules' cache size
#ifdef _OPENMP
  d["openmp"] = true;  // at::parallel_for in our CPU kernels uses threads only with OpenMP
#else
  d["openmp"] = false;
#endif
  return d;
}

}  // namespace

TORCH_LIBRARY(bam_fused_C, m) {
  m.def("gate_forward(Tensor x, Tensor row, Tensor col, bool product) -> Tensor");
  m.def("gate_backward(Tensor grad, Tensor x, Tensor row, Tensor col, bool product) -> (Tensor, Tensor, Tensor)");
  m.def(
      "branches(Tensor x, Tensor w_reduce, Tensor b_reduce, Tensor[] w_dilated, Tensor[] b_dilated, int dilation, "
      "Tensor w_final, Tensor b_final) -> (Tensor, Tensor)");
  m.def(
      "attention(Tensor x, Tensor w_reduce, Tensor b_reduce, Tensor[] w_dilated, Tensor[] b_dilated, int dilation, "
      "Tensor w_final, Tensor b_final, Tensor w_fc0, Tensor b_fc0, Tensor w_fc1, Tensor b_fc1) -> (Tensor, Tensor)");
  m.def(
      "attention_tail(Tensor part, Tensor y, Tensor[] w_dilated, Tensor[] b_dilated, int dilation, Tensor w_final, "
      "Tensor b_final, Tensor w_fc0, Tensor b_fc0, Tensor w_fc1, Tensor b_fc1) -> (Tensor, Tensor)");
  m.def(
      "bam_eval(Tensor x, Tensor w_reduce, Tensor b_reduce, Tensor[] w_dilated, Tensor[] b_dilated, int dilation, "
      "Tensor w_final, Tensor b_final, Tensor w_fc0, Tensor b_fc0, Tensor w_fc1, Tensor b_fc1, bool product) "
      "-> Tensor");
  m.def("cuda_y_channels_last(int cr, int num_dilated) -> bool", &cuda_y_channels_last);
  m.def("bytes_of(Tensor[] tensors) -> Tensor", &bytes_of);
  m.def("same_bytes(Tensor[] tensors, Tensor copy) -> bool", &same_bytes);
  m.def("reduce_pool(Tensor x, Tensor w, Tensor b, bool relu) -> (Tensor, Tensor)");
  m.def("reduce_pool_backward(Tensor x, Tensor dy, Tensor dmean, Tensor w, Tensor(a!)? dx) -> (Tensor, Tensor)");
  m.def(
      "spatial_train(Tensor y, Tensor?[] bn_weight, Tensor?[] bn_bias, float[] eps, Tensor?[] running_mean, "
      "Tensor?[] running_var, Tensor[] conv_weight, Tensor?[] conv_bias, int dilation, Tensor final_weight, "
      "Tensor? final_bias) -> (Tensor, Tensor[], Tensor)");
  m.def(
      "spatial_train_backward(Tensor ds, Tensor y, Tensor[] maps, Tensor stats, Tensor?[] bn_weight, "
      "Tensor?[] bn_bias, Tensor[] conv_weight, int dilation, Tensor final_weight, bool[] batch_stats, "
      "bool dy_channels_last) -> (Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(bam_fused_C, CPU, m) {
  m.impl("branches", &branches);
  m.impl("attention", &attention);
  m.impl("attention_tail", &attention_tail);
  m.impl("bam_eval", &bam_eval);
  m.impl("reduce_pool", &reduce_pool);
  m.impl("reduce_pool_backward", &reduce_pool_backward);
  m.impl("spatial_train", &spatial_train);
  m.impl("spatial_train_backward", &spatial_train_backward);
}
// The kernels compute in fp32 whatever autocast asks of the caller, but the library ops they
// call inside (linear, conv2d, addmv) would be autocast to bf16 or fp16 and break that (a bf16
// channel map reached the gate: "row must be ... Float"). So each op runs with autocast off.
static void without_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

// Every op with tensor arguments.
static constexpr const char* kTensorOps[] = {"gate_forward", "gate_backward", "branches", "attention",
                                             "attention_tail", "bam_eval", "reduce_pool", "reduce_pool_backward",
                                             "spatial_train", "spatial_train_backward"};

TORCH_LIBRARY_IMPL(bam_fused_C, AutocastCPU, m) {
  for (const char* op : kTensorOps) m.impl(op, torch::CppFunction::makeFromBoxedFunction<&without_autocast>());
}
TORCH_LIBRARY_IMPL(bam_fused_C, AutocastCUDA, m) {
  for (const char* op : kTensorOps) m.impl(op, torch::CppFunction::makeFromBoxedFunction<&without_autocast>());
}

// Without an Autograd kernel, a call with inputs that need gradients would warn at backward
// and leave those gradients empty, and a forward-mode tangent would be dropped silently. This
// fallback raises instead ("not implemented" at backward; forward AD at the call). The module
// routes around the ops where autograd is wanted; the hand-written backwards run below it.
TORCH_LIBRARY_IMPL(bam_fused_C, Autograd, m) {
  for (const char* op : kTensorOps) m.impl(op, torch::autograd::autogradNotImplementedFallback());
}
// reduce_pool_backward mutates dx: the in-place counterpart of the fallback bumps its version.
TORCH_LIBRARY_IMPL(bam_fused_C, ADInplaceOrView, m) {
  m.impl("reduce_pool_backward", torch::autograd::autogradNotImplementedInplaceOrViewFallback());
}

#ifdef BAM_FUSED_WITH_CUDA
TORCH_LIBRARY_IMPL(bam_fused_C, CUDA, m) {
  m.impl("branches", &branches);
  m.impl("attention", &attention);
  m.impl("attention_tail", &attention_tail);
}
#endif

}  // namespace bam_fused

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &bam_fused::build_info, "How this extension was built");
}
