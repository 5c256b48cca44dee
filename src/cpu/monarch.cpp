// Fast fp32 CPU Monarch attention. One task per (query tile m) of a head: stage 1 runs over
// every allowed key row (n, k) and keeps aL, Y, cL of the tile in a task-local buffer laid out
// column-major in j ([j][n*b1 + k][D]) so that stage 2, which works one query column j at a
// time, reads them contiguously. Both stages are small matrix products (kernels.h). With
// num_iters > 1 the stage-2 probabilities L are kept too ([j][n*b1 + k][l]) to form the next
// iteration's aR and cR. Same math as src/ref/monarch.cpp.
#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <vector>

#include "../core/plan.h"
#include "../core/threads.h"
#include "kernels.h"

namespace monarchrt {
namespace cpu {

namespace {

struct TileBuffers {
  std::vector<float> aL, Y, cL, L, aR, AT, ZT, QT, UT, colv;
};

// Buffers handed from task to task (at most one per running thread), so that a task does not
// fault in tens of MB of fresh pages for its aL / Y (17-20% of the time of a 21-frame head on
// the 2-core development machine).
class BufferPool {
 public:
  std::unique_ptr<TileBuffers> take() {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.empty()) return std::make_unique<TileBuffers>();
    std::unique_ptr<TileBuffers> b = std::move(free_.back());
    free_.pop_back();
    return b;
  }
  void give(std::unique_ptr<TileBuffers> b) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(std::move(b));
  }

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<TileBuffers>> free_;
};

// Stage 1 runs as small matrix products per key row (n, k) with the b2 keys as rows: Z^T = K aR^T
// (b2 x b2, the query columns j contiguous), the softmax of each column j in place (R^T), then
// aL = R K and Y = R V (b2 x D). Stage 2, per query column j: U^T = aL_j Q_j^T (rows x b1, the
// queries l contiguous), the softmax of each query's column, then O_j = softmax(U) Y_j.
// Lt (optional): each query's stage-2 log-sum-exp of the last iteration, in tile order like Ot.
void monarch_tile(const AttentionPlan& p, const float* Qt, const float* Kt, const float* Vt,
                  float* Ot, float* Lt, int64_t m, TileBuffers& tb) {
  const int64_t D = p.D, b1 = p.qg.b1, b2 = p.qg.b2;
  const float s = static_cast<float>(p.scale);
  std::vector<int64_t> keys;
  for (int64_t n = 0; n < p.kg.tiles; ++n)
    if (p.tile_allowed(m, n)) keys.push_back(n);
  const int64_t N = static_cast<int64_t>(keys.size()), rows = N * b1;
  // aR^T and Q_j^T get columns up to a multiple of 16 (zeros past b2 / b1): whole register blocks.
  const int64_t b2p = (b2 + 15) / 16 * 16, b1p = (b1 + 15) / 16 * 16;
  tb.aL.resize(b2 * rows * D);
  tb.Y.resize(b2 * rows * D);
  tb.cL.resize(b2 * rows);
  tb.aR.resize(b2 * D);
  tb.AT.assign(D * b2p, 0.0f);
  tb.ZT.resize(b2 * b2p);
  tb.QT.assign(D * b1p, 0.0f);
  tb.UT.resize(rows * b1p);
  tb.colv.resize(6 * std::max(b1p, b2p));
  float* scale = tb.colv.data();
  float* lse = scale + std::max(b1p, b2p);
  float* neg_entropy = lse + std::max(b1p, b2p);
  float* work = neg_entropy + std::max(b1p, b2p);
  if (p.num_iters > 1) tb.L.resize(b2 * rows * b1);
  const float* Qm = Qt + m * b1 * b2 * D;  // query (l, j) at Qm + (l * b2 + j) * D

  for (int it = 0; it < p.num_iters; ++it) {
    const bool last = it + 1 == p.num_iters;
    // Stage 1 for every allowed key row (n, k), all query columns j at once.
    for (int64_t k = 0; k < b1; ++k) {
      for (int64_t ni = 0; ni < N; ++ni) {
        const int64_t r = ni * b1 + k;
        const float* Krow = Kt + (keys[ni] * b1 + k) * b2 * D;  // b2 keys, contiguous
        const float* Vrow = Vt + (keys[ni] * b1 + k) * b2 * D;
        // Proxies aR_j: the query of row k itself on iteration 1 (transposed once per k), the
        // L-weighted mean after.
        for (int64_t j = 0; j < b2p; ++j) scale[j] = j < b2 ? s : 0.0f;
        if (it > 0 || ni == 0) {
          const float* aR = Qm + k * b2 * D;
          if (it > 0) {
            std::fill(tb.aR.begin(), tb.aR.end(), 0.0f);
            for (int64_t j = 0; j < b2; ++j) {
              const float* Lrow = &tb.L[(j * rows + r) * b1];
              float cR = 0.0f;
              for (int64_t l = 0; l < b1; ++l) {
                cR += Lrow[l];
                axpy(Lrow[l], Qm + (l * b2 + j) * D, &tb.aR[j * D], D);
              }
              scale[j] = s * std::min(1.0f / (cR + 1e-6f), 1e4f);
            }
            aR = tb.aR.data();
          }
          for (int64_t j = 0; j < b2; ++j)
            for (int64_t d = 0; d < D; ++d) tb.AT[d * b2p + j] = aR[j * D + d];
        }
        // Row j of aL / Y goes to [j][r][D]: row pitch rows * D.
        monarch_stage1_row(Krow, Vrow, tb.AT.data(), b2, b2p, D, scale, tb.ZT.data(), lse, neg_entropy, nullptr,
                           &tb.aL[r * D], last ? &tb.Y[r * D] : nullptr, rows * D, work);
        for (int64_t j = 0; j < b2; ++j) tb.cL[j * rows + r] = neg_entropy[j];
      }
    }
    // Stage 2, one query column j at a time: softmax over all allowed rows (n, k).
    for (int64_t j = 0; j < b2; ++j) {
      monarch_stage2_probabilities(&tb.aL[j * rows * D], &tb.cL[j * rows], Qm, j, rows, b1, b1p, b2, D, s,
                                   tb.QT.data(), tb.UT.data(), lse, work);
      if (!last) {
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t l = 0; l < b1; ++l) tb.L[(j * rows + r) * b1 + l] = tb.UT[r * b1p + l];
      } else {  // output rows l of column j: pitch b2 * D; P[l][r] = U^T[r][l]
        gemm(b1, D, rows, tb.UT.data(), 1, b1p, &tb.Y[j * rows * D], D, Ot + (m * b1 * b2 + j) * D, b2 * D, false);
        if (Lt != nullptr) {
          for (int64_t l = 0; l < b1; ++l) Lt[(m * b1 + l) * b2 + j] = lse[l];
        }
      }
    }
  }
}

}  // namespace

namespace {

Status forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out, float* lse,
               const AttentionParams& params) {
  AttentionPlan p;
  MONARCHRT_RETURN_IF_ERROR(make_plan(q, k, v, out, params, true, Device::kCPU, &p));
  return guard_allocation([&]() {
    const std::vector<int64_t> qperm = tile_order_permutation(p.qg);
    const std::vector<int64_t> kperm = tile_order_permutation(p.kg);
    std::vector<float> Q(p.Sq * p.D), K(p.Skv * p.D), V(p.Skv * p.D), O(p.Sq * p.D), Lse(lse ? p.Sq : 0);
    const std::vector<int64_t> krows = key_rows(p, &kperm);
    BufferPool pool;
    for (int64_t b = 0; b < p.B; ++b) {
      for (int64_t h = 0; h < p.H; ++h) {
        gather_head(q, b, h, qperm.data(), Q.data());
        gather_rows(k, b, h, krows.data(), p.Skv, K.data());
        gather_rows(v, b, h, krows.data(), p.Skv, V.data());
        parallel_for(p.qg.tiles, [&](int64_t m) {
          std::unique_ptr<TileBuffers> tb = pool.take();
          monarch_tile(p, Q.data(), K.data(), V.data(), O.data(), lse ? Lse.data() : nullptr, m, *tb);
          pool.give(std::move(tb));
        });
        scatter_head(out, b, h, qperm.data(), O.data());
        if (lse != nullptr) {
          float* dst = lse + (b * p.H + h) * p.Sq;
          for (int64_t i = 0; i < p.Sq; ++i) dst[qperm[i]] = Lse[i];
        }
      }
    }
    return Status();
  });
}

}  // namespace

Status monarch_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                         const TensorView& out, const AttentionParams& params) {
  return forward(q, k, v, out, nullptr, params);
}

Status monarch_attention_with_lse(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& out, float* lse, const AttentionParams& params) {
  if (lse == nullptr) return Status::invalid("lse: must point to B * H * q.tokens() floats");
  return forward(q, k, v, out, lse, params);
}

}  // namespace cpu
}  // namespace monarchrt
