// Hopper warpgroup MMA (wgmma, sm_90a only) for the kernels that have a Hopper variant. A
// warpgroup (4 consecutive warps, the first one's index divisible by 4) computes a 64 x 64 tile:
//   D (64 x 64, fp32) += A (64 x 16, registers) * B (16 x 64, shared memory, through a descriptor)
// Register layouts are mma.sync's, per warp: warp w of the group owns rows 16w..16w+15, its A
// fragment is the m16n8k16 A fragment (ptx.cuh) and D holds eight m16n8 C fragments, d[t] for
// columns 8t..8t+7. So code written for mma.sync fragments keeps its softmax and packing.
//
// Shared-memory operands use the unswizzled ("interleaved") canonical layout: a core matrix is
// 8 rows of 16 contiguous bytes (128 bytes in one piece). For a row-major tile X[rows][cols]
// of 16-bit elements, blocked_offset() puts element (i, d) into core matrix (i / 8, d / 8), the
// core matrices of one row block next to each other. The same buffer then serves as
//   - a K-major B (B[k][n] = X[n][k], e.g. S = Q K^T with X = K): core matrices along K
//     (d / 8) are 128 bytes apart (leading byte offset), along N (i / 8) cols * 16 bytes apart
//     (stride byte offset);
//   - an MN-major B (B[k][n] = X[k][n], e.g. aL = R K with X = K): along K (i / 8)
//     cols * 16 bytes apart (leading), along N (d / 8) 128 bytes apart (stride), transposed.
// Every wrapper compiles on other targets too and traps there; the host launches the kernels that
// use them only on a compute capability 9.0 device in a build with sm_90a code (use_wgmma()).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "ptx.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MONARCHRT_WGMMA_DEVICE 1
#endif

namespace monarchrt {
namespace cuda_detail {

// Byte offset of element (i, d) of a row-major tile with `cols` 16-bit columns (cols % 8 == 0)
// in the blocked layout above.
__host__ __device__ constexpr int blocked_offset(int i, int d, int cols) {
  return ((i / 8) * (cols / 8) + d / 8) * 128 + (i % 8) * 16 + (d % 8) * 2;
}

// Shared-memory matrix descriptor: start address, leading and stride byte offsets, no swizzle.
__device__ __forceinline__ uint64_t wgmma_desc(const void* smem, uint32_t leading_bytes, uint32_t stride_bytes) {
  const uint64_t addr = smem_addr(smem);
  return ((addr & 0x3FFFF) >> 4) | (uint64_t((leading_bytes >> 4) & 0x3FFF) << 16) |
         (uint64_t((stride_bytes >> 4) & 0x3FFF) << 32);
}

// The same for the 128-byte swizzle (tma.cuh's row tiles: 8 rows of 128 bytes per 1024-byte
// block). K-major B (B[k][n] = X[n][k], rows n of 64 elements): a K step of 16 elements is a
// start address 32 bytes further; N blocks of 8 rows are `stride_bytes` (1024) apart. MN-major B
// (B[k][n] = X[k][n], n < 64 one 128-byte row): K blocks of 8 rows are `stride_bytes` apart.
// The leading byte offset is unused in both (one swizzle atom wide).
__device__ __forceinline__ uint64_t wgmma_desc_sw128(const void* smem, uint32_t stride_bytes) {
  const uint64_t addr = smem_addr(smem);
  return ((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t((stride_bytes >> 4) & 0x3FFF) << 32) |
         (uint64_t(1) << 62);
}

// Zeroes rows b2 .. 63 of `tiles` consecutive swizzled tiles of 64 rows x 128 bytes at `smem`:
// the rows a TMA copy of b2 rows never writes but wgmma reads (a row's 8 chunks of 16 bytes only
// trade places under the swizzle, so whole rows are zeroed alike). Every thread of the CTA calls
// it; the caller fences (`fence_proxy_async_smem`) and synchronizes before the products.
__device__ __forceinline__ void zero_pad_rows(void* smem, int tiles, int b2) {
  const int pad = (64 - b2) * 8;  // 16-byte chunks of rows b2 .. 63 in one tile
  unsigned char* base = static_cast<unsigned char*>(smem) + b2 * 128;
  for (int i = threadIdx.x; i < tiles * pad; i += blockDim.x) {
    reinterpret_cast<uint4*>(base + (i / pad) * 8192)[i % pad] = make_uint4(0, 0, 0, 0);
  }
}

// Gives up (dec) or claims (inc) registers for the executing warpgroup: a copying warpgroup
// hands its registers to the computing ones. Every warp of the warpgroup must execute it.
template <int Regs>
__device__ __forceinline__ void warpgroup_regs_dec() {
#ifdef MONARCHRT_WGMMA_DEVICE
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Regs) : "memory");
#endif
}
template <int Regs>
__device__ __forceinline__ void warpgroup_regs_inc() {
#ifdef MONARCHRT_WGMMA_DEVICE
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Regs) : "memory");
#endif
}

__device__ __forceinline__ void wgmma_fence() {
#ifdef MONARCHRT_WGMMA_DEVICE
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef MONARCHRT_WGMMA_DEVICE
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
// Waits until at most N committed wgmma groups of this warp are still in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef MONARCHRT_WGMMA_DEVICE
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#else
  __trap();
#endif
}
// Makes this thread's earlier generic-proxy shared-memory writes (st.shared, cp.async) visible to
// later async-proxy reads (wgmma operands); a barrier must follow before other threads' wgmma.
__device__ __forceinline__ void fence_proxy_async_smem() {
#ifdef MONARCHRT_WGMMA_DEVICE
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  __trap();
#endif
}

#define MONARCHRT_WGMMA_D32(d)                                                                        \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), \
      "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]),             \
      "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]),             \
      "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]),             \
      "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])

#define MONARCHRT_WGMMA_M64N64K16(TYPE)                                                                   \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                          \
  "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE                                            \
  " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26," \
  "%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, %38;\n}\n"

// d (+)= a * B: accumulate == false overwrites d. TransB: B is MN-major (see above).
template <typename T, bool TransB>
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b,
                                                bool accumulate) {
#ifdef MONARCHRT_WGMMA_DEVICE
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(MONARCHRT_WGMMA_M64N64K16("bf16")
                 : MONARCHRT_WGMMA_D32(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)), "n"(int(TransB)));
  } else {
    asm volatile(MONARCHRT_WGMMA_M64N64K16("f16")
                 : MONARCHRT_WGMMA_D32(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)), "n"(int(TransB)));
  }
#else
  (void)d, (void)a, (void)desc_b, (void)accumulate;
  __trap();
#endif
}

// acc (64 x D, the warpgroup's fp32 fragments, D / 8 tiles of 8 columns) += A X with K = 64: A
// as register fragments a[kk] of columns 16 kk .. 16 kk + 15 (e.g. probabilities), X a tile of
// 64 rows (K) x D with the 128-byte swizzle, [D / 64][64][64] (TMA's row tiles), read as the
// MN-major B (kBlockStride elements from one 64-feature block to the next). Issued, not committed.
template <typename T, int D, int kBlockStride = 64 * 64>
__device__ __forceinline__ void wgmma_acc_rows64(float (&acc)[D / 8][4], const uint32_t (&a)[4][4], const T* X) {
#pragma unroll
  for (int half = 0; half < D / 64; ++half) {
    float(&ah)[8][4] = *reinterpret_cast<float(*)[8][4]>(&acc[8 * half]);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      wgmma_m64n64k16<T, true>(ah, a[kk], wgmma_desc_sw128(X + half * kBlockStride + kk * 16 * 64, 1024), true);
    }
  }
}

#define MONARCHRT_WGMMA_M64N64K16_SS(TYPE)                                                                \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                          \
  "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE                                            \
  " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26," \
  "%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, %35;\n}\n"

// d (+)= A * B with both operands in shared memory, A K-major (A[m][k] = X[m][k] with rows m of
// the descriptor's tile, e.g. daL rows), B K-major or, with TransB, MN-major (both as above).
template <typename T, bool TransB = false>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b,
                                                   bool accumulate) {
#ifdef MONARCHRT_WGMMA_DEVICE
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(MONARCHRT_WGMMA_M64N64K16_SS("bf16")
                 : MONARCHRT_WGMMA_D32(d)
                 : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(int(TransB)));
  } else {
    asm volatile(MONARCHRT_WGMMA_M64N64K16_SS("f16")
                 : MONARCHRT_WGMMA_D32(d)
                 : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(int(TransB)));
  }
#else
  (void)d, (void)desc_a, (void)desc_b, (void)accumulate;
  __trap();
#endif
}

#define MONARCHRT_WGMMA_M64N128K16_SS(TYPE)                                                               \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                        \
  "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE                                          \
  " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26," \
  "%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51," \
  "%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n}\n"

// [lo | hi] (+)= A * B with N = 128, both operands K-major in shared memory: lo gets columns
// 0..63 of the product (rows 0..63 of B), hi columns 64..127.
template <typename T>
__device__ __forceinline__ void wgmma_m64n128k16_ss(float (&lo)[8][4], float (&hi)[8][4], uint64_t desc_a,
                                                    uint64_t desc_b, bool accumulate) {
#ifdef MONARCHRT_WGMMA_DEVICE
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(MONARCHRT_WGMMA_M64N128K16_SS("bf16")
                 : MONARCHRT_WGMMA_D32(lo), MONARCHRT_WGMMA_D32(hi)
                 : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)));
  } else {
    asm volatile(MONARCHRT_WGMMA_M64N128K16_SS("f16")
                 : MONARCHRT_WGMMA_D32(lo), MONARCHRT_WGMMA_D32(hi)
                 : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)));
  }
#else
  (void)lo, (void)hi, (void)desc_a, (void)desc_b, (void)accumulate;
  __trap();
#endif
}

#undef MONARCHRT_WGMMA_M64N64K16_SS
#undef MONARCHRT_WGMMA_M64N128K16_SS
#undef MONARCHRT_WGMMA_M64N64K16
#undef MONARCHRT_WGMMA_D32

}  // namespace cuda_detail
}  // namespace monarchrt
