// Helpers shared by the CPU tests: random [B, S, H, D] tensors (of any dtype, optionally with
// padded strides), relative L2 error, and a poison value to prove every output was written.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "monarchrt/attention.h"
#include "monarchrt/workload.h"

namespace monarchrt {
namespace test {

// An owning tensor: storage plus a view. `pad` adds unused elements between heads and tokens
// so the views are not contiguous.
struct Tensor {
  std::vector<uint8_t> storage;
  TensorView view;

  Tensor(DType dtype, int64_t B, int64_t S, int64_t H, int64_t D, int64_t pad = 0) {
    view.dtype = dtype;
    view.shape[0] = B, view.shape[1] = S, view.shape[2] = H, view.shape[3] = D;
    view.stride[3] = 1;
    view.stride[2] = D + pad;
    view.stride[1] = H * (D + pad) + pad;
    view.stride[0] = S * view.stride[1];
    storage.assign(static_cast<size_t>(B * view.stride[0] * dtype_size(dtype)), 0);
    view.data = storage.data();
  }
  Tensor(const Tensor& o) : storage(o.storage), view(o.view) { view.data = storage.data(); }
  Tensor& operator=(const Tensor& o) {
    storage = o.storage;
    view = o.view;
    view.data = storage.data();
    return *this;
  }

  double at(int64_t b, int64_t s, int64_t h, int64_t d) const {
    return load_element(view.data, view.dtype, view.offset(b, s, h, d));
  }
  void set(int64_t b, int64_t s, int64_t h, int64_t d, double x) {
    store_element(view.data, view.dtype, view.offset(b, s, h, d), x);
  }
  void fill_normal(Rng& rng, double scale = 1.0) {
    for (int64_t b = 0; b < view.shape[0]; ++b)
      for (int64_t s = 0; s < view.shape[1]; ++s)
        for (int64_t h = 0; h < view.shape[2]; ++h)
          for (int64_t d = 0; d < view.shape[3]; ++d) set(b, s, h, d, scale * rng.normal());
  }
  void fill(double x) {
    for (int64_t b = 0; b < view.shape[0]; ++b)
      for (int64_t s = 0; s < view.shape[1]; ++s)
        for (int64_t h = 0; h < view.shape[2]; ++h)
          for (int64_t d = 0; d < view.shape[3]; ++d) set(b, s, h, d, x);
  }
  // All logical elements, in [B, S, H, D] order, as double.
  std::vector<double> values() const {
    std::vector<double> out;
    for (int64_t b = 0; b < view.shape[0]; ++b)
      for (int64_t s = 0; s < view.shape[1]; ++s)
        for (int64_t h = 0; h < view.shape[2]; ++h)
          for (int64_t d = 0; d < view.shape[3]; ++d) out.push_back(at(b, s, h, d));
    return out;
  }
};

// Tokens [first, first + count) of t as a new contiguous tensor of the same dtype.
inline Tensor slice_tokens(const Tensor& t, int64_t first, int64_t count) {
  Tensor out(t.view.dtype, t.view.batch(), count, t.view.heads(), t.view.head_dim());
  for (int64_t b = 0; b < t.view.batch(); ++b)
    for (int64_t s = 0; s < count; ++s)
      for (int64_t h = 0; h < t.view.heads(); ++h)
        for (int64_t d = 0; d < t.view.head_dim(); ++d) out.set(b, s, h, d, t.at(b, first + s, h, d));
  return out;
}

// A fresh directory under GoogleTest's temporary directory, removed with everything in it.
class TempDir {
 public:
  explicit TempDir(const std::string& tag) {
    static int counter = 0;
    std::string base = ::testing::TempDir();
    if (!base.empty() && base.back() != '/') base += '/';
    path_ = base + "monarchrt_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++);
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// "grid 3x5x7 layout 1/1/1 chunk 1 kv sink 0 window 2 ring 8 written 6": the parts of the
// parameters that are set, for failure messages.
inline std::string describe(const AttentionParams& p) {
  std::string s = "grid " + p.grid.to_string() + " layout " + p.layout.to_string();
  if (p.num_iters != 1) s += " iters " + std::to_string(p.num_iters);
  if (p.causal_chunk_frames) s += " chunk " + std::to_string(p.causal_chunk_frames);
  if (p.kv_cache) {
    s += " kv sink " + std::to_string(p.sink_frames) + " window " + std::to_string(p.window_frames);
    if (p.cache_capacity_frames) {
      s += " ring " + std::to_string(p.cache_capacity_frames) + " written " + std::to_string(p.cache_frames);
    }
  }
  return s;
}

inline double relative_l2(const std::vector<double>& x, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    num += (x[i] - ref[i]) * (x[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / den);
}

inline bool all_finite(const std::vector<double>& x) {
  for (double v : x)
    if (!std::isfinite(v)) return false;
  return true;
}

// Poison: NaN, which no correct output contains, so an element left unwritten is caught.
inline void poison(Tensor& t) { t.fill(std::nan("")); }

}  // namespace test
}  // namespace monarchrt
