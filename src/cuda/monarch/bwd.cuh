// CUDA backward of one-iteration Monarch attention (specification sections 2 and 4; the
// gradients are derived in src/ref/backward.cpp). Five launches on one stream, every reduction
// inside one CTA (no atomics, results independent of scheduling):
//
//  0. stage 1 of the forward (two_pass.cuh) recomputes aL, Y, cL into the workspace, plus the
//     stage-1 log-sum-exp lse1 per workspace row;
//  1. monarch_bwd_dq2_kernel, query orientation (like the forward's stage 2): per query
//     (m, l, j), a first sweep over the virtual keys (n, k) of column j gives the stage-2
//     log-sum-exp and Delta = dO . out; a second sweep gives the stage-2 part of dq,
//     s * sum du aL with du = L (dO . Y - Delta). Both per-query scalars and dq (fp32) go to the
//     workspace;
//  2. monarch_bwd_dl_kernel, virtual-key orientation: per workspace row (m, j, n, k), over the b1
//     queries of column j: daL = s sum_l du q, dY = sum_l L dO, dcL = -sum_l du, written over
//     aL, Y, cL in place (each row is read and written by one warp only);
//  3. monarch_bwd_dq1_kernel, query orientation (like the forward's stage 1): per (m, k) and
//     column j, over the allowed key tiles: dR_i = daL . K_i + dY . V_i + dcL log R_i,
//     D1 = sum_i R_i dR_i (kept per workspace row for step 4, so that both use the same fp32 R),
//     dz = R (dR - D1), dq[m,k,j] = (stage-2 part) + s sum_i dz K_i, written in the input dtype;
//  4. monarch_bwd_dkv_kernel, key orientation: per key row (n, k), one warp per 16 keys i, over
//     every query tile m that may attend n and every column j: R rebuilt from lse1,
//     dK_i = sum R daL + s dz q[m,k,j], dV_i = sum R dY, written in the input dtype. (In KV-cache
//     mode dk and dv are zeroed first: keys nobody attends get exactly zero.)
#pragma once

#include <cuda_runtime.h>

#include "../common/ptx.cuh"
#include "fwd_params.h"
#include "tiles.cuh"
#include "two_pass.cuh"
#include "warp_tiles.cuh"

namespace monarchrt {
namespace cuda_detail {

struct MonarchBwdParams {
  MonarchFwdParams f;  // q, k, v, geometry; ws_al / ws_y / ws_cl become daL / dY / dcL
  const void* dout;
  void* dq;
  void* dk;
  void* dv;
  int64_t do_stride[3], dq_stride[3], dk_stride[3], dv_stride[3];  // batch, token, head
  float scale;      // softmax scale (natural units)
  float* ws_d1;     // per workspace row: D1 = sum_i R_i dR_i (written by the dq1 kernel)
  float* q_lse;     // per query ((bh * A + m) * b1 + l) * b2 + j: stage-2 log-sum-exp (log2 units)
  float* q_delta;   // per query: dO . out
  float* dq_acc;    // per query: D floats, the stage-2 part of dq
};

__device__ __forceinline__ int64_t query_index(const MonarchFwdParams& p, int bh, int m, int l, int j) {
  return ((int64_t(bh) * p.A + m) * p.b1 + l) * p.b2 + j;
}

// A fragments of rows 16 x 16 (columns ks * 16 ..) of a row-major shared-memory block.
__device__ __forceinline__ void ldmatrix_a(uint32_t (&a)[4], const void* block, int ld_bytes, int ks, int lane) {
  ldmatrix_x4(a, static_cast<const char*>(block) + (lane % 16) * ld_bytes + (ks * 16 + (lane / 16) * 8) * 2);
}

// ---- 1. stage-2 backward, query orientation ------------------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(128) monarch_bwd_dq2_kernel(const MonarchBwdParams bp) {
  const MonarchFwdParams& p = bp.f;
  using C = TwoPassConfig<T, D>;
  using MM = Mma<T>;
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr int kCh = C::kChunk;
  extern __shared__ __align__(128) unsigned char smem[];
  int* row_off = reinterpret_cast<int*>(smem + 2 * C::kStage2);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, r = lane / 4, c = (lane % 4) * 2;
  const int row_groups = (p.b1 + 31) / 32;
  const int j0 = blockIdx.x * C::kCols, m = blockIdx.y / row_groups, rg = blockIdx.y % row_groups;
  const int bh = blockIdx.z, b = bh / p.H, h = bh % p.H;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  const T* dog = static_cast<const T*>(bp.dout) + b * bp.do_stride[0] + h * bp.do_stride[2];
  const T* al_ws = static_cast<const T*>(p.ws_al);
  const T* y_ws = static_cast<const T*>(p.ws_y);

  for (int i = tid; i < int(2 * C::kStage2 / 16); i += blockDim.x) {
    reinterpret_cast<uint4*>(smem)[i] = make_uint4(0, 0, 0, 0);
  }
  for (int i = tid; i < p.b1; i += blockDim.x) row_off[i] = row_offset(p, i);
  __syncthreads();
  const int q_base = tile_base(p, m);
  const int jl = warp / 2, mt = warp % 2, jq = j0 + jl;
  int lrow[2];
  uint32_t qa[D / 16][4], da[D / 16][4];
  {
    const T* qrows[2];
    const T* drows[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      lrow[hr] = rg * 32 + mt * 16 + r + hr * 8;
      const bool ok = lrow[hr] < p.b1 && jq < p.b2;
      const int64_t tok = ok ? q_base + row_off[lrow[hr]] + jq : 0;
      qrows[hr] = ok ? qg + tok * p.q_stride[1] : nullptr;
      drows[hr] = ok ? dog + tok * bp.do_stride[1] : nullptr;
    }
    load_a_rows<T, D>(qa, qrows[0], qrows[1], lane);
    load_a_rows<T, D>(da, drows[0], drows[1], lane);
  }
  auto load = [&](int n, int k0, int stage) {
    load_stage2_chunk<T, D>(p, al_ws, y_ws, smem + stage * TwoPassConfig<T, D>::kStage2, bh, m, j0, n, k0);
  };

  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f}, dsum[2] = {0.f, 0.f};
  float lse[2] = {0.f, 0.f}, delta[2] = {0.f, 0.f};
  float acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  for (int pass = 0; pass < 2; ++pass) {
    int n = next_allowed(p, m, 0), k0 = 0;
    if (n < p.F) load(n, k0, 0);
    cp_async_commit();
    for (int it = 0; n < p.F; ++it) {
      int n_next = n, k_next = k0 + kCh;
      if (k_next >= p.b1) {
        n_next = next_allowed(p, m, n + 1);
        k_next = 0;
      }
      if (n_next < p.F) load(n_next, k_next, (it + 1) % 2);
      cp_async_commit();
      cp_async_wait_group<1>();
      __syncthreads();
      const int nrows = min(kCh, p.b1 - k0);
      unsigned char* base = smem + (it % 2) * C::kStage2;
      const T* aLj = reinterpret_cast<const T*>(base) + jl * kCh * C::kLd;
      const T* Yj = reinterpret_cast<const T*>(base + C::kTileBytes) + jl * kCh * C::kLd;
      const float* cLs = reinterpret_cast<const float*>(base + 2 * C::kTileBytes) + jl * kCh;
      float u[kCh / 8][4], g[kCh / 8][4];
#pragma unroll
      for (int t = 0; t < kCh / 8; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) u[t][e] = g[t][e] = 0.f;
      }
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
        for (int tp = 0; tp < kCh / 16; ++tp) {
          const int off = (tp * 16 + (lane / 16) * 8 + lane % 8) * C::kLd + ks * 16 + ((lane / 8) % 2) * 8;
          uint32_t bk[4];
          ldmatrix_x4(bk, aLj + off);
          MM::run(u[2 * tp], qa[ks], bk[0], bk[1]);
          MM::run(u[2 * tp + 1], qa[ks], bk[2], bk[3]);
          ldmatrix_x4(bk, Yj + off);
          MM::run(g[2 * tp], da[ks], bk[0], bk[1]);
          MM::run(g[2 * tp + 1], da[ks], bk[2], bk[3]);
        }
      }
#pragma unroll
      for (int t = 0; t < kCh / 8; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int kc = t * 8 + c + e % 2;
          u[t][e] = kc < nrows ? u[t][e] * p.scale_log2 - cLs[kc] * kLog2e : -INFINITY;
        }
      }
      if (pass == 0) {  // online log-sum-exp and sum L g
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int t = 0; t < kCh / 8; ++t) {
#pragma unroll
          for (int e = 0; e < 4; ++e) mx[e / 2] = fmaxf(mx[e / 2], u[t][e]);
        }
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 1));
          mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 2));
          const float new_max = fmaxf(row_max[hr], mx[hr]);
          const float corr = exp2f(row_max[hr] - new_max);
          row_max[hr] = new_max;
          row_sum[hr] *= corr;
          dsum[hr] *= corr;
        }
#pragma unroll
        for (int t = 0; t < kCh / 8; ++t) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float pr = exp2f(u[t][e] - row_max[e / 2]);
            row_sum[e / 2] += pr;
            dsum[e / 2] += pr * g[t][e];
          }
        }
      } else {  // du = L (g - Delta); acc += du aL
#pragma unroll
        for (int t = 0; t < kCh / 8; ++t) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float L = exp2f(u[t][e] - lse[e / 2]);
            u[t][e] = L * (g[t][e] - delta[e / 2]);
          }
        }
#pragma unroll
        for (int kk = 0; kk < kCh / 16; ++kk) {
          const uint32_t pa[4] = {MM::pack(u[2 * kk][0], u[2 * kk][1]), MM::pack(u[2 * kk][2], u[2 * kk][3]),
                                  MM::pack(u[2 * kk + 1][0], u[2 * kk + 1][1]),
                                  MM::pack(u[2 * kk + 1][2], u[2 * kk + 1][3])};
#pragma unroll
          for (int dt2 = 0; dt2 < D / 16; ++dt2) {
            uint32_t bv[4];
            ldmatrix_x4_trans(bv, aLj + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * C::kLd + dt2 * 16 + (lane / 16) * 8);
            MM::run(acc[2 * dt2], pa, bv[0], bv[1]);
            MM::run(acc[2 * dt2 + 1], pa, bv[2], bv[3]);
          }
        }
      }
      __syncthreads();  // this stage is refilled by the next iteration's copies
      n = n_next;
      k0 = k_next;
    }
    if (pass == 0) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        row_sum[hr] += __shfl_xor_sync(0xffffffffu, row_sum[hr], 1);
        row_sum[hr] += __shfl_xor_sync(0xffffffffu, row_sum[hr], 2);
        dsum[hr] += __shfl_xor_sync(0xffffffffu, dsum[hr], 1);
        dsum[hr] += __shfl_xor_sync(0xffffffffu, dsum[hr], 2);
        lse[hr] = row_max[hr] + log2f(row_sum[hr]);
        delta[hr] = dsum[hr] / row_sum[hr];
      }
    }
  }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    if (lrow[hr] >= p.b1 || jq >= p.b2) continue;
    const int64_t qi = query_index(p, bh, m, lrow[hr], jq);
    if (lane % 4 == 0) {
      bp.q_lse[qi] = lse[hr];
      bp.q_delta[qi] = delta[hr];
    }
    float* dst = bp.dq_acc + qi * D;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      *reinterpret_cast<float2*>(dst + i * 8 + c) = make_float2(bp.scale * acc[i][2 * hr], bp.scale * acc[i][2 * hr + 1]);
    }
  }
}

// ---- 2. stage-2 backward, virtual-key orientation ------------------------------------------

template <typename T, int D>
struct DlConfig {
  static constexpr int kLd = D + 8;
  static constexpr int kRows = 64;  // workspace rows per CTA (4 warps x 16)
  static constexpr int kQ = 32;     // queries per step
  static constexpr size_t kSmem = size_t(2 * kRows + 2 * kQ) * kLd * sizeof(T) + (kRows + 2 * kQ) * sizeof(float) +
                                  kRows * sizeof(int64_t);
};

template <typename T, int D>
__global__ void __launch_bounds__(128) monarch_bwd_dl_kernel(const MonarchBwdParams bp) {
  const MonarchFwdParams& p = bp.f;
  using C = DlConfig<T, D>;
  using MM = Mma<T>;
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ __align__(128) unsigned char smem[];
  T* aLs = reinterpret_cast<T*>(smem);       // [kRows][kLd]
  T* Ys = aLs + C::kRows * C::kLd;           // [kRows][kLd]
  T* Qs = Ys + C::kRows * C::kLd;            // [kQ][kLd]
  T* dOs = Qs + C::kQ * C::kLd;              // [kQ][kLd]
  float* cls = reinterpret_cast<float*>(dOs + C::kQ * C::kLd);  // [kRows]
  float* lses = cls + C::kRows;              // [kQ]
  float* deltas = lses + C::kQ;              // [kQ]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, r = lane / 4, c = (lane % 4) * 2;
  const int rblocks = (p.F * p.b1 + C::kRows - 1) / C::kRows;
  const int j = blockIdx.x, m = blockIdx.y / rblocks, rb = blockIdx.y % rblocks;
  const int bh = blockIdx.z, b = bh / p.H, h = bh % p.H;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  const T* dog = static_cast<const T*>(bp.dout) + b * bp.do_stride[0] + h * bp.do_stride[2];
  T* al_ws = static_cast<T*>(p.ws_al);
  T* y_ws = static_cast<T*>(p.ws_y);
  const int q_base = tile_base(p, m);
  // Workspace row of CTA row i (-1: past the end or a key tile m may not attend), once per row.
  int64_t* rows_s = reinterpret_cast<int64_t*>(deltas + C::kQ);  // [kRows]
  int found = 0;
  if (tid < C::kRows) {
    const int vr = rb * C::kRows + tid, n = vr / p.b1;
    rows_s[tid] = (vr < p.F * p.b1 && tile_allowed(p, m, n)) ? ws_row(p, bh, m, j, n, vr % p.b1) : -1;
    found = rows_s[tid] >= 0;
  }
  if (!__syncthreads_or(found)) return;  // no allowed row: nothing to do (uniform exit)
  for (int idx = tid; idx < C::kRows * (D / 8); idx += blockDim.x) {
    const int i = idx / (D / 8), dc = idx % (D / 8);
    const int64_t row = rows_s[i];
    cp_async_16(aLs + i * C::kLd + dc * 8, al_ws + (row < 0 ? 0 : row) * D + dc * 8, row >= 0);
    cp_async_16(Ys + i * C::kLd + dc * 8, y_ws + (row < 0 ? 0 : row) * D + dc * 8, row >= 0);
  }
  for (int i = tid; i < C::kRows; i += blockDim.x) cls[i] = rows_s[i] >= 0 ? p.ws_cl[rows_s[i]] : 0.f;
  cp_async_commit();

  int64_t wrow[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) wrow[hr] = rows_s[warp * 16 + r + hr * 8];
  const T* aLw = aLs + warp * 16 * C::kLd;
  const T* Yw = Ys + warp * 16 * C::kLd;
  float dal[D / 8][4], dy[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dal[i][e] = dy[i][e] = 0.f;
  }
  float dcl[2] = {0.f, 0.f};
  for (int l0 = 0; l0 < p.b1; l0 += C::kQ) {
    __syncthreads();  // the previous block of queries is no longer read
    for (int idx = tid; idx < C::kQ * (D / 8); idx += blockDim.x) {
      const int l = idx / (D / 8), dc = idx % (D / 8);
      const bool valid = l0 + l < p.b1;
      const int64_t tok = valid ? q_base + row_offset(p, l0 + l) + j : 0;
      cp_async_16(Qs + l * C::kLd + dc * 8, qg + tok * p.q_stride[1] + dc * 8, valid);
      cp_async_16(dOs + l * C::kLd + dc * 8, dog + tok * bp.do_stride[1] + dc * 8, valid);
    }
    for (int l = tid; l < C::kQ; l += blockDim.x) {
      const bool valid = l0 + l < p.b1;
      const int64_t qi = valid ? query_index(p, bh, m, l0 + l, j) : 0;
      lses[l] = valid ? bp.q_lse[qi] : 0.f;
      deltas[l] = valid ? bp.q_delta[qi] : 0.f;
    }
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    float u[C::kQ / 8][4], g[C::kQ / 8][4];
#pragma unroll
    for (int t = 0; t < C::kQ / 8; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) u[t][e] = g[t][e] = 0.f;
    }
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t aa[4], ya[4];
      ldmatrix_a(aa, aLw, C::kLd * sizeof(T), ks, lane);
      ldmatrix_a(ya, Yw, C::kLd * sizeof(T), ks, lane);
#pragma unroll
      for (int tp = 0; tp < C::kQ / 16; ++tp) {
        const int off = (tp * 16 + (lane / 16) * 8 + lane % 8) * C::kLd + ks * 16 + ((lane / 8) % 2) * 8;
        uint32_t bq[4];
        ldmatrix_x4(bq, Qs + off);
        MM::run(u[2 * tp], aa, bq[0], bq[1]);
        MM::run(u[2 * tp + 1], aa, bq[2], bq[3]);
        ldmatrix_x4(bq, dOs + off);
        MM::run(g[2 * tp], ya, bq[0], bq[1]);
        MM::run(g[2 * tp + 1], ya, bq[2], bq[3]);
      }
    }
    float lm[C::kQ / 8][4];  // L, then u becomes s * du
#pragma unroll
    for (int t = 0; t < C::kQ / 8; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int l = t * 8 + c + e % 2, hr = e / 2;
        float L = 0.f, du = 0.f;
        if (l0 + l < p.b1 && wrow[hr] >= 0) {
          L = exp2f(u[t][e] * p.scale_log2 - cls[warp * 16 + r + hr * 8] * kLog2e - lses[l]);
          du = L * (g[t][e] - deltas[l]);
        }
        lm[t][e] = L;
        u[t][e] = bp.scale * du;
        dcl[hr] -= du;
      }
    }
#pragma unroll
    for (int kk = 0; kk < C::kQ / 16; ++kk) {
      const uint32_t pu[4] = {MM::pack(u[2 * kk][0], u[2 * kk][1]), MM::pack(u[2 * kk][2], u[2 * kk][3]),
                              MM::pack(u[2 * kk + 1][0], u[2 * kk + 1][1]),
                              MM::pack(u[2 * kk + 1][2], u[2 * kk + 1][3])};
      const uint32_t pl[4] = {MM::pack(lm[2 * kk][0], lm[2 * kk][1]), MM::pack(lm[2 * kk][2], lm[2 * kk][3]),
                              MM::pack(lm[2 * kk + 1][0], lm[2 * kk + 1][1]),
                              MM::pack(lm[2 * kk + 1][2], lm[2 * kk + 1][3])};
#pragma unroll
      for (int dt2 = 0; dt2 < D / 16; ++dt2) {
        const int off = (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * C::kLd + dt2 * 16 + (lane / 16) * 8;
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, Qs + off);
        MM::run(dal[2 * dt2], pu, bv[0], bv[1]);
        MM::run(dal[2 * dt2 + 1], pu, bv[2], bv[3]);
        ldmatrix_x4_trans(bv, dOs + off);
        MM::run(dy[2 * dt2], pl, bv[0], bv[1]);
        MM::run(dy[2 * dt2 + 1], pl, bv[2], bv[3]);
      }
    }
  }
  // daL, dY, dcL replace aL, Y, cL.
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    dcl[hr] += __shfl_xor_sync(0xffffffffu, dcl[hr], 1);
    dcl[hr] += __shfl_xor_sync(0xffffffffu, dcl[hr], 2);
    if (wrow[hr] < 0) continue;
    if (lane % 4 == 0) p.ws_cl[wrow[hr]] = dcl[hr];
#pragma unroll
    for (int t = 0; t < D / 8; ++t) {
      *reinterpret_cast<uint32_t*>(al_ws + wrow[hr] * D + t * 8 + c) = MM::pack(dal[t][2 * hr], dal[t][2 * hr + 1]);
      *reinterpret_cast<uint32_t*>(y_ws + wrow[hr] * D + t * 8 + c) = MM::pack(dy[t][2 * hr], dy[t][2 * hr + 1]);
    }
  }
}

// ---- 3. stage-1 backward, query orientation: dq -------------------------------------------

// B2Max: the widest key row held (64 at head dim 128 keeps 2 CTAs per SM; 128 serves 720p's
// 45 x 80 tiles at the price of register spills and one CTA per SM, Hopper's shared memory only).
template <typename T, int D, int B2Max = (D == 128 ? 64 : 128)>
struct Dq1Config {
  static constexpr int kB2Max = B2Max;
  static constexpr int kLd = D + 8;
  static constexpr size_t kRowBytes = size_t(kB2Max) * kLd * sizeof(T);
  // K and V rows double-buffered, then the daL and dY rows of the current key tile (one buffer,
  // loaded while S is computed).
  static constexpr size_t kSmem = 2 * 2 * kRowBytes + 2 * kRowBytes;
};

template <typename T, int D, int B2Max>
__global__ void __launch_bounds__(256) monarch_bwd_dq1_kernel(const MonarchBwdParams bp) {
  const MonarchFwdParams& p = bp.f;
  using C = Dq1Config<T, D, B2Max>;
  using MM = Mma<T>;
  constexpr float kLn2 = 0.6931471805599453f;
  constexpr int kNT = C::kB2Max / 8;
  const int k = blockIdx.x, m = blockIdx.y, bh = blockIdx.z;
  extern __shared__ __align__(128) unsigned char smem[];
  T* bufs = reinterpret_cast<T*>(smem);  // [stage][K, V][kB2Max][kLd]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, c = (lane % 4) * 2;
  const int b = bh / p.H, h = bh % p.H;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[2];
  const T* vg = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[2];
  T* dqg = static_cast<T*>(bp.dq) + b * bp.dq_stride[0] + h * bp.dq_stride[2];
  const T* dal_ws = static_cast<const T*>(p.ws_al);
  const T* dy_ws = static_cast<const T*>(p.ws_y);

  for (int i = tid; i < int(2 * 2 * C::kRowBytes / 16); i += blockDim.x) {
    reinterpret_cast<uint4*>(smem)[i] = make_uint4(0, 0, 0, 0);
  }
  const int k_off = row_offset(p, k);
  const int ntu = (p.b2 + 7) / 8, kku = (p.b2 + 15) / 16;
  const int j_row[2] = {warp * 16 + lane / 4, warp * 16 + lane / 4 + 8};
  const int q_tok = tile_base(p, m) + k_off;
  uint32_t qa[D / 16][4];
  load_a_rows<T, D>(qa, j_row[0] < p.b2 ? qg + int64_t(q_tok + j_row[0]) * p.q_stride[1] : nullptr,
                    j_row[1] < p.b2 ? qg + int64_t(q_tok + j_row[1]) * p.q_stride[1] : nullptr, lane);
  auto load = [&](int n, int stage) {
    T* Kd = bufs + (stage * 2) * C::kB2Max * C::kLd;
    T* Vd = Kd + C::kB2Max * C::kLd;
    const int64_t base = key_tile_base(p, n) + k_off;
    for (int idx = tid; idx < p.b2 * (D / 8); idx += blockDim.x) {
      const int i = idx / (D / 8), dc = idx % (D / 8);
      cp_async_16(Kd + i * C::kLd + dc * 8, kg + (base + i) * p.k_stride[1] + dc * 8, true);
      cp_async_16(Vd + i * C::kLd + dc * 8, vg + (base + i) * p.v_stride[1] + dc * 8, true);
    }
  };
  __syncthreads();
  float acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  T* dLs = bufs + 4 * C::kB2Max * C::kLd;  // [kB2Max][kLd] daL rows of the columns j
  T* dYs = dLs + C::kB2Max * C::kLd;
  const int kb = kku * 16;  // rows of dLs / dYs that the warps read
  int n = next_allowed(p, m, 0);
  if (n < p.F) load(n, 0);
  cp_async_commit();
  for (int it = 0; n < p.F; ++it) {
    const int n_next = next_allowed(p, m, n + 1);
    cp_async_wait_group<0>();
    __syncthreads();  // K, V of (n, k) landed; every warp is done with the previous iteration
    for (int idx = tid; idx < kb * (D / 8); idx += blockDim.x) {
      const int jj = idx / (D / 8), dc = idx % (D / 8);
      const bool valid = jj < p.b2;
      const int64_t wr = valid ? ws_row(p, bh, m, jj, n, k) : 0;
      cp_async_16(dLs + jj * C::kLd + dc * 8, dal_ws + wr * D + dc * 8, valid);
      cp_async_16(dYs + jj * C::kLd + dc * 8, dy_ws + wr * D + dc * 8, valid);
    }
    cp_async_commit();
    if (n_next < p.F) load(n_next, (it + 1) % 2);
    cp_async_commit();
    const T* Kr = bufs + ((it % 2) * 2) * C::kB2Max * C::kLd;
    const T* Vr = Kr + C::kB2Max * C::kLd;
    int64_t row[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) row[hr] = j_row[hr] < p.b2 ? ws_row(p, bh, m, j_row[hr], n, k) : -1;
    // S = Q_k K^T while daL, dY land; then dR = daL K^T + dY V^T (16 columns x b2 keys)
    float s[kNT][4], dr[kNT][4];
#pragma unroll
    for (int t = 0; t < kNT; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[t][e] = dr[t][e] = 0.f;
    }
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
      for (int tp = 0; tp < kNT / 2; ++tp) {
        if (2 * tp < ntu) {
          uint32_t bk[4];
          ldmatrix_x4(bk, Kr + (tp * 16 + (lane / 16) * 8 + lane % 8) * C::kLd + ks * 16 + ((lane / 8) % 2) * 8);
          MM::run(s[2 * tp], qa[ks], bk[0], bk[1]);
          MM::run(s[2 * tp + 1], qa[ks], bk[2], bk[3]);
        }
      }
    }
    cp_async_wait_group<1>();
    __syncthreads();  // daL, dY of (n, k) landed
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t la[4], ya[4];
      ldmatrix_a(la, dLs + warp * 16 * C::kLd, C::kLd * sizeof(T), ks, lane);
      ldmatrix_a(ya, dYs + warp * 16 * C::kLd, C::kLd * sizeof(T), ks, lane);
#pragma unroll
      for (int tp = 0; tp < kNT / 2; ++tp) {
        if (2 * tp < ntu) {
          const int off = (tp * 16 + (lane / 16) * 8 + lane % 8) * C::kLd + ks * 16 + ((lane / 8) % 2) * 8;
          uint32_t bk[4];
          ldmatrix_x4(bk, Kr + off);
          MM::run(dr[2 * tp], la, bk[0], bk[1]);
          MM::run(dr[2 * tp + 1], la, bk[2], bk[3]);
          ldmatrix_x4(bk, Vr + off);
          MM::run(dr[2 * tp], ya, bk[0], bk[1]);
          MM::run(dr[2 * tp + 1], ya, bk[2], bk[3]);
        }
      }
    }
    // R = softmax(s) within the row, log R, then dz = R (dR + dcL log R - D1).
    float M[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int t = 0; t < kNT; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = t * 8 + c + e % 2;
        s[t][e] = (t < ntu && i < p.b2) ? s[t][e] * p.scale_log2 : -INFINITY;
        M[e / 2] = fmaxf(M[e / 2], s[t][e]);
      }
    }
    float Z[2] = {0.f, 0.f};
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      M[hr] = fmaxf(M[hr], __shfl_xor_sync(0xffffffffu, M[hr], 1));
      M[hr] = fmaxf(M[hr], __shfl_xor_sync(0xffffffffu, M[hr], 2));
    }
#pragma unroll
    for (int t = 0; t < kNT; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) Z[e / 2] += s[t][e] == -INFINITY ? 0.f : exp2f(s[t][e] - M[e / 2]);
    }
    float lse[2], dcl[2], d1[2] = {0.f, 0.f};
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      Z[hr] += __shfl_xor_sync(0xffffffffu, Z[hr], 1);
      Z[hr] += __shfl_xor_sync(0xffffffffu, Z[hr], 2);
      lse[hr] = M[hr] + log2f(Z[hr]);
      dcl[hr] = row[hr] >= 0 ? p.ws_cl[row[hr]] : 0.f;
    }
    // s becomes R, dr the full dR = daL . K + dY . V + dcL log R; D1 = sum R dR.
#pragma unroll
    for (int t = 0; t < kNT; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float z = s[t][e] - lse[e / 2];  // log2 R
        const float R = s[t][e] == -INFINITY ? 0.f : exp2f(z);
        dr[t][e] = R == 0.f ? 0.f : dr[t][e] + dcl[e / 2] * kLn2 * z;
        s[t][e] = R;
        d1[e / 2] += R * dr[t][e];
      }
    }
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      d1[hr] += __shfl_xor_sync(0xffffffffu, d1[hr], 1);
      d1[hr] += __shfl_xor_sync(0xffffffffu, d1[hr], 2);
      if (row[hr] >= 0 && lane % 4 == 0) bp.ws_d1[row[hr]] = d1[hr];  // for the dK / dV kernel
    }
#pragma unroll
    for (int t = 0; t < kNT; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[t][e] = bp.scale * s[t][e] * (dr[t][e] - d1[e / 2]);
    }
    // dq += dz K (the scale is in dz)
#pragma unroll
    for (int kk = 0; kk < kNT / 2; ++kk) {
      if (kk < kku) {
        const uint32_t pa[4] = {MM::pack(s[2 * kk][0], s[2 * kk][1]), MM::pack(s[2 * kk][2], s[2 * kk][3]),
                                MM::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                MM::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dt2 = 0; dt2 < D / 16; ++dt2) {
          uint32_t bv[4];
          ldmatrix_x4_trans(bv, Kr + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * C::kLd + dt2 * 16 + (lane / 16) * 8);
          MM::run(acc[2 * dt2], pa, bv[0], bv[1]);
          MM::run(acc[2 * dt2 + 1], pa, bv[2], bv[3]);
        }
      }
    }
    n = n_next;  // the next iteration's barrier protects both buffers
  }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    if (j_row[hr] >= p.b2) continue;
    const float* part = bp.dq_acc + query_index(p, bh, m, k, j_row[hr]) * D;
    T* dst = dqg + int64_t(q_tok + j_row[hr]) * bp.dq_stride[1];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      const float2 x = *reinterpret_cast<const float2*>(part + i * 8 + c);
      *reinterpret_cast<uint32_t*>(dst + i * 8 + c) = MM::pack(acc[i][2 * hr] + x.x, acc[i][2 * hr + 1] + x.y);
    }
  }
}

// ---- 4. stage-1 backward, key orientation: dK, dV ------------------------------------------

template <typename T, int D, int B2Max = (D == 128 ? 64 : 128)>
struct DkvConfig {
  static constexpr int kB2Max = B2Max;
  static constexpr int kLd = D + 8;
  // K and V of the key row, then per query tile: q[m,k,:], daL and dY rows of every column j.
  static constexpr size_t kBlock = size_t(kB2Max) * kLd * sizeof(T);
  static constexpr size_t kSmem = 5 * kBlock + 3 * kB2Max * sizeof(float);
};

template <typename T, int D, int B2Max>
__global__ void __launch_bounds__(256) monarch_bwd_dkv_kernel(const MonarchBwdParams bp) {
  const MonarchFwdParams& p = bp.f;
  using C = DkvConfig<T, D, B2Max>;
  using MM = Mma<T>;
  constexpr float kLn2 = 0.6931471805599453f;
  const int k = blockIdx.x, n = blockIdx.y, bh = blockIdx.z;
  bool attended = false;
  for (int m = 0; m < p.A && !attended; ++m) attended = tile_allowed(p, m, n);
  if (!attended) return;  // dk, dv of this row stay zero (KV-cache mode zeroes them first)
  extern __shared__ __align__(128) unsigned char smem[];
  T* Ks = reinterpret_cast<T*>(smem);
  T* Vs = Ks + C::kB2Max * C::kLd;
  T* Qs = Vs + C::kB2Max * C::kLd;
  T* dLs = Qs + C::kB2Max * C::kLd;
  T* dYs = dLs + C::kB2Max * C::kLd;
  float* lse1s = reinterpret_cast<float*>(dYs + C::kB2Max * C::kLd);
  float* d1s = lse1s + C::kB2Max;
  float* dcls = d1s + C::kB2Max;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, r = lane / 4, c = (lane % 4) * 2;
  const int b = bh / p.H, h = bh % p.H;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[2];
  const T* vg = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[2];
  const T* dal_ws = static_cast<const T*>(p.ws_al);
  const T* dy_ws = static_cast<const T*>(p.ws_y);
  const int k_off = row_offset(p, k);
  const int64_t key_base = key_tile_base(p, n) + k_off;
  const int kb = ((p.b2 + 15) / 16) * 16;  // rows of the blocks that the MMAs read
  for (int idx = tid; idx < kb * (D / 8); idx += blockDim.x) {
    const int i = idx / (D / 8), dc = idx % (D / 8);
    const bool valid = i < p.b2;
    cp_async_16(Ks + i * C::kLd + dc * 8, kg + (valid ? key_base + i : 0) * p.k_stride[1] + dc * 8, valid);
    cp_async_16(Vs + i * C::kLd + dc * 8, vg + (valid ? key_base + i : 0) * p.v_stride[1] + dc * 8, valid);
  }
  cp_async_commit();
  const int i0 = warp * 16;  // this warp's keys
  const T* Kw = Ks + i0 * C::kLd;
  const T* Vw = Vs + i0 * C::kLd;
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int t = 0; t < D / 8; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[t][e] = dv[t][e] = 0.f;
  }
  for (int m = 0; m < p.A; ++m) {
    if (!tile_allowed(p, m, n)) continue;
    __syncthreads();  // the previous query tile's blocks are no longer read
    const int q_tok = tile_base(p, m) + k_off;
    for (int idx = tid; idx < kb * (D / 8); idx += blockDim.x) {
      const int j = idx / (D / 8), dc = idx % (D / 8);
      const bool valid = j < p.b2;
      const int64_t row = valid ? ws_row(p, bh, m, j, n, k) : 0;
      cp_async_16(Qs + j * C::kLd + dc * 8, qg + (valid ? q_tok + j : 0) * p.q_stride[1] + dc * 8, valid);
      cp_async_16(dLs + j * C::kLd + dc * 8, dal_ws + row * D + dc * 8, valid);
      cp_async_16(dYs + j * C::kLd + dc * 8, dy_ws + row * D + dc * 8, valid);
    }
    for (int j = tid; j < kb; j += blockDim.x) {
      const bool valid = j < p.b2;
      const int64_t row = valid ? ws_row(p, bh, m, j, n, k) : 0;
      lse1s[j] = valid ? p.ws_lse1[row] : 0.f;
      d1s[j] = valid ? bp.ws_d1[row] : 0.f;
      dcls[j] = valid ? p.ws_cl[row] : 0.f;
    }
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    for (int j0 = 0; j0 < p.b2; j0 += 16) {
      // S^T = K_i q_j^T and dR^T = K_i daL_j^T + V_i dY_j^T: 16 keys x 16 columns
      float s[2][4] = {}, dr[2][4] = {};
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t ka[4], va[4], bq[4], bl[4], by[4];
        ldmatrix_a(ka, Kw, C::kLd * sizeof(T), ks, lane);
        ldmatrix_a(va, Vw, C::kLd * sizeof(T), ks, lane);
        const int off = (j0 + (lane / 16) * 8 + lane % 8) * C::kLd + ks * 16 + ((lane / 8) % 2) * 8;
        ldmatrix_x4(bq, Qs + off);
        ldmatrix_x4(bl, dLs + off);
        ldmatrix_x4(by, dYs + off);
        MM::run(s[0], ka, bq[0], bq[1]);
        MM::run(s[1], ka, bq[2], bq[3]);
        MM::run(dr[0], ka, bl[0], bl[1]);
        MM::run(dr[1], ka, bl[2], bl[3]);
        MM::run(dr[0], va, by[0], by[1]);
        MM::run(dr[1], va, by[2], by[3]);
      }
      float R[2][4];
#pragma unroll
      for (int t = 0; t < 2; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = j0 + t * 8 + c + e % 2;
          float pr = 0.f, dz = 0.f;
          if (j < p.b2) {
            const float z = s[t][e] * p.scale_log2 - lse1s[j];  // log2 R
            pr = exp2f(z);
            dz = pr * (dr[t][e] + dcls[j] * kLn2 * z - d1s[j]);
          }
          R[t][e] = pr;
          s[t][e] = bp.scale * dz;
        }
      }
      const uint32_t pr[4] = {MM::pack(R[0][0], R[0][1]), MM::pack(R[0][2], R[0][3]), MM::pack(R[1][0], R[1][1]),
                              MM::pack(R[1][2], R[1][3])};
      const uint32_t pz[4] = {MM::pack(s[0][0], s[0][1]), MM::pack(s[0][2], s[0][3]), MM::pack(s[1][0], s[1][1]),
                              MM::pack(s[1][2], s[1][3])};
#pragma unroll
      for (int dt2 = 0; dt2 < D / 16; ++dt2) {
        const int off = (j0 + ((lane / 8) % 2) * 8 + lane % 8) * C::kLd + dt2 * 16 + (lane / 16) * 8;
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, dLs + off);
        MM::run(dk[2 * dt2], pr, bv[0], bv[1]);
        MM::run(dk[2 * dt2 + 1], pr, bv[2], bv[3]);
        ldmatrix_x4_trans(bv, Qs + off);
        MM::run(dk[2 * dt2], pz, bv[0], bv[1]);
        MM::run(dk[2 * dt2 + 1], pz, bv[2], bv[3]);
        ldmatrix_x4_trans(bv, dYs + off);
        MM::run(dv[2 * dt2], pr, bv[0], bv[1]);
        MM::run(dv[2 * dt2 + 1], pr, bv[2], bv[3]);
      }
    }
  }
  T* dkg = static_cast<T*>(bp.dk) + b * bp.dk_stride[0] + h * bp.dk_stride[2];
  T* dvg = static_cast<T*>(bp.dv) + b * bp.dv_stride[0] + h * bp.dv_stride[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int i = i0 + r + hr * 8;
    if (i >= p.b2) continue;
    T* kd = dkg + (key_base + i) * bp.dk_stride[1];
    T* vd = dvg + (key_base + i) * bp.dv_stride[1];
#pragma unroll
    for (int t = 0; t < D / 8; ++t) {
      *reinterpret_cast<uint32_t*>(kd + t * 8 + c) = MM::pack(dk[t][2 * hr], dk[t][2 * hr + 1]);
      *reinterpret_cast<uint32_t*>(vd + t * 8 + c) = MM::pack(dv[t][2 * hr], dv[t][2 * hr + 1]);
    }
  }
}

// Zeroes rows [0, rows) of a [B, rows, H, D] view (16-byte chunks).
template <int D>
__global__ void zero_rows_kernel(void* data, int64_t s0, int64_t s1, int64_t s2, int B, int64_t rows, int H,
                                 int elem_bytes) {
  const int chunks = D * elem_bytes / 16;
  const int64_t total = int64_t(B) * rows * H * chunks;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * blockDim.x) {
    const int ch = int(idx % chunks);
    const int64_t rest = idx / chunks;
    const int h = int(rest % H);
    const int64_t s = (rest / H) % rows;
    const int b = int(rest / (H * rows));
    char* base = static_cast<char*>(data) + (b * s0 + s * s1 + h * s2) * elem_bytes;
    reinterpret_cast<uint4*>(base)[ch] = make_uint4(0, 0, 0, 0);
  }
}

}  // namespace cuda_detail
}  // namespace monarchrt
