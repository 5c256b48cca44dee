// The facts of specification section 6 (gradients excepted), checked on the fp64 reference over
// many random shapes: odd tile sizes, several tilings, batch and heads > 1, block-causal and
// KV-cache modes, windows and sinks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "test_util.h"

namespace monarchrt {
namespace {

using test::Tensor;

struct Case {
  VideoGrid grid;
  MonarchLayout layout;
  int64_t B, H, D;
};

// b1 = f_tied * h / h_reduce, b2 = w / w_reduce; the list covers b1, b2 in {1, 3, 5, 15, 30, 52}.
const Case kCases[] = {
    {{2, 1, 1}, {1, 1, 1}, 1, 1, 4},    // 1x1 tiles
    {{3, 3, 5}, {1, 1, 1}, 2, 3, 8},    // 3x5
    {{3, 3, 5}, {3, 3, 5}, 1, 2, 5},    // b1 = 3 (3 frames of 1 row), b2 = 1
    {{2, 5, 3}, {1, 1, 1}, 1, 2, 6},    // 5x3
    {{4, 15, 1}, {1, 1, 1}, 1, 1, 3},   // 15x1
    {{2, 30, 4}, {1, 2, 4}, 1, 2, 4},   // 15x1, h_reduce and w_reduce
    {{2, 30, 52}, {1, 1, 1}, 1, 1, 4},  // the real 30x52 tile, two frames
    {{2, 6, 52}, {1, 2, 1}, 1, 1, 3},   // 3x52
    {{6, 2, 3}, {3, 1, 1}, 2, 1, 4},    // f_tied = 3: 6x3
    {{4, 4, 6}, {2, 2, 3}, 1, 2, 7},    // 4x2 tiles, every divisor > 1
};

void make_qkv(Rng& rng, const Case& c, int64_t kv_frames, Tensor* q, Tensor* k, Tensor* v,
              double scale = 1.0) {
  const int64_t S = c.grid.tokens(), Skv = kv_frames * c.grid.tokens_per_frame();
  *q = Tensor(DType::kF64, c.B, S, c.H, c.D, 1);
  *k = Tensor(DType::kF64, c.B, Skv, c.H, c.D);
  *v = Tensor(DType::kF64, c.B, Skv, c.H, c.D, 2);
  q->fill_normal(rng, scale);
  k->fill_normal(rng, scale);
  v->fill_normal(rng);
}

// Fact 1: one tile of a single row is dense attention.
TEST(ReferenceFacts, SingleRowTileEqualsDense) {
  Rng rng(1);
  for (int64_t w : {1, 3, 5, 52}) {
    for (int iters : {1, 3}) {
      Case c{{1, 1, w}, {1, 1, 1}, 2, 2, 8};
      Tensor q(DType::kF64, 1, 1, 1, 1), k = q, v = q;
      make_qkv(rng, c, 1, &q, &k, &v, 1.5);
      Tensor out(DType::kF64, c.B, w, c.H, c.D), dense = out;
      AttentionParams p;
      p.grid = c.grid;
      p.num_iters = iters;
      ASSERT_TRUE(ref::monarch_attention(q.view, k.view, v.view, out.view, p).ok());
      ASSERT_TRUE(ref::dense_attention(q.view, k.view, v.view, dense.view, p).ok());
      // Later iterations scale the logits by 1/(cR + 1e-6) with cR = 1 (the original's guard).
      const double tol = iters == 1 ? 1e-13 : 1e-5;
      EXPECT_LT(test::relative_l2(out.values(), dense.values()), tol) << "w=" << w << " iters=" << iters;
    }
  }
}

// Fact 2: rows of P are distributions and out == P V; for every case, iteration count and mode.
TEST(ReferenceFacts, EffectiveMatrixIsStochasticAndReproducesOutput) {
  Rng rng(2);
  for (const Case& c : kCases) {
    for (int iters : {1, 2, 4}) {
      for (int64_t chunk : {int64_t{0}, c.layout.f_tied}) {
        if (chunk >= c.grid.T) continue;
        Tensor q(DType::kF64, 1, 1, 1, 1), k = q, v = q;
        make_qkv(rng, c, c.grid.T, &q, &k, &v);
        AttentionParams p;
        p.grid = c.grid;
        p.layout = c.layout;
        p.num_iters = iters;
        p.causal_chunk_frames = chunk;
        Tensor out(DType::kF64, c.B, c.grid.tokens(), c.H, c.D);
        test::poison(out);
        ASSERT_TRUE(ref::monarch_attention(q.view, k.view, v.view, out.view, p).ok());
        ASSERT_TRUE(test::all_finite(out.values()));
        const int64_t S = c.grid.tokens(), per_frame = c.grid.tokens_per_frame();
        for (int64_t b = 0; b < c.B; ++b) {
          for (int64_t h = 0; h < c.H; ++h) {
            std::vector<double> P;
            ASSERT_TRUE(ref::monarch_effective_matrix(q.view, k.view, p, b, h, &P).ok());
            for (int64_t i = 0; i < S; ++i) {
              double sum = 0;
              for (int64_t j = 0; j < S; ++j) {
                const double x = P[i * S + j];
                ASSERT_GE(x, 0.0);
                if (chunk && (j / per_frame) / chunk > (i / per_frame) / chunk) {
                  ASSERT_EQ(x, 0.0);
                }
                sum += x;
              }
              ASSERT_NEAR(sum, 1.0, 1e-12);
              for (int64_t d = 0; d < c.D; ++d) {
                double pv = 0;
                for (int64_t j = 0; j < S; ++j) pv += P[i * S + j] * v.at(b, j, h, d);
                ASSERT_NEAR(pv, out.at(b, i, h, d), 1e-10);
              }
            }
          }
        }
      }
    }
  }
}

// <P, s q k^T> + entropy(P), summed over the rows of (b, h).
double objective(const Tensor& q, const Tensor& k, const std::vector<double>& P, int64_t b,
                 int64_t h, double s) {
  const int64_t Sq = q.view.tokens(), Skv = k.view.tokens(), D = q.view.head_dim();
  double total = 0;
  for (int64_t i = 0; i < Sq; ++i)
    for (int64_t j = 0; j < Skv; ++j) {
      const double x = P[i * Skv + j];
      if (x <= 0) continue;
      double dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += q.at(b, i, h, d) * k.at(b, j, h, d);
      total += x * s * dot - x * std::log(x);
    }
  return total;
}

// Fact 3: the objective never decreases with more iterations (random inputs, every mode).
TEST(ReferenceFacts, MoreIterationsNeverDecreaseTheObjective) {
  Rng rng(3);
  for (const Case& c : kCases) {
    for (int64_t chunk : {int64_t{0}, c.layout.f_tied}) {
      if (chunk >= c.grid.T) continue;
      Tensor q(DType::kF64, 1, 1, 1, 1), k = q, v = q;
      make_qkv(rng, c, c.grid.T, &q, &k, &v, 1.3);
      AttentionParams p;
      p.grid = c.grid;
      p.layout = c.layout;
      p.causal_chunk_frames = chunk;
      const double s = 1.0 / std::sqrt(static_cast<double>(c.D));
      double prev = -INFINITY;
      for (int iters = 1; iters <= 6; ++iters) {
        p.num_iters = iters;
        double obj = 0;
        for (int64_t b = 0; b < c.B; ++b)
          for (int64_t h = 0; h < c.H; ++h) {
            std::vector<double> P;
            ASSERT_TRUE(ref::monarch_effective_matrix(q.view, k.view, p, b, h, &P).ok());
            obj += objective(q, k, P, b, h, s);
          }
        // The 1/(cR + 1e-6) guard of iterations >= 2 allows a change at the 1e-6 level.
        EXPECT_GE(obj, prev - 1e-6 * std::fabs(obj)) << c.grid.to_string() << " iters=" << iters;
        prev = obj;
      }
    }
  }
}

// Fact 3, second half: on video-like inputs (the synthetic workload) the error against dense
// shrinks with iterations.
TEST(ReferenceFacts, MoreIterationsApproachDenseOnVideoAttention) {
  const std::pair<VideoGrid, MonarchLayout> cases[] = {
      {{3, 6, 8}, {1, 1, 1}}, {{3, 6, 8}, {1, 2, 1}}, {{3, 6, 8}, {3, 1, 1}}, {{2, 10, 12}, {1, 1, 2}}};
  for (const auto& gc : cases) {
    SyntheticWorkload spec;
    spec.grid = gc.first;
    spec.heads = 2;
    spec.head_dim = 16;
    spec.object_size = 0.3;
    std::vector<float> qs, ks, vs;
    ASSERT_TRUE(make_synthetic_workload(spec, &qs, &ks, &vs).ok());
    const int64_t S = gc.first.tokens();
    const TensorView q = TensorView::contiguous(qs.data(), DType::kF32, 1, S, 2, 16);
    const TensorView k = TensorView::contiguous(ks.data(), DType::kF32, 1, S, 2, 16);
    const TensorView v = TensorView::contiguous(vs.data(), DType::kF32, 1, S, 2, 16);
    AttentionParams p;
    p.grid = gc.first;
    p.layout = gc.second;
    Tensor dense(DType::kF64, 1, S, 2, 16), out = dense;
    ASSERT_TRUE(ref::dense_attention(q, k, v, dense.view, p).ok());
    std::vector<double> err;
    for (int iters : {1, 2, 4}) {
      p.num_iters = iters;
      ASSERT_TRUE(ref::monarch_attention(q, k, v, out.view, p).ok());
      err.push_back(test::relative_l2(out.values(), dense.values()));
    }
    EXPECT_LT(err[1], err[0]) << gc.first.to_string() << " " << gc.second.to_string();
    EXPECT_LT(err[2], err[0]) << gc.first.to_string() << " " << gc.second.to_string();
    // Iterations converge to a fixed point; past it the error may wobble at the 1% level.
    EXPECT_LT(err[2], 1.01 * err[1]) << gc.first.to_string() << " " << gc.second.to_string();
  }
}

// Fact 4: outputs of chunk c do not depend on q/k/v of later chunks.
TEST(ReferenceFacts, BlockCausalIgnoresTheFuture) {
  Rng rng(4);
  for (const Case& c : kCases) {
    const int64_t chunk = c.layout.f_tied;
    if (chunk >= c.grid.T) continue;
    for (int iters : {1, 3}) {
      Tensor q(DType::kF64, 1, 1, 1, 1), k = q, v = q;
      make_qkv(rng, c, c.grid.T, &q, &k, &v);
      AttentionParams p;
      p.grid = c.grid;
      p.layout = c.layout;
      p.num_iters = iters;
      p.causal_chunk_frames = chunk;
      Tensor before(DType::kF64, c.B, c.grid.tokens(), c.H, c.D), after = before;
      ASSERT_TRUE(ref::monarch_attention(q.view, k.view, v.view, before.view, p).ok());
      const int64_t boundary = chunk * c.grid.tokens_per_frame();  // end of chunk 0
      for (Tensor* t : {&q, &k, &v})
        for (int64_t b = 0; b < c.B; ++b)
          for (int64_t s = boundary; s < c.grid.tokens(); ++s)
            for (int64_t h = 0; h < c.H; ++h)
              for (int64_t d = 0; d < c.D; ++d) t->set(b, s, h, d, 3.0 * rng.normal());
      ASSERT_TRUE(ref::monarch_attention(q.view, k.view, v.view, after.view, p).ok());
      bool later_changed = false;
      for (int64_t b = 0; b < c.B; ++b)
        for (int64_t s = 0; s < c.grid.tokens(); ++s)
          for (int64_t h = 0; h < c.H; ++h)
            for (int64_t d = 0; d < c.D; ++d) {
              if (s < boundary) {
                ASSERT_EQ(before.at(b, s, h, d), after.at(b, s, h, d));
              } else if (before.at(b, s, h, d) != after.at(b, s, h, d)) {
                later_changed = true;
              }
            }
      EXPECT_TRUE(later_changed);
    }
  }
}

// Fact 5: the KV-cache call, chunk by chunk, equals the block-causal full sequence; dense too.
TEST(ReferenceFacts, KvCacheChunksEqualBlockCausal) {
  Rng rng(5);
  for (const Case& c : kCases) {
    const int64_t chunk = c.layout.f_tied;
    if (chunk >= c.grid.T) continue;
    for (bool monarch : {true, false}) {
      Tensor q(DType::kF64, 1, 1, 1, 1), k = q, v = q;
      make_qkv(rng, c, c.grid.T, &q, &k, &v);
      AttentionParams full;
      full.grid = c.grid;
      full.layout = c.layout;
      full.num_iters = 2;
      full.causal_chunk_frames = chunk;
      Tensor expected(DType::kF64, c.B, c.grid.tokens(), c.H, c.D);
      ASSERT_TRUE((monarch ? ref::monarch_attention : ref::dense_attention)(q.view, k.view, v.view,
                                                                           expected.view, full).ok());
      const int64_t per_frame = c.grid.tokens_per_frame();
      for (int64_t f0 = 0; f0 < c.grid.T; f0 += chunk) {
        const int64_t nf = std::min(chunk, c.grid.T - f0);
        if (nf % c.layout.f_tied) continue;
        AttentionParams p = full;
        p.causal_chunk_frames = 0;
        p.kv_cache = true;
        p.grid.T = nf;
        const Tensor qc = test::slice_tokens(q, f0 * per_frame, nf * per_frame);
        const Tensor kc = test::slice_tokens(k, 0, (f0 + nf) * per_frame);
        const Tensor vc = test::slice_tokens(v, 0, (f0 + nf) * per_frame);
        Tensor out(DType::kF64, c.B, nf * per_frame, c.H, c.D);
        ASSERT_TRUE((monarch ? ref::monarch_attention : ref::dense_attention)(qc.view, kc.view, vc.view,
                                                                             out.view, p).ok());
        const Tensor want = test::slice_tokens(expected, f0 * per_frame, nf * per_frame);
        EXPECT_LT(test::relative_l2(out.values(), want.values()), 1e-13) << "chunk at frame " << f0;
      }
    }
  }
}

// Windows: sink + recent frames over the whole cache equal a call on a cache holding only them.
TEST(ReferenceFacts, KvWindowEqualsCacheOfTheWindow) {
  Rng rng(6);
  Case c{{2, 3, 4}, {2, 1, 2}, 1, 2, 5};  // chunk of 2 frames, f_tied 2
  const int64_t cache = 10, per_frame = c.grid.tokens_per_frame();
  Tensor q(DType::kF64, 1, 1, 1, 1), k = q, v = q;
  make_qkv(rng, c, cache, &q, &k, &v);
  for (bool monarch : {true, false}) {
    for (auto sw : {std::pair<int64_t, int64_t>{2, 4}, {0, 6}, {2, 2}, {4, 8}, {6, 6}}) {
      AttentionParams p;
      p.grid = c.grid;
      p.layout = c.layout;
      p.kv_cache = true;
      p.sink_frames = sw.first;
      p.window_frames = sw.second;
      Tensor out(DType::kF64, c.B, c.grid.tokens(), c.H, c.D), want = out;
      ASSERT_TRUE((monarch ? ref::monarch_attention : ref::dense_attention)(q.view, k.view, v.view,
                                                                           out.view, p).ok());
      // The frames the window keeps, gathered into a cache of their own.
      const std::vector<int64_t> frames = attended_frames(p, cache);
      Tensor ks(DType::kF64, c.B, static_cast<int64_t>(frames.size()) * per_frame, c.H, c.D), vs = ks;
      for (size_t f = 0; f < frames.size(); ++f)
        for (int64_t b = 0; b < c.B; ++b)
          for (int64_t t = 0; t < per_frame; ++t)
            for (int64_t h = 0; h < c.H; ++h)
              for (int64_t d = 0; d < c.D; ++d) {
                ks.set(b, f * per_frame + t, h, d, k.at(b, frames[f] * per_frame + t, h, d));
                vs.set(b, f * per_frame + t, h, d, v.at(b, frames[f] * per_frame + t, h, d));
              }
      AttentionParams all = p;
      all.sink_frames = all.window_frames = 0;
      ASSERT_TRUE((monarch ? ref::monarch_attention : ref::dense_attention)(q.view, ks.view, vs.view,
                                                                           want.view, all).ok());
      EXPECT_LT(test::relative_l2(out.values(), want.values()), 1e-13);
      EXPECT_EQ(frames.size(), static_cast<size_t>(std::min(cache, sw.first + sw.second)));
    }
  }
}

// Fact 6: tiled call == permute to tile order, untiled call on (b1, b2) tiles, permute back.
TEST(ReferenceFacts, TiledLayoutEqualsPermutedUntiled) {
  Rng rng(7);
  for (const Case& c : kCases) {
    TileGeometry g;
    ASSERT_TRUE(make_tile_geometry(c.grid, c.layout, &g).ok());
    const std::vector<int64_t> perm = tile_order_permutation(g);
    const std::vector<int64_t> inv = inverse_permutation(perm);
    for (size_t i = 0; i < perm.size(); ++i) ASSERT_EQ(perm[inv[i]], static_cast<int64_t>(i));
    const int64_t chunk_frames = c.grid.T > c.layout.f_tied ? c.layout.f_tied : 0;
    Tensor q(DType::kF64, 1, 1, 1, 1), k = q, v = q;
    make_qkv(rng, c, c.grid.T, &q, &k, &v);
    AttentionParams tiled;
    tiled.grid = c.grid;
    tiled.layout = c.layout;
    tiled.num_iters = 2;
    tiled.causal_chunk_frames = chunk_frames;
    Tensor out(DType::kF64, c.B, c.grid.tokens(), c.H, c.D);
    ASSERT_TRUE(ref::monarch_attention(q.view, k.view, v.view, out.view, tiled).ok());
    // Untiled: every tile becomes a "frame" of b1 rows and b2 columns.
    Tensor qp = q, kp = k, vp = v;
    for (Tensor* pair : {&qp, &kp, &vp}) {
      const Tensor& src = pair == &qp ? q : pair == &kp ? k : v;
      for (int64_t b = 0; b < c.B; ++b)
        for (size_t pos = 0; pos < perm.size(); ++pos)
          for (int64_t h = 0; h < c.H; ++h)
            for (int64_t d = 0; d < c.D; ++d) pair->set(b, pos, h, d, src.at(b, perm[pos], h, d));
    }
    AttentionParams untiled;
    untiled.grid = VideoGrid{g.tiles, g.b1, g.b2};
    untiled.num_iters = 2;
    untiled.causal_chunk_frames = chunk_frames / c.layout.f_tied * g.tiles_per_frame_group;
    Tensor outp(DType::kF64, c.B, c.grid.tokens(), c.H, c.D);
    ASSERT_TRUE(ref::monarch_attention(qp.view, kp.view, vp.view, outp.view, untiled).ok());
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t s = 0; s < c.grid.tokens(); ++s)
        for (int64_t h = 0; h < c.H; ++h)
          for (int64_t d = 0; d < c.D; ++d)
            ASSERT_NEAR(outp.at(b, inv[s], h, d), out.at(b, s, h, d), 1e-12);
  }
}

// Fact 7: logits in the hundreds give finite outputs that still match dense where Monarch is
// exact (single-row tiles), and stay finite elsewhere.
TEST(ReferenceFacts, LargeLogitsStayFinite) {
  Rng rng(8);
  for (const Case& c : kCases) {
    Tensor q(DType::kF64, 1, 1, 1, 1), k = q, v = q;
    make_qkv(rng, c, c.grid.T, &q, &k, &v, 12.0);  // |s q.k| ~ 144 sqrt(D) / sqrt(D) ~ hundreds
    AttentionParams p;
    p.grid = c.grid;
    p.layout = c.layout;
    for (int iters : {1, 3}) {
      p.num_iters = iters;
      Tensor out(DType::kF64, c.B, c.grid.tokens(), c.H, c.D);
      ASSERT_TRUE(ref::monarch_attention(q.view, k.view, v.view, out.view, p).ok());
      EXPECT_TRUE(test::all_finite(out.values()));
    }
  }
  Case c{{1, 1, 7}, {1, 1, 1}, 1, 1, 16};
  Tensor q(DType::kF64, 1, 1, 1, 1), k = q, v = q;
  make_qkv(rng, c, 1, &q, &k, &v, 20.0);
  AttentionParams p;
  p.grid = c.grid;
  Tensor out(DType::kF64, 1, 7, 1, 16), dense = out;
  ASSERT_TRUE(ref::monarch_attention(q.view, k.view, v.view, out.view, p).ok());
  ASSERT_TRUE(ref::dense_attention(q.view, k.view, v.view, dense.view, p).ok());
  EXPECT_LT(test::relative_l2(out.values(), dense.values()), 1e-12);
}

// Oracle top-k: density 1 is dense; a density keeping one key returns that key's value.
TEST(Reference, TopkLimits) {
  Rng rng(9);
  Case c{{3, 2, 3}, {1, 1, 1}, 2, 2, 4};
  Tensor q(DType::kF64, 1, 1, 1, 1), k = q, v = q;
  make_qkv(rng, c, c.grid.T, &q, &k, &v);
  AttentionParams p;
  p.grid = c.grid;
  p.causal_chunk_frames = 1;
  Tensor out(DType::kF64, c.B, c.grid.tokens(), c.H, c.D), dense = out;
  ASSERT_TRUE(ref::dense_attention(q.view, k.view, v.view, dense.view, p).ok());
  ASSERT_TRUE(ref::topk_attention(q.view, k.view, v.view, out.view, p, 1.0).ok());
  EXPECT_LT(test::relative_l2(out.values(), dense.values()), 1e-14);
  ASSERT_TRUE(ref::topk_attention(q.view, k.view, v.view, out.view, p, 1e-9).ok());
  const int64_t per_frame = c.grid.tokens_per_frame();
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t i = 0; i < c.grid.tokens(); ++i) {
        int64_t best = -1;
        double best_score = -INFINITY;
        for (int64_t j = 0; j < (i / per_frame + 1) * per_frame; ++j) {  // causal by 1 frame
          double dot = 0;
          for (int64_t d = 0; d < c.D; ++d) dot += q.at(b, i, h, d) * k.at(b, j, h, d);
          if (dot > best_score) best_score = dot, best = j;
        }
        for (int64_t d = 0; d < c.D; ++d) ASSERT_EQ(out.at(b, i, h, d), v.at(b, best, h, d));
      }
}

}  // namespace
}  // namespace monarchrt
