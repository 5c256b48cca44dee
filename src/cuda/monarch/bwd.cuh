// CUDA backward of one-iteration Monarch attention (specification sections 2 and 4; the
// gradients are derived in src/ref/backward.cpp). Four launches on one stream, every reduction
// inside one CTA (no atomics, results independent of scheduling):
//
//  0. stage 1 of the forward (two_pass.cuh) recomputes aL, Y, cL into the workspace, plus the
//     stage-1 log-sum-exp lse1 per workspace row;
//  1. monarch_bwd_stage2_kernel, one CTA per query column (m, j): a first sweep over the column's
//     virtual keys (n, k) gives each query's stage-2 log-sum-exp and Delta = dO . out (or both
//     come from the forward's log-sum-exp and output, when the caller kept them); the second
//     forms du = L (dO . Y - Delta) and from it the stage-2 part of dq, s * sum du aL (fp32, to
//     the workspace), and per virtual key daL = s sum_l du q, dY = sum_l L dO, dcL = -sum_l du,
//     written over aL, Y, cL in place;
//  2. monarch_bwd_dq1_kernel, query orientation (like the forward's stage 1): per (m, k) and
//     column j, over the allowed key tiles: R from lse1 (as step 3 forms it),
//     dR_i = daL . K_i + dY . V_i + dcL log R_i, D1 = sum_i R_i dR_i (kept per workspace row for
//     step 3, whose warps each hold 16 of the keys this sums over),
//     dz = R (dR - D1), dq[m,k,j] = (stage-2 part) + s sum_i dz K_i, written in the input dtype;
//  3. monarch_bwd_dkv_kernel, key orientation: per key row (n, k), one warp per 16 keys i, over
//     every query tile m that may attend n and every column j: R rebuilt from lse1,
//     dK_i = sum R daL + s dz q[m,k,j], dV_i = sum R dY, written in the input dtype. (In KV-cache
//     mode dk and dv are zeroed first: keys nobody attends get exactly zero.)
//
// On Hopper (rows of up to 64 keys) steps 2 and 3 trade places: monarch_bwd_dkv_wg_kernel forms
// D1 itself (a sum over its key row) and leaves s dz in the workspace over the consumed daL rows,
// and monarch_bwd_dq_wg_kernel forms dq = (stage-2 part) + sum (s dz) K from it: one product per
// workspace row instead of dq1's four, and no second read of daL / dY.
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
  float* ws_d1;     // per workspace row: D1 = sum_i R_i dR_i (written by the portable dq1 kernel)
  float* dq_acc;    // per query ((bh * A + m) * b1 + l) * b2 + j: D floats, the stage-2 part of dq
  // Optional, from cuda::monarch_attention_with_lse (both or neither): the forward's output
  // (strides batch, token, head) and each query's stage-2 log-sum-exp, natural log, [B*H][Sq].
  const void* fwd_out;
  int64_t fo_stride[3];
  const float* lse_in;
};

__device__ __forceinline__ int64_t query_index(const MonarchFwdParams& p, int bh, int m, int l, int j) {
  return ((int64_t(bh) * p.A + m) * p.b1 + l) * p.b2 + j;
}

// A fragments of rows 16 x 16 (columns ks * 16 ..) of a row-major shared-memory block.
__device__ __forceinline__ void ldmatrix_a(uint32_t (&a)[4], const void* block, int ld_bytes, int ks, int lane) {
  ldmatrix_x4(a, static_cast<const char*>(block) + (lane % 16) * ld_bytes + (ks * 16 + (lane / 16) * 8) * 2);
}

// ---- 1. stage-2 backward: one CTA per query column (m, j) ----------------------------------

// The column's b1 queries against its F * b1 virtual keys (n, k), in chunks of kChunk keys of
// one key tile. Warp w owns queries 16 (w % warps) .. + 15 (MMA rows) and, with KG = 2 key
// groups, keys 16 (w / warps) .. + 15 of each chunk (so that four warps share the work of two
// row groups; their partial sums meet in shared memory in a fixed order). A first sweep gives each
// query's stage-2 log-sum-exp and Delta = sum L (dO . Y) = dO . out; the second recomputes
// L and du = L (dO . Y - Delta) per chunk, adds s du aL to dq (registers), and writes L and s du
// to shared memory, from which the CTA forms the chunk's daL = s du^T q, dY = L^T dO (the sums
// over the column's queries run along the MMA's K) and dcL = -sum du, written over the chunk's
// aL, Y, cL rows: every workspace row belongs to one column, so one CTA reads and writes it.
// On Hopper (Tma, b1 of 17 to 32: one chunk per key tile) the copies of aL / Y go through the copy
// engine both ways: a chunk lands by TMA in 128-byte-swizzled tiles (box: 64 features x b1 rows),
// cL by a bulk copy; daL / dY are stored over the consumed tiles with stmatrix and leave by TMA.
template <typename T, int D>
struct Bwd2Config {
  static constexpr int kLd = D + 8;        // row pitch of q, dO, aL, Y: ldmatrix rows hit distinct banks
  static constexpr int kChunk = 32;        // virtual keys per step
  static constexpr int kPLd = kChunk + 8;  // row pitch of the L and s du tiles
  static constexpr size_t kStage = size_t(2 * kChunk) * kLd * sizeof(T) + kChunk * sizeof(float);
  // Tma: aL tiles, Y tiles (64 features x kChunk rows each), then cL from the 16-byte boundary at
  // or before the chunk's first row (at most 40 floats), padded to keep the tiles 1024-byte aligned.
  static constexpr size_t kTile = size_t(kChunk) * 64 * sizeof(T);
  static constexpr size_t kStageTma = 2 * (D / 64) * kTile + 1024;
  // two stages of aL / Y / cL, q and dO of the column (b1 rows rounded up to 16), L and s du,
  // and the per-warp column sums of du; Tma: 1024 bytes of alignment slack and two mbarriers.
  static constexpr size_t smem(int b1, bool tma = false) {
    const size_t rows = size_t((b1 + 15) / 16 * 16);
    return (tma ? 1024 + 2 * kStageTma + 16 : 2 * kStage) + 2 * rows * (kLd + kPLd) * sizeof(T) +
           rows / 16 * kChunk * sizeof(float);
  }
};

// The Hopper stage-2 backward's tensor maps over the workspace planes, [rows][D], boxes of 64
// features x b1 rows (one key tile of a column), 128-byte swizzle.
struct Bwd2Tma {
  CUtensorMap al, y;
};

template <typename T, int D, int MaxWarps, int KG, bool Tma = false>
__global__ void __launch_bounds__(32 * MaxWarps)
    monarch_bwd_stage2_kernel(const MonarchBwdParams bp, const __grid_constant__ Bwd2Tma tma) {
  const MonarchFwdParams& p = bp.f;
  using C = Bwd2Config<T, D>;
  using MM = Mma<T>;
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr int kCh = C::kChunk;
  constexpr int kW = kCh / KG;  // virtual keys of a chunk per warp
  static_assert(KG == 1 || KG == 2, "one or two key groups");
  // with two key groups (b1 <= 32) the second group's dq part passes through the stages
  static_assert(KG == 1 || size_t(2 * (D / 8) * 32) * sizeof(float4) <= 2 * C::kStage, "stages too small");
  static_assert(!Tma || KG == 2, "the Hopper variant serves b1 of 17 to 32");
  constexpr size_t kStageB = Tma ? C::kStageTma : C::kStage;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* stages = smem_raw + (Tma ? (1024u - (smem_addr(smem_raw) & 1023u)) & 1023u : 0u);
  // warps: one per 16 query rows and key group (the launch gives at least warps * KG); any
  // further warps of the CTA (nwarps) join the daL / dY products and the copies only.
  // (Tma: b1 of 17 to 32 and 128 threads, so these are compile-time constants there)
  const int qp = Tma ? 32 : (p.b1 + 15) / 16 * 16, warps = qp / 16, nwarps = Tma ? 4 : int(blockDim.x) / 32;
  // stages: 2 x [aL, Y][kCh][kLd], cL[kCh]; Tma: 2 x [aL tiles][Y tiles][cL]
  T* Qs = reinterpret_cast<T*>(stages + 2 * kStageB);  // [qp][kLd]
  T* dOs = Qs + qp * C::kLd;
  T* Ls = dOs + qp * C::kLd;  // [qp][kPLd]
  T* dUs = Ls + qp * C::kPLd;
  float* dcl_part = reinterpret_cast<float*>(dUs + qp * C::kPLd);  // [warps][kCh]
  uint64_t* full = reinterpret_cast<uint64_t*>(dcl_part + warps * kCh);  // Tma: one mbarrier per stage
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, r = lane / 4, c = (lane % 4) * 2;
  const int rg = warp % warps, kh = warp / warps;  // the warp's query rows and key group
  const bool row_warp = kh < KG;
  const int j = blockIdx.x, m = blockIdx.y, bh = bh_last_first(), b = bh / p.H, h = bh % p.H;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  const T* dog = static_cast<const T*>(bp.dout) + b * bp.do_stride[0] + h * bp.do_stride[2];
  T* al_ws = static_cast<T*>(p.ws_al);
  T* y_ws = static_cast<T*>(p.ws_y);

  // Stage rows past a chunk's end are read by the MMAs (and masked): zero them once.
  for (int i = tid; i < int(2 * kStageB / 16); i += blockDim.x) {
    reinterpret_cast<uint4*>(stages)[i] = make_uint4(0, 0, 0, 0);
  }
  if (Tma && tid == 0) {
    mbar_init(&full[0], 1);
    mbar_init(&full[1], 1);
    fence_mbar_init();
  }
  if constexpr (Tma) fence_proxy_async_smem();  // the zeros before the copy engine's writes
  __syncthreads();
  const int q_base = tile_base(p, m);
  for (int idx = tid; idx < qp * (D / 8); idx += blockDim.x) {
    const int l = idx / (D / 8), dc = idx % (D / 8);
    const bool valid = l < p.b1;
    const int64_t tok = valid ? q_base + row_offset(p, l) + j : 0;
    cp_async_16(Qs + l * C::kLd + dc * 8, qg + tok * p.q_stride[1] + dc * 8, valid);
    cp_async_16(dOs + l * C::kLd + dc * 8, dog + tok * bp.do_stride[1] + dc * 8, valid);
  }
  cp_async_commit();
  auto load = [&](int n, int k0, int stage) {
    if constexpr (Tma) {  // by thread 0; k0 = 0, the chunk is the key tile's b1 rows
      const int64_t row0 = ws_row(p, bh, m, j, n, 0);
      unsigned char* st = stages + stage * kStageB;
      const uint32_t cl_bytes = uint32_t((p.b1 + 3 + 3) / 4 * 16);
      mbar_expect(&full[stage], uint32_t(2 * (D / 64) * p.b1 * 64 * sizeof(T)) + cl_bytes);
#pragma unroll
      for (int hf = 0; hf < D / 64; ++hf) {
        tma_load_tile_2d(st + hf * C::kTile, &tma.al, hf * 64, int(row0), &full[stage]);
        tma_load_tile_2d(st + (D / 64 + hf) * C::kTile, &tma.y, hf * 64, int(row0), &full[stage]);
      }
      // cL from the 16-byte boundary at or before row0 (the lse1 rows follow cL in the workspace)
      bulk_load(st + 2 * (D / 64) * C::kTile, p.ws_cl + (row0 & ~int64_t(3)), cl_bytes, &full[stage]);
      return;
    }
    T* aLd = reinterpret_cast<T*>(stages + stage * C::kStage);
    T* Yd = aLd + kCh * C::kLd;
    float* cLd = reinterpret_cast<float*>(Yd + kCh * C::kLd);
    const int nrows = min(kCh, p.b1 - k0);
    const int64_t row0 = ws_row(p, bh, m, j, n, k0);
    for (int idx = tid; idx < nrows * (D / 8); idx += blockDim.x) {
      const int kc = idx / (D / 8), dc = idx % (D / 8);
      cp_async_16(aLd + kc * C::kLd + dc * 8, al_ws + (row0 + kc) * D + dc * 8, true);
      cp_async_16(Yd + kc * C::kLd + dc * 8, y_ws + (row0 + kc) * D + dc * 8, true);
    }
    for (int kc = tid; kc < nrows; kc += blockDim.x) cp_async_4(cLd + kc, p.ws_cl + row0 + kc, true);
  };

  const bool row_ok[2] = {rg * 16 + r < p.b1, rg * 16 + r + 8 < p.b1};
  const T* Qw = Qs + rg * 16 * C::kLd;
  const T* dOw = dOs + rg * 16 * C::kLd;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f}, dsum[2] = {0.f, 0.f};
  float lse[2] = {0.f, 0.f}, delta[2] = {0.f, 0.f};
  float acc[D / 8][4];  // s sum du aL: the stage-2 part of dq
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  if (bp.lse_in != nullptr) {  // the forward's statistics: no first sweep
    float* lse_s = dcl_part;  // [qp] each, in the column-sum buffer, first written after a barrier
    float* delta_s = dcl_part + qp;
    const T* og = static_cast<const T*>(bp.fwd_out) + b * bp.fo_stride[0] + h * bp.fo_stride[2];
    // Four rows per warp at a time, every load issued before the sums (rows past b1 read row
    // b1 - 1 again and are not written).
    for (int l0 = warp; l0 < p.b1; l0 += 4 * nwarps) {
      float dot[4] = {0.f, 0.f, 0.f, 0.f}, lse_row[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t tok = q_base + row_offset(p, min(l0 + i * nwarps, p.b1 - 1)) + j;
#pragma unroll
        for (int d = lane; d < D; d += 32) {
          dot[i] += MM::to_float(dog[tok * bp.do_stride[1] + d]) * MM::to_float(og[tok * bp.fo_stride[1] + d]);
        }
        lse_row[i] = bp.lse_in[int64_t(bh) * p.A * p.b1 * p.b2 + tok];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int off = 16; off > 0; off /= 2) dot[i] += __shfl_xor_sync(0xffffffffu, dot[i], off);
        const int l = l0 + i * nwarps;
        if (lane == 0 && l < p.b1) {
          delta_s[l] = dot[i];
          lse_s[l] = lse_row[i] * kLog2e;
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      if (!row_ok[hr]) continue;
      lse[hr] = lse_s[rg * 16 + r + hr * 8];
      delta[hr] = delta_s[rg * 16 + r + hr * 8];
    }
  }
  // Tma: chunks (key tiles) taken in both passes so far: stage ci % 2, parity (ci / 2) % 2. The
  // stage of chunk c is refilled with chunk c + 2 at the start of iteration c + 1, once the copy
  // engine has read chunk c's daL / dY out of it.
  int ci = 0;
  const int n_lim = allowed_lim(p, m);
  for (int pass = bp.lse_in != nullptr ? 1 : 0; pass < 2; ++pass) {
    int n = next_allowed_in(p, m, 0, n_lim), k0 = 0;
    if constexpr (Tma) {
      if (tid == 0 && n < p.F) {
        load(n, 0, ci % 2);
        const int n1 = next_allowed_in(p, m, n + 1, n_lim);
        if (n1 < p.F) load(n1, 0, (ci + 1) % 2);
      }
    } else {
      if (n < p.F) load(n, k0, 0);
      cp_async_commit();
    }
    for (int it = 0; n < p.F; ++it, ++ci) {
      int n_next = n, k_next = k0 + kCh;
      if (k_next >= p.b1) {
        n_next = next_allowed_in(p, m, n + 1, n_lim);
        k_next = 0;
      }
      const int st = Tma ? ci % 2 : it % 2;
      if constexpr (Tma) {
        if (tid == 0 && it > 0 && n_next < p.F) {  // the other stage, freed by the last iteration
          bulk_wait_read<0>();
          load(n_next, 0, st ^ 1);
        }
        if (it == 0) {  // q and dO of the column (cp.async, before the loop)
          cp_async_wait_group<0>();
          __syncthreads();
        }
        mbar_wait(&full[st], (ci / 2) & 1);
      } else {
        if (n_next < p.F) load(n_next, k_next, (it + 1) % 2);
        cp_async_commit();
        cp_async_wait_group<1>();
        __syncthreads();  // this chunk landed; the previous chunk's L / du tiles are no longer read
      }
      const int nrows = min(kCh, p.b1 - k0);
      const T* aLc = reinterpret_cast<const T*>(stages + st * kStageB);
      const T* Yc = aLc + (Tma ? (D / 64) * C::kTile / sizeof(T) : kCh * C::kLd);
      const float* cLc = Tma ? reinterpret_cast<const float*>(stages + st * kStageB + 2 * (D / 64) * C::kTile) +
                                   (ws_row(p, bh, m, j, n, 0) & 3)
                             : reinterpret_cast<const float*>(Yc + kCh * C::kLd);
      // u = q . aL, g = dO . Y for the warp's 16 queries x kW virtual keys (kh * kW ..)
      const T* aLw = aLc + kh * kW * C::kLd;
      float u[kW / 8][4], g[kW / 8][4];
#pragma unroll
      for (int t = 0; t < kW / 8; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) u[t][e] = g[t][e] = 0.f;
      }
      if (row_warp) {
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
          uint32_t qa[4], da[4];
          ldmatrix_a(qa, Qw, C::kLd * sizeof(T), ks, lane);
          ldmatrix_a(da, dOw, C::kLd * sizeof(T), ks, lane);
#pragma unroll
          for (int tp = 0; tp < kW / 16; ++tp) {
            if constexpr (Tma) {  // this lane's row (lane / 16) * 8 + lane % 8 of the 16 keys
              const int row = kh * kW + tp * 16 + (lane / 16) * 8 + lane % 8, chunk = ks * 2 + (lane / 8) % 2;
              uint32_t bk[4], by[4];
              ldmatrix_x4(bk, aLc + sw128_offset(row, chunk, kCh));
              ldmatrix_x4(by, Yc + sw128_offset(row, chunk, kCh));
              MM::run(u[2 * tp], qa, bk[0], bk[1]);
              MM::run(u[2 * tp + 1], qa, bk[2], bk[3]);
              MM::run(g[2 * tp], da, by[0], by[1]);
              MM::run(g[2 * tp + 1], da, by[2], by[3]);
            } else {
              mma_rows16<T>(u[2 * tp], u[2 * tp + 1], qa, aLw + tp * 16 * C::kLd, C::kLd, ks, lane);
              mma_rows16<T>(g[2 * tp], g[2 * tp + 1], da, Yc + (kh * kW + tp * 16) * C::kLd, C::kLd, ks, lane);
            }
          }
        }
        stage2_scores<kW / 8>(u, cLc, kh * kW, nrows, p.scale_log2, lane);
      }
      if (pass == 0) {  // online log-sum-exp and sum L g (helper warps: unused values)
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int t = 0; t < kW / 8; ++t) {
#pragma unroll
          for (int e = 0; e < 4; ++e) mx[e / 2] = fmaxf(mx[e / 2], u[t][e]);
        }
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 1));
          mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 2));
          // a key group may have seen no key yet (max -inf): its sums stay 0
          const float new_max = fmaxf(row_max[hr], mx[hr]);
          const float corr = new_max == -INFINITY ? 1.f : ex2_ftz(row_max[hr] - new_max);
          row_max[hr] = new_max;
          row_sum[hr] *= corr;
          dsum[hr] *= corr;
        }
#pragma unroll
        for (int t = 0; t < kW / 8; ++t) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float pr = row_max[e / 2] == -INFINITY ? 0.f : ex2_ftz(u[t][e] - row_max[e / 2]);
            row_sum[e / 2] += pr;
            dsum[e / 2] += pr * g[t][e];
          }
        }
      } else {
        if (row_warp) {
          // L and du (0 for queries past b1 and keys past the chunk); dq += s du aL
          float colsum[kW / 8][2];
#pragma unroll
          for (int t = 0; t < kW / 8; ++t) {
            colsum[t][0] = colsum[t][1] = 0.f;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const bool ok = row_ok[e / 2] && u[t][e] != -INFINITY;
              const float L = ok ? ex2_ftz(u[t][e] - lse[e / 2]) : 0.f;
              const float du = L * (g[t][e] - delta[e / 2]);
              colsum[t][e % 2] += du;
              g[t][e] = L;
              u[t][e] = bp.scale * du;
            }
          }
#pragma unroll
          for (int kk = 0; kk < kW / 16; ++kk) {
            const uint32_t pa[4] = {MM::pack(u[2 * kk][0], u[2 * kk][1]), MM::pack(u[2 * kk][2], u[2 * kk][3]),
                                    MM::pack(u[2 * kk + 1][0], u[2 * kk + 1][1]),
                                    MM::pack(u[2 * kk + 1][2], u[2 * kk + 1][3])};
#pragma unroll
            for (int dt2 = 0; dt2 < D / 16; ++dt2) {
              uint32_t bv[4];
              const int row = kk * 16 + ((lane / 8) % 2) * 8 + lane % 8;
              ldmatrix_x4_trans(bv, Tma ? aLc + sw128_offset(kh * kW + row, dt2 * 2 + lane / 16, kCh)
                                        : aLw + row * C::kLd + dt2 * 16 + (lane / 16) * 8);
              MM::run(acc[2 * dt2], pa, bv[0], bv[1]);
              MM::run(acc[2 * dt2 + 1], pa, bv[2], bv[3]);
            }
          }
#pragma unroll
          for (int t = 0; t < kW / 8; ++t) {
#pragma unroll
            for (int hr = 0; hr < 2; ++hr) {
              const int l = rg * 16 + r + hr * 8, kc = kh * kW + t * 8 + c;
              *reinterpret_cast<uint32_t*>(Ls + l * C::kPLd + kc) = MM::pack(g[t][2 * hr], g[t][2 * hr + 1]);
              *reinterpret_cast<uint32_t*>(dUs + l * C::kPLd + kc) = MM::pack(u[t][2 * hr], u[t][2 * hr + 1]);
            }
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float s = colsum[t][e];
              s += __shfl_xor_sync(0xffffffffu, s, 4);
              s += __shfl_xor_sync(0xffffffffu, s, 8);
              s += __shfl_xor_sync(0xffffffffu, s, 16);
              if (r == 0) dcl_part[rg * kCh + kh * kW + t * 8 + c + e] = s;
            }
          }
        }
        __syncthreads();  // L, s du and the column sums of every warp are in shared memory
        // daL = (s du)^T q and dY = L^T dO, tiles of 16 keys x 64 features spread over the warps
        const int64_t row0 = ws_row(p, bh, m, j, n, k0);
        constexpr int kFt = D / 64, kTiles = 2 * (kCh / 16) * kFt;
        // Tma: 4 warps, a fixed trip count of kTiles / 4 (unrolled)
#pragma unroll
        for (int step = 0, tile = warp; Tma ? step < kTiles / 4 : tile < kTiles; ++step, tile += nwarps) {
          const int prod = tile / ((kCh / 16) * kFt), vt = (tile / kFt) % (kCh / 16), ft = tile % kFt;
          if (vt * 16 >= nrows) continue;
          const T* P = prod == 0 ? dUs : Ls;
          const T* X = prod == 0 ? Qs : dOs;
          float o[8][4];
#pragma unroll
          for (int i = 0; i < 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
#pragma unroll
          for (int kq = 0; kq < warps; ++kq) {
            uint32_t pa[4];  // (P^T) rows = keys vt*16.., columns = queries kq*16.. (P is [query][key])
            ldmatrix_x4_trans(pa, P + (kq * 16 + (lane / 16) * 8 + lane % 8) * C::kPLd + vt * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
            for (int f2 = 0; f2 < 4; ++f2) {
              uint32_t bx[4];
              ldmatrix_x4_trans(bx, X + (kq * 16 + ((lane / 8) % 2) * 8 + lane % 8) * C::kLd + ft * 64 + f2 * 16 +
                                        (lane / 16) * 8);
              MM::run(o[2 * f2], pa, bx[0], bx[1]);
              MM::run(o[2 * f2 + 1], pa, bx[2], bx[3]);
            }
          }
          if constexpr (Tma) {  // over the chunk's aL / Y tiles, which nobody reads any more
            T* tile = const_cast<T*>(prod == 0 ? aLc : Yc);
            const int row = vt * 16 + ((lane / 8) % 2) * 8 + lane % 8;
#pragma unroll
            for (int f2 = 0; f2 < 4; ++f2) {
              const uint32_t x[4] = {MM::pack(o[2 * f2][0], o[2 * f2][1]), MM::pack(o[2 * f2][2], o[2 * f2][3]),
                                     MM::pack(o[2 * f2 + 1][0], o[2 * f2 + 1][1]),
                                     MM::pack(o[2 * f2 + 1][2], o[2 * f2 + 1][3])};
              stmatrix_x4(tile + sw128_offset(row, ft * 8 + f2 * 2 + lane / 16, kCh), x);
            }
            continue;
          }
          T* dst = prod == 0 ? al_ws : y_ws;
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const int kc = vt * 16 + r + hr * 8;
            if (kc >= nrows) continue;
            T* row = dst + (row0 + kc) * D + ft * 64;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
              *reinterpret_cast<uint32_t*>(row + i * 8 + c) = MM::pack(o[i][2 * hr], o[i][2 * hr + 1]);
            }
          }
        }
        for (int kc = tid; kc < nrows; kc += blockDim.x) {
          float s = 0.f;
          for (int w = 0; w < warps; ++w) s += dcl_part[w * kCh + kc];
          p.ws_cl[row0 + kc] = -s;
        }
        if constexpr (Tma) fence_proxy_async_smem();  // the daL / dY tiles are read by the copy engine
      }
      if (Tma || pass == 0) __syncthreads();  // this stage is refilled (Tma: and stored) next
      if constexpr (Tma) {
        if (pass == 1 && tid == 0) {
          const int64_t row0 = ws_row(p, bh, m, j, n, 0);
#pragma unroll
          for (int hf = 0; hf < D / 64; ++hf) {
            tma_store_tile_2d(&tma.al, hf * 64, int(row0), aLc + hf * C::kTile / sizeof(T));
            tma_store_tile_2d(&tma.y, hf * 64, int(row0), Yc + hf * C::kTile / sizeof(T));
          }
          bulk_commit();
        }
      }
      n = n_next;
      k0 = k_next;
    }
    cp_async_wait_group<0>();
    if (Tma && tid == 0) bulk_wait<0>();  // the stages are free once the last stores are done
    __syncthreads();  // the next pass refills both stages
    if (pass == 0) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        row_sum[hr] += __shfl_xor_sync(0xffffffffu, row_sum[hr], 1);
        row_sum[hr] += __shfl_xor_sync(0xffffffffu, row_sum[hr], 2);
        dsum[hr] += __shfl_xor_sync(0xffffffffu, dsum[hr], 1);
        dsum[hr] += __shfl_xor_sync(0xffffffffu, dsum[hr], 2);
      }
      if (KG == 2) {  // merge the two key groups' (max, sum, sum L g) per row, in the free stages
        float* part = reinterpret_cast<float*>(stages);  // [KG][qp][3]
        if (row_warp && lane % 4 == 0) {
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            float* x = part + (kh * qp + rg * 16 + r + hr * 8) * 3;
            x[0] = row_max[hr];
            x[1] = row_sum[hr];
            x[2] = dsum[hr];
          }
        }
        if constexpr (Tma) fence_proxy_async_smem();  // the next pass's copies overwrite these
        __syncthreads();
        if (row_warp) {
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const float* x0 = part + (rg * 16 + r + hr * 8) * 3;
            const float* x1 = x0 + qp * 3;
            float mx = fmaxf(x0[0], x1[0]);
            mx = mx == -INFINITY ? 0.f : mx;
            const float w0 = ex2_ftz(x0[0] - mx), w1 = ex2_ftz(x1[0] - mx);
            row_max[hr] = mx;
            row_sum[hr] = x0[1] * w0 + x1[1] * w1;
            dsum[hr] = x0[2] * w0 + x1[2] * w1;
          }
        }
        __syncthreads();  // read before the next pass refills the stages
      }
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        lse[hr] = row_max[hr] + log2f(row_sum[hr]);
        delta[hr] = dsum[hr] / row_sum[hr];
      }
    }
  }
  if (KG == 2) {  // the second key group's part of dq joins the first's through the free stages
    float4* part = reinterpret_cast<float4*>(stages);  // [warps][D / 8][32 lanes]
    if (kh == 1) {
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        part[(rg * (D / 8) + i) * 32 + lane] = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
      }
    }
    __syncthreads();
    if (kh == 0) {
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        const float4 x = part[(rg * (D / 8) + i) * 32 + lane];
        acc[i][0] += x.x;
        acc[i][1] += x.y;
        acc[i][2] += x.z;
        acc[i][3] += x.w;
      }
    }
  }
  if (kh != 0) return;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    if (!row_ok[hr]) continue;
    float* dst = bp.dq_acc + query_index(p, bh, m, rg * 16 + r + hr * 8, j) * D;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) *reinterpret_cast<float2*>(dst + i * 8 + c) = make_float2(acc[i][2 * hr], acc[i][2 * hr + 1]);
  }
}

// ---- 2. stage-1 backward, query orientation: dq -------------------------------------------

// The softmax part of step 2 (the portable dq1 kernel). In: s = q . K_i, the raw scores of the
// thread's two columns against a key row; dr = daL . K_i + dY . V_i; the rows' dcL and lse1 (the
// stage-1 recompute's log-sum-exp, log2 units; loaded by the caller early, to hide the latency).
// Out: s = s dz = s R (dR - D1) with R = 2^(s scale log2(e) - lse1), the R the dK / dV kernel
// forms too, and dR = dr + dcL log R (keys past b2: R = dR = 0); D1 = sum_i R_i dR_i of each
// workspace row (row[hr] >= 0) is kept for that kernel.
template <int NT>
__device__ __forceinline__ void dq1_row_dz(float (&s)[NT][4], float (&dr)[NT][4], const MonarchBwdParams& bp,
                                           const int64_t (&row)[2], const float (&dcl)[2], const float (&lse1)[2],
                                           int lane) {
  constexpr float kLn2 = 0.6931471805599453f;
  const int c = (lane % 4) * 2;
  const float dcl_ln2[2] = {dcl[0] * kLn2, dcl[1] * kLn2};
  float d1[2] = {0.f, 0.f};
#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const bool key = t * 8 + c + e % 2 < bp.f.b2;
      const float z = fmaf(s[t][e], bp.f.scale_log2, -lse1[e / 2]);  // log2 R
      const float R = key ? ex2_ftz(z) : 0.f;
      dr[t][e] = key ? fmaf(dcl_ln2[e / 2], z, dr[t][e]) : 0.f;
      s[t][e] = R;
      d1[e / 2] = fmaf(R, dr[t][e], d1[e / 2]);
    }
  }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    d1[hr] += __shfl_xor_sync(0xffffffffu, d1[hr], 1);
    d1[hr] += __shfl_xor_sync(0xffffffffu, d1[hr], 2);
    if (row[hr] >= 0 && lane % 4 == 0) bp.ws_d1[row[hr]] = d1[hr];  // for the dK / dV kernel
  }
#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[t][e] = bp.scale * s[t][e] * (dr[t][e] - d1[e / 2]);
  }
}

// The workspace rows (m, j_row[hr], n, k) of the thread's two columns (-1 past b2) and their dcL
// and lse1, read by the dq1 kernel before the products that precede their use.
__device__ __forceinline__ void dq1_rows(const MonarchFwdParams& p, int bh, int m, int n, int k, const int (&j_row)[2],
                                         int64_t (&row)[2], float (&dcl)[2], float (&lse1)[2]) {
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    row[hr] = j_row[hr] < p.b2 ? ws_row(p, bh, m, j_row[hr], n, k) : -1;
    dcl[hr] = row[hr] >= 0 ? p.ws_cl[row[hr]] : 0.f;
    lse1[hr] = row[hr] >= 0 ? p.ws_lse1[row[hr]] : 0.f;
  }
}

// The dq accumulator of the thread's two query rows j_row of (m, k) starts from dq's stage-2
// part (read at the start of the dq kernels, so that its latency hides behind their first
// copies), and the products add s sum dz K to it.
template <int D>
__device__ __forceinline__ void load_dq_part(const MonarchBwdParams& bp, float (&acc)[D / 8][4], int bh, int m,
                                             int k, const int (&j_row)[2], int lane) {
  const int c = (lane % 4) * 2;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    // Rows past b2 (never stored) start from column 0's part: a select of zero there would be
    // a non-wgmma definition of the accumulator that makes ptxas serialize the dq kernel's wgmma.
    const float* part = bp.dq_acc + query_index(bp.f, bh, m, k, j_row[hr] < bp.f.b2 ? j_row[hr] : 0) * D;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      const float2 x = *reinterpret_cast<const float2*>(part + i * 8 + c);
      acc[i][2 * hr] = x.x;
      acc[i][2 * hr + 1] = x.y;
    }
  }
}

// dq of the thread's two query rows j_row (dst: the row of query 0 of that tile row), in the
// input dtype.
template <typename T, int D>
__device__ __forceinline__ void store_dq_rows(const MonarchBwdParams& bp, const float (&acc)[D / 8][4], T* dst,
                                              const int (&j_row)[2], int lane) {
  const int c = (lane % 4) * 2;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    if (j_row[hr] >= bp.f.b2) continue;
    T* row = dst + int64_t(j_row[hr]) * bp.dq_stride[1];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      *reinterpret_cast<uint32_t*>(row + i * 8 + c) = Mma<T>::pack(acc[i][2 * hr], acc[i][2 * hr + 1]);
    }
  }
}

// B2Max: the widest key row held (64 at head dim 128 keeps 2 CTAs per SM; 128 serves 720p's
// 45 x 80 tiles at the price of register spills and one CTA per SM, Hopper's shared memory only).
template <typename T, int D, int B2Max = (D == 128 ? 64 : 128)>
struct Dq1Config {
  static constexpr int kB2Max = B2Max;
  static constexpr int kLd = D + 8;
  static constexpr size_t kRowBytes = size_t(kB2Max) * kLd * sizeof(T);
  // K and V rows double-buffered, then the daL and dY rows of the current key tile (one buffer,
  // refilled for the next key tile as soon as the dR products are done).
  static constexpr size_t kSmem = 2 * 2 * kRowBytes + 2 * kRowBytes;
};

template <typename T, int D, int B2Max>
__global__ void __launch_bounds__(256) monarch_bwd_dq1_kernel(const MonarchBwdParams bp) {
  const MonarchFwdParams& p = bp.f;
  using C = Dq1Config<T, D, B2Max>;
  using MM = Mma<T>;
  constexpr int kNT = C::kB2Max / 8;
  const int k = blockIdx.x, m = blockIdx.y, bh = blockIdx.z;
  extern __shared__ __align__(128) unsigned char smem[];
  T* bufs = reinterpret_cast<T*>(smem);  // [stage][K, V][kB2Max][kLd]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
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
  load_dq_part<D>(bp, acc, bh, m, k, j_row, lane);

  T* dLs = bufs + 4 * C::kB2Max * C::kLd;  // [kB2Max][kLd] daL rows of the columns j
  T* dYs = dLs + C::kB2Max * C::kLd;
  const int kb = kku * 16;  // rows of dLs / dYs that the warps read
  auto load_d = [&](int n) {  // the daL and dY rows of key row (n, k), every column j
    for (int idx = tid; idx < kb * (D / 8); idx += blockDim.x) {
      const int jj = idx / (D / 8), dc = idx % (D / 8);
      const bool valid = jj < p.b2;
      const int64_t wr = valid ? ws_row(p, bh, m, jj, n, k) : 0;
      cp_async_16(dLs + jj * C::kLd + dc * 8, dal_ws + wr * D + dc * 8, valid);
      cp_async_16(dYs + jj * C::kLd + dc * 8, dy_ws + wr * D + dc * 8, valid);
    }
  };
  const int n_lim = allowed_lim(p, m);
  int n = next_allowed_in(p, m, 0, n_lim);
  if (n < p.F) {
    load(n, 0);
    load_d(n);
  }
  cp_async_commit();
  for (int it = 0; n < p.F; ++it) {
    const int n_next = next_allowed_in(p, m, n + 1, n_lim);
    cp_async_wait_group<0>();
    __syncthreads();  // K, V, daL, dY of (n, k) landed; every warp is done with the previous K, V
    if (n_next < p.F) load(n_next, (it + 1) % 2);
    cp_async_commit();
    const T* Kr = bufs + ((it % 2) * 2) * C::kB2Max * C::kLd;
    const T* Vr = Kr + C::kB2Max * C::kLd;
    int64_t row[2];
    float dcl[2], lse1[2];  // read now, used after the products
    dq1_rows(p, bh, m, n, k, j_row, row, dcl, lse1);
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
        if (2 * tp < ntu) mma_rows16<T>(s[2 * tp], s[2 * tp + 1], qa[ks], Kr + tp * 16 * C::kLd, C::kLd, ks, lane);
      }
    }
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t la[4], ya[4];
      ldmatrix_a(la, dLs + warp * 16 * C::kLd, C::kLd * sizeof(T), ks, lane);
      ldmatrix_a(ya, dYs + warp * 16 * C::kLd, C::kLd * sizeof(T), ks, lane);
#pragma unroll
      for (int tp = 0; tp < kNT / 2; ++tp) {
        if (2 * tp < ntu) {
          mma_rows16<T>(dr[2 * tp], dr[2 * tp + 1], la, Kr + tp * 16 * C::kLd, C::kLd, ks, lane);
          mma_rows16<T>(dr[2 * tp], dr[2 * tp + 1], ya, Vr + tp * 16 * C::kLd, C::kLd, ks, lane);
        }
      }
    }
    // Every warp is done with daL, dY of (n, k): those of the next row load during the softmax,
    // the dq product and the next S (one buffer; loading them while only S was computed was
    // 2.5-4% slower, docs/perf.md, twelfth session).
    __syncthreads();
    if (n_next < p.F) load_d(n_next);
    cp_async_commit();
    dq1_row_dz<kNT>(s, dr, bp, row, dcl, lse1, lane);  // s becomes s dz
    // dq += dz K (the scale is in dz)
#pragma unroll
    for (int kk = 0; kk < kNT / 2; ++kk) {
      if (kk < kku) {
        uint32_t pa[4];
        pack_a16<T>(pa, s, kk);
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
  store_dq_rows<T, D>(bp, acc, dqg + int64_t(q_tok) * bp.dq_stride[1], j_row, lane);
}

// ---- 3. stage-1 backward, key orientation: dK, dV ------------------------------------------

// One step of a reduce-scatter over lanes (xor 2 Half): of v[0 .. 2 Half - 1], the lane keeps
// the half that its lane bit selects, plus the partner's values of that half, in v[0 .. Half - 1].
template <int Half, int N>
__device__ __forceinline__ void reduce_scatter_step(float (&v)[N], int lane) {
  const bool hi = lane & (2 * Half);
#pragma unroll
  for (int x = 0; x < Half; ++x) {
    const float give = hi ? v[x] : v[x + Half], keep = hi ? v[x + Half] : v[x];
    v[x] = keep + __shfl_xor_sync(0xffffffffu, give, 2 * Half);
  }
}

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
  const int k = blockIdx.x, n = blockIdx.y, bh = bh_last_first();
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
        uint32_t ka[4], va[4];
        ldmatrix_a(ka, Kw, C::kLd * sizeof(T), ks, lane);
        ldmatrix_a(va, Vw, C::kLd * sizeof(T), ks, lane);
        mma_rows16<T>(s[0], s[1], ka, Qs + j0 * C::kLd, C::kLd, ks, lane);
        mma_rows16<T>(dr[0], dr[1], ka, dLs + j0 * C::kLd, C::kLd, ks, lane);
        mma_rows16<T>(dr[0], dr[1], va, dYs + j0 * C::kLd, C::kLd, ks, lane);
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
            pr = ex2_ftz(z);
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

// Hopper variant of step 3 (rows of up to 64 keys, use_wgmma(), the stage-1 maps and a map of q
// in the same row tiles): one warpgroup per key row (n, k), its 64 keys i as the wgmma's M, so
// dK and dV (64 keys x D, fp32) stay in registers. Thread 0 copies by TMA the K and V rows once,
// then per allowed query tile m the q row (m, k) and the daL / dY rows (m, j, n, k) of every
// column j, each into one buffer: daL / dY are refilled for the next tile as soon as the
// products that read them (dR^T, dV += R dY, dK += R daL) are done, so that copy overlaps the
// s dz q product, and q after the last one. Products: [dR^T | S^T] = K [daL | q]^T as one product
// of N = 128 (daL and q interleaved per 64-feature block, so that the 64 daL rows and the 64 q
// rows are one K-major B operand), then dR^T += V dY^T, all operands in shared memory; then
// dV += R dY and dK += R daL + s dz q with R / s dz as register A fragments and the column rows
// as MN-major B. The per-column lse1 and dcL come through shared memory. This kernel runs
// before the dq kernel (below) and forms D1 = sum_i R_i dR_i itself: the thread's products,
// summed over the warp's keys by a reduce-scatter and over the four warps through shared memory
// (one barrier); s dz goes to a shared-memory tile by stmatrix (transposed: rows are columns j)
// and by TMA over the first 64 features of the daL rows (m, j, n, k) just consumed, which no
// later step reads. Pad keys (b2..63) get R = 0 (their K / V rows are zero, but R = 2^-lse1
// would not be) and rows that are never stored; pad columns are zero in q / daL / dY and get
// R = dz = 0.
template <typename T, int D>
struct DkvWgConfig {
  static constexpr size_t kTileBytes = size_t(64) * D * sizeof(T);  // 64 rows (keys or columns) x D
  static constexpr size_t kDzBytes = size_t(64) * 64 * sizeof(T);   // 64 columns x 64 keys
  // 1008 bytes to align the tiles to 1024 (the 128-byte swizzle), K, V, daL / q and dY tiles, the
  // dz tile, the per-column floats (lse1, dcL ln 2, four warps' partial D1), three mbarriers:
  // 91 KB at D = 128, 2 CTAs per SM.
  static constexpr size_t kSmem = 1008 + 5 * kTileBytes + kDzBytes + 6 * 64 * sizeof(float) + 3 * sizeof(uint64_t);
};

template <typename T, int D>
__global__ void __launch_bounds__(128, 2)
    monarch_bwd_dkv_wg_kernel(const MonarchBwdParams bp, const __grid_constant__ Stage1Tma tma,
                              const __grid_constant__ CUtensorMap qmap) {
  const MonarchFwdParams& p = bp.f;
  using C = DkvWgConfig<T, D>;
  using MM = Mma<T>;
  constexpr float kLn2 = 0.6931471805599453f;
  constexpr int kNT = 8;  // 8-column tiles of a 64-column row
  constexpr size_t kTile = C::kTileBytes / sizeof(T);
  const int k = blockIdx.x, n = blockIdx.y, bh = blockIdx.z;
  int m = 0;
  while (m < p.A && !tile_allowed(p, m, n)) ++m;
  if (m == p.A) return;  // dk, dv of this row stay zero (KV-cache mode zeroes them first)
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  T* Ks = reinterpret_cast<T*>(smem);  // each [D / 64][64][64], swizzled
  T* Vs = Ks + kTile;
  // daL and q interleaved per 64-feature block ([D / 64][daL, q][64][64]): S^T and the daL part of
  // dR^T are one product of N = 128 (K against 64 daL rows followed by 64 q rows)
  T* dLs = Vs + kTile;
  T* Qs = dLs + 64 * 64;
  T* dYs = dLs + 2 * kTile;
  T* dZs = dYs + kTile;  // [64 columns][64 keys], swizzled: s dz of the current query tile
  float* cs = reinterpret_cast<float*>(smem + 5 * C::kTileBytes + C::kDzBytes);  // [lse1, dcL ln 2][64 columns]
  float* d1s = cs + 2 * 64;                                                       // [warp][64 columns]
  uint64_t* kv_full = reinterpret_cast<uint64_t*>(d1s + 4 * 64);
  uint64_t* q_full = kv_full + 1;
  uint64_t* d_full = kv_full + 2;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, c = (lane % 4) * 2;
  const int b = bh / p.H, h = bh % p.H;
  // The five tiles are 5 * D / 64 blocks of 64 rows x 128 bytes; TMA fills rows 0 .. b2 - 1, the
  // products also read the others (keys and columns past b2): zero once.
  zero_pad_rows(smem, 5 * (D / 64), p.b2);
  fence_proxy_async_smem();  // the zero pad rows are read by wgmma
  if (tid == 0) {
    for (int i = 0; i < 3; ++i) mbar_init(&kv_full[i], 1);
    fence_mbar_init();
  }
  const int k_off = row_offset(p, k);
  const int64_t key_base = key_tile_base(p, n) + k_off;
  const uint32_t row_bytes = (D / 64) * uint32_t(p.b2) * 128;
  auto issue_q = [&](int mm) {
    mbar_expect(q_full, row_bytes);
#pragma unroll
    for (int hf = 0; hf < D / 64; ++hf) {
      tma_load_tile(Qs + hf * 2 * 64 * 64, &qmap, hf * 64, tile_base(p, mm) + k_off, h, b, q_full);
    }
  };
  auto issue_d = [&](int mm) {  // daL and dY of query tile mm, every column j
    mbar_expect(d_full, 2 * row_bytes);
#pragma unroll
    for (int hf = 0; hf < D / 64; ++hf) {
      tma_load_tile(dLs + hf * 2 * 64 * 64, &tma.al, hf * 64, n * p.b1 + k, 0, bh * p.A + mm, d_full);
      tma_load_tile(dYs + hf * 64 * 64, &tma.y, hf * 64, n * p.b1 + k, 0, bh * p.A + mm, d_full);
    }
  };
  // K-major operand: 16 features are 32 bytes into a 64-feature tile.
  auto kmajor = [](const T* tile, int ks) { return wgmma_desc_sw128(tile + (ks / 4) * 64 * 64 + (ks % 4) * 16, 1024); };
  __syncthreads();
  if (tid == 0) {
    mbar_expect(kv_full, 2 * row_bytes);
#pragma unroll
    for (int hf = 0; hf < D / 64; ++hf) {
      tma_load_tile(Ks + hf * 64 * 64, &tma.k, hf * 64, int(key_base), h, b, kv_full);
      tma_load_tile(Vs + hf * 64 * 64, &tma.v, hf * 64, int(key_base), h, b, kv_full);
    }
    issue_d(m);
    issue_q(m);
  }
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int t = 0; t < D / 8; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[t][e] = dv[t][e] = 0.f;
  }
  // lse1 and dcL of column tid in query tile mm, read one tile ahead of their use. Pad
  // columns (b2..63) hold FLT_MAX, 0 for every tile: R = 2^(0 - FLT_MAX) = 0 and dz = 0 there
  // (their scores and dR are 0: zero q / daL / dY rows), so the softmax needs no column test.
  // Keys past b2 (zero K / V rows, so s = dR = 0, but R = 2^-lse1) are masked per thread.
  float cs_next[2] = {0.f, 0.f};
  auto load_cs = [&](int mm) {
    if (tid < p.b2) {
      const int64_t row = ws_row(p, bh, mm, tid, n, k);
      cs_next[0] = p.ws_lse1[row];
      cs_next[1] = p.ws_cl[row];
    }
  };
  if (tid >= p.b2 && tid < 64) {
    cs[tid] = FLT_MAX;
    cs[64 + tid] = 0.f;
  }
  const bool key_ok[2] = {warp * 16 + lane / 4 < p.b2, warp * 16 + lane / 4 + 8 < p.b2};
  load_cs(m);
  mbar_wait(kv_full, 0);
  for (int it = 0; m < p.A; ++it) {
    int m1 = m + 1;
    while (m1 < p.A && !tile_allowed(p, m1, n)) ++m1;
    if (tid < p.b2) {  // (the previous tile's were last read before its closing barriers)
      cs[tid] = cs_next[0];
      cs[64 + tid] = cs_next[1] * kLn2;
    }
    // [dR^T | S^T] = K [daL | q]^T, then dR^T += V dY^T (64 keys x 64 columns each)
    float s[kNT][4], dr[kNT][4];
    mbar_wait(d_full, it & 1);
    mbar_wait(q_full, it & 1);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      wgmma_m64n128k16_ss<T>(dr, s, kmajor(Ks, ks), wgmma_desc_sw128(dLs + (ks / 4) * 2 * 64 * 64 + (ks % 4) * 16, 1024),
                             ks > 0);
    }
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) wgmma_m64n64k16_ss<T>(dr, kmajor(Vs, ks), kmajor(dYs, ks), true);
    wgmma_commit();
    if (m1 < p.A) load_cs(m1);  // after the fence above, which would wait for these loads
    __syncthreads();  // the per-column floats are in shared memory
    wgmma_wait<0>();
    // R = 2^(s scale_log2 - lse1) into s, dR + dcL log R into dr, and the thread's part of
    // D1 = sum_i R_i dR_i of its columns (its two keys), summed over the warp's 16 keys
    float d1[2 * kNT];
#pragma unroll
    for (int t = 0; t < kNT; ++t) {  // columns t * 8 + c and t * 8 + c + 1
      const float2 lse1 = *reinterpret_cast<const float2*>(cs + t * 8 + c);
      const float2 dcl = *reinterpret_cast<const float2*>(cs + 64 + t * 8 + c);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float lr = fmaf(s[t][e], p.scale_log2, -(e % 2 ? lse1.y : lse1.x));  // log2 R
        s[t][e] = key_ok[e / 2] ? ex2_ftz(lr) : 0.f;
        dr[t][e] = fmaf(e % 2 ? dcl.y : dcl.x, lr, dr[t][e]);
      }
      d1[2 * t] = fmaf(s[t][0], dr[t][0], s[t][2] * dr[t][2]);
      d1[2 * t + 1] = fmaf(s[t][1], dr[t][1], s[t][3] * dr[t][3]);
    }
    // The 8 lanes of equal lane % 4 hold the same 16 columns (index 2 t + e): a reduce-scatter
    // over lane bits 4, 3, 2 leaves each lane the warp's sums of 2 of them (14 shuffles, not 48).
    reduce_scatter_step<8>(d1, lane);
    reduce_scatter_step<4>(d1, lane);
    reduce_scatter_step<2>(d1, lane);
    *reinterpret_cast<float2*>(d1s + warp * 64 + ((lane / 4) % 2 + ((lane / 8) % 2) * 2 + ((lane / 16) % 2) * 4) * 8 +
                               c) = make_float2(d1[0], d1[1]);
    if (tid == 0) bulk_wait_read<0>();  // the previous tile's dz has left dZs
    __syncthreads();                    // the four warps' partial D1 are in shared memory
    // s dz = s R (dR - D1) (the portable kernels' dq1 forms D1 and dz the same way), packed as
    // A fragments and stored transposed for the dq kernel: dZs row j = column j's 64 keys
    uint32_t pr[kNT / 2][4], pz[kNT / 2][4];
#pragma unroll
    for (int t = 0; t < kNT; ++t) {
      float2 sum = *reinterpret_cast<const float2*>(d1s + t * 8 + c);
#pragma unroll
      for (int w = 1; w < 4; ++w) {
        const float2 x = *reinterpret_cast<const float2*>(d1s + w * 64 + t * 8 + c);
        sum.x += x.x;
        sum.y += x.y;
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) dr[t][e] = bp.scale * s[t][e] * (dr[t][e] - (e % 2 ? sum.y : sum.x));
    }
#pragma unroll
    for (int kk = 0; kk < kNT / 2; ++kk) {
      pack_a16<T>(pr[kk], s, kk);
      pack_a16<T>(pz[kk], dr, kk);
      // matrix q = lane / 8 of pz[kk]: keys warp * 16 + 8 (q % 2) .., columns kk * 16 + 8 (q / 2) ..
      const int q = lane / 8, j = kk * 16 + (q / 2) * 8 + lane % 8;
      stmatrix_x4_trans(dZs + j * 64 + (((warp * 2 + q % 2) ^ (j % 8)) * 8), pz[kk]);
    }
    fence_proxy_async_smem();  // dZs is read by the copy engine
    // dV += R dY, dK += R daL (released together), then dK += s dz q
    wgmma_fence();
    wgmma_acc_rows64<T, D>(dv, pr, dYs);
    wgmma_acc_rows64<T, D, 2 * 64 * 64>(dk, pr, dLs);
    wgmma_commit();
    wgmma_acc_rows64<T, D, 2 * 64 * 64>(dk, pz, Qs);
    wgmma_commit();
    wgmma_wait<1>();
    __syncthreads();  // every warp is done with daL, dY of tile m (and has stored its dz)
    if (tid == 0) {
      // s dz of (m, every column j, n, k) over the first 64 features of daL's consumed rows,
      // which no later step reads: the dq kernel finds it there
      tma_store_tile(&tma.al, 0, n * p.b1 + k, 0, bh * p.A + m, dZs);
      bulk_commit();
      if (m1 < p.A) issue_d(m1);
    }
    wgmma_wait<0>();
    __syncthreads();  // and with q
    if (tid == 0 && m1 < p.A) issue_q(m1);
    m = m1;
  }
  if (tid == 0) bulk_wait<0>();
  T* dkg = static_cast<T*>(bp.dk) + b * bp.dk_stride[0] + h * bp.dk_stride[2];
  T* dvg = static_cast<T*>(bp.dv) + b * bp.dv_stride[0] + h * bp.dv_stride[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int i = warp * 16 + lane / 4 + hr * 8;
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

// ---- 4 (Hopper). dq's stage-1 part from the dz that the dK / dV kernel stored ---------------

// On Hopper the order of steps 2 and 3 turns around: the dK / dV kernel forms D1 itself (a sum
// over its key row's keys) and leaves s dz over the first 64 features of the daL rows it has
// consumed, so dq[m, k, j] = (stage-2 part) + sum_n sum_i (s dz)[m, j, n, k, i] K[n, k, i] is one
// product per key tile: per (m, k), over the allowed key tiles n, the dz tile (64 columns j x 64
// keys, K-major A) against the key row (keys x D, MN-major B), both by TMA through a ring of
// kSlots. No recomputed scores and no daL / dY reads (the dq1 kernel's 4 products and 2 plane
// passes become 1 product and a dz read of 128 bytes per workspace row).
template <typename T, int D>
struct DqWgConfig {
  static constexpr size_t kKBytes = size_t(64) * D * sizeof(T);  // a key row, [D / 64][64][64]
  static constexpr size_t kZBytes = size_t(64) * 64 * sizeof(T);  // a dz tile, [64][64]
  static constexpr int kSlots = 3;
  // 1008 bytes to align the tiles to 1024 (the 128-byte swizzle), the ring, an mbarrier per
  // slot: 73 KB at D = 128, 3 CTAs per SM.
  static constexpr size_t kSmem = 1008 + kSlots * (kKBytes + kZBytes) + kSlots * sizeof(uint64_t);
};

template <typename T, int D>
__global__ void __launch_bounds__(128, 3)
    monarch_bwd_dq_wg_kernel(const MonarchBwdParams bp, const __grid_constant__ Stage1Tma tma) {
  const MonarchFwdParams& p = bp.f;
  using C = DqWgConfig<T, D>;
  constexpr size_t kK = C::kKBytes / sizeof(T), kZ = C::kZBytes / sizeof(T);
  // The A query tiles of a key row are neighbours in launch order (they read the same K rows).
  const int m = blockIdx.x, k = blockIdx.y, bh = bh_last_first();
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  T* Ks = reinterpret_cast<T*>(smem);  // [slot][D / 64][64 keys][64], swizzled
  T* Zs = Ks + C::kSlots * kK;         // [slot][64 columns][64 keys], swizzled
  uint64_t* full = reinterpret_cast<uint64_t*>(Zs + C::kSlots * kZ);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int b = bh / p.H, h = bh % p.H;
  // The ring is kSlots * (D / 64 + 1) tiles of 64 rows x 128 bytes; TMA fills rows 0 .. b2 - 1,
  // the product also reads the others (keys and columns past b2): zero once.
  zero_pad_rows(smem, C::kSlots * (D / 64 + 1), p.b2);
  fence_proxy_async_smem();
  if (tid == 0) {
    for (int i = 0; i < C::kSlots; ++i) mbar_init(&full[i], 1);
    fence_mbar_init();
  }
  __syncthreads();
  const int k_off = row_offset(p, k), slab = bh * p.A + m;
  const int j_row[2] = {warp * 16 + lane / 4, warp * 16 + lane / 4 + 8};
  float acc[D / 8][4];
  load_dq_part<D>(bp, acc, bh, m, k, j_row, lane);
  auto issue = [&](int n, int i) {  // copy i of the ring: key row (n, k) and its dz tile
    const int slot = i % C::kSlots;
    mbar_expect(&full[slot], (D / 64 + 1) * uint32_t(p.b2) * 128);
#pragma unroll
    for (int hf = 0; hf < D / 64; ++hf) {
      tma_load_tile(Ks + slot * kK + hf * 64 * 64, &tma.k, hf * 64, key_tile_base(p, n) + k_off, h, b, &full[slot]);
    }
    tma_load_tile(Zs + slot * kZ, &tma.al, 0, n * p.b1 + k, 0, slab, &full[slot]);
  };
  const int n_lim = allowed_lim(p, m);
  int n = next_allowed_in(p, m, 0, n_lim), n_next = n;  // n_next: the next key tile to copy
  for (int i = 0; i < C::kSlots && n_next < p.F; ++i) {
    if (tid == 0) issue(n_next, i);
    n_next = next_allowed_in(p, m, n_next + 1, n_lim);
  }
  for (int it = 0; n < p.F; ++it) {
    const int slot = it % C::kSlots;
    mbar_wait(&full[slot], (it / C::kSlots) & 1);
    wgmma_fence();
#pragma unroll
    for (int half = 0; half < D / 64; ++half) {
      float(&ah)[8][4] = *reinterpret_cast<float(*)[8][4]>(&acc[8 * half]);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        wgmma_m64n64k16_ss<T, true>(ah, wgmma_desc_sw128(Zs + slot * kZ + kk * 16, 1024),
                                    wgmma_desc_sw128(Ks + slot * kK + half * 64 * 64 + kk * 16 * 64, 1024), true);
      }
    }
    wgmma_commit();
    wgmma_wait<1>();  // the products of step it - 1 are done ...
    __syncthreads();  // ... in every warp: copy it - 1 + kSlots takes that slot
    if (it > 0 && n_next < p.F) {
      if (tid == 0) issue(n_next, it - 1 + C::kSlots);
      n_next = next_allowed_in(p, m, n_next + 1, n_lim);
    }
    n = next_allowed_in(p, m, n + 1, n_lim);
  }
  wgmma_wait<0>();
  T* dqg = static_cast<T*>(bp.dq) + b * bp.dq_stride[0] + h * bp.dq_stride[2];
  store_dq_rows<T, D>(bp, acc, dqg + int64_t(tile_base(p, m) + k_off) * bp.dq_stride[1], j_row, lane);
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
