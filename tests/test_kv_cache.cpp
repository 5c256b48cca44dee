// The KV cache as a ring buffer: an autoregressive run that writes each chunk into its slots
// (cpu::kv_cache_write) and attends over the sink and the rolling window in place must give the
// same outputs as attending over the whole cache laid out in order; and every rule about rings,
// sinks and windows gives a clear error that leaves the caller's buffers untouched.
#include <gtest/gtest.h>

#include <cstring>

#include "random_problem.h"
#include "test_util.h"

namespace monarchrt {
namespace {

using test::Tensor;

struct Ring {
  VideoGrid chunk;  // grid of one chunk
  MonarchLayout layout;
  int64_t frames, capacity, sink, window;
};

void run_ring(const Ring& rc, bool monarch, bool reference) {
  Rng rng(31);
  const int64_t B = 2, H = 2, D = 6, per_frame = rc.chunk.tokens_per_frame();
  Tensor q(DType::kF32, B, rc.frames * per_frame, H, D), k = q, v = q;
  q.fill_normal(rng, 1.5);
  k.fill_normal(rng, 1.5);
  v.fill_normal(rng);
  Tensor ring_k(DType::kF32, B, rc.capacity * per_frame, H, D, 2), ring_v = ring_k;
  ring_k.fill(std::nan(""));  // never-written slots must never be read
  ring_v.fill(std::nan(""));
  for (int64_t f0 = 0; f0 < rc.frames; f0 += rc.chunk.T) {
    AttentionParams p;
    p.grid = rc.chunk;
    p.layout = rc.layout;
    p.kv_cache = true;
    p.sink_frames = rc.sink;
    p.window_frames = rc.window;
    p.cache_capacity_frames = rc.capacity;
    p.cache_frames = f0 + rc.chunk.T;
    const Tensor qc = test::slice_tokens(q, f0 * per_frame, rc.chunk.tokens());
    const Tensor kc = test::slice_tokens(k, f0 * per_frame, rc.chunk.tokens());
    const Tensor vc = test::slice_tokens(v, f0 * per_frame, rc.chunk.tokens());
    ASSERT_TRUE(cpu::kv_cache_write(kc.view, vc.view, ring_k.view, ring_v.view, p).ok());
    // The same window over the cache in order.
    AttentionParams lp = p;
    lp.cache_capacity_frames = lp.cache_frames = 0;
    const Tensor kl = test::slice_tokens(k, 0, p.cache_frames * per_frame), vl = test::slice_tokens(v, 0, p.cache_frames * per_frame);
    Tensor got(DType::kF64, B, rc.chunk.tokens(), H, D), want = got;
    auto run = [&](const TensorView& kk, const TensorView& vv, Tensor& o, const AttentionParams& pp) {
      if (monarch) {
        return reference ? ref::monarch_attention(qc.view, kk, vv, o.view, pp)
                         : cpu::monarch_attention(qc.view, kk, vv, o.view, pp);
      }
      return reference ? ref::dense_attention(qc.view, kk, vv, o.view, pp)
                       : cpu::dense_attention(qc.view, kk, vv, o.view, pp);
    };
    const Status s = run(ring_k.view, ring_v.view, got, p);
    ASSERT_TRUE(s.ok()) << s.to_string();
    ASSERT_TRUE(run(kl.view, vl.view, want, lp).ok());
    ASSERT_TRUE(test::all_finite(got.values())) << "an overwritten or empty slot was read";
    EXPECT_LT(test::relative_l2(got.values(), want.values()), 1e-12) << "chunk at frame " << f0;
  }
}

const Ring kRings[] = {
    {{2, 3, 4}, {2, 1, 2}, 12, 8, 2, 6},  // sink 2 + window 6 in a ring of 8, f_tied 2
    {{1, 2, 5}, {1, 1, 1}, 9, 4, 0, 4},   // no sink, the window is the whole ring
    {{3, 2, 3}, {1, 2, 3}, 15, 9, 3, 6},  // 3-frame chunks, h_reduce 2, w_reduce 3
};

TEST(KvCacheRing, ReferenceEqualsCacheInOrder) {
  for (const Ring& rc : kRings) {
    run_ring(rc, true, true);
    run_ring(rc, false, true);
  }
}

TEST(KvCacheRing, CpuPathEqualsCacheInOrder) {
  for (const Ring& rc : kRings) {
    run_ring(rc, true, false);
    run_ring(rc, false, false);
  }
}

// Random rings (tests/random_problem.h's ring-buffer problems: tilings, chunk lengths, sinks,
// windows, capacities), each run chunk by chunk over a video long enough to wrap the ring
// (as long as a window allows it), on the reference and the CPU path, Monarch and dense.
TEST(KvCacheRing, RandomRingsEqualCacheInOrder) {
  const uint64_t seed = test::test_seed(20261130);
  Rng rng(seed);
  test::ProblemLimits lim;
  lim.max_frames = 3;
  lim.max_past_frames = 3;
  lim.max_tile_rows = 6;
  lim.max_tile_cols = 6;
  lim.max_frame_tokens = 16;
  for (int i = 0; i < 24;) {
    const test::Problem pr = test::random_problem(rng, lim);
    const AttentionParams& p = pr.params;
    if (p.cache_capacity_frames == 0) continue;  // ring-buffer problems only
    const int64_t T = p.grid.T, chunks = test::pick(rng, 1, 5);
    // Without a window every frame must stay in the ring; with one, run past the capacity.
    const int64_t frames = p.window_frames ? T * chunks : T * std::max<int64_t>(1, p.cache_capacity_frames / T);
    const Ring rc{p.grid, p.layout, frames, p.cache_capacity_frames, p.sink_frames, p.window_frames};
    SCOPED_TRACE("ring " + std::to_string(i) + " of seed " + std::to_string(seed) + ": " + pr.to_string() +
                 ", video of " + std::to_string(frames) + " frames");
    for (bool monarch : {true, false})
      for (bool reference : {true, false}) run_ring(rc, monarch, reference);
    if (HasFatalFailure()) return;
    ++i;
  }
}

TEST(KvCacheRing, WriteWithoutRingFillsTheLastFrames) {
  Rng rng(32);
  const VideoGrid chunk{2, 2, 3};
  Tensor cache(DType::kF32, 1, 5 * 6, 2, 4), cache_v = cache, nk(DType::kF64, 1, 12, 2, 4), nv = nk;
  cache.fill(7.0);
  cache_v.fill(7.0);
  nk.fill_normal(rng);
  nv.fill_normal(rng);
  AttentionParams p;
  p.grid = chunk;
  p.kv_cache = true;
  ASSERT_TRUE(cpu::kv_cache_write(nk.view, nv.view, cache.view, cache_v.view, p).ok());
  for (int64_t s = 0; s < 30; ++s)
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t d = 0; d < 4; ++d) {
        const double want_k = s < 18 ? 7.0 : static_cast<float>(nk.at(0, s - 18, h, d));
        const double want_v = s < 18 ? 7.0 : static_cast<float>(nv.at(0, s - 18, h, d));
        ASSERT_EQ(cache.at(0, s, h, d), want_k);
        ASSERT_EQ(cache_v.at(0, s, h, d), want_v);
      }
}

// Each bad ring parameter: a clear error naming it, and nothing written.
TEST(KvCacheRing, BadRingsAreRejected) {
  const VideoGrid chunk{2, 3, 4};
  const int64_t per_frame = chunk.tokens_per_frame();
  Rng rng(33);
  Tensor q(DType::kF32, 1, chunk.tokens(), 1, 4), ring(DType::kF32, 1, 8 * per_frame, 1, 4);
  q.fill_normal(rng);
  ring.fill_normal(rng);
  struct Bad {
    const char* what;
    int64_t capacity, frames, sink, window, ring_frames;
    MonarchLayout layout;
  };
  const Bad bads[] = {
      {"window_frames", 8, 12, 0, 0, 8, {1, 1, 1}},           // more frames than the ring, no window
      {"window_frames", 8, 12, 2, 8, 8, {1, 1, 1}},           // window beyond capacity - sink
      {"sink_frames", 8, 10, 8, 2, 8, {1, 1, 1}},             // sink fills the ring
      {"cache_capacity_frames", 8, 10, 0, 6, 6, {1, 1, 1}},   // k holds 6 frames, not 8
      {"cache_capacity_frames", 7, 10, 0, 6, 7, {2, 1, 1}},   // ring not whole tiles
      {"cache_capacity_frames", -1, 10, 0, 6, 8, {1, 1, 1}},  // negative
      {"grid.T", 8, 1, 0, 6, 8, {1, 1, 1}},                   // fewer frames written than the chunk
  };
  for (const Bad& bad : bads) {
    Tensor rk(DType::kF32, 1, bad.ring_frames * per_frame, 1, 4);
    rk.fill(3.0);
    Tensor rv = rk, out(DType::kF32, 1, chunk.tokens(), 1, 4);
    out.fill(5.0);
    const std::vector<uint8_t> before_k = rk.storage, before_out = out.storage;
    AttentionParams p;
    p.grid = chunk;
    p.layout = bad.layout;
    p.kv_cache = true;
    p.cache_capacity_frames = bad.capacity;
    p.cache_frames = bad.frames;
    p.sink_frames = bad.sink;
    p.window_frames = bad.window;
    const Status s = cpu::monarch_attention(q.view, rk.view, rv.view, out.view, p);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << bad.what;
    EXPECT_NE(s.message().find(bad.what), std::string::npos) << s.message();
    if (bad.layout.f_tied == 1) {  // the write itself needs no whole tiles
      const Status w = cpu::kv_cache_write(q.view, q.view, rk.view, rv.view, p);
      EXPECT_FALSE(w.ok()) << bad.what;
    }
    EXPECT_EQ(rk.storage, before_k);
    EXPECT_EQ(out.storage, before_out);
  }
  // Ring fields outside KV-cache mode.
  AttentionParams p;
  p.grid = chunk;
  p.cache_capacity_frames = 8;
  Tensor out(DType::kF32, 1, chunk.tokens(), 1, 4);
  const Status s = ref::dense_attention(q.view, q.view, q.view, out.view, p);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("cache_capacity_frames"), std::string::npos);
  // kv_cache_write: mismatched shapes name the tensor.
  p.kv_cache = true;
  p.cache_capacity_frames = 0;
  Tensor small(DType::kF32, 1, chunk.tokens(), 1, 3), cache(DType::kF32, 1, 4 * per_frame, 1, 4);
  Status w = cpu::kv_cache_write(q.view, small.view, cache.view, cache.view, p);
  EXPECT_NE(w.message().find("new_v"), std::string::npos) << w.message();
  Tensor cache_small(DType::kF32, 1, 4 * per_frame, 1, 3);
  w = cpu::kv_cache_write(q.view, q.view, cache.view, cache_small.view, p);
  EXPECT_NE(w.message().find("cache_v"), std::string::npos) << w.message();
}

}  // namespace
}  // namespace monarchrt
