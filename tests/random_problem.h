// Random attention problems for the randomized tests (tests/test_random.cpp on the CPU, the
// CudaRandom tests in tests/test_cuda.cpp): a video grid and tiling built from random divisors,
// a random mode (bidirectional, block-causal with chunks that need not divide the video, a KV
// cache with sink and window, a ring-buffer cache that has wrapped), batch, heads, head dim,
// scale and iterations, all inside the limits the caller gives. Every problem satisfies the
// library's rules (check_attention), so any failure is a wrong result, not a rejected input.
//
// The seed is MONARCHRT_TEST_SEED when set (to explore; a failure prints the seed and the
// problem), otherwise the test's own fixed seed (so CI is reproducible).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "monarchrt/attention.h"
#include "monarchrt/workload.h"
#include "test_util.h"

namespace monarchrt {
namespace test {

struct ProblemLimits {
  int64_t max_frames = 6;          // query frames (the chunk in KV-cache mode)
  int64_t max_past_frames = 6;     // KV cache: frames before the chunk
  int64_t max_tile_rows = 64;      // b1
  int64_t max_tile_cols = 64;      // b2
  int64_t max_frame_tokens = 256;  // h * w
  int64_t max_batch = 2, max_heads = 3;
  std::vector<int64_t> head_dims = {8};
  int max_iters = 1;
};

struct Problem {
  AttentionParams params;
  int64_t B = 1, H = 1, D = 8;
  int64_t kv_frames = 0;  // frames held by k and v (the ring's capacity with a ring)

  int64_t q_tokens() const { return params.grid.tokens(); }
  int64_t kv_tokens() const { return kv_frames * params.grid.tokens_per_frame(); }
  // Frames (logical) of the keys that some query attends: all of them in full mode.
  int64_t logical_frames() const {
    return params.cache_capacity_frames ? params.cache_frames : kv_frames;
  }
  // Whether k / v slot `slot` holds a frame that some query attends.
  bool slot_attended(int64_t slot) const {
    for (int64_t f : attended_frames(params, logical_frames()))
      if (cache_slot(params, f) == slot) return true;
    return false;
  }
  std::string to_string() const {
    std::string s = describe(params);
    if (params.kv_cache) s += " (" + std::to_string(kv_frames) + " frames in k, v)";
    s += " B" + std::to_string(B) + " H" + std::to_string(H) + " D" + std::to_string(D);
    if (params.scale != 0.0) s += " scale " + std::to_string(params.scale);
    return s;
  }
};

// Sets every k / v slot that holds no attended frame to NaN, so that reading one shows up.
inline void poison_unattended_slots(const Problem& pr, Tensor& k, Tensor& v) {
  const int64_t per_frame = pr.params.grid.tokens_per_frame();
  for (int64_t slot = 0; slot < pr.kv_frames; ++slot) {
    if (pr.slot_attended(slot)) continue;
    for (int64_t b = 0; b < pr.B; ++b)
      for (int64_t t = slot * per_frame; t < (slot + 1) * per_frame; ++t)
        for (int64_t h = 0; h < pr.H; ++h)
          for (int64_t d = 0; d < pr.D; ++d) {
            k.set(b, t, h, d, std::nan(""));
            v.set(b, t, h, d, std::nan(""));
          }
  }
}

inline uint64_t test_seed(uint64_t fixed) {
  const char* env = std::getenv("MONARCHRT_TEST_SEED");
  const uint64_t seed = env && *env ? std::strtoull(env, nullptr, 10) : fixed;
  std::printf("[   seed   ] %llu%s\n", static_cast<unsigned long long>(seed),
              env && *env ? " (MONARCHRT_TEST_SEED)" : " (fixed; set MONARCHRT_TEST_SEED for others)");
  return seed;
}

// Uniform integer in [lo, hi] (hi >= lo).
inline int64_t pick(Rng& rng, int64_t lo, int64_t hi) {
  return lo + static_cast<int64_t>(rng.next() % static_cast<uint64_t>(hi - lo + 1));
}

inline Problem random_problem(Rng& rng, const ProblemLimits& lim) {
  Problem pr;
  AttentionParams& p = pr.params;
  // Tiling: f frames x (h / h_reduce) rows make b1, w / w_reduce columns make b2.
  const int64_t f_choices[] = {1, 1, 1, 2, 3};
  int64_t f = f_choices[pick(rng, 0, 4)];
  while (f > 1 && (f > lim.max_frames || f > lim.max_tile_rows)) --f;
  const int64_t reduce_choices[] = {1, 1, 2, 3, 4};
  const int64_t hr = reduce_choices[pick(rng, 0, 4)], wr = reduce_choices[pick(rng, 0, 4)];
  int64_t hb = pick(rng, 1, std::max<int64_t>(1, lim.max_tile_rows / f));
  int64_t wb = pick(rng, 1, lim.max_tile_cols);
  // Shrink the larger side until the frame fits.
  while (hr * hb * wr * wb > lim.max_frame_tokens) {
    if (hb * hr >= wb * wr && hb > 1) {
      hb = (hb + 1) / 2;
    } else if (wb > 1) {
      wb = (wb + 1) / 2;
    } else {
      hb = (hb + 1) / 2;
    }
    if (hb == 1 && wb == 1) break;
  }
  p.layout = {f, hr, wr};
  const int64_t T = f * pick(rng, 1, std::max<int64_t>(1, lim.max_frames / f));
  p.grid = {T, hr * hb, wr * wb};
  pr.B = pick(rng, 1, lim.max_batch);
  pr.H = pick(rng, 1, lim.max_heads);
  pr.D = lim.head_dims[static_cast<size_t>(pick(rng, 0, static_cast<int64_t>(lim.head_dims.size()) - 1))];
  // An explicit scale of 0.5 to 1.5 times the default 1 / sqrt(D). Sharper logits are legal but
  // approach the bf16 tolerance: the GPU's bf16 backward error grows with the scale (about 4e-3 at
  // the default, 0.9-1.1e-2 at 4 times it with these inputs; docs/numerics.md).
  if (pick(rng, 0, 3) == 0) p.scale = (0.5 + rng.uniform()) / std::sqrt(static_cast<double>(pr.D));
  if (lim.max_iters > 1 && pick(rng, 0, 3) == 0) p.num_iters = static_cast<int>(pick(rng, 2, lim.max_iters));

  const int64_t tiles = T / f, past_tiles = lim.max_past_frames / f;
  switch (pick(rng, 0, 3)) {
    case 0:  // bidirectional
      pr.kv_frames = T;
      break;
    case 1:  // block-causal; the last chunk may be partial
      pr.kv_frames = T;
      p.causal_chunk_frames = f * pick(rng, 1, tiles);
      break;
    case 2: {  // KV cache holding every frame written so far, the chunk last
      p.kv_cache = true;
      pr.kv_frames = T + f * pick(rng, 0, past_tiles);
      const int64_t all = pr.kv_frames / f;
      if (pick(rng, 0, 1)) p.cache_frames = pr.kv_frames;  // 0 means the same without a ring
      p.sink_frames = f * pick(rng, 0, all - tiles);
      if (pick(rng, 0, 1)) p.window_frames = f * pick(rng, tiles, all);
      break;
    }
    default: {  // a ring buffer: capacity slots, sink slots fixed, the rest rotating
      p.kv_cache = true;
      const int64_t sink_tiles = pick(rng, 0, 2);
      const int64_t ring_tiles = tiles + pick(rng, 0, past_tiles);  // the chunk fits in the ring
      p.sink_frames = f * sink_tiles;
      p.cache_capacity_frames = f * (sink_tiles + ring_tiles);
      pr.kv_frames = p.cache_capacity_frames;
      // Frames written: at least the chunk, often more than the capacity (the ring has wrapped).
      p.cache_frames = std::max(T, f * pick(rng, tiles, sink_tiles + 2 * ring_tiles + 1));
      // Without a window every frame written must still be in its slot.
      if (p.cache_frames > p.cache_capacity_frames || pick(rng, 0, 1)) {
        p.window_frames = f * pick(rng, tiles, ring_tiles);
      }
      break;
    }
  }
  return pr;
}

// Parameters around a valid problem on a 4 x 2 x 6 grid (12 tokens a frame, 48 in all; the error
// tests' base problem): each field from values that problem allows, one time in ten from values it
// does not (negative, zero, too large, not whole tiles, ring buffers that do not fit, a NaN scale),
// so that many draws break one rule and many none. kv_tokens: tokens of k and v to allocate.
struct PerturbedParams {
  AttentionParams params;
  int64_t kv_tokens = 48;
  std::string to_string() const {
    std::string s = describe(params) + " k tokens " + std::to_string(kv_tokens);
    if (params.cache_capacity_frames == 0 && params.cache_frames != 0) {
      s += " cache_frames " + std::to_string(params.cache_frames);
    }
    if (std::isnan(params.scale)) s += " NaN scale";
    return s;
  }
};

inline PerturbedParams perturbed_params(Rng& rng) {
  // A value from `good`, one time in ten from `bad`.
  auto pick_one = [&](std::initializer_list<int64_t> good, std::initializer_list<int64_t> bad) {
    const bool wrong = bad.size() > 0 && pick(rng, 0, 9) == 0;
    const auto& from = wrong ? bad : good;
    return from.begin()[pick(rng, 0, static_cast<int64_t>(from.size()) - 1)];
  };
  PerturbedParams pp;
  AttentionParams& a = pp.params;
  a.grid = VideoGrid{pick_one({4}, {3, 0, -4}), pick_one({2}, {1, 3}), pick_one({6}, {4, 12})};
  a.layout = MonarchLayout{pick_one({1, 2, 4}, {3, 0, 8}), pick_one({1, 2}, {3, -1}), pick_one({1, 2, 3, 6}, {4, 5})};
  a.num_iters = static_cast<int>(pick_one({1, 2, 3}, {0, -1, 100}));
  a.scale = pick_one({0}, {1}) == 1 ? std::nan("") : 0.0;
  a.causal_chunk_frames = pick_one({0, 2, 4}, {1, 3, -2});
  if (pick(rng, 0, 1) == 1) {  // a KV cache of random frames, sink, window, maybe a ring
    a.kv_cache = true;
    const int64_t frames = pick_one({4, 6, 8}, {2, 5, 7});
    pp.kv_tokens = frames * 12 + pick_one({0}, {5});
    a.causal_chunk_frames = pick_one({0}, {2});
    a.sink_frames = pick_one({0, 2}, {1, 4, -2});
    a.window_frames = pick_one({0, 4}, {5, 2, 8, -4});
    if (pick(rng, 0, 1) == 1) {
      a.cache_capacity_frames = pick_one({frames}, {6, 0, -1});
      a.cache_frames = pick_one({frames, frames + 2, frames + 6}, {3, 0, -3, frames + 1});
    }
  }
  return pp;
}

// What a Monarch backward entry point answers for a problem that check_attention (Monarch rules)
// answered with `check`: the same, except that it runs one iteration only.
inline Status monarch_backward_verdict(const Status& check, const AttentionParams& p) {
  if (check.ok() && p.num_iters != 1) {
    return Status::unsupported("num_iters = " + std::to_string(p.num_iters) +
                               ": the Monarch backward pass supports num_iters = 1 only");
  }
  return check;
}

}  // namespace test
}  // namespace monarchrt
