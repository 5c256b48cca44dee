// Warp-level building blocks shared by the Monarch kernels (one warp owns 16 rows of an MMA
// tile; thread `lane` holds rows lane / 4 and lane / 4 + 8, see common/ptx.cuh).
#pragma once

#include <cfloat>

#include "../common/ptx.cuh"
#include "../common/tma.cuh"

namespace monarchrt {
namespace cuda_detail {

// The m16n8k16 A fragment of columns 16 kk .. 16 kk + 15 of a row of C fragments x (x[2 kk] and
// x[2 kk + 1]), rounded to T: probabilities or gradients as the next product's A operand.
template <typename T, int NT>
__device__ __forceinline__ void pack_a16(uint32_t (&a)[4], const float (&x)[NT][4], int kk) {
  a[0] = Mma<T>::pack(x[2 * kk][0], x[2 * kk][1]);
  a[1] = Mma<T>::pack(x[2 * kk][2], x[2 * kk][3]);
  a[2] = Mma<T>::pack(x[2 * kk + 1][0], x[2 * kk + 1][1]);
  a[3] = Mma<T>::pack(x[2 * kk + 1][2], x[2 * kk + 1][3]);
}

// A fragments of a 16 x D block whose rows lane / 4 and lane / 4 + 8 start at row0 / row1
// (nullptr: a padding row of zeros), read straight from global memory.
template <typename T, int D>
__device__ __forceinline__ void load_a_rows(uint32_t (&a)[D / 16][4], const T* row0, const T* row1, int lane) {
  const int c = (lane % 4) * 2;
  const T* rows[2] = {row0, row1};
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      a[ks][hr] = rows[hr] ? *reinterpret_cast<const uint32_t*>(rows[hr] + ks * 16 + c) : 0u;
      a[ks][2 + hr] = rows[hr] ? *reinterpret_cast<const uint32_t*>(rows[hr] + ks * 16 + 8 + c) : 0u;
    }
  }
}

// mma_rows16 with the 16 rows anywhere in shared memory: lane_row is where this lane's row,
// (lane / 16) * 8 + lane % 8, starts (the row ldmatrix_x4 takes from this lane).
template <typename T>
__device__ __forceinline__ void mma_rows16_at(float (&c0)[4], float (&c1)[4], const uint32_t (&a)[4],
                                              const T* lane_row, int ks, int lane) {
  uint32_t b[4];
  ldmatrix_x4(b, lane_row + ks * 16 + ((lane / 8) % 2) * 8);
  Mma<T>::run(c0, a, b[0], b[1]);
  Mma<T>::run(c1, a, b[2], b[3]);
}

// c0 += A B0^T and c1 += A B1^T, where B0 and B1 are rows 0-7 and 8-15 of the 16 consecutive rows
// at `rows16` of a row-major shared-memory block (pitch ld elements), features 16 ks .. 16 ks + 15,
// and A the warp's 16 x 16 fragment of the same features: 16 keys of a score product S = Q K^T.
template <typename T>
__device__ __forceinline__ void mma_rows16(float (&c0)[4], float (&c1)[4], const uint32_t (&a)[4], const T* rows16,
                                           int ld, int ks, int lane) {
  mma_rows16_at<T>(c0, c1, a, rows16 + ((lane / 16) * 8 + lane % 8) * ld, ks, lane);
}

// Stage 1's scores of a warp's 16 rows over their keys (4 lanes share a row; key i = 8 t + c of
// fragment t): times p.scale_log2, keys i >= p.b2 (and fragments t >= ntu) masked to -FLT_MAX
// (finite, so that p * z is 0 for them without a test; 2^(-FLT_MAX - M) = 0; no finite score is
// lower); M gets each row's maximum. P: the forward's or the backward's parameters.
template <int NT, typename P>
__device__ __forceinline__ void stage1_row_max(float (&s)[NT][4], int ntu, const P& p, float (&M)[2], int lane) {
  const int c = (lane % 4) * 2;
  M[0] = M[1] = -INFINITY;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = t * 8 + c + e % 2;
      s[t][e] = (t < ntu && i < p.b2) ? s[t][e] * p.scale_log2 : -FLT_MAX;
      M[e / 2] = fmaxf(M[e / 2], s[t][e]);
    }
  }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    M[hr] = fmaxf(M[hr], __shfl_xor_sync(0xffffffffu, M[hr], 1));
    M[hr] = fmaxf(M[hr], __shfl_xor_sync(0xffffffffu, M[hr], 2));
  }
}

// Stage 1's softmax of those rows: stage1_row_max, then the unnormalized probabilities
// p = 2^(z - M) in s and, per row, Z = sum p and PZ = sum p z (log2 units: cL = ln 2 (PZ / Z - M
// - log2 Z)).
template <int NT, typename P>
__device__ __forceinline__ void stage1_row_softmax(float (&s)[NT][4], int ntu, const P& p, float (&M)[2],
                                                   float (&Z)[2], float (&PZ)[2], int lane) {
  stage1_row_max<NT>(s, ntu, p, M, lane);
  Z[0] = Z[1] = PZ[0] = PZ[1] = 0.f;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float z = s[t][e];
      const float pr = ex2_ftz(z - M[e / 2]);  // 0 for masked keys (z = -FLT_MAX)
      Z[e / 2] += pr;
      PZ[e / 2] += pr * z;
      s[t][e] = pr;
    }
  }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    Z[hr] += __shfl_xor_sync(0xffffffffu, Z[hr], 1);
    Z[hr] += __shfl_xor_sync(0xffffffffu, Z[hr], 2);
    PZ[hr] += __shfl_xor_sync(0xffffffffu, PZ[hr], 1);
    PZ[hr] += __shfl_xor_sync(0xffffffffu, PZ[hr], 2);
  }
}

// Stage 2's scores in log2 units: u = s log2(e) (q . aL) - cL log2(e) for the warp's 16 rows and
// the keys k0 + t * 8 + c + {0, 1} (c = 2 (lane % 4)) of cl, one FMA per score with -cL log2(e)
// loaded once per key; keys at or past nrows (whose aL rows may hold anything) score -inf. cl must
// be readable up to k0 + NT * 8 - 1.
template <int NT>
__device__ __forceinline__ void stage2_scores(float (&u)[NT][4], const float* cl, int k0, int nrows,
                                              float scale_log2, int lane) {
  constexpr float kLog2e = 1.4426950408889634f;
  const int c = (lane % 4) * 2;
  float ncl[NT][2];
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    ncl[t][0] = cl[k0 + t * 8 + c] * -kLog2e;
    ncl[t][1] = cl[k0 + t * 8 + c + 1] * -kLog2e;
  }
  if (k0 + NT * 8 <= nrows) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) u[t][e] = fmaf(u[t][e], scale_log2, ncl[t][e % 2]);
    }
  } else {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        u[t][e] = k0 + t * 8 + c + e % 2 < nrows ? fmaf(u[t][e], scale_log2, ncl[t][e % 2]) : -INFINITY;
      }
    }
  }
}

// One step of the online softmax over NT * 8 more keys for the warp's 16 rows: u holds the
// scores in log2 units (masked entries -inf; every row has at least one finite score over all
// steps). Updates row_max and row_sum, returns the factor corr[2] by which the accumulator of the
// earlier steps must be scaled, and the probabilities P as A fragments over the keys (pa[kk]:
// keys 16 kk .. 16 kk + 15). row_sum is this lane's partial sum over its own columns: add the 4
// lanes of a row (shfl_xor 1 and 2) before store_rows. With key_scale, the fragments hold P times
// it (element by element; row_sum does not), e.g. 1 / Z for values that are Z times the true ones.
template <typename T, int NT>
__device__ __forceinline__ void online_softmax_p(float (&u)[NT][4], float (&row_max)[2], float (&row_sum)[2],
                                                 float (&corr)[2], uint32_t (&pa)[NT / 2][4],
                                                 const float (*key_scale)[4] = nullptr) {
  using MM = Mma<T>;
  static_assert(NT % 2 == 0, "keys come in steps of 16");
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) mx[e / 2] = fmaxf(mx[e / 2], u[t][e]);
  }
  float local[2] = {0.f, 0.f};
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 1));
    mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 2));
    const float new_max = fmaxf(row_max[hr], mx[hr]);
    corr[hr] = ex2_ftz(row_max[hr] - new_max);  // 0 on the first step (row_max = -inf)
    row_max[hr] = new_max;
  }
#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      u[t][e] = ex2_ftz(u[t][e] - row_max[e / 2]);
      local[e / 2] += u[t][e];
    }
  }
  row_sum[0] = row_sum[0] * corr[0] + local[0];
  row_sum[1] = row_sum[1] * corr[1] + local[1];
  if (key_scale) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) u[t][e] *= key_scale[t][e];
    }
  }
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) pack_a16<T>(pa[kk], u, kk);
}

// Scales the warp's 16 x D accumulator rows by corr (rows lane / 4 and lane / 4 + 8).
template <int D>
__device__ __forceinline__ void scale_rows(float (&o)[D / 8][4], const float (&corr)[2]) {
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    o[i][0] *= corr[0];
    o[i][1] *= corr[0];
    o[i][2] *= corr[1];
    o[i][3] *= corr[1];
  }
}

// o += P V for 16 keys with mma.sync: pa the P fragments of the keys (online_softmax_p), vrow
// where this lane's V row starts in shared memory (key ((lane / 8) % 2) * 8 + lane % 8, the row
// ldmatrix_x4_trans takes from this lane; pitch-free, so the 16 rows may lie anywhere), at the
// first of o's D features.
template <typename T, int D>
__device__ __forceinline__ void pv16_at(float (&o)[D / 8][4], const uint32_t (&pa)[4], const T* vrow, int lane) {
#pragma unroll
  for (int dt2 = 0; dt2 < D / 16; ++dt2) {
    uint32_t bv[4];
    ldmatrix_x4_trans(bv, vrow + (dt2 * 2 + lane / 16) * 8);
    Mma<T>::run(o[2 * dt2], pa, bv[0], bv[1]);
    Mma<T>::run(o[2 * dt2 + 1], pa, bv[2], bv[3]);
  }
}

// online_softmax_p, then o = o * corr + P V, where V's NT * 8 rows (keys) start at v with row
// pitch ld (elements) in shared memory, or (Swizzled) lie in the 128-byte-swizzled tiles of
// common/tma.cuh (tiles of NT * 8 rows x 64 features; ld unused); o holds the D features from
// 16-byte chunk chunk0 (feature 8 * chunk0) on.
template <typename T, int D, int NT, bool Swizzled = false>
__device__ __forceinline__ void online_softmax_pv(float (&u)[NT][4], float (&row_max)[2], float (&row_sum)[2],
                                                  float (&o)[D / 8][4], const T* v, int ld, int lane,
                                                  int chunk0 = 0) {
  float corr[2];
  uint32_t pa[NT / 2][4];
  online_softmax_p<T, NT>(u, row_max, row_sum, corr, pa);
  scale_rows<D>(o, corr);
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    const int row = kk * 16 + ((lane / 8) % 2) * 8 + lane % 8;
    if constexpr (!Swizzled) {
      pv16_at<T, D>(o, pa[kk], v + row * ld + chunk0 * 8, lane);
    } else {
#pragma unroll
      for (int dt2 = 0; dt2 < D / 16; ++dt2) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, v + sw128_offset(row, chunk0 + dt2 * 2 + lane / 16, NT * 8));
        Mma<T>::run(o[2 * dt2], pa[kk], bv[0], bv[1]);
        Mma<T>::run(o[2 * dt2 + 1], pa[kk], bv[2], bv[3]);
      }
    }
  }
}

// online_softmax_pv for 16 keys whose V rows lie anywhere in shared memory (vrow: pv16_at), the
// probabilities scaled by key_scale on their way to the product (online_softmax_p).
template <typename T, int D>
__device__ __forceinline__ void online_softmax_pv16_at(float (&u)[2][4], float (&row_max)[2], float (&row_sum)[2],
                                                       float (&o)[D / 8][4], const T* vrow, int lane,
                                                       const float (&key_scale)[2][4]) {
  float corr[2];
  uint32_t pa[1][4];
  online_softmax_p<T, 2>(u, row_max, row_sum, corr, pa, key_scale);
  scale_rows<D>(o, corr);
  pv16_at<T, D>(o, pa[0], vrow, lane);
}

// Final normalization and store of the warp's 16 x D output rows (row0 / row1: nullptr skips).
template <typename T, int D>
__device__ __forceinline__ void store_rows(const float (&o)[D / 8][4], float (&row_sum)[2], T* row0, T* row1,
                                           int lane) {
  using MM = Mma<T>;
  const int c = (lane % 4) * 2;
  T* rows[2] = {row0, row1};
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    if (rows[hr]) {
      const float inv = 1.f / row_sum[hr];
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        *reinterpret_cast<uint32_t*>(rows[hr] + i * 8 + c) = MM::pack(o[i][2 * hr] * inv, o[i][2 * hr + 1] * inv);
      }
    }
  }
}

}  // namespace cuda_detail
}  // namespace monarchrt
