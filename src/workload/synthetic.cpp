// The synthetic video-attention workload of workload.h and the portable RNG.
#include "monarchrt/workload.h"

#include <cmath>

namespace monarchrt {

Rng::Rng(uint64_t seed) {
  uint64_t x = seed;
  for (uint64_t& s : s_) {  // splitmix64
    x += 0x9e3779b97f4a7c15ull;
    uint64_t z = x;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    s = z ^ (z >> 31);
  }
}

uint64_t Rng::next() {
  auto rotl = [](uint64_t v, int r) { return (v << r) | (v >> (64 - r)); };
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

double Rng::uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

double Rng::normal() {
  if (have_spare_) {
    have_spare_ = false;
    return spare_;
  }
  double u1 = uniform();
  while (u1 <= 0.0) u1 = uniform();
  const double u2 = uniform();
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double pi2 = 6.283185307179586476925286766559;
  spare_ = r * std::sin(pi2 * u2);
  have_spare_ = true;
  return r * std::cos(pi2 * u2);
}

Status make_synthetic_workload(const SyntheticWorkload& spec, std::vector<float>* q,
                               std::vector<float>* k, std::vector<float>* v) {
  const VideoGrid& g = spec.grid;
  if (g.T <= 0 || g.h <= 0 || g.w <= 0) {
    return Status::invalid("grid: T, h and w must be positive, got " + g.to_string());
  }
  if (spec.batch <= 0 || spec.heads <= 0) return Status::invalid("batch and heads must be positive");
  if (spec.head_dim < 6 || spec.head_dim % 2 != 0) {
    return Status::invalid("head_dim = " + std::to_string(spec.head_dim) +
                           " must be even and at least 6 (three rotary axes)");
  }
  if (spec.objects <= 0) return Status::invalid("objects must be positive");
  if (!(spec.object_size >= 0.0 && spec.object_size <= 1.0)) {
    return Status::invalid("object_size must be in [0, 1]");
  }
  const int64_t D = spec.head_dim, S = g.tokens(), H = spec.heads, B = spec.batch;
  // Rotary split as in Wan: 2*(D/6) channels each for rows and columns, the rest for frames.
  const int64_t c_hw = 2 * (D / 6), c_t = D - 2 * c_hw;
  const int64_t pairs_t = c_t / 2, pairs_h = c_hw / 2;
  std::vector<double> freq(D / 2);
  std::vector<int> axis(D / 2);
  for (int64_t p = 0; p < D / 2; ++p) {
    int64_t i = p;
    int64_t width = c_t;
    axis[p] = 0;
    if (p >= pairs_t) {
      i = p - pairs_t;
      width = c_hw;
      axis[p] = 1;
      if (p >= pairs_t + pairs_h) {
        i = p - pairs_t - pairs_h;
        axis[p] = 2;
      }
    }
    freq[p] = std::pow(10000.0, -2.0 * static_cast<double>(i) / static_cast<double>(width));
  }
  // Amplitudes chosen so that logits s*q.k reach a few units: |u|^2 ~ D, s = 1/sqrt(D).
  const double a_pos = spec.positional * std::pow(static_cast<double>(D), -0.25) * 2.5;
  const double a_sem = spec.semantic * std::pow(static_cast<double>(D), -0.25) * 2.5;
  q->assign(static_cast<size_t>(B * S * H * D), 0.0f);
  k->assign(q->size(), 0.0f);
  v->assign(q->size(), 0.0f);
  Rng rng(spec.seed);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      std::vector<double> base(D), objects(spec.objects * D);
      for (double& x : base) x = rng.normal();
      for (double& x : objects) x = rng.normal();
      // Objects are rectangles of tokens that drift across frames (random centre, size and
      // velocity); a token inside one carries that object's embedding in q and k.
      struct Box { double cy, cx, ry, rx, vy, vx; };
      std::vector<Box> boxes(static_cast<size_t>(spec.objects));
      for (Box& o : boxes) {
        o.cy = rng.uniform() * g.h;
        o.cx = rng.uniform() * g.w;
        o.ry = 0.5 + rng.uniform() * spec.object_size * g.h;
        o.rx = 0.5 + rng.uniform() * spec.object_size * g.w;
        o.vy = 2.0 * rng.uniform() - 1.0;
        o.vx = 2.0 * rng.uniform() - 1.0;
      }
      for (int64_t s = 0; s < S; ++s) {
        const int64_t pos[3] = {s / (g.h * g.w), (s / g.w) % g.h, s % g.w};
        int64_t object = -1;
        for (int64_t o = 0; o < spec.objects && object < 0; ++o) {
          const Box& bx = boxes[static_cast<size_t>(o)];
          const double dy = pos[1] - (bx.cy + bx.vy * pos[0]), dx = pos[2] - (bx.cx + bx.vx * pos[0]);
          if (std::fabs(dy) <= bx.ry && std::fabs(dx) <= bx.rx) object = o;
        }
        const int64_t off = ((b * S + s) * H + h) * D;
        for (int64_t p = 0; p < D / 2; ++p) {
          const double angle = static_cast<double>(pos[axis[p]]) * freq[p];
          const double c = std::cos(angle), sn = std::sin(angle);
          const double x0 = base[2 * p], x1 = base[2 * p + 1];
          const double r0 = a_pos * (x0 * c - x1 * sn), r1 = a_pos * (x0 * sn + x1 * c);
          double sem0 = 0.0, sem1 = 0.0;
          if (object >= 0) {
            sem0 = a_sem * objects[object * D + 2 * p];
            sem1 = a_sem * objects[object * D + 2 * p + 1];
          }
          (*q)[off + 2 * p] = static_cast<float>(r0 + sem0 + spec.noise * rng.normal());
          (*q)[off + 2 * p + 1] = static_cast<float>(r1 + sem1 + spec.noise * rng.normal());
          (*k)[off + 2 * p] = static_cast<float>(r0 + sem0 + spec.noise * rng.normal());
          (*k)[off + 2 * p + 1] = static_cast<float>(r1 + sem1 + spec.noise * rng.normal());
        }
        for (int64_t d = 0; d < D; ++d) (*v)[off + d] = static_cast<float>(rng.normal());
      }
    }
  }
  return Status();
}

}  // namespace monarchrt
