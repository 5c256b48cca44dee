// Attention entry points: dense softmax attention, Monarch attention (specification sections 2-4)
// and oracle top-k attention, each as a naive fp64 CPU reference (namespace ref) and a fast fp32
// multi-threaded CPU path (namespace cpu). All take one plain parameter struct, AttentionParams,
// which the CUDA path and the PyTorch binding fill as well.
//
// Modes:
//  - full sequence: q, k, v cover the same grid; optionally block-causal by chunks of frames;
//  - KV cache (params.kv_cache): q is the current chunk (params.grid, T = chunk frames), and the
//    cache holds the frames written so far, the current chunk last; the keys attended are the
//    first `sink_frames` frames plus the most recent `window_frames` frames (0 = all). Either k
//    and v hold every frame in order (cache_capacity_frames = 0), or they are a ring buffer of
//    cache_capacity_frames frames in which logical frame f lives in slot f for f < sink_frames
//    and in slot sink + (f - sink) % (capacity - sink) after that, so a rolling window needs no
//    copy; cache_frames then says how many frames have been written (kv_cache_write() writes a
//    chunk into its slots).
#pragma once

#include <cstdint>
#include <vector>

#include "monarchrt/layout.h"
#include "monarchrt/status.h"
#include "monarchrt/tensor.h"

namespace monarchrt {

struct AttentionParams {
  VideoGrid grid;             // grid of the query tokens; q.tokens() must equal grid.tokens()
  MonarchLayout layout;       // tiling (Monarch only; dense and top-k ignore it)
  int num_iters = 1;          // Monarch refinement iterations (section 3), >= 1
  double scale = 0.0;         // softmax scale; 0 selects 1/sqrt(D)
  int64_t causal_chunk_frames = 0;  // block-causal chunk in frames, 0 = bidirectional (full mode)
  bool kv_cache = false;      // KV-cache call (see above)
  int64_t sink_frames = 0;    // KV cache: leading frames always attended
  int64_t window_frames = 0;  // KV cache: most recent frames attended, 0 = the whole cache
  int64_t cache_capacity_frames = 0;  // KV cache: frames of the ring buffer k/v, 0 = no ring
  int64_t cache_frames = 0;   // KV cache with a ring: frames written, the current chunk included
};

constexpr int kMaxIterations = 64;

// Checks every rule without touching any data: shapes, dtypes, devices, grid and layout
// divisibility, whole-tile chunks and windows. `monarch` adds the tiling rules. The same checks
// run at the start of every entry point below, so an error never leaves `out` half written.
Status check_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& out, const AttentionParams& params, bool monarch);
// The rules on params alone, for q and k views of q_tokens and k_tokens tokens (dim 1): what
// check_attention checks after the tensors themselves. Lets a caller validate a configuration
// before any tensor exists (e.g. `monarchrt generate` before it reads a checkpoint).
Status check_attention_params(const AttentionParams& params, int64_t q_tokens, int64_t k_tokens, bool monarch);

// Frames of the key grid that the queries attend to, in increasing order (all frames in full
// mode; sink plus window in KV-cache mode). `cache_frames` is k.tokens() / (h * w).
std::vector<int64_t> attended_frames(const AttentionParams& params, int64_t cache_frames);

// Ring-buffer slot of logical cache frame f (identity without a ring).
int64_t cache_slot(const AttentionParams& params, int64_t frame);

namespace ref {
// fp64 accumulation, deliberately naive. Inputs of any dtype, output written in out's dtype.
Status dense_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& out, const AttentionParams& params);
Status monarch_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                         const TensorView& out, const AttentionParams& params);
// monarch_attention() that also writes each query's stage-2 log-sum-exp of the last iteration,
// log sum_{n,k} exp(u[n,k]) in natural-log units, to lse[(b * H + h) * q.tokens() + token] (the
// statistic the backward needs; cpu:: and cuda:: have the same entry point).
Status monarch_attention_with_lse(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& out, float* lse, const AttentionParams& params);
// Each query keeps its ceil(density * n) highest-scoring allowed keys (n = allowed keys, at least
// one kept) and renormalizes softmax over them. density in (0, 1].
Status topk_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& out, const AttentionParams& params, double density);
// The effective Monarch matrix P of batch b, head h: row-major [q.tokens(), k.tokens()] in
// natural token order; disallowed keys get 0. out == P v (specification section 2).
Status monarch_effective_matrix(const TensorView& q, const TensorView& k,
                                const AttentionParams& params, int64_t b, int64_t h,
                                std::vector<double>* P);
// Backward passes: the gradients dq, dk, dv of dense_attention / monarch_attention (same q, k, v,
// params) for the upstream gradient dout (q's shape), computed in fp64 and written in each
// gradient's own dtype, OVERWRITING dq (q's shape), dk and dv (k's shape). dout may have any
// dtype; dq, dk, dv must be writable and must not overlap one another; all seven tensors on one
// device (cpu). In KV-cache mode dk and dv cover the whole cache (every row of k and v, ring
// slots included); keys that no query may attend (later chunks, frames outside the sink and
// window, ring slots holding no attended frame) get exactly zero gradient. Monarch supports
// num_iters == 1 only (kUnsupported otherwise). Every check runs before any write.
Status dense_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                const TensorView& dout, const TensorView& dq, const TensorView& dk,
                                const TensorView& dv, const AttentionParams& params);
Status monarch_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& dout, const TensorView& dq,
                                  const TensorView& dk, const TensorView& dv,
                                  const AttentionParams& params);
}  // namespace ref

namespace cpu {
// fp32 arithmetic, threads over (batch, head, query block or tile). Same contract as ref::.
Status dense_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& out, const AttentionParams& params);
Status monarch_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                         const TensorView& out, const AttentionParams& params);
Status monarch_attention_with_lse(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& out, float* lse, const AttentionParams& params);
Status topk_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& out, const AttentionParams& params, double density);
// Backward passes in fp32 (flash-style recomputation of the forward intermediates, nothing of
// the forward kept). Same contract, checks and error messages as ref::dense_attention_backward /
// ref::monarch_attention_backward: dq, dk, dv are overwritten in their own dtypes, unattended keys
// get exactly zero, Monarch supports num_iters == 1 only. Results do not depend on the thread
// count (bitwise).
Status dense_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                const TensorView& dout, const TensorView& dq, const TensorView& dk,
                                const TensorView& dv, const AttentionParams& params);
Status monarch_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& dout, const TensorView& dq,
                                  const TensorView& dk, const TensorView& dv,
                                  const AttentionParams& params);

// KV cache: writes the current chunk's keys and values (new_k, new_v: [B, grid.T*h*w, H, D])
// into cache_k / cache_v at logical frames [cache_frames - grid.T, cache_frames), i.e. into
// their ring-buffer slots (cache_slot()); without a ring, into the last grid.T frames. Any
// dtypes (converted); the same checks as the attention call first.
Status kv_cache_write(const TensorView& new_k, const TensorView& new_v, const TensorView& cache_k,
                      const TensorView& cache_v, const AttentionParams& params);

// Worker threads of the CPU paths: MONARCHRT_NUM_THREADS if set, else the hardware's count.
void set_num_threads(int n);  // n <= 0 restores the default
int num_threads();
}  // namespace cpu

}  // namespace monarchrt
