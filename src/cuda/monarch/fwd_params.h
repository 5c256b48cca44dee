// The plain parameter struct of the CUDA Monarch forward kernels, filled on the host from an
// AttentionPlan (src/cuda/monarch/fwd.cu) and passed by value to the kernels.
#pragma once

#include <cstdint>

#include <cstddef>

#include "monarchrt/attention.h"

namespace monarchrt {

struct AttentionPlan;

namespace cuda_detail {

struct MonarchFwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3];  // batch, token, head (elements)
  int64_t k_tokens, v_tokens;  // tokens of the k and v views (a KV cache: all its slots)
  int H;                       // heads
  int h, w;                    // rows and columns of a frame (query and key grids alike)
  int f_tied, w_reduce;        // layout
  int rows_pf;                 // h / h_reduce: token rows of a frame inside one tile
  int tpg;                     // tiles per frame group: h_reduce * w_reduce
  int b1, b2;                  // tile rows and columns
  int A, F;                    // query tiles, attended key tiles (the kernels' key tile numbers)
  // A KV-cache window numbers only the attended key tiles, so that the workspace holds no rows for
  // the frames between the sink and the window: kernel key tile n is tile n of the key grid for
  // n < sink_tiles, tile n + skip_tiles otherwise (skip_tiles = 0 without a window).
  int sink_tiles, skip_tiles;
  // 1 when every numbered key tile is attended (at most one gap, skipped): then the key tiles a
  // query tile may attend are a prefix 0 .. allowed_end(m) - 1 (tiles.cuh), block-causal or not.
  int allowed_prefix;
  int row_groups;              // CTAs along the tile rows: ceil(b1 / kRowsPerCta)
  int key_parts;               // two-pass stage 1: CTAs that share a (query tile, row)'s key tiles
  int q_frame_offset;          // key-grid frame of query frame 0
  int causal_chunk;            // block-causal chunk in frames, 0 = none
  int sink, window_start;      // KV cache: key frame f attended iff f < sink || f >= window_start
  int ring_capacity;           // KV cache ring buffer: frames of k/v (0: k/v hold every frame)
  float scale_log2;            // softmax scale * log2(e)
  // Two-pass path only: workspace for the stage-1 intermediates, [B*H][A][b2][F][b1] rows
  // (D elements each for aL and Y, one float for cL). See two_pass.cuh.
  void* ws_al;
  void* ws_y;
  float* ws_cl;
  // Iterations >= 2 only: the stage-1 proxies per workspace row (aR / cR, in the input dtype;
  // null: the queries themselves), and the per-query log-sum-exp of stage 2 in log2 units,
  // [B*H][A][b1][b2] (null: not written).
  void* ws_proxy;
  float* ws_lse;
  // Backward only (bwd.cu): stage 1 also writes its log-sum-exp per workspace row (log2 units of
  // the scaled scores), so that the key-oriented backward can rebuild R without a softmax.
  float* ws_lse1;
  // Optional (cuda::monarch_attention_with_lse): each query's stage-2 log-sum-exp of the last
  // iteration, natural log, [B*H][Sq] in token order (null: not written).
  float* lse_out;
};

// The kernels' parameters of a problem that make_plan() accepted (no workspace pointers set).
MonarchFwdParams make_fwd_params(const TensorView& q, const TensorView& k, const TensorView& v,
                                 const TensorView& out, const AttentionParams& params,
                                 const AttentionPlan& plan);
// The attended key tiles of a plan (the kernels' numbering above): how many, the leading run
// (sink), and the tiles skipped after it.
struct KeyTiles {
  int64_t count = 0, sink = 0, skip = 0;
  bool attended_only = true;  // every numbered tile is attended (false: more than one gap)
};
KeyTiles key_tiles(const AttentionPlan& plan);
// Workspace rows of the two-pass path: one per (batch*head, query tile, column, attended key
// tile, row).
int64_t workspace_rows(const AttentionPlan& plan);
// Launches stage 1 of the two-pass path (p.ws_al, ws_y, ws_cl and optionally ws_lse1 set) on
// `stream` (a cudaStream_t) for bf16 / fp16 and head dim 64 / 128.
Status launch_stage1(const MonarchFwdParams& p, int B, DType dtype, int D, void* stream);

// Sets the shared-memory limits of the backward kernels (bwd.cu), for cuda::prepare().
Status prepare_backward();

// Loads the KV-cache copy kernel (kv_cache.cu), for cuda::prepare().
Status prepare_kv_write();

// Every check cuda::monarch_attention() makes before launching (fwd.cu), for callers that must
// not change anything when the attention would fail (cuda::monarch_attention_kv).
Status check_attention_call(const TensorView& q, const TensorView& k, const TensorView& v,
                            const TensorView& out, const AttentionParams& params,
                            const void* workspace, size_t workspace_bytes);

}  // namespace cuda_detail
}  // namespace monarchrt
