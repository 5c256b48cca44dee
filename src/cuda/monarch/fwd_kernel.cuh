// CUDA forward of 1-iteration Monarch attention, fused: stage-1 intermediates (aL, Y, cL) live
// in shared memory only, never in device memory. Tensor cores through mma.sync m16n8k16 (sm_80
// and newer; runs on Hopper too). Design notes and measurements: docs/cuda-forward.md.
//
// One CTA (16 warps) owns a block of kJB = 8 query columns j and up to 32 query rows l of one
// query tile m of one (batch, head), and walks every allowed key tile n:
//   stage 1, per key row (n, k), in groups of G rows (16 / G warps per row), transposed so the
//   8 columns are the MMA's N dimension:
//     S^T[i, j] = K[n,k,i] . q[m,k,j]      (M = b2 keys, N = 8 columns, K = D)
//     R = softmax over i (cross-warp reduction in shared memory), cL = sum R (z - lse)
//     aL^T = K[n,k]^T R^T, Y^T = V[n,k]^T R^T   (M = D, N = 8, K = b2), with the operand
//       P = exp(z - max) in place of R = P / Z and the fp32 products divided by Z (largest
//       operand element exactly 1 in bf16: docs/numerics.md)
//   stage 2, per chunk of kKC = 16 key rows, one warp per (column j, 16 query rows):
//     u[l, k] = s q[m,l,j] . aL[n,k,j] - cL[n,k,j]   (M = 16 rows, N = 16 key rows, K = D)
//     online softmax over every (n, k) seen so far, O += P Y   (M = 16, N = D, K = 16)
// Query tiles with more than 32 rows are split over several CTAs, each recomputing stage 1.
#pragma once

#include <cuda_runtime.h>

#include "../common/ptx.cuh"
#include "fwd_params.h"
#include "tiles.cuh"
#include "warp_tiles.cuh"

namespace monarchrt {
namespace cuda_detail {

template <typename T, int D, int G>
struct FwdConfig {
  static constexpr int kWarps = 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kJB = 8;           // query columns per CTA (the MMA N of stage 1)
  static constexpr int kRowsPerCta = 32;  // query rows per CTA: two 16-row MMA tiles
  static constexpr int kKC = 16;          // key rows per stage-2 chunk
  static constexpr int kB2Max = D == 128 ? 64 : 128;  // widest tile row held in shared memory
  static constexpr int kPad = 8;          // 16 bytes per row: ldmatrix rows hit distinct banks
  static constexpr int kWPR = kWarps / G;  // warps per key row in stage 1
  static constexpr int kLdD = D + kPad;
  static constexpr int kLdB2 = kB2Max + kPad;
  static constexpr int kST = (kB2Max / 16 + kWPR - 1) / kWPR;  // S^T m-tiles per warp
  static constexpr int kDT = (D / 16 + kWPR - 1) / kWPR;       // aL^T m-tiles per warp
  static_assert(kKC % G == 0, "a chunk holds whole groups");
  // Shared memory (bytes).
  static constexpr size_t kKs = 0;
  static constexpr size_t kVs = kKs + size_t(G) * kB2Max * kLdD * sizeof(T);
  static constexpr size_t kQp = kVs + size_t(G) * kB2Max * kLdD * sizeof(T);
  static constexpr size_t kRs = kQp + size_t(G) * kJB * kLdD * sizeof(T);
  static constexpr size_t kAL = kRs + size_t(G) * kJB * kLdB2 * sizeof(T);
  static constexpr size_t kYc = kAL + size_t(kJB) * kKC * kLdD * sizeof(T);
  static constexpr size_t kCL = kYc + size_t(kJB) * kKC * kLdD * sizeof(T);
  static constexpr size_t kRed = kCL + size_t(kJB) * kKC * sizeof(float);
  static constexpr size_t kRowOff = kRed + size_t(3) * G * kWPR * kJB * sizeof(float);
  static constexpr int kMaxB1 = 256;  // rows of the row-offset table (b1 <= 256)
  static constexpr size_t kSmem = kRowOff + kMaxB1 * sizeof(int);
};

__device__ __forceinline__ float warp_max_rows(float x) {  // over lanes with equal lane % 4
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 8));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 16));
}
__device__ __forceinline__ float warp_sum_rows(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  x += __shfl_xor_sync(0xffffffffu, x, 8);
  return x + __shfl_xor_sync(0xffffffffu, x, 16);
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(FwdConfig<T, D, G>::kThreads, 1)
    monarch_fwd_kernel(const MonarchFwdParams p) {
  using C = FwdConfig<T, D, G>;
  using MM = Mma<T>;
  constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Ks = reinterpret_cast<T*>(smem + C::kKs);
  T* Vs = reinterpret_cast<T*>(smem + C::kVs);
  T* Qp = reinterpret_cast<T*>(smem + C::kQp);
  T* Rs = reinterpret_cast<T*>(smem + C::kRs);
  T* aLc = reinterpret_cast<T*>(smem + C::kAL);
  T* Yc = reinterpret_cast<T*>(smem + C::kYc);
  float* cLc = reinterpret_cast<float*>(smem + C::kCL);
  float* red_max = reinterpret_cast<float*>(smem + C::kRed);
  float* red_sum = red_max + G * C::kWPR * C::kJB;
  float* red_pz = red_sum + G * C::kWPR * C::kJB;
  int* row_off = reinterpret_cast<int*>(smem + C::kRowOff);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int r = lane / 4, c = (lane % 4) * 2;
  const int j0 = blockIdx.x * C::kJB;
  const int m = blockIdx.y / p.row_groups, rg = blockIdx.y % p.row_groups;
  const int b = blockIdx.z / p.H, h = blockIdx.z % p.H;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[2];
  const T* vg = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[2];
  T* og = static_cast<T*>(p.out) + b * p.o_stride[0] + h * p.o_stride[2];
  const int mt1 = (p.b2 + 15) / 16;  // 16-key MMA tiles of one key row

  // Zero every buffer once: pad rows and pad key rows must hold finite values (0 * NaN is NaN).
  for (int i = tid; i < int(C::kRed / 16); i += C::kThreads) {
    reinterpret_cast<uint4*>(smem)[i] = make_uint4(0, 0, 0, 0);
  }
  for (int i = tid; i < p.b1; i += C::kThreads) row_off[i] = row_offset(p, i);
  __syncthreads();
  const int q_base = tile_base(p, m);

  // Stage-2 role of this warp: column j0 + jl, rows rg * 32 + mt * 16 + [0, 16).
  const int jl = warp / 2, mt = warp % 2;
  const int jq = j0 + jl;
  // Rows of the 16 x D query block of this warp (nullptr: padding). Its A fragments are
  // re-read from global memory (L1/L2) for every stage-2 chunk: keeping them in registers next
  // to the 16 x D accumulator spilled (H200, D = 128: 128 registers, 300+ bytes of spills).
  const T* qrow[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int l = rg * C::kRowsPerCta + mt * 16 + r + half * 8;
    qrow[half] = (l < p.b1 && jq < p.b2) ? qg + int64_t(q_base + row_off[l] + jq) * p.q_stride[1] : nullptr;
  }
  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

  const int g = warp / C::kWPR, sub = warp % C::kWPR;  // stage-1 role: key row g of a group
  __syncthreads();

  for (int n = 0; n < p.F; ++n) {
    if (!tile_allowed(p, m, n)) continue;
    const int k_base = key_tile_base(p, n);
    for (int k0 = 0; k0 < p.b1; k0 += C::kKC) {
      const int nrows = min(C::kKC, p.b1 - k0);
      for (int g0 = 0; g0 < nrows; g0 += G) {
        // ---- load G key rows of K and V, and their proxies q[m, k, j0 .. j0 + 7]. A key row is
        // b2 consecutive tokens starting at k_base + row_off[k].
#pragma unroll 1
        for (int gg = 0; gg < G; ++gg) {
          const bool valid = g0 + gg < nrows;
          const int64_t base = valid ? k_base + row_off[k0 + g0 + gg] : 0;
          const int dc = tid % (D / 8);
          const T* krow = kg + base * p.k_stride[1] + dc * 8;
          const T* vrow = vg + base * p.v_stride[1] + dc * 8;
          T* ks_row = Ks + gg * C::kB2Max * C::kLdD + dc * 8;
          T* vs_row = Vs + gg * C::kB2Max * C::kLdD + dc * 8;
          constexpr int kStep = C::kThreads / (D / 8);  // tokens per pass
          for (int i = tid / (D / 8); i < p.b2; i += kStep) {
            cp_async_16(ks_row + i * C::kLdD, krow + (valid ? i * p.k_stride[1] : 0), valid);
            cp_async_16(vs_row + i * C::kLdD, vrow + (valid ? i * p.v_stride[1] : 0), valid);
          }
        }
        for (int idx = tid; idx < G * C::kJB * (D / 8); idx += C::kThreads) {
          const int gg = idx / (C::kJB * (D / 8)), rem = idx % (C::kJB * (D / 8));
          const int jj = rem / (D / 8), dc = rem % (D / 8);
          const bool valid = g0 + gg < nrows && j0 + jj < p.b2;
          const int64_t tok = valid ? q_base + row_off[k0 + g0 + gg] + j0 + jj : 0;
          cp_async_16(Qp + (gg * C::kJB + jj) * C::kLdD + dc * 8, qg + tok * p.q_stride[1] + dc * 8, valid);
        }
        cp_async_commit();
        cp_async_wait_all();
        __syncthreads();

        // ---- stage 1a: S^T = K q^T for this warp's 16-key tiles, column maxima
        const T* Kg = Ks + g * C::kB2Max * C::kLdD;
        const T* Vg = Vs + g * C::kB2Max * C::kLdD;
        float st[C::kST][4];
        float cmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int s = 0; s < C::kST; ++s) {
          const int t = sub + s * C::kWPR;
          st[s][0] = st[s][1] = st[s][2] = st[s][3] = 0.f;
          if (t < mt1) {
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks) {
              uint32_t a[4], bq[2];
              ldmatrix_x4(a, Kg + (t * 16 + lane % 16) * C::kLdD + ks * 16 + (lane / 16) * 8);
              ldmatrix_x2(bq, Qp + (g * C::kJB + lane % 8) * C::kLdD + ks * 16 + ((lane / 8) % 2) * 8);
              MM::run(st[s], a, bq[0], bq[1]);
            }
          }
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = t * 16 + r + (e / 2) * 8;
            st[s][e] = (t < mt1 && i < p.b2) ? st[s][e] * p.scale_log2 : -INFINITY;
            cmax[e % 2] = fmaxf(cmax[e % 2], st[s][e]);
          }
        }
        cmax[0] = warp_max_rows(cmax[0]);
        cmax[1] = warp_max_rows(cmax[1]);
        if (lane < 4) {
          red_max[(g * C::kWPR + sub) * C::kJB + c] = cmax[0];
          red_max[(g * C::kWPR + sub) * C::kJB + c + 1] = cmax[1];
        }
        __syncthreads();
        // ---- stage 1b: softmax over the b2 keys of the row, per column j
        float M[2] = {-INFINITY, -INFINITY}, sum[2] = {0.f, 0.f}, pz[2] = {0.f, 0.f};
#pragma unroll
        for (int w2 = 0; w2 < C::kWPR; ++w2) {
          M[0] = fmaxf(M[0], red_max[(g * C::kWPR + w2) * C::kJB + c]);
          M[1] = fmaxf(M[1], red_max[(g * C::kWPR + w2) * C::kJB + c + 1]);
        }
#pragma unroll
        for (int s = 0; s < C::kST; ++s) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float z = st[s][e];
            const float pr = z == -INFINITY ? 0.f : exp2f(z - M[e % 2]);
            sum[e % 2] += pr;
            if (pr > 0.f) pz[e % 2] += pr * z;
            st[s][e] = pr;
          }
        }
        sum[0] = warp_sum_rows(sum[0]);
        sum[1] = warp_sum_rows(sum[1]);
        pz[0] = warp_sum_rows(pz[0]);
        pz[1] = warp_sum_rows(pz[1]);
        if (lane < 4) {
          red_sum[(g * C::kWPR + sub) * C::kJB + c] = sum[0];
          red_sum[(g * C::kWPR + sub) * C::kJB + c + 1] = sum[1];
          red_pz[(g * C::kWPR + sub) * C::kJB + c] = pz[0];
          red_pz[(g * C::kWPR + sub) * C::kJB + c + 1] = pz[1];
        }
        __syncthreads();
        float Z[2] = {0.f, 0.f}, PZ[2] = {0.f, 0.f};
#pragma unroll
        for (int w2 = 0; w2 < C::kWPR; ++w2) {
          Z[0] += red_sum[(g * C::kWPR + w2) * C::kJB + c];
          Z[1] += red_sum[(g * C::kWPR + w2) * C::kJB + c + 1];
          PZ[0] += red_pz[(g * C::kWPR + w2) * C::kJB + c];
          PZ[1] += red_pz[(g * C::kWPR + w2) * C::kJB + c + 1];
        }
        const float inv[2] = {1.f / Z[0], 1.f / Z[1]};
        T* Rg = Rs + g * C::kJB * C::kLdB2;
#pragma unroll
        for (int s = 0; s < C::kST; ++s) {
          const int t = sub + s * C::kWPR;
          if (t < mt1) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              Rg[(c + e % 2) * C::kLdB2 + t * 16 + r + (e / 2) * 8] = MM::from_float(st[s][e]);  // P: / Z below
            }
          }
        }
        const bool row_valid = g0 + g < nrows;
        if (sub == 0 && lane < 4 && row_valid) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {  // cL = sum R (z - lse), in natural-log units
            cLc[(c + e) * C::kKC + g0 + g] = kLn2 * (PZ[e] * inv[e] - M[e] - log2f(Z[e]));
          }
        }
        __syncthreads();
        // ---- stage 1c: aL^T = K^T R^T and Y^T = V^T R^T for this warp's 16-wide slices of D
#pragma unroll
        for (int s = 0; s < C::kDT; ++s) {
          const int dt = sub + s * C::kWPR;
          if (dt < D / 16) {
            float al[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
            for (int ks = 0; ks < mt1; ++ks) {
              uint32_t a[4], av[4], br[2];
              const int rowi = ks * 16 + (lane / 16) * 8 + lane % 8;
              const int cold = dt * 16 + ((lane / 8) % 2) * 8;
              ldmatrix_x4_trans(a, Kg + rowi * C::kLdD + cold);
              ldmatrix_x4_trans(av, Vg + rowi * C::kLdD + cold);
              ldmatrix_x2(br, Rg + (lane % 8) * C::kLdB2 + ks * 16 + ((lane / 8) % 2) * 8);
              MM::run(al[0], a, br[0], br[1]);
              MM::run(al[1], av, br[0], br[1]);
            }
            if (row_valid) {
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const int d = dt * 16 + r + (e / 2) * 8, j = c + e % 2;
                aLc[(j * C::kKC + g0 + g) * C::kLdD + d] = MM::from_float(al[0][e] * inv[e % 2]);
                Yc[(j * C::kKC + g0 + g) * C::kLdD + d] = MM::from_float(al[1][e] * inv[e % 2]);
              }
            }
          }
        }
        __syncthreads();
      }

      // ---- stage 2 on this chunk of key rows: one warp per (column jl, 16 query rows)
      float u[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      const T* aLj = aLc + jl * C::kKC * C::kLdD;
      const T* Yj = Yc + jl * C::kKC * C::kLdD;
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t qa[4];
        qa[0] = qrow[0] ? *reinterpret_cast<const uint32_t*>(qrow[0] + ks * 16 + c) : 0u;
        qa[1] = qrow[1] ? *reinterpret_cast<const uint32_t*>(qrow[1] + ks * 16 + c) : 0u;
        qa[2] = qrow[0] ? *reinterpret_cast<const uint32_t*>(qrow[0] + ks * 16 + 8 + c) : 0u;
        qa[3] = qrow[1] ? *reinterpret_cast<const uint32_t*>(qrow[1] + ks * 16 + 8 + c) : 0u;
        mma_rows16<T>(u[0], u[1], qa, aLj, C::kLdD, ks, lane);
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int kc = nt * 8 + c + e % 2;
          u[nt][e] = kc < nrows ? u[nt][e] * p.scale_log2 - cLc[jl * C::kKC + kc] * kLog2e : -INFINITY;
        }
      }
      online_softmax_pv<T, D, 2>(u, row_max, row_sum, o, Yj, C::kLdD, lane);
      __syncthreads();
    }
  }

  // ---- normalize and write this warp's 16 x D output block
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    row_sum[hr] += __shfl_xor_sync(0xffffffffu, row_sum[hr], 1);
    row_sum[hr] += __shfl_xor_sync(0xffffffffu, row_sum[hr], 2);
  }
  T* orow[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int l = rg * C::kRowsPerCta + mt * 16 + r + hr * 8;
    orow[hr] = (l < p.b1 && jq < p.b2) ? og + int64_t(q_base + row_off[l] + jq) * p.o_stride[1] : nullptr;
  }
  store_rows<T, D>(o, row_sum, orow[0], orow[1], lane);
}

}  // namespace cuda_detail
}  // namespace monarchrt
