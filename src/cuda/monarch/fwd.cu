// Host side of the CUDA Monarch forward: argument checks, the choice of kernel configuration
// (ahead of time, from the device's shared-memory size: never autotuned), and the launch.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <type_traits>

#include "../../core/plan.h"
#include "../common/host.h"
#include "../attention/flash.h"
#include "cluster.cuh"
#include "fwd_kernel.cuh"
#include "two_pass.cuh"
#include "monarchrt/cuda.h"

namespace monarchrt {

namespace cuda_detail {
namespace {

// Configurations, largest first: G = 4 key rows per stage-1 group needs about 219 KB of shared
// memory for D = 128 (Hopper: 227 KB per block); G = 2 fits the 163 KB of sm_80.
template <typename T, int D>
size_t smem_bytes(int G) {
  return G == 4 ? FwdConfig<T, D, 4>::kSmem : FwdConfig<T, D, 2>::kSmem;
}

template <typename T, int D, int G>
Status prepare_fused() {
  static std::atomic<uint64_t> done{0};
  return ensure_smem(monarch_fwd_kernel<T, D, G>, FwdConfig<T, D, G>::kSmem, done);
}

template <typename T, int D>
Status prepare_two_pass() {
  using C = TwoPassConfig<T, D>;
  using Wide = TwoPassConfig<T, D, 128>;
  using Hopper = TwoPassConfig<T, D, 64, true>;
  static std::atomic<uint64_t> done1{0}, done1w{0}, done1h{0}, done2{0}, done3{0};
  MONARCHRT_RETURN_IF_ERROR(ensure_smem(monarch_stage1_kernel<T, D, C::kB2Max>, C::kSmem1, done1));
  MONARCHRT_RETURN_IF_ERROR(ensure_smem(monarch_stage1_kernel<T, D, 128>, Wide::kSmem1, done1w));
  if (use_wgmma()) {
    MONARCHRT_RETURN_IF_ERROR(ensure_smem(monarch_stage1_kernel<T, D, 64, true>, Hopper::kSmem1, done1h));
  }
  MONARCHRT_RETURN_IF_ERROR(ensure_smem(monarch_stage2_kernel<T, D>, C::kSmem2, done2));
  if (use_wgmma()) {
    static std::atomic<uint64_t> done2h{0};
    MONARCHRT_RETURN_IF_ERROR(ensure_smem(monarch_stage2_kernel<T, D, true>, C::kSmem2Tma, done2h));
  }
  return ensure_smem(monarch_proxy_kernel<T, D>, C::kSmemProxy, done3);
}

template <typename T, int D, int G>
Status launch(const MonarchFwdParams& p, int B, cudaStream_t stream) {
  using C = FwdConfig<T, D, G>;
  MONARCHRT_RETURN_IF_ERROR((prepare_fused<T, D, G>()));
  const dim3 grid((p.b2 + C::kJB - 1) / C::kJB, p.A * p.row_groups, B * p.H);
  monarch_fwd_kernel<T, D, G><<<grid, C::kThreads, C::kSmem, stream>>>(p);
  MONARCHRT_CUDA_CHECK(cudaGetLastError());
  return Status();
}

// The launch configuration of the Hopper cluster kernel (cluster.cuh) for `ctas` CTAs.
template <typename T>
cudaLaunchConfig_t cluster_config(unsigned ctas, cudaStream_t stream, cudaLaunchAttribute* attr) {
  using C = ClusterConfig<T>;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(ctas);
  cfg.blockDim = dim3(unsigned(C::kThreads));
  cfg.dynamicSmemBytes = C::kSmem;
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(C::kC);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// Loads the cluster kernel once per device with its shared memory and the non-portable cluster
// size of 16 allowed, and finds whether the device can hold such a cluster at all (bit set in
// `usable`).
template <typename T>
Status prepare_cluster(bool* usable = nullptr) {
  static std::atomic<uint64_t> done{0}, ok{0};
  int device = 0;
  MONARCHRT_CUDA_CHECK(cudaGetDevice(&device));
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit == 0 || (done.load() & bit) == 0) {
    MONARCHRT_CUDA_CHECK(cudaFuncSetAttribute(monarch_cluster_fwd_kernel<T>,
                                              cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              int(ClusterConfig<T>::kSmem)));
    MONARCHRT_CUDA_CHECK(
        cudaFuncSetAttribute(monarch_cluster_fwd_kernel<T>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    cudaLaunchAttribute attr[1];
    const cudaLaunchConfig_t cfg = cluster_config<T>(unsigned(ClusterConfig<T>::kC), nullptr, attr);
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, monarch_cluster_fwd_kernel<T>, &cfg) != cudaSuccess) {
      (void)cudaGetLastError();
      clusters = 0;
    }
    if (clusters > 0) ok.fetch_or(bit);
    done.fetch_or(bit);
  }
  if (usable != nullptr) *usable = bit != 0 && (ok.load() & bit) != 0;
  return Status();
}

// Runs the fused forward as the cluster kernel where it applies (Hopper, D = 128, b1 <= 32, b2 <=
// 64, at most ClusterConfig::kMaxTiles key tiles, views the tensor-map encoder accepts, clusters
// of 16 that the device can hold); *launched says whether it did. MONARCHRT_NO_CLUSTER=1 keeps
// the mma.sync fused kernel.
template <typename T>
Status launch_cluster(const MonarchFwdParams& p, int B, cudaStream_t stream, bool* launched) {
  using C = ClusterConfig<T>;
  *launched = false;
  const char* e = std::getenv("MONARCHRT_NO_CLUSTER");
  if ((e != nullptr && e[0] == '1') || !use_wgmma() || p.b1 > 32 || p.b2 > 64 || p.F > C::kMaxTiles) {
    return Status();
  }
  bool usable = false;
  MONARCHRT_RETURN_IF_ERROR(prepare_cluster<T>(&usable));
  if (!usable) return Status();
  ClusterTma tma{};
  const bool bf16 = std::is_same<T, __nv_bfloat16>::value;
  const int64_t k_shape[4] = {B, p.k_tokens, p.H, C::D}, v_shape[4] = {B, p.v_tokens, p.H, C::D};
  if (!encode_row_tiles(&tma.k, p.k, bf16, k_shape, p.k_stride, p.b2).ok() ||
      !encode_row_tiles(&tma.v, p.v, bf16, v_shape, p.v_stride, p.b2).ok()) {
    return Status();
  }
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = cluster_config<T>(unsigned(int64_t(B) * p.H * p.A * C::kC), stream, attr);
  MONARCHRT_CUDA_CHECK(cudaLaunchKernelEx(&cfg, monarch_cluster_fwd_kernel<T>, p, tma));
  *launched = true;
  return Status();
}

template <typename T, int D>
Status dispatch_groups(const MonarchFwdParams& p, int B, int G, cudaStream_t stream) {
  if constexpr (D == 128) {
    bool launched = false;
    MONARCHRT_RETURN_IF_ERROR(launch_cluster<T>(p, B, stream, &launched));
    if (launched) return Status();
  }
  return G == 4 ? launch<T, D, 4>(p, B, stream) : launch<T, D, 2>(p, B, stream);
}

// The Hopper stage 1's store maps over the workspace planes (two_pass.cuh, Stage1Tma).
template <typename T, int D>
bool stage1_store_maps(const MonarchFwdParams& p, int B, Stage1Tma* tma) {
  const CUtensorMapDataType type = map_dtype(std::is_same<T, __nv_bfloat16>::value);
  const cuuint64_t row = cuuint64_t(D) * sizeof(T), rows_per_j = cuuint64_t(p.F) * p.b1;
  const cuuint64_t dims[4] = {cuuint64_t(D), rows_per_j, cuuint64_t(p.b2), cuuint64_t(B) * p.H * p.A};
  const cuuint64_t strides[3] = {row, rows_per_j * row, cuuint64_t(p.b2) * rows_per_j * row};
  const cuuint32_t box[4] = {64, 1, cuuint32_t(std::min(p.b2, 64)), 1};
  return encode_tensor_map(&tma->al, p.ws_al, type, 4, dims, strides, box, CU_TENSOR_MAP_SWIZZLE_128B).ok() &&
         encode_tensor_map(&tma->y, p.ws_y, type, 4, dims, strides, box, CU_TENSOR_MAP_SWIZZLE_128B).ok();
}

}  // namespace

bool plane_maps(const MonarchFwdParams& p, int B, bool bf16, int D, int box_rows, CUtensorMap* al, CUtensorMap* y) {
  const int64_t rows = int64_t(B) * p.H * p.A * p.b2 * p.F * p.b1;
  if (rows + box_rows >= (int64_t(1) << 31)) return false;
  const cuuint64_t dims[2] = {cuuint64_t(D), cuuint64_t(rows)}, pitch[1] = {cuuint64_t(D) * 2};
  const cuuint32_t box[2] = {64, cuuint32_t(box_rows)};
  return encode_tensor_map(al, p.ws_al, map_dtype(bf16), 2, dims, pitch, box, CU_TENSOR_MAP_SWIZZLE_128B).ok() &&
         encode_tensor_map(y, p.ws_y, map_dtype(bf16), 2, dims, pitch, box, CU_TENSOR_MAP_SWIZZLE_128B).ok();
}

bool stage1_maps(const MonarchFwdParams& p, int B, DType dtype, int D, Stage1Tma* tma) {
  if (p.b2 > 64 || !use_wgmma()) return false;
  const bool bf16 = dtype == DType::kBF16;
  const int64_t k_shape[4] = {B, p.k_tokens, p.H, D}, v_shape[4] = {B, p.v_tokens, p.H, D};
  if (!encode_row_tiles(&tma->k, p.k, bf16, k_shape, p.k_stride, p.b2).ok() ||
      !encode_row_tiles(&tma->v, p.v, bf16, v_shape, p.v_stride, p.b2).ok()) {
    return false;
  }
  if (bf16) return D == 128 ? stage1_store_maps<__nv_bfloat16, 128>(p, B, tma) : stage1_store_maps<__nv_bfloat16, 64>(p, B, tma);
  return D == 128 ? stage1_store_maps<__half, 128>(p, B, tma) : stage1_store_maps<__half, 64>(p, B, tma);
}

namespace {

// How many CTAs share the key tiles of one (query tile, row) in stage 1 (MonarchFwdParams::
// key_parts). The launch has A * b1 * B * H CTAs whatever the key length (1080 for a
// Self-Forcing chunk, about two waves of 4 CTAs per SM), each walking all its key tiles; parts
// of about 5 tiles each keep the last wave short. Measured on an H100 (docs/perf.md, twelfth
// session: parts of 7 tiles, 1-3% less time for 21 key frames, full 32760, block-causal and
// several iterations; 3 parts at 3 frames +3..6%) and swept on an H200 (twenty-ninth session:
// 2 parts at 9 key frames -3%, 3 at 15 -1.5%, 4 at 21 and full 32760 -0..1% against parts of 7;
// block-causal best at 2, 3 frames at 1). MONARCHRT_STAGE1_KEY_PARTS=N in the environment
// forces N (tests and benchmarks).
int stage1_key_parts(const MonarchFwdParams& p) {
  const char* e = std::getenv("MONARCHRT_STAGE1_KEY_PARTS");
  if (e != nullptr && std::atoi(e) > 0) return std::min(std::atoi(e), std::max(p.F, 1));
  // key tiles a query tile attends, on average (block-causal: half the tiles plus half a chunk)
  const int chunk_tiles = p.causal_chunk > 0 ? p.causal_chunk / p.f_tied * p.tpg : 0;
  const int per_tile = p.causal_chunk > 0 ? (p.F + chunk_tiles) / 2 : p.F;
  return std::max(1, std::min(8, (per_tile + 2) / 5));
}

// Stage 1 into the workspace, with the configuration that holds rows of b2 keys.
template <typename T, int D>
Status launch_stage1_typed(MonarchFwdParams p, int B, cudaStream_t stream) {
  using C = TwoPassConfig<T, D>;
  MONARCHRT_RETURN_IF_ERROR((prepare_two_pass<T, D>()));
  p.key_parts = stage1_key_parts(p);
  const dim3 grid1(p.A * p.key_parts, p.b1, B * p.H);
  Stage1Tma tma{};
  // Hopper: one warpgroup, rows by TMA, S, aL and Y by wgmma. Views the copy engine cannot
  // describe (its encoder refuses, e.g. a zero stride that broadcasts K over heads) take the
  // portable kernel.
  if (stage1_maps(p, B, std::is_same<T, __nv_bfloat16>::value ? DType::kBF16 : DType::kF16, D, &tma)) {
    monarch_stage1_kernel<T, D, 64, true><<<grid1, 128, TwoPassConfig<T, D, 64, true>::smem1_wg(p.b2), stream>>>(p, tma);
  } else if (p.b2 > C::kB2Max) {  // rows wider than the default stage-1 buffers
    monarch_stage1_kernel<T, D, 128><<<grid1, 32 * ((p.b2 + 15) / 16), TwoPassConfig<T, D, 128>::kSmem1, stream>>>(p, tma);
  } else {
    monarch_stage1_kernel<T, D, C::kB2Max><<<grid1, 32 * ((p.b2 + 15) / 16), C::kSmem1, stream>>>(p, tma);
  }
  MONARCHRT_CUDA_CHECK(cudaGetLastError());
  return Status();
}

template <typename T, int D>
Status launch_two_pass(MonarchFwdParams p, int B, int iters, cudaStream_t stream) {
  using C = TwoPassConfig<T, D>;
  MONARCHRT_RETURN_IF_ERROR((prepare_two_pass<T, D>()));
  const dim3 grid2((p.b2 + C::kCols - 1) / C::kCols, p.A * ((p.b1 + 31) / 32), B * p.H);
  const dim3 grid2_tma((p.b2 + C::kColsTma - 1) / C::kColsTma, grid2.y, grid2.z);
  const dim3 grid_proxy((p.b2 + C::kCols - 1) / C::kCols, p.A, B * p.H);
  void* proxies = p.ws_proxy;
  float* lse = p.ws_lse;
  float* const lse_out = p.lse_out;
  p.ws_proxy = nullptr;  // iteration 1: the queries are the proxies
  Stage2Tma tma2{};
  const bool stage2_tma =
      use_wgmma() && plane_maps(p, B, std::is_same<T, __nv_bfloat16>::value, D, C::kChunk, &tma2.al, &tma2.y);
  for (int it = 1; it <= iters; ++it) {
    MONARCHRT_RETURN_IF_ERROR((launch_stage1_typed<T, D>(p, B, stream)));
    p.ws_lse = it < iters ? lse : nullptr;  // stage 2 of an inner iteration: its log-sum-exp
    p.lse_out = it < iters ? nullptr : lse_out;  // the caller's, from the last stage 2
    if (stage2_tma) {
      monarch_stage2_kernel<T, D, true><<<grid2_tma, 128, C::kSmem2Tma, stream>>>(p, tma2);
    } else {
      monarch_stage2_kernel<T, D><<<grid2, 128, C::kSmem2, stream>>>(p, tma2);
    }
    MONARCHRT_CUDA_CHECK(cudaGetLastError());
    if (it < iters) {
      p.ws_proxy = proxies;
      monarch_proxy_kernel<T, D><<<grid_proxy, 128, C::kSmemProxy, stream>>>(p);
      MONARCHRT_CUDA_CHECK(cudaGetLastError());
    }
  }
  return Status();
}

// Per row: aL and Y (D elements each) and cL; with several iterations also the proxy (D
// elements), plus one log-sum-exp float per query. After cL, kClSlack floats that the Hopper
// stage 2 may read (it copies cL in 16-byte aligned blocks) and nothing writes.
constexpr int64_t kClSlack = 64;
size_t two_pass_workspace(const AttentionPlan& plan, DType dtype) {
  const size_t planes = plan.num_iters > 1 ? 3 : 2;
  size_t bytes = size_t(workspace_rows(plan)) * (planes * size_t(plan.D) * size_t(dtype_size(dtype)) + sizeof(float)) +
                 kClSlack * sizeof(float);
  if (plan.num_iters > 1) bytes += size_t(plan.B * plan.H * plan.Sq) * sizeof(float);
  return bytes;
}

struct Choice {
  int G = 0;
};

// Checks the problem for the two-pass path (two_pass) or the fused one, and picks the fused
// configuration for this device.
Status choose(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
              const AttentionParams& params, bool two_pass, AttentionPlan* plan, Choice* choice) {
  MONARCHRT_RETURN_IF_ERROR(make_plan(q, k, v, out, params, true, Device::kCUDA, plan));
  if (q.dtype != DType::kBF16 && q.dtype != DType::kF16) {
    return Status::unsupported(std::string("q: dtype ") + dtype_name(q.dtype) +
                               " is not supported by the CUDA path (bfloat16 or float16)");
  }
  if (out.dtype != q.dtype) {
    return Status::unsupported(std::string("out: dtype must equal q's ") + dtype_name(q.dtype) +
                               " on the CUDA path, got " + dtype_name(out.dtype));
  }
  if (plan->D != 64 && plan->D != 128) {
    return Status::unsupported("q: head dim " + std::to_string(plan->D) +
                               " is not supported by the CUDA path (64 or 128)");
  }
  const int b2_max = two_pass || plan->D == 64 ? 128 : 64;
  if (plan->qg.b2 > b2_max) {
    return Status::unsupported("layout: tile width b2 = " + std::to_string(plan->qg.b2) + " exceeds " +
                               std::to_string(b2_max) + (two_pass ? " (the CUDA path's limit)"
                                                                  : " for the fused kernel at head dim 128 "
                                                                    "(pass a workspace for the two-pass path)"));
  }
  if (plan->qg.b1 > 256) {
    return Status::unsupported("layout: tile height b1 = " + std::to_string(plan->qg.b1) +
                               " exceeds the CUDA path's 256");
  }
  const char* names[4] = {"q", "k", "v", "out"};
  const TensorView* views[4] = {&q, &k, &v, &out};
  for (int i = 0; i < 4; ++i) {
    const TensorView& t = *views[i];
    if (t.stride[3] != 1) {
      return Status::unsupported(std::string(names[i]) + ": the head dim must be contiguous (stride 1)");
    }
    if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0 || t.stride[0] % 8 != 0 ||
        t.stride[1] % 8 != 0 || t.stride[2] % 8 != 0) {
      return Status::unsupported(std::string(names[i]) +
                                 ": data and strides must be 16-byte aligned (multiples of 8 elements)");
    }
  }
  int device = 0, optin = 0;
  MONARCHRT_CUDA_CHECK(cudaGetDevice(&device));
  MONARCHRT_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const bool bf16 = q.dtype == DType::kBF16;
  auto need = [&](int G) {
    if (plan->D == 128) return bf16 ? smem_bytes<__nv_bfloat16, 128>(G) : smem_bytes<__half, 128>(G);
    return bf16 ? smem_bytes<__nv_bfloat16, 64>(G) : smem_bytes<__half, 64>(G);
  };
  if (size_t(optin) >= need(4)) {
    choice->G = 4;
  } else if (size_t(optin) >= need(2)) {
    choice->G = 2;
  } else {
    return Status::unsupported("device: " + std::to_string(optin) +
                               " bytes of shared memory per block are too few for the CUDA path");
  }
  return Status();
}

}  // namespace

// The kernels' parameters for a checked problem (pointers, strides, geometry, masks; no workspace).
MonarchFwdParams make_fwd_params(const TensorView& q, const TensorView& k, const TensorView& v,
                                 const TensorView& out, const AttentionParams& params,
                                 const AttentionPlan& plan) {
  MonarchFwdParams p{};
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.out = out.data;
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = q.stride[i];
    p.k_stride[i] = k.stride[i];
    p.v_stride[i] = v.stride[i];
    p.o_stride[i] = out.stride[i];
  }
  p.H = int(plan.H);
  p.k_tokens = k.tokens();
  p.v_tokens = v.tokens();
  p.h = int(plan.q_grid.h);
  p.w = int(plan.q_grid.w);
  p.f_tied = int(params.layout.f_tied);
  p.w_reduce = int(params.layout.w_reduce);
  p.rows_pf = int(plan.q_grid.h / params.layout.h_reduce);
  p.tpg = int(plan.qg.tiles_per_frame_group);
  p.b1 = int(plan.qg.b1);
  p.b2 = int(plan.qg.b2);
  p.A = int(plan.qg.tiles);
  const KeyTiles kt = key_tiles(plan);
  p.F = int(kt.count);
  p.sink_tiles = int(kt.sink);
  p.skip_tiles = int(kt.skip);
  // MONARCHRT_KEY_TILE_SEARCH=1 in the environment keeps the general per-tile search (tests: no
  // plan of today's planner has more than one gap, so only this knob exercises those loops).
  const char* search = std::getenv("MONARCHRT_KEY_TILE_SEARCH");
  p.allowed_prefix = (kt.attended_only && !(search != nullptr && std::atoi(search) > 0)) ? 1 : 0;
  p.row_groups = int((plan.qg.b1 + 31) / 32);
  p.key_parts = 1;
  p.q_frame_offset = int(plan.q_frame_offset);
  p.causal_chunk = int(plan.causal_chunk_frames);
  const int64_t cache = plan.k_grid.T;
  p.sink = params.kv_cache ? int(params.sink_frames) : 0;
  p.ring_capacity = params.kv_cache ? int(params.cache_capacity_frames) : 0;
  p.window_start = (params.kv_cache && params.window_frames > 0)
                       ? int(std::max<int64_t>(cache - params.window_frames, p.sink))
                       : p.sink;
  p.scale_log2 = float(plan.scale * 1.4426950408889634);
  return p;
}

KeyTiles key_tiles(const AttentionPlan& plan) {
  const int64_t F = plan.kg.tiles;
  auto attended = [&](int64_t n) { return plan.frame_attended[size_t(plan.kg.first_frame_of_tile(n))] != 0; };
  int64_t s = 0;
  while (s < F && attended(s)) ++s;  // the sink (or every tile)
  int64_t w = s;
  while (w < F && !attended(w)) ++w;  // the frames between the sink and the window
  for (int64_t n = w; n < F; ++n) {
    if (!attended(n)) return {F, F, 0, false};  // not one gap: number every tile (does not occur today)
  }
  return {F - (w - s), s, w - s, true};
}

int64_t workspace_rows(const AttentionPlan& plan) {
  return plan.B * plan.H * plan.qg.tiles * plan.qg.b2 * key_tiles(plan).count * plan.qg.b1;
}

Status launch_stage1(const MonarchFwdParams& p, int B, DType dtype, int D, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == DType::kBF16) {
    return D == 128 ? launch_stage1_typed<__nv_bfloat16, 128>(p, B, s) : launch_stage1_typed<__nv_bfloat16, 64>(p, B, s);
  }
  return D == 128 ? launch_stage1_typed<__half, 128>(p, B, s) : launch_stage1_typed<__half, 64>(p, B, s);
}

// Everything monarch_attention() checks before it launches anything.
Status check_call(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                  const AttentionParams& params, const void* workspace, size_t workspace_bytes,
                  AttentionPlan* plan, Choice* choice) {
  const bool two_pass = workspace_bytes > 0;
  MONARCHRT_RETURN_IF_ERROR(choose(q, k, v, out, params, two_pass, plan, choice));
  if (plan->qg.tiles * ((plan->qg.b1 + 31) / 32) > 65535 || plan->B * plan->H > 65535) {
    return Status::unsupported("q: too many tiles or batch*heads for one launch");
  }
  if (two_pass) {
    const size_t need = two_pass_workspace(*plan, q.dtype);
    if (workspace == nullptr || workspace_bytes < need) {
      return Status::invalid("workspace: " + std::to_string(workspace_bytes) + " bytes given, the "
                             "two-pass path needs workspace_size() = " + std::to_string(need) +
                             " (pass 0 bytes for the fused kernel)");
    }
    if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0) {
      return Status::invalid("workspace: must be 16-byte aligned");
    }
  } else if (params.num_iters > 1) {
    return Status::unsupported("num_iters = " + std::to_string(params.num_iters) + ": several "
                               "iterations need the two-pass path (pass a workspace of "
                               "workspace_size() bytes)");
  }
  return Status();
}

Status check_attention_call(const TensorView& q, const TensorView& k, const TensorView& v,
                            const TensorView& out, const AttentionParams& params,
                            const void* workspace, size_t workspace_bytes) {
  AttentionPlan plan;
  Choice choice;
  return check_call(q, k, v, out, params, workspace, workspace_bytes, &plan, &choice);
}

}  // namespace cuda_detail

namespace cuda {

Status prepare() {
  using namespace cuda_detail;
  int optin = 0, device = 0;
  MONARCHRT_CUDA_CHECK(cudaGetDevice(&device));
  MONARCHRT_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  MONARCHRT_RETURN_IF_ERROR((prepare_two_pass<__nv_bfloat16, 128>()));
  MONARCHRT_RETURN_IF_ERROR((prepare_two_pass<__nv_bfloat16, 64>()));
  MONARCHRT_RETURN_IF_ERROR((prepare_two_pass<__half, 128>()));
  MONARCHRT_RETURN_IF_ERROR((prepare_two_pass<__half, 64>()));
  if (use_wgmma()) {  // the Hopper fused path (cluster.cuh)
    MONARCHRT_RETURN_IF_ERROR(prepare_cluster<__nv_bfloat16>());
    MONARCHRT_RETURN_IF_ERROR(prepare_cluster<__half>());
  }
  // The fused configurations this device can run (the same choice as choose()).
  MONARCHRT_RETURN_IF_ERROR((prepare_fused<__nv_bfloat16, 64, 2>()));
  MONARCHRT_RETURN_IF_ERROR((prepare_fused<__half, 64, 2>()));
  if (size_t(optin) >= FwdConfig<__nv_bfloat16, 128, 2>::kSmem) {
    MONARCHRT_RETURN_IF_ERROR((prepare_fused<__nv_bfloat16, 128, 2>()));
    MONARCHRT_RETURN_IF_ERROR((prepare_fused<__half, 128, 2>()));
  }
  if (size_t(optin) >= FwdConfig<__nv_bfloat16, 128, 4>::kSmem) {
    MONARCHRT_RETURN_IF_ERROR((prepare_fused<__nv_bfloat16, 128, 4>()));
    MONARCHRT_RETURN_IF_ERROR((prepare_fused<__half, 128, 4>()));
  }
  if (size_t(optin) >= FwdConfig<__nv_bfloat16, 64, 4>::kSmem) {
    MONARCHRT_RETURN_IF_ERROR((prepare_fused<__nv_bfloat16, 64, 4>()));
    MONARCHRT_RETURN_IF_ERROR((prepare_fused<__half, 64, 4>()));
  }
  MONARCHRT_RETURN_IF_ERROR(prepare_backward());
  MONARCHRT_RETURN_IF_ERROR(prepare_kv_write());
  return prepare_flash();
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

Status can_implement(const TensorView& q, const TensorView& k, const TensorView& v,
                     const TensorView& out, const AttentionParams& params) {
  AttentionPlan plan;
  cuda_detail::Choice choice;
  return cuda_detail::choose(q, k, v, out, params, true, &plan, &choice);
}

size_t workspace_size(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& out, const AttentionParams& params) {
  AttentionPlan plan;
  cuda_detail::Choice choice;
  if (!cuda_detail::choose(q, k, v, out, params, true, &plan, &choice).ok()) return 0;
  return cuda_detail::two_pass_workspace(plan, q.dtype);
}

namespace {

Status forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out, float* lse,
               const AttentionParams& params, void* workspace, size_t workspace_bytes, void* stream) {
  using namespace cuda_detail;
  AttentionPlan plan;
  Choice choice;
  MONARCHRT_RETURN_IF_ERROR(check_call(q, k, v, out, params, workspace, workspace_bytes, &plan, &choice));
  MonarchFwdParams p = make_fwd_params(q, k, v, out, params, plan);
  p.lse_out = lse;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int B = int(plan.B);
  if (workspace_bytes > 0) {
    const size_t plane = size_t(workspace_rows(plan)) * size_t(plan.D) * size_t(dtype_size(q.dtype));
    p.ws_al = workspace;
    p.ws_y = static_cast<char*>(workspace) + plane;
    // Layout: aL plane, Y plane, [proxy plane,] cL floats, kClSlack floats, [log-sum-exp floats]:
    // every plane is rows * D elements, a multiple of 16 bytes, so each part stays 16-byte aligned.
    const size_t planes = plan.num_iters > 1 ? 3 : 2;
    p.ws_cl = reinterpret_cast<float*>(static_cast<char*>(workspace) + planes * plane);
    if (plan.num_iters > 1) {
      p.ws_proxy = static_cast<char*>(workspace) + 2 * plane;
      p.ws_lse = p.ws_cl + workspace_rows(plan) + kClSlack;
    }
    const int iters = params.num_iters;
    if (q.dtype == DType::kBF16) {
      return plan.D == 128 ? launch_two_pass<__nv_bfloat16, 128>(p, B, iters, s)
                           : launch_two_pass<__nv_bfloat16, 64>(p, B, iters, s);
    }
    return plan.D == 128 ? launch_two_pass<__half, 128>(p, B, iters, s)
                         : launch_two_pass<__half, 64>(p, B, iters, s);
  }
  if (q.dtype == DType::kBF16) {
    return plan.D == 128 ? dispatch_groups<__nv_bfloat16, 128>(p, B, choice.G, s)
                         : dispatch_groups<__nv_bfloat16, 64>(p, B, choice.G, s);
  }
  return plan.D == 128 ? dispatch_groups<__half, 128>(p, B, choice.G, s)
                       : dispatch_groups<__half, 64>(p, B, choice.G, s);
}

}  // namespace

Status monarch_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                         const TensorView& out, const AttentionParams& params, void* workspace,
                         size_t workspace_bytes, void* stream) {
  return forward(q, k, v, out, nullptr, params, workspace, workspace_bytes, stream);
}

Status monarch_attention_with_lse(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& out, float* lse, const AttentionParams& params,
                                  void* workspace, size_t workspace_bytes, void* stream) {
  if (lse == nullptr || reinterpret_cast<uintptr_t>(lse) % alignof(float) != 0) {
    return Status::invalid("lse: must point to B * H * q.tokens() floats (4-byte aligned device memory)");
  }
  if (workspace_bytes == 0) {
    return Status::unsupported("lse: the log-sum-exp is written by the two-pass path only (pass a workspace of "
                               "workspace_size() bytes)");
  }
  return forward(q, k, v, out, lse, params, workspace, workspace_bytes, stream);
}

}  // namespace cuda
}  // namespace monarchrt
