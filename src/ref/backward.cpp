// fp64 reference of the backward pass of dense attention and of one-iteration Monarch attention
// (specification sections 2 and 4): the gradients of ref::dense_attention / ref::monarch_attention
// with respect to q, k and v for an upstream gradient dout. Like the forward references it is
// deliberately naive: the forward intermediates (R, log R, aL, Y, cL, L) of every query tile are
// recomputed and materialized, then differentiated in the reverse order of the forward, one
// query tile at a time. It is the yardstick that the fast CPU, CUDA and PyTorch backward passes
// are checked against, and it is itself checked against finite differences
// (tests/test_backward.cpp); never optimize it. All inputs are read and all gradients computed
// before the first gradient element is written.
//
// Backward of one iteration, names as in the specification, for query tile m, allowed key tile n,
// key row k, query row l, columns j (query) and i (key), dO = dout[m,l,j]:
//   dL[n,k] = dO . Y[n,k,j]            dY[n,k,j] += L[n,k] dO
//   du      = L (dL - sum_{n,k} L dL)  (softmax backward)
//   dq[m,l,j] += s sum_{n,k} du aL[n,k,j]; daL[n,k,j] += s du q[m,l,j]; dcL[n,k,j] -= du
// then, per (n, k, j), with log R_i = z_i - lse(z) (finite even where R_i underflows):
//   dR_i = daL . K[n,k,i] + dY . V[n,k,i] + dcL log R_i      (the +1 of d(R log R) cancels below)
//   dz   = R (dR - sum_i R_i dR_i)
//   dK[n,k,i] += R_i daL + s dz_i q[m,k,j];  dV[n,k,i] += R_i dY;  dq[m,k,j] += s sum_i dz_i K[n,k,i]
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../core/plan.h"

namespace monarchrt {
namespace ref {

namespace {

// Gradients of one (batch, head) of dense attention, natural token order, [tokens, D] each.
// dQ, dK, dV must be zero on entry.
void dense_backward_head(const AttentionPlan& p, const double* Q, const double* K, const double* V,
                         const double* dO, double* dQ, double* dK, double* dV) {
  const int64_t D = p.D;
  const double s = p.scale;
  std::vector<int64_t> keys;
  std::vector<double> z, P, dP;
  for (int64_t i = 0; i < p.Sq; ++i) {
    keys.clear();
    z.clear();
    for (int64_t j = 0; j < p.Skv; ++j) {
      if (!p.frame_allowed(p.q_frame(i), p.k_frame(j))) continue;
      double dot = 0.0;
      for (int64_t d = 0; d < D; ++d) dot += Q[i * D + d] * K[j * D + d];
      keys.push_back(j);
      z.push_back(s * dot);
    }
    const size_t n = keys.size();
    double zmax = -INFINITY;
    for (size_t r = 0; r < n; ++r) zmax = std::max(zmax, z[r]);
    double sum = 0.0;
    P.assign(n, 0.0);
    for (size_t r = 0; r < n; ++r) sum += (P[r] = std::exp(z[r] - zmax));
    for (size_t r = 0; r < n; ++r) P[r] /= sum;
    // dP_r = dO . V_r; softmax backward dS = P (dP - sum P dP).
    dP.assign(n, 0.0);
    double mean = 0.0;
    for (size_t r = 0; r < n; ++r) {
      double dot = 0.0;
      for (int64_t d = 0; d < D; ++d) dot += dO[i * D + d] * V[keys[r] * D + d];
      dP[r] = dot;
      mean += P[r] * dot;
    }
    for (size_t r = 0; r < n; ++r) {
      const double dS = P[r] * (dP[r] - mean);
      const int64_t j = keys[r];
      for (int64_t d = 0; d < D; ++d) {
        dQ[i * D + d] += s * dS * K[j * D + d];
        dK[j * D + d] += s * dS * Q[i * D + d];
        dV[j * D + d] += P[r] * dO[i * D + d];
      }
    }
  }
}

// Gradients of one (batch, head) of one-iteration Monarch attention. Everything in tile order:
// Qt, dOt, dQt over the query grid, Kt, Vt, dKt, dVt over the key grid, [tokens, D] each.
// dQt, dKt, dVt must be zero on entry.
void monarch_backward_head(const AttentionPlan& p, const double* Qt, const double* Kt,
                           const double* Vt, const double* dOt, double* dQt, double* dKt,
                           double* dVt) {
  const int64_t D = p.D, b1 = p.qg.b1, b2 = p.qg.b2, A = p.qg.tiles, F = p.kg.tiles;
  const double s = p.scale;
  for (int64_t m = 0; m < A; ++m) {
    std::vector<int64_t> keys;  // allowed key tiles
    for (int64_t n = 0; n < F; ++n) {
      if (p.tile_allowed(m, n)) keys.push_back(n);
    }
    const int64_t N = static_cast<int64_t>(keys.size());
    auto qpos = [&](int64_t l, int64_t j) { return ((m * b1 + l) * b2 + j) * D; };
    auto kpos = [&](int64_t n, int64_t k, int64_t i) { return ((n * b1 + k) * b2 + i) * D; };

    // ---- forward, materialized. A "row" is (ni, j, k): key row (n, k) seen by query column j.
    std::vector<double> R(N * b2 * b1 * b2), logR(N * b2 * b1 * b2);  // [row][i]
    std::vector<double> aL(N * b2 * b1 * D), Y(N * b2 * b1 * D), cL(N * b2 * b1);
    std::vector<double> z(b2);
    for (int64_t ni = 0; ni < N; ++ni) {
      const int64_t n = keys[ni];
      for (int64_t j = 0; j < b2; ++j) {
        for (int64_t k = 0; k < b1; ++k) {
          const int64_t row = (ni * b2 + j) * b1 + k;
          const double* qk = Qt + qpos(k, j);  // the proxy: query row k, column j of tile m
          double zmax = -INFINITY;
          for (int64_t i = 0; i < b2; ++i) {
            double dot = 0.0;
            for (int64_t d = 0; d < D; ++d) dot += qk[d] * Kt[kpos(n, k, i) + d];
            z[i] = s * dot;
            zmax = std::max(zmax, z[i]);
          }
          double sum = 0.0;
          for (int64_t i = 0; i < b2; ++i) sum += std::exp(z[i] - zmax);
          const double lse = zmax + std::log(sum);
          double c = 0.0;
          for (int64_t i = 0; i < b2; ++i) {
            logR[row * b2 + i] = z[i] - lse;
            R[row * b2 + i] = std::exp(z[i] - lse);
            c += R[row * b2 + i] * logR[row * b2 + i];
          }
          cL[row] = c;
          for (int64_t d = 0; d < D; ++d) {
            double a = 0.0, y = 0.0;
            for (int64_t i = 0; i < b2; ++i) {
              a += R[row * b2 + i] * Kt[kpos(n, k, i) + d];
              y += R[row * b2 + i] * Vt[kpos(n, k, i) + d];
            }
            aL[row * D + d] = a;
            Y[row * D + d] = y;
          }
        }
      }
    }
    // Stage 2: L[(l, j)][ni * b1 + k], the softmax over every allowed (n, k).
    std::vector<double> L(b1 * b2 * N * b1);
    for (int64_t l = 0; l < b1; ++l) {
      for (int64_t j = 0; j < b2; ++j) {
        double* Lq = &L[(l * b2 + j) * N * b1];
        double umax = -INFINITY;
        for (int64_t ni = 0; ni < N; ++ni) {
          for (int64_t k = 0; k < b1; ++k) {
            const int64_t row = (ni * b2 + j) * b1 + k;
            double dot = 0.0;
            for (int64_t d = 0; d < D; ++d) dot += Qt[qpos(l, j) + d] * aL[row * D + d];
            Lq[ni * b1 + k] = s * dot - cL[row];
            umax = std::max(umax, Lq[ni * b1 + k]);
          }
        }
        double sum = 0.0;
        for (int64_t r = 0; r < N * b1; ++r) sum += std::exp(Lq[r] - umax);
        for (int64_t r = 0; r < N * b1; ++r) Lq[r] = std::exp(Lq[r] - umax) / sum;
      }
    }

    // ---- backward of stage 2 (and of out = sum L Y).
    std::vector<double> daL(N * b2 * b1 * D, 0.0), dY(N * b2 * b1 * D, 0.0), dcL(N * b2 * b1, 0.0);
    std::vector<double> dLq(N * b1);
    for (int64_t l = 0; l < b1; ++l) {
      for (int64_t j = 0; j < b2; ++j) {
        const double* Lq = &L[(l * b2 + j) * N * b1];
        const double* dO = dOt + qpos(l, j);
        const double* q = Qt + qpos(l, j);
        double mean = 0.0;
        for (int64_t ni = 0; ni < N; ++ni) {
          for (int64_t k = 0; k < b1; ++k) {
            const int64_t row = (ni * b2 + j) * b1 + k;
            double dot = 0.0;
            for (int64_t d = 0; d < D; ++d) dot += dO[d] * Y[row * D + d];
            dLq[ni * b1 + k] = dot;
            mean += Lq[ni * b1 + k] * dot;
          }
        }
        for (int64_t ni = 0; ni < N; ++ni) {
          for (int64_t k = 0; k < b1; ++k) {
            const int64_t row = (ni * b2 + j) * b1 + k;
            const double Lr = Lq[ni * b1 + k];
            const double du = Lr * (dLq[ni * b1 + k] - mean);
            for (int64_t d = 0; d < D; ++d) {
              dQt[qpos(l, j) + d] += s * du * aL[row * D + d];
              daL[row * D + d] += s * du * q[d];
              dY[row * D + d] += Lr * dO[d];
            }
            dcL[row] -= du;
          }
        }
      }
    }

    // ---- backward of stage 1.
    std::vector<double> dR(b2), dz(b2);
    for (int64_t ni = 0; ni < N; ++ni) {
      const int64_t n = keys[ni];
      for (int64_t j = 0; j < b2; ++j) {
        for (int64_t k = 0; k < b1; ++k) {
          const int64_t row = (ni * b2 + j) * b1 + k;
          const double* Rr = &R[row * b2];
          const double* lR = &logR[row * b2];
          double mean = 0.0;
          for (int64_t i = 0; i < b2; ++i) {
            double dot = 0.0;
            for (int64_t d = 0; d < D; ++d) {
              dot += daL[row * D + d] * Kt[kpos(n, k, i) + d] + dY[row * D + d] * Vt[kpos(n, k, i) + d];
            }
            dR[i] = dot + dcL[row] * lR[i];
            mean += Rr[i] * dR[i];
          }
          for (int64_t i = 0; i < b2; ++i) dz[i] = Rr[i] * (dR[i] - mean);
          const double* qk = Qt + qpos(k, j);
          for (int64_t i = 0; i < b2; ++i) {
            for (int64_t d = 0; d < D; ++d) {
              dKt[kpos(n, k, i) + d] += Rr[i] * daL[row * D + d] + s * dz[i] * qk[d];
              dVt[kpos(n, k, i) + d] += Rr[i] * dY[row * D + d];
              dQt[qpos(k, j) + d] += s * dz[i] * Kt[kpos(n, k, i) + d];
            }
          }
        }
      }
    }
  }
}

Status backward(const TensorView& q, const TensorView& k, const TensorView& v,
                const TensorView& dout, const TensorView& dq, const TensorView& dk,
                const TensorView& dv, const AttentionParams& params, bool monarch) {
  AttentionPlan p;
  MONARCHRT_RETURN_IF_ERROR(
      make_backward_plan(q, k, v, dout, dq, dk, dv, params, monarch, Device::kCPU, &p));
  std::vector<int64_t> qperm, kperm;  // empty: natural order (dense)
  if (monarch) {
    qperm = tile_order_permutation(p.qg);
    kperm = tile_order_permutation(p.kg);
  }
  const int64_t* qp = monarch ? qperm.data() : nullptr;
  // Row of the k/v views of each logical key (tile order for Monarch): a permutation, or with a
  // ring-buffer cache the slot of each logical frame (overwritten frames share a slot with a newer
  // one; they are never attended, so their exactly-zero gradients add nothing to it).
  const std::vector<int64_t> krows = key_rows(p, monarch ? &kperm : nullptr);
  const int64_t* kr = krows.empty() ? nullptr : krows.data();
  const int64_t D = p.D, heads = p.B * p.H, Sk = k.tokens();  // Sk: rows of k, v, dk, dv
  std::vector<double> Q(p.Sq * D), K(p.Skv * D), V(p.Skv * D), dO(p.Sq * D);
  std::vector<double> gK(p.Skv * D), gV(p.Skv * D);  // per logical key
  // Gradients of every (batch, head) (dK, dV per row of dk, dv), written once all are computed.
  std::vector<double> dQ(heads * p.Sq * D, 0.0), dK(heads * Sk * D, 0.0), dV(heads * Sk * D, 0.0);
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t h = 0; h < p.H; ++h) {
      const int64_t bh = b * p.H + h;
      gather_head(q, b, h, qp, Q.data());
      gather_rows(k, b, h, kr, p.Skv, K.data());
      gather_rows(v, b, h, kr, p.Skv, V.data());
      gather_head(dout, b, h, qp, dO.data());
      std::fill(gK.begin(), gK.end(), 0.0);
      std::fill(gV.begin(), gV.end(), 0.0);
      double* gq = &dQ[bh * p.Sq * D];
      if (monarch) {
        monarch_backward_head(p, Q.data(), K.data(), V.data(), dO.data(), gq, gK.data(), gV.data());
      } else {
        dense_backward_head(p, Q.data(), K.data(), V.data(), dO.data(), gq, gK.data(), gV.data());
      }
      for (int64_t t = 0; t < p.Skv; ++t) {
        const int64_t row = kr ? kr[t] : t;
        for (int64_t d = 0; d < D; ++d) {
          dK[(bh * Sk + row) * D + d] += gK[t * D + d];
          dV[(bh * Sk + row) * D + d] += gV[t * D + d];
        }
      }
    }
  }
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t h = 0; h < p.H; ++h) {
      const int64_t bh = b * p.H + h;
      scatter_head(dq, b, h, qp, &dQ[bh * p.Sq * D]);
      scatter_head(dk, b, h, nullptr, &dK[bh * Sk * D]);
      scatter_head(dv, b, h, nullptr, &dV[bh * Sk * D]);
    }
  }
  return Status();
}

}  // namespace

Status dense_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                const TensorView& dout, const TensorView& dq, const TensorView& dk,
                                const TensorView& dv, const AttentionParams& params) {
  return backward(q, k, v, dout, dq, dk, dv, params, false);
}

Status monarch_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& dout, const TensorView& dq,
                                  const TensorView& dk, const TensorView& dv,
                                  const AttentionParams& params) {
  return backward(q, k, v, dout, dq, dk, dv, params, true);
}

}  // namespace ref
}  // namespace monarchrt
