// Helpers shared by the engine tests (test_wan.cpp, test_wan_cuda.cpp, test_cli.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "monarchrt/wan.h"
#include "monarchrt/workload.h"

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

}  // namespace test
}  // namespace monarchrt
