// Fused Monarch forward on Hopper with thread-block clusters of 16 CTAs (docs/cuda-forward.md,
// "The cluster kernel"): aL, Y and cL go from the SM that makes them to the SMs that use them
// through distributed shared memory, never through device memory.
//
// One cluster per (batch * head, query tile m); CTA `rank` of the cluster is
//  - the stage-1 producer of tile rows k = rank, rank + 16, ... (k < b1) for every key tile n that
//    m attends, in the order (k outer, n inner). Step s is its s-th (row, key tile); two producer
//    warpgroups take the even and the odd steps, each with its own K / V row buffers (TMA), and run
//    the Hopper stage 1 of two_pass.cuh (S = Q_k K_k^T, the softmax and cL, aL = R K_k and
//    Y = R V_k by wgmma) into its staging tile, [column j][aL 128 | Y 128 features | cL | 1 / Z |
//    padding] (kColBytes each). Its operand is P = exp(z - max) rather than R = P / Z (largest
//    element exactly 1 in bf16: docs/numerics.md), so it stages Z aL and Z Y and the owners
//    divide (dividing in the producers, this kernel's busier side, cost 5-7%);
//  - the stage-2 owner of columns [rank b2 / 16, (rank + 1) b2 / 16) (at most 4): 8 warps, one per
//    (owned column, 16 query rows), run the two-pass stage 2 over the virtual keys that the 16
//    producers send (online softmax, queries and outputs in registers).
// After step s, 15 lanes of the producer warpgroup copy each peer owner's columns of the staging
// tile into that owner's receive slot s % 2 (one `cp.async.bulk` each, counted by the owner's
// `recv_full[s % 2]`). An owner consumes slot s % 2 (16 virtual keys: one per producer, inactive
// producers masked), re-arms its `recv_full` for step s + 2 and arrives on the `empty[s % 2]` of
// every producer that has a step s + 2; such a producer waits for that phase (every owner with
// columns) before it writes its staging tile again at step s + 2, which also proves the tile's
// copies of step s were read.
// The CTA's own columns are not copied: the owners read them (virtual key `rank`) straight from
// the local staging tile, handed over with named barriers (`kFullBar`, `kEmptyBar`: the producer
// warpgroup arrives, the owners sync, and the reverse for the release). A bulk copy into the
// issuing CTA is rejected by compute-sanitizer memcheck, and racecheck follows named barriers but
// not mbarriers (docs/cuda-forward.md, "Sanitizers and the cluster kernel").
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

// The K and V maps of the producers' row copies (encode_row_tiles: b2 tokens x 64 features).
struct ClusterTma {
  CUtensorMap k, v;
};

template <typename T>
struct ClusterConfig {
  static constexpr int D = 128;
  static constexpr int kC = 16;       // CTAs per cluster (a non-portable size)
  static constexpr int kOwnMax = 4;   // columns an owner holds: ceil(64 / 16)
  static constexpr int kColBytes = 2 * D * int(sizeof(T)) + 16;   // aL | Y | cL | pad: 528
  static constexpr int kProdStride = kOwnMax * kColBytes + 16;    // a producer's part of a slot
  static constexpr int kSlotBytes = kC * kProdStride;
  static constexpr int kStagingBytes = 64 * kColBytes;
  static constexpr int kRowBytes = 64 * D * int(sizeof(T));  // one K or V row: 2 swizzled tiles
  static constexpr int kConsumerWarps = 2 * kOwnMax;
  static constexpr int kProducerThreads = 256;  // two warpgroups: even and odd steps
  static constexpr int kThreads = kProducerThreads + 32 * kConsumerWarps;
  // Named barriers: 1 the owner warps, 2 + g producer warpgroup g, and staging tile g handed to
  // the owners (kFullBar + g: g arrives, the owners sync) and back (kEmptyBar + g), kHandOff
  // threads each.
  static constexpr int kFullBar = 4, kEmptyBar = 6, kHandOff = 128 + 32 * kConsumerWarps;
  // setmaxnreg: the stage-2 warps hold their queries (32 registers) and outputs (64) throughout.
  static constexpr int kProducerRegs = 112, kConsumerRegs = 256 - kProducerRegs;
  static_assert(kThreads == 512 && kProducerThreads == 256, "the register split assumes 2 + 2 warpgroups");
  static constexpr size_t kRing = 4 * size_t(kRowBytes);  // [warpgroup][K | V]
  static constexpr size_t kSlots = kRing + 2 * size_t(kStagingBytes);
  static constexpr size_t kBars = kSlots + 2 * size_t(kSlotBytes);
  // The token of row 0 of each attended key tile, in order (the host runs this kernel only where
  // p.F <= kMaxTiles).
  static constexpr int kMaxTiles = 512;
  static constexpr size_t kTable = kBars + 8 * sizeof(uint64_t);
  static constexpr size_t kSmem = 1008 + kTable + kMaxTiles * sizeof(int);
  static_assert(kProdStride % 16 == 0 && kColBytes % 16 == 0, "bulk copies need 16-byte alignment");
};

template <typename T>
__global__ void __launch_bounds__(ClusterConfig<T>::kThreads, 1)
    monarch_cluster_fwd_kernel(const MonarchFwdParams p, const __grid_constant__ ClusterTma tma) {
  using C = ClusterConfig<T>;
  using MM = Mma<T>;
  constexpr int D = C::D, kC = C::kC, kNT = 8;
  constexpr float kLn2 = 0.6931471805599453f, kLog2e = 1.4426950408889634f;
  const int rank = int(cluster_rank());
  const int cid = int(blockIdx.x) / kC, m = cid % p.A, bh = cid / p.A, b = bh / p.H, h = bh % p.H;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  // Every CTA has the same layout, so a local offset names the same buffer in any CTA (mapa).
  unsigned char* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  T* ring = reinterpret_cast<T*>(smem);
  unsigned char* staging = smem + C::kRing;
  unsigned char* slots = smem + C::kSlots;
  uint64_t* kv_full = reinterpret_cast<uint64_t*>(smem + C::kBars);  // [warpgroup][K | V]
  uint64_t* recv_full = kv_full + 4;                                 // [2]
  uint64_t* empty = kv_full + 6;                                     // [2]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, r = lane / 4, c = (lane % 4) * 2;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];

  // The key tiles m attends (the same in every CTA of the cluster): nt of them, and the token of
  // row 0 of each in ktok (written by warp 0), so that a step's addresses need no division.
  int* const ktok = reinterpret_cast<int*>(smem + C::kTable);
  int nt = 0;
  for (int n0 = 0; n0 < p.F; n0 += 32) {
    const int n = n0 + lane;
    const bool ok = n < p.F && tile_allowed(p, m, n);
    const unsigned ballot = __ballot_sync(0xffffffffu, ok);
    if (warp == 0 && ok) ktok[nt + __popc(ballot & ((1u << lane) - 1u))] = key_tile_base(p, n);
    nt += __popc(ballot);
  }
  auto rows_of = [&](int pr) { return pr < p.b1 ? (p.b1 - pr + kC - 1) / kC : 0; };
  auto own_begin = [&](int o) { return o * p.b2 / kC; };
  const int steps_total = rows_of(0) * nt, my_steps = rows_of(rank) * nt;  // all, and this CTA's producer's
  const int own0 = own_begin(rank), own_n = own_begin(rank + 1) - own0;
  // recv_full[s % 2] completes step s with the owner's re-arm, which announces what the peers
  // with a step s (bit pr of `producers`) copy in, and their bytes.
  auto arm = [&](int s, unsigned producers) {
    mbar_expect(&recv_full[s % 2], uint32_t(__popc(producers & ~(1u << rank)) * own_n * C::kColBytes));
  };

  // Zeros: the K / V ring's pad rows (keys b2..63 feed the wgmma as zeros) and the receive slots
  // (rows of producers without a key row at some step are masked, but read: they must be finite).
  for (int i = tid; i < int(C::kRing / 16); i += blockDim.x) reinterpret_cast<uint4*>(smem)[i] = make_uint4(0, 0, 0, 0);
  for (int i = tid; i < 2 * C::kSlotBytes / 16; i += blockDim.x) {
    reinterpret_cast<uint4*>(slots)[i] = make_uint4(0, 0, 0, 0);
  }
  fence_proxy_async_smem();
  if (tid == 0) {
    for (int i = 0; i < 4; ++i) mbar_init(&kv_full[i], 1);
    for (int i = 0; i < 2; ++i) {
      mbar_init(&recv_full[i], 1);
      mbar_init(&empty[i], min(kC, p.b2));  // the owners with columns (b2 < 16: some have none)
    }
    fence_mbar_init();
    for (int s = 0; s < 2 && s < steps_total && own_n > 0; ++s) {
      unsigned producers = 0;
      for (int pr = 0; pr < kC; ++pr) producers |= s < rows_of(pr) * nt ? 1u << pr : 0u;
      arm(s, producers);
    }
  }
  cluster_sync();  // every barrier of the cluster initialized and armed

  if (tid < C::kProducerThreads) {
    // ---- producers: the Hopper stage 1 for this CTA's key rows; warpgroup g takes the steps
    // s = g, g + 2, ... with its own K / V buffers, staging tile g and receive slot g ----
    warpgroup_regs_dec<C::kProducerRegs>();
    const int g = tid / 128, wq = warp % 4, ptid = tid % 128;
    const int j_row[2] = {wq * 16 + r, wq * 16 + r + 8};
    constexpr int kRowElems = C::kRowBytes / int(sizeof(T));
    T* const Kr = ring + (2 * g) * kRowElems;
    T* const Vr = Kr + kRowElems;
    uint64_t* const k_full = &kv_full[2 * g];
    uint64_t* const v_full = k_full + 1;
    // A step: tile row k, the i-th attended key tile, and the token offset of row k in a tile.
    struct Step {
      int k, i, roff;
    };
    auto later = [&](Step& st, int by) {  // st becomes the step `by` steps later
      st.i += by;
      if (st.i >= nt) {
        do {
          st.i -= nt;
          st.k += kC;
        } while (st.i >= nt);
        st.roff = row_offset(p, st.k);
      }
    };
    auto issue = [&](const CUtensorMap* map, T* dst, uint64_t* bar, const Step& st) {
      const int tok = ktok[st.i] + st.roff;
      mbar_expect(bar, (D / 64) * uint32_t(p.b2) * 128);
#pragma unroll
      for (int hf = 0; hf < D / 64; ++hf) tma_load_tile(dst + hf * 64 * 64, map, hf * 64, tok, h, b, bar);
    };
    // The proxies q[m, k, j] of this warp's 16 columns, from L2 at every step: kept in registers
    // across steps they would not fit beside the stage-2 warps' (setmaxnreg).
    const int q_base = tile_base(p, m);
    auto load_q = [&](uint32_t(&qa)[D / 16][4], const Step& st) {
      const int q_tok = q_base + st.roff;
      load_a_rows<T, D>(qa, j_row[0] < p.b2 ? qg + int64_t(q_tok + j_row[0]) * p.q_stride[1] : nullptr,
                        j_row[1] < p.b2 ? qg + int64_t(q_tok + j_row[1]) * p.q_stride[1] : nullptr, lane);
    };
    Step cur{rank, 0, row_offset(p, rank)};  // step s
    if (g == 1) later(cur, 1);
    if (ptid == 0 && g < my_steps) {
      issue(&tma.k, Kr, k_full, cur);
      issue(&tma.v, Vr, v_full, cur);
    }
    // Where lane's row address for stmatrix lies in the staging tile (rows wq * 16 .. + 15 of the
    // warp; lanes 16-31 address the second 8 features of a pair of groups).
    const int st_off = (wq * 16 + ((lane / 8) % 2) * 8 + lane % 8) * C::kColBytes + (lane / 16) * 8 * int(sizeof(T));
    for (int s = g, it = 0; s < my_steps; s += 2, ++it) {
      Step nx = cur;
      later(nx, 2);  // step s + 2 (used only if it exists)
      uint32_t qa[D / 16][4];
      load_q(qa, cur);
      mbar_wait_checked(k_full, it & 1, "producer K row");
      float sc[kNT][4];
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        wgmma_m64n64k16<T, false>(sc, qa[ks], wgmma_desc_sw128(Kr + (ks / 4) * 64 * 64 + (ks % 4) * 16, 1024), ks > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      // softmax over the b2 keys of each column's row (4 lanes share a row), cL
      float M[2], Z[2], PZ[2];
      stage1_row_softmax<kNT>(sc, kNT, p, M, Z, PZ, lane);
      const float inv[2] = {1.f / Z[0], 1.f / Z[1]};
      uint32_t pa[kNT / 2][4];
#pragma unroll
      for (int kk = 0; kk < kNT / 2; ++kk) {
        pa[kk][0] = MM::pack(sc[2 * kk][0], sc[2 * kk][1]);  // exp(z - max), largest exactly 1:
        pa[kk][1] = MM::pack(sc[2 * kk][2], sc[2 * kk][3]);  // the owners divide by Z
        pa[kk][2] = MM::pack(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
        pa[kk][3] = MM::pack(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
      }
      // Staging tile g: free once every owner has consumed step s - 2 (this CTA's owners also
      // through the named barrier, which is what racecheck sees).
      unsigned char* stg = staging + g * C::kStagingBytes;
      if (s >= 2) {
        mbar_wait_checked(&empty[g], (it - 1) & 1, "producer empty");
        if (own_n > 0) named_bar_sync(C::kEmptyBar + g, C::kHandOff);
      }
      if (lane % 4 == 0) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          if (j_row[hr] < p.b2) {
            float* const col = reinterpret_cast<float*>(stg + j_row[hr] * C::kColBytes + 2 * D * sizeof(T));
            col[0] = kLn2 * (PZ[hr] * inv[hr] - M[hr] - log2f(Z[hr]));  // cL
            col[1] = inv[hr];  // aL and Y below are Z times the spec's: the owners divide
          }
        }
      }
      // aL (q = 0, 1) and Y (q = 2, 3), 64 features at a time, into the staging tile: group q + 1
      // runs on the tensor cores while the threads store group q (kAcc = 2 accumulator sets).
      constexpr int kAcc = 2;
      float a[kAcc][8][4];
      auto product = [&](int q) {
        const T* src = (q / 2 == 0 ? Kr : Vr) + (q % 2) * 64 * 64;
        if (q == 2) mbar_wait_checked(v_full, it & 1, "producer V row");
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kNT / 2; ++kk) {
          wgmma_m64n64k16<T, true>(a[q % kAcc], pa[kk], wgmma_desc_sw128(src + kk * 16 * 64, 1024), kk > 0);
        }
        wgmma_commit();
      };
      product(0);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (q < 3) {
          product(q + 1);
          wgmma_wait<1>();
        } else {
          wgmma_wait<0>();
        }
        if (q == 1) {  // the warpgroup is done with the K row: step s + 2's comes in
          named_bar_sync(2 + g, 128);
          if (ptid == 0 && s + 2 < my_steps) issue(&tma.k, Kr, k_full, nx);
        }
        // 16 features of all 16 rows per stmatrix (rows >= b2 too: the staging tile has 64 rows,
        // and only rows < b2 are sent).
#pragma unroll
        for (int tp = 0; tp < 4; ++tp) {
          const float(&x)[8][4] = a[q % kAcc];
          const uint32_t w[4] = {MM::pack(x[2 * tp][0], x[2 * tp][1]), MM::pack(x[2 * tp][2], x[2 * tp][3]),
                                 MM::pack(x[2 * tp + 1][0], x[2 * tp + 1][1]),
                                 MM::pack(x[2 * tp + 1][2], x[2 * tp + 1][3])};
          stmatrix_x4(stg + st_off + ((q / 2) * D + (q % 2) * 64 + tp * 16) * int(sizeof(T)), w);
        }
      }
      fence_proxy_async_smem();  // the staging tile, written by threads, is read by the copy engine
      if (own_n > 0) named_bar_arrive(C::kFullBar + g, C::kHandOff);  // ... and by this CTA's owners
      named_bar_sync(2 + g, 128);  // ... by all the warpgroup's threads; the V row is free too
      if (wq == 0) {  // lane o copies owner o's columns to a peer
        unsigned char* const dst = slots + (s % 2) * C::kSlotBytes + rank * C::kProdStride;
        const int ob = own_begin(lane), on = own_begin(lane + 1) - ob;
        if (lane < kC && lane != rank && on > 0) {
          bulk_to_cluster(cluster_addr(smem_addr(dst), unsigned(lane)), smem_addr(stg + ob * C::kColBytes),
                          uint32_t(on * C::kColBytes), cluster_addr(smem_addr(&recv_full[s % 2]), unsigned(lane)));
        }
        if (lane == 0 && s + 2 < my_steps) issue(&tma.v, Vr, v_full, nx);
      }
      cur = nx;
    }
  } else if (own_n > 0) {
    // ---- owner: the two-pass stage 2 for its columns, fed by every producer ----
    // (An owner without columns takes no part: it would release slots it never waited for, and
    // its arrivals for later steps would complete the producers' `empty` phases early.)
    warpgroup_regs_inc<C::kConsumerRegs>();
    const int cw = warp - C::kProducerThreads / 32, jj = cw / 2, rt = cw % 2, jq = own0 + jj;
    const bool has_col = jj < own_n;
    const int q_base = tile_base(p, m);
    uint32_t qa[D / 16][4];
    {
      const T* rows[2];
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int l = rt * 16 + r + hr * 8;
        rows[hr] = (has_col && l < p.b1) ? qg + int64_t(q_base + row_offset(p, l) + jq) * p.q_stride[1] : nullptr;
      }
      load_a_rows<T, D>(qa, rows[0], rows[1], lane);
    }
    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
    // Virtual key (producer) pr's part of slot s % 2 starts pr * kProdStride into the slot; this
    // CTA's own producer's lies `delta` bytes further, in its staging tile, while it has steps
    // (after that its part of the slots, never written, holds zeros: read, and masked).
    const int delta0 = int(C::kRing) - int(C::kSlots) + own0 * C::kColBytes - rank * C::kProdStride;
    const int key_a = (lane / 16) * 8 + lane % 8, key_y = ((lane / 8) % 2) * 8 + lane % 8;  // ldmatrix rows
    for (int s = 0; s < steps_total; ++s) {
      mbar_wait_checked(&recv_full[s % 2], (s / 2) & 1, "owner recv_full");
      if (s < my_steps) named_bar_sync(C::kFullBar + s % 2, C::kHandOff);
      if (has_col) {
        const unsigned char* slot = slots + (s % 2) * C::kSlotBytes + jj * C::kColBytes;
        const int delta = s < my_steps ? delta0 + (s % 2) * (C::kStagingBytes - C::kSlotBytes) : 0;
        auto key = [&](int pr) { return slot + pr * C::kProdStride + (pr == rank ? delta : 0); };
        const T* aL = reinterpret_cast<const T*>(key(key_a));
        float u[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}}, inv_z[2][4];
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) mma_rows16_at<T>(u[0], u[1], qa[ks], aL, ks, lane);
#pragma unroll
        for (int t = 0; t < 2; ++t) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int pr = t * 8 + c + e % 2;  // the producer, i.e. the virtual key
            const float2 cz = *reinterpret_cast<const float2*>(key(pr) + 2 * D * sizeof(T));  // cL, 1 / Z
            const bool on = s < rows_of(pr) * nt;
            u[t][e] = on ? u[t][e] * (p.scale_log2 * cz.y) - cz.x * kLog2e : -INFINITY;
            inv_z[t][e] = on ? cz.y : 0.f;  // a masked key's slot may hold anything
          }
        }
        online_softmax_pv16_at<T, D>(u, row_max, row_sum, o, reinterpret_cast<const T*>(key(key_y)) + D, lane, inv_z);
      }
      // The local producer may write its staging tile again at step s + 2.
      if (s + 2 < my_steps) named_bar_arrive(C::kEmptyBar + s % 2, C::kHandOff);
      named_bar_sync(1, 32 * C::kConsumerWarps);  // every owner warp is done with slot s % 2
      if (cw == 0) {  // re-arm the slot for step s + 2, then lane pr releases it to producer pr
        const bool again = lane < kC && s + 2 < rows_of(lane) * nt;  // producer lane has a step s + 2
        const unsigned producers = __ballot_sync(0xffffffffu, again);
        if (lane == 0 && s + 2 < steps_total) arm(s + 2, producers);
        __syncwarp();
        if (again) mbar_arrive_remote(cluster_addr(smem_addr(&empty[s % 2]), unsigned(lane)));
      }
    }
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      row_sum[hr] += __shfl_xor_sync(0xffffffffu, row_sum[hr], 1);
      row_sum[hr] += __shfl_xor_sync(0xffffffffu, row_sum[hr], 2);
    }
    T* og = static_cast<T*>(p.out) + b * p.o_stride[0] + h * p.o_stride[2];
    T* orow[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int l = rt * 16 + r + hr * 8;
      orow[hr] = (has_col && l < p.b1) ? og + int64_t(q_base + row_offset(p, l) + jq) * p.o_stride[1] : nullptr;
    }
    store_rows<T, D>(o, row_sum, orow[0], orow[1], lane);
  }
  cluster_sync();  // no CTA leaves while copies into its shared memory or arrivals may be in flight
}

}  // namespace cuda_detail
}  // namespace monarchrt
