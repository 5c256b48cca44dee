// Randomized problems (tests/random_problem.h) on the CPU: for each, the fast fp32 path against
// the fp64 reference in every entry point that applies (Monarch forward with 1-3 iterations and
// its log-sum-exp, dense forward, both backward passes). The fixed case lists of test_cpu.cpp and
// test_cpu_backward.cpp pick shapes by hand; these combine tilings, modes, ring buffers that have
// wrapped, windows, batch, heads, head dims, scales and input dtypes at random.
// Outputs and gradients are poisoned with NaN first (an unwritten element fails); in KV-cache
// mode the k / v slots that hold no attended frame are often NaN too, so reading one fails.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "random_problem.h"
#include "test_util.h"

namespace monarchrt {
namespace {

using test::Problem;
using test::Tensor;

// Same inputs on both sides, fp32 against fp64 arithmetic (as in test_cpu.cpp). Gradients get
// more room: their sums cancel more (the worst of seeds 1-400 was 5.3e-5, dq at head dim 1).
constexpr double kForwardTolerance = 2e-5, kBackwardTolerance = 1e-4;

struct Inputs {
  Tensor q{DType::kF32, 1, 1, 1, 1}, k = q, v = q, dout = q;
};

Inputs make_inputs(const Problem& pr, Rng& rng) {
  const DType dtypes[] = {DType::kF32, DType::kF32, DType::kBF16, DType::kF16};
  const DType dtype = dtypes[test::pick(rng, 0, 3)];
  const int64_t pad = test::pick(rng, 0, 2);
  Inputs in;
  in.q = Tensor(dtype, pr.B, pr.q_tokens(), pr.H, pr.D, pad);
  in.k = Tensor(dtype, pr.B, pr.kv_tokens(), pr.H, pr.D);
  in.v = Tensor(dtype, pr.B, pr.kv_tokens(), pr.H, pr.D, pad);
  in.dout = Tensor(DType::kF32, pr.B, pr.q_tokens(), pr.H, pr.D, 1);
  in.q.fill_normal(rng, 1.5);
  in.k.fill_normal(rng, 1.5);
  in.v.fill_normal(rng);
  in.dout.fill_normal(rng);
  if (pr.params.kv_cache && test::pick(rng, 0, 1)) test::poison_unattended_slots(pr, in.k, in.v);
  return in;
}

struct Worst {
  double forward = 0, lse = 0, dense = 0, backward = 0, dense_backward = 0;
};

void expect_close(const std::vector<double>& got, const std::vector<double>& want, double tol, const char* what,
                  double* worst) {
  ASSERT_TRUE(test::all_finite(got)) << what << ": unwritten or non-finite element";
  for (size_t e = 0; e < want.size(); ++e) {
    if (want[e] == 0.0) {
      ASSERT_EQ(got[e], 0.0) << what << " element " << e << ": the reference gives exactly 0";
    }
  }
  if (std::all_of(want.begin(), want.end(), [](double x) { return x == 0.0; })) return;
  const double err = test::relative_l2(got, want);
  EXPECT_LT(err, tol) << what;
  *worst = std::max(*worst, err);
}

void check_problem(const Problem& pr, Rng& rng, Worst* worst) {
  const AttentionParams& p = pr.params;
  const Inputs in = make_inputs(pr, rng);
  const TensorView &q = in.q.view, &k = in.k.view, &v = in.v.view;
  const int64_t S = pr.q_tokens();
  Tensor out(DType::kF32, pr.B, S, pr.H, pr.D, 2), want(DType::kF64, pr.B, S, pr.H, pr.D);
  {
    const Status s = check_attention(q, k, v, out.view, p, true);
    ASSERT_TRUE(s.ok()) << "the generator made a problem the library rejects: " << s.to_string();
  }

  // Monarch forward and its log-sum-exp.
  std::vector<float> lse(pr.B * pr.H * S, std::nanf("")), lse_ref = lse;
  test::poison(out);
  ASSERT_TRUE(ref::monarch_attention_with_lse(q, k, v, want.view, lse_ref.data(), p).ok());
  Status s = cpu::monarch_attention_with_lse(q, k, v, out.view, lse.data(), p);
  ASSERT_TRUE(s.ok()) << s.to_string();
  expect_close(out.values(), want.values(), kForwardTolerance, "monarch out", &worst->forward);
  expect_close(std::vector<double>(lse.begin(), lse.end()), std::vector<double>(lse_ref.begin(), lse_ref.end()),
               kForwardTolerance, "monarch lse", &worst->lse);
  test::poison(out);
  s = cpu::monarch_attention(q, k, v, out.view, p);
  ASSERT_TRUE(s.ok()) << s.to_string();
  expect_close(out.values(), want.values(), kForwardTolerance, "monarch out (without lse)", &worst->forward);

  // Dense forward (the layout and iterations do not apply).
  test::poison(out);
  ASSERT_TRUE(ref::dense_attention(q, k, v, want.view, p).ok());
  s = cpu::dense_attention(q, k, v, out.view, p);
  ASSERT_TRUE(s.ok()) << s.to_string();
  expect_close(out.values(), want.values(), kForwardTolerance, "dense out", &worst->dense);

  // Backward passes (Monarch: one iteration only).
  for (bool monarch : {true, false}) {
    if (monarch && p.num_iters != 1) continue;
    Tensor gq(DType::kF32, pr.B, S, pr.H, pr.D, 1), gk(DType::kF32, pr.B, pr.kv_tokens(), pr.H, pr.D),
        gv(DType::kF32, pr.B, pr.kv_tokens(), pr.H, pr.D, 2);
    Tensor wq(DType::kF64, pr.B, S, pr.H, pr.D), wk(DType::kF64, pr.B, pr.kv_tokens(), pr.H, pr.D), wv = wk;
    for (Tensor* t : {&gq, &gk, &gv}) test::poison(*t);
    const TensorView& o = in.dout.view;
    ASSERT_TRUE((monarch ? ref::monarch_attention_backward(q, k, v, o, wq.view, wk.view, wv.view, p)
                         : ref::dense_attention_backward(q, k, v, o, wq.view, wk.view, wv.view, p))
                    .ok());
    s = monarch ? cpu::monarch_attention_backward(q, k, v, o, gq.view, gk.view, gv.view, p)
                : cpu::dense_attention_backward(q, k, v, o, gq.view, gk.view, gv.view, p);
    ASSERT_TRUE(s.ok()) << s.to_string();
    double* w = monarch ? &worst->backward : &worst->dense_backward;
    const std::string tag = monarch ? "monarch " : "dense ";
    expect_close(gq.values(), wq.values(), kBackwardTolerance, (tag + "dq").c_str(), w);
    expect_close(gk.values(), wk.values(), kBackwardTolerance, (tag + "dk").c_str(), w);
    expect_close(gv.values(), wv.values(), kBackwardTolerance, (tag + "dv").c_str(), w);
  }
}

TEST(RandomProblems, CpuPathMatchesReference) {
  const uint64_t seed = test::test_seed(20261130);
  Rng rng(seed);
  test::ProblemLimits lim;
  lim.max_frames = 4;
  lim.max_past_frames = 4;
  lim.max_tile_rows = 12;
  lim.max_tile_cols = 12;
  lim.max_frame_tokens = 40;
  lim.head_dims = {1, 3, 8, 16};
  lim.max_iters = 3;
  Worst worst;
  int modes[4] = {0, 0, 0, 0};
  for (int i = 0; i < 60; ++i) {
    const Problem pr = test::random_problem(rng, lim);
    const AttentionParams& p = pr.params;
    ++modes[p.cache_capacity_frames ? 3 : p.kv_cache ? 2 : p.causal_chunk_frames ? 1 : 0];
    SCOPED_TRACE("problem " + std::to_string(i) + " of seed " + std::to_string(seed) + ": " + pr.to_string());
    check_problem(pr, rng, &worst);
    if (HasFatalFailure()) return;
  }
  std::printf("[ problems ] bidirectional %d, block-causal %d, KV cache %d, ring buffer %d\n", modes[0], modes[1],
              modes[2], modes[3]);
  std::printf("[ fp32 err ] max relative L2: monarch %.3g, lse %.3g, dense %.3g, monarch backward %.3g, "
              "dense backward %.3g\n",
              worst.forward, worst.lse, worst.dense, worst.backward, worst.dense_backward);
}

}  // namespace
}  // namespace monarchrt
