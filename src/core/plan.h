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

// dst[p * D + d] = view[b, perm[p], h, d] (perm == nullptr: identity), as T.
template <typename T>
void gather_head(const TensorView& view, int64_t b, int64_t h, const int64_t* perm, T* dst);
// view[b, perm[p], h, d] = src[p * D + d].
template <typename T>
void scatter_head(const TensorView& view, int64_t b, int64_t h, const int64_t* perm, const T* src);

}  // namespace monarchrt
