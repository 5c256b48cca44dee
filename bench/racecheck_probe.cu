// Which hand-offs through shared memory does compute-sanitizer racecheck follow? One producer warp
// writes a two-slot ring with ordinary stores, step s into slot s % 2 (8 steps), and 4 consumer
// warps read it (docs/cuda-forward.md, "Sanitizers and the cluster kernel, seventeenth session").
// Not a test: run it under the tool, one variant per process, on Hopper, e.g.
//   for raw in 0 2; do for war in 0 4; do
//     compute-sanitizer --tool racecheck build-gpu/bench/racecheck_probe $raw $war | grep SUMMARY
//   done; done
// Slot full (RAW):
//   0  stores, fence, __syncwarp, lane 0 arrives on the slot's mbarrier (count 1)
//   1  stores, fence, every lane arrives (count 32)
//   2  stores, bar.arrive(2 + s % 2); the consumers bar.sync(2 + s % 2)
//   3  stores, bar.sync(2 + s % 2) on both sides
//   4  as 0, the arrival through the slot's shared::cluster address (mapa)
// Slot free (WAR), before the producer writes step s + 2:
//   0  the consumers' named barrier, then one consumer thread arrives on the mbarrier (count 1)
//   1  as 0, the arrival through the shared::cluster address
//   2  every consumer thread arrives (count 128)
//   3  as 2, through the shared::cluster address
//   4  the consumers bar.arrive(4 + s % 2), the producer bar.sync(4 + s % 2)
//   5  bar.sync(4 + s % 2) on both sides
// RAW 3 with WAR 5 deadlocks by construction (the producer syncs on the next slot while the
// consumers wait to release the previous one). It prints how many consumer sums came out wrong.
#include <cstdio>
#include <cstdlib>

#include "../src/cuda/common/tma.cuh"
#include "check_cuda.h"

using namespace monarchrt::cuda_detail;

constexpr int kSteps = 8, kN = 64;

template <int RAW, int WAR>
__global__ void __cluster_dims__(1, 1, 1) probe(int* out) {
  __shared__ uint4 slot[2][kN];
  __shared__ uint64_t full[2], empty[2];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (tid == 0) {
    for (int i = 0; i < 2; ++i) {
      mbar_init(&full[i], RAW == 1 ? 32 : 1);
      mbar_init(&empty[i], WAR >= 2 ? 128 : 1);
    }
    fence_mbar_init();
  }
  __syncthreads();
  if (warp == 0) {
    for (int s = 0; s < kSteps; ++s) {
      if (s >= 2) {
        if (WAR <= 3) mbar_wait(&empty[s % 2], ((s / 2) - 1) & 1);
        if (WAR == 4 || WAR == 5) named_bar_sync(4 + s % 2, 160);
      }
      for (int i = lane; i < kN; i += 32) slot[s % 2][i] = make_uint4(s, i, s, i);
      if (RAW == 0 || RAW == 4) {
        __threadfence_block();
        __syncwarp();
        if (lane == 0) {
          if (RAW == 0) mbar_arrive(&full[s % 2]);
          else mbar_arrive_remote(cluster_addr(smem_addr(&full[s % 2]), cluster_rank()));
        }
      } else if (RAW == 1) {
        __threadfence_block();
        mbar_arrive(&full[s % 2]);
      } else if (RAW == 2) {
        named_bar_arrive(2 + s % 2, 160);
      } else {
        named_bar_sync(2 + s % 2, 160);
      }
    }
  } else {
    const int ct = tid - 32;
    int acc = 0;
    for (int s = 0; s < kSteps; ++s) {
      if (RAW <= 1 || RAW == 4) mbar_wait(&full[s % 2], (s / 2) & 1);
      else named_bar_sync(2 + s % 2, 160);
      acc += int(slot[s % 2][ct % kN].x + slot[s % 2][(ct + 7) % kN].z);
      if (s + 2 < kSteps) {
        if (WAR <= 1) {
          named_bar_sync(1, 128);
          if (ct == 0) {
            if (WAR == 0) mbar_arrive(&empty[s % 2]);
            else mbar_arrive_remote(cluster_addr(smem_addr(&empty[s % 2]), cluster_rank()));
          }
        } else if (WAR == 2) {
          mbar_arrive(&empty[s % 2]);
        } else if (WAR == 3) {
          mbar_arrive_remote(cluster_addr(smem_addr(&empty[s % 2]), cluster_rank()));
        } else if (WAR == 4) {
          named_bar_arrive(4 + s % 2, 160);
        } else {
          named_bar_sync(4 + s % 2, 160);
        }
      }
    }
    out[ct] = acc;
  }
}

template <int RAW, int WAR>
static void launch(int* out) {
  probe<RAW, WAR><<<1, 160>>>(out);
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: racecheck_probe RAW(0-4) WAR(0-5)\n");
    return 2;
  }
  const int raw = atoi(argv[1]), war = atoi(argv[2]);
  if (raw < 0 || raw > 4 || war < 0 || war > 5) {
    fprintf(stderr, "racecheck_probe: RAW must be 0-4 and WAR 0-5, got %d %d\n", raw, war);
    return 2;
  }
  int* out = nullptr;
  CHECK_CUDA(cudaMalloc(&out, 128 * sizeof(int)));
  using L = void (*)(int*);
  static const L table[5][6] = {
      {launch<0, 0>, launch<0, 1>, launch<0, 2>, launch<0, 3>, launch<0, 4>, launch<0, 5>},
      {launch<1, 0>, launch<1, 1>, launch<1, 2>, launch<1, 3>, launch<1, 4>, launch<1, 5>},
      {launch<2, 0>, launch<2, 1>, launch<2, 2>, launch<2, 3>, launch<2, 4>, launch<2, 5>},
      {launch<3, 0>, launch<3, 1>, launch<3, 2>, launch<3, 3>, launch<3, 4>, launch<3, 5>},
      {launch<4, 0>, launch<4, 1>, launch<4, 2>, launch<4, 3>, launch<4, 4>, launch<4, 5>},
  };
  table[raw][war](out);
  CHECK_CUDA(cudaGetLastError());
  int h[128];
  const cudaError_t e = cudaMemcpy(h, out, sizeof h, cudaMemcpyDeviceToHost);
  int expect = 0;
  for (int s = 0; s < kSteps; ++s) expect += s + s;
  int bad = 0;
  for (int i = 0; i < 128; ++i) bad += h[i] != expect;
  printf("RAW %d WAR %d: %s, %d wrong\n", raw, war, cudaGetErrorString(e), bad);
  return e != cudaSuccess || bad;
}
