// Microbenchmark for the fused Monarch design (docs/cuda-forward.md, "Next step"): how fast an SM
// can move data into the shared memory of other SMs of its thread-block cluster (distributed
// shared memory, Hopper), next to its own shared memory and to device memory. A fused forward
// has to move about one K / V row or one row of stage-1 results (26.6 KB) per key row between
// the SMs that share a query tile, so this bandwidth decides whether the design can beat the
// two-pass path. Also measures how fast SMs take in data from L2 that all of them read (the
// alternative: every CTA loads the K / V rows itself). Prints aggregate TB/s and bytes per cycle
// per SM; not a test, exits 0 unless a CUDA call fails. Usage: bench_dsmem (needs compute
// capability 9.0 or newer).
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>

#include "check_cuda.h"

namespace cg = cooperative_groups;


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

// The fastest of 4 timed runs of launch() after one warm-up run, in milliseconds.
template <typename Launch>
float best_ms(cudaEvent_t e0, cudaEvent_t e1, Launch launch) {
  float best = 1e30f;
  for (int r = 0; r < 5; ++r) {
    CHECK_CUDA(cudaEventRecord(e0));
    launch();
    CHECK_CUDA(cudaEventRecord(e1));
    CHECK_CUDA(cudaEventSynchronize(e1));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    if (r > 0 && ms < best) best = ms;
  }
  CHECK_CUDA(cudaGetLastError());
  return best;
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
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(unsigned((sms / size) * size));  // one wave: one CTA per SM
      cfg.blockDim = dim3(kThreads);
      cfg.dynamicSmemBytes = kBufBytes;
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeClusterDimension;
      attr[0].val.clusterDim.x = unsigned(size);
      attr[0].val.clusterDim.y = 1;
      attr[0].val.clusterDim.z = 1;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      int clusters = 0;
      CHECK_CUDA(cudaOccupancyMaxActiveClusters(&clusters, dsmem_kernel, &cfg));
      cfg.gridDim = dim3(unsigned(std::min(clusters, sms / size) * size));
      const float best = best_ms(e0, e1, [&] { CHECK_CUDA(cudaLaunchKernelEx(&cfg, dsmem_kernel, mode, iters, sink)); });
      const double bytes = double(cfg.gridDim.x) * iters * kBufBytes;
      const double per_sm_cycle = bytes / cfg.gridDim.x / (best * 1e-3 * clock_khz * 1e3);
      std::printf("%-48s %8d %12.2f %14.1f\n", mode_name(mode), size, bytes / (best * 1e-3) * 1e-12, per_sm_cycle);
    }
  }
  CHECK_CUDA(cudaFree(sink));
  return 0;
}
