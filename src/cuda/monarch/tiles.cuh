// Device-side tile arithmetic shared by the Monarch kernels: where a tile's tokens start, the
// token offset of a tile row, and whether a query tile may attend to a key tile (block-causal
// chunks, KV-cache sink and window).
#pragma once

#include "fwd_params.h"

namespace monarchrt {
namespace cuda_detail {

// Natural token index of (tile, row, column) in a grid with this layout is
// tile_base(tile) + row_offset(row) + column: the divisions happen once per tile and once per
// row (into a shared-memory table), not per element (they cost ~30% of all instructions).
__device__ __forceinline__ int tile_base(const MonarchFwdParams& p, int tile) {
  const int fg = tile / p.tpg, rem = tile % p.tpg;
  return (fg * p.f_tied * p.h + (rem / p.w_reduce) * p.rows_pf) * p.w + (rem % p.w_reduce) * p.b2;
}
// Tile of the key grid of the kernels' key tile n (attended tiles only, fwd_params.h).
__device__ __forceinline__ int grid_key_tile(const MonarchFwdParams& p, int n) {
  return n < p.sink_tiles ? n : n + p.skip_tiles;
}
// The same as tile_base for the kernels' key tile n, whose frames may live in a ring buffer
// (AttentionParams).
__device__ __forceinline__ int key_tile_base(const MonarchFwdParams& p, int n) {
  const int tile = grid_key_tile(p, n);
  const int fg = tile / p.tpg, rem = tile % p.tpg;
  int f0 = fg * p.f_tied;  // logical first frame; a tile's frames stay contiguous in the ring
  if (p.ring_capacity > 0 && f0 >= p.sink) f0 = p.sink + (f0 - p.sink) % (p.ring_capacity - p.sink);
  return (f0 * p.h + (rem / p.w_reduce) * p.rows_pf) * p.w + (rem % p.w_reduce) * p.b2;
}
__device__ __forceinline__ int row_offset(const MonarchFwdParams& p, int row) {
  return ((row / p.rows_pf) * p.h + row % p.rows_pf) * p.w;
}

// Whether query tile m may attend to the kernels' key tile n.
__device__ __forceinline__ bool tile_allowed(const MonarchFwdParams& p, int m, int n) {
  const int qf = (m / p.tpg) * p.f_tied + p.q_frame_offset;
  const int kf = (grid_key_tile(p, n) / p.tpg) * p.f_tied;
  if (kf >= p.sink && kf < p.window_start) return false;
  return p.causal_chunk == 0 || kf / p.causal_chunk <= qf / p.causal_chunk;
}

// The first key tile >= n that query tile m may attend to (p.F if none).
__device__ __forceinline__ int next_allowed(const MonarchFwdParams& p, int m, int n) {
  while (n < p.F && !tile_allowed(p, m, n)) ++n;
  return n;
}

// With p.allowed_prefix: query tile m may attend exactly the key tiles 0 .. allowed_end - 1
// (a binary search: tile_allowed costs four integer divisions).
__device__ __forceinline__ int allowed_end(const MonarchFwdParams& p, int m) {
  int lo = 0, hi = p.F;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (tile_allowed(p, m, mid)) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// The `lim` of next_allowed_in: allowed_end with p.allowed_prefix, else p.F.
__device__ __forceinline__ int allowed_lim(const MonarchFwdParams& p, int m) {
  return p.allowed_prefix ? allowed_end(p, m) : p.F;
}
// next_allowed(p, m, n) given lim = allowed_lim(p, m): no tile_allowed where the tiles are a prefix.
__device__ __forceinline__ int next_allowed_in(const MonarchFwdParams& p, int m, int n, int lim) {
  return p.allowed_prefix ? (n < lim ? n : p.F) : next_allowed(p, m, n);
}

// Part `part` of `parts` of query tile m's allowed key tiles (split by count, in order): its
// first tile and the tile after its last allowed one (p.F after the last allowed tile of all),
// so that a loop n = begin; n < end; n = next_allowed(p, m, n + 1) visits exactly the part.
// lim = allowed_lim(p, m).
__device__ __forceinline__ int2 allowed_part(const MonarchFwdParams& p, int m, int part, int parts, int lim) {
  if (p.allowed_prefix) {  // the allowed tiles are 0 .. lim - 1
    const int lo = part * lim / parts, hi = (part + 1) * lim / parts;
    const int end = hi < lim ? hi : p.F;
    return make_int2(lo < hi ? lo : end, end);
  }
  if (parts == 1) return make_int2(next_allowed(p, m, 0), p.F);
  int count = 0;
  for (int n = 0; n < p.F; ++n) count += tile_allowed(p, m, n);
  const int lo = part * count / parts, hi = (part + 1) * count / parts;
  int2 r = make_int2(p.F, p.F);
  for (int n = 0, o = 0; n < p.F; ++n) {
    if (!tile_allowed(p, m, n)) continue;
    if (o == lo) r.x = n;
    if (o == hi) {
      r.y = n;
      break;
    }
    ++o;
  }
  if (lo == hi) r.x = r.y;  // an empty part
  return r;
}

// Kernels that read what the launch before them wrote (the forward's and the backward's stage 2
// after stage 1, the Hopper dq kernel after dK / dV, the portable dK / dV after dq1) take the
// heads (grid z) in the opposite order: they start on the rows written last, which are still in
// L2, instead of the first ones, long since evicted.
__device__ __forceinline__ int bh_last_first() { return int(gridDim.z) - 1 - int(blockIdx.z); }

}  // namespace cuda_detail
}  // namespace monarchrt
