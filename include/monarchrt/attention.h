// Attention entry points: dense softmax attention, Monarch attention (specification sections 2-4)
// and oracle top-k attention, each as a naive fp64 CPU reference (namespace ref) and a fast fp32
// multi-threaded CPU path (namespace cpu). All take one plain parameter struct, AttentionParams,
// which the CUDA path and the PyTorch binding fill as well.
//
// Modes:
//  - full sequence: q, k, v cover the same grid; optionally block-causal by chunks of frames;
//  - KV cache (params.kv_cache): q is the current chunk (params.grid, T = chunk frames), k and v
//    hold every cached frame in absolute order, the current chunk last; the keys attended are
//    the first `sink_frames` frames plus the most recent `window_frames` frames (0 = all).
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
};

constexpr int kMaxIterations = 64;

// Checks every rule without touching any data: shapes, dtypes, devices, grid and layout
// divisibility, whole-tile chunks and windows. `monarch` adds the tiling rules. The same checks
// run at the start of every entry point below, so an error never leaves `out` half written.
Status check_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& out, const AttentionParams& params, bool monarch);

// Frames of the key grid that the queries attend to, in increasing order (all frames in full
// mode; sink plus window in KV-cache mode). `cache_frames` is k.tokens() / (h * w).
std::vector<int64_t> attended_frames(const AttentionParams& params, int64_t cache_frames);

namespace ref {
// fp64 accumulation, deliberately naive. Inputs of any dtype, output written in out's dtype.
Status dense_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& out, const AttentionParams& params);
Status monarch_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                         const TensorView& out, const AttentionParams& params);
// Each query keeps its ceil(density * n) highest-scoring allowed keys (n = allowed keys, at least
// one kept) and renormalizes softmax over them. density in (0, 1].
Status topk_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& out, const AttentionParams& params, double density);
// The effective Monarch matrix P of batch b, head h: row-major [q.tokens(), k.tokens()] in
// natural token order; disallowed keys get 0. out == P v (specification section 2).
Status monarch_effective_matrix(const TensorView& q, const TensorView& k,
                                const AttentionParams& params, int64_t b, int64_t h,
                                std::vector<double>* P);
}  // namespace ref

namespace cpu {
// fp32 arithmetic, threads over (batch, head, query block or tile). Same contract as ref::.
Status dense_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& out, const AttentionParams& params);
Status monarch_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                         const TensorView& out, const AttentionParams& params);
Status topk_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& out, const AttentionParams& params, double density);

// Worker threads of the CPU paths: MONARCHRT_NUM_THREADS if set, else the hardware's count.
void set_num_threads(int n);  // n <= 0 restores the default
int num_threads();
}  // namespace cpu

}  // namespace monarchrt
