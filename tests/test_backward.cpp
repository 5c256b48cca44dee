// The fp64 reference backward passes (ref::dense_attention_backward, ref::monarch_attention_backward)
// against central finite differences of the fp64 forward references (specification section 6,
// fact 8), for every element of q, k and v, over many small problems: odd tiles, f_tied, h_reduce
// and w_reduce > 1, batch and heads > 1, padded strides, bidirectional, block-causal and KV-cache
// modes with sinks, windows and ring buffers. Then structural facts (single-row tiles are dense,
// chunk-by-chunk KV-cache gradients sum to the block-causal ones, the future gets no gradient),
// dtypes and aliasing rules of the outputs, and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "test_util.h"

namespace monarchrt {
namespace {

using test::Tensor;

// ---- problems ------------------------------------------------------------------------------

struct Problem {
  bool monarch = false;
  AttentionParams params;
  Tensor q{DType::kF64, 1, 1, 1, 1}, k = q, v = q, dout = q;
  std::string name;
};

Status forward(const Problem& pr, const TensorView& out) {
  return pr.monarch ? ref::monarch_attention(pr.q.view, pr.k.view, pr.v.view, out, pr.params)
                    : ref::dense_attention(pr.q.view, pr.k.view, pr.v.view, out, pr.params);
}

Status backward(const Problem& pr, const TensorView& dq, const TensorView& dk, const TensorView& dv) {
  return pr.monarch
             ? ref::monarch_attention_backward(pr.q.view, pr.k.view, pr.v.view, pr.dout.view, dq, dk, dv, pr.params)
             : ref::dense_attention_backward(pr.q.view, pr.k.view, pr.v.view, pr.dout.view, dq, dk, dv, pr.params);
}

struct Grads {
  Tensor dq{DType::kF64, 1, 1, 1, 1}, dk = dq, dv = dq;
};

// Gradients in fp64, written into padded, NaN-poisoned views (so every element must be written,
// and written rather than accumulated).
Grads analytic(const Problem& pr) {
  const TensorView &q = pr.q.view, &k = pr.k.view;
  Grads g;
  g.dq = Tensor(DType::kF64, q.batch(), q.tokens(), q.heads(), q.head_dim(), 2);
  g.dk = Tensor(DType::kF64, k.batch(), k.tokens(), k.heads(), k.head_dim(), 1);
  g.dv = Tensor(DType::kF64, k.batch(), k.tokens(), k.heads(), k.head_dim(), 3);
  for (Tensor* t : {&g.dq, &g.dk, &g.dv}) test::poison(*t);
  const Status s = backward(pr, g.dq.view, g.dk.view, g.dv.view);
  EXPECT_TRUE(s.ok()) << pr.name << ": " << s.to_string();
  return g;
}

// f = sum(dout * out).
double objective(const Problem& pr) {
  const TensorView& q = pr.q.view;
  Tensor out(DType::kF64, q.batch(), q.tokens(), q.heads(), q.head_dim());
  const Status s = forward(pr, out.view);
  EXPECT_TRUE(s.ok()) << pr.name << ": " << s.to_string();
  double f = 0;
  for (int64_t b = 0; b < q.batch(); ++b)
    for (int64_t t = 0; t < q.tokens(); ++t)
      for (int64_t h = 0; h < q.heads(); ++h)
        for (int64_t d = 0; d < q.head_dim(); ++d) f += pr.dout.at(b, t, h, d) * out.at(b, t, h, d);
  return f;
}

// Central differences of f for every element of *x (a member of pr), in [B, S, H, D] order.
std::vector<double> finite_differences(Problem& pr, Tensor* x, double step = 1e-5) {
  std::vector<double> fd;
  const TensorView& v = x->view;
  for (int64_t b = 0; b < v.batch(); ++b)
    for (int64_t t = 0; t < v.tokens(); ++t)
      for (int64_t h = 0; h < v.heads(); ++h)
        for (int64_t d = 0; d < v.head_dim(); ++d) {
          const double x0 = x->at(b, t, h, d), xp = x0 + step, xm = x0 - step;
          x->set(b, t, h, d, xp);
          const double fp = objective(pr);
          x->set(b, t, h, d, xm);
          const double fm = objective(pr);
          x->set(b, t, h, d, x0);
          fd.push_back((fp - fm) / (xp - xm));
        }
  return fd;
}

// ||x - ref|| / ||ref||, and 0 / 0 = 0.
double rel_err(const std::vector<double>& x, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    num += (x[i] - ref[i]) * (x[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  if (den == 0) return num == 0 ? 0.0 : INFINITY;
  return std::sqrt(num / den);
}

double norm(const std::vector<double>& x) {
  double s = 0;
  for (double e : x) s += e * e;
  return std::sqrt(s);
}

// The largest finite-difference error seen, per mode and operator (printed by each test).
std::map<std::string, double>& worst() {
  static std::map<std::string, double> w;
  return w;
}

// Checks the analytic gradients of pr against finite differences (relative L2 < 1e-6 on each of
// dq, dk, dv) and that every gradient is finite and not identically zero.
void check_against_fd(Problem& pr, const std::string& mode) {
  SCOPED_TRACE(pr.name);
  const Grads g = analytic(pr);
  const Tensor* grads[3] = {&g.dq, &g.dk, &g.dv};
  Tensor* inputs[3] = {&pr.q, &pr.k, &pr.v};
  const char* names[3] = {"dq", "dk", "dv"};
  for (int i = 0; i < 3; ++i) {
    const std::vector<double> a = grads[i]->values();
    ASSERT_TRUE(test::all_finite(a)) << names[i] << " not fully written or not finite";
    ASSERT_GT(norm(a), 0.0) << names[i] << " is identically zero";
    const std::vector<double> fd = finite_differences(pr, inputs[i]);
    const double err = rel_err(a, fd);
    EXPECT_LT(err, 1e-6) << names[i];
    double& w = worst()[mode + (pr.monarch ? " monarch" : " dense")];
    w = std::max(w, err);
  }
}

void print_worst(const std::string& mode) {
  for (const auto& kv : worst()) {
    if (kv.first.rfind(mode, 0) == 0) std::printf("[ fd error ] %-28s max relative L2 %.3g\n", kv.first.c_str(), kv.second);
  }
}

struct Tiling {
  VideoGrid grid;
  MonarchLayout layout;
  int64_t B, H, D;
};

// b1 = f_tied * h / h_reduce, b2 = w / w_reduce. Kept small: finite differences cost two
// forward calls per element of q, k and v.
const Tiling kTilings[] = {
    {{2, 1, 3}, {1, 1, 1}, 2, 2, 3},  // 1x3 tiles (b1 = 1), batch and heads 2
    {{2, 3, 5}, {1, 1, 1}, 1, 2, 3},  // 3x5, two heads
    {{3, 1, 5}, {3, 1, 5}, 2, 1, 3},  // f_tied = 3, w_reduce = 5: 3x1 tiles (b2 = 1), batch 2
    {{2, 5, 3}, {1, 1, 1}, 1, 2, 3},  // 5x3
    {{2, 4, 4}, {1, 2, 2}, 1, 2, 3},  // h_reduce 2, w_reduce 2: 2x2 tiles
    {{4, 2, 3}, {2, 1, 1}, 1, 1, 5},  // f_tied 2: 4x3 tiles
    {{4, 2, 6}, {2, 2, 3}, 1, 1, 4},  // every divisor > 1: 2x2 tiles
    {{3, 1, 5}, {1, 1, 1}, 1, 1, 8},  // 1x5 tiles, D = 8
};

std::string describe(const Tiling& t, bool monarch, const AttentionParams& p) {
  return std::string(monarch ? "monarch " : "dense ") + test::describe(p) + " B" + std::to_string(t.B) +
         " H" + std::to_string(t.H) + " D" + std::to_string(t.D);
}

// A random problem: q over t.grid (T replaced by q_frames when given), k/v of kv_frames frames,
// every view padded differently.
Problem make_problem(Rng& rng, const Tiling& t, bool monarch, const AttentionParams& params,
                     int64_t kv_frames) {
  Problem pr;
  pr.monarch = monarch;
  pr.params = params;
  pr.params.layout = t.layout;
  const int64_t S = params.grid.tokens(), Skv = kv_frames * params.grid.tokens_per_frame();
  pr.q = Tensor(DType::kF64, t.B, S, t.H, t.D, 1);
  pr.k = Tensor(DType::kF64, t.B, Skv, t.H, t.D);
  pr.v = Tensor(DType::kF64, t.B, Skv, t.H, t.D, 2);
  pr.dout = Tensor(DType::kF64, t.B, S, t.H, t.D, 3);
  pr.q.fill_normal(rng, 1.2);
  pr.k.fill_normal(rng, 1.2);
  pr.v.fill_normal(rng);
  pr.dout.fill_normal(rng);
  pr.name = describe(t, monarch, pr.params);
  return pr;
}

// ---- finite differences --------------------------------------------------------------------

TEST(BackwardFiniteDifferences, Bidirectional) {
  Rng rng(11);
  for (const Tiling& t : kTilings) {
    for (bool monarch : {false, true}) {
      AttentionParams p;
      p.grid = t.grid;
      Problem pr = make_problem(rng, t, monarch, p, t.grid.T);
      check_against_fd(pr, "bidirectional");
    }
  }
  // An explicit scale.
  AttentionParams p;
  p.grid = kTilings[1].grid;
  p.scale = 0.8;
  Problem pr = make_problem(rng, kTilings[1], true, p, p.grid.T);
  check_against_fd(pr, "bidirectional");
  print_worst("bidirectional");
}

TEST(BackwardFiniteDifferences, BlockCausal) {
  Rng rng(12);
  int checked = 0;
  for (const Tiling& t : kTilings) {
    for (int64_t chunk : {t.layout.f_tied, 2 * t.layout.f_tied}) {
      if (chunk >= t.grid.T) continue;
      for (bool monarch : {false, true}) {
        AttentionParams p;
        p.grid = t.grid;
        p.causal_chunk_frames = chunk;
        Problem pr = make_problem(rng, t, monarch, p, t.grid.T);
        check_against_fd(pr, "block-causal");
        ++checked;
      }
    }
  }
  EXPECT_GE(checked, 12);
  print_worst("block-causal");
}

// Frames of the key views that hold an attended frame (ring slots included).
std::vector<char> attended_rows(const AttentionParams& p, int64_t view_frames) {
  const int64_t logical = p.cache_capacity_frames ? p.cache_frames : view_frames;
  std::vector<char> used(static_cast<size_t>(view_frames), 0);
  for (int64_t f : attended_frames(p, logical)) used[static_cast<size_t>(cache_slot(p, f))] = 1;
  return used;
}

// dk and dv are exactly zero on every frame of the view that holds no attended frame, and not
// identically zero on every frame that does (keys of a softmax always get some gradient).
void check_unattended_zero(const Problem& pr, const Grads& g) {
  const int64_t per_frame = pr.params.grid.tokens_per_frame();
  const int64_t frames = pr.k.view.tokens() / per_frame;
  const std::vector<char> used = attended_rows(pr.params, frames);
  int zero_frames = 0;
  for (int64_t f = 0; f < frames; ++f) {
    double sum = 0;
    for (const Tensor* t : {&g.dk, &g.dv})
      for (int64_t b = 0; b < t->view.batch(); ++b)
        for (int64_t s = f * per_frame; s < (f + 1) * per_frame; ++s)
          for (int64_t h = 0; h < t->view.heads(); ++h)
            for (int64_t d = 0; d < t->view.head_dim(); ++d) {
              const double x = t->at(b, s, h, d);
              if (!used[static_cast<size_t>(f)]) {
                ASSERT_EQ(x, 0.0) << pr.name << ": frame " << f << " is not attended";
              }
              sum += std::fabs(x);
            }
    if (used[static_cast<size_t>(f)]) {
      EXPECT_GT(sum, 0.0) << pr.name << ": attended frame " << f << " got no gradient";
    } else {
      ++zero_frames;
    }
  }
  if (pr.params.window_frames == 0 && pr.params.cache_capacity_frames == 0) {
    EXPECT_EQ(zero_frames, 0);
  }
}

TEST(BackwardFiniteDifferences, KvCache) {
  Rng rng(13);
  // Cache layouts in units of f_tied frames, the query chunk being one tile group (T = f_tied).
  struct Kv {
    int64_t cache, sink, window;  // window 0 = the whole cache
  };
  const Kv kvs[] = {
      {3, 0, 0},  // the whole cache
      {5, 1, 2},  // sink and window: frames [1, 3) excluded
      {4, 0, 2},  // window only: frames [0, 2) excluded
      {4, 2, 1},  // sink and the chunk itself: frame 2 excluded
  };
  // (tiling, cache layout): every layout on the smallest tiling, one or two on the others.
  const std::pair<size_t, size_t> cases[] = {{0, 0}, {0, 1}, {0, 2}, {0, 3}, {1, 0}, {1, 1}, {2, 2},
                                             {4, 1}, {5, 2}, {5, 3}, {6, 3}, {7, 1}};
  int excluded_cases = 0;
  for (const auto& c : cases) {
    Tiling t = kTilings[c.first];
    t.B = 1;  // batch > 1 is covered by the other modes; the caches here are several times q
    const Kv& kv = kvs[c.second];
    const int64_t f = t.layout.f_tied;
    for (bool monarch : {false, true}) {
      AttentionParams p;
      p.grid = VideoGrid{f, t.grid.h, t.grid.w};
      p.kv_cache = true;
      p.sink_frames = kv.sink * f;
      p.window_frames = kv.window * f;
      Problem pr = make_problem(rng, t, monarch, p, kv.cache * f);
      check_against_fd(pr, "kv-cache");
      check_unattended_zero(pr, analytic(pr));
      if (kv.window) ++excluded_cases;
    }
  }
  EXPECT_GE(excluded_cases, 10);
  print_worst("kv-cache");
}

// A ring-buffer cache: dk and dv cover the ring's slots; slots that hold an attended frame get its
// gradient, the others (overwritten frames, and slots never written) exactly zero.
TEST(BackwardFiniteDifferences, KvCacheRingBuffer) {
  Rng rng(14);
  struct RingCase {
    size_t tiling;
    int64_t capacity, written, sink, window;  // in units of f_tied
  };
  const RingCase rings[] = {
      {0, 4, 7, 1, 2},  // sink 1 + window 2 in a ring of 4: one slot holds an overwritten frame
      {5, 3, 5, 0, 3},  // no sink, the window is the whole ring, wrapped
      {4, 5, 3, 1, 0},  // not yet full: slots 3, 4 never written (window 0 = all written)
  };
  for (const RingCase& rc : rings) {
    const Tiling& t = kTilings[rc.tiling];
    const int64_t f = t.layout.f_tied;
    for (bool monarch : {false, true}) {
      AttentionParams p;
      p.grid = VideoGrid{f, t.grid.h, t.grid.w};
      p.kv_cache = true;
      p.sink_frames = rc.sink * f;
      p.window_frames = rc.window * f;
      p.cache_capacity_frames = rc.capacity * f;
      p.cache_frames = rc.written * f;
      Problem pr = make_problem(rng, t, monarch, p, rc.capacity * f);
      check_against_fd(pr, "kv-ring");
      const Grads g = analytic(pr);
      check_unattended_zero(pr, g);
    }
  }
  print_worst("kv-ring");
}

// ---- structure -----------------------------------------------------------------------------

// Fact 1 for gradients: one tile of a single row (A = F = 1, b1 = 1) is dense attention.
TEST(BackwardStructure, SingleRowTileEqualsDense) {
  Rng rng(21);
  for (int64_t w : {1, 2, 5, 9}) {
    const Tiling t{{1, 1, w}, {1, 1, 1}, 2, 3, 6};
    AttentionParams p;
    p.grid = t.grid;
    Problem m = make_problem(rng, t, true, p, 1);
    Problem d = m;
    d.monarch = false;
    const Grads gm = analytic(m), gd = analytic(d);
    SCOPED_TRACE("w = " + std::to_string(w));
    EXPECT_LT(rel_err(gm.dq.values(), gd.dq.values()), 1e-13);
    EXPECT_LT(rel_err(gm.dk.values(), gd.dk.values()), 1e-13);
    EXPECT_LT(rel_err(gm.dv.values(), gd.dv.values()), 1e-13);
    EXPECT_GT(norm(gd.dv.values()), 0.0);
    if (w > 1) {
      EXPECT_GT(norm(gd.dq.values()), 0.0);
      EXPECT_GT(norm(gd.dk.values()), 0.0);
    } else {  // a softmax over one key: out = v, so dq = dk = 0 and dv = dout
      EXPECT_EQ(norm(gm.dq.values()), 0.0);
      EXPECT_EQ(norm(gm.dk.values()), 0.0);
      EXPECT_LT(rel_err(gm.dv.values(), m.dout.values()), 1e-15);
    }
  }
}

// Fact 5 for gradients: the block-causal full sequence's dq equals the chunk-by-chunk KV-cache
// calls' dq, and its dk, dv equal the sum over chunks of theirs (each chunk's cache is a prefix).
TEST(BackwardStructure, KvCacheChunksSumToBlockCausal) {
  Rng rng(22);
  int checked = 0;
  for (const Tiling& t : kTilings) {
    const int64_t chunk = t.layout.f_tied;
    if (chunk >= t.grid.T) continue;
    for (bool monarch : {false, true}) {
      AttentionParams full;
      full.grid = t.grid;
      full.causal_chunk_frames = chunk;
      const Problem pr = make_problem(rng, t, monarch, full, t.grid.T);
      const Grads want = analytic(pr);
      const int64_t per_frame = t.grid.tokens_per_frame(), S = t.grid.tokens();
      Tensor dk_sum(DType::kF64, t.B, S, t.H, t.D), dv_sum = dk_sum;
      for (int64_t f0 = 0; f0 < t.grid.T; f0 += chunk) {
        Problem c = pr;
        c.params.causal_chunk_frames = 0;
        c.params.kv_cache = true;
        c.params.grid.T = chunk;
        c.q = test::slice_tokens(pr.q, f0 * per_frame, chunk * per_frame);
        c.dout = test::slice_tokens(pr.dout, f0 * per_frame, chunk * per_frame);
        c.k = test::slice_tokens(pr.k, 0, (f0 + chunk) * per_frame);
        c.v = test::slice_tokens(pr.v, 0, (f0 + chunk) * per_frame);
        const Grads g = analytic(c);
        const Tensor dq_want = test::slice_tokens(want.dq, f0 * per_frame, chunk * per_frame);
        EXPECT_LT(rel_err(g.dq.values(), dq_want.values()), 1e-13) << pr.name << " chunk at " << f0;
        for (int64_t b = 0; b < t.B; ++b)
          for (int64_t s = 0; s < (f0 + chunk) * per_frame; ++s)
            for (int64_t h = 0; h < t.H; ++h)
              for (int64_t d = 0; d < t.D; ++d) {
                dk_sum.set(b, s, h, d, dk_sum.at(b, s, h, d) + g.dk.at(b, s, h, d));
                dv_sum.set(b, s, h, d, dv_sum.at(b, s, h, d) + g.dv.at(b, s, h, d));
              }
      }
      EXPECT_LT(rel_err(dk_sum.values(), want.dk.values()), 1e-12) << pr.name;
      EXPECT_LT(rel_err(dv_sum.values(), want.dv.values()), 1e-12) << pr.name;
      ++checked;
    }
  }
  EXPECT_GE(checked, 10);
}

// Fact 4 for gradients: with dout zero outside chunk c, q, k, v of later chunks get exactly zero
// gradient (and so do the queries of earlier chunks); chunks up to c get some.
TEST(BackwardStructure, BlockCausalFutureGetsNoGradient) {
  Rng rng(23);
  int checked = 0;
  for (const Tiling& t : kTilings) {
    const int64_t chunk = t.layout.f_tied, chunks = t.grid.T / chunk;
    if (chunks < 2) continue;
    for (int64_t c = 0; c + 1 < chunks; ++c) {
      for (bool monarch : {false, true}) {
        AttentionParams p;
        p.grid = t.grid;
        p.causal_chunk_frames = chunk;
        Problem pr = make_problem(rng, t, monarch, p, t.grid.T);
        const int64_t per_chunk = chunk * t.grid.tokens_per_frame();
        const int64_t lo = c * per_chunk, hi = (c + 1) * per_chunk;
        for (int64_t b = 0; b < t.B; ++b)
          for (int64_t s = 0; s < t.grid.tokens(); ++s)
            for (int64_t h = 0; h < t.H; ++h)
              for (int64_t d = 0; d < t.D; ++d)
                if (s < lo || s >= hi) pr.dout.set(b, s, h, d, 0.0);
        const Grads g = analytic(pr);
        SCOPED_TRACE(pr.name + " chunk " + std::to_string(c));
        double dq_in = 0, dkv_past = 0;
        for (int64_t b = 0; b < t.B; ++b)
          for (int64_t s = 0; s < t.grid.tokens(); ++s)
            for (int64_t h = 0; h < t.H; ++h)
              for (int64_t d = 0; d < t.D; ++d) {
                if (s >= hi) {
                  ASSERT_EQ(g.dk.at(b, s, h, d), 0.0) << "token " << s;
                  ASSERT_EQ(g.dv.at(b, s, h, d), 0.0) << "token " << s;
                }
                if (s < lo || s >= hi) {
                  ASSERT_EQ(g.dq.at(b, s, h, d), 0.0) << "token " << s;
                } else {
                  dq_in += std::fabs(g.dq.at(b, s, h, d));
                }
                if (s < hi) dkv_past += std::fabs(g.dk.at(b, s, h, d)) + std::fabs(g.dv.at(b, s, h, d));
              }
        EXPECT_GT(dq_in, 0.0);
        EXPECT_GT(dkv_past, 0.0);
        ++checked;
      }
    }
  }
  EXPECT_GE(checked, 10);
}

// Fact 7 for gradients: logits in the hundreds give finite gradients.
TEST(BackwardStructure, LargeLogitsGiveFiniteGradients) {
  Rng rng(24);
  for (const Tiling& t : kTilings) {
    for (bool monarch : {false, true}) {
      AttentionParams p;
      p.grid = t.grid;
      Problem pr = make_problem(rng, t, monarch, p, t.grid.T);
      pr.q.fill_normal(rng, 12.0);
      pr.k.fill_normal(rng, 12.0);
      const Grads g = analytic(pr);
      EXPECT_TRUE(test::all_finite(g.dq.values())) << pr.name;
      EXPECT_TRUE(test::all_finite(g.dk.values())) << pr.name;
      EXPECT_TRUE(test::all_finite(g.dv.values())) << pr.name;
    }
  }
}

// ---- dtypes and memory ---------------------------------------------------------------------

// The value x stored in dtype and read back.
double rounded(double x, DType dtype) {
  uint8_t buf[8];
  store_element(buf, dtype, 0, x);
  return load_element(buf, dtype, 0);
}

// Each gradient is written in its own dtype (the fp64 result, rounded once), whatever it held
// before; inputs of another dtype give the fp64 result of their values.
TEST(BackwardDtypes, OutputsInTheirOwnDtype) {
  Rng rng(31);
  const Tiling t = kTilings[6];
  for (bool monarch : {false, true}) {
    AttentionParams p;
    p.grid = t.grid;
    p.causal_chunk_frames = 2;
    const Problem pr = make_problem(rng, t, monarch, p, t.grid.T);
    const Grads want = analytic(pr);
    const DType dtypes[4] = {DType::kF32, DType::kF16, DType::kBF16, DType::kF64};
    for (int r = 0; r < 4; ++r) {
      const DType tq = dtypes[r], tk = dtypes[(r + 1) % 4], tv = dtypes[(r + 2) % 4];
      SCOPED_TRACE(pr.name + std::string(" dq ") + dtype_name(tq) + " dk " + dtype_name(tk) +
                   " dv " + dtype_name(tv));
      Tensor dq(tq, t.B, t.grid.tokens(), t.H, t.D, 1), dk(tk, t.B, t.grid.tokens(), t.H, t.D, 2),
          dv(tv, t.B, t.grid.tokens(), t.H, t.D);
      for (Tensor* g : {&dq, &dk, &dv}) g->fill(1000.0);  // overwritten, not accumulated
      ASSERT_TRUE(backward(pr, dq.view, dk.view, dv.view).ok());
      const std::pair<const Tensor*, const Tensor*> pairs[3] = {{&dq, &want.dq}, {&dk, &want.dk}, {&dv, &want.dv}};
      for (const auto& pg : pairs) {
        const std::vector<double> got = pg.first->values(), ref = pg.second->values();
        for (size_t i = 0; i < got.size(); ++i) {
          ASSERT_EQ(got[i], rounded(ref[i], pg.first->view.dtype)) << "element " << i;
        }
      }
    }
    // Inputs in fp32 (dout in bf16): the same as fp64 inputs holding those values.
    Problem low = pr, exact = pr;
    for (Tensor* x : {&low.q, &low.k, &low.v, &low.dout}) {
      const Tensor src = *x;
      *x = Tensor(x == &low.dout ? DType::kBF16 : DType::kF32, src.view.batch(), src.view.tokens(),
                  src.view.heads(), src.view.head_dim(), 1);
      for (int64_t b = 0; b < src.view.batch(); ++b)
        for (int64_t s = 0; s < src.view.tokens(); ++s)
          for (int64_t h = 0; h < src.view.heads(); ++h)
            for (int64_t d = 0; d < src.view.head_dim(); ++d) x->set(b, s, h, d, src.at(b, s, h, d));
    }
    Tensor* ex[4] = {&exact.q, &exact.k, &exact.v, &exact.dout};
    const Tensor* lo[4] = {&low.q, &low.k, &low.v, &low.dout};
    for (int i = 0; i < 4; ++i)
      for (int64_t b = 0; b < t.B; ++b)
        for (int64_t s = 0; s < t.grid.tokens(); ++s)
          for (int64_t h = 0; h < t.H; ++h)
            for (int64_t d = 0; d < t.D; ++d) ex[i]->set(b, s, h, d, lo[i]->at(b, s, h, d));
    const Grads gl = analytic(low), ge = analytic(exact);
    EXPECT_EQ(gl.dq.values(), ge.dq.values());
    EXPECT_EQ(gl.dk.values(), ge.dk.values());
    EXPECT_EQ(gl.dv.values(), ge.dv.values());
    EXPECT_GT(rel_err(gl.dq.values(), want.dq.values()), 0.0);  // the rounding did change them
  }
}

// dout may be a broadcast view (stride 0, as from expand()); dq, dk, dv may be interleaved views
// of one packed [B, S, 3, H, D] buffer (disjoint elements, overlapping extents).
TEST(BackwardDtypes, BroadcastDoutAndPackedGradients) {
  Rng rng(32);
  const Tiling t = kTilings[0];  // B = H = 2
  for (bool monarch : {false, true}) {
    AttentionParams p;
    p.grid = t.grid;
    Problem pr = make_problem(rng, t, monarch, p, t.grid.T);
    const int64_t S = t.grid.tokens();
    // dout = one row of D values for every (b, s, h).
    std::vector<double> row(static_cast<size_t>(t.D));
    for (double& x : row) x = rng.normal();
    Problem dense_dout = pr;
    for (int64_t b = 0; b < t.B; ++b)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t h = 0; h < t.H; ++h)
          for (int64_t d = 0; d < t.D; ++d) dense_dout.dout.set(b, s, h, d, row[static_cast<size_t>(d)]);
    pr.dout.view = TensorView::contiguous(row.data(), DType::kF64, t.B, S, t.H, t.D);
    pr.dout.view.stride[0] = pr.dout.view.stride[1] = pr.dout.view.stride[2] = 0;
    const Grads want = analytic(dense_dout);

    std::vector<double> packed(static_cast<size_t>(t.B * S * 3 * t.H * t.D), std::nan(""));
    TensorView g[3];
    for (int i = 0; i < 3; ++i) {
      g[i] = TensorView::contiguous(packed.data() + i * t.H * t.D, DType::kF64, t.B, S, t.H, t.D);
      g[i].stride[1] = 3 * t.H * t.D;
      g[i].stride[0] = S * 3 * t.H * t.D;
    }
    const Status s = backward(pr, g[0], g[1], g[2]);
    ASSERT_TRUE(s.ok()) << s.to_string();
    ASSERT_TRUE(test::all_finite(packed));
    const Tensor* w[3] = {&want.dq, &want.dk, &want.dv};
    for (int i = 0; i < 3; ++i)
      for (int64_t b = 0; b < t.B; ++b)
        for (int64_t s2 = 0; s2 < S; ++s2)
          for (int64_t h = 0; h < t.H; ++h)
            for (int64_t d = 0; d < t.D; ++d)
              ASSERT_EQ(packed[static_cast<size_t>(i * t.H * t.D + g[i].offset(b, s2, h, d))],
                        w[i]->at(b, s2, h, d));
  }
}

// ---- bad input -----------------------------------------------------------------------------

// The valid problem every case breaks one rule of: Monarch-valid, KV-cache capable.
struct Bad {
  Problem pr;
  Tensor dq{DType::kF32, 1, 1, 1, 1}, dk = dq, dv = dq;
  Bad() {
    Rng rng(41);
    AttentionParams p;
    p.grid = VideoGrid{4, 2, 6};
    p.causal_chunk_frames = 2;
    pr = make_problem(rng, Tiling{p.grid, {2, 1, 2}, 2, 2, 4}, true, p, 4);
    dq = Tensor(DType::kF32, 2, 48, 2, 4, 1);
    dk = Tensor(DType::kF16, 2, 48, 2, 4);
    dv = Tensor(DType::kF64, 2, 48, 2, 4, 2);
  }
};

// A byte pattern no gradient contains.
void fill_sentinel(std::vector<uint8_t>& bytes) {
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(0x5A ^ (i * 151));
}

using Mutation = std::function<void(Bad&)>;

// Both backward entry points (or only Monarch's) reject the mutated problem with `code` and a
// message containing every needle, leaving dq, dk, dv and the inputs bit-for-bit untouched.
void expect_rejected(const std::string& what, const Mutation& mutate, StatusCode code,
                     const std::vector<std::string>& needles, bool dense_too = true) {
  for (bool monarch : {true, false}) {
    if (!monarch && !dense_too) continue;
    SCOPED_TRACE(what + (monarch ? " (monarch)" : " (dense)"));
    Bad bad;
    bad.pr.monarch = monarch;
    mutate(bad);
    for (Tensor* t : {&bad.dq, &bad.dk, &bad.dv}) fill_sentinel(t->storage);
    const std::vector<uint8_t> dq0 = bad.dq.storage, dk0 = bad.dk.storage, dv0 = bad.dv.storage,
                               q0 = bad.pr.q.storage, k0 = bad.pr.k.storage, v0 = bad.pr.v.storage,
                               o0 = bad.pr.dout.storage;
    const Status s = backward(bad.pr, bad.dq.view, bad.dk.view, bad.dv.view);
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.code(), code) << s.to_string();
    for (const std::string& needle : needles) {
      EXPECT_NE(s.message().find(needle), std::string::npos)
          << "message lacks '" << needle << "': " << s.message();
    }
    EXPECT_TRUE(bad.dq.storage == dq0 && bad.dk.storage == dk0 && bad.dv.storage == dv0)
        << "a gradient was written despite the error";
    EXPECT_TRUE(bad.pr.q.storage == q0 && bad.pr.k.storage == k0 && bad.pr.v.storage == v0 &&
                bad.pr.dout.storage == o0)
        << "inputs modified";
  }
}

Status run_bad(Bad& bad) { return backward(bad.pr, bad.dq.view, bad.dk.view, bad.dv.view); }

const StatusCode kInvalid = StatusCode::kInvalidArgument;

// The control: the unmutated problem is valid and overwrites every sentinel byte's element.
TEST(BackwardErrors, BaseProblemIsValid) {
  for (bool monarch : {true, false}) {
    Bad bad;
    bad.pr.monarch = monarch;
    for (Tensor* t : {&bad.dq, &bad.dk, &bad.dv}) fill_sentinel(t->storage);
    const Status s = run_bad(bad);
    ASSERT_TRUE(s.ok()) << s.to_string();
    for (Tensor* t : {&bad.dq, &bad.dk, &bad.dv}) EXPECT_TRUE(test::all_finite(t->values()));
  }
}

TEST(BackwardErrors, MismatchedShapes) {
  const int64_t q_shape[4] = {2, 48, 2, 4};
  for (int d = 0; d < 4; ++d) {
    int64_t s[4] = {q_shape[0], q_shape[1], q_shape[2], q_shape[3]};
    s[d] += 1;
    const std::string dim = "(dim " + std::to_string(d) + ")";
    expect_rejected("dout dim " + std::to_string(d),
                    [&](Bad& b) { b.pr.dout = Tensor(DType::kF64, s[0], s[1], s[2], s[3]); }, kInvalid,
                    {"dout: size " + dim, "must equal q's"});
    expect_rejected("dq dim " + std::to_string(d),
                    [&](Bad& b) { b.dq = Tensor(DType::kF32, s[0], s[1], s[2], s[3]); }, kInvalid,
                    {"dq: size " + dim, "must equal q's"});
    expect_rejected("dk dim " + std::to_string(d),
                    [&](Bad& b) { b.dk = Tensor(DType::kF32, s[0], s[1], s[2], s[3]); }, kInvalid,
                    {"dk: size " + dim, "must equal k's"});
    expect_rejected("dv dim " + std::to_string(d),
                    [&](Bad& b) { b.dv = Tensor(DType::kF32, s[0], s[1], s[2], s[3]); }, kInvalid,
                    {"dv: size " + dim, "must equal k's"});
  }
  // KV cache: dk and dv cover the whole cache (k's shape), not the chunk (q's).
  const Mutation kv = [](Bad& b) {
    b.pr.params.causal_chunk_frames = 0;
    b.pr.params.kv_cache = true;
    b.pr.params.grid.T = 2;
    b.pr.q = Tensor(DType::kF64, 2, 24, 2, 4);
    b.pr.dout = b.pr.q;
    b.dq = Tensor(DType::kF32, 2, 24, 2, 4);
  };
  expect_rejected("KV dk of the chunk's shape", [&](Bad& b) { kv(b); b.dk = Tensor(DType::kF32, 2, 24, 2, 4); },
                  kInvalid, {"dk: size (dim 1) = 24 must equal k's 48"});
  expect_rejected("KV dv of the chunk's shape", [&](Bad& b) { kv(b); b.dv = Tensor(DType::kF32, 2, 24, 2, 4); },
                  kInvalid, {"dv: size (dim 1) = 24 must equal k's 48"});
  Bad ok;
  kv(ok);
  EXPECT_TRUE(run_bad(ok).ok()) << run_bad(ok).to_string();
}

TEST(BackwardErrors, MonarchSupportsOneIterationOnly) {
  for (int iters : {2, 5}) {
    expect_rejected("num_iters " + std::to_string(iters), [&](Bad& b) { b.pr.params.num_iters = iters; },
                    StatusCode::kUnsupported, {"num_iters = " + std::to_string(iters)}, false);
    Bad dense;  // dense attention ignores num_iters
    dense.pr.monarch = false;
    dense.pr.params.num_iters = iters;
    EXPECT_TRUE(run_bad(dense).ok());
  }
  expect_rejected("num_iters 0", [](Bad& b) { b.pr.params.num_iters = 0; }, kInvalid, {"num_iters = 0"});
}

TEST(BackwardErrors, Devices) {
  expect_rejected("all on cuda", [](Bad& b) {
    for (Tensor* t : {&b.pr.q, &b.pr.k, &b.pr.v, &b.pr.dout, &b.dq, &b.dk, &b.dv}) t->view.device = Device::kCUDA;
  }, kInvalid, {"q: tensors are on cuda", "needs cpu"});
  for (const char* name : {"dout", "dq", "dk", "dv"}) {
    expect_rejected(std::string(name) + " on cuda", [&](Bad& b) {
      Tensor* t = std::string(name) == "dout" ? &b.pr.dout : std::string(name) == "dq" ? &b.dq
                  : std::string(name) == "dk" ? &b.dk : &b.dv;
      t->view.device = Device::kCUDA;
    }, kInvalid, {std::string(name) + ": tensor is on cuda", "q is on cpu"});
  }
  expect_rejected("k on cuda", [](Bad& b) { b.pr.k.view.device = Device::kCUDA; }, kInvalid,
                  {"k: tensor is on cuda", "q is on cpu"});
  expect_rejected("v on cuda", [](Bad& b) { b.pr.v.view.device = Device::kCUDA; }, kInvalid,
                  {"v: tensor is on cuda", "q is on cpu"});
}

TEST(BackwardErrors, BadViews) {
  expect_rejected("dout null", [](Bad& b) { b.pr.dout.view.data = nullptr; }, kInvalid, {"dout: data pointer is null"});
  expect_rejected("dq null", [](Bad& b) { b.dq.view.data = nullptr; }, kInvalid, {"dq: data pointer is null"});
  expect_rejected("dk zero heads", [](Bad& b) { b.dk.view.shape[2] = 0; }, kInvalid, {"dk: heads (dim 2) must be positive"});
  expect_rejected("dv negative stride", [](Bad& b) { b.dv.view.stride[3] = -1; }, kInvalid, {"dv: strides must be non-negative"});
  expect_rejected("dq self-overlapping", [](Bad& b) { b.dq.view.stride[2] = 0; }, kInvalid, {"dq: output strides overlap"});
  expect_rejected("dv self-overlapping", [](Bad& b) { b.dv.view.stride[0] = 0; }, kInvalid, {"dv: output strides overlap"});
  // Outputs sharing memory with one another.
  expect_rejected("dk is dq", [](Bad& b) { b.dk = b.dq; b.dk.view.data = b.dq.view.data; }, kInvalid,
                  {"dk: overlaps dq"});
  expect_rejected("dv inside dk", [](Bad& b) {
    b.dv = Tensor(DType::kF16, 2, 48, 2, 4);
    b.dv.view.data = static_cast<uint16_t*>(b.dk.view.data) + 5;  // shifted by 5 elements
  }, kInvalid, {"dv: overlaps dk"});
  expect_rejected("dv interleaved with dq, one element too far", [](Bad& b) {
    // dq takes heads 0 and 1 at elements [0, 4) and [8, 12) of every 16-float token block; a dv
    // interleaved at +4 would be disjoint, at +7 it shares elements 8, 9, 10.
    b.dq = Tensor(DType::kF32, 2, 48, 4, 4);  // storage for 2 x 48 x 16 floats
    b.dq.storage.resize(b.dq.storage.size() + 64);
    b.dq.view.data = b.dq.storage.data();
    b.dq.view.shape[2] = 2;
    b.dq.view.stride[2] = 8;
    b.dv.view = b.dq.view;
    b.dv.view.data = static_cast<float*>(b.dq.view.data) + 7;
  }, kInvalid, {"dv: overlaps dq"});
  // Errors of q, k, v and the parameters still come first and still leave the gradients alone.
  expect_rejected("bad tiling", [](Bad& b) { b.pr.params.layout = MonarchLayout{3, 1, 1}; }, kInvalid,
                  {"layout.f_tied = 3 does not divide grid.T = 4"}, false);
  expect_rejected("k tokens", [](Bad& b) {
    for (Tensor* t : {&b.pr.k, &b.pr.v, &b.dk, &b.dv}) *t = Tensor(t->view.dtype, 2, 60, 2, 4);
  }, kInvalid, {"k: tokens (dim 1) = 60"});
  expect_rejected("q dtype", [](Bad& b) { b.pr.q = Tensor(DType::kF32, 2, 48, 2, 4); }, kInvalid,
                  {"dtype must equal q's float32"});
}

}  // namespace
}  // namespace monarchrt
