// fp64 reference of dense softmax attention and of oracle top-k attention. Deliberately naive:
// one query at a time over every allowed key. Never optimize this file; it is the yardstick.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "../core/plan.h"

namespace monarchrt {
namespace ref {

namespace {

// Shared body: density <= 0 means dense (keep every allowed key).
Status attention(const TensorView& q, const TensorView& k, const TensorView& v,
                 const TensorView& out, const AttentionParams& params, double density) {
  AttentionPlan p;
  MONARCHRT_RETURN_IF_ERROR(make_plan(q, k, v, out, params, false, Device::kCPU, &p));
  const int64_t D = p.D;
  std::vector<double> Q(p.Sq * D), K(p.Skv * D), V(p.Skv * D), O(p.Sq * D);
  const std::vector<int64_t> krows = key_rows(p, nullptr);
  const int64_t* kr = krows.empty() ? nullptr : krows.data();
  std::vector<double> z;
  std::vector<int64_t> keys;
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t h = 0; h < p.H; ++h) {
      gather_head(q, b, h, nullptr, Q.data());
      gather_rows(k, b, h, kr, p.Skv, K.data());
      gather_rows(v, b, h, kr, p.Skv, V.data());
      for (int64_t i = 0; i < p.Sq; ++i) {
        keys.clear();
        z.clear();
        for (int64_t j = 0; j < p.Skv; ++j) {
          if (!p.frame_allowed(p.q_frame(i), p.k_frame(j))) continue;
          double dot = 0.0;
          for (int64_t d = 0; d < D; ++d) dot += Q[i * D + d] * K[j * D + d];
          keys.push_back(j);
          z.push_back(p.scale * dot);
        }
        std::vector<size_t> order(keys.size());
        std::iota(order.begin(), order.end(), size_t{0});
        size_t keep = keys.size();
        if (density > 0.0) {
          keep = static_cast<size_t>(std::ceil(density * static_cast<double>(keys.size()) - 1e-9));
          keep = std::max<size_t>(1, std::min(keep, keys.size()));
          // Highest scores first; ties go to the lower key index so the choice is deterministic.
          std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t c) { return z[a] > z[c]; });
        }
        double zmax = -INFINITY;
        for (size_t r = 0; r < keep; ++r) zmax = std::max(zmax, z[order[r]]);
        double sum = 0.0;
        std::vector<double> acc(D, 0.0);
        for (size_t r = 0; r < keep; ++r) {
          const double e = std::exp(z[order[r]] - zmax);
          sum += e;
          const double* vr = &V[keys[order[r]] * D];
          for (int64_t d = 0; d < D; ++d) acc[d] += e * vr[d];
        }
        for (int64_t d = 0; d < D; ++d) O[i * D + d] = acc[d] / sum;
      }
      scatter_head(out, b, h, nullptr, O.data());
    }
  }
  return Status();
}

}  // namespace

Status dense_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& out, const AttentionParams& params) {
  return attention(q, k, v, out, params, 0.0);
}

Status topk_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& out, const AttentionParams& params, double density) {
  if (!(density > 0.0 && density <= 1.0)) {
    return Status::invalid("density = " + std::to_string(density) + " must be in (0, 1]");
  }
  return attention(q, k, v, out, params, density);
}

}  // namespace ref
}  // namespace monarchrt
