// KV cache on the GPU: writing a chunk's keys and values into their ring-buffer slots, and the
// one-call "write the chunk, then attend" entry point used by autoregressive inference.
#include <cuda_runtime.h>

#include <string>

#include "../../core/plan.h"
#include "fwd_params.h"
#include "monarchrt/cuda.h"

namespace monarchrt {
namespace cuda_detail {
namespace {

struct KvWriteParams {
  const uint16_t* new_k;
  const uint16_t* new_v;
  uint16_t* cache_k;
  uint16_t* cache_v;
  int64_t nk_stride[3], nv_stride[3], ck_stride[3], cv_stride[3];  // batch, token, head
  int tokens, heads, chunks;  // chunks: 16-byte pieces of a row (D / 8)
  int per_frame, first_frame, sink, capacity;
};

// One thread per 16 bytes of one (batch, token, head) row of K and of V.
__global__ void kv_write_kernel(const KvWriteParams p) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t per_batch = int64_t(p.tokens) * p.heads * p.chunks;
  const int b = int(blockIdx.y);
  if (idx >= per_batch) return;
  const int dc = int(idx % p.chunks);
  const int h = int((idx / p.chunks) % p.heads);
  const int t = int(idx / (int64_t(p.chunks) * p.heads));
  int f = p.first_frame + t / p.per_frame;
  if (p.capacity > 0 && f >= p.sink) f = p.sink + (f - p.sink) % (p.capacity - p.sink);
  const int64_t row = int64_t(f) * p.per_frame + t % p.per_frame;
  const uint4 kx = *reinterpret_cast<const uint4*>(p.new_k + b * p.nk_stride[0] + t * p.nk_stride[1] + h * p.nk_stride[2] + dc * 8);
  const uint4 vx = *reinterpret_cast<const uint4*>(p.new_v + b * p.nv_stride[0] + t * p.nv_stride[1] + h * p.nv_stride[2] + dc * 8);
  *reinterpret_cast<uint4*>(p.cache_k + b * p.ck_stride[0] + row * p.ck_stride[1] + h * p.ck_stride[2] + dc * 8) = kx;
  *reinterpret_cast<uint4*>(p.cache_v + b * p.cv_stride[0] + row * p.cv_stride[1] + h * p.cv_stride[2] + dc * 8) = vx;
}

}  // namespace

Status prepare_kv_write() {
  cudaFuncAttributes attributes;
  const cudaError_t e = cudaFuncGetAttributes(&attributes, kv_write_kernel);  // loads the module
  if (e != cudaSuccess) return Status::internal(std::string("cudaFuncGetAttributes failed: ") + cudaGetErrorString(e));
  return Status();
}

}  // namespace cuda_detail

namespace cuda {

Status kv_cache_write(const TensorView& new_k, const TensorView& new_v, const TensorView& cache_k,
                      const TensorView& cache_v, const AttentionParams& params, void* stream) {
  std::vector<int64_t> rows;  // checked on the host; the kernel recomputes the slots
  MONARCHRT_RETURN_IF_ERROR(plan_kv_write(new_k, new_v, cache_k, cache_v, params, Device::kCUDA, &rows));
  const char* names[4] = {"new_k", "new_v", "cache_k", "cache_v"};
  const TensorView* views[4] = {&new_k, &new_v, &cache_k, &cache_v};
  for (int i = 0; i < 4; ++i) {
    const TensorView& t = *views[i];
    if (t.dtype != DType::kBF16 && t.dtype != DType::kF16) {
      return Status::unsupported(std::string(names[i]) + ": the CUDA path needs bfloat16 or float16");
    }
    if (t.dtype != new_k.dtype) {
      return Status::unsupported(std::string(names[i]) + ": dtype must equal new_k's on the CUDA path");
    }
    if (t.stride[3] != 1 || reinterpret_cast<uintptr_t>(t.data) % 16 != 0 || t.stride[0] % 8 != 0 ||
        t.stride[1] % 8 != 0 || t.stride[2] % 8 != 0 || t.head_dim() % 8 != 0) {
      return Status::unsupported(std::string(names[i]) +
                                 ": rows must be contiguous and 16-byte aligned on the CUDA path");
    }
  }
  cuda_detail::KvWriteParams p{};
  p.new_k = static_cast<const uint16_t*>(new_k.data);
  p.new_v = static_cast<const uint16_t*>(new_v.data);
  p.cache_k = static_cast<uint16_t*>(cache_k.data);
  p.cache_v = static_cast<uint16_t*>(cache_v.data);
  for (int i = 0; i < 3; ++i) {
    p.nk_stride[i] = new_k.stride[i];
    p.nv_stride[i] = new_v.stride[i];
    p.ck_stride[i] = cache_k.stride[i];
    p.cv_stride[i] = cache_v.stride[i];
  }
  p.tokens = int(new_k.tokens());
  p.heads = int(new_k.heads());
  p.chunks = int(new_k.head_dim() / 8);
  p.per_frame = int(params.grid.tokens_per_frame());
  const int64_t cache_frames = params.cache_capacity_frames > 0 ? params.cache_frames
                                                                : cache_k.tokens() / p.per_frame;
  p.first_frame = int(cache_frames - params.grid.T);
  p.sink = int(params.sink_frames);
  p.capacity = int(params.cache_capacity_frames);
  const int64_t per_batch = int64_t(p.tokens) * p.heads * p.chunks;
  const dim3 grid(unsigned((per_batch + 255) / 256), unsigned(new_k.batch()));
  cuda_detail::kv_write_kernel<<<grid, 256, 0, static_cast<cudaStream_t>(stream)>>>(p);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    return Status::internal(std::string("kv_write_kernel launch failed: ") + cudaGetErrorString(e));
  }
  return Status();
}

Status monarch_attention_kv(const TensorView& q, const TensorView& new_k, const TensorView& new_v,
                            const TensorView& cache_k, const TensorView& cache_v,
                            const TensorView& out, const AttentionParams& params, void* workspace,
                            size_t workspace_bytes, void* stream) {
  // Check the attention first so that a call that would fail leaves the cache untouched.
  MONARCHRT_RETURN_IF_ERROR(
      cuda_detail::check_attention_call(q, cache_k, cache_v, out, params, workspace, workspace_bytes));
  MONARCHRT_RETURN_IF_ERROR(kv_cache_write(new_k, new_v, cache_k, cache_v, params, stream));
  return monarch_attention(q, cache_k, cache_v, out, params, workspace, workspace_bytes, stream);
}

}  // namespace cuda
}  // namespace monarchrt
