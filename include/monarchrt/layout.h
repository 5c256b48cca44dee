// The video layout of Monarch attention (specification section 1): a grid of T frames x h rows x
// w columns, the tiling (f_tied, h_reduce, w_reduce) that cuts it into A tiles of b1 x b2 tokens,
// and the permutation between natural token order and tile order. Tilings are built only from
// these three divisors, so no layout can split a video axis across the two block dimensions.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "monarchrt/status.h"

namespace monarchrt {

struct VideoGrid {
  int64_t T = 0;  // latent frames
  int64_t h = 0;  // token rows per frame
  int64_t w = 0;  // token columns per frame
  int64_t tokens() const { return T * h * w; }
  int64_t tokens_per_frame() const { return h * w; }
  std::string to_string() const;  // "21x30x52"
};

struct MonarchLayout {
  int64_t f_tied = 1;    // frames per tile (divides T)
  int64_t h_reduce = 1;  // tiles per frame along rows (divides h)
  int64_t w_reduce = 1;  // tiles per frame along columns (divides w)
  std::string to_string() const;  // "1/1/1"
};

// The tiles of one grid under one layout.
struct TileGeometry {
  VideoGrid grid;
  MonarchLayout layout;
  int64_t b1 = 0;              // rows of a tile: f_tied * (h / h_reduce)
  int64_t b2 = 0;              // columns of a tile: w / w_reduce
  int64_t tiles = 0;           // A (queries) or F (keys)
  int64_t tiles_per_frame_group = 0;  // h_reduce * w_reduce tiles cover f_tied frames
  int64_t tile_tokens() const { return b1 * b2; }

  // Tile, in-tile row and column of token (t, y, x), as in specification section 1.
  int64_t tile_of(int64_t t, int64_t y, int64_t x) const;
  int64_t row_of(int64_t t, int64_t y) const;
  int64_t col_of(int64_t x) const;
  // Position of a natural-order token in tile order: (tile * b1 + row) * b2 + col.
  int64_t tile_position(int64_t token) const;
  // First frame covered by tile `a`.
  int64_t first_frame_of_tile(int64_t a) const { return (a / tiles_per_frame_group) * layout.f_tied; }
};

// Validates the grid and the layout (each divisor positive and dividing its axis) and fills
// `out`. Messages name the offending field: "layout.h_reduce = 4 does not divide grid.h = 30".
Status make_tile_geometry(const VideoGrid& grid, const MonarchLayout& layout, TileGeometry* out);

// perm[p] = natural token index of tile-order position p. Applying it gathers a natural-order
// sequence into tile order; inverse_permutation() scatters it back.
std::vector<int64_t> tile_order_permutation(const TileGeometry& geometry);
std::vector<int64_t> inverse_permutation(const std::vector<int64_t>& perm);

// Parameter density of Monarch on b1 x b2 tiles, (b1 + b2) / (b1 b2); sparsity is 1 minus it.
double monarch_parameter_density(int64_t b1, int64_t b2);
// Forward FLOPs of one iteration per (batch, head) for A query tiles against F key tiles.
double monarch_flops(int64_t A, int64_t F, int64_t b1, int64_t b2, int64_t D);
double dense_flops(int64_t Sq, int64_t Skv, int64_t D);

}  // namespace monarchrt
