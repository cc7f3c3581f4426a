// Declarations shared by the op registrations (bam_fused.cpp) and the device kernels.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/cache_hint.h"

namespace bam_fused {

// Pooled partial means (N, P, C) (summed over P they give the channel means) and
// relu(w @ x + b) (or w @ x + b without relu) as (N, Cr, H, W) fp32 in channels_last memory, in
// one pass over x (NCHW- or channels_last-contiguous); w is (Cr, C) and b (Cr,) fp32.
// cache_weights: keep w's packing for the next call (pack_cache.h; the eval ops). batch: the
// batch size whose chunking to use (0: x's), so that a group of a batch's samples gets the bits
// the whole batch would.
std::tuple<at::Tensor, at::Tensor> reduce_pool_cpu(const at::Tensor& x, const at::Tensor& w,
                                                   const at::Tensor& b, bool relu = true,
                                                   bool cache_weights = false, int64_t batch = 0);
// The backward of w @ x + b and of the pooled means, given dy (N, Cr, H, W) and dmean (N, C)
// fp32, dy laid out like x: adds w^T dy + dmean / HW into dx (x's sizes, dtype and layout) when
// given, and returns dw (Cr, C) and db (Cr,), fp32.
std::tuple<at::Tensor, at::Tensor> reduce_pool_backward_cpu(const at::Tensor& x, const at::Tensor& dy,
                                                            const at::Tensor& dmean, const at::Tensor& w,
                                                            const std::optional<at::Tensor>& dx);
// The dilated 3x3 convs (bias, ReLU) on y (N, Cr, H, W) fp32 and the final 1x1 conv: (N, H, W),
// in the CPU's vector code (at least one dilated conv). bf16 (cpu_bf16_spatial_kernel(Cr) and
// avx512_bf16 only): y, weights, biases and conv outputs rounded to bf16, as oneDNN's bf16
// convs round them; the final conv in fp32. For the eval ops: the packed weights are kept for
// the next call (pack_cache.h). batch: the batch size whose blocking (direct or Winograd, task
// chunks) to use (0: y's), as in reduce_pool_cpu. prefetch: memory for the convs to bring into
// the cache as they compute (bam_eval's next group of x; cpu/cache_hint.h).
at::Tensor spatial_convs_cpu(const at::Tensor& y, at::TensorList w_dilated, at::TensorList b_dilated,
                             int64_t dilation, const at::Tensor& w_final, const at::Tensor& b_final,
                             bool bf16 = false, int64_t batch = 0, CacheHint prefetch = {});
// Bytes spatial_convs_cpu's convs have prefetched since the extension loaded (build_info).
int64_t cpu_prefetched_bytes();
// One dilated 3x3 conv (zero padding = dilation) + bias, with or without ReLU, on y (N, Cr, H, W)
// in our fp32 vector code: (N, Cr, H, W) fp32 channels_last. w (Cr, Cr, 3, 3), b (Cr,).
at::Tensor dilated_conv_cpu(const at::Tensor& y, const at::Tensor& w, const at::Tensor& b, int64_t dilation,
                            bool relu);
// Whether dilated_conv_grad_weight_cpu has a kernel for Cr channels (16, 32, 64).
bool cpu_dilated_grad_weight_kernel(int64_t Cr);
// The weight gradient (Cr, Cr, 3, 3) fp32 of that conv from dy and its input in (both
// (N, Cr, H, W)), in our vector code; the same bits for any thread count.
at::Tensor dilated_conv_grad_weight_cpu(const at::Tensor& dy, const at::Tensor& in, int64_t dilation);
// The training-mode spatial branch after the reduce conv (spatial_train_cpu.cpp; schemas in
// bam_fused.cpp), for y = the reduce conv's output (N, Cr, H, W) fp32 and K dilated convs
// (K + 1 BatchNorms; a BatchNorm given running_mean and running_var uses them, as in eval
// mode, else its batch statistics): the forward returns the spatial map (N, H, W), the maps the backward
// needs (a_0, y_1, a_1, ..., y_K, a_K: BatchNorm inputs y_k and ReLU outputs a_k, channels_last
// fp32) and stats (3, K + 1, Cr): each BatchNorm's batch mean, invstd and biased variance.
// The backward takes the spatial map's gradient ds and the same y, and returns dy (NCHW, or
// channels_last with dy_channels_last) and the layers' gradients, (bn_k weight, bn_k bias,
// conv_k weight, conv_k bias) for k < K, then bn_K's and the final conv's weight and bias.
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> spatial_train(
    const at::Tensor& y, const c10::List<std::optional<at::Tensor>>& bn_weight,
    const c10::List<std::optional<at::Tensor>>& bn_bias, at::ArrayRef<double> eps,
    const c10::List<std::optional<at::Tensor>>& running_mean, const c10::List<std::optional<at::Tensor>>& running_var,
    at::TensorList conv_weight, const c10::List<std::optional<at::Tensor>>& conv_bias, int64_t dilation,
    const at::Tensor& final_weight, const std::optional<at::Tensor>& final_bias);
std::tuple<at::Tensor, std::vector<at::Tensor>> spatial_train_backward(
    const at::Tensor& ds, const at::Tensor& y, at::TensorList maps, const at::Tensor& stats,
    const c10::List<std::optional<at::Tensor>>& bn_weight, const c10::List<std::optional<at::Tensor>>& bn_bias,
    at::TensorList conv_weight, int64_t dilation, const at::Tensor& final_weight, const c10::List<bool>& batch_stats,
    bool dy_channels_last);
// The gate's forward over a batch (bam_fused_C::gate_forward): x (N, R, L) contiguous, row (N, R)
// and col (N, L) fp32 (fp64 for fp64 x).
at::Tensor gate_forward_cpu(const at::Tensor& x, const at::Tensor& row, const at::Tensor& col, bool product);
// gate_forward_cpu's work into out (x's sizes, dtype and strides; inputs checked): with
// non-temporal stores when nt (stream_stores).
void gate_forward_into(const at::Tensor& x, const at::Tensor& row, const at::Tensor& col, bool product,
                       const at::Tensor& out, bool nt);
// The channel MLP w1 @ relu(w0 @ mean + b0) + b1 (N, C) on the CPU from pooled partial means
// part (N, P, C) (they sum to the means over P); all contiguous fp32 (the ops checked).
at::Tensor channel_mlp_cpu(const at::Tensor& part, const at::Tensor& w0, const at::Tensor& b0, const at::Tensor& w1,
                           const at::Tensor& b1);
// Whether the gate writes an output of `bytes` with non-temporal stores (BAM_FUSED_CPU_STREAM_STORES).
bool stream_stores(int64_t bytes);
// gate_cpu.cpp's split-exp fp32 rows under AVX-512 (cpu/gate_avx512.cpp); stream: non-temporal stores.
void gate_split_row_avx512(const float* x, const float* ecol, float er, float* out, int64_t L, bool stream);
// The same for bf16 rows (bf16 bits) on CPUs with AVX512-BF16 (cpu/gate_avx512bf16.cpp).
void gate_split_row_avx512bf16(const uint16_t* x, const float* ecol, float er, uint16_t* out, int64_t L,
                               bool stream);
// The bf16 gate backward's split-exp row (cpu/gate_avx512bf16.cpp): writes dx, adds each
// element's dz into dcol and returns the row's sum of dz.
float gate_bwd_split_row_avx512bf16(const uint16_t* g, const uint16_t* x, const float* ecol, float er, uint16_t* dx,
                                    float* dcol, int64_t L);
// The last-level cache of CPU 0 in bytes (sysfs, else sysconf, else 32 MB).
int64_t last_level_cache_bytes();
// Whether the CPU dilated convs for Cr reduced channels run our vector code (else oneDNN's):
// BAM_FUSED_CPU_SPATIAL, and in auto what was faster (bam_fused.cpp says where). eval_pixels:
// N * H * W of the map for the eval ops, which take ours on small maps below 16 channels (and
// above 32 under AVX-512); 0 for the training convs, which do not.
bool cpu_spatial_kernel(int64_t Cr, bool bf16, int64_t eval_pixels = 0);
// BAM_FUSED_CPU_SPATIAL as read now: auto, kernel or library.
std::string cpu_spatial_choice();
// BAM_FUSED_CPU_WINOGRAD as read now: auto, on or off (our fp32 dilated convs by Winograd's
// F(2x2, 3x3), cpu/winograd_conv.h, or direct).
std::string cpu_winograd_choice();
// Whether spatial_convs_cpu has a bf16 kernel for Cr reduced channels.
bool cpu_bf16_spatial_kernel(int64_t Cr);
// The instruction set the CPU pass over x uses now (BAM_FUSED_CPU_ISA, else the widest).
std::string cpu_isa();
// Whether the CPU branches on x compute in bf16 as a bf16 model does (bf16 x on avx512_bf16):
// the pass's products, then the dilated convs on y rounded to bf16.
bool cpu_bf16_products(const at::Tensor& x);
#ifdef BAM_FUSED_WITH_CUDA
// y_channels_last: y is returned in channels_last memory (for the library's NHWC convs).
std::tuple<at::Tensor, at::Tensor> reduce_pool_cuda(const at::Tensor& x, const at::Tensor& w,
                                                    const at::Tensor& b, bool y_channels_last);
// The dilated 3x3 convs (bias, ReLU) on y (N, Cr, H, W) fp32 and the final 1x1 conv: (N, H, W).
at::Tensor spatial_convs_cuda(const at::Tensor& y, at::TensorList w_dilated, at::TensorList b_dilated,
                              int64_t dilation, const at::Tensor& w_final, const at::Tensor& b_final);
// From pooled partial means (N, P, C): the means (N, C) and the channel MLP
// w1 @ relu(w0 @ mean + b0) + b1 (N, C), in one kernel.
std::tuple<at::Tensor, at::Tensor> channel_mlp_cuda(const at::Tensor& part, const at::Tensor& w0,
                                                    const at::Tensor& b0, const at::Tensor& w1,
                                                    const at::Tensor& b1);
// Multiprocessors of a CUDA device (cached).
int cuda_multiprocessors(int device);
// Whether the attention ops run their channel MLP on a side stream beside the spatial convs
// (BAM_FUSED_CUDA_OVERLAP: auto = while the current stream of `device` is captured into a CUDA
// graph, where the streams' fork and join cost nothing per replay; on; off).
bool cuda_overlap(at::Device device);
// side() on a stream of the pool forked from `device`'s current stream and main() on that one,
// joined back: returns {side(), main()}. side_inputs: the tensors side() reads (kept from reuse
// by the caching allocator until the side stream is past them).
std::tuple<at::Tensor, at::Tensor> run_beside(at::Device device, const std::function<at::Tensor()>& side,
                                              const std::function<at::Tensor()>& main,
                                              std::initializer_list<at::Tensor> side_inputs);
#endif

// The eval-mode branch op: pooled means (N, C) and the spatial map (N, H, W), fp32.
std::tuple<at::Tensor, at::Tensor> branches(const at::Tensor& x, const at::Tensor& w_reduce,
                                            const at::Tensor& b_reduce, at::TensorList w_dilated,
                                            at::TensorList b_dilated, int64_t dilation,
                                            const at::Tensor& w_final, const at::Tensor& b_final);

// Both attention maps of an eval-mode BAM: the channel MLP's output (N, C) and the spatial
// map (N, H, W), fp32; the branch op followed by the channel MLP (w_fc0 (Cr, C), w_fc1 (C, Cr)).
std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& x, const at::Tensor& w_reduce,
                                             const at::Tensor& b_reduce, at::TensorList w_dilated,
                                             at::TensorList b_dilated, int64_t dilation,
                                             const at::Tensor& w_final, const at::Tensor& b_final,
                                             const at::Tensor& w_fc0, const at::Tensor& b_fc0,
                                             const at::Tensor& w_fc1, const at::Tensor& b_fc1);

}  // namespace bam_fused
