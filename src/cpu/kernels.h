// Small fp32 building blocks of the CPU paths. The reductions use `omp simd reduction` (compiled
// with -fopenmp-simd, no OpenMP runtime) so the compiler may vectorize them; the rest is plain
// loops the auto-vectorizer handles.
#pragma once

#include <cmath>
#include <cstdint>
#include <new>
#include <vector>

#include "monarchrt/status.h"

namespace monarchrt {
namespace cpu {

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// y += alpha * x
inline void axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

inline void scale_in_place(float alpha, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] *= alpha;
}

// C[M x N] = A[M x K] * B[K x N] (+ C with accumulate), fp32: A's element (i, k) at
// A[i * a_rs + k * a_cs], B and C row-major with row pitches ldb and ldc. Blocks of MR = 8 rows
// (with AVX-512; then 4, then 1) x NR = 32 columns (then 16) of C stay in registers over the whole
// K (every loop bound is a compile-time constant, or the compiler keeps C in memory); an edge
// block narrower than 16 columns runs on a zero-padded copy of its B columns.
template <int MR, int NR>
inline void gemm_block(int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B, int64_t ldb,
                       float* C, int64_t ldc, bool accumulate) {
  float c[MR][NR];
  for (int i = 0; i < MR; ++i) {
#pragma omp simd
    for (int j = 0; j < NR; ++j) c[i][j] = accumulate ? C[i * ldc + j] : 0.0f;
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    for (int i = 0; i < MR; ++i) {
      const float a = A[i * a_rs + k * a_cs];
#pragma omp simd
      for (int j = 0; j < NR; ++j) c[i][j] += a * b[j];
    }
  }
  for (int i = 0; i < MR; ++i) {
#pragma omp simd
    for (int j = 0; j < NR; ++j) C[i * ldc + j] = c[i][j];
  }
}

// Rows [0, MR) of C: 32- and 16-column blocks up to nfull; the rest (nr < 16 columns) against the
// zero-padded copy Bt of B's last columns (pitch 16).
template <int MR>
inline void gemm_rows(int64_t nfull, int nr, int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B,
                      int64_t ldb, const float* Bt, float* C, int64_t ldc, bool accumulate) {
  int64_t j0 = 0;
  for (; j0 + 32 <= nfull; j0 += 32) gemm_block<MR, 32>(K, A, a_rs, a_cs, B + j0, ldb, C + j0, ldc, accumulate);
  for (; j0 < nfull; j0 += 16) gemm_block<MR, 16>(K, A, a_rs, a_cs, B + j0, ldb, C + j0, ldc, accumulate);
  if (nr == 0) return;
  float Cp[MR * 16] = {};
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < nr; ++j) Cp[i * 16 + j] = accumulate ? C[i * ldc + nfull + j] : 0.0f;
  gemm_block<MR, 16>(K, A, a_rs, a_cs, Bt, 16, Cp, 16, accumulate);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < nr; ++j) C[i * ldc + nfull + j] = Cp[i * 16 + j];
}

inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const int64_t nfull = N / 16 * 16;
  const int nr = static_cast<int>(N - nfull);
  thread_local std::vector<float> pad;
  if (nr > 0) {
    pad.assign(static_cast<size_t>(K * 16), 0.0f);
    for (int64_t k = 0; k < K; ++k)
      for (int j = 0; j < nr; ++j) pad[k * 16 + j] = B[k * ldb + nfull + j];
  }
  int64_t i0 = 0;
#ifdef __AVX512F__  // 8 x 32 outputs are 16 of the 32 vector registers (AVX2 has 16 in all)
  for (; i0 + 8 <= M; i0 += 8)
    gemm_rows<8>(nfull, nr, K, A + i0 * a_rs, a_rs, a_cs, B, ldb, pad.data(), C + i0 * ldc, ldc, accumulate);
#endif
  for (; i0 + 4 <= M; i0 += 4)
    gemm_rows<4>(nfull, nr, K, A + i0 * a_rs, a_rs, a_cs, B, ldb, pad.data(), C + i0 * ldc, ldc, accumulate);
  for (; i0 < M; ++i0)
    gemm_rows<1>(nfull, nr, K, A + i0 * a_rs, a_rs, a_cs, B, ldb, pad.data(), C + i0 * ldc, ldc, accumulate);
}

// exp(x) for x <= 0 (softmax arguments after subtracting the maximum), in operations a loop can
// vectorize (std::exp does not): x = n ln 2 + r with |r| <= ln(2) / 2, exp(r) by its Taylor
// series to degree 7 (truncation below 2e-9 relative), times 2^n built in the exponent bits.
// Relative error at most 1.1e-7 on [-87, 0] (measured against double exp), like std::exp in
// float; exactly 0 below -87 (and for -inf), NaN stays NaN; positive x is outside its domain
// (treated as 0).
inline float exp_nonpositive(float x) {
  // Clamped into [-87, 0] (NaN too), so the float-to-int conversion below is always defined.
  const float xc = x >= -87.0f ? (x <= 0.0f ? x : 0.0f) : -87.0f;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (std::floor does not vectorize without
  // -fno-trapping-math); |x / ln 2| <= 126 is far inside its range.
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440054e-4f;  // ln 2 = 0.693359375 - 2.12194440054e-4
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  const float scale = __builtin_bit_cast(float, bits);            // (memcpy stops the vectorizer)
  return x >= -87.0f ? p * scale : (x != x ? x : 0.0f);
}

// Softmax down each column c of X[rows][ld] (a row's ld columns contiguous), in place, after
// x -> x * scale[c] (scale may be null). lse[c] gets the column's log-sum-exp; neg_entropy[c], if
// given, sum R (x - lse) (never the log of an underflowed probability); log_r, if given, the log
// probabilities x - lse of columns c < log_cols, transposed: log_r[c * rows + row]. Every loop
// runs along a row, so it vectorizes. work: 2 * ld floats.
inline void column_softmax(float* X, int64_t rows, int64_t ld, const float* scale, float* lse, float* neg_entropy,
                           float* log_r, int64_t log_cols, float* work) {
  float* mx = work;
  float* sum = work + ld;
  for (int64_t c = 0; c < ld; ++c) mx[c] = -INFINITY, sum[c] = 0.0f;
  for (int64_t r = 0; r < rows; ++r) {
    float* x = X + r * ld;
    if (scale != nullptr) {
#pragma omp simd
      for (int64_t c = 0; c < ld; ++c) x[c] *= scale[c];
    }
#pragma omp simd
    for (int64_t c = 0; c < ld; ++c) mx[c] = x[c] > mx[c] ? x[c] : mx[c];
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = X + r * ld;
#pragma omp simd
    for (int64_t c = 0; c < ld; ++c) sum[c] += exp_nonpositive(x[c] - mx[c]);
  }
  for (int64_t c = 0; c < ld; ++c) lse[c] = mx[c] + std::log(sum[c]);
  if (neg_entropy != nullptr) {
    for (int64_t c = 0; c < ld; ++c) neg_entropy[c] = 0.0f;
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* x = X + r * ld;
    if (log_r != nullptr) {
      for (int64_t c = 0; c < log_cols; ++c) log_r[c * rows + r] = x[c] - lse[c];
    }
#pragma omp simd
    for (int64_t c = 0; c < ld; ++c) {
      const float R = exp_nonpositive(x[c] - lse[c]);
      if (neg_entropy != nullptr) neg_entropy[c] += R * (x[c] - lse[c]);
      x[c] = R;
    }
  }
}

// Monarch stage 1 for one key row of b2 keys (Krow, Vrow: [b2][D]) and all b2 query columns,
// whose proxies are given transposed in AT ([D][b2p], zero columns past b2): Z^T = K aR^T into
// ZT ([b2][b2p]), scaled per column by scale[j], the softmax of each column (R^T, left in ZT; cL
// in neg_entropy[j], log R transposed into log_r[j * b2 + i] if given), then aL = R K into aL
// and, if Y is given, Y = R V (rows j with pitch ld). work: 2 * b2p floats.
inline void monarch_stage1_row(const float* Krow, const float* Vrow, const float* AT, int64_t b2, int64_t b2p,
                               int64_t D, const float* scale, float* ZT, float* lse, float* neg_entropy,
                               float* log_r, float* aL, float* Y, int64_t ld, float* work) {
  gemm(b2, b2p, D, Krow, D, 1, AT, b2p, ZT, b2p, false);
  column_softmax(ZT, b2, b2p, scale, lse, neg_entropy, log_r, log_r != nullptr ? b2 : 0, work);
  gemm(b2, D, b2, ZT, 1, b2p, Krow, D, aL, ld, false);  // R[j][i] = R^T[i][j]
  if (Y != nullptr) gemm(b2, D, b2, ZT, 1, b2p, Vrow, D, Y, ld, false);
}

// Monarch stage 2's probabilities for query column j: the column's queries q[l, j] (at
// Qm + (l * b2 + j) * D) transposed into QT ([D][b1p], zero columns past b1), U^T = aL_j Q_j^T
// scaled, minus cL, into UT ([rows][b1p]), then the softmax of each query's column: L^T in UT.
// work: 2 * b1p floats.
inline void monarch_stage2_probabilities(const float* aLj, const float* cLj, const float* Qm, int64_t j,
                                         int64_t rows, int64_t b1, int64_t b1p, int64_t b2, int64_t D, float s,
                                         float* QT, float* UT, float* lse, float* work) {
  for (int64_t l = 0; l < b1; ++l)
    for (int64_t d = 0; d < D; ++d) QT[d * b1p + l] = Qm[(l * b2 + j) * D + d];
  gemm(rows, b1p, D, aLj, D, 1, QT, b1p, UT, b1p, false);
  for (int64_t r = 0; r < rows; ++r) {
    float* u = UT + r * b1p;
    const float c = cLj[r];
#pragma omp simd
    for (int64_t l = 0; l < b1p; ++l) u[l] = s * u[l] - c;
  }
  column_softmax(UT, rows, b1p, nullptr, lse, nullptr, nullptr, 0, work);
}

// Runs `body` and turns an allocation failure into a Status instead of an escaping exception.
template <typename Body>
Status guard_allocation(Body&& body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return Status::unsupported("out of host memory for this problem size");
  }
}

}  // namespace cpu
}  // namespace monarchrt
