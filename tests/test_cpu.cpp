// The fast fp32 CPU path against the fp64 reference: dense, Monarch (1..4 iterations, every
// tiling of the case list, block-causal, KV cache with windows) and oracle top-k, on fresh random
// inputs of many shapes and of every input dtype. Outputs are poisoned first, so an unwritten
// element fails the check.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "../src/cpu/kernels.h"
#include "test_util.h"

namespace monarchrt {
namespace {

using test::Tensor;

struct Case {
  VideoGrid grid;
  MonarchLayout layout;
  int64_t B, H, D;
  int64_t causal_chunk;  // frames, 0 = bidirectional
};

const Case kCases[] = {
    {{2, 1, 1}, {1, 1, 1}, 1, 1, 4, 0},     {{3, 3, 5}, {1, 1, 1}, 2, 3, 8, 1},
    {{3, 3, 5}, {3, 3, 5}, 1, 2, 5, 0},     {{2, 5, 3}, {1, 1, 1}, 1, 2, 6, 0},
    {{4, 15, 1}, {1, 1, 1}, 1, 1, 3, 2},    {{2, 30, 4}, {1, 2, 4}, 1, 2, 4, 1},
    {{2, 30, 52}, {1, 1, 1}, 1, 1, 16, 0},  {{2, 6, 52}, {1, 2, 1}, 2, 1, 3, 1},
    {{6, 2, 3}, {3, 1, 1}, 2, 1, 4, 3},     {{4, 4, 6}, {2, 2, 3}, 1, 2, 7, 2},
    {{3, 30, 52}, {3, 1, 1}, 1, 1, 8, 0},   {{1, 2, 2}, {1, 1, 1}, 3, 1, 64, 0},
    {{2, 4, 4}, {1, 1, 1}, 1, 2, 128, 1},
};

void fill_qkv(Rng& rng, DType dtype, const Case& c, int64_t kv_tokens, Tensor* q, Tensor* k, Tensor* v) {
  *q = Tensor(dtype, c.B, c.grid.tokens(), c.H, c.D, 1);
  *k = Tensor(dtype, c.B, kv_tokens, c.H, c.D);
  *v = Tensor(dtype, c.B, kv_tokens, c.H, c.D, 3);
  q->fill_normal(rng, 1.5);
  k->fill_normal(rng, 1.5);
  v->fill_normal(rng);
}

enum class Method { kDense, kMonarch, kTopk };

Status run(Method m, bool reference, const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
           const AttentionParams& p, double density = 0.1) {
  switch (m) {
    case Method::kDense:
      return reference ? ref::dense_attention(q.view, k.view, v.view, out.view, p)
                       : cpu::dense_attention(q.view, k.view, v.view, out.view, p);
    case Method::kMonarch:
      return reference ? ref::monarch_attention(q.view, k.view, v.view, out.view, p)
                       : cpu::monarch_attention(q.view, k.view, v.view, out.view, p);
    case Method::kTopk:
      return reference ? ref::topk_attention(q.view, k.view, v.view, out.view, p, density)
                       : cpu::topk_attention(q.view, k.view, v.view, out.view, p, density);
  }
  return Status::internal("unreachable");
}

// fp32 rounding of the inputs is shared (both read the same values); only the arithmetic
// differs, so the fast path must agree to about fp32 epsilon times a small growth factor.
constexpr double kFp32Tolerance = 2e-5;

void expect_match(Method m, const Case& c, const AttentionParams& p, DType dtype, Rng& rng,
                  int64_t kv_tokens, double density = 0.1) {
  Tensor q(DType::kF32, 1, 1, 1, 1), k = q, v = q;
  fill_qkv(rng, dtype, c, kv_tokens, &q, &k, &v);
  Tensor fast(DType::kF32, c.B, c.grid.tokens(), c.H, c.D, 2);
  Tensor want(DType::kF64, c.B, c.grid.tokens(), c.H, c.D);
  test::poison(fast);
  ASSERT_TRUE(run(m, true, q, k, v, want, p, density).ok());
  const Status s = run(m, false, q, k, v, fast, p, density);
  ASSERT_TRUE(s.ok()) << s.to_string();
  const std::vector<double> got = fast.values();
  ASSERT_TRUE(test::all_finite(got)) << "unwritten or non-finite output";
  EXPECT_LT(test::relative_l2(got, want.values()), kFp32Tolerance)
      << "grid " << c.grid.to_string() << " layout " << p.layout.to_string() << " iters "
      << p.num_iters << " causal " << p.causal_chunk_frames << " kv " << p.kv_cache << " dtype "
      << dtype_name(dtype);
}

TEST(CpuPath, MonarchMatchesReference) {
  Rng rng(11);
  for (const Case& c : kCases) {
    for (int iters : {1, 2, 4}) {
      AttentionParams p;
      p.grid = c.grid;
      p.layout = c.layout;
      p.num_iters = iters;
      p.causal_chunk_frames = c.causal_chunk;
      expect_match(Method::kMonarch, c, p, DType::kF32, rng, c.grid.tokens());
    }
  }
}

TEST(CpuPath, DenseMatchesReference) {
  Rng rng(12);
  for (const Case& c : kCases) {
    AttentionParams p;
    p.grid = c.grid;
    p.causal_chunk_frames = c.causal_chunk;
    expect_match(Method::kDense, c, p, DType::kF32, rng, c.grid.tokens());
  }
}

// The CPU paths' vectorizable exp: relative error against double exp over its whole domain, and
// its special values (0 below -87 and at -inf, NaN kept).
TEST(CpuKernels, ExpNonpositive) {
  double worst = 0.0;
  for (int i = 0; i <= 870000; ++i) {
    const float x = -static_cast<float>(i) * 1e-4f;
    const double want = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::fabs(cpu::exp_nonpositive(x) - want) / want);
  }
  EXPECT_LT(worst, 2e-7);
  EXPECT_EQ(cpu::exp_nonpositive(0.0f), 1.0f);
  EXPECT_EQ(cpu::exp_nonpositive(-100.0f), 0.0f);
  EXPECT_EQ(cpu::exp_nonpositive(-std::numeric_limits<float>::infinity()), 0.0f);
  EXPECT_TRUE(std::isnan(cpu::exp_nonpositive(std::numeric_limits<float>::quiet_NaN())));
}

// The CPU paths' matrix product on every edge of its blocking (8-row blocks with AVX-512, then 4,
// then single rows; columns not a multiple of 16), with A read row-major or transposed, padded
// pitches, and accumulate.
TEST(CpuKernels, GemmMatchesNaiveProduct) {
  std::mt19937 gen(7);
  std::normal_distribution<float> normal;
  for (int64_t M : {1, 3, 4, 5, 8, 9, 13, 30})
    for (int64_t N : {1, 7, 16, 17, 33, 52, 64})
      for (int64_t K : {1, 5, 128})
        for (bool transposed : {false, true})
          for (bool accumulate : {false, true}) {
            const int64_t lda = (transposed ? M : K) + 3, ldb = N + 2, ldc = N + 5;
            std::vector<float> A((transposed ? K : M) * lda), B(K * ldb), C(M * ldc);
            for (float& x : A) x = normal(gen);
            for (float& x : B) x = normal(gen);
            for (float& x : C) x = normal(gen);
            const std::vector<float> C0 = C;
            const int64_t a_rs = transposed ? 1 : lda, a_cs = transposed ? lda : 1;
            cpu::gemm(M, N, K, A.data(), a_rs, a_cs, B.data(), ldb, C.data(), ldc, accumulate);
            for (int64_t i = 0; i < M; ++i)
              for (int64_t j = 0; j < ldc; ++j) {
                const float got = C[i * ldc + j];
                if (j >= N) {  // past the columns: untouched
                  ASSERT_EQ(got, C0[i * ldc + j]) << M << "x" << N << "x" << K;
                  continue;
                }
                double want = accumulate ? C0[i * ldc + j] : 0.0;
                for (int64_t k = 0; k < K; ++k) want += double(A[i * a_rs + k * a_cs]) * B[k * ldb + j];
                ASSERT_NEAR(got, want, 1e-4 * (1.0 + std::sqrt(double(K)))) << M << "x" << N << "x" << K;
              }
          }
}

TEST(CpuPath, TopkMatchesReference) {
  Rng rng(13);
  for (const Case& c : kCases) {
    for (double density : {0.05, 0.3, 1.0}) {
      AttentionParams p;
      p.grid = c.grid;
      p.causal_chunk_frames = c.causal_chunk;
      expect_match(Method::kTopk, c, p, DType::kF32, rng, c.grid.tokens(), density);
    }
  }
}

TEST(CpuPath, EveryInputDtype) {
  Rng rng(14);
  const Case c{{3, 3, 5}, {1, 1, 1}, 2, 2, 8, 1};
  for (DType dtype : {DType::kF16, DType::kBF16, DType::kF64, DType::kF32}) {
    for (Method m : {Method::kDense, Method::kMonarch}) {
      AttentionParams p;
      p.grid = c.grid;
      p.causal_chunk_frames = c.causal_chunk;
      expect_match(m, c, p, dtype, rng, c.grid.tokens());
    }
  }
}

TEST(CpuPath, KvCacheWithWindows) {
  Rng rng(15);
  const Case c{{2, 3, 4}, {2, 1, 2}, 2, 2, 8, 0};
  const int64_t per_frame = c.grid.tokens_per_frame();
  for (int64_t cache : {2, 6, 10}) {
    for (auto sw : {std::pair<int64_t, int64_t>{0, 0}, {2, 4}, {0, 2}, {4, 4}}) {
      for (Method m : {Method::kMonarch, Method::kDense}) {
        AttentionParams p;
        p.grid = c.grid;
        p.layout = c.layout;
        p.num_iters = 2;
        p.kv_cache = true;
        p.sink_frames = sw.first;
        p.window_frames = sw.second;
        expect_match(m, c, p, DType::kF32, rng, cache * per_frame);
      }
    }
  }
}

TEST(CpuPath, LargeLogitsStayFiniteAndAccurate) {
  Rng rng(16);
  const Case c{{2, 6, 52}, {1, 2, 1}, 1, 2, 16, 1};
  Tensor q(DType::kF32, 1, 1, 1, 1), k = q, v = q;
  fill_qkv(rng, DType::kF32, c, c.grid.tokens(), &q, &k, &v);
  Tensor qs = q, ks = k;
  for (Tensor* t : {&qs, &ks})
    for (int64_t s = 0; s < c.grid.tokens(); ++s)
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t d = 0; d < c.D; ++d) t->set(0, s, h, d, 8.0 * t->at(0, s, h, d));
  for (Method m : {Method::kDense, Method::kMonarch}) {
    AttentionParams p;
    p.grid = c.grid;
    p.layout = c.layout;
    p.num_iters = 2;
    p.causal_chunk_frames = 1;
    Tensor fast(DType::kF32, c.B, c.grid.tokens(), c.H, c.D), want(DType::kF64, c.B, c.grid.tokens(), c.H, c.D);
    ASSERT_TRUE(run(m, true, qs, ks, v, want, p).ok());
    ASSERT_TRUE(run(m, false, qs, ks, v, fast, p).ok());
    ASSERT_TRUE(test::all_finite(fast.values()));
    // Logits near 300 amplify fp32 rounding of the scores; the error stays far below Monarch's own.
    EXPECT_LT(test::relative_l2(fast.values(), want.values()), 1e-3);
  }
}

// monarch_attention_with_lse: the same output as monarch_attention, and each query's stage-2
// log-sum-exp. With one-row tiles (b1 = 1) the proxy of every key row is the query itself, so
// u[n] is exactly the log-sum-exp over key tile n and the stage-2 log-sum-exp is the dense one
// over every allowed key: the reference's is checked against that in fp64 (block-causal), then
// the fast path's against the reference's on tiled, block-causal and KV-cache cases.
TEST(CpuPath, MonarchLogSumExp) {
  Rng rng(18);
  {
    const Case c{{3, 2, 5}, {1, 2, 1}, 2, 3, 8, 1};  // b1 = 1, b2 = 5, chunks of one frame
    Tensor q(DType::kF32, 1, 1, 1, 1), k = q, v = q;
    fill_qkv(rng, DType::kF32, c, c.grid.tokens(), &q, &k, &v);
    AttentionParams p;
    p.grid = c.grid;
    p.layout = c.layout;
    p.causal_chunk_frames = c.causal_chunk;
    const int64_t S = c.grid.tokens(), per_frame = c.grid.tokens_per_frame();
    Tensor out(DType::kF64, c.B, S, c.H, c.D);
    std::vector<float> lse(c.B * c.H * S, std::nanf(""));
    const Status s = ref::monarch_attention_with_lse(q.view, k.view, v.view, out.view, lse.data(), p);
    ASSERT_TRUE(s.ok()) << s.to_string();
    const double scale = 1.0 / std::sqrt(double(c.D));
    double worst = 0.0;
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t t = 0; t < S; ++t) {
          const int64_t keys = (t / per_frame + 1) * per_frame;  // frames up to the query's own
          std::vector<double> z(keys);
          double mx = -INFINITY, sum = 0.0;
          for (int64_t i = 0; i < keys; ++i) {
            z[i] = 0.0;
            for (int64_t d = 0; d < c.D; ++d) z[i] += scale * q.at(b, t, h, d) * k.at(b, i, h, d);
            mx = std::max(mx, z[i]);
          }
          for (int64_t i = 0; i < keys; ++i) sum += std::exp(z[i] - mx);
          const double got = lse[(b * c.H + h) * S + t];
          ASSERT_TRUE(std::isfinite(got)) << "query " << t << " head " << h << ": not written";
          worst = std::max(worst, std::abs(got - (mx + std::log(sum))));
        }
    EXPECT_LT(worst, 1e-5);
  }
  for (int64_t cache : {0, 6}) {
    for (const Case& c : {kCases[1], kCases[5], kCases[9], kCases[10]}) {
      AttentionParams p;
      p.grid = c.grid;
      p.layout = c.layout;
      p.num_iters = 2;
      p.causal_chunk_frames = cache ? 0 : c.causal_chunk;
      p.kv_cache = cache > 0;
      const int64_t kv_tokens = cache ? cache * c.grid.tokens_per_frame() : c.grid.tokens();
      Tensor q(DType::kF32, 1, 1, 1, 1), k = q, v = q;
      fill_qkv(rng, DType::kBF16, c, kv_tokens, &q, &k, &v);
      const int64_t n = c.B * c.H * c.grid.tokens();
      Tensor plain(DType::kF32, c.B, c.grid.tokens(), c.H, c.D), out = plain;
      Tensor want(DType::kF64, c.B, c.grid.tokens(), c.H, c.D);
      test::poison(out);
      std::vector<float> lse(n, std::nanf("")), lse_ref(n, std::nanf(""));
      ASSERT_TRUE(cpu::monarch_attention(q.view, k.view, v.view, plain.view, p).ok());
      const Status s = cpu::monarch_attention_with_lse(q.view, k.view, v.view, out.view, lse.data(), p);
      ASSERT_TRUE(s.ok()) << s.to_string();
      ASSERT_TRUE(ref::monarch_attention_with_lse(q.view, k.view, v.view, want.view, lse_ref.data(), p).ok());
      EXPECT_EQ(out.values(), plain.values());
      const std::vector<double> got(lse.begin(), lse.end()), ref_lse(lse_ref.begin(), lse_ref.end());
      ASSERT_TRUE(test::all_finite(got)) << "lse: unwritten element";
      EXPECT_LT(test::relative_l2(got, ref_lse), kFp32Tolerance)
          << "grid " << c.grid.to_string() << " layout " << c.layout.to_string() << " cache " << cache;
    }
  }
  Tensor t(DType::kF32, 1, 4, 1, 4);
  AttentionParams p;
  p.grid = {1, 2, 2};
  for (bool reference : {false, true}) {
    const Status bad = reference ? ref::monarch_attention_with_lse(t.view, t.view, t.view, t.view, nullptr, p)
                                 : cpu::monarch_attention_with_lse(t.view, t.view, t.view, t.view, nullptr, p);
    EXPECT_EQ(bad.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(bad.message().find("lse"), std::string::npos);
  }
}

TEST(CpuPath, ThreadCountDoesNotChangeResults) {
  Rng rng(17);
  const Case c{{3, 30, 52}, {1, 2, 1}, 1, 2, 8, 1};
  Tensor q(DType::kF32, 1, 1, 1, 1), k = q, v = q;
  fill_qkv(rng, DType::kF32, c, c.grid.tokens(), &q, &k, &v);
  for (Method m : {Method::kDense, Method::kMonarch, Method::kTopk}) {
    AttentionParams p;
    p.grid = c.grid;
    p.layout = c.layout;
    p.num_iters = 2;
    p.causal_chunk_frames = 1;
    std::vector<std::vector<double>> results;
    for (int threads : {1, 3}) {
      cpu::set_num_threads(threads);
      Tensor out(DType::kF32, c.B, c.grid.tokens(), c.H, c.D);
      ASSERT_TRUE(run(m, false, q, k, v, out, p).ok());
      results.push_back(out.values());
    }
    cpu::set_num_threads(0);
    EXPECT_EQ(results[0], results[1]);
  }
}

}  // namespace
}  // namespace monarchrt
