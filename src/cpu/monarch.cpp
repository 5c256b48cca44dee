// Fast fp32 CPU Monarch attention. One task per (query tile m) of a head: stage 1 runs over
// every allowed key row (n, k) and keeps aL, Y, cL of the tile in a task-local buffer laid out
// column-major in j ([j][n*b1 + k][D]) so that stage 2, which works one query column j at a
// time, reads them contiguously. With num_iters > 1 the stage-2 probabilities L are kept too
// ([j][n*b1 + k][l]) to form the next iteration's aR and cR. Same math as src/ref/monarch.cpp.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../core/plan.h"
#include "../core/threads.h"
#include "kernels.h"

namespace monarchrt {
namespace cpu {

namespace {

struct TileBuffers {
  std::vector<float> aL, Y, cL, L, u, z, aR;
};

void monarch_tile(const AttentionPlan& p, const float* Qt, const float* Kt, const float* Vt,
                  float* Ot, int64_t m, TileBuffers& tb) {
  const int64_t D = p.D, b1 = p.qg.b1, b2 = p.qg.b2;
  const float s = static_cast<float>(p.scale);
  std::vector<int64_t> keys;
  for (int64_t n = 0; n < p.kg.tiles; ++n)
    if (p.tile_allowed(m, n)) keys.push_back(n);
  const int64_t N = static_cast<int64_t>(keys.size()), rows = N * b1;
  tb.aL.resize(b2 * rows * D);
  tb.Y.resize(b2 * rows * D);
  tb.cL.resize(b2 * rows);
  tb.u.resize(rows);
  tb.z.resize(b2 * b2);
  tb.aR.resize(b2 * D);
  if (p.num_iters > 1) tb.L.resize(b2 * rows * b1);
  const float* Qm = Qt + m * b1 * b2 * D;  // query (l, j) at Qm + (l * b2 + j) * D

  for (int it = 0; it < p.num_iters; ++it) {
    const bool last = it + 1 == p.num_iters;
    // Stage 1 for every allowed key row (n, k), all query columns j at once.
    for (int64_t ni = 0; ni < N; ++ni) {
      for (int64_t k = 0; k < b1; ++k) {
        const int64_t r = ni * b1 + k;
        const float* Krow = Kt + (keys[ni] * b1 + k) * b2 * D;  // b2 keys, contiguous
        const float* Vrow = Vt + (keys[ni] * b1 + k) * b2 * D;
        // Proxies aR_j: the query of row k itself on iteration 1, the L-weighted mean after.
        const float* aR = Qm + k * b2 * D;
        std::vector<float> inv_cR(b2, 1.0f);
        if (it > 0) {
          std::fill(tb.aR.begin(), tb.aR.end(), 0.0f);
          for (int64_t j = 0; j < b2; ++j) {
            const float* Lrow = &tb.L[(j * rows + r) * b1];
            float cR = 0.0f;
            for (int64_t l = 0; l < b1; ++l) {
              cR += Lrow[l];
              axpy(Lrow[l], Qm + (l * b2 + j) * D, &tb.aR[j * D], D);
            }
            inv_cR[j] = std::min(1.0f / (cR + 1e-6f), 1e4f);
          }
          aR = tb.aR.data();
        }
        for (int64_t j = 0; j < b2; ++j) {
          float* zj = &tb.z[j * b2];
          const float f = s * inv_cR[j];
          for (int64_t i = 0; i < b2; ++i) zj[i] = f * dot(aR + j * D, Krow + i * D, D);
          float zmax = -INFINITY;
          for (int64_t i = 0; i < b2; ++i) zmax = std::max(zmax, zj[i]);
          float sum = 0.0f;
          for (int64_t i = 0; i < b2; ++i) sum += std::exp(zj[i] - zmax);
          const float lse = zmax + std::log(sum);
          float c = 0.0f;
          float* aLj = &tb.aL[(j * rows + r) * D];
          float* Yj = &tb.Y[(j * rows + r) * D];
          std::fill(aLj, aLj + D, 0.0f);
          if (last) std::fill(Yj, Yj + D, 0.0f);
          for (int64_t i = 0; i < b2; ++i) {
            const float R = std::exp(zj[i] - lse);
            c += R * (zj[i] - lse);  // never log of an underflowed probability
            axpy(R, Krow + i * D, aLj, D);
            if (last) axpy(R, Vrow + i * D, Yj, D);
          }
          tb.cL[j * rows + r] = c;
        }
      }
    }
    // Stage 2, one query column j at a time: softmax over all allowed rows (n, k).
    for (int64_t j = 0; j < b2; ++j) {
      const float* aLj = &tb.aL[j * rows * D];
      const float* cLj = &tb.cL[j * rows];
      for (int64_t l = 0; l < b1; ++l) {
        const float* ql = Qm + (l * b2 + j) * D;
        for (int64_t r = 0; r < rows; ++r) tb.u[r] = s * dot(ql, aLj + r * D, D) - cLj[r];
        softmax_in_place(tb.u.data(), rows);
        if (!last) {
          for (int64_t r = 0; r < rows; ++r) tb.L[(j * rows + r) * b1 + l] = tb.u[r];
        } else {
          float* o = Ot + ((m * b1 + l) * b2 + j) * D;
          std::fill(o, o + D, 0.0f);
          const float* Yj = &tb.Y[j * rows * D];
          for (int64_t r = 0; r < rows; ++r) axpy(tb.u[r], Yj + r * D, o, D);
        }
      }
    }
  }
}

}  // namespace

Status monarch_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                         const TensorView& out, const AttentionParams& params) {
  AttentionPlan p;
  MONARCHRT_RETURN_IF_ERROR(make_plan(q, k, v, out, params, true, Device::kCPU, &p));
  return guard_allocation([&]() {
    const std::vector<int64_t> qperm = tile_order_permutation(p.qg);
    const std::vector<int64_t> kperm = tile_order_permutation(p.kg);
    std::vector<float> Q(p.Sq * p.D), K(p.Skv * p.D), V(p.Skv * p.D), O(p.Sq * p.D);
    const std::vector<int64_t> krows = key_rows(p, &kperm);
    for (int64_t b = 0; b < p.B; ++b) {
      for (int64_t h = 0; h < p.H; ++h) {
        gather_head(q, b, h, qperm.data(), Q.data());
        gather_rows(k, b, h, krows.data(), p.Skv, K.data());
        gather_rows(v, b, h, krows.data(), p.Skv, V.data());
        parallel_for(p.qg.tiles, [&](int64_t m) {
          TileBuffers tb;
          monarch_tile(p, Q.data(), K.data(), V.data(), O.data(), m, tb);
        });
        scatter_head(out, b, h, qperm.data(), O.data());
      }
    }
    return Status();
  });
}

}  // namespace cpu
}  // namespace monarchrt
