// GPU tests of the CUDA DiT (CTest label "gpu", skipped without a GPU): the bf16 engine against
// the fp32 CPU engine (itself checked against the independent PyTorch implementation, see
// python/tests/test_wan_parity.py) on a small random model, through the whole Self-Forcing loop:
// dense and Monarch self-attention, batch 2, a sink + window cache; graph replay equals direct
// launches bit for bit; whole chunks with the sampler on the device equal the pass-by-pass loop
// bit for bit; bad configurations and calls are rejected.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "monarchrt/cuda.h"
#include "monarchrt/wan_cuda.h"
#include "monarchrt/workload.h"
#include "test_util.h"
#include "wan_test_util.h"

namespace monarchrt {
namespace {

using test::normals;
using test::test_run;

#define SKIP_WITHOUT_GPU()                                        \
  do {                                                            \
    if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA GPU"; \
  } while (0)

WanConfig small_config() {
  WanConfig c;
  c.dim = 128;
  c.num_heads = 2;  // head dim 64
  c.num_layers = 2;
  c.ffn_dim = 256;
  c.freq_dim = 32;
  c.text_dim = 64;
  c.text_len = 7;
  return c;
}

struct Video {
  std::vector<float> latents;
  std::vector<double> chunk_seconds;
};

Video generate(WanModel& dit, const std::vector<float>& noise, int64_t frames, int64_t chunk) {
  SelfForcingCallbacks cb;
  cb.renoise = [](int64_t k, int step, float* dst, size_t n) {  // the same draws for every engine
    Rng r(uint64_t(1000 + 10 * k + step));
    for (size_t i = 0; i < n; ++i) dst[i] = float(r.normal());
  };
  Video v;
  cb.on_chunk = [&](int64_t, const float*, double s) { v.chunk_seconds.push_back(s); };
  v.latents.resize(noise.size());
  const Status s = self_forcing_generate(dit, noise.data(), frames, chunk, cb, v.latents.data());
  EXPECT_TRUE(s.ok()) << s.to_string();
  return v;
}

TEST(WanCuda, MatchesTheCpuEngineChunkByChunk) {
  SKIP_WITHOUT_GPU();
  const WanConfig c = small_config();
  const WanWeights w = wan_random_weights(c, 21);
  // 9 frames: with sink 1 + window 3 the GPU cache is a ring of 4 frames that wraps twice.
  const int64_t B = 2, frames = 9, chunk = 3, Hl = 8, Wl = 12;
  const int64_t frame = c.in_dim * Hl * Wl;
  Rng rng(22);
  const std::vector<float> text = normals(B * c.text_len * c.text_dim, rng), noise = normals(B * frames * frame, rng);
  struct Mode {
    bool monarch;
    MonarchLayout layout;
    int64_t sink, window;
  };
  for (const Mode& mode : {Mode{false, {1, 1, 1}, 0, 0}, Mode{true, {1, 1, 1}, 0, 0}, Mode{true, {1, 2, 1}, 0, 0},
                           Mode{false, {1, 1, 1}, 1, 3}, Mode{true, {1, 1, 1}, 1, 3}}) {
    WanRunConfig run = test_run(B, frames, Hl, Wl, mode.monarch);
    run.layout = mode.layout;
    run.sink_frames = mode.sink;
    run.window_frames = mode.window;
    WanDiT cpu;
    ASSERT_TRUE(cpu.init(w, run).ok());
    ASSERT_TRUE(cpu.set_text(text.data()).ok());
    const Video want = generate(cpu, noise, frames, chunk);
    std::vector<float> graph_latents;
    for (bool graphs : {true, false}) {
      WanDiTCuda gpu;
      WanCudaOptions opt;
      opt.cuda_graphs = graphs;
      const Status s = gpu.init(w, run, opt);
      ASSERT_TRUE(s.ok()) << s.to_string();
      ASSERT_TRUE(gpu.set_text(text.data()).ok());
      const Video got = generate(gpu, noise, frames, chunk);
      for (int64_t k = 0; k < frames / chunk; ++k) {  // per chunk, over the batch
        std::vector<double> g, r;
        for (int64_t b = 0; b < B; ++b)
          for (int64_t i = (b * frames + k * chunk) * frame; i < (b * frames + (k + 1) * chunk) * frame; ++i) {
            g.push_back(got.latents[size_t(i)]);
            r.push_back(want.latents[size_t(i)]);
          }
        ASSERT_TRUE(test::all_finite(g));
        const double err = test::relative_l2(g, r);
        std::printf("%s layout %s sink %lld window %lld graphs %d chunk %lld: rel L2 %.2e\n",
                    mode.monarch ? "monarch" : "dense  ", mode.layout.to_string().c_str(), (long long)mode.sink,
                    (long long)mode.window, int(graphs), (long long)k, err);
        EXPECT_LT(err, 1e-2);
      }
      if (graphs) {
        graph_latents = got.latents;
      } else {
        EXPECT_EQ(got.latents, graph_latents) << "graph replay differs from direct launches";
      }
    }
  }
}

// WanModel's pass-by-pass interface of a GPU engine only (runs_chunks() stays false), so that the
// loop copies every pass in and out through the host.
class PassByPass : public WanModel {
 public:
  explicit PassByPass(WanDiTCuda& gpu) : gpu_(gpu) {}
  Status forward(const float* x, int64_t frames, int64_t start, double t, float* flow) override {
    return gpu_.forward(x, frames, start, t, flow);
  }
  const WanRunConfig& run() const override { return gpu_.run(); }
  const WanConfig& config() const override { return gpu_.config(); }

 private:
  WanDiTCuda& gpu_;
};

// The engine runs whole chunks on the device (sampler included, no host round trip between
// passes): the same latents as the loop driving it pass by pass, with graphs and without, batch
// 2, through a ring-buffer cache.
TEST(WanCuda, WholeChunksOnTheDeviceMatchPassByPass) {
  SKIP_WITHOUT_GPU();
  const WanConfig c = small_config();
  const WanWeights w = wan_random_weights(c, 31);
  const int64_t B = 2, frames = 9, chunk = 3, Hl = 8, Wl = 12;
  Rng rng(32);
  const std::vector<float> text = normals(B * c.text_len * c.text_dim, rng),
                           noise = normals(B * frames * c.in_dim * Hl * Wl, rng);
  WanRunConfig run = test_run(B, frames, Hl, Wl, true);
  run.sink_frames = 1;
  run.window_frames = 3;
  for (bool graphs : {true, false}) {
    WanCudaOptions opt;
    opt.cuda_graphs = graphs;
    WanDiTCuda a, b;
    ASSERT_TRUE(a.init(w, run, opt).ok());
    ASSERT_TRUE(b.init(w, run, opt).ok());
    ASSERT_TRUE(a.set_text(text.data()).ok());
    ASSERT_TRUE(b.set_text(text.data()).ok());
    ASSERT_TRUE(a.runs_chunks());
    std::vector<float> out(noise.size());
    const auto unused = [](int, float*) {};  // both calls are rejected before any draw
    EXPECT_EQ(a.denoise_chunk(noise.data(), nullptr, chunk, 0, true, out.data()).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(a.denoise_chunk(noise.data(), unused, chunk + 1, 0, true, out.data()).code(),
              StatusCode::kInvalidArgument);  // more frames than a chunk holds
    PassByPass bp(b);
    const Video got = generate(a, noise, frames, chunk), want = generate(bp, noise, frames, chunk);
    const std::vector<double> g(got.latents.begin(), got.latents.end());
    ASSERT_TRUE(test::all_finite(g));
    EXPECT_EQ(got.latents, want.latents) << "graphs " << graphs;  // the same passes on the same inputs
  }
  {  // the first chunk on its own: x0 comes back while its refresh pass may still run, and the
     // engine is destroyed right after (it waits for that pass before freeing anything)
    const int64_t per = chunk * c.in_dim * Hl * Wl;
    std::vector<float> xt(size_t(B * per)), x0(xt.size());
    for (int64_t b = 0; b < B; ++b)
      std::copy(noise.begin() + b * frames / chunk * per, noise.begin() + (b * frames / chunk + 1) * per,
                xt.begin() + b * per);
    std::vector<int> steps;
    const auto draw = [&](int step, float* dst) {  // generate()'s draws for chunk 0
      steps.push_back(step);
      Rng r(uint64_t(1000 + step));
      for (int64_t i = 0; i < B * per; ++i) dst[i] = float(r.normal());
    };
    WanDiTCuda one;
    ASSERT_TRUE(one.init(w, run).ok());
    ASSERT_TRUE(one.set_text(text.data()).ok());
    ASSERT_TRUE(one.denoise_chunk(xt.data(), draw, chunk, 0, true, x0.data()).ok());
    EXPECT_EQ(steps, (std::vector<int>{1, 2, 3}));
    WanDiTCuda ref;
    ASSERT_TRUE(ref.init(w, run).ok());
    ASSERT_TRUE(ref.set_text(text.data()).ok());
    const Video video = generate(ref, noise, frames, chunk);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < per; ++i)
        ASSERT_EQ(x0[size_t(b * per + i)], video.latents[size_t(b * frames / chunk * per + i)]) << b << " " << i;
  }
  WanCudaOptions prof;
  prof.profile = true;
  WanDiTCuda p;
  ASSERT_TRUE(p.init(w, run, prof).ok());
  EXPECT_FALSE(p.runs_chunks());  // the profile times every pass on its own
}

// A draw callback that throws: the exception reaches the caller after the engine's stream has
// drained (no copy from its pinned buffers left in flight), and the engine stays usable: the same
// chunk run again gives what a fresh engine gives, bit for bit.
TEST(WanCuda, ThrowingDrawLeavesTheEngineUsable) {
  SKIP_WITHOUT_GPU();
  const WanConfig c = small_config();
  const WanWeights w = wan_random_weights(c, 33);
  const int64_t B = 1, frames = 6, chunk = 3, Hl = 8, Wl = 12, per = chunk * c.in_dim * Hl * Wl;
  Rng rng(34);
  const std::vector<float> text = normals(B * c.text_len * c.text_dim, rng), xt = normals(B * per, rng);
  const WanRunConfig run = test_run(B, frames, Hl, Wl, true);
  const auto draw = [&](int step, float* dst) {
    Rng r(uint64_t(2000 + step));
    for (int64_t i = 0; i < B * per; ++i) dst[i] = float(r.normal());
  };
  WanDiTCuda a, fresh;
  for (WanDiTCuda* e : {&a, &fresh}) {
    ASSERT_TRUE(e->init(w, run).ok());
    ASSERT_TRUE(e->set_text(text.data()).ok());
  }
  std::vector<float> x0(xt.size()), want(xt.size());
  const auto throwing = [&](int step, float* dst) {
    if (step == 2) throw std::runtime_error("draw failed");
    draw(step, dst);
  };
  EXPECT_THROW((void)a.denoise_chunk(xt.data(), throwing, chunk, 0, true, x0.data()), std::runtime_error);
  ASSERT_TRUE(a.denoise_chunk(xt.data(), draw, chunk, 0, true, x0.data()).ok());
  ASSERT_TRUE(fresh.denoise_chunk(xt.data(), draw, chunk, 0, true, want.data()).ok());
  EXPECT_EQ(x0, want);
}

// With a window smaller than the video the KV cache holds the sink and the window only (a ring),
// so its memory does not grow with the number of frames.
TEST(WanCuda, WindowedCacheHoldsOnlyTheWindow) {
  SKIP_WITHOUT_GPU();
  const WanConfig c = small_config();
  const WanWeights w = wan_random_weights(c, 3);
  auto bytes = [&](int64_t frames, int64_t sink, int64_t window) {
    WanRunConfig run;
    run.latent_h = 8;
    run.latent_w = 12;
    run.max_frames = frames;
    run.sink_frames = sink;
    run.window_frames = window;
    WanDiTCuda gpu;
    const Status s = gpu.init(w, run);
    EXPECT_TRUE(s.ok()) << s.to_string();
    return double(gpu.device_bytes());
  };
  // K and V per frame: layers x 2 x tokens per frame x dim x 2 bytes
  const double per_frame = double(c.num_layers * 2 * (8 / c.patch_h) * (12 / c.patch_w) * c.dim * 2);
  // (Other buffers, e.g. the RoPE tables, grow with the frames by a few KB.)
  EXPECT_NEAR(bytes(60, 1, 6) - bytes(12, 1, 6), 0.0, 0.25 * per_frame);  // both: 7 frames of cache
  EXPECT_NEAR(bytes(60, 0, 0) - bytes(12, 0, 0), 48 * per_frame, 0.25 * per_frame);
}

// The refresh pass without an output (flow == nullptr: the graph stops after the last layer's
// K/V) writes the same cache as a full pass: the next chunk is bitwise the same either way.
TEST(WanCuda, RefreshWithoutOutputWritesTheSameCache) {
  SKIP_WITHOUT_GPU();
  const WanConfig c = small_config();
  const WanWeights w = wan_random_weights(c, 5);
  const int64_t chunk = 3, n = chunk * c.in_dim * 8 * 12;
  Rng rng(6);
  const std::vector<float> text = normals(c.text_len * c.text_dim, rng), x0 = normals(n, rng), x1 = normals(n, rng);
  const WanRunConfig run = test_run(1, 2 * chunk, 8, 12, true);
  std::vector<float> next[2];
  for (int with_output = 0; with_output < 2; ++with_output) {
    WanDiTCuda gpu;
    ASSERT_TRUE(gpu.init(w, run).ok());
    ASSERT_TRUE(gpu.set_text(text.data()).ok());
    std::vector<float> flow(static_cast<size_t>(n));
    ASSERT_TRUE(gpu.forward(x0.data(), chunk, 0, 0.0, with_output ? flow.data() : nullptr).ok());
    next[with_output].assign(size_t(n), std::nanf(""));
    ASSERT_TRUE(gpu.forward(x1.data(), chunk, chunk, 500.0, next[with_output].data()).ok());
  }
  for (float f : next[0]) ASSERT_TRUE(std::isfinite(f));
  EXPECT_EQ(next[0], next[1]);
}

// check_wan_run (what `monarchrt generate` runs before it reads a checkpoint) against the GPU
// engine on random run settings (tests/wan_test_util.h; 4 x 6 tokens per frame, chunks of 3):
// what the check refuses, the engine must refuse too, at init or at the first chunk it cannot
// run, without writing outside its buffers (memcheck in scripts/gpu_check.sh); what the check
// accepts, the engine must run to finite latents or decline at init as unsupported.
TEST(WanCuda, RunCheckAgreesWithTheEngineOnEveryChunk) {
  SKIP_WITHOUT_GPU();
  const WanConfig c = small_config();
  const WanWeights w = wan_random_weights(c, 4);
  const std::vector<float> text(size_t(c.text_len * c.text_dim), 0.5f);
  Rng rng(test::test_seed(33));
  int ran = 0, refused = 0, declined = 0;
  for (int i = 0; i < 24; ++i) {
    const test::RunSettings k = test::random_run_settings(rng);
    SCOPED_TRACE(k.to_string());
    const WanRunConfig run = k.run(8, 12);
    const Status check = check_wan_run(c, run, 3);
    WanDiTCuda gpu;
    WanCudaOptions opt;
    opt.max_chunk_frames = 3;
    Status engine = gpu.init(w, run, opt);
    std::vector<float> noise(size_t(k.frames * c.in_dim * 8 * 12), 0.1f), latents(noise.size(), NAN);
    if (engine.ok()) {
      ASSERT_TRUE(gpu.set_text(text.data()).ok());
      SelfForcingCallbacks cb;
      cb.renoise = [](int64_t, int, float* dst, size_t n) { std::fill_n(dst, n, 0.2f); };
      engine = self_forcing_generate(gpu, noise.data(), k.frames, 3, cb, latents.data());
    }
    if (!check.ok()) {
      EXPECT_FALSE(engine.ok()) << "the engine ran what check_wan_run refuses: " << check.to_string();
      ++refused;
    } else if (!engine.ok()) {
      EXPECT_EQ(engine.code(), StatusCode::kUnsupported) << engine.to_string();
      ++declined;
    } else {
      for (float x : latents) ASSERT_TRUE(std::isfinite(x));
      ++ran;
    }
  }
  std::printf("[ settings ] %d ran, %d refused, %d declined\n", ran, refused, declined);
  EXPECT_GT(ran, 0);
  EXPECT_GT(refused, 0);
}

TEST(WanCuda, RejectsWhatItCannotRun) {
  SKIP_WITHOUT_GPU();
  WanConfig c = small_config();
  WanRunConfig run;
  run.latent_h = 8;
  run.latent_w = 12;
  run.max_frames = 6;
  {
    WanConfig hd32 = c;
    hd32.num_heads = 4;  // head dim 32
    const WanWeights w = wan_random_weights(hd32, 1);
    WanDiTCuda gpu;
    const Status s = gpu.init(w, run);
    EXPECT_EQ(s.code(), StatusCode::kUnsupported);
    EXPECT_NE(s.message().find("head dim 32"), std::string::npos) << s.to_string();
  }
  const WanWeights w = wan_random_weights(c, 2);
  WanDiTCuda gpu;
  WanCudaOptions opt;
  opt.max_chunk_frames = 7;  // more than the cache
  EXPECT_EQ(gpu.init(w, run, opt).code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(gpu.init(w, run).ok());
  std::vector<float> x(size_t(4 * c.in_dim * 8 * 12), 0.1f), flow(x.size());
  EXPECT_EQ(gpu.forward(x.data(), 3, 0, 500.0, flow.data()).code(), StatusCode::kInvalidArgument);  // no text
  std::vector<float> text(size_t(c.text_len * c.text_dim), 0.5f);
  ASSERT_TRUE(gpu.set_text(text.data()).ok());
  EXPECT_EQ(gpu.forward(x.data(), 4, 0, 500.0, flow.data()).code(), StatusCode::kInvalidArgument);  // > chunk
  EXPECT_EQ(gpu.forward(x.data(), 3, 4, 500.0, flow.data()).code(), StatusCode::kInvalidArgument);  // past cache
  EXPECT_TRUE(gpu.forward(x.data(), 3, 3, 500.0, flow.data()).ok());
  for (float f : flow) ASSERT_TRUE(std::isfinite(f));
  EXPECT_GT(gpu.device_bytes(), 0u);
  EXPECT_NE(gpu.memory_report().find("KV cache"), std::string::npos);
  EXPECT_NE(gpu.profile_report().find("profiling is off"), std::string::npos);
  // The profile: same result as without it, every step timed.
  WanDiTCuda prof;
  WanCudaOptions popt;
  popt.profile = true;
  ASSERT_TRUE(prof.init(w, run, popt).ok());
  ASSERT_TRUE(prof.set_text(text.data()).ok());
  std::vector<float> flow2(flow.size());
  ASSERT_TRUE(prof.forward(x.data(), 3, 3, 500.0, flow2.data()).ok());
  EXPECT_EQ(flow, flow2);
  const std::string report = prof.profile_report();
  EXPECT_NE(report.find("self-attention"), std::string::npos) << report;
  EXPECT_NE(report.find("(1 passes, 0 of them cache refreshes)"), std::string::npos) << report;
  ASSERT_TRUE(prof.forward(x.data(), 3, 3, 0.0, nullptr).ok());  // a refresh pass
  EXPECT_NE(prof.profile_report().find("(2 passes, 1 of them cache refreshes)"), std::string::npos)
      << prof.profile_report();
}

}  // namespace
}  // namespace monarchrt
