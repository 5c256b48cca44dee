// CUDA benchmark of the Monarch forward (and backward) on the shapes of ../shared/docs/targets.md (B = 1,
// H = 12, D = 128, bf16): Self-Forcing chunks (3 query frames against a KV cache of 3, 9, 15 and
// 21 frames), full bidirectional and block-causal 32760 tokens, and the f_tied = 3 and
// h_reduce = 2 layouts, and our dense kernel (cuda::dense_attention) on the untiled shapes and on the engine's
// cross-attention (4680 queries x 512 text keys). Prints the first call's time, the median of many timed calls (device
// events, inputs rotated so L2 does not hold them, random data; cuda::prepare() first, so the
// first call measures the call, not the module load), and achieved TFLOP/s of real
// work. The backward table has two rows per shape: "backward" (the call alone) and "bwd+lse"
// (given the forward's output and log-sum-exp, as the PyTorch op's training path). Not a test: it prints and exits 0 unless a call fails. The dense anchors (cuDNN and
// FlashAttention-2 through PyTorch, same card, same run) come from bench/anchors.py.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <string>
#include <vector>

#include "../src/cuda/attention/flash.h"  // the engine's cross-attention call
#include "check_cuda.h"
#include "monarchrt/cuda.h"
#include "monarchrt/workload.h"

using namespace monarchrt;

struct Shape {
  const char* name;
  int64_t q_frames, kv_frames;
  MonarchLayout layout;
  int64_t causal;  // frames
  bool kv;
  double target_ms;  // 0: none
  int iters = 1;
};

// FLOPs of real work: allowed (query tile, key tile) pairs times the per-pair cost of section 5.
double real_flops(const Shape& s, const TileGeometry& qg, const TileGeometry& kg, int64_t H, int64_t D) {
  double pairs = 0;
  const int64_t offset = s.kv ? s.kv_frames - s.q_frames : 0;
  for (int64_t m = 0; m < qg.tiles; ++m)
    for (int64_t n = 0; n < kg.tiles; ++n) {
      const int64_t qf = qg.first_frame_of_tile(m) + offset, kf = kg.first_frame_of_tile(n);
      if (s.causal == 0 || kf / s.causal <= qf / s.causal) pairs += 1;
    }
  return H * pairs * monarch_flops(1, 1, qg.b1, qg.b2, D);
}

// Times call(i) (i: which input set): the first call alone, 3 warm-up calls, then `reps` timed
// calls on rotating input sets; prints one row with the median and the achieved TFLOP/s.
std::string g_path;     // --path: only the rows of this path ("" = all)
bool g_targets = true;  // the targets are for 12 heads: not shown with --heads

template <typename Call>
void time_row(const char* name, const char* path, int reps, int sets, double flops, double target_ms,
              cudaEvent_t e0, cudaEvent_t e1, Call call) {
  if (!g_path.empty() && g_path != path) return;
  float first = 0;
  CHECK_CUDA(cudaEventRecord(e0));
  call(0);
  CHECK_CUDA(cudaEventRecord(e1));
  CHECK_CUDA(cudaEventSynchronize(e1));
  CHECK_CUDA(cudaEventElapsedTime(&first, e0, e1));
  for (int i = 0; i < 3; ++i) call(i % sets);
  std::vector<float> times;
  for (int r = 0; r < reps; ++r) {
    CHECK_CUDA(cudaEventRecord(e0));
    call(r % sets);
    CHECK_CUDA(cudaEventRecord(e1));
    CHECK_CUDA(cudaEventSynchronize(e1));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    times.push_back(ms);
  }
  std::sort(times.begin(), times.end());
  const double med = times[times.size() / 2];
  char target[32] = "-", status[32] = "-";
  if (target_ms > 0 && g_targets) {
    std::snprintf(target, sizeof target, "%.2f", target_ms);
    std::snprintf(status, sizeof status, "%s", med <= target_ms ? "met" : "missed");
  }
  std::printf("%-28s %-9s %10.3f %10.3f %10.1f %9s %9s\n", name, path, first, med, flops / (med * 1e-3) * 1e-12,
              target, status);
}

void check_status(const Status& st, const char* name) {
  if (!st.ok()) {
    std::fprintf(stderr, "%s: %s\n", name, st.to_string().c_str());
    std::exit(1);
  }
}

int main(int argc, char** argv) {
  const int64_t D = 128;
  int64_t H = 12;
  // Usage: bench_cuda [reps] [--backward] [--only TEXT] [--path PATH] [--heads N]  (--backward:
  // only the backward table; --only: only the shapes whose name contains TEXT; --path: only the
  // rows of one path: fused, two-pass, dense, backward or bwd+lse, e.g. under ncu; --heads: N
  // heads instead of 12, to see how a launch fills the SMs' waves)
  int reps = 50;
  bool backward_only = false;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--backward") {
      backward_only = true;
    } else if (std::string(argv[i]) == "--only" && i + 1 < argc) {
      only = argv[++i];
    } else if (std::string(argv[i]) == "--path" && i + 1 < argc) {
      g_path = argv[++i];
      const char* paths[] = {"fused", "two-pass", "dense", "backward", "bwd+lse"};
      if (std::find(std::begin(paths), std::end(paths), g_path) == std::end(paths)) {
        std::fprintf(stderr, "bench_cuda: --path %s: must be fused, two-pass, dense, backward or bwd+lse\n",
                     g_path.c_str());
        return 2;
      }
    } else if (std::string(argv[i]) == "--heads" && i + 1 < argc) {
      H = std::atoll(argv[++i]);
      if (H < 1 || H > 64) {
        std::fprintf(stderr, "bench_cuda: --heads %s: must be 1 to 64\n", argv[i]);
        return 2;
      }
      g_targets = H == 12;
    } else {
      char* end = nullptr;
      const long n = std::strtol(argv[i], &end, 10);
      if (end == argv[i] || *end != '\0' || n < 1 || n > 100000) {
        std::fprintf(stderr, "bench_cuda: %s: not an option or a repetition count (1 to 100000)\n"
                             "usage: bench_cuda [reps] [--backward] [--only TEXT] [--path PATH] [--heads N]\n",
                     argv[i]);
        return 2;
      }
      reps = int(n);
    }
  }
  const Shape shapes[] = {
      {"SF chunk, KV 3 frames", 3, 3, {1, 1, 1}, 0, true, 0.06},
      {"SF chunk, KV 9 frames", 3, 9, {1, 1, 1}, 0, true, 0.12},
      {"SF chunk, KV 15 frames", 3, 15, {1, 1, 1}, 0, true, 0},
      {"SF chunk, KV 21 frames", 3, 21, {1, 1, 1}, 0, true, 0.25},
      {"SF KV 21, f_tied=3", 3, 21, {3, 1, 1}, 0, true, 0},
      {"SF KV 21, h_reduce=2", 3, 21, {1, 2, 1}, 0, true, 0},
      {"full 32760 bidirectional", 21, 21, {1, 1, 1}, 0, false, 1.5},
      {"full 32760 block-causal 3", 21, 21, {1, 1, 1}, 3, false, 0},
      {"SF KV 21, 2 iterations", 3, 21, {1, 1, 1}, 0, true, 0, 2},
      {"SF KV 21, 3 iterations", 3, 21, {1, 1, 1}, 0, true, 0, 3},
  };
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  const Status prepared = cuda::prepare();  // load every kernel now, not inside a timed call
  if (!prepared.ok()) {
    std::fprintf(stderr, "cuda::prepare: %s\n", prepared.to_string().c_str());
    return 1;
  }
  std::printf("device: %s (%d SMs), B=1 H=%lld D=%lld bf16, median of %d calls\n", prop.name,
              prop.multiProcessorCount, (long long)H, (long long)D, reps);
  std::printf("%-28s %-9s %10s %10s %10s %9s %9s\n", "shape", "path", "first ms", "median ms",
              "TFLOP/s", "target", "status");
  const int64_t per_frame = 30 * 52;
  const int64_t max_tokens = 21 * per_frame;
  // Input sets to rotate through: enough that they do not fit in L2 together.
  const size_t elems = size_t(max_tokens) * H * D;
  const int sets = 3;
  std::vector<void*> q(sets), k(sets), v(sets), o(sets);
  {
    std::vector<uint16_t> host(elems);
    Rng rng(7);
    for (int i = 0; i < sets; ++i) {
      for (void** p : {&q[i], &k[i], &v[i], &o[i]}) {
        CHECK_CUDA(cudaMalloc(p, elems * 2));
        for (auto& x : host) x = float_to_bf16(static_cast<float>(rng.normal()));
        CHECK_CUDA(cudaMemcpy(*p, host.data(), elems * 2, cudaMemcpyHostToDevice));
      }
    }
  }
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  void* ws = nullptr;
  size_t ws_capacity = 0;
  for (const Shape& s : shapes) {
   if (backward_only) break;
   if (std::string(s.name).find(only) == std::string::npos) continue;
   for (int two_pass = s.iters > 1 ? 1 : 0; two_pass < 2; ++two_pass) {
    AttentionParams p;
    p.grid = VideoGrid{s.q_frames, 30, 52};
    p.layout = s.layout;
    p.causal_chunk_frames = s.causal;
    p.kv_cache = s.kv;
    p.num_iters = s.iters;
    auto view = [&](void* ptr, int64_t frames) {
      return TensorView::contiguous(ptr, DType::kBF16, 1, frames * per_frame, H, D, Device::kCUDA);
    };
    TileGeometry qg, kg;
    make_tile_geometry(p.grid, p.layout, &qg);
    make_tile_geometry(VideoGrid{s.kv_frames, 30, 52}, p.layout, &kg);
    const double flops = s.iters * real_flops(s, qg, kg, H, D);
    size_t ws_bytes = 0;
    if (two_pass) {
      ws_bytes = cuda::workspace_size(view(q[0], s.q_frames), view(k[0], s.kv_frames),
                                      view(v[0], s.kv_frames), view(o[0], s.q_frames), p);
      if (ws_bytes > ws_capacity) {
        cudaFree(ws);
        CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
        ws_capacity = ws_bytes;
      }
    }
    time_row(s.name, two_pass ? "two-pass" : "fused", reps, sets, flops, s.target_ms, e0, e1, [&](int i) {
      check_status(cuda::monarch_attention(view(q[i], s.q_frames), view(k[i], s.kv_frames), view(v[i], s.kv_frames),
                                           view(o[i], s.q_frames), p, ws, ws_bytes, nullptr),
                   s.name);
    });
    if (two_pass && s.iters == 1 && s.layout.f_tied == 1 && s.layout.h_reduce == 1) {
      // Our dense kernel (the engine's dense mode) on the same problem; TFLOP/s of dense work.
      const double dense_flops = 4.0 * double(s.q_frames * per_frame) *
                                 double((s.causal ? (s.kv_frames + s.causal) / 2 : s.kv_frames) * per_frame) * H * D;
      time_row(s.name, "dense", reps, sets, dense_flops, 0, e0, e1, [&](int i) {
        check_status(cuda::dense_attention(view(q[i], s.q_frames), view(k[i], s.kv_frames), view(v[i], s.kv_frames),
                                           view(o[i], s.q_frames), p, nullptr),
                     s.name);
      });
    }
   }
  }

  // The engine's cross-attention: a chunk's 3 frames of queries against the 512 text keys, on our
  // dense kernel as the engine calls it (TFLOP/s of dense work).
  const char* cross_name = "cross-attention 4680 x 512";
  if (!backward_only && std::string(cross_name).find(only) != std::string::npos) {
    const int sq = int(3 * per_frame), skv = 512;
    time_row(cross_name, "dense", reps, sets, 4.0 * sq * skv * H * D, 0, e0, e1, [&](int i) {
      cuda_detail::FlashArgs a{};
      a.q = q[i];
      a.k = k[i];
      a.v = v[i];
      a.out = o[i];
      const int64_t qs[3] = {sq * H * D, H * D, D}, ks[3] = {skv * H * D, H * D, D};
      for (int j = 0; j < 3; ++j) {
        a.q_stride[j] = a.o_stride[j] = qs[j];
        a.k_stride[j] = a.v_stride[j] = ks[j];
      }
      a.B = 1;
      a.H = int(H);
      a.D = int(D);
      a.Sq = sq;
      a.segments = 1;
      a.seg_len[0] = skv;
      a.scale = 1.f / std::sqrt(float(D));
      a.dtype = DType::kBF16;
      check_status(cuda_detail::flash_attention(a, nullptr), cross_name);
    });
  }

  // Backward (one iteration): dq, dk, dv for the upstream gradient o. TFLOP/s count 2.5x the
  // forward's real work (the FlashAttention convention: five GEMM-sized products against two).
  const Shape bwd_shapes[] = {
      {"bwd full 32760 bidirect.", 21, 21, {1, 1, 1}, 0, false, 6.0},
      {"bwd full 32760 causal 3", 21, 21, {1, 1, 1}, 3, false, 0},
      {"bwd SF chunk, KV 21", 3, 21, {1, 1, 1}, 0, true, 0},
  };
  std::vector<void*> grads(3), fwd_out(sets), lse(sets);
  for (void*& g : grads) CHECK_CUDA(cudaMalloc(&g, elems * 2));
  for (int i = 0; i < sets; ++i) {  // the forward's output and log-sum-exp for the "bwd+lse" rows
    CHECK_CUDA(cudaMalloc(&fwd_out[i], elems * 2));
    CHECK_CUDA(cudaMalloc(&lse[i], elems / D * sizeof(float)));
  }
  std::printf("%-28s %-9s %10s %10s %10s %9s %9s\n", "shape", "path", "first ms", "median ms", "TFLOP/s",
              "target", "status");
  for (const Shape& s : bwd_shapes) {
    if (std::string(s.name).find(only) == std::string::npos) continue;
    AttentionParams p;
    p.grid = VideoGrid{s.q_frames, 30, 52};
    p.layout = s.layout;
    p.causal_chunk_frames = s.causal;
    p.kv_cache = s.kv;
    auto view = [&](void* ptr, int64_t frames) {
      return TensorView::contiguous(ptr, DType::kBF16, 1, frames * per_frame, H, D, Device::kCUDA);
    };
    TileGeometry qg, kg;
    make_tile_geometry(p.grid, p.layout, &qg);
    make_tile_geometry(VideoGrid{s.kv_frames, 30, 52}, p.layout, &kg);
    const double flops = 2.5 * real_flops(s, qg, kg, H, D);
    auto args = [&](int i) {
      return std::vector<TensorView>{view(q[i], s.q_frames), view(k[i], s.kv_frames), view(v[i], s.kv_frames),
                                     view(o[i], s.q_frames), view(grads[0], s.q_frames),
                                     view(grads[1], s.kv_frames), view(grads[2], s.kv_frames)};
    };
    const std::vector<TensorView> a0 = args(0);
    const size_t ws_bytes = cuda::backward_workspace_size(a0[0], a0[1], a0[2], a0[3], a0[4], a0[5], a0[6], p);
    const size_t fwd_bytes = cuda::workspace_size(a0[0], a0[1], a0[2], a0[3], p);
    if (std::max(ws_bytes, fwd_bytes) > ws_capacity) {
      cudaFree(ws);
      CHECK_CUDA(cudaMalloc(&ws, std::max(ws_bytes, fwd_bytes)));
      ws_capacity = std::max(ws_bytes, fwd_bytes);
    }
    time_row(s.name, "backward", std::max(5, reps / 5), sets, flops, s.target_ms, e0, e1, [&](int i) {
      const std::vector<TensorView> a = args(i);
      check_status(cuda::monarch_attention_backward(a[0], a[1], a[2], a[3], a[4], a[5], a[6], p, ws, ws_bytes, nullptr),
                   s.name);
    });
    // The same with the forward's output and log-sum-exp (what the PyTorch op's training path
    // passes): no first sweep in the stage-2 backward.
    for (int i = 0; i < sets; ++i) {
      const std::vector<TensorView> a = args(i);
      check_status(cuda::monarch_attention_with_lse(a[0], a[1], a[2], view(fwd_out[i], s.q_frames),
                                                    static_cast<float*>(lse[i]), p, ws, fwd_bytes, nullptr),
                   s.name);
    }
    time_row(s.name, "bwd+lse", std::max(5, reps / 5), sets, flops, s.target_ms, e0, e1, [&](int i) {
      const std::vector<TensorView> a = args(i);
      check_status(cuda::monarch_attention_backward(a[0], a[1], a[2], view(fwd_out[i], s.q_frames),
                                                    static_cast<const float*>(lse[i]), a[3], a[4], a[5], a[6], p, ws,
                                                    ws_bytes, nullptr),
                   s.name);
    });
  }
  for (void* g : grads) cudaFree(g);
  for (int i = 0; i < sets; ++i) {
    cudaFree(fwd_out[i]);
    cudaFree(lse[i]);
  }
  cudaFree(ws);
  for (int i = 0; i < sets; ++i)
    for (void* p : {q[i], k[i], v[i], o[i]}) cudaFree(p);
  return 0;
}
