// Fast fp32 CPU dense attention (flash-style: blocks of queries against blocks of keys with an
// online softmax, so K and V stream through cache once per query block) and oracle top-k
// attention (full score rows, nth_element, softmax over the kept keys).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "../core/plan.h"
#include "../core/threads.h"
#include "kernels.h"

namespace monarchrt {
namespace cpu {

namespace {

constexpr int64_t kQueryBlock = 32;  // queries per task (one frame never splits a block)
constexpr int64_t kKeyBlock = 128;   // keys per online-softmax step

struct HeadBuffers {
  std::vector<float> Q, K, KT, V, O;  // KT: K transposed, [D][Skv]
};

// Query blocks of (b, h): blocks never straddle a frame, so all queries of a block share the
// same allowed key frames.
struct QueryBlock {
  int64_t begin, end;
};

std::vector<QueryBlock> query_blocks(const AttentionPlan& p) {
  std::vector<QueryBlock> blocks;
  const int64_t per_frame = p.q_grid.tokens_per_frame();
  for (int64_t f = 0; f < p.q_grid.T; ++f)
    for (int64_t s = 0; s < per_frame; s += kQueryBlock)
      blocks.push_back({f * per_frame + s, f * per_frame + std::min(s + kQueryBlock, per_frame)});
  return blocks;
}

// Per key block: Z = Q_blk K_blk^T (matrix product against K^T), the online softmax along each
// query's row, acc = acc * correction + P V_blk (matrix product).
void dense_block(const AttentionPlan& p, const HeadBuffers& hb, const QueryBlock& qb, float* O) {
  const int64_t D = p.D, nq = qb.end - qb.begin, per_frame = p.k_grid.tokens_per_frame();
  const float s = static_cast<float>(p.scale);
  std::vector<float> acc(nq * D, 0.0f), row_max(nq, -INFINITY), row_sum(nq, 0.0f);
  std::vector<float> z(nq * kKeyBlock);
  const float* Qb = &hb.Q[qb.begin * D];
  const int64_t qf = p.q_frame(qb.begin);
  for (int64_t kf = 0; kf < p.k_grid.T; ++kf) {
    if (!p.frame_allowed(qf, kf)) continue;
    for (int64_t k0 = kf * per_frame; k0 < (kf + 1) * per_frame; k0 += kKeyBlock) {
      const int64_t nk = std::min(kKeyBlock, (kf + 1) * per_frame - k0);
      gemm(nq, nk, D, Qb, D, 1, &hb.KT[k0], p.Skv, z.data(), kKeyBlock, false);
      for (int64_t i = 0; i < nq; ++i) {
        float* zi = &z[i * kKeyBlock];
        float m = row_max[i];
        for (int64_t j = 0; j < nk; ++j) {
          zi[j] *= s;
          m = std::max(m, zi[j]);
        }
        const float correction = exp_nonpositive(row_max[i] - m);  // exp(-inf) = 0 on the first block
        row_max[i] = m;
        scale_in_place(correction, &acc[i * D], D);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < nk; ++j) {
          zi[j] = exp_nonpositive(zi[j] - m);
          sum += zi[j];
        }
        row_sum[i] = row_sum[i] * correction + sum;
      }
      gemm(nq, D, nk, z.data(), kKeyBlock, 1, &hb.V[k0 * D], D, acc.data(), D, true);
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    const float inv = 1.0f / row_sum[i];
    for (int64_t d = 0; d < D; ++d) O[(qb.begin + i) * D + d] = acc[i * D + d] * inv;
  }
}

void topk_block(const AttentionPlan& p, const HeadBuffers& hb, const QueryBlock& qb,
                double density, float* O) {
  const int64_t D = p.D, per_frame = p.k_grid.tokens_per_frame();
  const float s = static_cast<float>(p.scale);
  const int64_t qf = p.q_frame(qb.begin);
  std::vector<int64_t> keys;
  for (int64_t kf = 0; kf < p.k_grid.T; ++kf)
    if (p.frame_allowed(qf, kf))
      for (int64_t t = kf * per_frame; t < (kf + 1) * per_frame; ++t) keys.push_back(t);
  const int64_t n = static_cast<int64_t>(keys.size());
  int64_t keep = static_cast<int64_t>(std::ceil(density * static_cast<double>(n) - 1e-9));
  keep = std::max<int64_t>(1, std::min(keep, n));
  std::vector<float> z(n);
  std::vector<int32_t> order(n);
  for (int64_t i = qb.begin; i < qb.end; ++i) {
    const float* qi = &hb.Q[i * D];
    for (int64_t r = 0; r < n; ++r) z[r] = s * dot(qi, &hb.K[keys[r] * D], D);
    std::iota(order.begin(), order.end(), 0);
    std::nth_element(order.begin(), order.begin() + (keep - 1), order.end(), [&](int32_t a, int32_t c) {
      return z[a] > z[c] || (z[a] == z[c] && a < c);
    });
    float m = -INFINITY;
    for (int64_t r = 0; r < keep; ++r) m = std::max(m, z[order[r]]);
    float sum = 0.0f;
    float* o = &O[i * D];
    std::fill(o, o + D, 0.0f);
    for (int64_t r = 0; r < keep; ++r) {
      const float e = std::exp(z[order[r]] - m);
      sum += e;
      axpy(e, &hb.V[keys[order[r]] * D], o, D);
    }
    scale_in_place(1.0f / sum, o, D);
  }
}

Status run(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
           const AttentionParams& params, double density) {
  AttentionPlan p;
  MONARCHRT_RETURN_IF_ERROR(make_plan(q, k, v, out, params, false, Device::kCPU, &p));
  return guard_allocation([&]() {
    const std::vector<QueryBlock> blocks = query_blocks(p);
    HeadBuffers hb;
    hb.Q.resize(p.Sq * p.D);
    const std::vector<int64_t> krows = key_rows(p, nullptr);
    const int64_t* kr = krows.empty() ? nullptr : krows.data();
    hb.K.resize(p.Skv * p.D);
    if (density == 0.0) hb.KT.resize(p.Skv * p.D);
    hb.V.resize(p.Skv * p.D);
    hb.O.resize(p.Sq * p.D);
    for (int64_t b = 0; b < p.B; ++b) {
      for (int64_t h = 0; h < p.H; ++h) {
        gather_head(q, b, h, nullptr, hb.Q.data());
        gather_rows(k, b, h, kr, p.Skv, hb.K.data());
        gather_rows(v, b, h, kr, p.Skv, hb.V.data());
        if (density == 0.0) {
          for (int64_t t = 0; t < p.Skv; ++t)
            for (int64_t d = 0; d < p.D; ++d) hb.KT[d * p.Skv + t] = hb.K[t * p.D + d];
        }
        parallel_for(static_cast<int64_t>(blocks.size()), [&](int64_t t) {
          if (density > 0.0) {
            topk_block(p, hb, blocks[t], density, hb.O.data());
          } else {
            dense_block(p, hb, blocks[t], hb.O.data());
          }
        });
        scatter_head(out, b, h, nullptr, hb.O.data());
      }
    }
    return Status();
  });
}

}  // namespace

Status dense_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& out, const AttentionParams& params) {
  return run(q, k, v, out, params, 0.0);
}

Status topk_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& out, const AttentionParams& params, double density) {
  if (!(density > 0.0 && density <= 1.0)) {
    return Status::invalid("density = " + std::to_string(density) + " must be in (0, 1]");
  }
  return run(q, k, v, out, params, density);
}

}  // namespace cpu
}  // namespace monarchrt
