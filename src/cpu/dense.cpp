// Fast fp32 CPU dense attention (flash-style: blocks of queries against blocks of keys with an
// online softmax, so K and V stream through cache once per query block) and oracle top-k
// attention (full score rows, nth_element, softmax over the kept keys).
#include <algorithm>
#include <cmath>
#include <functional>
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

// Oracle top-k for a query block: the score rows Z = Q_blk K^T over every allowed key (matrix
// products against K^T, one per run of allowed frames), per row the `keep` largest scores
// (nth_element, ties to the lower key), their softmax written into the row (zero elsewhere), then
// O_blk = P V (matrix products again).
void topk_block(const AttentionPlan& p, const HeadBuffers& hb, const QueryBlock& qb,
                double density, float* O) {
  const int64_t D = p.D, nq = qb.end - qb.begin, per_frame = p.k_grid.tokens_per_frame();
  const float s = static_cast<float>(p.scale);
  const int64_t qf = p.q_frame(qb.begin);
  std::vector<QueryBlock> runs;  // allowed key tokens [begin, end), whole frames
  for (int64_t kf = 0; kf < p.k_grid.T; ++kf) {
    if (!p.frame_allowed(qf, kf)) continue;
    if (!runs.empty() && runs.back().end == kf * per_frame) {
      runs.back().end += per_frame;
    } else {
      runs.push_back({kf * per_frame, (kf + 1) * per_frame});
    }
  }
  int64_t n = 0;
  for (const QueryBlock& r : runs) n += r.end - r.begin;
  int64_t keep = static_cast<int64_t>(std::ceil(density * static_cast<double>(n) - 1e-9));
  keep = std::max<int64_t>(1, std::min(keep, n));
  std::vector<float> Z(nq * n);
  const float* Qb = &hb.Q[qb.begin * D];
  int64_t c = 0;  // column of Z where the run starts
  for (const QueryBlock& r : runs) {
    gemm(nq, r.end - r.begin, D, Qb, D, 1, &hb.KT[r.begin], p.Skv, &Z[c], n, false);
    c += r.end - r.begin;
  }
  std::vector<float> vals(n);
  for (int64_t i = 0; i < nq; ++i) {
    float* z = &Z[i * n];
    scale_in_place(s, z, n);
    // The keep-th largest score, then the kept keys: every larger score, and of the scores equal
    // to it the lowest keys (the reference's order: larger score first, ties to the lower key).
    std::copy(z, z + n, vals.begin());
    std::nth_element(vals.begin(), vals.begin() + (keep - 1), vals.end(), std::greater<float>());
    const float thr = vals[keep - 1];
    int64_t ties = keep;
    float m = -INFINITY;
    for (int64_t r = 0; r < n; ++r) {
      if (z[r] > thr) --ties;
      m = std::max(m, z[r]);
    }
    for (int64_t r = 0; r < n; ++r) {
      const bool kept = z[r] > thr || (z[r] == thr && ties-- > 0);
      if (!kept) z[r] = -INFINITY;  // probability 0
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t r = 0; r < n; ++r) {
      z[r] = exp_nonpositive(z[r] - m);
      sum += z[r];
    }
    scale_in_place(1.0f / sum, z, n);
  }
  float* Ob = &O[qb.begin * D];
  c = 0;
  for (const QueryBlock& r : runs) {
    gemm(nq, D, r.end - r.begin, &Z[c], n, 1, &hb.V[r.begin * D], D, Ob, D, c > 0);
    c += r.end - r.begin;
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
    hb.KT.resize(p.Skv * p.D);
    hb.V.resize(p.Skv * p.D);
    hb.O.resize(p.Sq * p.D);
    for (int64_t b = 0; b < p.B; ++b) {
      for (int64_t h = 0; h < p.H; ++h) {
        gather_head(q, b, h, nullptr, hb.Q.data());
        gather_rows(k, b, h, kr, p.Skv, hb.K.data());
        gather_rows(v, b, h, kr, p.Skv, hb.V.data());
        for (int64_t t = 0; t < p.Skv; ++t)
          for (int64_t d = 0; d < p.D; ++d) hb.KT[d * p.Skv + t] = hb.K[t * p.D + d];
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
