// Tile geometry, token permutations and cost formulas (specification sections 1 and 5).
#include "monarchrt/layout.h"

namespace monarchrt {

std::string VideoGrid::to_string() const {
  return std::to_string(T) + "x" + std::to_string(h) + "x" + std::to_string(w);
}

std::string MonarchLayout::to_string() const {
  return std::to_string(f_tied) + "/" + std::to_string(h_reduce) + "/" + std::to_string(w_reduce);
}

int64_t TileGeometry::tile_of(int64_t t, int64_t y, int64_t x) const {
  const int64_t rows = grid.h / layout.h_reduce;
  const int64_t cols = grid.w / layout.w_reduce;
  return ((t / layout.f_tied) * layout.h_reduce + y / rows) * layout.w_reduce + x / cols;
}

int64_t TileGeometry::row_of(int64_t t, int64_t y) const {
  const int64_t rows = grid.h / layout.h_reduce;
  return (t % layout.f_tied) * rows + y % rows;
}

int64_t TileGeometry::col_of(int64_t x) const { return x % (grid.w / layout.w_reduce); }

int64_t TileGeometry::tile_position(int64_t token) const {
  const int64_t x = token % grid.w;
  const int64_t y = (token / grid.w) % grid.h;
  const int64_t t = token / (grid.w * grid.h);
  return (tile_of(t, y, x) * b1 + row_of(t, y)) * b2 + col_of(x);
}

static Status check_divides(const char* what, int64_t divisor, const char* axis, int64_t extent) {
  if (divisor <= 0) {
    return Status::invalid(std::string(what) + " = " + std::to_string(divisor) +
                           " must be positive");
  }
  if (extent % divisor != 0) {
    return Status::invalid(std::string(what) + " = " + std::to_string(divisor) +
                           " does not divide " + axis + " = " + std::to_string(extent) +
                           " (a tile must hold whole frames, rows and columns)");
  }
  return Status();
}

Status make_tile_geometry(const VideoGrid& grid, const MonarchLayout& layout, TileGeometry* out) {
  if (grid.T <= 0 || grid.h <= 0 || grid.w <= 0) {
    return Status::invalid("grid: T, h and w must be positive, got " + grid.to_string());
  }
  if (grid.h > INT64_MAX / grid.w || grid.T > INT64_MAX / (grid.h * grid.w)) {
    return Status::invalid("grid: T*h*w of " + grid.to_string() + " overflows int64");
  }
  MONARCHRT_RETURN_IF_ERROR(check_divides("layout.f_tied", layout.f_tied, "grid.T", grid.T));
  MONARCHRT_RETURN_IF_ERROR(check_divides("layout.h_reduce", layout.h_reduce, "grid.h", grid.h));
  MONARCHRT_RETURN_IF_ERROR(check_divides("layout.w_reduce", layout.w_reduce, "grid.w", grid.w));
  TileGeometry g;
  g.grid = grid;
  g.layout = layout;
  g.b1 = layout.f_tied * (grid.h / layout.h_reduce);
  g.b2 = grid.w / layout.w_reduce;
  g.tiles_per_frame_group = layout.h_reduce * layout.w_reduce;
  g.tiles = (grid.T / layout.f_tied) * g.tiles_per_frame_group;
  *out = g;
  return Status();
}

std::vector<int64_t> tile_order_permutation(const TileGeometry& geometry) {
  const int64_t n = geometry.grid.tokens();
  std::vector<int64_t> perm(static_cast<size_t>(n));
  for (int64_t token = 0; token < n; ++token) perm[geometry.tile_position(token)] = token;
  return perm;
}

std::vector<int64_t> inverse_permutation(const std::vector<int64_t>& perm) {
  std::vector<int64_t> inv(perm.size());
  for (size_t p = 0; p < perm.size(); ++p) inv[static_cast<size_t>(perm[p])] = static_cast<int64_t>(p);
  return inv;
}

double monarch_parameter_density(int64_t b1, int64_t b2) {
  return static_cast<double>(b1 + b2) / (static_cast<double>(b1) * static_cast<double>(b2));
}

double monarch_flops(int64_t A, int64_t F, int64_t b1, int64_t b2, int64_t D) {
  const double pairs = static_cast<double>(A) * static_cast<double>(F);
  return pairs * (6.0 * b1 * b2 * b2 * D + 4.0 * b1 * b1 * b2 * D);
}

double dense_flops(int64_t Sq, int64_t Skv, int64_t D) {
  return 4.0 * static_cast<double>(Sq) * static_cast<double>(Skv) * static_cast<double>(D);
}

}  // namespace monarchrt
