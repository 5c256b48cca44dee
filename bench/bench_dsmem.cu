// Microbenchmark for the fused Monarch design (docs/cuda-forward.md, "Next step"): how fast an SM
// can move data into the shared memory of other SMs of its thread-block cluster (distributed
// shared memory, Hopper), next to its own shared memory and to device memory. A fused forward
// has to move about one K / V row or one row of stage-1 results (26.6 KB) per key row between
// the SMs that share a query tile, so this bandwidth decides whether the design can beat the
// two-pass path. Also measures how fast SMs take in data from L2 that all of them read (the
// alternative: every CTA loads the K / V rows itself). Prints aggregate TB/s and bytes per cycle
// per SM. Last, for the plan of keeping the two-pass workspace in L2 (docs/cuda-forward.md, "Next
// candidate"): how fast a buffer of W MB is written and then read back by all SMs, plainly, with
// each line dropped from L2 after its read (discard.global.L2: no write-back), and with the
// buffer also marked persisting in L2; a W far larger than L2 gives the device-memory rate.
// Also with the copy engine (cp.async.bulk, one thread issuing): shared memory into other CTAs'
// shared memory, and loads from L2 multicast to every CTA of the cluster (each CTA issues its
// share, every CTA receives everything: the per-SM intake of a design in which each SM needs
// every K / V row but L2 serves each row once per cluster), for clusters of up to 16 CTAs (16 is
// a non-portable size: the "SMs" column says how many CTAs the device could run at once).
// Not a test, exits 0 unless a CUDA call fails. Usage: bench_dsmem (needs compute capability 9.0
// or newer).
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>

#include "../src/cuda/common/tma.cuh"
#include "../src/cuda/common/wgmma.cuh"
#include "check_cuda.h"

namespace cg = cooperative_groups;
using namespace monarchrt::cuda_detail;


constexpr int kBufBytes = 64 * 1024;  // shared memory each CTA writes or reads
constexpr int kThreads = 512;

enum Mode : int { kOwnStore = 0, kNeighbourStore, kScatterStore, kNeighbourLoad };
const char* mode_name(int mode) {
  switch (mode) {
    case kOwnStore: return "own shared memory, 16-byte stores";
    case kNeighbourStore: return "next CTA of the cluster, 16-byte stores";
    case kScatterStore: return "warp w -> CTA w % size, 16-byte stores";
    default: return "next CTA of the cluster, 16-byte loads";
  }
}

// Every thread moves 16 bytes per step through the kBufBytes buffer of its target CTA, iters times.
__global__ void dsmem_kernel(int mode, int iters, unsigned* sink) {
  extern __shared__ uint4 buf[];
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), size = cluster.num_blocks();
  const unsigned target = mode == kOwnStore ? rank
                          : mode == kScatterStore ? (rank + threadIdx.x / 32) % size
                                                  : (rank + 1) % size;
  uint4* dst = mode == kOwnStore ? buf : cluster.map_shared_rank(buf, target);
  constexpr int n = kBufBytes / 16;
  for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = make_uint4(i, rank, 1, 2);
  cluster.sync();
  uint4 v = make_uint4(threadIdx.x, rank, 3, 4);
  for (int it = 0; it < iters; ++it) {
    if (mode == kNeighbourLoad) {
#pragma unroll 8
      for (int i = threadIdx.x; i < n; i += kThreads) {
        const uint4 x = dst[i];
        v.x ^= x.x;
        v.y += x.y;
      }
    } else {
#pragma unroll 8
      for (int i = threadIdx.x; i < n; i += kThreads) {
        dst[i] = v;
        v.x += 1;
      }
    }
  }
  cluster.sync();  // no CTA leaves while others may still write into its shared memory
  if (v.x == 0xFFFFFFFFu && v.y == 0xFFFFFFFFu) *sink = buf[0].x;  // keeps the loads alive
}

// Every CTA reads the same L2-resident buffer (n 16-byte pieces) iters times, bypassing L1: the
// rate at which SMs can take in data that other SMs also read (a K / V row shared by a cluster).
__global__ void l2_load_kernel(const uint4* in, int n, int iters, unsigned* sink) {
  unsigned acc = 0;
  for (int it = 0; it < iters; ++it) {
#pragma unroll 8
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const uint4 x = __ldcg(in + i);
      acc ^= x.x + x.w;
    }
  }
  if (acc == 0x12345678u) *sink = acc;
}

__global__ void dram_store_kernel(uint4* out, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    out[i] = make_uint4(unsigned(i), 1, 2, 3);
  }
}

// The workspace round trip: every thread stores, then (next kernel) loads, 16-byte pieces; with
// `discard`, one lane per 128-byte line drops the line from L2 once the 8 lanes have read it.
__global__ void ws_write_kernel(uint4* buf, size_t n, unsigned salt) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    buf[i] = make_uint4(unsigned(i), salt, 2, 3);
  }
}
__global__ void ws_read_kernel(uint4* buf, size_t n, bool discard, unsigned* sink) {
  unsigned acc = 0;
  // Warp-uniform loop over 512-byte pieces (four lines): the lanes of a line read before its drop.
  const size_t warps = size_t(gridDim.x) * blockDim.x / 32;
  for (size_t w = (blockIdx.x * size_t(blockDim.x) + threadIdx.x) / 32; w < n / 32; w += warps) {
    const size_t i = w * 32 + threadIdx.x % 32;
    const uint4 x = __ldcg(buf + i);
    acc ^= x.x + x.y;
    if (discard) {
      __syncwarp();
      if (threadIdx.x % 8 == 0) asm volatile("discard.global.L2 [%0], 128;" ::"l"(buf + i) : "memory");
    }
  }
  if (acc == 0x12345678u) *sink = acc;
}

// ---- copies by the copy engine ----
constexpr int kChunk = 16 * 1024;     // bytes per bulk copy
constexpr int kChunksPerRound = 56;   // 896 KB per CTA and round: under the 2^20 - 1 byte tx-count
constexpr int kRecvChunks = 8;        // receive area (copies land in it cyclically)
constexpr size_t kBulkSmem = (kRecvChunks + 1) * kChunk + 16;
enum BulkMode : int { kBulkNext = 0, kBulkAll, kBulkMulticast };
const char* bulk_name(int mode) {
  switch (mode) {
    case kBulkNext: return "bulk copies into the next CTA's shared memory";
    case kBulkAll: return "bulk copies into every other CTA in turn";
    default: return "bulk loads from L2, multicast to the cluster";
  }
}

// Per round every CTA receives kChunksPerRound chunks: from the next-lower CTA (kBulkNext), from
// all others in turn (kBulkAll), or from L2, each CTA loading its 1/size share for all
// (kBulkMulticast; size 1: plain bulk loads). Thread 0 arms the CTA's mbarrier for the round's
// bytes, the cluster synchronizes (every barrier armed), thread 0 issues and waits.
__global__ void bulk_kernel(int mode, int rounds, const unsigned char* global, int global_chunks) {
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* recv = smem;
  unsigned char* src = smem + kRecvChunks * kChunk;
  uint64_t* bar = reinterpret_cast<uint64_t*>(src + kChunk);
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), size = cluster.num_blocks();
  for (int i = threadIdx.x; i < kChunk / 16; i += blockDim.x) reinterpret_cast<uint4*>(src)[i] = make_uint4(i, rank, 1, 2);
  fence_proxy_async_smem();  // the source chunk, written by threads, is read by the copy engine
  if (threadIdx.x == 0) {
    mbar_init(bar, 1);
    fence_mbar_init();
  }
  cluster.sync();
  for (int r = 0; r < rounds; ++r) {
    if (threadIdx.x == 0) mbar_expect(bar, uint32_t(kChunksPerRound) * kChunk);
    cluster.sync();
    if (threadIdx.x != 0) continue;
    if (mode == kBulkMulticast) {
      const uint16_t mask = uint16_t((1u << size) - 1);
      for (int c = int(rank); c < kChunksPerRound; c += int(size)) {
        const int g = int((blockIdx.x / size * 7 + unsigned(r) * kChunksPerRound + unsigned(c)) % unsigned(global_chunks));
        if (size == 1) {
          bulk_load(recv + (c % kRecvChunks) * kChunk, global + size_t(g) * kChunk, kChunk, bar);
        } else {
          bulk_load_multicast(recv + (c % kRecvChunks) * kChunk, global + size_t(g) * kChunk, kChunk, bar, mask);
        }
      }
    } else {
      for (int c = 0; c < kChunksPerRound; ++c) {
        const unsigned to = (rank + 1 + (mode == kBulkAll ? unsigned(c) % (size - 1) : 0u)) % size;
        bulk_to_cluster(cluster_addr(smem_addr(recv + (c % kRecvChunks) * kChunk), to), smem_addr(src), kChunk,
                        cluster_addr(smem_addr(bar), to));
      }
    }
    mbar_wait(bar, uint32_t(r) & 1u);
  }
  cluster.sync();  // no CTA leaves while copies into its shared memory may be in flight
}

// The fastest of 4 timed runs of launch() after one warm-up run, in milliseconds.
template <typename Launch>
float best_ms(cudaEvent_t e0, cudaEvent_t e1, Launch launch, cudaStream_t stream = nullptr) {
  float best = 1e30f;
  for (int r = 0; r < 5; ++r) {
    CHECK_CUDA(cudaEventRecord(e0, stream));
    launch();
    CHECK_CUDA(cudaEventRecord(e1, stream));
    CHECK_CUDA(cudaEventSynchronize(e1));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    if (r > 0 && ms < best) best = ms;
  }
  CHECK_CUDA(cudaGetLastError());
  return best;
}

// One wave of clusters of `size` CTAs (one CTA per SM, as many clusters as fit) launching
// kernel(args...); returns the fastest time (best_ms) and the number of CTAs in `ctas`, or -1
// when no such cluster can run (e.g. a non-portable size the device refuses).
template <typename... Args>
float time_clusters(void (*kernel)(Args...), int size, int threads, size_t smem, int sms, cudaEvent_t e0,
                    cudaEvent_t e1, int* ctas, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned((sms / size) * size));
  cfg.blockDim = dim3(unsigned(threads));
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(size);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess || clusters == 0) {
    (void)cudaGetLastError();
    return -1.f;
  }
  cfg.gridDim = dim3(unsigned(std::min(clusters, sms / size) * size));
  *ctas = int(cfg.gridDim.x);
  return best_ms(e0, e1, [&] { CHECK_CUDA(cudaLaunchKernelEx(&cfg, kernel, args...)); });
}

int main() {
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  if (prop.major < 9) {
    std::printf("device %s (compute capability %d.%d) has no thread-block clusters; nothing to measure\n",
                prop.name, prop.major, prop.minor);
    return 0;
  }
  int clock_khz = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
  const int sms = prop.multiProcessorCount;
  std::printf("device: %s (%d SMs, %.2f GHz max clock), %d threads per CTA, %d KB per CTA\n", prop.name, sms,
              clock_khz * 1e-6, kThreads, kBufBytes / 1024);
  CHECK_CUDA(cudaFuncSetAttribute(dsmem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBufBytes));
  unsigned* sink = nullptr;
  CHECK_CUDA(cudaMalloc(&sink, sizeof(unsigned)));
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));

  // Device memory for comparison: 2 GB of 16-byte stores.
  {
    const size_t n = (size_t(2) << 30) / 16;
    uint4* out = nullptr;
    CHECK_CUDA(cudaMalloc(&out, n * 16));
    const float best = best_ms(e0, e1, [&] { dram_store_kernel<<<sms * 8, 256>>>(out, n); });
    std::printf("%-48s %8s %9.2f TB/s\n", "device memory, 16-byte stores", "-", n * 16.0 / (best * 1e-3) * 1e-12);
    CHECK_CUDA(cudaFree(out));
  }

  // L2 to SM: every SM reads the same 4 MB again and again.
  {
    const int n = (4 << 20) / 16, iters = 20;
    uint4* in = nullptr;
    CHECK_CUDA(cudaMalloc(&in, size_t(n) * 16));
    CHECK_CUDA(cudaMemset(in, 1, size_t(n) * 16));
    const float best = best_ms(e0, e1, [&] { l2_load_kernel<<<sms, 1024>>>(in, n, iters, sink); });
    const double bytes = double(sms) * iters * n * 16.0;
    std::printf("%-48s %8s %9.2f TB/s %10.1f B/clk per SM\n", "L2 -> SM, all SMs read the same 4 MB", "-",
                bytes / (best * 1e-3) * 1e-12, bytes / sms / (best * 1e-3 * clock_khz * 1e3));
    CHECK_CUDA(cudaFree(in));
  }

  std::printf("%-48s %8s %12s %14s\n", "pattern", "cluster", "TB/s (all)", "B/clk per SM");
  const int iters = 200;
  for (int mode : {kOwnStore, kNeighbourStore, kScatterStore, kNeighbourLoad}) {
    for (int size : {2, 4, 8}) {
      if (mode == kOwnStore && size != 2) continue;
      int ctas = 0;
      const float best = time_clusters(dsmem_kernel, size, kThreads, kBufBytes, sms, e0, e1, &ctas, mode, iters, sink);
      if (best < 0) {
        std::printf("%-48s %8d %12s\n", mode_name(mode), size, "no cluster of this size runs here");
        continue;
      }
      const double bytes = double(ctas) * iters * kBufBytes;
      const double per_sm_cycle = bytes / ctas / (best * 1e-3 * clock_khz * 1e3);
      std::printf("%-48s %8d %12.2f %14.1f\n", mode_name(mode), size, bytes / (best * 1e-3) * 1e-12, per_sm_cycle);
    }
  }
  // Copies by the copy engine: bytes received per SM.
  {
    std::printf("%-48s %8s %12s %14s %12s %5s\n", "copy engine (one thread issues)", "cluster", "TB/s (all)",
                "B/clk per SM", "L2 TB/s", "SMs");
    CHECK_CUDA(cudaFuncSetAttribute(bulk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kBulkSmem)));
    CHECK_CUDA(cudaFuncSetAttribute(bulk_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    const int global_chunks = (4 << 20) / kChunk;  // 4 MB that every cluster reads: stays in L2
    unsigned char* global = nullptr;
    CHECK_CUDA(cudaMalloc(&global, size_t(global_chunks) * kChunk));
    CHECK_CUDA(cudaMemset(global, 1, size_t(global_chunks) * kChunk));
    const int rounds = 40;
    for (int mode : {kBulkNext, kBulkAll, kBulkMulticast}) {
      for (int size : {1, 2, 4, 8, 16}) {  // 16: a non-portable size (the H100 allows it)
        if (size == 1 && mode != kBulkMulticast) continue;
        if (size == 2 && mode == kBulkAll) continue;  // the same as kBulkNext
        int ctas = 0;
        const float best = time_clusters(bulk_kernel, size, 128, kBulkSmem, sms, e0, e1, &ctas, mode, rounds,
                                         static_cast<const unsigned char*>(global), global_chunks);
        if (best < 0) {
          std::printf("%-48s %8d %12s\n", bulk_name(mode), size, "no cluster of this size runs here");
          continue;
        }
        const double bytes = double(ctas) * rounds * kChunksPerRound * double(kChunk);  // received
        const double tbs = bytes / (best * 1e-3) * 1e-12;
        const double per_sm_cycle = bytes / ctas / (best * 1e-3 * clock_khz * 1e3);
        char l2[32] = "-";
        if (mode == kBulkMulticast) std::snprintf(l2, sizeof l2, "%.2f", tbs / size);
        std::printf("%-48s %8d %12.2f %14.1f %12s %5d\n", bulk_name(mode), size, tbs, per_sm_cycle, l2, ctas);
      }
    }
    CHECK_CUDA(cudaFree(global));
  }
  // The workspace round trip at sizes around the L2 (50 MB on an H100, 60 MB on an H200).
  {
    std::printf("workspace round trip: W MB written, then read, repeated; TB/s of (write + read) traffic\n");
    std::printf("%-10s %12s %12s %22s\n", "W MB", "plain", "discard", "persisting + discard");
    cudaStream_t stream;
    CHECK_CUDA(cudaStreamCreate(&stream));
    const int grid = sms * 8, block = 256;
    for (size_t mb : {8, 16, 24, 32, 48, 64, 512}) {
      const int reps = int(std::max<size_t>(1, 640 / mb));  // about 1.3 GB of traffic per timed run
      const size_t n = (mb << 20) / 16;
      uint4* buf = nullptr;
      CHECK_CUDA(cudaMalloc(&buf, n * 16));
      float ms[3];
      for (int variant = 0; variant < 3; ++variant) {
        const bool discard = variant > 0, persist = variant == 2;
        if (persist) {
          if (cudaDeviceSetLimit(cudaLimitPersistingL2CacheSize, size_t(prop.persistingL2CacheMaxSize)) != cudaSuccess) {
            (void)cudaGetLastError();  // no persisting L2 on this device or setup: not measured
            ms[variant] = 0;
            continue;
          }
          cudaStreamAttrValue attr = {};
          attr.accessPolicyWindow.base_ptr = buf;
          attr.accessPolicyWindow.num_bytes = std::min(n * 16, size_t(prop.accessPolicyMaxWindowSize));
          attr.accessPolicyWindow.hitRatio = 1.0f;
          attr.accessPolicyWindow.hitProp = cudaAccessPropertyPersisting;
          attr.accessPolicyWindow.missProp = cudaAccessPropertyStreaming;
          CHECK_CUDA(cudaStreamSetAttribute(stream, cudaStreamAttributeAccessPolicyWindow, &attr));
        }
        ms[variant] = best_ms(e0, e1, [&] {
          for (int r = 0; r < reps; ++r) {
            ws_write_kernel<<<grid, block, 0, stream>>>(buf, n, unsigned(r));
            ws_read_kernel<<<grid, block, 0, stream>>>(buf, n, discard, sink);
          }
        }, stream);
        if (persist) {
          cudaStreamAttrValue attr = {};
          attr.accessPolicyWindow.num_bytes = 0;  // no window
          CHECK_CUDA(cudaStreamSetAttribute(stream, cudaStreamAttributeAccessPolicyWindow, &attr));
          CHECK_CUDA(cudaCtxResetPersistingL2Cache());
          CHECK_CUDA(cudaDeviceSetLimit(cudaLimitPersistingL2CacheSize, 0));
        }
      }
      const double bytes = 2.0 * reps * double(n) * 16;
      auto rate = [&](float t) { return t > 0 ? bytes / (t * 1e-3) * 1e-12 : 0.0; };  // 0: not measured
      std::printf("%-10zu %12.2f %12.2f %22.2f\n", mb, rate(ms[0]), rate(ms[1]), rate(ms[2]));
      CHECK_CUDA(cudaFree(buf));
    }
    CHECK_CUDA(cudaStreamDestroy(stream));
  }
  CHECK_CUDA(cudaFree(sink));
  return 0;
}
