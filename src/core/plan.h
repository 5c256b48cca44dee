// AttentionPlan: what every attention implementation needs once the arguments have been checked:
// sizes, scale, the key grid and tile geometries, which key frames and tiles each query may see,
// and gather/scatter helpers between strided [B, S, H, D] views and packed per-head buffers.
// make_plan() runs check_attention() first, so implementations start from valid input only.
#pragma once

#include <cstdint>
#include <vector>

#include "monarchrt/attention.h"

namespace monarchrt {

struct AttentionPlan {
  int64_t B = 0, H = 0, D = 0, Sq = 0, Skv = 0;
  double scale = 0.0;
  int num_iters = 1;
  VideoGrid q_grid, k_grid;
  TileGeometry qg, kg;            // filled for Monarch plans only
  int64_t q_frame_offset = 0;     // key-grid frame of query frame 0 (KV cache: cache - chunk)
  int64_t causal_chunk_frames = 0;
  std::vector<char> frame_attended;  // per key frame
  std::vector<int64_t> k_phys;       // logical key token -> token of the k/v view (ring); empty = same

  int64_t q_frame(int64_t q_token) const { return q_token / q_grid.tokens_per_frame() + q_frame_offset; }
  int64_t k_frame(int64_t k_token) const { return k_token / k_grid.tokens_per_frame(); }
  // Whether a query in (absolute) frame qf may attend to keys of frame kf.
  bool frame_allowed(int64_t qf, int64_t kf) const {
    if (!frame_attended[static_cast<size_t>(kf)]) return false;
    return causal_chunk_frames == 0 || kf / causal_chunk_frames <= qf / causal_chunk_frames;
  }
  // Whether query tile m may attend to key tile n (tiles never straddle a chunk or a window).
  bool tile_allowed(int64_t m, int64_t n) const {
    return frame_allowed(qg.first_frame_of_tile(m) + q_frame_offset, kg.first_frame_of_tile(n));
  }
};

Status make_plan(const TensorView& q, const TensorView& k, const TensorView& v,
                 const TensorView& out, const AttentionParams& params, bool monarch,
                 Device required_device, AttentionPlan* plan);

// Every check of the backward entry points (src/core/backward_plan.cpp), before anything is
// read or written: the views of dout, dq, dk, dv; their shapes and devices; then make_plan (q, k,
// v, params, with dq in the output's place: it has q's shape and is writable); then the gradients
// must not overlap one another; and Monarch supports num_iters == 1 only (kUnsupported).
Status make_backward_plan(const TensorView& q, const TensorView& k, const TensorView& v,
                          const TensorView& dout, const TensorView& dq, const TensorView& dk,
                          const TensorView& dv, const AttentionParams& params, bool monarch,
                          Device required_device, AttentionPlan* plan);

// validate_view() plus the size bound of check_attention (every dimension below 2^31), so that
// shapes can be multiplied safely afterwards.
Status validate_bounded(const TensorView& view, const char* name, bool writable);

// Checks a kv_cache_write() call (device `device`) and returns the cache rows (tokens of the
// k/v views) that the chunk's tokens go to, in token order.
Status plan_kv_write(const TensorView& new_k, const TensorView& new_v, const TensorView& cache_k,
                     const TensorView& cache_v, const AttentionParams& params, Device device,
                     std::vector<int64_t>* rows);

// The rows of the k/v views to gather, in order: perm[p] (natural order if perm is null) mapped
// through the ring buffer. Empty when that is the identity (pass nullptr to the gathers then).
std::vector<int64_t> key_rows(const AttentionPlan& plan, const std::vector<int64_t>* perm);

// dst[p * D + d] = view[b, rows[p], h, d] for p < count (rows == nullptr: identity), as T.
template <typename T>
void gather_rows(const TensorView& view, int64_t b, int64_t h, const int64_t* rows, int64_t count, T* dst);

// dst[p * D + d] = view[b, perm[p], h, d] (perm == nullptr: identity), as T.
template <typename T>
void gather_head(const TensorView& view, int64_t b, int64_t h, const int64_t* perm, T* dst);
// view[b, perm[p], h, d] = src[p * D + d].
template <typename T>
void scatter_head(const TensorView& view, int64_t b, int64_t h, const int64_t* perm, const T* src);

}  // namespace monarchrt
