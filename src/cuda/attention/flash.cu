// Dense softmax attention on the GPU (see flash.h): a CTA of 8 warps owns 128 query rows of one
// (batch, head); every warp keeps its 16 query rows in registers as A fragments, and the CTA walks
// the keys 64 at a time, scores, and accumulates P V with the online softmax of the Monarch
// kernels (warp_tiles.cuh). Keys come from up to four token ranges, so a KV-cache window with
// sink frames and a ring buffer is read in place.
// - flash_fwd_kernel (portable, sm_80+): K and V tiles double-buffered through cp.async, padded
//   rows for conflict-free ldmatrix, mma.sync.
// - flash_fwd_wg_kernel (Hopper, use_wgmma()): each group of 4 warps computes its 64 rows' products
//   with wgmma (common/wgmma.cuh), 4 tiles in flight, and overlaps the tensor cores with the
//   softmax: the scores of tile t + 1 are issued before the softmax of tile t, and P V of tile t
//   runs while the next tile's scores are issued. Where every key range boundary is a multiple of
//   8 keys (video frames, the 512 text keys), a third warpgroup copies the query tile and the K / V
//   tiles with TMA into the 128-byte swizzled layout, up to 4 tiles ahead, and hands its registers
//   to the two computing ones, which take turns issuing their products (one's softmax runs during
//   the other's products); without a causal limit that kernel is persistent (one CTA per SM
//   walking several query tiles, the copies of the next running while the current one ends);
//   otherwise all threads copy with cp.async into the blocked layout.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <type_traits>

#include "../../core/plan.h"
#include "../common/host.h"
#include "../common/tma.cuh"
#include "../common/wgmma.cuh"
#include "../monarch/warp_tiles.cuh"
#include "flash.h"
#include "monarchrt/cuda.h"

namespace monarchrt {
namespace cuda_detail {
namespace {

template <typename T, int D>
struct FlashConfig {
  static constexpr int kThreads = 256, kBr = 128, kBc = 64, kLd = D + 8;
  static constexpr size_t kStage = size_t(2) * kBc * kLd * sizeof(T);  // one K and one V tile
  static constexpr size_t kSmem = 2 * kStage;
};

struct FlashKernelParams {
  FlashArgs a;
  int seg_cum[kFlashMaxSegments + 1];  // keys before each segment; seg_cum[segments] = total
  float scale_log2;
};

// What a CTA of either kernel works on: 128 query rows (from q0) of one (batch, head) bh, the keys
// it may see (block-causal: per row and for the whole CTA). The rows' A fragments are the kernel's
// (load_q from global memory, or the persistent kernel's copy in shared memory).
template <typename T, int D>
struct FlashCta {
  const T *qb, *kb, *vb;
  T* ob;
  int q0, h, b;
  int limit;         // keys any row of this CTA may see
  int r[2];          // this lane's query rows
  int row_limit[2];  // keys each of them may see

  __device__ FlashCta(const FlashKernelParams& p, int first_row, int bh, int rows) : q0(first_row) {
    const FlashArgs& a = p.a;
    const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
    b = bh / a.H;
    h = bh % a.H;
    qb = static_cast<const T*>(a.q) + b * a.q_stride[0] + h * a.q_stride[2];
    kb = static_cast<const T*>(a.k) + b * a.k_stride[0] + h * a.k_stride[2];
    vb = static_cast<const T*>(a.v) + b * a.v_stride[0] + h * a.v_stride[2];
    ob = static_cast<T*>(a.out) + b * a.o_stride[0] + h * a.o_stride[2];
    const int total = p.seg_cum[a.segments];
    limit = total;
    r[0] = q0 + warp * 16 + lane / 4;
    r[1] = r[0] + 8;
    row_limit[0] = row_limit[1] = total;
    if (a.causal_tokens > 0) {
      const int last = min(q0 + rows, a.Sq) - 1;
      limit = min(total, (last / a.causal_tokens + 1) * a.causal_tokens);
      for (int hr = 0; hr < 2; ++hr) row_limit[hr] = min(total, (r[hr] / a.causal_tokens + 1) * a.causal_tokens);
    }
  }
  // This warp's 16 query rows as A fragments, from global memory (zeros past the last query).
  __device__ void load_q(const FlashKernelParams& p, uint32_t (&qa)[D / 16][4], int lane) const {
    load_a_rows<T, D>(qa, r[0] < p.a.Sq ? qb + r[0] * p.a.q_stride[1] : nullptr,
                      r[1] < p.a.Sq ? qb + r[1] * p.a.q_stride[1] : nullptr, lane);
  }
  // Token of attended key `key` (< limit): keys number the token ranges one after another.
  __device__ int token(const FlashKernelParams& p, int key) const {
    int s = 0;
    while (s + 1 < p.a.segments && key >= p.seg_cum[s + 1]) ++s;
    return p.a.seg_start[s] + key - p.seg_cum[s];
  }
  // Copies key tile `tile` (kTileKeys keys) of K and V, by the CTA's 256 threads, into Ks / Vs:
  // row-major with row pitch ld, or (Blocked) the blocked layout of common/wgmma.cuh.
  static constexpr int kTileKeys = 64;
  template <bool Blocked>
  __device__ void load_tile(const FlashKernelParams& p, T* Ks, T* Vs, int tile, int ld) const {
    for (int i = int(threadIdx.x); i < kTileKeys * D / 8; i += 256) {
      const int row = Blocked ? i / D * 8 + i % 8 : i / (D / 8), ch = Blocked ? (i / 8) % (D / 8) : i % (D / 8);
      const int dst = Blocked ? i * 8 : row * ld + ch * 8;
      const int key = tile * kTileKeys + row;
      const bool valid = key < limit;
      const int tok = valid ? token(p, key) : 0;
      cp_async_16(Ks + dst, kb + tok * p.a.k_stride[1] + ch * 8, valid);
      cp_async_16(Vs + dst, vb + tok * p.a.v_stride[1] + ch * 8, valid);
    }
  }
  // Normalizes and stores the warp's rows (row_sum: this lane's partial sums, added up here).
  __device__ void store(const FlashKernelParams& p, const float (&o)[D / 8][4], float (&row_sum)[2], int lane) const {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      row_sum[hr] += __shfl_xor_sync(0xffffffffu, row_sum[hr], 1);
      row_sum[hr] += __shfl_xor_sync(0xffffffffu, row_sum[hr], 2);
    }
    store_rows<T, D>(o, row_sum, r[0] < p.a.Sq ? ob + r[0] * p.a.o_stride[1] : nullptr,
                     r[1] < p.a.Sq ? ob + r[1] * p.a.o_stride[1] : nullptr, lane);
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(256, 1) flash_fwd_kernel(const FlashKernelParams p) {
  using C = FlashConfig<T, D>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int lane = int(threadIdx.x) % 32;
  const FlashCta<T, D> cta(p, int(blockIdx.x) * C::kBr, int(blockIdx.z), C::kBr);
  uint32_t qa[D / 16][4];
  cta.load_q(p, qa, lane);
  auto load_tile = [&](int tile, int stage) {
    T* Ks = smem + size_t(stage) * 2 * C::kBc * C::kLd;
    cta.template load_tile<false>(p, Ks, Ks + C::kBc * C::kLd, tile, C::kLd);
  };

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const int tiles = (cta.limit + C::kBc - 1) / C::kBc;
  load_tile(0, 0);
  cp_async_commit();
  for (int t = 0; t < tiles; ++t) {
    if (t + 1 < tiles) load_tile(t + 1, (t + 1) & 1);
    cp_async_commit();
    cp_async_wait_group<1>();
    __syncthreads();
    const T* Ks = smem + size_t(t & 1) * 2 * C::kBc * C::kLd;
    const T* Vs = Ks + C::kBc * C::kLd;
    float u[C::kBc / 8][4];
#pragma unroll
    for (int i = 0; i < C::kBc / 8; ++i) u[i][0] = u[i][1] = u[i][2] = u[i][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
      for (int tp = 0; tp < C::kBc / 16; ++tp) {
        mma_rows16<T>(u[2 * tp], u[2 * tp + 1], qa[ks], Ks + tp * 16 * C::kLd, C::kLd, ks, lane);
      }
    }
#pragma unroll
    for (int nt = 0; nt < C::kBc / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = t * C::kBc + nt * 8 + (lane % 4) * 2 + (e % 2);
        u[nt][e] = key < cta.row_limit[e / 2] ? u[nt][e] * p.scale_log2 : -INFINITY;
      }
    }
    online_softmax_pv<T, D, C::kBc / 8>(u, row_max, row_sum, o, Vs, C::kLd, lane);
    __syncthreads();
  }
  cta.store(p, o, row_sum, lane);
}

template <typename T, int D>
struct FlashWgConfig {
  static constexpr int kThreads = 256, kBr = 128, kBc = 64, kStages = 4;
  static constexpr int kCopyThreads = 128;  // the TMA variant's copying warpgroup
  static constexpr size_t kTile = size_t(kBc) * D;  // elements of one K or V tile
  static constexpr size_t kStageBytes = size_t(kStages) * 2 * kTile * sizeof(T);
  static constexpr size_t kQBytes = size_t(kBr) * D * sizeof(T);  // the TMA variant's query tile
  // The stages (+ the query tile), up to 1 KB to align them to 1024 bytes (the 128-byte swizzle),
  // two mbarriers per stage and two for the query tile.
  static constexpr size_t smem(bool tma) {
    return kStageBytes + (tma ? kQBytes : 0) + 1024 + (2 * kStages + 2) * sizeof(uint64_t);
  }
};

// The TMA variant's tensor maps ([B, S, H, D] row tiles, common/tma.cuh): 64-token boxes of K and
// V for tiles inside one key range, 8-token boxes for the others, 64-token boxes of q.
struct FlashTma {
  CUtensorMap k64, v64, k8, v8, q64;
};

// Work items: 128 query rows of one (batch, head); item i is query tile qtiles - 1 - i % qtiles (the
// last first: with a causal limit the one that sees the most keys) of batch * heads index
// i / qtiles. Without Tma the grid is (qtiles, 1, B * H), one item per CTA, and all 256 threads
// copy the K / V tiles with cp.async into the unswizzled blocked layout, two tiles ahead, with one
// CTA barrier per tile.
// Tma: persistent where every item costs the same (no causal limit): one CTA per SM, each taking
// one item per round (item_at); with a causal limit one CTA per item, which the block scheduler
// starts in order, the heaviest of each head first. A third warpgroup (threads 256..383, which keep
// 40 registers and give the rest to the two computing warpgroups: 232 each) copies: its thread 256
// issues, item after item, the tensor copy of the item's query tile into shared memory (refilled
// once the 8 computing warps have taken their rows into registers, on `q_empty`) and the copies of
// its K / V tiles into the 128-byte swizzled layout (D / 64 tiles of 64 keys x 64 features; a tile
// inside one key range is one 64-token box per 64 features, others 8-token boxes, which needs every
// range boundary and the key limit to be multiples of 8), up to 4 tiles ahead, completing on the
// stage's `full` mbarrier; a stage is refilled once all 8 computing warps have arrived on its
// `empty` mbarrier (after their P V of that tile). So the warpgroups never meet at a CTA barrier,
// and the next item's query tile and first K / V tiles arrive while the current item ends. Keys
// past the limit are never copied and their rows hold zeros or keys of an earlier tile (finite;
// their scores are masked).
template <typename T, int D, bool Tma>
__global__ void __launch_bounds__(FlashWgConfig<T, D>::kThreads + (Tma ? FlashWgConfig<T, D>::kCopyThreads : 0), 1)
    flash_fwd_wg_kernel(const FlashKernelParams p, const __grid_constant__ FlashTma tma) {
  using C = FlashWgConfig<T, D>;
  using Cta = FlashCta<T, D>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* base = smem_raw + (Tma ? (1024u - (smem_addr(smem_raw) & 1023u)) & 1023u : 0u);
  T* smem = reinterpret_cast<T*>(base);
  T* qs = reinterpret_cast<T*>(base + C::kStageBytes);  // Tma only, like the mbarriers
  uint64_t* full = reinterpret_cast<uint64_t*>(base + C::kStageBytes + (Tma ? C::kQBytes : 0));
  uint64_t* empty = full + C::kStages;
  uint64_t* q_full = empty + C::kStages;
  uint64_t* q_empty = q_full + 1;
  const int lane = int(threadIdx.x) % 32;
  const int qtiles = (p.a.Sq + C::kBr - 1) / C::kBr, items = qtiles * p.a.B * p.a.H;
  // The CTA's r-th item (-1: none). Tma: round r gives items r n .. r n + n - 1 to the n CTAs, in
  // alternating directions. Otherwise the grid's one item.
  auto item_at = [&](int r) {
    if (!Tma) return r == 0 ? 0 : -1;
    const int n = int(gridDim.x), c = int(blockIdx.x), i = r * n + (r % 2 == 0 ? c : n - 1 - c);
    return i < items ? i : -1;
  };
  auto item_cta = [&](int item) {
    const int qt = !Tma ? int(blockIdx.x) : item % qtiles;
    const int bh = !Tma ? int(blockIdx.z) : item / qtiles;
    return Cta(p, (qtiles - 1 - qt) * C::kBr, bh, C::kBr);
  };
  auto tile_count = [](const Cta& cta) { return (cta.limit + C::kBc - 1) / C::kBc; };
  auto load_tile = [&](const Cta& cta, int tile, int stage) {
    T* Ks = smem + size_t(stage) * 2 * C::kTile;
    T* Vs = Ks + C::kTile;
    if constexpr (Tma) {  // by the copying thread only
      const int k0 = tile * C::kBc, k1 = min(k0 + C::kBc, cta.limit);
      const int tok = cta.token(p, k0);
      const bool whole = k1 - k0 == C::kBc && cta.token(p, k1 - 1) == tok + C::kBc - 1;
      mbar_expect(&full[stage], uint32_t(2 * (D / 64) * (k1 - k0) * 128));
      if (whole) {
#pragma unroll
        for (int hf = 0; hf < D / 64; ++hf) {
          tma_load_tile(Ks + hf * 64 * 64, &tma.k64, hf * 64, tok, cta.h, cta.b, &full[stage]);
          tma_load_tile(Vs + hf * 64 * 64, &tma.v64, hf * 64, tok, cta.h, cta.b, &full[stage]);
        }
      } else {
        for (int g = 0; g < (k1 - k0) / 8; ++g) {
          const int tg = cta.token(p, k0 + 8 * g);
#pragma unroll
          for (int hf = 0; hf < D / 64; ++hf) {
            tma_load_tile(Ks + hf * 64 * 64 + g * 8 * 64, &tma.k8, hf * 64, tg, cta.h, cta.b, &full[stage]);
            tma_load_tile(Vs + hf * 64 * 64 + g * 8 * 64, &tma.v8, hf * 64, tg, cta.h, cta.b, &full[stage]);
          }
        }
      }
    } else {
      cta.template load_tile<true>(p, Ks, Vs, tile, D);
    }
  };

  if constexpr (Tma) {
    for (int i = int(threadIdx.x); i < int(C::kStageBytes / 16); i += int(blockDim.x)) {
      reinterpret_cast<uint4*>(base)[i] = make_uint4(0, 0, 0, 0);  // rows no copy writes stay finite
    }
    fence_proxy_async_smem();
    if (threadIdx.x == 0) {
      for (int i = 0; i < C::kStages; ++i) mbar_init(&full[i], 1);
      for (int i = 0; i < C::kStages; ++i) mbar_init(&empty[i], 8);
      mbar_init(q_full, 1);
      mbar_init(q_empty, 8);
      fence_mbar_init();
    }
    __syncthreads();
    if (threadIdx.x >= C::kThreads) {  // the copying warpgroup
      warpgroup_regs_dec<40>();
      if (threadIdx.x == C::kThreads) {
        int g = 0;  // tiles copied so far
        for (int it = 0; item_at(it) >= 0; ++it) {
          const Cta cta = item_cta(item_at(it));
          if (it > 0) mbar_wait(q_empty, (it - 1) & 1);
          mbar_expect(q_full, uint32_t(C::kQBytes));  // rows past the last query arrive as zeros
#pragma unroll
          for (int half = 0; half < C::kBr / 64; ++half) {
#pragma unroll
            for (int hf = 0; hf < D / 64; ++hf) {
              tma_load_tile(qs + hf * C::kBr * 64 + half * 64 * 64, &tma.q64, hf * 64, cta.q0 + half * 64, cta.h,
                            cta.b, q_full);
            }
          }
          const int tiles = tile_count(cta);
          for (int t = 0; t < tiles; ++t, ++g) {
            if (g >= C::kStages) mbar_wait(&empty[g % C::kStages], ((g / C::kStages) - 1) & 1);
            load_tile(cta, t, g % C::kStages);
          }
        }
      }
      return;
    }
    warpgroup_regs_inc<232>();
  }
  // Tma: the two warpgroups take turns issuing their products (named barrier 1 + w is warpgroup
  // w's turn, opened by the other's arrival), so that one's softmax runs while the other's
  // products are on the tensor cores. Each issues tiles + 1 times per item; warpgroup 1 opens the
  // first turn of warpgroup 0 and not one after its own last of the CTA's last item.
  const int wg = int(threadIdx.x) / 128;
  if (Tma && wg == 1) named_bar_arrive(1, 256);
  int g0 = 0;  // tiles before this item
  for (int it = 0; item_at(it) >= 0; ++it) {
    const Cta cta = item_cta(item_at(it));
    const int tiles = tile_count(cta);
    const bool last_item = item_at(it + 1) < 0;
    uint32_t qa[D / 16][4];
    if constexpr (Tma) {
      mbar_wait(q_full, it & 1);
      const int row = (int(threadIdx.x) / 32) * 16 + lane % 16;
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) ldmatrix_x4(qa[ks], qs + sw128_offset(row, 2 * ks + lane / 16, C::kBr));
      __syncwarp();
      if (lane == 0) mbar_arrive(q_empty);
    } else {
      cta.load_q(p, qa, lane);
      load_tile(cta, 0, 0);
      cp_async_commit();
      if (tiles > 1) load_tile(cta, 1, 1);
      cp_async_commit();
    }
    auto stage_of = [&](int t) { return (g0 + t) % C::kStages; };
    auto issue_scores = [&](float (&s)[8][4], int t) {  // S = Q K(t)^T for this warpgroup's 64 rows
      const T* Ks = smem + size_t(stage_of(t)) * 2 * C::kTile;
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {  // Tma: 16 features are 32 bytes into a 64-feature tile
        const uint64_t desc = Tma ? wgmma_desc_sw128(Ks + (ks / 4) * 64 * 64 + (ks % 4) * 16, 1024)
                                  : wgmma_desc(Ks + ks * 128, 128, D * 16);
        wgmma_m64n64k16<T, false>(s, qa[ks], desc, ks > 0);
      }
      wgmma_commit();
    };
    // Tile t: wait for its copies. cp.async: they ran two tiles ahead; one barrier makes everyone's
    // copies of t visible and says every warpgroup is done with tile t - 2, whose stage the copies
    // of t + 2 reuse.
    auto next_tile = [&](int t) {
      if constexpr (Tma) {
        mbar_wait(&full[stage_of(t)], ((g0 + t) / C::kStages) & 1);
      } else {
        cp_async_wait_group<1>();
        fence_proxy_async_smem();
        __syncthreads();
        if (t + 2 < tiles) load_tile(cta, t + 2, stage_of(t + 2));
        cp_async_commit();
      }
    };
    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
    // Scores of tile t: scaled and masked into a copy (the score registers, wgmma accumulators,
    // are only read while P V is in flight), then the online softmax: P as A fragments, and corr.
    auto softmax = [&](const float (&sc)[8][4], int t, float (&corr)[2], uint32_t (&pa)[C::kBc / 16][4]) {
      float u[8][4];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = t * C::kBc + nt * 8 + (lane % 4) * 2 + (e % 2);
          u[nt][e] = key < cta.row_limit[e / 2] ? sc[nt][e] * p.scale_log2 : -INFINITY;
        }
      }
      online_softmax_p<T, C::kBc / 8>(u, row_max, row_sum, corr, pa);
    };
    auto issue_pv = [&](const uint32_t (&pa)[C::kBc / 16][4], int t) {  // O += P V(t)
      const T* Vs = smem + size_t(stage_of(t)) * 2 * C::kTile + C::kTile;
      wgmma_fence();  // o was rescaled by ordinary instructions
#pragma unroll
      for (int half = 0; half < D / 64; ++half) {
        float(&oh)[8][4] = *reinterpret_cast<float(*)[8][4]>(&o[8 * half]);
#pragma unroll
        for (int kk = 0; kk < C::kBc / 16; ++kk) {
          const uint64_t desc = Tma ? wgmma_desc_sw128(Vs + half * 64 * 64 + kk * 16 * 64, 1024)
                                    : wgmma_desc(Vs + kk * 16 * D + half * 64 * 8, D * 16, 128);
          wgmma_m64n64k16<T, true>(oh, pa[kk], desc, true);
        }
      }
      wgmma_commit();
    };
    auto release = [&](int t) {  // every warp is done with tile t's stage
      if constexpr (Tma) {
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[stage_of(t)]);
      }
    };
    auto turn_begin = [&]() {
      if constexpr (Tma) named_bar_sync(1 + wg, 256);
    };
    auto turn_end = [&](bool last) {
      if (Tma && !(last && wg == 1)) named_bar_arrive(2 - wg, 256);
    };
    float s[8][4], corr[2];
    uint32_t pa[C::kBc / 16][4], pa_next[C::kBc / 16][4];
    next_tile(0);
    turn_begin();
    issue_scores(s, 0);
    turn_end(false);
    wgmma_wait<0>();
    softmax(s, 0, corr, pa);  // o is still zero: nothing to rescale
    // Tile t >= 1: the scores of t and P V of t - 1 are issued together; the softmax of t runs on
    // the CUDA cores while P V of t - 1 is on the tensor cores; o is rescaled once that is done.
    // Two P buffers alternate (copying one into the other makes ptxas serialize the wgmmas).
    auto step = [&](int t, const uint32_t (&pa_prev)[C::kBc / 16][4], uint32_t (&pa_new)[C::kBc / 16][4]) {
      next_tile(t);
      turn_begin();
      issue_scores(s, t);
      issue_pv(pa_prev, t - 1);
      turn_end(false);
      wgmma_wait<1>();  // groups complete in order: the scores are done, P V may still run
      softmax(s, t, corr, pa_new);
      wgmma_wait<0>();
      release(t - 1);
      scale_rows<D>(o, corr);
    };
    int t = 1;
    for (; t + 1 < tiles; t += 2) {
      step(t, pa, pa_next);
      step(t + 1, pa_next, pa);
    }
    if (t < tiles) {
      step(t, pa, pa_next);
      turn_begin();
      issue_pv(pa_next, t);
    } else {
      turn_begin();
      issue_pv(pa, tiles - 1);
    }
    turn_end(last_item);
    wgmma_wait<0>();
    release(tiles - 1);
    cta.store(p, o, row_sum, lane);
    g0 += tiles;
  }
}

template <typename T, int D>
Status prepare_typed() {
  static std::atomic<uint64_t> done{0}, done_wg{0}, done_tma{0};
  MONARCHRT_RETURN_IF_ERROR(ensure_smem(flash_fwd_kernel<T, D>, FlashConfig<T, D>::kSmem, done));
  if (!use_wgmma()) return Status();
  MONARCHRT_RETURN_IF_ERROR(ensure_smem(flash_fwd_wg_kernel<T, D, false>, FlashWgConfig<T, D>::smem(false), done_wg));
  return ensure_smem(flash_fwd_wg_kernel<T, D, true>, FlashWgConfig<T, D>::smem(true), done_tma);
}

// The TMA variant's maps (false: it cannot run: a key range boundary or the block-causal limit
// is not a multiple of 8 keys, or the encoder refused a view, e.g. a zero stride).
template <typename T, int D>
bool tma_maps(const FlashKernelParams& p, FlashTma* tma) {
  const FlashArgs& a = p.a;
  int tokens = 0;
  for (int s = 0; s < a.segments; ++s) {
    if (a.seg_len[s] % 8 != 0) return false;
    tokens = std::max(tokens, a.seg_start[s] + a.seg_len[s]);
  }
  if (a.causal_tokens % 8 != 0) return false;
  const bool bf16 = std::is_same<T, __nv_bfloat16>::value;
  const int64_t shape[4] = {a.B, tokens, a.H, D}, q_shape[4] = {a.B, a.Sq, a.H, D};
  return encode_row_tiles(&tma->q64, a.q, bf16, q_shape, a.q_stride, 64).ok() &&
         encode_row_tiles(&tma->k64, a.k, bf16, shape, a.k_stride, 64).ok() &&
         encode_row_tiles(&tma->v64, a.v, bf16, shape, a.v_stride, 64).ok() &&
         encode_row_tiles(&tma->k8, a.k, bf16, shape, a.k_stride, 8).ok() &&
         encode_row_tiles(&tma->v8, a.v, bf16, shape, a.v_stride, 8).ok();
}

template <typename T, int D>
Status launch_typed(const FlashKernelParams& p, cudaStream_t stream) {
  using C = FlashConfig<T, D>;
  using Wg = FlashWgConfig<T, D>;
  static_assert(C::kBr == Wg::kBr && C::kThreads == 256 && Wg::kThreads == 256,
                "both kernels: CTAs of 256 threads owning 128 query rows (FlashCta)");
  static_assert(C::kBc == FlashCta<T, D>::kTileKeys && Wg::kBc == FlashCta<T, D>::kTileKeys, "64-key tiles");
  MONARCHRT_RETURN_IF_ERROR((prepare_typed<T, D>()));
  const dim3 grid(unsigned((p.a.Sq + C::kBr - 1) / C::kBr), 1, unsigned(p.a.B * p.a.H));
  if (use_wgmma()) {
    FlashTma tma{};
    if (tma_maps<T, D>(p, &tma)) {
      // Persistent, one CTA per SM, where all items cost the same; with a causal limit one CTA per
      // item, the heaviest of each head first, for the block scheduler to balance.
      int ctas = int(grid.x * grid.z);
      if (p.a.causal_tokens == 0) {
        int device = 0, sms = 0;
        MONARCHRT_CUDA_CHECK(cudaGetDevice(&device));
        MONARCHRT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
        ctas = std::min(ctas, sms);
      }
      if (p.a.max_ctas > 0) ctas = std::min(ctas, p.a.max_ctas);
      flash_fwd_wg_kernel<T, D, true><<<ctas, Wg::kThreads + Wg::kCopyThreads, Wg::smem(true), stream>>>(p, tma);
    } else {
      flash_fwd_wg_kernel<T, D, false><<<grid, Wg::kThreads, Wg::smem(false), stream>>>(p, tma);
    }
  } else {
    flash_fwd_kernel<T, D><<<grid, C::kThreads, C::kSmem, stream>>>(p);
  }
  MONARCHRT_CUDA_CHECK(cudaGetLastError());
  return Status();
}

}  // namespace

Status prepare_flash() {
  MONARCHRT_RETURN_IF_ERROR((prepare_typed<__nv_bfloat16, 128>()));
  MONARCHRT_RETURN_IF_ERROR((prepare_typed<__nv_bfloat16, 64>()));
  MONARCHRT_RETURN_IF_ERROR((prepare_typed<__half, 128>()));
  return prepare_typed<__half, 64>();
}

Status flash_attention(const FlashArgs& a, void* stream) {
  if (a.dtype != DType::kBF16 && a.dtype != DType::kF16) {
    return Status::unsupported(std::string("dense attention on CUDA needs bfloat16 or float16, got ") + dtype_name(a.dtype));
  }
  if (a.D != 64 && a.D != 128) {
    return Status::unsupported("dense attention on CUDA supports head dims 64 and 128, got " + std::to_string(a.D));
  }
  if (a.segments < 1 || a.segments > kFlashMaxSegments) {
    return Status::unsupported("dense attention on CUDA: the attended keys form " + std::to_string(a.segments) +
                               " token ranges (at most " + std::to_string(kFlashMaxSegments) + ")");
  }
  const void* ptrs[4] = {a.q, a.k, a.v, a.out};
  const int64_t* strides[4] = {a.q_stride, a.k_stride, a.v_stride, a.o_stride};
  const char* names[4] = {"q", "k", "v", "out"};
  for (int i = 0; i < 4; ++i) {
    bool ok = reinterpret_cast<uintptr_t>(ptrs[i]) % 16 == 0;
    for (int j = 0; j < 3; ++j) ok = ok && strides[i][j] % 8 == 0;
    if (!ok) return Status::unsupported(std::string(names[i]) + ": rows must be contiguous and 16-byte aligned on the CUDA path");
  }
  FlashKernelParams p{};
  p.a = a;
  p.seg_cum[0] = 0;
  for (int s = 0; s < a.segments; ++s) {
    if (a.seg_len[s] < 0 || a.seg_start[s] < 0) return Status::invalid("dense attention: negative key range");
    p.seg_cum[s + 1] = p.seg_cum[s] + a.seg_len[s];
  }
  if (p.seg_cum[a.segments] < 1) return Status::invalid("dense attention: no key to attend");
  if (a.causal_tokens > 0 && (a.segments != 1 || a.seg_start[0] != 0)) {
    return Status::invalid("dense attention: block-causal needs one key range starting at token 0");
  }
  if (a.Sq < 1) return Status();
  p.scale_log2 = a.scale * 1.4426950408889634f;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.dtype == DType::kBF16) {
    return a.D == 128 ? launch_typed<__nv_bfloat16, 128>(p, s) : launch_typed<__nv_bfloat16, 64>(p, s);
  }
  return a.D == 128 ? launch_typed<__half, 128>(p, s) : launch_typed<__half, 64>(p, s);
}

Status dense_attention_args(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                            const AttentionParams& params, FlashArgs* args) {
  MONARCHRT_RETURN_IF_ERROR(check_attention(q, k, v, out, params, /*monarch=*/false));
  const TensorView* views[4] = {&q, &k, &v, &out};
  const char* names[4] = {"q", "k", "v", "out"};
  for (int i = 0; i < 4; ++i) {
    if (views[i]->device != Device::kCUDA) {
      return Status::invalid(std::string(names[i]) + ": expected a cuda tensor, got " + device_name(views[i]->device));
    }
    if (views[i]->dtype != q.dtype) {
      return Status::unsupported(std::string(names[i]) + ": dtype must equal q's on the CUDA path");
    }
    if (views[i]->stride[3] != 1) return Status::unsupported(std::string(names[i]) + ": the head dim must be contiguous on the CUDA path");
  }
  FlashArgs& a = *args;
  a = FlashArgs{};
  a.q = q.data;
  a.k = k.data;
  a.v = v.data;
  a.out = out.data;
  for (int j = 0; j < 3; ++j) {
    a.q_stride[j] = q.stride[j];
    a.k_stride[j] = k.stride[j];
    a.v_stride[j] = v.stride[j];
    a.o_stride[j] = out.stride[j];
  }
  a.B = int(q.batch());
  a.H = int(q.heads());
  a.D = int(q.head_dim());
  a.Sq = int(q.tokens());
  a.dtype = q.dtype;
  a.scale = float(params.scale > 0 ? params.scale : 1.0 / std::sqrt(double(a.D)));
  const int64_t per_frame = params.grid.tokens_per_frame();
  if (!params.kv_cache) {
    a.segments = 1;
    a.seg_start[0] = 0;
    a.seg_len[0] = int(k.tokens());
    a.causal_tokens = int(params.causal_chunk_frames * per_frame);
  } else {  // the attended frames, as runs of consecutive cache slots
    const int64_t frames = params.cache_capacity_frames > 0 ? params.cache_frames : k.tokens() / per_frame;
    int64_t run_start = -1, run_len = 0;
    auto flush = [&]() -> Status {
      if (run_len == 0) return Status();
      if (a.segments == kFlashMaxSegments) {
        return Status::unsupported("dense attention on CUDA: the attended cache frames form more than " +
                                   std::to_string(kFlashMaxSegments) + " runs of slots");
      }
      a.seg_start[a.segments] = int(run_start * per_frame);
      a.seg_len[a.segments] = int(run_len * per_frame);
      ++a.segments;
      return Status();
    };
    for (int64_t f : attended_frames(params, frames)) {
      const int64_t slot = cache_slot(params, f);
      if (run_len > 0 && slot == run_start + run_len) {
        ++run_len;
        continue;
      }
      MONARCHRT_RETURN_IF_ERROR(flush());
      run_start = slot;
      run_len = 1;
    }
    MONARCHRT_RETURN_IF_ERROR(flush());
  }
  return Status();
}

}  // namespace cuda_detail

namespace cuda {

Status dense_attention(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                       const AttentionParams& params, void* stream) {
  cuda_detail::FlashArgs a{};
  MONARCHRT_RETURN_IF_ERROR(cuda_detail::dense_attention_args(q, k, v, out, params, &a));
  return cuda_detail::flash_attention(a, stream);
}

}  // namespace cuda
}  // namespace monarchrt
