// Helpers shared by the engine tests (test_wan.cpp, test_wan_cuda.cpp, test_cli.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "monarchrt/wan.h"
#include "monarchrt/workload.h"
#include "random_problem.h"

namespace monarchrt {
namespace test {

// The tiny model of the engine tests: head dim 12, the smallest that 3D RoPE allows.
inline WanConfig tiny_wan_config() {
  WanConfig c;
  c.dim = 24;
  c.num_heads = 2;
  c.num_layers = 2;
  c.ffn_dim = 40;
  c.freq_dim = 8;
  c.text_dim = 20;
  c.text_len = 5;
  c.in_dim = c.out_dim = 4;
  return c;
}

// n standard normal draws.
inline std::vector<float> normals(int64_t n, Rng& rng) {
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = float(rng.normal());
  return x;
}

// A run of `frames` frames of Hl x Wl latents, batch B, Monarch or dense self-attention.
inline WanRunConfig test_run(int64_t B, int64_t frames, int64_t Hl, int64_t Wl, bool monarch) {
  WanRunConfig run;
  run.batch = B;
  run.latent_h = Hl;
  run.latent_w = Wl;
  run.max_frames = frames;
  run.monarch = monarch;
  return run;
}

// Run settings for the run-check tests (test_wan.cpp, test_wan_cuda.cpp), in chunks of 3 frames:
// self-attention kind, tiling, sink, window, frames and iterations.
struct RunSettings {
  bool monarch = true;
  MonarchLayout layout;
  int64_t sink = 0, window = 0, frames = 6;
  int num_iters = 1;

  WanRunConfig run(int64_t Hl, int64_t Wl) const {
    WanRunConfig r = test_run(1, frames, Hl, Wl, monarch);
    r.layout = layout;
    r.sink_frames = sink;
    r.window_frames = window;
    r.num_iters = num_iters;
    return r;
  }
  std::string to_string() const {
    return std::string(monarch ? "monarch " : "dense ") + layout.to_string() + " sink " + std::to_string(sink) +
           " window " + std::to_string(window) + " frames " + std::to_string(frames) + " iters " +
           std::to_string(num_iters);
  }
};

// Random settings, a mix of ones the engines accept and ones they must refuse (about a third
// accepted on a 2 x 3 or 4 x 6 token grid).
inline RunSettings random_run_settings(Rng& rng) {
  RunSettings k;
  k.monarch = pick(rng, 0, 1) == 1;
  k.layout = MonarchLayout{pick(rng, 1, 3), pick(rng, 1, 3), pick(rng, 1, 4)};
  k.sink = pick(rng, -1, 4);
  k.window = pick(rng, -1, 7);
  k.frames = 3 * pick(rng, 1, 4);
  k.num_iters = int(pick(rng, 1, 2));
  return k;
}

}  // namespace test
}  // namespace monarchrt
