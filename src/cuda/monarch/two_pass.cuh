// Two-pass CUDA forward of Monarch attention: two FlashAttention-shaped kernels with
// the stage-1 intermediates (aL, Y in the input dtype, cL in fp32) in a caller-provided device
// workspace. Both kernels keep every softmax inside one warp (rows of the MMA = the softmax's
// rows), which the fused kernel (fwd_kernel.cuh) cannot: there, 8 query columns per CTA force
// the transposed orientation and cross-warp reductions (measured 44 instructions per MMA).
//
// Stage 1 (monarch_stage1_kernel): one CTA per (batch*head, tile row k, query tile m) (or per
//   part of its key tiles, for long keys: MonarchFwdParams::key_parts), one warp
//   per 16 query columns j, the proxies q[m,k,:] in registers (rejected: CTAs of 3 query tiles
//   sharing each K/V row, H100 last chunk 0.871 vs 0.794 ms, docs/cuda-forward.md); for every allowed key tile n
//   (K/V rows double-buffered) it is a small attention of the b2 proxies over the b2 keys
//   K[n,k,:] with two value sets:
//     S = Q_k K_k^T (M = 16 columns, N = b2 keys, K = D); R = softmax rows; cL = sum R (z - lse)
//     aL = R K_k, Y = R V_k   (M = 16, N = D, K = b2), formed as (P K_k) / Z with the
//                             unnormalized P = exp(z - max) as the MMA operand
//   written to workspace row ((bh * A + m) * b2 + j) * F + n) * b1 + k.
//   Hopper variant (Wg, rows of up to 64 keys, chosen by use_wgmma()): the 4 warps are one
//   warpgroup and the three products are wgmma (M = 64 columns); the K and V rows come by TMA
//   (common/tma.cuh) in the 128-byte swizzled layout that serves both as K-major B (S = Q K^T) and
//   as MN-major B (aL = R K, Y = R V), through a ring of three row slots; same softmax, same
//   workspace, written by TMA stores from a swizzled staging tile.
// Stage 2 (monarch_stage2_kernel): one warp per (column j, 16 query rows l), FlashAttention over
//   the F * b1 "virtual keys" (n, k) of column j: u = s q[m,l,j] . aL - cL, O = softmax(u) Y.
//   Hopper variant (Tma, chosen by use_wgmma()): the same math for one column per CTA, each warp
//   16 query rows x half of the output features (the scores computed by both halves), the
//   workspace chunks copied by TMA (swizzled aL / Y tiles, cL by a plain bulk copy) across the
//   key tiles of a run, three chunks in flight, with an L2 evict-first policy (each row is read
//   once). Both stage-2 kernels take the heads last-first (bh_last_first in tiles.cuh).
// Several iterations: stage 1, then per further iteration stage 2 (for its log-sum-exp), the
//   proxy kernel (aR / cR per workspace row, below) and stage 1 on those proxies; stage 2 last.
#pragma once

#include <cuda_runtime.h>

#include "../common/ptx.cuh"
#include "../common/tma.cuh"
#include "../common/wgmma.cuh"
#include "fwd_params.h"
#include "tiles.cuh"
#include "warp_tiles.cuh"

namespace monarchrt {
namespace cuda_detail {

// B2Max: the widest key row stage 1 holds in shared memory (64 keeps 3 CTAs per SM for D = 128;
// 128 serves wider tiles such as 720p's 45 x 80). Wg: the Hopper stage 1 (wgmma, B2Max = 64).
template <typename T, int D, int B2Max = (D == 128 ? 64 : 128), bool Wg = false>
struct TwoPassConfig {
  static_assert(!Wg || B2Max == 64, "the wgmma stage 1 holds rows of up to 64 keys");
  static constexpr int kB2Max = B2Max;
  static constexpr int kLd = D + 8;                   // row pitch: ldmatrix rows hit distinct banks
  static constexpr int kMaxB1 = 256;
  // Stage 1: one key row of K and of V, double-buffered (the proxies stay in registers); the
  // wgmma variant keeps each row as D / 64 swizzled tiles of 64 rows x 128 bytes (no padding), in
  // a ring of three slots (K and V of the current row and the next K; the next V follows into the
  // slot of the current K once the aL products are done).
  static constexpr size_t kRowBytes = Wg ? size_t(kB2Max) * D * sizeof(T) : size_t(kB2Max) * kLd * sizeof(T);
  static constexpr int kSlots = Wg ? 3 : 4;
  static constexpr size_t kBufBytes = kSlots * kRowBytes;
  static constexpr int kStageCols = 16;  // per-warp staging of a 16 x kStageCols output block
  static constexpr int kStageLd = kStageCols + 8;
  // (Wg: one tile of b2 columns x 64 features in the 128-byte swizzle, the source of the TMA
  // stores; its size is in smem1_wg.)
  static constexpr size_t kStagingBytes = (kB2Max / 16) * 16 * kStageLd * sizeof(T);
  // The Hopper variant's rows come by TMA with the 128-byte swizzle: its buffers start at a
  // 1024-byte boundary (up to 1008 bytes of slack); the staging tile needs only b2 rows, and the
  // slots' three mbarriers follow them. 55.5 KB for b2 = 52 and D = 128: 4 CTAs per SM (228 KB, 1
  // KB reserved per CTA: 56 KB at most), as 128 registers per thread allow.
  static constexpr size_t smem1_wg(int b2) { return 1008 + kBufBytes + size_t(b2) * 128 + 3 * sizeof(uint64_t); }
  static constexpr size_t kSmem1 = Wg ? smem1_wg(kB2Max) : kBufBytes + kStagingBytes;
  // Stage 2: kCols columns x kChunk virtual keys of aL and Y, plus cL, double-buffered.
  static constexpr int kCols = 2;
  static constexpr int kChunk = 32;
  static constexpr size_t kTileBytes = size_t(kCols) * kChunk * kLd * sizeof(T);
  static constexpr size_t kStage2 = 2 * kTileBytes + kCols * kChunk * sizeof(float);
  static constexpr size_t kSmem2 = 2 * kStage2 + kMaxB1 * sizeof(int);
  // Its Hopper variant (TMA): one column per CTA, each warp 16 query rows x half of the output
  // features (so 128 registers and 4 CTAs per SM); per stage, aL and Y as D / 64 swizzled tiles
  // of kChunk rows (common/tma.cuh), then cL, kClCopy floats (a chunk's kChunk values from the
  // 16-byte boundary at or before its first row); kStagesTma stages, 1024-byte aligned (three:
  // 53 KB at D = 128, still 4 CTAs per SM); then the mbarriers.
  static constexpr int kColsTma = 1;
  static constexpr int kStagesTma = 3;
  static constexpr int kClCopy = kChunk + 4;
  static constexpr size_t kPlane = size_t(D / 64) * kChunk * 128;
  static constexpr size_t kStage2Tma =
      (kColsTma * 2 * kPlane + kColsTma * kClCopy * sizeof(float) + 1023) / 1024 * 1024;
  static constexpr size_t kSmem2Tma =
      1008 + kStagesTma * kStage2Tma + kStagesTma * sizeof(uint64_t) + kMaxB1 * sizeof(int);
  // 4 CTAs per SM: 228 KB of shared memory per SM, 1 KB of it reserved per CTA.
  static_assert(kSmem2Tma <= 228 * 1024 / 4 - 1024, "the Hopper stage 2 must keep 4 CTAs per SM");
  // Proxy kernel (iterations >= 2): 32 query rows of kCols columns, and their log-sum-exp.
  static constexpr size_t kSmemProxy = size_t(kCols) * 32 * kLd * sizeof(T) + kCols * 32 * sizeof(float);
};

__device__ __forceinline__ int64_t ws_row(const MonarchFwdParams& p, int bh, int m, int j, int n, int k) {
  return ((int64_t(bh) * p.A + m) * p.b2 + j) * int64_t(p.F) * p.b1 + int64_t(n) * p.b1 + k;
}

// The Hopper stage 1's TMA descriptors of K and V: row tiles of b2 tokens (common/tma.cuh).
// And the workspace planes as stores see them: [B*H*A][b2][F*b1][D] (ws_row's order), boxes of
// 64 features x 1 row (n, k) x min(b2, 64) columns j.
struct Stage1Tma {
  CUtensorMap k, v, al, y;
};
// Encodes them (fwd.cu); false where the Hopper stage 1 cannot run (no sm_90a device, rows wider
// than 64 keys, a view the encoder refuses). The backward's Hopper dq1 and dkv kernels read K / V and
// daL / dY through them.
bool stage1_maps(const MonarchFwdParams& p, int B, DType dtype, int D, Stage1Tma* tma);
// 2-D maps of the aL and Y planes as [rows][D] (16-bit elements), boxes of 64 features x
// box_rows rows, 128-byte swizzle: the Hopper stage-2 kernels' copies (forward: chunks of 32 rows;
// backward: key tiles of b1 rows). False where the encoder refuses or the rows do not fit its
// 32-bit coordinates (the portable stage 2 runs).
bool plane_maps(const MonarchFwdParams& p, int B, bool bf16, int D, int box_rows, CUtensorMap* al, CUtensorMap* y);

template <typename T, int D, int B2Max, bool Wg = false>
__global__ void __launch_bounds__(Wg ? 128 : 256, Wg ? 4 : 1)
    monarch_stage1_kernel(const MonarchFwdParams p, const __grid_constant__ Stage1Tma tma) {
  using C = TwoPassConfig<T, D, B2Max, Wg>;
  using MM = Mma<T>;
  constexpr float kLn2 = 0.6931471805599453f;
  constexpr int kNT = C::kB2Max / 8;  // 8-key MMA tiles of a row
  // The A query tiles of a key row are neighbours in launch order: they read the same K / V rows
  // at about the same time, from L2.
  // The key tiles of (m, k) may be split between p.key_parts CTAs (neighbours, after the A query
  // tiles), so that short launches fill the SMs' last wave (fwd.cu, stage1_key_parts).
  const int m = blockIdx.x % p.A, k = blockIdx.y, bh = blockIdx.z;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + (Wg ? (1024u - (smem_addr(smem_raw) & 1023u)) & 1023u : 0u);
  T* bufs = reinterpret_cast<T*>(smem);  // [stage][K, V][kB2Max][kLd] (Wg: [slot][D / 64][64][64], swizzled)
  // Staging: per warp 16 x kStageCols (padded pitch); Wg: one swizzled tile of b2 x 64 for the CTA.
  T* staging = reinterpret_cast<T*>(smem + C::kBufBytes) + (Wg ? 0 : (threadIdx.x / 32) * 16 * C::kStageLd);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + C::kBufBytes + size_t(p.b2) * 128);  // Wg: per slot
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, r = lane / 4, c = (lane % 4) * 2;
  const int b = bh / p.H, h = bh % p.H;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[2];
  const T* vg = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[2];
  T* al_ws = static_cast<T*>(p.ws_al);
  T* y_ws = static_cast<T*>(p.ws_y);

  // Pad key rows (i >= b2) must be zeros, never garbage: 0 * NaN is NaN. (Wg: only rows b2..63 of
  // the 3 * D / 64 tiles of 64 rows x 8 chunks of 16 bytes; the copies never write them.)
  if constexpr (Wg) {
    zero_pad_rows(smem, 3 * (D / 64), p.b2);
  } else {
    for (int i = tid; i < int(C::kBufBytes / 16); i += blockDim.x) {
      reinterpret_cast<uint4*>(smem)[i] = make_uint4(0, 0, 0, 0);
    }
  }
  const int k_off = row_offset(p, k);
  const int ntu = (p.b2 + 7) / 8, kku = (p.b2 + 15) / 16;  // used 8-key tiles, 16-key steps
  const int j_row[2] = {warp * 16 + r, warp * 16 + r + 8};
  // The proxies of this warp's 16 columns as A fragments: q[m, k, j] on iteration 1 (the same
  // for every n), the workspace's aR / cR of row (m, j, n, k) on later iterations.
  uint32_t qa[D / 16][4];
  if (p.ws_proxy == nullptr) {
    const int q_tok = tile_base(p, m) + k_off;
    load_a_rows<T, D>(qa, j_row[0] < p.b2 ? qg + int64_t(q_tok + j_row[0]) * p.q_stride[1] : nullptr,
                      j_row[1] < p.b2 ? qg + int64_t(q_tok + j_row[1]) * p.q_stride[1] : nullptr, lane);
  }
  constexpr size_t kRowElems = C::kRowBytes / sizeof(T);
  auto load = [&](int n, int stage) {  // key row (n, k): b2 consecutive tokens of K and of V
    T* Kd = bufs + (stage * 2) * kRowElems;
    T* Vd = Kd + kRowElems;
    const int64_t base = key_tile_base(p, n) + k_off;
    for (int idx = tid; idx < p.b2 * (D / 8); idx += blockDim.x) {
      const int i = idx / (D / 8), dc = idx % (D / 8);
      cp_async_16(Kd + i * C::kLd + dc * 8, kg + (base + i) * p.k_stride[1] + dc * 8, true);
      cp_async_16(Vd + i * C::kLd + dc * 8, vg + (base + i) * p.v_stride[1] + dc * 8, true);
    }
  };
  // Hopper: thread 0 copies each K / V row by TMA (D / 64 swizzled 64-feature tiles of b2 rows
  // each; the pad rows b2..63 stay zero) and the slot's mbarrier counts the bytes. Copy i of the
  // CTA (the K row of its it-th key row for i = 2 it, the V row for i = 2 it + 1) goes into slot
  // i % 3 and completes that slot's phase i / 3.
  auto issue = [&](const CUtensorMap* map, int n, int i) {
    const int slot = i % 3;
    const int tok = key_tile_base(p, n) + k_off;
    mbar_expect(&full[slot], (D / 64) * uint32_t(p.b2) * 128);
#pragma unroll
    for (int hf = 0; hf < D / 64; ++hf) {
      tma_load_tile(bufs + slot * kRowElems + hf * 64 * 64, map, hf * 64, tok, h, b, &full[slot]);
    }
  };
  auto wait_copy = [&](int i) { mbar_wait(&full[i % 3], (i / 3) & 1); };

  // With p.allowed_prefix the allowed key tiles are 0 .. n_lim - 1: no tile_allowed per step.
  const int n_lim = allowed_lim(p, m);
  const int2 part = allowed_part(p, m, blockIdx.x / p.A, p.key_parts, n_lim);
  const int n_end = part.y;  // one past this CTA's last key tile
  auto next = [&](int x) { return x < n_end ? min(next_allowed_in(p, m, x + 1, n_lim), n_end) : n_end; };
  int n = part.x;
  int n1 = next(n);  // the row after n
  if constexpr (Wg) {
    fence_proxy_async_smem();  // the zeroed pad rows are read by wgmma
    if (tid == 0) {
      for (int i = 0; i < 3; ++i) mbar_init(&full[i], 1);
      fence_mbar_init();
    }
    __syncthreads();
    if (tid == 0 && n < n_end) {
      issue(&tma.k, n, 0);
      issue(&tma.v, n, 1);
    }
    if (tid == 0 && n1 < n_end) issue(&tma.k, n1, 2);
  } else {
    __syncthreads();  // zeroing done before the first copies land
    if (n < n_end) load(n, 0);
    cp_async_commit();
  }
  for (int it = 0; n < n_end; ++it) {
    const int n_next = n1;
    const int n2 = next(n_next);
    if constexpr (Wg) {
      wait_copy(2 * it);  // the K row; the V row is waited for before the first Y product
    } else {
      if (n_next < n_end) load(n_next, (it + 1) % 2);
      cp_async_commit();
      cp_async_wait_group<1>();  // row (n, k) has landed; (n_next, k) may still be in flight
      __syncthreads();
    }
    const T* Kr = bufs + (Wg ? (2 * it) % 3 : (it % 2) * 2) * kRowElems;
    const T* Vr = Wg ? bufs + ((2 * it + 1) % 3) * kRowElems : Kr + kRowElems;
    if (p.ws_proxy != nullptr) {
      const T* pr = static_cast<const T*>(p.ws_proxy);
      load_a_rows<T, D>(qa, j_row[0] < p.b2 ? pr + ws_row(p, bh, m, j_row[0], n, k) * D : nullptr,
                        j_row[1] < p.b2 ? pr + ws_row(p, bh, m, j_row[1], n, k) * D : nullptr, lane);
    }

    // ---- S = Q_k K_k^T for this warp's 16 columns
    float s[kNT][4];  // the first wgmma overwrites (accumulate == false): no zeroing needed
#pragma unroll
    for (int t = 0; t < (Wg ? 0 : kNT); ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
    if constexpr (Wg) {  // the warpgroup's 64 columns x 64 keys (pad keys are zero rows)
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {  // 16 features: 32 bytes into a 64-feature tile
        wgmma_m64n64k16<T, false>(s, qa[ks], wgmma_desc_sw128(Kr + (ks / 4) * 64 * 64 + (ks % 4) * 16, 1024), ks > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
    }
#pragma unroll
    for (int ks = 0; ks < (Wg ? 0 : D / 16); ++ks) {
#pragma unroll
      for (int tp = 0; tp < kNT / 2; ++tp) {
        if (2 * tp < ntu) mma_rows16<T>(s[2 * tp], s[2 * tp + 1], qa[ks], Kr + tp * 16 * C::kLd, C::kLd, ks, lane);
      }
    }
    // ---- softmax over the keys of each column's row (inside the warp: 4 lanes share a row)
    float M[2], Z[2], PZ[2];
    stage1_row_softmax<kNT>(s, ntu, p, M, Z, PZ, lane);
    const float inv[2] = {1.f / Z[0], 1.f / Z[1]};
    int64_t row[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) row[hr] = j_row[hr] < p.b2 ? ws_row(p, bh, m, j_row[hr], n, k) : -1;
    if (lane % 4 == 0) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {  // cL = sum R (z - lse), natural-log units
        if (row[hr] >= 0) p.ws_cl[row[hr]] = kLn2 * (PZ[hr] * inv[hr] - M[hr] - log2f(Z[hr]));
        if (row[hr] >= 0 && p.ws_lse1 != nullptr) p.ws_lse1[row[hr]] = M[hr] + log2f(Z[hr]);
      }
    }
    // Workspace row written by this lane in the coalesced stores below: row lane / 2, half lane % 2.
    const int st_j = warp * 16 + lane / 2;
    const int64_t st_row = st_j < p.b2 ? ws_row(p, bh, m, st_j, n, k) : -1;
    // The unnormalized probabilities exp(z - max) as A fragments over the keys (16 per MMA step):
    // the largest of each row is exactly 1 in bf16, and the products are divided by the row's sum
    // in fp32 afterwards (as FlashAttention does). Rounding R = exp(z - lse) instead made the bf16
    // error 1.5-1.8 times as large, up to twice with sharp logits (docs/numerics.md).
    uint32_t pa[kNT / 2][4];
#pragma unroll
    for (int kk = 0; kk < kNT / 2; ++kk) {
      pa[kk][0] = MM::pack(s[2 * kk][0], s[2 * kk][1]);
      pa[kk][1] = MM::pack(s[2 * kk][2], s[2 * kk][3]);
      pa[kk][2] = MM::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[kk][3] = MM::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
    // ---- aL = R K_k and Y = R V_k, staged through shared memory so that every lane stores 16
    // bytes (scattered 4-byte stores cost ~2x the instructions).
    if constexpr (Wg) {
      // Four (D = 128) products of 64 features each (aL, then Y), one at a time (a second
      // accumulator, product q + 1 on the tensor cores while q is stored, gained nothing
      // measurable and costs 32 registers). Each goes through one swizzled staging tile of b2
      // columns x 64 features and leaves by one TMA store (tma.al / tma.y: columns past b2 are
      // outside the map and not written), which runs while the next product is computed.
      constexpr int kHalves = D / 64, kProducts = 2 * kHalves;
      const int nk = n * p.b1 + k, slab = bh * p.A + m;
#pragma unroll
      for (int q = 0; q < kProducts; ++q) {
        float a[8][4];  // overwritten by the first wgmma (accumulate == false)
        const T* src = (q / kHalves == 0 ? Kr : Vr) + (q % kHalves) * 64 * 64;
        if (q == kHalves) wait_copy(2 * it + 1);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kNT / 2; ++kk) {  // all 64 keys: rows past b2 are zeros
          wgmma_m64n64k16<T, true>(a, pa[kk], wgmma_desc_sw128(src + kk * 16 * 64, 1024), kk > 0);
        }
        wgmma_commit();
        // While the product runs: the previous store has read the staging tile, and (q == kHalves)
        // every warp is done with the K row (the aL products), so the next V row takes its slot.
        if (tid == 0) bulk_wait_read<0>();
        __syncthreads();
        if (q == kHalves && tid == 0 && n_next < n_end) issue(&tma.v, n_next, 2 * it + 3);
        wgmma_wait<0>();
#pragma unroll
        for (int t = 0; t < 8; ++t) {  // rows = columns j (this lane's warp * 16 + r, + 8), chunk t
          if (j_row[0] < p.b2) {
            *reinterpret_cast<uint32_t*>(staging + sw128_offset(j_row[0], t, 64) + c) =
                MM::pack(a[t][0] * inv[0], a[t][1] * inv[0]);
          }
          if (j_row[1] < p.b2) {
            *reinterpret_cast<uint32_t*>(staging + sw128_offset(j_row[1], t, 64) + c) =
                MM::pack(a[t][2] * inv[1], a[t][3] * inv[1]);
          }
        }
        fence_proxy_async_smem();  // the tile, written by ordinary stores, is read by the copy engine
        __syncthreads();
        if (tid == 0) {
          tma_store_tile(q / kHalves == 0 ? &tma.al : &tma.y, (q % kHalves) * 64, nk, 0, slab, staging);
          bulk_commit();
        }
      }
    }
#pragma unroll
    for (int which = 0; which < (Wg ? 0 : 2); ++which) {
      const T* src = which == 0 ? Kr : Vr;
      T* ws = which == 0 ? al_ws : y_ws;
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < kNT / 2; ++kk) {
          if (kk < kku) {
            uint32_t bv[4];
            ldmatrix_x4_trans(bv, src + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * C::kLd + dp * 16 + (lane / 16) * 8);
            MM::run(acc[0], pa[kk], bv[0], bv[1]);
            MM::run(acc[1], pa[kk], bv[2], bv[3]);
          }
        }
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          *reinterpret_cast<uint32_t*>(staging + r * C::kStageLd + nt * 8 + c) =
              MM::pack(acc[nt][0] * inv[0], acc[nt][1] * inv[0]);
          *reinterpret_cast<uint32_t*>(staging + (r + 8) * C::kStageLd + nt * 8 + c) =
              MM::pack(acc[nt][2] * inv[1], acc[nt][3] * inv[1]);
        }
        __syncwarp();
        if (st_row >= 0) {
          *reinterpret_cast<uint4*>(ws + st_row * D + dp * 16 + (lane % 2) * 8) =
              *reinterpret_cast<const uint4*>(staging + (lane / 2) * C::kStageLd + (lane % 2) * 8);
        }
        __syncwarp();
      }
    }
    __syncthreads();  // this stage's buffers (Wg: the V row's slot) are refilled next
    if (Wg && tid == 0 && n2 < n_end) issue(&tma.k, n2, 2 * it + 4);
    n = n_next;
    n1 = n2;
  }
  if (Wg && tid == 0) bulk_wait<0>();  // the staging tile stays until the last store is done
}

// Stage 2's input for one pipeline stage: the aL and Y rows (padded pitch kLd) and cL of key
// tile n, rows k0 .. k0 + min(kChunk, b1 - k0), for the kCols query columns j0.. of query tile m,
// by cp.async into `stage` (columns past b2 are zero-filled): the portable stage 2's copies.
template <typename T, int D>
__device__ __forceinline__ void load_stage2_chunk(const MonarchFwdParams& p, const T* al_ws, const T* y_ws,
                                                  unsigned char* stage, int bh, int m, int j0, int n, int k0) {
  using C = TwoPassConfig<T, D>;
  constexpr int kCh = C::kChunk;
  T* aLd = reinterpret_cast<T*>(stage);
  T* Yd = reinterpret_cast<T*>(stage + C::kTileBytes);
  float* cLd = reinterpret_cast<float*>(stage + 2 * C::kTileBytes);
  const int nrows = min(kCh, p.b1 - k0);
  for (int idx = int(threadIdx.x); idx < C::kCols * nrows * (D / 8); idx += int(blockDim.x)) {
    const int col = idx / (nrows * (D / 8)), rem = idx % (nrows * (D / 8));
    const int kc = rem / (D / 8), dc = rem % (D / 8);
    const bool valid = j0 + col < p.b2;
    const int64_t row = valid ? ws_row(p, bh, m, j0 + col, n, k0 + kc) : 0;
    cp_async_16(aLd + (col * kCh + kc) * C::kLd + dc * 8, al_ws + row * D + dc * 8, valid);
    cp_async_16(Yd + (col * kCh + kc) * C::kLd + dc * 8, y_ws + row * D + dc * 8, valid);
  }
  for (int idx = int(threadIdx.x); idx < C::kCols * nrows; idx += int(blockDim.x)) {
    const int col = idx / nrows, kc = idx % nrows;
    const bool valid = j0 + col < p.b2;
    cp_async_4(cLd + col * kCh + kc, p.ws_cl + (valid ? ws_row(p, bh, m, j0 + col, n, k0 + kc) : 0), valid);
  }
}

// The Hopper stage 2's TMA descriptors: the aL and Y planes as [rows][D] (boxes of 64 features x
// kChunk rows, swizzled). cL is copied without a map (bulk_load).
struct Stage2Tma {
  CUtensorMap al, y;
};

// Stage 2. Portable: chunks of kChunk virtual keys (n, k0..) per key tile by cp.async into
// padded rows. Hopper (Tma): chunks of kChunk consecutive workspace rows of the column across the
// key tiles of each run of allowed tiles (a column's rows (n, k) are contiguous), by TMA.
template <typename T, int D, bool Tma = false>
__global__ void __launch_bounds__(128, Tma ? 4 : 1)  // Tma: at most 128 registers, 4 CTAs per SM
    monarch_stage2_kernel(const MonarchFwdParams p, const __grid_constant__ Stage2Tma tma) {
  using C = TwoPassConfig<T, D>;
  using MM = Mma<T>;
  constexpr int kCh = C::kChunk;
  constexpr int kCols = Tma ? C::kColsTma : C::kCols;
  constexpr int DO = Tma ? D / 2 : D;  // output features per warp
  constexpr size_t kStage = Tma ? C::kStage2Tma : C::kStage2;
  constexpr int kNS = Tma ? C::kStagesTma : 2;  // pipeline stages
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + (Tma ? (1024u - (smem_addr(smem_raw) & 1023u)) & 1023u : 0u);
  // kNS stages (portable: [aL: kCols][kChunk][kLd] [Y: same] [cL: kCols][kChunk]; Tma: per
  // column [aL tiles][Y tiles], then [cL: kCols][kClCopy]), (Tma) one mbarrier per stage, the row
  // offsets.
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kNS * kStage);
  int* row_off = reinterpret_cast<int*>(smem + kNS * kStage + (Tma ? kNS * sizeof(uint64_t) : 0));
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, r = lane / 4;
  const int row_groups = (p.b1 + 31) / 32;
  const int j0 = blockIdx.x * kCols, m = blockIdx.y / row_groups, rg = blockIdx.y % row_groups;
  const int bh = bh_last_first(), b = bh / p.H, h = bh % p.H;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  T* og = static_cast<T*>(p.out) + b * p.o_stride[0] + h * p.o_stride[2];
  const T* al_ws = static_cast<const T*>(p.ws_al);
  const T* y_ws = static_cast<const T*>(p.ws_y);

  // Portable: columns past b2 must read as zeros (a CTA's second column may not exist). Tma has
  // one column per CTA, and every copy writes its whole box.
  for (int i = tid; i < (Tma ? 0 : int(2 * kStage / 16)); i += blockDim.x) {
    reinterpret_cast<uint4*>(smem)[i] = make_uint4(0, 0, 0, 0);
  }
  for (int i = tid; i < p.b1; i += blockDim.x) row_off[i] = row_offset(p, i);
  if (Tma && tid == 0) {
    for (int i = 0; i < kNS; ++i) mbar_init(&full[i], 1);
    fence_mbar_init();
  }
  __syncthreads();
  const int q_base = tile_base(p, m);
  // Warp: column j0 + jl, query rows 16 mt.., output features dh * DO.. (portable: all D).
  const int jl = Tma ? 0 : warp / 2, dh = Tma ? warp / 2 : 0, mt = warp % 2, jq = j0 + jl;
  uint32_t qa[D / 16][4];
  {
    const T* rows[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int l = rg * 32 + mt * 16 + r + hr * 8;
      rows[hr] = (l < p.b1 && jq < p.b2) ? qg + int64_t(q_base + row_off[l] + jq) * p.q_stride[1] : nullptr;
    }
    load_a_rows<T, D>(qa, rows[0], rows[1], lane);
  }
  float o[DO / 8][4];
#pragma unroll
  for (int i = 0; i < DO / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

  // A chunk: virtual keys (n, k) = column rows [row, row + nrows), row = n * b1 + k. Portable:
  // within one key tile; Tma: within one run of allowed key tiles, ending at `end`.
  struct Chunk {
    int row, end;
  };
  const int col_rows = p.F * p.b1;
  const int n_lim = allowed_lim(p, m);
  auto run_from = [&](int n) {  // the chunk at the start of the first run of allowed tiles >= n
    n = next_allowed_in(p, m, n, n_lim);
    int e = n;
    if (p.allowed_prefix) {
      e = n < p.F ? n_lim : p.F;
    } else {
      while (e < p.F && tile_allowed(p, m, e)) ++e;
    }
    return Chunk{n * p.b1, (Tma ? e : min(e, n + 1)) * p.b1};
  };
  auto next = [&](Chunk ch) {
    ch.row += Tma ? kCh : min(kCh, p.b1 - ch.row % p.b1);
    return ch.row < ch.end ? ch : run_from(ch.end / p.b1);
  };
  // Stage 2 reads each workspace row once: its copies leave L2 to the rows not yet read.
  const uint64_t read_once = Tma ? l2_evict_first_policy() : 0;
  auto load = [&](Chunk ch, int stage) {
    unsigned char* st = smem + stage * kStage;
    if constexpr (Tma) {  // by thread 0
      const int64_t col0 = (int64_t(bh) * p.A + m) * p.b2 + j0;
      const int cols = min(kCols, p.b2 - j0);
      mbar_expect(&full[stage], uint32_t(cols) * (2 * C::kPlane + C::kClCopy * sizeof(float)));
      for (int col = 0; col < cols; ++col) {
        const int row = int((col0 + col) * col_rows + ch.row);
        T* al_dst = reinterpret_cast<T*>(st + col * 2 * C::kPlane);
#pragma unroll
        for (int hf = 0; hf < D / 64; ++hf) {
          tma_load_tile_2d(al_dst + hf * kCh * 64, &tma.al, hf * 64, row, &full[stage], read_once);
          tma_load_tile_2d(al_dst + C::kPlane / sizeof(T) + hf * kCh * 64, &tma.y, hf * 64, row, &full[stage],
                           read_once);
        }
        // cL from the 16-byte boundary at or before `row` (the workspace has slack after cL).
        bulk_load(st + kCols * 2 * C::kPlane + col * C::kClCopy * sizeof(float), p.ws_cl + (row & ~3),
                  C::kClCopy * sizeof(float), &full[stage]);
      }
    } else {
      load_stage2_chunk<T, D>(p, al_ws, y_ws, st, bh, m, j0, ch.row / p.b1, ch.row % p.b1);
    }
  };
  // cur: the chunk computed now, in stage it % kNS; ahead: the last chunk whose copy was issued.
  auto valid = [&](Chunk ch) { return ch.row < col_rows; };
  Chunk cur = run_from(0), ahead = cur;
  if (Tma) {  // the first kNS chunks in flight at once
    for (int st = 0; st < kNS && valid(ahead); ++st) {
      if (st > 0) ahead = next(ahead);
      if (tid == 0 && valid(ahead)) load(ahead, st);
    }
  } else {
    if (valid(cur)) load(cur, 0);
    cp_async_commit();
  }
  for (int it = 0; valid(cur); ++it) {
    const int nrows = min(kCh, cur.end - cur.row);
    unsigned char* base = smem + (it % kNS) * kStage;
    if constexpr (Tma) {  // every thread waits for the copies itself
      mbar_wait(&full[it % kNS], (it / kNS) & 1);
      if (nrows < kCh) {  // the copy ran past the run: those Y rows may hold anything (0 * NaN)
        const int cols = min(kCols, p.b2 - j0);
        for (int i = tid; i < cols * (kCh - nrows) * (D / 8); i += blockDim.x) {
          const int col = i / ((kCh - nrows) * (D / 8)), rem = i % ((kCh - nrows) * (D / 8));
          T* y = reinterpret_cast<T*>(base + (col * 2 + 1) * C::kPlane);
          *reinterpret_cast<uint4*>(y + sw128_offset(nrows + rem / (D / 8), rem % (D / 8), kCh)) = make_uint4(0, 0, 0, 0);
        }
        fence_proxy_async_smem();  // before the next copies into this stage
        __syncthreads();
      }
    } else {
      if (valid(ahead)) ahead = next(ahead);
      if (valid(ahead)) load(ahead, (it + 1) % 2);
      cp_async_commit();
      cp_async_wait_group<1>();
      __syncthreads();
    }
    {
      const T* aLj = reinterpret_cast<const T*>(base + (Tma ? jl * 2 * C::kPlane : jl * kCh * C::kLd * sizeof(T)));
      const T* Yj = Tma ? aLj + C::kPlane / sizeof(T) : aLj + C::kTileBytes / sizeof(T);
      const float* cLs = reinterpret_cast<const float*>(base + (Tma ? kCols * 2 * C::kPlane : 2 * C::kTileBytes)) +
                         (Tma ? jl * C::kClCopy + int(((int64_t(bh) * p.A + m) * p.b2 + jq) * col_rows + cur.row) % 4
                              : jl * kCh);
      float u[kCh / 8][4];
#pragma unroll
      for (int t = 0; t < kCh / 8; ++t) u[t][0] = u[t][1] = u[t][2] = u[t][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
        for (int tp = 0; tp < kCh / 16; ++tp) {
          uint32_t bk[4];
          const int row = tp * 16 + (lane / 16) * 8 + lane % 8, chunk = ks * 2 + (lane / 8) % 2;
          ldmatrix_x4(bk, aLj + (Tma ? sw128_offset(row, chunk, kCh) : row * C::kLd + chunk * 8));
          MM::run(u[2 * tp], qa[ks], bk[0], bk[1]);
          MM::run(u[2 * tp + 1], qa[ks], bk[2], bk[3]);
        }
      }
      stage2_scores<kCh / 8>(u, cLs, 0, nrows, p.scale_log2, lane);
      online_softmax_pv<T, DO, kCh / 8, Tma>(u, row_max, row_sum, o, Yj, C::kLd, lane, dh * (DO / 8));
    }
    __syncthreads();  // this stage is refilled next
    if (Tma && valid(ahead)) {
      ahead = next(ahead);
      if (tid == 0 && valid(ahead)) load(ahead, it % kNS);
    }
    cur = next(cur);
  }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    row_sum[hr] += __shfl_xor_sync(0xffffffffu, row_sum[hr], 1);
    row_sum[hr] += __shfl_xor_sync(0xffffffffu, row_sum[hr], 2);
    const int l = rg * 32 + mt * 16 + r + hr * 8;
    if (p.ws_lse != nullptr && dh == 0 && lane % 4 == 0 && l < p.b1 && jq < p.b2) {
      p.ws_lse[((int64_t(bh) * p.A + m) * p.b1 + l) * p.b2 + jq] = row_max[hr] + log2f(row_sum[hr]);
    }
    if (p.lse_out != nullptr && dh == 0 && lane % 4 == 0 && l < p.b1 && jq < p.b2) {
      const int64_t sq = int64_t(p.A) * p.b1 * p.b2;
      p.lse_out[bh * sq + q_base + row_off[l] + jq] = (row_max[hr] + log2f(row_sum[hr])) * 0.6931471805599453f;
    }
  }
  T* orow[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int l = rg * 32 + mt * 16 + r + hr * 8;
    orow[hr] = (l < p.b1 && jq < p.b2) ? og + int64_t(q_base + row_off[l] + jq) * p.o_stride[1] + dh * DO : nullptr;
  }
  store_rows<T, DO>(o, row_sum, orow[0], orow[1], lane);
}

// Proxies for the next iteration (spec section 3): for every workspace row (m, j, n, k),
//   L[l] = exp(u[l; n,k] - lse_l) with u = s q[m,l,j] . aL - cL (stage 2's probabilities, from
//   its log-sum-exp), cR = sum_l L[l], aR = sum_l L[l] q[m,l,j], proxy = aR * min(1/(cR + 1e-6), 1e4).
// One warp per (column j, 16 rows (n, k) of a 32-row chunk): U^T = aL Q_j^T (M = 16 rows, N = 32
// query rows, K = D), then aR = P Q_j (M = 16, N = D, K = 32), over blocks of 32 query rows l.
template <typename T, int D>
__global__ void __launch_bounds__(128) monarch_proxy_kernel(const MonarchFwdParams p) {
  using C = TwoPassConfig<T, D>;
  using MM = Mma<T>;
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);  // [kCols][32 rows l][kLd]
  float* lse_s = reinterpret_cast<float*>(smem + size_t(C::kCols) * 32 * C::kLd * sizeof(T));  // [kCols][32]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, r = lane / 4, c = (lane % 4) * 2;
  const int j0 = blockIdx.x * C::kCols, m = blockIdx.y, bh = blockIdx.z, b = bh / p.H, h = bh % p.H;
  const int jl = warp / 2, half = warp % 2, jq = j0 + jl;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  const T* al_ws = static_cast<const T*>(p.ws_al);
  T* proxy_ws = static_cast<T*>(p.ws_proxy);
  const int q_base = tile_base(p, m);

  for (int n = next_allowed(p, m, 0); n < p.F; n = next_allowed(p, m, n + 1)) {
    for (int k0 = 0; k0 < p.b1; k0 += 32) {
      // This warp's 16 rows (n, k0 + half * 16 + ...) of aL as A fragments, and their cL.
      int64_t row[2];
      float cl[2];
      const T* src[2];
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int kk = k0 + half * 16 + r + hr * 8;
        row[hr] = (kk < p.b1 && jq < p.b2) ? ws_row(p, bh, m, jq, n, kk) : -1;
        cl[hr] = row[hr] >= 0 ? p.ws_cl[row[hr]] * kLog2e : 0.f;
        src[hr] = row[hr] >= 0 ? al_ws + row[hr] * D : nullptr;
      }
      uint32_t aa[D / 16][4];
      load_a_rows<T, D>(aa, src[0], src[1], lane);
      float acc[D / 8][4];
#pragma unroll
      for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
      float cr[2] = {0.f, 0.f};
      for (int l0 = 0; l0 < p.b1; l0 += 32) {
        __syncthreads();  // the previous block's Q and lse are no longer read
        for (int idx = tid; idx < C::kCols * 32 * (D / 8); idx += blockDim.x) {
          const int col = idx / (32 * (D / 8)), rem = idx % (32 * (D / 8)), l = rem / (D / 8), dc = rem % (D / 8);
          const bool valid = l0 + l < p.b1 && j0 + col < p.b2;
          const int64_t tok = valid ? q_base + row_offset(p, l0 + l) + j0 + col : 0;
          cp_async_16(Qs + (col * 32 + l) * C::kLd + dc * 8, qg + tok * p.q_stride[1] + dc * 8, valid);
        }
        for (int idx = tid; idx < C::kCols * 32; idx += blockDim.x) {
          const int col = idx / 32, l = idx % 32;
          const bool valid = l0 + l < p.b1 && j0 + col < p.b2;
          lse_s[idx] = valid ? p.ws_lse[((int64_t(bh) * p.A + m) * p.b1 + l0 + l) * p.b2 + j0 + col] : 0.f;
        }
        cp_async_commit();
        cp_async_wait_all();
        __syncthreads();
        const T* Qj = Qs + jl * 32 * C::kLd;
        float u[4][4];
#pragma unroll
        for (int t = 0; t < 4; ++t) u[t][0] = u[t][1] = u[t][2] = u[t][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
          for (int tp = 0; tp < 2; ++tp) {
            mma_rows16<T>(u[2 * tp], u[2 * tp + 1], aa[ks], Qj + tp * 16 * C::kLd, C::kLd, ks, lane);
          }
        }
#pragma unroll
        for (int t = 0; t < 4; ++t) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int l = t * 8 + c + e % 2;
            const float pr = (l0 + l < p.b1 && row[e / 2] >= 0)
                                 ? exp2f(u[t][e] * p.scale_log2 - cl[e / 2] - lse_s[jl * 32 + l])
                                 : 0.f;
            u[t][e] = pr;
            cr[e / 2] += pr;
          }
        }
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
          const uint32_t pa[4] = {MM::pack(u[2 * kk][0], u[2 * kk][1]), MM::pack(u[2 * kk][2], u[2 * kk][3]),
                                  MM::pack(u[2 * kk + 1][0], u[2 * kk + 1][1]),
                                  MM::pack(u[2 * kk + 1][2], u[2 * kk + 1][3])};
#pragma unroll
          for (int dt2 = 0; dt2 < D / 16; ++dt2) {
            uint32_t bv[4];
            ldmatrix_x4_trans(bv, Qj + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * C::kLd + dt2 * 16 + (lane / 16) * 8);
            MM::run(acc[2 * dt2], pa, bv[0], bv[1]);
            MM::run(acc[2 * dt2 + 1], pa, bv[2], bv[3]);
          }
        }
      }
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        cr[hr] += __shfl_xor_sync(0xffffffffu, cr[hr], 1);
        cr[hr] += __shfl_xor_sync(0xffffffffu, cr[hr], 2);
        if (row[hr] >= 0) {
          const float inv = fminf(1.f / (cr[hr] + 1e-6f), 1e4f);  // the original's guard
          T* dst = proxy_ws + row[hr] * D;
#pragma unroll
          for (int i = 0; i < D / 8; ++i) {
            *reinterpret_cast<uint32_t*>(dst + i * 8 + c) = MM::pack(acc[i][2 * hr] * inv, acc[i][2 * hr + 1] * inv);
          }
        }
      }
    }
  }
}

}  // namespace cuda_detail
}  // namespace monarchrt
