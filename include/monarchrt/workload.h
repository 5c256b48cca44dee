// A seeded synthetic video-attention workload with the structure MonarchRT describes for video
// DiTs: (1) periodic positional attention from 3D rotary positions (queries and keys share a
// per-head base vector rotated by the token's frame/row/column angles, so q.k depends on the
// offset between tokens through cosines of many frequencies), (2) sparse semantic matches (a few
// drifting rectangular objects, covering a few percent of the tokens, carry object embeddings and
// attend to each other across the whole video), (3) Gaussian noise. Values are Gaussian. Deterministic for a seed on
// every platform (own generator, no std:: distributions).
#pragma once

#include <cstdint>
#include <vector>

#include "monarchrt/layout.h"
#include "monarchrt/status.h"

namespace monarchrt {

struct SyntheticWorkload {
  VideoGrid grid{6, 30, 52};
  int64_t batch = 1;
  int64_t heads = 2;
  int64_t head_dim = 128;
  uint64_t seed = 0;
  double positional = 1.0;   // amplitude of the rotary positional component
  double semantic = 1.0;     // amplitude of the object embeddings
  int64_t objects = 8;       // objects per head, each with its own embedding
  double object_size = 0.1;  // largest half-extent of an object, as a fraction of h and of w
  double noise = 0.5;        // standard deviation of the noise added to q and k
};

// Fills q, k, v as contiguous fp32 [batch, tokens, heads, head_dim] arrays.
Status make_synthetic_workload(const SyntheticWorkload& spec, std::vector<float>* q,
                               std::vector<float>* k, std::vector<float>* v);

// Splitmix64-seeded xoshiro256** with Box-Muller normals: the project's portable RNG.
class Rng {
 public:
  explicit Rng(uint64_t seed);
  uint64_t next();
  double uniform();  // [0, 1)
  double normal();   // N(0, 1)

 private:
  uint64_t s_[4];
  bool have_spare_ = false;
  double spare_ = 0.0;
};

}  // namespace monarchrt
