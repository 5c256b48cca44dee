// fp64 reference of Monarch attention (specification sections 2-4), deliberately naive: every
// query tile is processed on its own, with all intermediates (L, R, aL, Y, cL) materialized.
// Never optimize this file; it is the yardstick for every fast path.
//
// Names as in the paper: for query tile m, allowed key tile n, key row k, query row l, column j,
// key column i:
//   R[n,k,j,:]  stage-1 softmax over the b2 keys of key row (n,k), for query column j;
//   aL, Y, cL   R-weighted mean key, mean value, and negative entropy sum R log R;
//   L[n,j,k,l]  stage-2 probability of query (m,l,j) on key row (n,k).
#include <algorithm>
#include <cmath>
#include <vector>

#include "../core/plan.h"

namespace monarchrt {
namespace ref {

namespace {

// Inputs in tile order (Qt: query grid, Kt/Vt: key grid), [tokens, D] each. Writes Ot (tile
// order) when Vt is given, P (natural token order, [Sq, Skv]) when P is given, and each query's
// stage-2 log-sum-exp of the last iteration (tile order) when Lt is given.
void monarch_head(const AttentionPlan& p, const double* Qt, const double* Kt, const double* Vt,
                  double* Ot, const std::vector<int64_t>& qperm, const std::vector<int64_t>& kperm,
                  double* P, double* Lt = nullptr) {
  const int64_t D = p.D, b1 = p.qg.b1, b2 = p.qg.b2, A = p.qg.tiles, F = p.kg.tiles;
  const double s = p.scale;
  for (int64_t m = 0; m < A; ++m) {
    std::vector<int64_t> keys;  // allowed key tiles
    for (int64_t n = 0; n < F; ++n) {
      if (p.tile_allowed(m, n)) keys.push_back(n);
    }
    const int64_t N = static_cast<int64_t>(keys.size());
    auto q_at = [&](int64_t l, int64_t j) { return Qt + ((m * b1 + l) * b2 + j) * D; };
    auto k_at = [&](int64_t n, int64_t k, int64_t i) { return Kt + ((n * b1 + k) * b2 + i) * D; };
    auto v_at = [&](int64_t n, int64_t k, int64_t i) { return Vt + ((n * b1 + k) * b2 + i) * D; };

    std::vector<double> L(N * b2 * b1 * b1, 0.0);  // [ni][j][k][l]
    std::vector<double> R(N * b1 * b2 * b2);       // [ni][k][j][i]
    std::vector<double> aL(N * b2 * b1 * D), Y(Vt ? N * b2 * b1 * D : 0), cL(N * b2 * b1);
    for (int64_t ni = 0; ni < N; ++ni)
      for (int64_t j = 0; j < b2; ++j)
        for (int64_t k = 0; k < b1; ++k) L[((ni * b2 + j) * b1 + k) * b1 + k] = 1.0;

    std::vector<double> aR(D), z(b2), u(N * b1);
    for (int it = 0; it < p.num_iters; ++it) {
      // R from L; then aL, Y, cL from R.
      for (int64_t ni = 0; ni < N; ++ni) {
        const int64_t n = keys[ni];
        for (int64_t k = 0; k < b1; ++k) {
          for (int64_t j = 0; j < b2; ++j) {
            const double* Lrow = &L[((ni * b2 + j) * b1 + k) * b1];
            double cR = 0.0;
            std::fill(aR.begin(), aR.end(), 0.0);
            for (int64_t l = 0; l < b1; ++l) {
              cR += Lrow[l];
              for (int64_t d = 0; d < D; ++d) aR[d] += Lrow[l] * q_at(l, j)[d];
            }
            // Iteration 1 is exactly section 2 (cR == 1); later ones use the original's guard.
            const double inv_cR = it == 0 ? 1.0 : std::min(1.0 / (cR + 1e-6), 1e4);
            double zmax = -INFINITY;
            for (int64_t i = 0; i < b2; ++i) {
              double dot = 0.0;
              for (int64_t d = 0; d < D; ++d) dot += aR[d] * k_at(n, k, i)[d];
              z[i] = s * dot * inv_cR;
              zmax = std::max(zmax, z[i]);
            }
            double sum = 0.0;
            for (int64_t i = 0; i < b2; ++i) sum += std::exp(z[i] - zmax);
            const double lse = zmax + std::log(sum);
            double* Rrow = &R[((ni * b1 + k) * b2 + j) * b2];
            double c = 0.0;
            for (int64_t i = 0; i < b2; ++i) {
              Rrow[i] = std::exp(z[i] - lse);
              c += Rrow[i] * (z[i] - lse);  // never log of an underflowed probability
            }
            const int64_t row = (ni * b2 + j) * b1 + k;
            cL[row] = c;
            for (int64_t d = 0; d < D; ++d) {
              double a = 0.0, y = 0.0;
              for (int64_t i = 0; i < b2; ++i) {
                a += Rrow[i] * k_at(n, k, i)[d];
                if (Vt) y += Rrow[i] * v_at(n, k, i)[d];
              }
              aL[row * D + d] = a;
              if (Vt) Y[row * D + d] = y;
            }
          }
        }
      }
      // L from aL, cL: softmax over every allowed (n, k) for each query (l, j).
      for (int64_t l = 0; l < b1; ++l) {
        for (int64_t j = 0; j < b2; ++j) {
          double umax = -INFINITY;
          for (int64_t ni = 0; ni < N; ++ni) {
            for (int64_t k = 0; k < b1; ++k) {
              const int64_t row = (ni * b2 + j) * b1 + k;
              double dot = 0.0;
              for (int64_t d = 0; d < D; ++d) dot += q_at(l, j)[d] * aL[row * D + d];
              u[ni * b1 + k] = s * dot - cL[row];
              umax = std::max(umax, u[ni * b1 + k]);
            }
          }
          double sum = 0.0;
          for (int64_t r = 0; r < N * b1; ++r) sum += std::exp(u[r] - umax);
          if (Lt != nullptr) Lt[(m * b1 + l) * b2 + j] = umax + std::log(sum);  // the last iteration's stays
          for (int64_t ni = 0; ni < N; ++ni)
            for (int64_t k = 0; k < b1; ++k)
              L[((ni * b2 + j) * b1 + k) * b1 + l] = std::exp(u[ni * b1 + k] - umax) / sum;
        }
      }
    }

    for (int64_t l = 0; l < b1; ++l) {
      for (int64_t j = 0; j < b2; ++j) {
        if (Vt) {
          double* o = Ot + ((m * b1 + l) * b2 + j) * D;
          std::fill(o, o + D, 0.0);
          for (int64_t ni = 0; ni < N; ++ni)
            for (int64_t k = 0; k < b1; ++k) {
              const int64_t row = (ni * b2 + j) * b1 + k;
              const double w = L[row * b1 + l];
              for (int64_t d = 0; d < D; ++d) o[d] += w * Y[row * D + d];
            }
        }
        if (P) {
          double* prow = P + qperm[(m * b1 + l) * b2 + j] * p.Skv;
          for (int64_t ni = 0; ni < N; ++ni)
            for (int64_t k = 0; k < b1; ++k) {
              const double w = L[((ni * b2 + j) * b1 + k) * b1 + l];
              const double* Rrow = &R[((ni * b1 + k) * b2 + j) * b2];
              for (int64_t i = 0; i < b2; ++i)
                prow[kperm[(keys[ni] * b1 + k) * b2 + i]] = w * Rrow[i];
            }
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
  const std::vector<int64_t> qperm = tile_order_permutation(p.qg);
  const std::vector<int64_t> kperm = tile_order_permutation(p.kg);
  std::vector<double> Q(p.Sq * p.D), K(p.Skv * p.D), V(p.Skv * p.D), O(p.Sq * p.D), Lse(lse ? p.Sq : 0);
  const std::vector<int64_t> krows = key_rows(p, &kperm);
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t h = 0; h < p.H; ++h) {
      gather_head(q, b, h, qperm.data(), Q.data());
      gather_rows(k, b, h, krows.data(), p.Skv, K.data());
      gather_rows(v, b, h, krows.data(), p.Skv, V.data());
      monarch_head(p, Q.data(), K.data(), V.data(), O.data(), qperm, kperm, nullptr, lse ? Lse.data() : nullptr);
      scatter_head(out, b, h, qperm.data(), O.data());
      if (lse != nullptr) {
        for (int64_t i = 0; i < p.Sq; ++i) lse[(b * p.H + h) * p.Sq + qperm[i]] = static_cast<float>(Lse[i]);
      }
    }
  }
  return Status();
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

Status monarch_effective_matrix(const TensorView& q, const TensorView& k,
                                const AttentionParams& params, int64_t b, int64_t h,
                                std::vector<double>* P) {
  // k stands in for v and for the (never written) output in the checks.
  MONARCHRT_RETURN_IF_ERROR(validate_bounded(q, "q", false));
  const TensorView out_shape = TensorView::contiguous(q.data, q.dtype, q.batch(), q.tokens(),
                                                      q.heads(), q.head_dim(), q.device);
  AttentionPlan p;
  MONARCHRT_RETURN_IF_ERROR(make_plan(q, k, k, out_shape, params, true, Device::kCPU, &p));
  if (b < 0 || b >= p.B || h < 0 || h >= p.H) {
    return Status::invalid("b, h: (" + std::to_string(b) + ", " + std::to_string(h) +
                           ") is outside batch " + std::to_string(p.B) + " x heads " +
                           std::to_string(p.H));
  }
  const std::vector<int64_t> qperm = tile_order_permutation(p.qg);
  const std::vector<int64_t> kperm = tile_order_permutation(p.kg);
  std::vector<double> Q(p.Sq * p.D), K(p.Skv * p.D);
  const std::vector<int64_t> krows = key_rows(p, &kperm);
  gather_head(q, b, h, qperm.data(), Q.data());
  gather_rows(k, b, h, krows.data(), p.Skv, K.data());
  P->assign(static_cast<size_t>(p.Sq * p.Skv), 0.0);
  monarch_head(p, Q.data(), K.data(), nullptr, nullptr, qperm, kperm, P->data());
  return Status();
}

}  // namespace ref
}  // namespace monarchrt
