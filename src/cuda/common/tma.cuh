// Hopper's tensor copy engine (TMA), for the kernels that have a Hopper variant: a tile of a
// [B, S, H, D] tensor copied into shared memory by one instruction, completing on an mbarrier.
//
// Tiles are `rows` consecutive tokens x 64 features (128 bytes, 16-bit elements) of one (batch,
// head), written with the 128-byte swizzle: row r's 16-byte chunk c lands at r * 128 + ((c ^ (r %
// 8)) * 16) inside 1024-byte aligned blocks of 8 rows, the layout wgmma_desc_sw128() describes.
// The device wrappers compile on every target and trap below sm_90; the host launches the kernels
// that use them only where use_wgmma() holds.
#pragma once

#include <cuda.h>  // CUtensorMap and the encoder's signature (the function comes from the runtime)
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <string>

#include "host.h"
#include "ptx.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MONARCHRT_TMA_DEVICE 1
#endif

namespace monarchrt {
namespace cuda_detail {

// ---- device side ---------------------------------------------------------------------------

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t arrivals) {
#ifdef MONARCHRT_TMA_DEVICE
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrivals) : "memory");
#else
  (void)bar, (void)arrivals;
  __trap();
#endif
}
// Makes mbarrier initializations visible to the copy engine.
__device__ __forceinline__ void fence_mbar_init() {
#ifdef MONARCHRT_TMA_DEVICE
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#else
  __trap();
#endif
}
// One arrival that also announces `bytes` of copies for the barrier's current phase.
__device__ __forceinline__ void mbar_expect(uint64_t* bar, uint32_t bytes) {
#ifdef MONARCHRT_TMA_DEVICE
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
#else
  (void)bar, (void)bytes;
  __trap();
#endif
}
// One plain arrival (e.g. a consumer warp releasing a buffer to the copying thread).
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
#ifdef MONARCHRT_TMA_DEVICE
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#else
  (void)bar;
  __trap();
#endif
}
// Waits until the phase with this parity has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
#ifdef MONARCHRT_TMA_DEVICE
  asm volatile(
      "{\n.reg .pred done;\nMONARCHRT_WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra MONARCHRT_WAIT_%=;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
#else
  (void)bar, (void)parity;
  __trap();
#endif
}

// mbar_wait with a watchdog when MONARCHRT_MBAR_WATCHDOG is defined (bring-up of the cluster
// protocols): after 2^32 clock cycles (2-3 s) without the phase it prints `what`, the block, the
// thread and the parity, and traps, so that a protocol bug fails instead of hanging the device.
__device__ __forceinline__ void mbar_wait_checked(uint64_t* bar, uint32_t parity, const char* what) {
#if defined(MONARCHRT_TMA_DEVICE) && defined(MONARCHRT_MBAR_WATCHDOG)
  const long long start = clock64();
  for (;;) {
    uint32_t done = 0;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
    if (done) return;
    if (clock64() - start > (1ll << 32)) {
      printf("mbarrier watchdog: %s, block %d, thread %d, parity %u\n", what, int(blockIdx.x), int(threadIdx.x),
             parity);
      __trap();
    }
  }
#else
  (void)what;
  mbar_wait(bar, parity);
#endif
}

// Copies the tile at coordinates (feature c0, token c1, head c2, batch c3) of `map` to `dst`;
// the mbarrier `bar` counts the bytes.
__device__ __forceinline__ void tma_load_tile(void* dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                              uint64_t* bar) {
#ifdef MONARCHRT_TMA_DEVICE
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_addr(bar))
      : "memory");
#else
  (void)dst, (void)map, (void)c0, (void)c1, (void)c2, (void)c3, (void)bar;
  __trap();
#endif
}

// The same for a tile of a 2-D map (c0 innermost).
__device__ __forceinline__ void tma_load_tile_2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar) {
#ifdef MONARCHRT_TMA_DEVICE
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_addr(bar))
      : "memory");
#else
  (void)dst, (void)map, (void)c0, (void)c1, (void)bar;
  __trap();
#endif
}
// An L2 policy for data read once: the lines a copy with it reads (brought in or already there)
// are the first to be evicted.
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t policy = 0;
#ifdef MONARCHRT_TMA_DEVICE
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
#endif
  return policy;
}
// tma_load_tile_2d with an L2 cache policy (l2_evict_first_policy).
__device__ __forceinline__ void tma_load_tile_2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar,
                                                 uint64_t policy) {
#ifdef MONARCHRT_TMA_DEVICE
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%2, %3}], "
      "[%4], %5;\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_addr(bar)), "l"(policy)
      : "memory");
#else
  (void)dst, (void)map, (void)c0, (void)c1, (void)bar, (void)policy;
  __trap();
#endif
}
// Copies `bytes` (a multiple of 16) from global `src` to shared `dst` (both 16-byte aligned)
// with the copy engine, without a tensor map; `bar` counts the bytes.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
#ifdef MONARCHRT_TMA_DEVICE
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
#else
  (void)dst, (void)src, (void)bytes, (void)bar;
  __trap();
#endif
}

// Copies the tile at `src` (the box's layout, swizzled as the map says) to coordinates (c0, c1,
// c2, c3) of `map` in global memory; elements outside the map's dims are not written. The copy
// joins the thread's current bulk group (bulk_commit / bulk_wait_read / bulk_wait below).
__device__ __forceinline__ void tma_store_tile(const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                               const void* src) {
#ifdef MONARCHRT_TMA_DEVICE
  asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%1, %2, %3, %4}], [%5];\n" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_addr(src))
               : "memory");
#else
  (void)map, (void)c0, (void)c1, (void)c2, (void)c3, (void)src;
  __trap();
#endif
}
// The same for a tile of a 2-D map (c0 innermost).
__device__ __forceinline__ void tma_store_tile_2d(const CUtensorMap* map, int c0, int c1, const void* src) {
#ifdef MONARCHRT_TMA_DEVICE
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(c0), "r"(c1), "r"(smem_addr(src))
               : "memory");
#else
  (void)map, (void)c0, (void)c1, (void)src;
  __trap();
#endif
}
// Closes the thread's current bulk group.
__device__ __forceinline__ void bulk_commit() {
#ifdef MONARCHRT_TMA_DEVICE
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#else
  __trap();
#endif
}
// Waits until at most N of the thread's bulk groups still read their shared-memory sources.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
#ifdef MONARCHRT_TMA_DEVICE
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
#else
  __trap();
#endif
}
// Waits until at most N of the thread's bulk groups are incomplete (writes performed).
template <int N>
__device__ __forceinline__ void bulk_wait() {
#ifdef MONARCHRT_TMA_DEVICE
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
#else
  __trap();
#endif
}

// ---- thread-block clusters (distributed shared memory) ----
// This CTA's rank in its cluster.
__device__ __forceinline__ unsigned cluster_rank() {
  unsigned r = 0;
#ifdef MONARCHRT_TMA_DEVICE
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
#else
  __trap();
#endif
  return r;
}
// Barrier of every thread of every CTA of the cluster, with release / acquire semantics (shared
// memory writes before it are visible to the whole cluster after it).
__device__ __forceinline__ void cluster_sync() {
#ifdef MONARCHRT_TMA_DEVICE
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
// The shared::cluster address of the same shared-memory location `local` in CTA `rank` of the
// cluster (every CTA of a kernel has the same layout).
__device__ __forceinline__ uint32_t cluster_addr(uint32_t local, unsigned rank) {
  uint32_t r = 0;
#ifdef MONARCHRT_TMA_DEVICE
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(local), "r"(rank));
#else
  (void)local, (void)rank;
  __trap();
#endif
  return r;
}
// Copies `bytes` (a multiple of 16) from this CTA's shared memory `src` to the shared::cluster
// address `dst` (another CTA's shared memory) with the copy engine; the mbarrier at the
// shared::cluster address `bar` (in the destination CTA) counts them.
__device__ __forceinline__ void bulk_to_cluster(uint32_t dst, uint32_t src, uint32_t bytes, uint32_t bar) {
#ifdef MONARCHRT_TMA_DEVICE
  asm volatile("cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "r"(src), "r"(bytes), "r"(bar)
               : "memory");
#else
  (void)dst, (void)src, (void)bytes, (void)bar;
  __trap();
#endif
}
// Copies `bytes` from global `src` to `dst` in every CTA of `mask` (the same offset), each CTA's
// mbarrier at `bar`'s offset counting them.
__device__ __forceinline__ void bulk_load_multicast(void* dst, const void* src, uint32_t bytes, uint64_t* bar,
                                                    uint16_t mask) {
#ifdef MONARCHRT_TMA_DEVICE
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1], %2, [%3], %4;\n" ::"r"(
          smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar)), "h"(mask)
      : "memory");
#else
  (void)dst, (void)src, (void)bytes, (void)bar, (void)mask;
  __trap();
#endif
}
// One arrival on the mbarrier at shared::cluster address `bar` (possibly another CTA's), with the
// default semantics (release at CTA scope), as CUTLASS's cluster barriers do. `.release.cluster`
// compiles to a GPU-scope memory barrier (MEMBAR.ALL.GPU) per arrival. A warp whose lanes arrive
// on different CTAs' barriers issues one instruction.
__device__ __forceinline__ void mbar_arrive_remote(uint32_t bar) {
#ifdef MONARCHRT_TMA_DEVICE
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(bar) : "memory");
#else
  (void)bar;
  __trap();
#endif
}

// Element offset (16-bit elements) of 16-byte chunk `chunk` of row `row` in D / 64 swizzled tiles
// of `rows` rows each (tile chunk / 8, rows of 128 bytes, chunk c of row r at (c ^ (r % 8)) * 16).
__host__ __device__ constexpr int sw128_offset(int row, int chunk, int rows) {
  return (chunk / 8) * rows * 64 + row * 64 + ((chunk % 8) ^ (row % 8)) * 8;
}

// ---- host side -----------------------------------------------------------------------------

// Encodes a tensor map (rank 1..4, dims innermost first, strides in bytes of dims 1..rank-1).
inline Status encode_tensor_map(CUtensorMap* map, const void* data, CUtensorMapDataType type, int rank,
                                const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                                CUtensorMapSwizzle swizzle) {
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                              const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                              CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<Encode>(fn);
  }();
  if (encode == nullptr) return Status::internal("cuTensorMapEncodeTiled is not available from the CUDA driver");
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  const CUresult r = encode(map, type, cuuint32_t(rank), const_cast<void*>(data), dims, strides, box, unit,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    return Status::internal("cuTensorMapEncodeTiled failed with CUresult " + std::to_string(int(r)));
  }
  return Status();
}

// The tensor-map element type of the kernels' 16-bit inputs.
inline CUtensorMapDataType map_dtype(bool bf16) {
  return bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
}

// The row tiles above for a [B, S, H, D] view of 16-bit elements with strides (batch, token,
// head) in elements: box = 64 features x `rows` tokens of one head.
inline Status encode_row_tiles(CUtensorMap* map, const void* data, bool bf16, const int64_t shape[4],
                               const int64_t stride[3], int rows) {
  const cuuint64_t dims[4] = {cuuint64_t(shape[3]), cuuint64_t(shape[1]), cuuint64_t(shape[2]), cuuint64_t(shape[0])};
  // A dimension of extent 1 is never stepped along: any valid stride will do for it.
  auto bytes = [&](int dim, int64_t s) { return cuuint64_t(shape[dim] == 1 && s == 0 ? 8 : s) * 2; };
  const cuuint64_t strides[3] = {bytes(1, stride[1]), bytes(2, stride[2]), bytes(0, stride[0])};
  const cuuint32_t box[4] = {64, cuuint32_t(rows), 1, 1};
  return encode_tensor_map(map, data, map_dtype(bf16), 4, dims, strides, box, CU_TENSOR_MAP_SWIZZLE_128B);
}

}  // namespace cuda_detail
}  // namespace monarchrt
