// Running part of an op on a side stream beside the current one (ops.h: cuda_overlap,
// run_beside). Host code only: a fork and a join of two streams through events, which a CUDA
// graph capture records as two branches of the graph.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "../env_choice.h"
#include "../ops.h"

namespace bam_fused {

namespace {

// An event recorded on `from` that `to` waits for (raw CUDA events: ATen's CUDAEvent header
// pulls in the toolkit's library headers, which the build does not otherwise need).
void order_after(const c10::cuda::CUDAStream& from, const c10::cuda::CUDAStream& to) {
  cudaEvent_t event = nullptr;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(event, from.stream()));
  C10_CUDA_CHECK(cudaStreamWaitEvent(to.stream(), event, 0));
  C10_CUDA_CHECK(cudaEventDestroy(event));  // released once the device is past it
}

}  // namespace

bool cuda_overlap(at::Device device) {
  const std::string v = env_choice("BAM_FUSED_CUDA_OVERLAP", {"auto", "on", "off"});
  if (v != "auto") return v == "on";
  // Plain calls are host-bound on the GPU machines measured (ops/attention_cuda.py): two more
  // streams' events would cost host time for GPU time that is not the limit there.
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device.index()).stream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

std::tuple<at::Tensor, at::Tensor> run_beside(at::Device device, const std::function<at::Tensor()>& side,
                                              const std::function<at::Tensor()>& main,
                                              std::initializer_list<at::Tensor> side_inputs) {
  // The op's tensors may sit on another GPU than the current one: fork that GPU's stream.
  const c10::cuda::CUDAGuard device_guard(device);
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device.index());
  const c10::cuda::CUDAStream other = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, current.device_index());
  order_after(current, other);
  at::Tensor from_side;
  {
    const c10::cuda::CUDAStreamGuard guard(other);
    from_side = side();
  }
  // The caching allocator reuses a freed block in its stream's order: what the side stream read
  // must wait for it (recorded before main() runs, which may raise), and what it wrote (read
  // later on the current stream) for the current one.
  for (const at::Tensor& t : side_inputs) t.record_stream(other);
  at::Tensor from_main = main();
  order_after(other, current);
  from_side.record_stream(current);
  return {from_side, from_main};
}

}  // namespace bam_fused
