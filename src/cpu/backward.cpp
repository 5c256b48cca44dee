// Fast fp32 CPU backward passes of dense attention and of one-iteration Monarch attention: the
// same gradients as src/ref/backward.cpp (whose comment derives them), with the forward
// intermediates recomputed instead of kept. Results are bitwise independent of the thread count:
// every gradient element is summed by one task in a fixed order, or, for Monarch dK/dV, from
// per-task buffers added in query-tile order.
//
// Monarch, per (batch, head), one task per query tile m (in waves of num_threads() tasks):
//  1. recompute stage 1 for every allowed key row r = (n, k), all query columns j at once (the
//     b2 keys of the row stay in cache): aL, Y, cL ([j][r][D], as in src/cpu/monarch.cpp) and
//     log R ([r][j][i]); every product of steps 1-3 is a cpu::gemm;
//  2. per query column j: recompute stage 2 (u, L) and differentiate it: dq[m,l,j] (stage-2
//     part), and daL, dY, dcL of the column, which overwrite aL, Y, cL in place (a column's aL
//     and Y are not needed once its dq is formed);
//  3. per key row r, all j: the stage-1 backward: dq[m,k,j] (stage-1 part) and the contributions
//     of tile m to dK, dV of the allowed key rows, in the task's own buffer ([r][i][D]); the
//     key rows' transposes K^T, V^T are formed once per head and shared by the tasks.
//  After each wave the task buffers are added into the head's dK, dV in increasing m, in
//  parallel over key tiles.
// Dense, per (batch, head), flash-style over query blocks of one frame and key blocks of one
// frame: a forward sweep per query block gives the row log-sum-exp and Delta = dO . O, a second
// sweep dq; then one task per key block recomputes P and dP against every allowed query block and
// sums dK, dV of its keys.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../core/plan.h"
#include "../core/threads.h"
#include "kernels.h"

namespace monarchrt {
namespace cpu {

namespace {

// ---- Monarch -------------------------------------------------------------------------------

struct MonarchTask {
  std::vector<int64_t> keys;      // allowed key tiles of the current query tile, increasing
  std::vector<float> aL, Y, cL;   // [j][r][D], [j][r][D], [j][r]; become daL, dY, dcL
  std::vector<float> lR;          // log R, [r][j][i]
  std::vector<float> gK, gV;      // contributions to dK, dV of the allowed key rows, [r][i][D]
  // Scratch: transposes (aR^T [D][b2p]; Q_j^T, dO_j^T [D][b1p]), stage-1 tiles
  // [b2][b2p] (Z^T, then dR and s dz; R), stage-2 tiles [rows][b1p] (U^T, G^T), dq rows, columns.
  std::vector<float> AT, QT, dOT, ZT, RR, UT, GT, dqacc, colv, DA, DY;
};

// The products run as cpu::gemm with the same orientations as the forward (src/cpu/monarch.cpp):
// stage 1 with the b2 keys of a row as rows, stage 2 with the column's rows (n, k) as rows.
// KTt, VTt: every key row's K^T and V^T, [row][D][b2p] with zero columns past b2.
void monarch_tile_backward(const AttentionPlan& p, const float* Qt, const float* Kt,
                           const float* Vt, const float* KTt, const float* VTt, const float* dOt,
                           float* dQt, int64_t m, MonarchTask& t) {
  const int64_t D = p.D, b1 = p.qg.b1, b2 = p.qg.b2;
  const int64_t b2p = (b2 + 15) / 16 * 16, b1p = (b1 + 15) / 16 * 16, wide = std::max(b1p, b2p);
  const float s = static_cast<float>(p.scale);
  t.keys.clear();
  for (int64_t n = 0; n < p.kg.tiles; ++n)
    if (p.tile_allowed(m, n)) t.keys.push_back(n);
  const int64_t N = static_cast<int64_t>(t.keys.size()), rows = N * b1;
  t.aL.resize(b2 * rows * D);
  t.Y.resize(b2 * rows * D);
  t.cL.resize(b2 * rows);
  t.lR.resize(rows * b2 * b2);
  t.gK.assign(rows * b2 * D, 0.0f);
  t.gV.assign(rows * b2 * D, 0.0f);
  t.AT.assign(D * b2p, 0.0f);
  t.QT.assign(D * b1p, 0.0f);
  t.dOT.assign(D * b1p, 0.0f);
  t.ZT.resize(b2 * b2p);
  t.RR.assign(b2 * b2p, 0.0f);
  t.UT.resize(rows * b1p);
  t.GT.resize(rows * b1p);
  t.dqacc.resize(b1 * D);
  t.DA.resize(b2 * D);
  t.DY.resize(b2 * D);
  t.colv.resize(6 * wide);
  float* scale = t.colv.data();  // per column of a tile: softmax scale, then stage 2's mean
  float* lse = scale + wide;
  float* neg_entropy = lse + wide;
  float* work = neg_entropy + wide;
  const float* Qm = Qt + m * b1 * b2 * D;  // query (l, j) at Qm + (l * b2 + j) * D
  const float* dOm = dOt + m * b1 * b2 * D;
  float* dQm = dQt + m * b1 * b2 * D;
  std::fill(dQm, dQm + b1 * b2 * D, 0.0f);

  // 1. Stage 1 for every allowed key row r = (n, k), all query columns j at once: Z^T = K q_k^T,
  //    R^T by columns (and log R), aL = R K, Y = R V.
  for (int64_t j = 0; j < b2p; ++j) scale[j] = j < b2 ? s : 0.0f;
  for (int64_t k = 0; k < b1; ++k) {
    for (int64_t j = 0; j < b2; ++j)
      for (int64_t d = 0; d < D; ++d) t.AT[d * b2p + j] = Qm[(k * b2 + j) * D + d];
    for (int64_t ni = 0; ni < N; ++ni) {
      const int64_t r = ni * b1 + k;
      const float* Krow = Kt + (t.keys[ni] * b1 + k) * b2 * D;
      const float* Vrow = Vt + (t.keys[ni] * b1 + k) * b2 * D;
      monarch_stage1_row(Krow, Vrow, t.AT.data(), b2, b2p, D, scale, t.ZT.data(), lse, neg_entropy,
                         &t.lR[r * b2 * b2], &t.aL[r * D], &t.Y[r * D], rows * D, work);
      for (int64_t j = 0; j < b2; ++j) t.cL[j * rows + r] = neg_entropy[j];
    }
  }

  // 2. Stage 2 and its backward, one query column j at a time, with the rows r as rows:
  //    U^T = aL_j Q_j^T, G^T = Y_j dO_j^T; L^T by columns; du = L (G - sum L G).
  for (int64_t j = 0; j < b2; ++j) {
    float* aLj = &t.aL[j * rows * D];
    float* Yj = &t.Y[j * rows * D];
    float* cLj = &t.cL[j * rows];
    for (int64_t l = 0; l < b1; ++l)
      for (int64_t d = 0; d < D; ++d) t.dOT[d * b1p + l] = dOm[(l * b2 + j) * D + d];
    gemm(rows, b1p, D, Yj, D, 1, t.dOT.data(), b1p, t.GT.data(), b1p, false);
    monarch_stage2_probabilities(aLj, cLj, Qm, j, rows, b1, b1p, b2, D, s, t.QT.data(), t.UT.data(), lse, work);
    float* mean = scale;
    for (int64_t l = 0; l < b1p; ++l) mean[l] = 0.0f;
    for (int64_t r = 0; r < rows; ++r) {
      const float* L = &t.UT[r * b1p];
      const float* g = &t.GT[r * b1p];
#pragma omp simd
      for (int64_t l = 0; l < b1p; ++l) mean[l] += L[l] * g[l];
    }
    // G^T becomes s du (the pad columns l >= b1 are zero); dcL = -sum_l du.
    for (int64_t r = 0; r < rows; ++r) {
      const float* L = &t.UT[r * b1p];
      float* g = &t.GT[r * b1p];
      float dc = 0.0f;
      for (int64_t l = 0; l < b1p; ++l) {
        const float du = l < b1 ? L[l] * (g[l] - mean[l]) : 0.0f;
        dc -= du;
        g[l] = s * du;
      }
      cLj[r] = dc;
    }
    // dq[l, j] += s sum_r du aL (before aL is overwritten), then daL = s du^T Q_j, dY = L^T dO_j.
    gemm(b1, D, rows, t.GT.data(), 1, b1p, aLj, D, t.dqacc.data(), D, false);
    for (int64_t l = 0; l < b1; ++l) axpy(1.0f, &t.dqacc[l * D], dQm + (l * b2 + j) * D, D);
    gemm(rows, D, b1, t.GT.data(), b1p, 1, Qm + j * D, b2 * D, aLj, D, false);
    gemm(rows, D, b1, t.UT.data(), b1p, 1, dOm + j * D, b2 * D, Yj, D, false);
  }

  // 3. Stage-1 backward per key row r, all columns j: dR = daL K^T + dY V^T + dcL log R,
  //    s dz = s R (dR - sum R dR); dq (stage-1 part) = s dz K; dK += R^T daL + s dz^T q_k,
  //    dV += R^T dY.
  for (int64_t ni = 0; ni < N; ++ni) {
    for (int64_t k = 0; k < b1; ++k) {
      const int64_t r = ni * b1 + k;
      const float* Krow = Kt + (t.keys[ni] * b1 + k) * b2 * D;
      const float* KTr = KTt + (t.keys[ni] * b1 + k) * D * b2p;
      const float* VTr = VTt + (t.keys[ni] * b1 + k) * D * b2p;
      float* gKr = &t.gK[r * b2 * D];
      float* gVr = &t.gV[r * b2 * D];
      // daL and dY of this row for all j, gathered from [j][r][D] (rows * D apart) once.
      for (int64_t j = 0; j < b2; ++j) {
        std::copy_n(&t.aL[(j * rows + r) * D], D, &t.DA[j * D]);
        std::copy_n(&t.Y[(j * rows + r) * D], D, &t.DY[j * D]);
      }
      gemm(b2, b2p, D, t.DA.data(), D, 1, KTr, b2p, t.ZT.data(), b2p, false);
      gemm(b2, b2p, D, t.DY.data(), D, 1, VTr, b2p, t.ZT.data(), b2p, true);
      for (int64_t j = 0; j < b2; ++j) {
        const float* lr = &t.lR[(r * b2 + j) * b2];
        const float dc = t.cL[j * rows + r];
        float* dr = &t.ZT[j * b2p];
        float* rr = &t.RR[j * b2p];
        float mean = 0.0f;
        for (int64_t i = 0; i < b2; ++i) {
          dr[i] += dc * lr[i];
          rr[i] = exp_nonpositive(lr[i]);
          mean += rr[i] * dr[i];
        }
        for (int64_t i = 0; i < b2p; ++i) dr[i] = i < b2 ? s * rr[i] * (dr[i] - mean) : 0.0f;
      }
      gemm(b2, D, b2, t.ZT.data(), b2p, 1, Krow, D, dQm + k * b2 * D, D, true);
      gemm(b2, D, b2, t.RR.data(), 1, b2p, t.DA.data(), D, gKr, D, true);
      gemm(b2, D, b2, t.ZT.data(), 1, b2p, Qm + k * b2 * D, D, gKr, D, true);
      gemm(b2, D, b2, t.RR.data(), 1, b2p, t.DY.data(), D, gVr, D, true);
    }
  }
}

Status monarch_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView& dout, const TensorView& dq, const TensorView& dk,
                        const TensorView& dv, const AttentionParams& params) {
  AttentionPlan p;
  MONARCHRT_RETURN_IF_ERROR(
      make_backward_plan(q, k, v, dout, dq, dk, dv, params, true, Device::kCPU, &p));
  return guard_allocation([&]() {
    const int64_t D = p.D, A = p.qg.tiles, F = p.kg.tiles, tile = p.kg.tile_tokens() * D;
    const int64_t Sk = k.tokens();  // rows of k, v, dk, dv (ring slots included)
    const std::vector<int64_t> qperm = tile_order_permutation(p.qg);
    const std::vector<int64_t> kperm = tile_order_permutation(p.kg);
    const std::vector<int64_t> krows = key_rows(p, &kperm);  // logical key (tile order) -> row
    std::vector<float> Q(p.Sq * D), dO(p.Sq * D), dQ(p.Sq * D), K(p.Skv * D), V(p.Skv * D);
    std::vector<float> gK(p.Skv * D), gV(p.Skv * D), dKrows(Sk * D), dVrows(Sk * D);
    const int64_t b2 = p.qg.b2, b2p = (b2 + 15) / 16 * 16, key_rows_n = F * p.qg.b1;
    std::vector<float> KT(key_rows_n * D * b2p, 0.0f), VT(key_rows_n * D * b2p, 0.0f);
    const int64_t wave = std::max<int64_t>(1, std::min<int64_t>(num_threads(), A));
    std::vector<MonarchTask> tasks(static_cast<size_t>(wave));
    std::vector<int64_t> slot_of(static_cast<size_t>(wave * F));  // [task][n] -> ni or -1
    for (int64_t b = 0; b < p.B; ++b) {
      for (int64_t h = 0; h < p.H; ++h) {
        gather_head(q, b, h, qperm.data(), Q.data());
        gather_head(dout, b, h, qperm.data(), dO.data());
        gather_rows(k, b, h, krows.data(), p.Skv, K.data());
        gather_rows(v, b, h, krows.data(), p.Skv, V.data());
        parallel_for(key_rows_n, [&](int64_t r) {  // K^T, V^T of key row r (pad columns stay zero)
          for (int64_t i = 0; i < b2; ++i) {
            for (int64_t d = 0; d < D; ++d) {
              KT[(r * D + d) * b2p + i] = K[(r * b2 + i) * D + d];
              VT[(r * D + d) * b2p + i] = V[(r * b2 + i) * D + d];
            }
          }
        });
        std::fill(gK.begin(), gK.end(), 0.0f);
        std::fill(gV.begin(), gV.end(), 0.0f);
        for (int64_t m0 = 0; m0 < A; m0 += wave) {
          const int64_t count = std::min(wave, A - m0);
          parallel_for(count, [&](int64_t w) {
            MonarchTask& t = tasks[static_cast<size_t>(w)];
            monarch_tile_backward(p, Q.data(), K.data(), V.data(), KT.data(), VT.data(), dO.data(), dQ.data(),
                                  m0 + w, t);
            int64_t* slots = &slot_of[static_cast<size_t>(w * F)];
            std::fill(slots, slots + F, -1);
            for (size_t ni = 0; ni < t.keys.size(); ++ni) slots[t.keys[ni]] = static_cast<int64_t>(ni);
          });
          // Add the wave's contributions in increasing query tile, in parallel over key tiles.
          parallel_for(F, [&](int64_t n) {
            for (int64_t w = 0; w < count; ++w) {
              const int64_t ni = slot_of[static_cast<size_t>(w * F + n)];
              if (ni < 0) continue;
              const MonarchTask& t = tasks[static_cast<size_t>(w)];
              axpy(1.0f, &t.gK[ni * tile], &gK[n * tile], tile);
              axpy(1.0f, &t.gV[ni * tile], &gV[n * tile], tile);
            }
          });
        }
        // Logical keys to rows of dk, dv: a permutation, or ring slots (an overwritten frame
        // shares its slot with a newer one and adds its exactly-zero gradient).
        std::fill(dKrows.begin(), dKrows.end(), 0.0f);
        std::fill(dVrows.begin(), dVrows.end(), 0.0f);
        for (int64_t tkn = 0; tkn < p.Skv; ++tkn) {
          const int64_t row = krows[static_cast<size_t>(tkn)];
          axpy(1.0f, &gK[tkn * D], &dKrows[row * D], D);
          axpy(1.0f, &gV[tkn * D], &dVrows[row * D], D);
        }
        scatter_head(dq, b, h, qperm.data(), dQ.data());
        scatter_head(dk, b, h, nullptr, dKrows.data());
        scatter_head(dv, b, h, nullptr, dVrows.data());
      }
    }
    return Status();
  });
}

// ---- dense ---------------------------------------------------------------------------------

constexpr int64_t kQueryBlock = 32;  // queries per block (never straddling a frame)
constexpr int64_t kKeyBlock = 64;    // keys per block (never straddling a frame)

struct Block {
  int64_t begin, end;
};

// Blocks of at most `size` tokens of a grid of `frames` frames, none straddling a frame.
std::vector<Block> frame_blocks(int64_t frames, int64_t per_frame, int64_t size) {
  std::vector<Block> blocks;
  for (int64_t f = 0; f < frames; ++f)
    for (int64_t s = 0; s < per_frame; s += size)
      blocks.push_back({f * per_frame + s, f * per_frame + std::min(s + size, per_frame)});
  return blocks;
}

struct DenseHead {
  std::vector<float> Q, K, V, dO, dQ, dK, dV, lse, delta;
};

// Scores of queries [qb) against keys [kb): P[i][j] = exp(s q.k - lse_i) and
// dS[i][j] = P (dO_i . v_j - Delta_i), both [nq][kKeyBlock].
void scores(const AttentionPlan& p, const DenseHead& hd, const Block& qb, const Block& kb,
            float* P, float* dS) {
  const int64_t D = p.D;
  const float s = static_cast<float>(p.scale);
  for (int64_t j = kb.begin; j < kb.end; ++j) {
    const float* kj = &hd.K[j * D];
    const float* vj = &hd.V[j * D];
    for (int64_t i = qb.begin; i < qb.end; ++i) {
      const int64_t at = (i - qb.begin) * kKeyBlock + (j - kb.begin);
      const float pr = std::exp(s * dot(&hd.Q[i * D], kj, D) - hd.lse[i]);
      P[at] = pr;
      dS[at] = pr * (dot(&hd.dO[i * D], vj, D) - hd.delta[i]);
    }
  }
}

// Forward sweep of query block qb (log-sum-exp and Delta = dO . O of each row), then dq.
void dense_query_block(const AttentionPlan& p, const std::vector<Block>& kblocks, DenseHead& hd,
                       const Block& qb) {
  const int64_t D = p.D, nq = qb.end - qb.begin;
  const float s = static_cast<float>(p.scale);
  std::vector<float> acc(nq * D, 0.0f), row_max(nq, -INFINITY), row_sum(nq, 0.0f);
  std::vector<float> z(nq * kKeyBlock), dS(nq * kKeyBlock);
  const int64_t qf = p.q_frame(qb.begin);
  for (const Block& kb : kblocks) {
    if (!p.frame_allowed(qf, p.k_frame(kb.begin))) continue;
    const int64_t nk = kb.end - kb.begin;
    for (int64_t j = 0; j < nk; ++j) {
      const float* kr = &hd.K[(kb.begin + j) * D];
      for (int64_t i = 0; i < nq; ++i) z[i * kKeyBlock + j] = s * dot(&hd.Q[(qb.begin + i) * D], kr, D);
    }
    for (int64_t i = 0; i < nq; ++i) {
      float* zi = &z[i * kKeyBlock];
      float mx = row_max[i];
      for (int64_t j = 0; j < nk; ++j) mx = std::max(mx, zi[j]);
      const float correction = std::exp(row_max[i] - mx);
      row_max[i] = mx;
      float* ai = &acc[i * D];
      scale_in_place(correction, ai, D);
      float sum = row_sum[i] * correction;
      for (int64_t j = 0; j < nk; ++j) {
        const float e = std::exp(zi[j] - mx);
        sum += e;
        axpy(e, &hd.V[(kb.begin + j) * D], ai, D);
      }
      row_sum[i] = sum;
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t row = qb.begin + i;
    hd.lse[row] = row_max[i] + std::log(row_sum[i]);
    hd.delta[row] = dot(&hd.dO[row * D], &acc[i * D], D) / row_sum[i];
  }
  float* dq = &hd.dQ[qb.begin * D];
  std::fill(dq, dq + nq * D, 0.0f);
  for (const Block& kb : kblocks) {
    if (!p.frame_allowed(qf, p.k_frame(kb.begin))) continue;
    scores(p, hd, qb, kb, z.data(), dS.data());
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t j = 0; j < kb.end - kb.begin; ++j)
        axpy(s * dS[i * kKeyBlock + j], &hd.K[(kb.begin + j) * D], &dq[i * D], D);
  }
}

// dK, dV of the keys of key block kb, summed over every allowed query block in order.
void dense_key_block(const AttentionPlan& p, const std::vector<Block>& qblocks, DenseHead& hd,
                     const Block& kb) {
  const int64_t D = p.D, nk = kb.end - kb.begin;
  const float s = static_cast<float>(p.scale);
  std::vector<float> P(kQueryBlock * kKeyBlock), dS(kQueryBlock * kKeyBlock);
  float* dk = &hd.dK[kb.begin * D];
  float* dv = &hd.dV[kb.begin * D];
  std::fill(dk, dk + nk * D, 0.0f);
  std::fill(dv, dv + nk * D, 0.0f);
  const int64_t kf = p.k_frame(kb.begin);
  for (const Block& qb : qblocks) {
    if (!p.frame_allowed(p.q_frame(qb.begin), kf)) continue;
    scores(p, hd, qb, kb, P.data(), dS.data());
    for (int64_t j = 0; j < nk; ++j) {
      for (int64_t i = qb.begin; i < qb.end; ++i) {
        const int64_t at = (i - qb.begin) * kKeyBlock + j;
        axpy(s * dS[at], &hd.Q[i * D], &dk[j * D], D);
        axpy(P[at], &hd.dO[i * D], &dv[j * D], D);
      }
    }
  }
}

Status dense_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& dout, const TensorView& dq, const TensorView& dk,
                      const TensorView& dv, const AttentionParams& params) {
  AttentionPlan p;
  MONARCHRT_RETURN_IF_ERROR(
      make_backward_plan(q, k, v, dout, dq, dk, dv, params, false, Device::kCPU, &p));
  return guard_allocation([&]() {
    const int64_t D = p.D, Sk = k.tokens();
    const std::vector<Block> qblocks = frame_blocks(p.q_grid.T, p.q_grid.tokens_per_frame(), kQueryBlock);
    const std::vector<Block> kblocks = frame_blocks(p.k_grid.T, p.k_grid.tokens_per_frame(), kKeyBlock);
    const std::vector<int64_t> krows = key_rows(p, nullptr);  // empty: identity
    const int64_t* kr = krows.empty() ? nullptr : krows.data();
    DenseHead hd;
    for (auto* x : {&hd.Q, &hd.dO, &hd.dQ}) x->resize(p.Sq * D);
    for (auto* x : {&hd.K, &hd.V, &hd.dK, &hd.dV}) x->resize(p.Skv * D);
    hd.lse.resize(p.Sq);
    hd.delta.resize(p.Sq);
    std::vector<float> dKrows, dVrows;
    if (kr) {
      dKrows.resize(Sk * D);
      dVrows.resize(Sk * D);
    }
    for (int64_t b = 0; b < p.B; ++b) {
      for (int64_t h = 0; h < p.H; ++h) {
        gather_head(q, b, h, nullptr, hd.Q.data());
        gather_head(dout, b, h, nullptr, hd.dO.data());
        gather_rows(k, b, h, kr, p.Skv, hd.K.data());
        gather_rows(v, b, h, kr, p.Skv, hd.V.data());
        parallel_for(static_cast<int64_t>(qblocks.size()),
                     [&](int64_t t) { dense_query_block(p, kblocks, hd, qblocks[t]); });
        parallel_for(static_cast<int64_t>(kblocks.size()),
                     [&](int64_t t) { dense_key_block(p, qblocks, hd, kblocks[t]); });
        scatter_head(dq, b, h, nullptr, hd.dQ.data());
        if (!kr) {
          scatter_head(dk, b, h, nullptr, hd.dK.data());
          scatter_head(dv, b, h, nullptr, hd.dV.data());
          continue;
        }
        // Ring buffer: logical keys to their slots; slots of no attended frame stay zero.
        std::fill(dKrows.begin(), dKrows.end(), 0.0f);
        std::fill(dVrows.begin(), dVrows.end(), 0.0f);
        for (int64_t t = 0; t < p.Skv; ++t) {
          axpy(1.0f, &hd.dK[t * D], &dKrows[kr[t] * D], D);
          axpy(1.0f, &hd.dV[t * D], &dVrows[kr[t] * D], D);
        }
        scatter_head(dk, b, h, nullptr, dKrows.data());
        scatter_head(dv, b, h, nullptr, dVrows.data());
      }
    }
    return Status();
  });
}

}  // namespace

Status dense_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                const TensorView& dout, const TensorView& dq, const TensorView& dk,
                                const TensorView& dv, const AttentionParams& params) {
  return dense_backward(q, k, v, dout, dq, dk, dv, params);
}

Status monarch_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& dout, const TensorView& dq,
                                  const TensorView& dk, const TensorView& dv,
                                  const AttentionParams& params) {
  return monarch_backward(q, k, v, dout, dq, dk, dv, params);
}

}  // namespace cpu
}  // namespace monarchrt
