// Argument checks shared by every attention implementation, and the plan they produce.
#include "plan.h"

#include <cmath>
#include <string>

namespace monarchrt {

namespace {

std::string str(int64_t v) { return std::to_string(v); }

Status check_same(const char* what, const TensorView& a, const char* an, const TensorView& b,
                  const char* bn, int dim) {
  if (a.shape[dim] != b.shape[dim]) {
    return Status::invalid(std::string(bn) + ": " + what + " (dim " + str(dim) + ") = " +
                           str(b.shape[dim]) + " must equal " + an + "'s " + str(a.shape[dim]) +
                           " (" + an + " " + a.shape_string() + ", " + bn + " " +
                           b.shape_string() + ")");
  }
  return Status();
}

Status check_multiple(const char* name, int64_t value, int64_t f_tied) {
  if (value % f_tied != 0) {
    return Status::invalid(std::string(name) + " = " + str(value) +
                           " is not a whole number of tiles: it must be a multiple of "
                           "layout.f_tied = " + str(f_tied));
  }
  return Status();
}

}  // namespace

std::vector<int64_t> attended_frames(const AttentionParams& params, int64_t cache_frames) {
  std::vector<int64_t> frames;
  for (int64_t f = 0; f < cache_frames; ++f) {
    const bool sink = params.kv_cache && f < params.sink_frames;
    const bool recent = !params.kv_cache || params.window_frames == 0 ||
                        f >= cache_frames - params.window_frames;
    if (sink || recent) frames.push_back(f);
  }
  return frames;
}

Status validate_bounded(const TensorView& view, const char* name, bool writable) {
  MONARCHRT_RETURN_IF_ERROR(validate_view(view, name, writable));
  for (int i = 0; i < 4; ++i) {
    if (view.shape[i] >= (int64_t{1} << 31)) {
      return Status::unsupported(std::string(name) + ": tensor dimension " + str(i) + " = " +
                                 str(view.shape[i]) + " exceeds 2^31 - 1");
    }
  }
  return Status();
}

int64_t cache_slot(const AttentionParams& params, int64_t frame) {
  if (!params.kv_cache || params.cache_capacity_frames == 0 || frame < params.sink_frames) return frame;
  return params.sink_frames + (frame - params.sink_frames) % (params.cache_capacity_frames - params.sink_frames);
}

Status check_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& out, const AttentionParams& params, bool monarch) {
  MONARCHRT_RETURN_IF_ERROR(validate_bounded(q, "q", false));
  MONARCHRT_RETURN_IF_ERROR(validate_bounded(k, "k", false));
  MONARCHRT_RETURN_IF_ERROR(validate_bounded(v, "v", false));
  MONARCHRT_RETURN_IF_ERROR(validate_bounded(out, "out", true));
  if (k.dtype != q.dtype || v.dtype != q.dtype) {
    return Status::invalid(std::string("k, v: dtype must equal q's ") + dtype_name(q.dtype) +
                           ", got k " + dtype_name(k.dtype) + " and v " + dtype_name(v.dtype));
  }
  const std::pair<const TensorView*, const char*> others[3] = {{&k, "k"}, {&v, "v"}, {&out, "out"}};
  for (const auto& o : others) {
    if (o.first->device != q.device) {
      return Status::invalid(std::string(o.second) + ": tensor is on " + device_name(o.first->device) + ", q on " +
                             device_name(q.device) + " (q, k, v and out must be on one device)");
    }
  }
  MONARCHRT_RETURN_IF_ERROR(check_same("batch", q, "q", k, "k", 0));
  MONARCHRT_RETURN_IF_ERROR(check_same("batch", q, "q", v, "v", 0));
  MONARCHRT_RETURN_IF_ERROR(check_same("heads", q, "q", k, "k", 2));
  MONARCHRT_RETURN_IF_ERROR(check_same("heads", q, "q", v, "v", 2));
  MONARCHRT_RETURN_IF_ERROR(check_same("head dim", q, "q", k, "k", 3));
  MONARCHRT_RETURN_IF_ERROR(check_same("head dim", q, "q", v, "v", 3));
  MONARCHRT_RETURN_IF_ERROR(check_same("tokens", k, "k", v, "v", 1));
  for (int d = 0; d < 4; ++d) MONARCHRT_RETURN_IF_ERROR(check_same("size", q, "q", out, "out", d));
  return check_attention_params(params, q.tokens(), k.tokens(), monarch);
}

Status check_attention_params(const AttentionParams& params, int64_t q_tokens, int64_t k_tokens, bool monarch) {
  constexpr int64_t kBound = int64_t{1} << 31;
  if (q_tokens < 1 || q_tokens >= kBound || k_tokens < 1 || k_tokens >= kBound) {
    return Status::invalid("q, k: tokens must be in [1, 2^31), got " + str(q_tokens) + " and " + str(k_tokens));
  }
  const VideoGrid& g = params.grid;
  if (g.T <= 0 || g.h <= 0 || g.w <= 0) {
    return Status::invalid("grid: T, h and w must be positive, got " + g.to_string());
  }
  // q_tokens < 2^31: with T, h, w and T*h at most that, T*h*w cannot overflow int64.
  const bool fits = g.T <= q_tokens && g.h <= q_tokens && g.w <= q_tokens &&
                    g.T * g.h <= q_tokens;
  if (!fits || g.tokens() != q_tokens) {
    return Status::invalid("q: tokens (dim 1) = " + str(q_tokens) + " must equal grid T*h*w = " +
                           g.to_string() + (fits ? " = " + str(g.tokens()) : ""));
  }
  if (params.num_iters < 1 || params.num_iters > kMaxIterations) {
    return Status::invalid("num_iters = " + str(params.num_iters) + " must be in [1, " +
                           str(kMaxIterations) + "]");
  }
  if (!std::isfinite(params.scale)) return Status::invalid("scale must be finite");
  if (params.causal_chunk_frames < 0) {
    return Status::invalid("causal_chunk_frames = " + str(params.causal_chunk_frames) +
                           " must be >= 0 (0 = bidirectional)");
  }

  int64_t cache_frames = g.T;
  if (!params.kv_cache) {
    if (k_tokens != q_tokens) {
      return Status::invalid("k: tokens (dim 1) = " + str(k_tokens) + " must equal q's " +
                             str(q_tokens) + " outside KV-cache mode");
    }
    if (params.sink_frames != 0 || params.window_frames != 0 || params.cache_capacity_frames != 0 ||
        params.cache_frames != 0) {
      return Status::invalid("sink_frames, window_frames, cache_capacity_frames and cache_frames "
                             "apply only in KV-cache mode (kv_cache)");
    }
  } else {
    if (params.causal_chunk_frames != 0) {
      return Status::invalid("causal_chunk_frames must be 0 in KV-cache mode: the cache holds only "
                             "the past and the current chunk");
    }
    if (k_tokens % g.tokens_per_frame() != 0) {
      return Status::invalid("k: tokens (dim 1) = " + str(k_tokens) +
                             " is not a whole number of frames of h*w = " +
                             str(g.tokens_per_frame()) + " tokens");
    }
    const int64_t slots = k_tokens / g.tokens_per_frame();
    cache_frames = slots;
    if (params.cache_capacity_frames < 0 || params.cache_frames < 0) {
      return Status::invalid("cache_capacity_frames and cache_frames must be >= 0");
    }
    if (params.cache_capacity_frames == 0) {
      if (params.cache_frames != 0 && params.cache_frames != slots) {
        return Status::invalid("cache_frames = " + str(params.cache_frames) + " must be 0 or equal "
                               "the " + str(slots) + " frames of k without a ring buffer "
                               "(cache_capacity_frames = 0)");
      }
    } else {
      if (slots != params.cache_capacity_frames) {
        return Status::invalid("k: tokens (dim 1) = " + str(k_tokens) + " must be "
                               "cache_capacity_frames * h * w = " + str(params.cache_capacity_frames) +
                               " * " + str(g.tokens_per_frame()) + " for a ring buffer");
      }
      if (params.sink_frames >= params.cache_capacity_frames) {
        return Status::invalid("sink_frames = " + str(params.sink_frames) + " must be smaller than "
                               "cache_capacity_frames = " + str(params.cache_capacity_frames));
      }
      cache_frames = params.cache_frames;
      const int64_t ring = params.cache_capacity_frames - params.sink_frames;
      // Every attended frame must still be in the ring.
      if (params.window_frames == 0 && cache_frames > params.cache_capacity_frames) {
        return Status::invalid("cache_frames = " + str(cache_frames) + " exceed cache_capacity_frames = " +
                               str(params.cache_capacity_frames) + ": with a ring buffer the "
                               "window_frames must be set (at most capacity - sink)");
      }
      if (params.window_frames > ring) {
        return Status::invalid("window_frames = " + str(params.window_frames) + " exceeds the ring's "
                               "cache_capacity_frames - sink_frames = " + str(ring) +
                               ": older frames have been overwritten");
      }
    }
    if (cache_frames < g.T) {
      return Status::invalid("k: the cache holds " + str(cache_frames) +
                             " frames, fewer than the query chunk's grid.T = " + str(g.T));
    }
    if (params.sink_frames < 0) return Status::invalid("sink_frames = " + str(params.sink_frames) + " must be >= 0");
    if (params.window_frames < 0) {
      return Status::invalid("window_frames = " + str(params.window_frames) + " must be >= 0");
    }
    if (params.window_frames != 0 && params.window_frames < g.T) {
      return Status::invalid("window_frames = " + str(params.window_frames) +
                             " must be 0 (whole cache) or at least the chunk's grid.T = " +
                             str(g.T) + ": the current chunk must be inside the window");
    }
  }

  if (monarch) {
    TileGeometry geometry;
    MONARCHRT_RETURN_IF_ERROR(make_tile_geometry(g, params.layout, &geometry));
    const int64_t f = params.layout.f_tied;
    MONARCHRT_RETURN_IF_ERROR(check_multiple("causal_chunk_frames", params.causal_chunk_frames, f));
    if (params.kv_cache) {
      MONARCHRT_RETURN_IF_ERROR(check_multiple("cache frames (k tokens / (h*w))", cache_frames, f));
      MONARCHRT_RETURN_IF_ERROR(check_multiple("cache_capacity_frames", params.cache_capacity_frames, f));
      MONARCHRT_RETURN_IF_ERROR(check_multiple("sink_frames", params.sink_frames, f));
      MONARCHRT_RETURN_IF_ERROR(check_multiple("window_frames", params.window_frames, f));
    }
  }
  return Status();
}

Status make_plan(const TensorView& q, const TensorView& k, const TensorView& v,
                 const TensorView& out, const AttentionParams& params, bool monarch,
                 Device required_device, AttentionPlan* plan) {
  MONARCHRT_RETURN_IF_ERROR(check_attention(q, k, v, out, params, monarch));
  if (q.device != required_device) {
    return Status::invalid(std::string("q: tensors are on ") + device_name(q.device) +
                           ", this path needs " + device_name(required_device));
  }
  AttentionPlan p;
  p.B = q.batch();
  p.H = q.heads();
  p.D = q.head_dim();
  p.Sq = q.tokens();
  const int64_t per_frame = params.grid.tokens_per_frame();
  const bool ring = params.kv_cache && params.cache_capacity_frames > 0;
  p.Skv = ring ? params.cache_frames * per_frame : k.tokens();
  p.scale = params.scale != 0.0 ? params.scale : 1.0 / std::sqrt(static_cast<double>(p.D));
  p.num_iters = params.num_iters;
  p.q_grid = params.grid;
  p.k_grid = params.grid;
  p.k_grid.T = p.Skv / params.grid.tokens_per_frame();
  p.q_frame_offset = p.k_grid.T - p.q_grid.T;
  p.causal_chunk_frames = params.causal_chunk_frames;
  p.frame_attended.assign(static_cast<size_t>(p.k_grid.T), 0);
  for (int64_t f : attended_frames(params, p.k_grid.T)) p.frame_attended[static_cast<size_t>(f)] = 1;
  if (ring) {
    p.k_phys.resize(static_cast<size_t>(p.Skv));
    for (int64_t t = 0; t < p.Skv; ++t) {
      p.k_phys[static_cast<size_t>(t)] = cache_slot(params, t / per_frame) * per_frame + t % per_frame;
    }
  }
  if (monarch) {
    MONARCHRT_RETURN_IF_ERROR(make_tile_geometry(p.q_grid, params.layout, &p.qg));
    MONARCHRT_RETURN_IF_ERROR(make_tile_geometry(p.k_grid, params.layout, &p.kg));
  }
  *plan = p;
  return Status();
}

Status plan_kv_write(const TensorView& new_k, const TensorView& new_v, const TensorView& cache_k,
                     const TensorView& cache_v, const AttentionParams& params, Device device,
                     std::vector<int64_t>* rows) {
  if (!params.kv_cache) return Status::invalid("kv_cache must be set for kv_cache_write");
  MONARCHRT_RETURN_IF_ERROR(validate_bounded(new_k, "new_k", false));
  MONARCHRT_RETURN_IF_ERROR(validate_bounded(new_v, "new_v", false));
  MONARCHRT_RETURN_IF_ERROR(validate_view(cache_k, "cache_k", true));
  MONARCHRT_RETURN_IF_ERROR(validate_view(cache_v, "cache_v", true));
  for (int d = 0; d < 4; ++d) {
    if (new_v.shape[d] != new_k.shape[d]) {
      return Status::invalid("new_v: shape " + new_v.shape_string() + " must equal new_k's " +
                             new_k.shape_string());
    }
    if (cache_v.shape[d] != cache_k.shape[d]) {
      return Status::invalid("cache_v: shape " + cache_v.shape_string() + " must equal cache_k's " +
                             cache_k.shape_string());
    }
  }
  for (const TensorView* t : {&new_k, &new_v, &cache_k, &cache_v}) {
    if (t->device != device) {
      return Status::invalid(std::string("new_k, new_v, cache_k, cache_v: tensors must be on ") +
                             device_name(device));
    }
  }
  // The chunk's keys play the queries' part in the attention checks.
  const TensorView out = TensorView::contiguous(new_k.data, new_k.dtype, new_k.batch(), new_k.tokens(),
                                                new_k.heads(), new_k.head_dim(), new_k.device);
  TensorView ck = cache_k, cv = cache_v;
  ck.dtype = cv.dtype = new_k.dtype;  // the copy converts, the attention checks compare dtypes
  MONARCHRT_RETURN_IF_ERROR(check_attention(new_k, ck, cv, out, params, false));
  const int64_t per_frame = params.grid.tokens_per_frame();
  const int64_t cache_frames = params.cache_capacity_frames > 0 ? params.cache_frames
                                                                : cache_k.tokens() / per_frame;
  const int64_t first = cache_frames - params.grid.T;
  rows->resize(static_cast<size_t>(new_k.tokens()));
  for (int64_t t = 0; t < new_k.tokens(); ++t) {
    (*rows)[static_cast<size_t>(t)] = cache_slot(params, first + t / per_frame) * per_frame + t % per_frame;
  }
  return Status();
}

namespace cpu {
Status kv_cache_write(const TensorView& new_k, const TensorView& new_v, const TensorView& cache_k,
                      const TensorView& cache_v, const AttentionParams& params) {
  std::vector<int64_t> rows;
  MONARCHRT_RETURN_IF_ERROR(plan_kv_write(new_k, new_v, cache_k, cache_v, params, Device::kCPU, &rows));
  for (int64_t b = 0; b < new_k.batch(); ++b)
    for (int64_t t = 0; t < new_k.tokens(); ++t)
      for (int64_t h = 0; h < new_k.heads(); ++h)
        for (int64_t d = 0; d < new_k.head_dim(); ++d) {
          const int64_t row = rows[static_cast<size_t>(t)];
          store_element(cache_k.data, cache_k.dtype, cache_k.offset(b, row, h, d),
                        load_element(new_k.data, new_k.dtype, new_k.offset(b, t, h, d)));
          store_element(cache_v.data, cache_v.dtype, cache_v.offset(b, row, h, d),
                        load_element(new_v.data, new_v.dtype, new_v.offset(b, t, h, d)));
        }
  return Status();
}
}  // namespace cpu

std::vector<int64_t> key_rows(const AttentionPlan& plan, const std::vector<int64_t>* perm) {
  if (plan.k_phys.empty()) return perm ? *perm : std::vector<int64_t>();
  std::vector<int64_t> rows(static_cast<size_t>(plan.Skv));
  for (size_t i = 0; i < rows.size(); ++i) {
    rows[i] = plan.k_phys[static_cast<size_t>(perm ? (*perm)[i] : static_cast<int64_t>(i))];
  }
  return rows;
}

template <typename T>
void gather_head(const TensorView& view, int64_t b, int64_t h, const int64_t* perm, T* dst) {
  gather_rows(view, b, h, perm, view.tokens(), dst);
}

template <typename T>
void gather_rows(const TensorView& view, int64_t b, int64_t h, const int64_t* perm, int64_t S, T* dst) {
  const int64_t D = view.head_dim();
  for (int64_t p = 0; p < S; ++p) {
    const int64_t s = perm ? perm[p] : p;
    const int64_t base = view.offset(b, s, h, 0);
    T* row = dst + p * D;
    switch (view.dtype) {
      case DType::kF32: {
        const float* src = static_cast<const float*>(view.data) + base;
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<T>(src[d * view.stride[3]]);
        break;
      }
      case DType::kF64: {
        const double* src = static_cast<const double*>(view.data) + base;
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<T>(src[d * view.stride[3]]);
        break;
      }
      case DType::kF16: {
        const uint16_t* src = static_cast<const uint16_t*>(view.data) + base;
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<T>(half_to_float(src[d * view.stride[3]]));
        break;
      }
      case DType::kBF16: {
        const uint16_t* src = static_cast<const uint16_t*>(view.data) + base;
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<T>(bf16_to_float(src[d * view.stride[3]]));
        break;
      }
    }
  }
}

template <typename T>
void scatter_head(const TensorView& view, int64_t b, int64_t h, const int64_t* perm, const T* src) {
  const int64_t S = view.tokens(), D = view.head_dim();
  for (int64_t p = 0; p < S; ++p) {
    const int64_t s = perm ? perm[p] : p;
    for (int64_t d = 0; d < D; ++d) {
      store_element(view.data, view.dtype, view.offset(b, s, h, d), static_cast<double>(src[p * D + d]));
    }
  }
}

template void gather_rows<float>(const TensorView&, int64_t, int64_t, const int64_t*, int64_t, float*);
template void gather_rows<double>(const TensorView&, int64_t, int64_t, const int64_t*, int64_t, double*);
template void gather_head<float>(const TensorView&, int64_t, int64_t, const int64_t*, float*);
template void gather_head<double>(const TensorView&, int64_t, int64_t, const int64_t*, double*);
template void scatter_head<float>(const TensorView&, int64_t, int64_t, const int64_t*, const float*);
template void scatter_head<double>(const TensorView&, int64_t, int64_t, const int64_t*, const double*);

}  // namespace monarchrt
