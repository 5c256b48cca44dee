// CUDA path of Monarch attention, in the CUTLASS style: can_implement(), workspace_size(),
// run on a stream. This header is CUDA-free; the functions exist when the library was built with
// CUDA (the macro MONARCHRT_WITH_CUDA is then defined for users of the library).
//
// This version: forward (below) and one-iteration backward (at the end). The forward runs
// bidirectional / block-causal / KV cache with sink and window (and a ring-buffer cache), bf16 or fp16 in and out, fp32 accumulation, head dim 64 or 128, any tiling
// with b2 <= 128 and b1 <= 256 on the two-pass path (also several iterations); the fused path
// runs 1 iteration with b2 <= 64 at head dim 128. Tensors are device pointers with the head dim
// contiguous and 16-byte aligned rows. No allocation, no host synchronization, no autotuning:
// the call is capturable in a CUDA graph.
#pragma once

#include <cstddef>

#include "monarchrt/attention.h"

namespace monarchrt {
namespace cuda {

// Number of CUDA devices visible (0 when there is none or the driver is missing).
int device_count();

// Loads every kernel on the current device and sets its shared-memory limit, so that the first
// attention call runs as fast as later ones (lazy module loading would otherwise happen inside
// it). Optional; call once per device at start-up.
Status prepare();

// Whether the CUDA forward can run this problem on the current device (on the two-pass path,
// which supports the most: tiles up to 128 columns, several iterations); the Status says why
// not. The fused path (no workspace) has narrower limits, reported by monarch_attention().
Status can_implement(const TensorView& q, const TensorView& k, const TensorView& v,
                     const TensorView& out, const AttentionParams& params);

// Bytes of device workspace for the two-pass path (0 if the problem is not supported). The
// two-pass path keeps the stage-1 intermediates (aL, Y, cL) in this workspace: B*H*A*F*b1*b2 rows
// of 2*D elements plus one float, e.g. 609 MB for the Self-Forcing last chunk (12 heads).
size_t workspace_size(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& out, const AttentionParams& params);

// Monarch attention forward on `stream` (a cudaStream_t; nullptr = the default stream).
// workspace_bytes == 0 runs the fused kernel (no workspace); workspace_bytes >= workspace_size()
// runs the two-pass kernels (faster, see docs/cuda-forward.md); anything in between is an error.
// Checks everything can_implement() checks first; on error nothing is launched.
Status monarch_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                         const TensorView& out, const AttentionParams& params, void* workspace,
                         size_t workspace_bytes, void* stream);

// The forward for training: monarch_attention() on the two-pass path (a workspace is required)
// that also writes each query's stage-2 log-sum-exp of the last iteration, natural log, to
// lse[(b * H + h) * q.tokens() + token] (B * H * q.tokens() floats, device memory). Passing out
// and lse to monarch_attention_backward() spares the backward a sweep over the workspace.
Status monarch_attention_with_lse(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& out, float* lse, const AttentionParams& params,
                                  void* workspace, size_t workspace_bytes, void* stream);

// KV cache: writes the chunk's keys and values into their (ring-buffer) slots of cache_k /
// cache_v on `stream`, like cpu::kv_cache_write (bf16/fp16, one dtype, 16-byte aligned rows).
Status kv_cache_write(const TensorView& new_k, const TensorView& new_v, const TensorView& cache_k,
                      const TensorView& cache_v, const AttentionParams& params, void* stream);

// The autoregressive step in one call: writes the chunk's new K/V into the cache in place, then
// runs monarch_attention() of q over the cache window. Nothing is written if the problem is
// not supported.
Status monarch_attention_kv(const TensorView& q, const TensorView& new_k, const TensorView& new_v,
                            const TensorView& cache_k, const TensorView& cache_v,
                            const TensorView& out, const AttentionParams& params, void* workspace,
                            size_t workspace_bytes, void* stream);

// Dense softmax attention forward on `stream` (FlashAttention-2 style, no workspace), with the
// contract of cpu::dense_attention: full sequence (bidirectional or block-causal) or a KV-cache
// call over the attended window (sink and recent frames, ring buffer) read in place. bf16 or
// fp16 (one dtype for all four tensors), head dim 64 or 128, 16-byte aligned rows.
Status dense_attention(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                       const AttentionParams& params, void* stream);

// Backward of one-iteration Monarch attention (all modes; design in docs/cuda-backward.md):
// overwrites dq (q's shape), dk and dv (k's shape, the whole cache in KV-cache mode, where keys
// that no query attends get exactly zero), with the same checks and messages as
// cpu::monarch_attention_backward. All seven tensors bf16 or fp16 of one dtype, on the device,
// head dim 64 or 128, tiles up to 128 columns (at head dim 128 beyond 64 columns only on devices
// with Hopper's 227 KB of shared memory per block), 16-byte aligned rows.
// The workspace holds the recomputed stage-1 intermediates and the per-row / per-query
// gradients (about the forward's workspace plus 4 bytes x (3 x rows + (2 + D) x queries)).
// No allocation, no host synchronization: capturable in a CUDA graph.
size_t backward_workspace_size(const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView& dout, const TensorView& dq, const TensorView& dk,
                               const TensorView& dv, const AttentionParams& params);
Status monarch_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& dout, const TensorView& dq, const TensorView& dk,
                                  const TensorView& dv, const AttentionParams& params, void* workspace,
                                  size_t workspace_bytes, void* stream);
// The same with the forward's output and log-sum-exp from monarch_attention_with_lse() (same
// q, k, v, params; out in q's shape and dtype, 16-byte aligned rows): the stage-2 backward then
// takes each query's log-sum-exp and Delta = dout . out from them instead of a first sweep over
// the recomputed intermediates (docs/cuda-backward.md). Same workspace size.
Status monarch_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& out, const float* lse, const TensorView& dout,
                                  const TensorView& dq, const TensorView& dk, const TensorView& dv,
                                  const AttentionParams& params, void* workspace, size_t workspace_bytes,
                                  void* stream);

}  // namespace cuda
}  // namespace monarchrt
