// GPU tests of the CUDA Monarch forward (CTest label "gpu"): every mode, dtype and head dim on
// many shapes (odd tiles, several tilings, batch and heads > 1, padded strides) against the fp64
// CPU reference on fresh random inputs. Outputs are poisoned with NaN first, so an unwritten
// element fails; padding between heads must stay untouched. Skips where there is no GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string>
#include <tuple>
#include <vector>

#include "../src/cuda/attention/flash.h"  // the dense kernel's launch limit (max_ctas)
#include "monarchrt/cuda.h"
#include "random_problem.h"
#include "test_util.h"

namespace monarchrt {
namespace {

using test::Tensor;

#define SKIP_WITHOUT_GPU()                                        \
  do {                                                            \
    if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA GPU"; \
  } while (0)

// A device copy of a host tensor (same strides).
struct DeviceTensor {
  void* ptr = nullptr;
  size_t bytes = 0;
  TensorView view;
  explicit DeviceTensor(const Tensor& host) : bytes(host.storage.size()), view(host.view) {
    EXPECT_EQ(cudaMalloc(&ptr, bytes), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(ptr, host.storage.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
    view.data = ptr;
    view.device = Device::kCUDA;
  }
  ~DeviceTensor() { cudaFree(ptr); }
  void copy_to(Tensor& host) const {
    EXPECT_EQ(cudaMemcpy(host.storage.data(), ptr, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
  }
};

struct Case {
  VideoGrid grid;
  MonarchLayout layout;
  int64_t B, H;
  int64_t causal_chunk;            // frames
  int64_t cache_frames;            // > 0: KV-cache call over this many frames
  int64_t sink, window;
};

const Case kCases[] = {
    {{2, 30, 52}, {1, 1, 1}, 1, 2, 0, 0, 0, 0},   // the real 30x52 tile
    {{3, 30, 52}, {1, 2, 1}, 1, 1, 1, 0, 0, 0},   // 15x52, block-causal
    {{3, 30, 52}, {3, 1, 1}, 1, 1, 0, 0, 0, 0},   // 90x52: three row groups per tile
    {{2, 3, 5}, {1, 1, 1}, 2, 3, 1, 0, 0, 0},     // 3x5, batch and heads
    {{4, 1, 1}, {1, 1, 1}, 1, 2, 2, 0, 0, 0},     // 1x1 tiles
    {{2, 52, 30}, {1, 1, 1}, 1, 1, 0, 0, 0, 0},   // b1 = 52 (two row groups), b2 = 30
    {{2, 15, 3}, {1, 1, 1}, 2, 1, 0, 0, 0, 0},    // 15x3
    {{3, 5, 7}, {1, 1, 1}, 1, 2, 1, 0, 0, 0},     // odd everything
    {{2, 4, 64}, {1, 2, 1}, 1, 1, 0, 0, 0, 0},    // b2 = 64, the widest for D = 128
    {{2, 6, 45}, {2, 3, 1}, 1, 1, 0, 0, 0, 0},    // f_tied 2, h_reduce 3: 4x45
    {{3, 6, 10}, {1, 1, 1}, 2, 2, 0, 9, 0, 0},    // KV cache, whole cache
    {{3, 6, 10}, {1, 1, 1}, 1, 2, 0, 12, 3, 6},   // KV cache, sink 3 + window 6
    {{2, 6, 10}, {2, 2, 1}, 1, 1, 0, 10, 2, 4},   // KV cache with f_tied 2
    {{3, 4, 10}, {1, 1, 1}, 1, 2, 0, 12, 3, 6},   // 40-token frames: sink + window key ranges
                                                  // (dense on Hopper: copied as 8-token boxes)
    {{3, 23, 7}, {1, 1, 1}, 2, 2, 1, 0, 0, 0},    // b1 = 23 (17..32: the stage-2 backward's two
                                                  // key groups), batch 2, block-causal
    {{3, 18, 6}, {1, 1, 1}, 1, 1, 0, 12, 3, 6},   // b1 = 18, KV cache, sink 3 + window 6
};

// Tiles wider than 64 columns (720p's 45 x 80): the two-pass path only at head dim 128.
const Case kWideCases[] = {
    {{2, 45, 80}, {1, 1, 1}, 1, 1, 0, 0, 0, 0},   // 45x80, two row groups
    {{3, 6, 100}, {1, 2, 1}, 1, 2, 1, 0, 0, 0},   // 3x100, block-causal
    {{3, 4, 128}, {1, 1, 1}, 1, 1, 0, 9, 0, 6},   // b2 = 128, KV cache with window
};

// The problem of a case (tests/random_problem.h), for the runners below.
test::Problem problem_of(const Case& c, int64_t D, int iters = 1) {
  test::Problem pr;
  AttentionParams& p = pr.params;
  p.grid = c.grid;
  p.layout = c.layout;
  p.causal_chunk_frames = c.causal_chunk;
  p.kv_cache = c.cache_frames > 0;
  p.sink_frames = c.sink;
  p.window_frames = c.window;
  p.num_iters = iters;
  pr.B = c.B;
  pr.H = c.H;
  pr.D = D;
  pr.kv_frames = c.cache_frames ? c.cache_frames : c.grid.T;
  return pr;
}

// Runs one problem on the GPU (fused kernel, or the two-pass kernels with a NaN-poisoned
// workspace so that reading a workspace row stage 1 never wrote shows up) and returns the
// relative L2 error against the fp64 reference. With `dense`, the same for cuda::dense_attention
// against ref::dense_attention. With `nan_unattended`, the k / v slots no query attends are NaN.
// With `allow_unsupported`, a fused call may answer kUnsupported (the fused path's narrower
// limits): then nothing may have been written, and the result is -1.
double run_problem(const test::Problem& pr, DType dtype, Rng& rng, int64_t pad, bool two_pass, bool dense = false,
                   bool nan_unattended = false, bool allow_unsupported = false) {
  const AttentionParams& p = pr.params;
  const int64_t Sq = pr.q_tokens(), Skv = pr.kv_tokens(), D = pr.D;
  Tensor q(dtype, pr.B, Sq, pr.H, D, pad), k(dtype, pr.B, Skv, pr.H, D, pad), v(dtype, pr.B, Skv, pr.H, D);
  q.fill_normal(rng, 1.5);
  k.fill_normal(rng, 1.5);
  v.fill_normal(rng);
  if (nan_unattended) test::poison_unattended_slots(pr, k, v);
  Tensor out(dtype, pr.B, Sq, pr.H, D, pad);
  std::memset(out.storage.data(), 0xff, out.storage.size());  // NaN everywhere, padding too
  Tensor want(DType::kF64, pr.B, Sq, pr.H, D);
  EXPECT_TRUE((dense ? ref::dense_attention(q.view, k.view, v.view, want.view, p)
                     : ref::monarch_attention(q.view, k.view, v.view, want.view, p)).ok());
  DeviceTensor dq(q), dk(k), dv(v), dout(out);
  void* ws = nullptr;
  size_t ws_bytes = 0;
  if (two_pass) {
    ws_bytes = cuda::workspace_size(dq.view, dk.view, dv.view, dout.view, p);
    EXPECT_GT(ws_bytes, 0u);
    EXPECT_EQ(cudaMalloc(&ws, ws_bytes), cudaSuccess);
    EXPECT_EQ(cudaMemset(ws, 0xff, ws_bytes), cudaSuccess);
  }
  const Status s = dense ? cuda::dense_attention(dq.view, dk.view, dv.view, dout.view, p, nullptr)
                         : cuda::monarch_attention(dq.view, dk.view, dv.view, dout.view, p, ws, ws_bytes, nullptr);
  const bool unsupported = allow_unsupported && !two_pass && s.code() == StatusCode::kUnsupported;
  EXPECT_TRUE(s.ok() || unsupported) << s.to_string();
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  dout.copy_to(out);
  cudaFree(ws);
  if (unsupported) {
    for (uint8_t byte : out.storage) {
      if (byte != 0xff) {
        ADD_FAILURE() << "an unsupported call wrote its output: " << s.to_string();
        break;
      }
    }
    return -1.0;
  }
  const std::vector<double> got = out.values();
  EXPECT_TRUE(test::all_finite(got)) << "unwritten or non-finite output";
  // Padding (elements outside the view) must still hold the poison bytes.
  std::vector<uint8_t> touched(out.storage.size(), 0);
  const int64_t es = dtype_size(dtype);
  for (int64_t b = 0; b < pr.B; ++b)
    for (int64_t s2 = 0; s2 < Sq; ++s2)
      for (int64_t h = 0; h < pr.H; ++h)
        for (int64_t d = 0; d < D; ++d)
          std::memset(&touched[out.view.offset(b, s2, h, d) * es], 1, es);
  for (size_t i = 0; i < touched.size(); ++i) {
    if (!touched[i] && out.storage[i] != 0xff) {
      ADD_FAILURE() << "byte " << i << " outside the output view was written";
      break;
    }
  }
  return test::relative_l2(got, want.values());
}

double run_case(const Case& c, DType dtype, int64_t D, Rng& rng, int64_t pad, bool two_pass,
                int iters = 1, bool dense = false) {
  return run_problem(problem_of(c, D, iters), dtype, rng, pad, two_pass, dense);
}

TEST(CudaForward, MatchesReferenceEveryModeDtypeAndHeadDim) {
  SKIP_WITHOUT_GPU();
  Rng rng(101);
  for (bool two_pass : {false, true}) {
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    for (int64_t D : {64, 128}) {
      for (const Case& c : kCases) {
        const double err = run_case(c, dtype, D, rng, 0, two_pass);
        // bf16 inputs and bf16 intermediates (aL, Y, P): ~4e-3 expected; fp16 about 8x tighter.
        EXPECT_LT(err, 1e-2) << "grid " << c.grid.to_string() << " layout " << c.layout.to_string()
                             << " D " << D << " " << dtype_name(dtype);
        std::printf("%s %-9s D=%3lld grid %-8s layout %s causal %lld cache %lld sink %lld window %lld: rel L2 %.2e\n",
                    two_pass ? "two-pass" : "fused   ", dtype_name(dtype), (long long)D, c.grid.to_string().c_str(),
                    c.layout.to_string().c_str(), (long long)c.causal_chunk,
                    (long long)c.cache_frames, (long long)c.sink, (long long)c.window, err);
      }
    }
  }
  }
}

// Several iterations (two-pass path only): stage 2's log-sum-exp, the proxy kernel and stage 1
// on the proxies, per extra iteration; against the fp64 reference with the same iterations.
TEST(CudaForward, SeveralIterations) {
  SKIP_WITHOUT_GPU();
  Rng rng(107);
  const Case cases[] = {kCases[0], kCases[1], kCases[2], kCases[3], kCases[7], kCases[11], kCases[12]};
  for (int iters : {2, 3}) {
    for (DType dtype : {DType::kBF16, DType::kF16}) {
      for (const Case& c : cases) {
        const double err = run_case(c, dtype, 128, rng, 0, true, iters);
        // Each iteration adds bf16 rounding of the proxies, aL and Y (H100: at most 8.6e-3).
        EXPECT_LT(err, 1e-2) << "iters " << iters << " grid " << c.grid.to_string() << " layout "
                             << c.layout.to_string() << " " << dtype_name(dtype);
        std::printf("iters %d %-9s grid %-8s layout %s causal %lld cache %lld: rel L2 %.2e\n", iters,
                    dtype_name(dtype), c.grid.to_string().c_str(), c.layout.to_string().c_str(),
                    (long long)c.causal_chunk, (long long)c.cache_frames, err);
      }
    }
  }
}

TEST(CudaForward, WideTilesOnTheTwoPassPath) {
  SKIP_WITHOUT_GPU();
  Rng rng(108);
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    for (const Case& c : kWideCases) {
      const double err = run_case(c, dtype, 128, rng, 0, true);
      EXPECT_LT(err, 1e-2) << "grid " << c.grid.to_string() << " " << dtype_name(dtype);
      std::printf("wide %-9s grid %-8s layout %s: rel L2 %.2e\n", dtype_name(dtype),
                  c.grid.to_string().c_str(), c.layout.to_string().c_str(), err);
    }
  }
}

// Dense attention (the engine's dense mode and cross-attention): every case above, both head
// dims and dtypes, padded strides; the kernel reads the attended cache frames as token ranges.
TEST(CudaDense, MatchesReferenceEveryMode) {
  SKIP_WITHOUT_GPU();
  Rng rng(111);
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    for (int64_t D : {64, 128}) {
      for (const Case* set : {std::begin(kCases), std::begin(kWideCases)}) {
        const Case* end = set == std::begin(kCases) ? std::end(kCases) : std::end(kWideCases);
        for (const Case* c = set; c != end; ++c) {
          const double err = run_case(*c, dtype, D, rng, c == set ? 8 : 0, false, 1, true);
          EXPECT_LT(err, 1e-2) << "grid " << c->grid.to_string() << " D " << D << " " << dtype_name(dtype);
          std::printf("dense %-9s D=%3lld grid %-8s causal %lld cache %lld sink %lld window %lld: rel L2 %.2e\n",
                      dtype_name(dtype), (long long)D, c->grid.to_string().c_str(), (long long)c->causal_chunk,
                      (long long)c->cache_frames, (long long)c->sink, (long long)c->window, err);
        }
      }
    }
  }
}

// A ring-buffer cache whose attended frames sit in two runs of slots (sink, then a window that
// wrapped), against the reference on the same ring; 21-token frames (cp.async copies) and
// 40-token frames (on Hopper, TMA copies of 8-token boxes where a key tile spans both runs).
TEST(CudaDense, RingBufferWindow) {
  SKIP_WITHOUT_GPU();
  Rng rng(112);
  for (const VideoGrid g : {VideoGrid{1, 3, 7}, VideoGrid{1, 4, 10}}) {
    AttentionParams p;
    p.grid = g;
    p.kv_cache = true;
    p.sink_frames = 1;
    p.window_frames = 3;
    p.cache_capacity_frames = 5;
    p.cache_frames = 9;  // frames 0 (slot 0) and 6, 7, 8 (slots 2, 3, 4)
    const int64_t D = 64, H = 2, per = g.tokens_per_frame();
    Tensor q(DType::kBF16, 2, per, H, D), k(DType::kBF16, 2, 5 * per, H, D), v(DType::kBF16, 2, 5 * per, H, D);
    q.fill_normal(rng, 1.5);
    k.fill_normal(rng, 1.5);
    v.fill_normal(rng);
    // Slot 1 is outside the window: NaN there must not reach the output.
    for (Tensor* t : {&k, &v}) {
      for (int64_t b = 0; b < 2; ++b) {
        for (int64_t tok = per; tok < 2 * per; ++tok) {
          for (int64_t hh = 0; hh < H; ++hh) {
            for (int64_t d = 0; d < D; ++d) t->set(b, tok, hh, d, NAN);
          }
        }
      }
    }
    Tensor out(DType::kBF16, 2, per, H, D), want(DType::kF64, 2, per, H, D);
    test::poison(out);
    ASSERT_TRUE(ref::dense_attention(q.view, k.view, v.view, want.view, p).ok());
    DeviceTensor dq(q), dk(k), dv(v), dout(out);
    const Status s = cuda::dense_attention(dq.view, dk.view, dv.view, dout.view, p, nullptr);
    ASSERT_TRUE(s.ok()) << s.to_string();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    dout.copy_to(out);
    const std::vector<double> got = out.values();
    EXPECT_TRUE(test::all_finite(got)) << g.to_string();
    EXPECT_LT(test::relative_l2(got, want.values()), 1e-2) << g.to_string();
  }
}

// The Hopper dense kernel with TMA copies (every key range a multiple of 8 tokens) is persistent:
// each CTA walks several tiles of 128 queries, carrying its copy pipeline and barrier phases from
// one to the next. With 1, 2 or 3 CTAs in all, the outputs must equal the default launch's bit
// for bit (a tile's arithmetic does not depend on the CTA that runs it) and every element must
// be written. Elsewhere (no Hopper, other key ranges) the limit does not apply and this holds
// trivially. Full sequence, block-causal, and a ring-buffer window in two key ranges.
TEST(CudaDense, PersistentScheduleGivesTheSameOutputs) {
  SKIP_WITHOUT_GPU();
  Rng rng(114);
  struct Run {
    VideoGrid grid;
    int64_t B, H, D, causal, kv_slots;  // kv_slots > 0: ring buffer, frames 0 and 6..8 attended
  };
  for (const Run& r : {Run{{2, 30, 52}, 1, 3, 128, 0, 0}, Run{{4, 6, 40}, 2, 2, 64, 1, 0},
                       Run{{1, 4, 10}, 2, 3, 128, 0, 5}}) {
    AttentionParams p;
    p.grid = r.grid;
    p.causal_chunk_frames = r.causal;
    if (r.kv_slots > 0) {
      p.kv_cache = true;
      p.sink_frames = 1;
      p.window_frames = 3;
      p.cache_capacity_frames = r.kv_slots;
      p.cache_frames = 9;
    }
    const int64_t Sq = r.grid.tokens(), Skv = r.kv_slots > 0 ? r.kv_slots * r.grid.tokens_per_frame() : Sq;
    Tensor q(DType::kBF16, r.B, Sq, r.H, r.D), k(DType::kBF16, r.B, Skv, r.H, r.D), v(DType::kBF16, r.B, Skv, r.H, r.D);
    q.fill_normal(rng, 1.5);
    k.fill_normal(rng, 1.5);
    v.fill_normal(rng);
    DeviceTensor dq(q), dk(k), dv(v);
    std::vector<uint8_t> first;
    for (int ctas : {0, 1, 2, 3}) {
      Tensor out(DType::kBF16, r.B, Sq, r.H, r.D);
      test::poison(out);
      DeviceTensor dout(out);
      cuda_detail::FlashArgs a{};
      ASSERT_TRUE(cuda_detail::dense_attention_args(dq.view, dk.view, dv.view, dout.view, p, &a).ok());
      a.max_ctas = ctas;
      const Status s = cuda_detail::flash_attention(a, nullptr);
      ASSERT_TRUE(s.ok()) << s.to_string();
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      dout.copy_to(out);
      if (ctas == 0) {
        EXPECT_TRUE(test::all_finite(out.values())) << r.grid.to_string();
        first = out.storage;
      } else {
        EXPECT_TRUE(out.storage == first) << r.grid.to_string() << " with " << ctas << " CTAs";
      }
    }
  }
}

TEST(CudaDense, RejectsWhatItCannotRun) {
  SKIP_WITHOUT_GPU();
  Rng rng(113);
  const VideoGrid g{2, 2, 3};
  AttentionParams p;
  p.grid = g;
  for (auto [dtype, D, what] : {std::tuple<DType, int64_t, const char*>{DType::kF32, 64, "bfloat16 or float16"},
                                {DType::kBF16, 32, "head dims 64 and 128"}}) {
    Tensor q(dtype, 1, g.tokens(), 1, D);
    q.fill_normal(rng);
    DeviceTensor dq(q), dk(q), dv(q), dout(q);
    const Status s = cuda::dense_attention(dq.view, dk.view, dv.view, dout.view, p, nullptr);
    EXPECT_EQ(s.code(), StatusCode::kUnsupported) << s.to_string();
    EXPECT_NE(s.message().find(what), std::string::npos) << s.to_string();
  }
}

// A KV-cache window's workspace holds rows for the attended key tiles only (sink and window), not
// for the frames between them: a long rolling video needs no more than a cache of its window.
TEST(CudaForward, WorkspaceCoversOnlyAttendedTiles) {
  SKIP_WITHOUT_GPU();
  const VideoGrid g{3, 6, 10};
  const int64_t per = g.tokens_per_frame(), H = 2, D = 64;
  auto bytes = [&](int64_t cache, int64_t sink, int64_t window) {
    AttentionParams p;
    p.grid = g;
    p.kv_cache = true;
    p.sink_frames = sink;
    p.window_frames = window;
    // Sizes only: no data is touched, so the views point at distinct addresses that hold nothing.
    auto at = [](int i) { return reinterpret_cast<void*>(uintptr_t{1} << (32 + i)); };
    const TensorView q = TensorView::contiguous(at(0), DType::kBF16, 1, g.tokens(), H, D, Device::kCUDA);
    const TensorView k = TensorView::contiguous(at(1), DType::kBF16, 1, cache * per, H, D, Device::kCUDA);
    const TensorView v = TensorView::contiguous(at(2), DType::kBF16, 1, cache * per, H, D, Device::kCUDA);
    const TensorView out = TensorView::contiguous(at(3), DType::kBF16, 1, g.tokens(), H, D, Device::kCUDA);
    return cuda::workspace_size(q, k, v, out, p);
  };
  const size_t window = bytes(60, 3, 6), whole = bytes(9, 0, 0);
  EXPECT_GT(window, 0u);
  EXPECT_EQ(window, whole);              // 3 sink + 6 window frames: as a 9-frame cache
  EXPECT_LT(window * 6, bytes(60, 0, 0));  // every frame of a 60-frame cache: 60 / 9 times more
}

TEST(CudaForward, PrepareLoadsEverythingAndIsIdempotent) {
  SKIP_WITHOUT_GPU();
  const Status first = cuda::prepare();
  EXPECT_TRUE(first.ok()) << first.to_string();
  EXPECT_TRUE(cuda::prepare().ok());
}

TEST(CudaForward, PaddedStrides) {
  SKIP_WITHOUT_GPU();
  Rng rng(102);
  const Case c{{2, 6, 20}, {1, 2, 2}, 2, 3, 1, 0, 0, 0};
  for (bool two_pass : {false, true})
    for (int64_t D : {64, 128}) EXPECT_LT(run_case(c, DType::kBF16, D, rng, 8, two_pass), 1e-2);
}

// A small set for compute-sanitizer (scripts/gpu_check.sh) on the fused path, which on Hopper is
// the cluster kernel at D = 128: the real 30x52 tile, a KV-cache call with b2 = 10 (owners
// without columns), the KV cache with f_tied 2.
TEST(CudaForward, SanitizerSet) {
  SKIP_WITHOUT_GPU();
  Rng rng(104);
  for (const Case& c : {kCases[0], kCases[10], kCases[12]}) {
    EXPECT_LT(run_case(c, DType::kBF16, 128, rng, 0, false), 1e-2) << "grid " << c.grid.to_string();
  }
}

// The single-CTA fused kernel where the cluster kernel normally runs (Hopper, D = 128, b1 <= 32):
// MONARCHRT_NO_CLUSTER=1 selects it, so it must stay right for those shapes too.
TEST(CudaForward, SingleCtaFusedKernelWithoutClusters) {
  SKIP_WITHOUT_GPU();
  Rng rng(105);
  setenv("MONARCHRT_NO_CLUSTER", "1", 1);
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    for (const Case& c : {kCases[0], kCases[1], kCases[3], kCases[9], kCases[12]}) {
      EXPECT_LT(run_case(c, dtype, 128, rng, 0, false), 1e-2)
          << "grid " << c.grid.to_string() << " " << dtype_name(dtype);
    }
  }
  unsetenv("MONARCHRT_NO_CLUSTER");
}

// The cluster kernel keeps a table of at most ClusterConfig::kMaxTiles = 512 attended key tiles
// in shared memory; longer keys take the single-CTA fused kernel. Both sides of that limit, with
// 1x1 tiles (one key tile per frame). First run on a GPU (an H200) in the sixteenth session.
TEST(CudaForward, FusedPathAtTheClusterKernelsTileLimit) {
  SKIP_WITHOUT_GPU();
  Rng rng(106);
  for (int64_t frames : {512, 513}) {
    const Case c{{frames, 1, 1}, {1, 1, 1}, 1, 1, 0, 0, 0, 0};
    EXPECT_LT(run_case(c, DType::kBF16, 128, rng, 0, false), 1e-2) << frames << " key tiles";
  }
}

// K and V shared by every head through a zero head stride (multi-query style views): the
// two-pass path must match the reference whichever stage-1 kernel takes such a view (on Hopper the
// one that copies rows with TMA, or the portable one where the copy engine's encoder refuses it).
TEST(CudaForward, KeysSharedAcrossHeadsByZeroStride) {
  SKIP_WITHOUT_GPU();
  Rng rng(103);
  const VideoGrid grid{3, 6, 20};
  const int64_t H = 3, D = 128, S = grid.tokens();
  Tensor q(DType::kBF16, 1, S, H, D), k(DType::kBF16, 1, S, 1, D), v(DType::kBF16, 1, S, 1, D);
  Tensor out(DType::kBF16, 1, S, H, D);
  q.fill_normal(rng, 1.5);
  k.fill_normal(rng, 1.5);
  v.fill_normal(rng);
  for (Tensor* t : {&k, &v}) {
    t->view.shape[2] = H;
    t->view.stride[2] = 0;
  }
  AttentionParams p;
  p.grid = grid;
  Tensor want(DType::kF64, 1, S, H, D);
  ASSERT_TRUE(ref::monarch_attention(q.view, k.view, v.view, want.view, p).ok());
  DeviceTensor dq(q), dk(k), dv(v), dout(out);
  const size_t ws_bytes = cuda::workspace_size(dq.view, dk.view, dv.view, dout.view, p);
  ASSERT_GT(ws_bytes, 0u);
  void* ws = nullptr;
  ASSERT_EQ(cudaMalloc(&ws, ws_bytes), cudaSuccess);
  const Status s = cuda::monarch_attention(dq.view, dk.view, dv.view, dout.view, p, ws, ws_bytes, nullptr);
  EXPECT_TRUE(s.ok()) << s.to_string();
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  cudaFree(ws);
  dout.copy_to(out);
  const std::vector<double> got = out.values();
  EXPECT_TRUE(test::all_finite(got));
  EXPECT_LT(test::relative_l2(got, want.values()), 1e-2);
}

TEST(CudaForward, WideTilesForHeadDim64) {
  SKIP_WITHOUT_GPU();
  Rng rng(103);
  const Case c{{2, 2, 100}, {1, 1, 1}, 1, 2, 0, 0, 0, 0};
  for (bool two_pass : {false, true}) EXPECT_LT(run_case(c, DType::kF16, 64, rng, 0, two_pass), 1e-2);
}

TEST(CudaForward, RejectsWhatItCannotRun) {
  SKIP_WITHOUT_GPU();
  Rng rng(104);
  const Case c{{2, 3, 5}, {1, 1, 1}, 1, 1, 0, 0, 0, 0};
  Tensor q(DType::kBF16, 1, 30, 1, 64);
  q.fill_normal(rng);
  DeviceTensor dq(q), dk(q), dv(q), dout(q);
  AttentionParams p;
  p.grid = c.grid;
  p.num_iters = 2;
  Status s = cuda::monarch_attention(dq.view, dk.view, dv.view, dout.view, p, nullptr, 0, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kUnsupported);
  EXPECT_NE(s.message().find("num_iters"), std::string::npos);
  p.num_iters = 1;
  // Host tensors on the CUDA path.
  s = cuda::monarch_attention(q.view, q.view, q.view, q.view, p, nullptr, 0, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  // Layout that does not divide the grid: the same error as the CPU path.
  p.layout.h_reduce = 2;
  s = cuda::monarch_attention(dq.view, dk.view, dv.view, dout.view, p, nullptr, 0, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("layout.h_reduce"), std::string::npos);
  p.layout.h_reduce = 1;
  // Head dim 32 and wide tiles are unsupported, with the reason.
  Tensor q32(DType::kBF16, 1, 30, 1, 32);
  DeviceTensor d32(q32);
  s = cuda::monarch_attention(d32.view, d32.view, d32.view, d32.view, p, nullptr, 0, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kUnsupported);
  EXPECT_NE(s.message().find("head dim"), std::string::npos);
  // A workspace smaller than workspace_size() is an error, not a silent fallback.
  const size_t need = cuda::workspace_size(dq.view, dk.view, dv.view, dout.view, p);
  EXPECT_GT(need, 0u);
  s = cuda::monarch_attention(dq.view, dk.view, dv.view, dout.view, p, dq.ptr, need - 1, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("workspace"), std::string::npos);
  Tensor qw(DType::kBF16, 1, 200, 1, 128);
  DeviceTensor dw(qw);
  p.grid = VideoGrid{2, 1, 100};
  s = cuda::monarch_attention(dw.view, dw.view, dw.view, dw.view, p, nullptr, 0, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kUnsupported);  // fused path: b2 <= 64 at head dim 128
  EXPECT_NE(s.message().find("b2"), std::string::npos);
  EXPECT_TRUE(cuda::can_implement(dw.view, dw.view, dw.view, dw.view, p).ok());  // two-pass can
  // b2 beyond 128 is beyond every path.
  Tensor qx(DType::kBF16, 1, 2 * 136, 1, 128);
  DeviceTensor dx(qx);
  p.grid = VideoGrid{2, 1, 136};
  s = cuda::can_implement(dx.view, dx.view, dx.view, dx.view, p);
  EXPECT_EQ(s.code(), StatusCode::kUnsupported);
  EXPECT_NE(s.message().find("b2"), std::string::npos);
}

// Autoregressive run on a ring-buffer KV cache: each step writes the chunk's K/V into its slots
// and attends in one call (monarch_attention_kv); compared with the fp64 reference over the
// cache laid out in order. Slots never written hold NaN, so reading one fails the test.
TEST(CudaForward, RingBufferKvCacheInOneCall) {
  SKIP_WITHOUT_GPU();
  Rng rng(106);
  const VideoGrid chunk{3, 6, 10};
  const int64_t frames = 15, capacity = 9, sink = 3, window = 6, B = 1, H = 2, D = 128;
  const int64_t per_frame = chunk.tokens_per_frame();
  Tensor q(DType::kBF16, B, frames * per_frame, H, D), k = q, v = q;
  q.fill_normal(rng, 1.5);
  k.fill_normal(rng, 1.5);
  v.fill_normal(rng);
  Tensor ring(DType::kBF16, B, capacity * per_frame, H, D);
  std::memset(ring.storage.data(), 0xff, ring.storage.size());
  for (bool two_pass : {false, true}) {
    DeviceTensor rk(ring), rv(ring);
    for (int64_t f0 = 0; f0 < frames; f0 += chunk.T) {
      AttentionParams p;
      p.grid = chunk;
      p.kv_cache = true;
      p.sink_frames = sink;
      p.window_frames = window;
      p.cache_capacity_frames = capacity;
      p.cache_frames = f0 + chunk.T;
      Tensor qc(DType::kBF16, B, chunk.tokens(), H, D), kc = qc, vc = qc, out = qc;
      for (int64_t s = 0; s < chunk.tokens(); ++s)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t d = 0; d < D; ++d) {
            qc.set(0, s, h, d, q.at(0, f0 * per_frame + s, h, d));
            kc.set(0, s, h, d, k.at(0, f0 * per_frame + s, h, d));
            vc.set(0, s, h, d, v.at(0, f0 * per_frame + s, h, d));
          }
      DeviceTensor dq(qc), dk(kc), dv(vc), dout(out);
      void* ws = nullptr;
      size_t bytes = 0;
      if (two_pass) {
        bytes = cuda::workspace_size(dq.view, rk.view, rv.view, dout.view, p);
        ASSERT_EQ(cudaMalloc(&ws, bytes), cudaSuccess);
      }
      const Status s = cuda::monarch_attention_kv(dq.view, dk.view, dv.view, rk.view, rv.view,
                                                  dout.view, p, ws, bytes, nullptr);
      ASSERT_TRUE(s.ok()) << s.to_string();
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      cudaFree(ws);
      dout.copy_to(out);
      // Reference: the same window over frames [0, f0 + T) in order.
      AttentionParams lp = p;
      lp.cache_capacity_frames = lp.cache_frames = 0;
      Tensor kl(DType::kBF16, B, (f0 + chunk.T) * per_frame, H, D), vl = kl;
      for (int64_t s2 = 0; s2 < kl.view.tokens(); ++s2)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t d = 0; d < D; ++d) {
            kl.set(0, s2, h, d, k.at(0, s2, h, d));
            vl.set(0, s2, h, d, v.at(0, s2, h, d));
          }
      Tensor want(DType::kF64, B, chunk.tokens(), H, D);
      ASSERT_TRUE(ref::monarch_attention(qc.view, kl.view, vl.view, want.view, lp).ok());
      const std::vector<double> got = out.values();
      ASSERT_TRUE(test::all_finite(got)) << "a slot never written was read, frame " << f0;
      EXPECT_LT(test::relative_l2(got, want.values()), 1e-2) << "chunk at frame " << f0;
    }
  }
}

// Backward: dq, dk, dv of the CUDA kernels against the fp64 reference backward on the same
// (rounded) inputs, with NaN-poisoned gradients and workspace, so that an element or workspace
// row never written fails. Runs both entry points: without the forward's statistics, and with
// the out and log-sum-exp of cuda::monarch_attention_with_lse (its log-sum-exp checked against
// the CPU path's on the same inputs). Keys that no query attends must get exactly zero; with
// `nan_unattended` their k / v slots are NaN. Returns "a / b": the largest relative L2 error of
// dq, dk, dv without (a) and with (b) the forward's statistics.
std::string run_backward_problem(const test::Problem& pr, DType dtype, Rng& rng, int64_t pad,
                                 bool nan_unattended = false) {
  const AttentionParams& p = pr.params;
  const int64_t Sq = pr.q_tokens(), Skv = pr.kv_tokens(), D = pr.D;
  Tensor q(dtype, pr.B, Sq, pr.H, D, pad), k(dtype, pr.B, Skv, pr.H, D, pad), v(dtype, pr.B, Skv, pr.H, D);
  Tensor go(dtype, pr.B, Sq, pr.H, D, pad);
  q.fill_normal(rng, 1.5);
  k.fill_normal(rng, 1.5);
  v.fill_normal(rng);
  go.fill_normal(rng);
  if (nan_unattended) test::poison_unattended_slots(pr, k, v);
  Tensor wq(DType::kF64, pr.B, Sq, pr.H, D), wk(DType::kF64, pr.B, Skv, pr.H, D), wv = wk;
  EXPECT_TRUE(ref::monarch_attention_backward(q.view, k.view, v.view, go.view, wq.view, wk.view, wv.view, p).ok());
  // The forward's statistics for the second run: out and lse on the GPU, lse on the CPU.
  const int64_t n_lse = pr.B * pr.H * Sq;
  Tensor out(dtype, pr.B, Sq, pr.H, D, pad), out_cpu(DType::kF32, pr.B, Sq, pr.H, D);
  std::vector<float> lse_cpu(n_lse), lse_gpu(n_lse);
  EXPECT_TRUE(cpu::monarch_attention_with_lse(q.view, k.view, v.view, out_cpu.view, lse_cpu.data(), p).ok());
  DeviceTensor dq(q), dk(k), dv(v), dgo(go), dout(out);
  float* dlse = nullptr;
  EXPECT_EQ(cudaMalloc(&dlse, n_lse * sizeof(float)), cudaSuccess);
  EXPECT_EQ(cudaMemset(dlse, 0xff, n_lse * sizeof(float)), cudaSuccess);
  {
    const size_t fbytes = cuda::workspace_size(dq.view, dk.view, dv.view, dout.view, p);
    void* fws = nullptr;
    EXPECT_EQ(cudaMalloc(&fws, fbytes), cudaSuccess);
    const Status s = cuda::monarch_attention_with_lse(dq.view, dk.view, dv.view, dout.view, dlse, p, fws, fbytes,
                                                      nullptr);
    EXPECT_TRUE(s.ok()) << s.to_string();
    EXPECT_EQ(cudaMemcpy(lse_gpu.data(), dlse, n_lse * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
    cudaFree(fws);
  }
  EXPECT_TRUE(test::all_finite(std::vector<double>(lse_gpu.begin(), lse_gpu.end()))) << "lse: unwritten element";
  EXPECT_LT(test::relative_l2(std::vector<double>(lse_gpu.begin(), lse_gpu.end()),
                              std::vector<double>(lse_cpu.begin(), lse_cpu.end())),
            1e-2)
      << "lse";
  // With the statistics, Delta = dout . out uses the output rounded to the input dtype (as in
  // FlashAttention), not the fp32 sum over the virtual keys: where a query attends only a few
  // keys, du = L (dout . Y - Delta) cancels and that rounding shows (the 4 x 1 x 1 case, 2 keys
  // for the first queries: 3.0e-3 without, 1.08e-2 with, bf16 at D = 128 on an H200). Such tiny
  // problems get twice the tolerance on that path.
  const int64_t min_keys = (p.causal_chunk_frames > 0 ? p.causal_chunk_frames : p.grid.T) * p.grid.tokens_per_frame();
  double worst[2] = {0.0, 0.0};
  for (bool stats : {false, true}) {
    Tensor gq(dtype, pr.B, Sq, pr.H, D, pad), gk(dtype, pr.B, Skv, pr.H, D, pad), gv(dtype, pr.B, Skv, pr.H, D);
    for (Tensor* t : {&gq, &gk, &gv}) std::memset(t->storage.data(), 0xff, t->storage.size());
    DeviceTensor dgq(gq), dgk(gk), dgv(gv);
    const size_t bytes =
        cuda::backward_workspace_size(dq.view, dk.view, dv.view, dgo.view, dgq.view, dgk.view, dgv.view, p);
    EXPECT_GT(bytes, 0u);
    void* ws = nullptr;
    EXPECT_EQ(cudaMalloc(&ws, bytes), cudaSuccess);
    EXPECT_EQ(cudaMemset(ws, 0xff, bytes), cudaSuccess);
    const Status s =
        stats ? cuda::monarch_attention_backward(dq.view, dk.view, dv.view, dout.view, dlse, dgo.view, dgq.view,
                                                 dgk.view, dgv.view, p, ws, bytes, nullptr)
              : cuda::monarch_attention_backward(dq.view, dk.view, dv.view, dgo.view, dgq.view, dgk.view, dgv.view,
                                                 p, ws, bytes, nullptr);
    EXPECT_TRUE(s.ok()) << s.to_string();
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    cudaFree(ws);
    dgq.copy_to(gq);
    dgk.copy_to(gk);
    dgv.copy_to(gv);
    const Tensor* got[3] = {&gq, &gk, &gv};
    const Tensor* want[3] = {&wq, &wk, &wv};
    const char* names[3] = {"dq", "dk", "dv"};
    for (int i = 0; i < 3; ++i) {
      const std::vector<double> g = got[i]->values(), w = want[i]->values();
      EXPECT_TRUE(test::all_finite(g)) << names[i] << ": unwritten or non-finite element";
      // Keys no query attends get exactly zero (the reference's zeros are exact).
      for (size_t e = 0; e < w.size(); ++e) {
        if (w[e] == 0.0 && g[e] != 0.0) {
          ADD_FAILURE() << names[i] << " element " << e << " = " << g[e] << ": the reference gives exactly 0";
          break;
        }
      }
      const double err = test::relative_l2(g, w);
      EXPECT_LT(err, stats && min_keys < 8 ? 2e-2 : 1e-2) << names[i] << (stats ? " (with the forward's out and lse)" : "");
      worst[stats] = std::max(worst[stats], err);
    }
  }
  cudaFree(dlse);
  char text[64];
  std::snprintf(text, sizeof(text), "%.2e / %.2e", worst[0], worst[1]);
  return text;
}

std::string run_backward_case(const Case& c, DType dtype, int64_t D, Rng& rng, int64_t pad) {
  return run_backward_problem(problem_of(c, D), dtype, rng, pad);
}

TEST(CudaBackward, MatchesReferenceEveryModeDtypeAndHeadDim) {
  SKIP_WITHOUT_GPU();
  Rng rng(201);
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    for (int64_t D : {64, 128}) {
      for (const Case& c : kCases) {
        const std::string err = run_backward_case(c, dtype, D, rng, D == 64 ? 8 : 0);
        std::printf("backward %-9s D=%3lld grid %-8s layout %s causal %lld cache %lld sink %lld window %lld: "
                    "max rel L2 (plain / with out, lse) %s\n",
                    dtype_name(dtype), (long long)D, c.grid.to_string().c_str(), c.layout.to_string().c_str(),
                    (long long)c.causal_chunk, (long long)c.cache_frames, (long long)c.sink, (long long)c.window,
                    err.c_str());
      }
    }
  }
  // Tiles taller than 128 rows (the stage-2 kernel's largest configuration, 16 warps).
  const Case tall{{2, 150, 3}, {1, 1, 1}, 1, 1, 0, 0, 0, 0};
  for (int64_t D : {64, 128}) {
    std::printf("backward tall 150x3 D=%lld: max rel L2 (plain / with out, lse) %s\n", (long long)D,
                run_backward_case(tall, DType::kBF16, D, rng, 0).c_str());
  }
  // Tiles wider than 64 columns: head dim 64, and head dim 128 (the wide configuration, 720p's
  // 45 x 80 among them).
  const Case wide{{2, 2, 100}, {1, 1, 1}, 1, 2, 1, 0, 0, 0};
  std::printf("backward wide 2x100 D=64: max rel L2 (plain / with out, lse) %s\n",
              run_backward_case(wide, DType::kBF16, 64, rng, 0).c_str());
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    for (const Case& c : kWideCases) {
      std::printf("backward wide %-9s D=128 grid %-8s: max rel L2 (plain / with out, lse) %s\n", dtype_name(dtype),
                  c.grid.to_string().c_str(), run_backward_case(c, dtype, 128, rng, 0).c_str());
    }
  }
}

// A small set for compute-sanitizer (scripts/gpu_check.sh): block-causal, odd tiles, KV window,
// the stage-2 kernel with two key groups (b1 = 23, 18).
TEST(CudaBackward, SanitizerSet) {
  SKIP_WITHOUT_GPU();
  Rng rng(202);
  for (int64_t D : {64, 128})
    for (const Case& c : {kCases[3], kCases[7], kCases[11], kCases[14], kCases[15]}) {
      run_backward_case(c, DType::kBF16, D, rng, 0);
    }
}

// Stage 1 with the key tiles of each (query tile, row) split between several CTAs, as the
// launch does for long keys (fwd.cu, stage1_key_parts; the cases above are too short for it):
// forced through MONARCHRT_STAGE1_KEY_PARTS, up to more parts than some query tiles have tiles
// (empty parts), in the forward, with two iterations, and in the backward's recompute.
TEST(CudaForward, KeyTilesSplitBetweenStage1Ctas) {
  SKIP_WITHOUT_GPU();
  Rng rng(109);
  for (const char* parts : {"2", "3", "7"}) {
    setenv("MONARCHRT_STAGE1_KEY_PARTS", parts, 1);
    for (const Case& c : kCases) {
      const double err = run_case(c, DType::kBF16, 128, rng, 0, true);
      EXPECT_LT(err, 1e-2) << parts << " parts, grid " << c.grid.to_string() << " layout " << c.layout.to_string();
    }
    for (const Case& c : {kCases[1], kCases[11]}) {
      EXPECT_LT(run_case(c, DType::kBF16, 128, rng, 0, true, 2), 1e-2) << parts << " parts, 2 iterations";
      std::printf("%s parts: backward grid %s: max rel L2 %s\n", parts, c.grid.to_string().c_str(),
                  run_backward_case(c, DType::kBF16, 128, rng, 0).c_str());
    }
  }
  unsetenv("MONARCHRT_STAGE1_KEY_PARTS");
}

// The kernels' general key-tile loops (tile_allowed per step), which run for plans whose attended
// tiles are not a prefix of the numbering (more than one gap; today's planner makes none):
// forced through MONARCHRT_KEY_TILE_SEARCH, forward (with 1 and 3 key parts, 2 iterations) and
// backward, every mode of the test cases.
TEST(CudaForward, GeneralKeyTileLoops) {
  SKIP_WITHOUT_GPU();
  Rng rng(113);
  setenv("MONARCHRT_KEY_TILE_SEARCH", "1", 1);
  for (const char* parts : {"1", "3"}) {
    setenv("MONARCHRT_STAGE1_KEY_PARTS", parts, 1);
    for (const Case& c : kCases) {
      const double err = run_case(c, DType::kBF16, 128, rng, 0, true);
      EXPECT_LT(err, 1e-2) << parts << " parts, grid " << c.grid.to_string() << " layout " << c.layout.to_string();
    }
  }
  unsetenv("MONARCHRT_STAGE1_KEY_PARTS");
  EXPECT_LT(run_case(kCases[11], DType::kBF16, 128, rng, 0, true, 2), 1e-2) << "2 iterations";
  for (const Case& c : {kCases[1], kCases[3], kCases[11], kCases[14]}) {
    std::printf("general loops: backward grid %s: max rel L2 %s\n", c.grid.to_string().c_str(),
                run_backward_case(c, DType::kBF16, 128, rng, 0).c_str());
  }
  unsetenv("MONARCHRT_KEY_TILE_SEARCH");
}

TEST(CudaBackward, RejectsWhatItCannotRun) {
  SKIP_WITHOUT_GPU();
  Tensor t(DType::kBF16, 1, 272, 1, 128);
  DeviceTensor d(t), g1(t), g2(t), g3(t);
  AttentionParams p;
  p.grid = VideoGrid{2, 1, 136};  // b2 = 136 > 128
  Status s = cuda::monarch_attention_backward(d.view, d.view, d.view, d.view, g1.view, g2.view, g3.view, p,
                                              nullptr, 0, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kUnsupported);
  EXPECT_NE(s.message().find("b2"), std::string::npos);
  p.grid = VideoGrid{2, 8, 17};
  p.num_iters = 2;
  s = cuda::monarch_attention_backward(d.view, d.view, d.view, d.view, g1.view, g2.view, g3.view, p, nullptr, 0,
                                       nullptr);
  EXPECT_EQ(s.code(), StatusCode::kUnsupported);
  EXPECT_NE(s.message().find("num_iters"), std::string::npos);
  p.num_iters = 1;
  const size_t need = cuda::backward_workspace_size(d.view, d.view, d.view, d.view, g1.view, g2.view, g3.view, p);
  EXPECT_GT(need, 0u);
  s = cuda::monarch_attention_backward(d.view, d.view, d.view, d.view, g1.view, g2.view, g3.view, p, d.ptr,
                                       need - 1, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("workspace"), std::string::npos);
  // Gradients that alias each other are rejected before anything runs.
  s = cuda::monarch_attention_backward(d.view, d.view, d.view, d.view, g1.view, g1.view, g3.view, p, nullptr, 0,
                                       nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  // The forward's statistics: out must have q's shape, lse must be given.
  float* lse = nullptr;
  ASSERT_EQ(cudaMalloc(&lse, 272 * sizeof(float)), cudaSuccess);
  Tensor t2(DType::kBF16, 1, 136, 1, 128);
  DeviceTensor half(t2);
  s = cuda::monarch_attention_backward(d.view, d.view, d.view, half.view, lse, d.view, g1.view, g2.view, g3.view,
                                       p, d.ptr, need, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("out"), std::string::npos);
  s = cuda::monarch_attention_backward(d.view, d.view, d.view, d.view, nullptr, d.view, g1.view, g2.view, g3.view,
                                       p, d.ptr, need, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("lse"), std::string::npos);
  // The forward writes the log-sum-exp on the two-pass path only.
  s = cuda::monarch_attention_with_lse(d.view, d.view, d.view, g1.view, lse, p, nullptr, 0, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kUnsupported);
  EXPECT_NE(s.message().find("two-pass"), std::string::npos);
  s = cuda::monarch_attention_with_lse(d.view, d.view, d.view, g1.view, nullptr, p, d.ptr, need, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  cudaFree(lse);
}

TEST(CudaForward, CapturableInAGraphAndDeterministic) {
  SKIP_WITHOUT_GPU();
  Rng rng(105);
  const VideoGrid grid{3, 30, 52};
  Tensor q(DType::kBF16, 1, grid.tokens(), 2, 128);
  q.fill_normal(rng);
  Tensor k = q, v = q;
  k.fill_normal(rng);
  v.fill_normal(rng);
  DeviceTensor dq(q), dk(k), dv(v), d1(q), d2(q);
  AttentionParams p;
  p.grid = grid;
  p.causal_chunk_frames = 1;
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  ASSERT_TRUE(cuda::monarch_attention(dq.view, dk.view, dv.view, d1.view, p, nullptr, 0, stream).ok());
  cudaGraph_t graph;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  ASSERT_TRUE(cuda::monarch_attention(dq.view, dk.view, dv.view, d2.view, p, nullptr, 0, stream).ok());
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  Tensor o1 = q, o2 = q;
  d1.copy_to(o1);
  d2.copy_to(o2);
  EXPECT_EQ(o1.storage, o2.storage);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

// bf16 error against the scale of the logits, on the real 30 x 52 tiles: the two-pass and the
// fused forward at the default scale below 4.5e-3, and the backward at 3 times it within
// run_backward_problem's 1e-2. Stage 1 rounds the unnormalized probabilities exp(z - max), whose
// largest is exactly 1, and its products are divided by the row sum in fp32 (by the cluster kernel's
// stage-2 warps there); rounding R = exp(z - lse)
// instead (the two-pass kernels before the thirty-second session, the fused ones before the
// thirty-third) gave 5.4-5.7e-3 (fused 5.3-5.7e-3) and 1.2-1.5e-2 here, against 3.0-3.1e-3 (fused
// 3.0-3.4e-3) and 7.1-8.1e-3 now (H200; docs/numerics.md).
TEST(CudaPrecision, SharpLogits) {
  SKIP_WITHOUT_GPU();
  for (const Case& c : {Case{{2, 30, 52}, {1, 1, 1}, 1, 2, 0, 0, 0, 0}, Case{{3, 30, 52}, {1, 1, 1}, 1, 1, 1, 0, 0, 0}}) {
    for (double factor : {1.0, 3.0}) {
      Rng rng(7);
      test::Problem pr = problem_of(c, 128);
      pr.params.scale = factor / std::sqrt(128.0);
      const double forward = run_problem(pr, DType::kBF16, rng, 0, true);
      const std::string backward = run_backward_problem(pr, DType::kBF16, rng, 0);
      const double fused = run_problem(pr, DType::kBF16, rng, 0, false);
      if (factor == 1.0) {
        EXPECT_LT(forward, 4.5e-3) << c.grid.to_string();
        EXPECT_LT(fused, 4.5e-3) << c.grid.to_string();
      }
      std::printf("grid %s causal %lld, scale %.0f / sqrt(D): forward %.2e, fused %.2e, backward (plain / with out, lse) %s\n",
                  c.grid.to_string().c_str(), (long long)c.causal_chunk, factor, forward, fused, backward.c_str());
    }
  }
}

// Random problems (tests/random_problem.h: tilings, modes, ring buffers that have wrapped,
// windows, batch, heads, scales, iterations, odd sizes up to 160 tokens per frame) through the
// two-pass and fused forward, the dense kernel and both backward entry points, against the fp64
// reference; in KV-cache mode the unattended k / v slots are often NaN. The fused path may
// decline a problem outside its limits (then it must write nothing). MONARCHRT_TEST_SEED picks
// other problems (scripts/gpu_check.sh runs several seeds).
TEST(CudaRandom, ProblemsMatchReference) {
  SKIP_WITHOUT_GPU();
  const uint64_t seed = test::test_seed(20261130);
  Rng rng(seed);
  test::ProblemLimits lim;
  lim.max_frames = 4;
  lim.max_past_frames = 4;
  lim.max_tile_rows = 160;
  lim.max_tile_cols = 128;
  lim.max_frame_tokens = 160;
  lim.head_dims = {64, 128};
  lim.max_iters = 3;
  int declined = 0;
  for (int i = 0; i < 24; ++i) {
    const test::Problem pr = test::random_problem(rng, lim);
    const DType dtype = test::pick(rng, 0, 1) ? DType::kBF16 : DType::kF16;
    const int64_t pad = 8 * test::pick(rng, 0, 1);
    const bool nan = pr.params.kv_cache && test::pick(rng, 0, 1);
    SCOPED_TRACE("problem " + std::to_string(i) + " of seed " + std::to_string(seed) + ": " + pr.to_string() + " " +
                 dtype_name(dtype) + (pad ? " padded" : "") + (nan ? ", NaN in unattended slots" : ""));
    // bf16 inputs and intermediates: about 4e-3 (fp16 tighter); several iterations add a little.
    const double two_pass = run_problem(pr, dtype, rng, pad, true, false, nan);
    EXPECT_LT(two_pass, 1e-2) << "two-pass";
    const double fused = run_problem(pr, dtype, rng, pad, false, false, nan, true);
    EXPECT_LT(fused, 1e-2) << "fused";
    declined += fused < 0;
    const double dense = run_problem(pr, dtype, rng, pad, false, true, nan);
    EXPECT_LT(dense, 1e-2) << "dense";
    const std::string backward =
        pr.params.num_iters == 1 ? run_backward_problem(pr, dtype, rng, pad, nan) : std::string("-");
    std::printf("%2d %s %s: two-pass %.2e, fused %s, dense %.2e, backward (plain / with out, lse) %s\n", i,
                pr.to_string().c_str(), dtype_name(dtype), two_pass,
                fused < 0 ? "declined" : std::to_string(fused).c_str(), dense, backward.c_str());
    if (HasFailure()) return;
  }
  std::printf("[ problems ] 24, the fused path declined %d\n", declined);
}

// Parameters drawn around a valid problem (perturbed_params in tests/random_problem.h; the CPU
// entry points in AttentionErrors.RandomParametersAreRefusedOrRun) through the two-pass and the
// fused forward, the dense kernel and the Monarch backward: each must refuse what check_attention
// refuses, with its message, and either run what it accepts (finite results; the forwards within
// 1e-2 of the fp64 reference) or decline it with kUnsupported; whatever it does not run, it must
// not write (output or gradients).
TEST(CudaErrors, RandomParametersAreRefusedOrRun) {
  SKIP_WITHOUT_GPU();
  Rng rng(test::test_seed(43));
  int ran = 0, refused = 0, declined = 0;
  for (int i = 0; i < 40; ++i) {
    const test::PerturbedParams pp = test::perturbed_params(rng);
    const AttentionParams& p = pp.params;
    Tensor q(DType::kBF16, 2, 48, 2, 64), k(DType::kBF16, 2, pp.kv_tokens, 2, 64), v = k;
    q.fill_normal(rng);
    k.fill_normal(rng);
    v.fill_normal(rng);
    Tensor sentinel_q = q, sentinel_k = k;
    std::memset(sentinel_q.storage.data(), 0xa5, sentinel_q.storage.size());
    std::memset(sentinel_k.storage.data(), 0xa5, sentinel_k.storage.size());
    DeviceTensor dq(q), dk(k), dv(v), dgrad(q);  // dgrad: the backward's upstream gradient
    const char* names[] = {"two-pass", "fused", "dense", "backward"};
    for (int path = 0; path < 4; ++path) {
      SCOPED_TRACE(pp.to_string() + " via " + names[path]);
      const bool monarch = path != 2;
      DeviceTensor out(sentinel_q), gq(sentinel_q), gk(sentinel_k), gv(sentinel_k);
      Status check = check_attention(dq.view, dk.view, dv.view, out.view, p, monarch);
      if (path == 3) check = test::monarch_backward_verdict(check, p);
      size_t ws_bytes = 0;
      if (path == 0) ws_bytes = cuda::workspace_size(dq.view, dk.view, dv.view, out.view, p);
      if (path == 3) {
        ws_bytes = cuda::backward_workspace_size(dq.view, dk.view, dv.view, dgrad.view, gq.view, gk.view, gv.view, p);
      }
      if (path == 0 && ws_bytes == 0) continue;  // the same call as the fused path's
      void* ws = nullptr;
      if (ws_bytes) {
        EXPECT_EQ(cudaMalloc(&ws, ws_bytes), cudaSuccess);
      }
      const Status s =
          path == 2   ? cuda::dense_attention(dq.view, dk.view, dv.view, out.view, p, nullptr)
          : path == 3 ? cuda::monarch_attention_backward(dq.view, dk.view, dv.view, dgrad.view, gq.view, gk.view,
                                                         gv.view, p, ws, ws_bytes, nullptr)
                      : cuda::monarch_attention(dq.view, dk.view, dv.view, out.view, p, ws, ws_bytes, nullptr);
      EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      cudaFree(ws);
      Tensor got_out = sentinel_q, got_q = sentinel_q, got_k = sentinel_k, got_v = sentinel_k;
      out.copy_to(got_out);
      gq.copy_to(got_q);
      gk.copy_to(got_k);
      gv.copy_to(got_v);
      const bool untouched = got_out.storage == sentinel_q.storage && got_q.storage == sentinel_q.storage &&
                             got_k.storage == sentinel_k.storage && got_v.storage == sentinel_k.storage;
      if (!check.ok()) {
        EXPECT_EQ(s.to_string(), check.to_string());
        EXPECT_TRUE(untouched) << "written despite the error";
        ++refused;
      } else if (!s.ok()) {
        EXPECT_EQ(s.code(), StatusCode::kUnsupported) << s.to_string();
        EXPECT_TRUE(untouched) << "written although declined: " << s.to_string();
        ++declined;
      } else if (path == 3) {
        EXPECT_TRUE(test::all_finite(got_q.values()) && test::all_finite(got_k.values()) &&
                    test::all_finite(got_v.values()));
        ++ran;
      } else {
        Tensor want(DType::kF64, 2, 48, 2, 64);
        EXPECT_TRUE((monarch ? ref::monarch_attention(q.view, k.view, v.view, want.view, p)
                             : ref::dense_attention(q.view, k.view, v.view, want.view, p)).ok());
        const std::vector<double> got = got_out.values();
        EXPECT_TRUE(test::all_finite(got));
        EXPECT_LT(test::relative_l2(got, want.values()), 1e-2);
        ++ran;
      }
    }
  }
  std::printf("[ calls    ] %d ran, %d refused, %d declined\n", ran, refused, declined);
  EXPECT_GT(ran, 0);
  EXPECT_GT(refused, 0);
}

}  // namespace
}  // namespace monarchrt
