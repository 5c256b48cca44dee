// Dense softmax attention on the GPU (FlashAttention-2 style: one pass over the keys with an
// online softmax, mma.sync m16n8k16, K/V tiles double-buffered in shared memory; on Hopper wgmma,
// and where the key ranges are multiples of 8 keys TMA copies by a copying warpgroup with the two
// computing warpgroups taking turns on the tensor cores: flash.cu). The kernel takes
// its keys as up to four contiguous token ranges ("segments"), which covers a KV-cache window
// (sink frames + recent frames, ring-buffer wrap included) without a copy, and a per-query key
// limit for block-causal attention. Used by cuda::dense_attention() and by the engine (self-
// attention in the dense mode, cross-attention over the text). CUDA-free header.
#pragma once

#include <cstdint>

#include "monarchrt/attention.h"
#include "monarchrt/status.h"
#include "monarchrt/tensor.h"

namespace monarchrt {
namespace cuda_detail {

constexpr int kFlashMaxSegments = 4;

struct FlashArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3];  // batch, token, head (elements)
  int B, H, D;            // D: 64 or 128
  int Sq;                 // query tokens
  int segments;           // 1..kFlashMaxSegments
  int seg_start[kFlashMaxSegments], seg_len[kFlashMaxSegments];  // key token ranges
  // Block-causal (one segment starting at 0 only): query token s attends keys below
  // (s / causal_tokens + 1) * causal_tokens; 0 = no limit.
  int causal_tokens;
  float scale;            // softmax scale
  DType dtype;            // bf16 or fp16, all four tensors
  int max_ctas;           // the persistent Hopper kernel's CTAs at most (0: one per SM; tests set it)
};

// Launches on `stream` (a cudaStream_t). Checks only what the kernel itself needs (dtype, D,
// alignment, segment count); callers check shapes.
Status flash_attention(const FlashArgs& args, void* stream);
// cuda::dense_attention's checks of its arguments and the kernel's arguments they give (the
// attended cache frames as token ranges); cuda::dense_attention is this and flash_attention.
Status dense_attention_args(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                            const AttentionParams& params, FlashArgs* args);
Status prepare_flash();

}  // namespace cuda_detail
}  // namespace monarchrt
