// The Wan DiT: the parameter list matches the specification's counts for the 1.3B model, and a
// tiny model's weights written with the real key names, as a Wan safetensors file and as a
// Self-Forcing .pt (generator / generator_ema of `model.`-prefixed names), load back exactly;
// every departure from the model (missing, misshapen, extra tensor) is an error naming it.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "checkpoint_writers.h"
#include "monarchrt/wan.h"
#include "monarchrt/workload.h"
#include "wan_test_util.h"

namespace monarchrt {
namespace {

using Tensors = std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>>;

Tensors random_weights(const WanConfig& c, uint64_t seed) {
  Rng rng(seed);
  Tensors t;
  for (const WanParameter& p : wan_parameters(c)) {
    std::vector<float> v(size_t(p.numel()));
    for (float& x : v) x = float(rng.normal());
    t[p.name] = {p.shape, v};
  }
  return t;
}

std::vector<uint8_t> safetensors_of(const Tensors& t) {
  std::vector<SafetensorsEntry> e;
  for (const auto& kv : t) e.push_back({kv.first, DType::kF32, kv.second.first, kv.second.second.data()});
  std::vector<uint8_t> bytes;
  EXPECT_TRUE(encode_safetensors(e, &bytes).ok());
  return bytes;
}

// torch.save({"generator": {"model." + name: tensor}, "generator_ema": {...}, "step": 3})
std::vector<uint8_t> self_forcing_pt(const Tensors& gen, const Tensors& ema) {
  test::PickleWriter pk;
  test::ZipWriter z;
  int key = 0;
  pk.op(0x80);
  pk.op(2);
  pk.op('}');
  pk.op('(');
  for (const auto& sub : {std::make_pair(std::string("generator"), &gen), std::make_pair(std::string("generator_ema"), &ema)}) {
    pk.str(sub.first);
    pk.op('}');
    pk.op('(');
    for (const auto& kv : *sub.second) {
      const auto& shape = kv.second.first;
      std::vector<int64_t> strides(shape.size(), 1);
      for (int i = int(shape.size()) - 2; i >= 0; --i) strides[i] = strides[i + 1] * shape[i + 1];
      pk.str("model." + kv.first);
      pk.tensor("FloatStorage", std::to_string(key), int64_t(kv.second.second.size()), 0, shape, strides, false);
      std::vector<uint8_t> raw(kv.second.second.size() * 4);
      std::memcpy(raw.data(), kv.second.second.data(), raw.size());
      z.add("archive/data/" + std::to_string(key++), raw);
    }
    pk.op('u');
  }
  pk.str("step");
  pk.integer(3);
  pk.op('u');
  pk.op('.');
  z.add("archive/data.pkl", pk.b);
  return z.finish();
}

TEST(WanWeights, ParameterListMatchesTheSpecification) {
  const WanConfig c;  // Wan2.1-T2V-1.3B
  ASSERT_TRUE(c.validate().ok());
  const std::vector<WanParameter> p = wan_parameters(c);
  int64_t total = 0;
  for (const WanParameter& w : p) total += w.numel();
  EXPECT_EQ(p.size(), 825u);
  EXPECT_EQ(total, 1418996800);
  int64_t block0 = 0;
  for (const WanParameter& w : p)
    if (w.name.rfind("blocks.0.", 0) == 0) block0 += w.numel();
  EXPECT_EQ(block0, 46440704);  // spec 1.2: parameters per block
}

TEST(WanWeights, SafetensorsAndSelfForcingPtLoadBack) {
  const WanConfig c = test::tiny_wan_config();
  const Tensors gen = random_weights(c, 1), ema = random_weights(c, 2);
  Checkpoint st;
  ASSERT_TRUE(Checkpoint::open(memory_source(safetensors_of(gen), "wan.safetensors"), &st).ok());
  WanWeights w;
  Status s = load_wan_weights(st, c, wan_checkpoint_prefix(st, true), &w);
  ASSERT_TRUE(s.ok()) << s.to_string();
  for (const auto& kv : gen) EXPECT_EQ(w.at(kv.first), kv.second.second) << kv.first;

  Checkpoint pt;
  s = Checkpoint::open(memory_source(self_forcing_pt(gen, ema), "self_forcing_dmd.pt"), &pt);
  ASSERT_TRUE(s.ok()) << s.to_string();
  EXPECT_EQ(wan_checkpoint_prefix(pt, true), "generator_ema/model.");
  s = load_wan_weights(pt, c, wan_checkpoint_prefix(pt, true), &w);
  ASSERT_TRUE(s.ok()) << s.to_string();
  for (const auto& kv : ema) EXPECT_EQ(w.at(kv.first), kv.second.second) << kv.first;
  ASSERT_TRUE(load_wan_weights(pt, c, wan_checkpoint_prefix(pt, false), &w).ok());
  for (const auto& kv : gen) EXPECT_EQ(w.at(kv.first), kv.second.second) << kv.first;
}

TEST(WanWeights, EveryDepartureFromTheModelIsNamed) {
  const WanConfig c = test::tiny_wan_config();
  const Tensors good = random_weights(c, 3);
  auto check = [&](const Tensors& t, const std::string& expect) {
    Checkpoint ck;
    ASSERT_TRUE(Checkpoint::open(memory_source(safetensors_of(t), "w.safetensors"), &ck).ok());
    WanWeights w;
    w.tensors["sentinel"] = {1.0f};
    const Status s = load_wan_weights(ck, c, "", &w);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find(expect), std::string::npos) << s.message();
    EXPECT_EQ(w.tensors.count("sentinel"), 1u);  // the caller's object is untouched
  };
  Tensors missing = good;
  missing.erase("blocks.1.ffn.2.bias");
  check(missing, "'blocks.1.ffn.2.bias' is missing");
  Tensors shaped = good;
  shaped["head.modulation"].first = {1, 3, 8};
  check(shaped, "'head.modulation' has shape [1, 3, 8], the model needs [1, 2, 24]");
  Tensors extra = good;
  extra["blocks.2.modulation"] = {{1, 6, 24}, std::vector<float>(144)};
  check(extra, "unexpected tensor 'blocks.2.modulation'");
  // A different configuration: the count of problems is reported too.
  WanConfig other = c;
  other.num_layers = 3;
  Checkpoint ck;
  ASSERT_TRUE(Checkpoint::open(memory_source(safetensors_of(good), "w.safetensors"), &ck).ok());
  const Status s = check_wan_checkpoint(ck, other, "");
  EXPECT_NE(s.message().find("more problems"), std::string::npos) << s.message();
  // A Self-Forcing file read with the safetensors prefix finds nothing under it.
  Checkpoint pt;
  ASSERT_TRUE(Checkpoint::open(memory_source(self_forcing_pt(good, good), "sf.pt"), &pt).ok());
  EXPECT_FALSE(check_wan_checkpoint(pt, c, "").ok());
  // Invalid configurations.
  WanConfig bad = c;
  bad.num_heads = 5;
  EXPECT_NE(bad.validate().message().find("config.num_heads"), std::string::npos);
  bad = c;
  bad.dim = 0;
  EXPECT_NE(bad.validate().message().find("config.dim"), std::string::npos);
}

}  // namespace
}  // namespace monarchrt

namespace monarchrt {
namespace {

// The CPU DiT and the Self-Forcing loop on a tiny random model (parity with an independent
// PyTorch implementation is python/tests/test_wan_parity.py; here: every path runs under the
// sanitizers, results are finite and deterministic, bad calls are rejected).
TEST(WanDiT, SelfForcingLoopRunsAndRejectsBadCalls) {
  const WanConfig c = test::tiny_wan_config();
  const WanWeights w = wan_random_weights(c, 7);
  for (bool monarch : {false, true}) {
    const WanRunConfig run = test::test_run(2, 6, 4, 6, monarch);
    WanDiT dit;
    ASSERT_TRUE(dit.init(w, run).ok());
    std::vector<float> text(size_t(2 * c.text_len * c.text_dim), 0.5f), noise(size_t(2 * 6 * 4 * 4 * 6));
    Rng rng(8);
    for (float& x : noise) x = float(rng.normal());
    std::vector<float> flow(size_t(2 * 3 * 4 * 4 * 6));
    EXPECT_EQ(dit.forward(noise.data(), 3, 0, 500.0, flow.data()).code(), StatusCode::kInvalidArgument);  // no text
    ASSERT_TRUE(dit.set_text(text.data()).ok());
    EXPECT_EQ(dit.forward(noise.data(), 3, 4, 500.0, flow.data()).code(), StatusCode::kInvalidArgument);  // past cache
    SelfForcingCallbacks cb;
    Rng renoise(9);
    cb.renoise = [&](int64_t, int, float* dst, size_t n) {
      for (size_t i = 0; i < n; ++i) dst[i] = float(renoise.normal());
    };
    int chunks = 0;
    cb.on_chunk = [&](int64_t, const float*, double) { ++chunks; };
    std::vector<float> a(noise.size()), b(noise.size());
    ASSERT_TRUE(self_forcing_generate(dit, noise.data(), 6, 3, cb, a.data()).ok());
    EXPECT_EQ(chunks, 2);
    for (float x : a) ASSERT_TRUE(std::isfinite(x));
    renoise = Rng(9);
    ASSERT_TRUE(self_forcing_generate(dit, noise.data(), 6, 3, cb, b.data()).ok());
    EXPECT_EQ(a, b);  // the cache of the previous video does not leak into the next
    EXPECT_EQ(self_forcing_generate(dit, noise.data(), 6, 4, cb, a.data()).code(), StatusCode::kInvalidArgument);
  }
  WanRunConfig bad;
  bad.latent_h = 5;  // not a multiple of the 2x2 patch
  WanDiT dit;
  EXPECT_EQ(dit.init(w, bad).code(), StatusCode::kInvalidArgument);
}

// check_wan_run, which `monarchrt generate` runs before it reads a checkpoint, must accept exactly
// the run settings with which the engine then gets through every chunk, and name the chunk.
TEST(WanDiT, RunCheckAgreesWithTheEngineOnEveryChunk) {
  const WanConfig c = test::tiny_wan_config();
  const WanWeights w = wan_random_weights(c, 7);
  using test::RunSettings;
  // The check's verdict, after asserting that the CPU engine (chunks of 3 frames, 2 x 3 tokens
  // per frame) agrees with it; a bad setting must never get further than an error (ASan in CI).
  auto agree = [&](const RunSettings& k) {
    const WanRunConfig run = k.run(4, 6);
    const Status check = check_wan_run(c, run, 3);
    WanDiT dit;
    Status engine = dit.init(w, run);
    if (engine.ok()) {
      std::vector<float> text(size_t(c.text_len * c.text_dim), 0.5f), noise(size_t(k.frames * 4 * 4 * 6), 0.1f);
      std::vector<float> out(noise.size());
      EXPECT_TRUE(dit.set_text(text.data()).ok());
      SelfForcingCallbacks cb;
      cb.renoise = [](int64_t, int, float* dst, size_t n) { std::fill_n(dst, n, 0.2f); };
      engine = self_forcing_generate(dit, noise.data(), k.frames, 3, cb, out.data());
    }
    EXPECT_EQ(check.ok(), engine.ok()) << "check: " << check.message() << "\nengine: " << engine.message();
    if (!check.ok()) {
      EXPECT_EQ(check.code(), StatusCode::kInvalidArgument) << check.message();
    }
    return check;
  };
  const RunSettings cases[] = {
      {true, {1, 1, 1}, 0, 0, 6, 1},  {true, {3, 1, 1}, 0, 0, 6, 1},  {true, {2, 1, 1}, 0, 0, 6, 1},
      {true, {1, 2, 1}, 0, 0, 6, 1},  {true, {1, 1, 3}, 0, 0, 6, 1},  {true, {1, 1, 2}, 0, 0, 6, 1},
      {true, {1, 1, 1}, 1, 3, 9, 1},  {true, {3, 1, 1}, 1, 3, 9, 1},  {true, {3, 1, 1}, 3, 3, 9, 1},
      {true, {3, 1, 1}, 0, 3, 9, 1},  {false, {1, 1, 1}, 0, 2, 6, 1}, {false, {1, 1, 1}, 1, 3, 9, 1},
      {false, {7, 1, 1}, 2, 0, 6, 1}, {true, {1, 1, 1}, -1, 3, 6, 1}, {true, {1, 1, 1}, 0, 0, 7, 1},
      {true, {1, 1, 1}, 0, 0, 6, 0},
  };
  for (const RunSettings& k : cases) {
    SCOPED_TRACE(k.to_string());
    const Status check = agree(k);
    if (!check.ok() && k.frames % 3 == 0 && k.sink >= 0 && k.num_iters > 0) {  // the first chunk fails
      EXPECT_NE(check.message().find("chunk of frames [0, 3)"), std::string::npos) << check.message();
    }
  }
  Rng rng(test::test_seed(31));  // and random settings
  int accepted = 0;
  for (int i = 0; i < 40; ++i) {
    const RunSettings k = test::random_run_settings(rng);
    SCOPED_TRACE(k.to_string());
    accepted += agree(k).ok();
  }
  std::printf("[ settings ] %d of 40 random run settings accepted\n", accepted);
  EXPECT_TRUE(check_wan_run(c, test::test_run(1, 7, 4, 6, true), 0).ok());  // sizes only
}

// A model that runs whole chunks (WanModel::denoise_chunk) the way the GPU engine does on its
// device, here with the CPU DiT's passes and the sampler written out again: the loop must hand it
// the chunk's noise, the three draws in order, and a refresh for every chunk but the last, and get
// the per-pass loop's latents.
class WholeChunks : public WanModel {
 public:
  explicit WholeChunks(WanDiT& dit) : dit_(dit) {}
  Status forward(const float*, int64_t, int64_t, double, float*) override {
    return Status::internal("the loop must not call forward() on a model that runs whole chunks");
  }
  bool runs_chunks() const override { return true; }
  Status denoise_chunk(const float* xt, const std::function<void(int, float*)>& draw, int64_t frames, int64_t start,
                       bool refresh, float* x0) override {
    const size_t n = size_t(run().batch * frames * config().in_dim * run().latent_h * run().latent_w);
    std::vector<float> x(xt, xt + n), v(n), d(n);
    const std::vector<SelfForcingStep> steps = self_forcing_steps();
    for (size_t j = 0; j < steps.size(); ++j) {
      MONARCHRT_RETURN_IF_ERROR(dit_.forward(x.data(), frames, start, steps[j].t, v.data()));
      for (size_t i = 0; i < n; ++i) x0[i] = sampler_x0(x[i], v[i], steps[j].sigma);
      if (j + 1 == steps.size()) break;
      draw(int(j + 1), d.data());
      for (size_t i = 0; i < n; ++i) x[i] = sampler_renoise(x0[i], d[i], steps[j + 1].sigma);
    }
    refreshes.push_back(refresh);
    return refresh ? dit_.forward(x0, frames, start, 0.0, nullptr) : Status();
  }
  const WanRunConfig& run() const override { return dit_.run(); }
  const WanConfig& config() const override { return dit_.config(); }
  std::vector<bool> refreshes;

 private:
  WanDiT& dit_;
};

TEST(WanDiT, LoopHandsWholeChunksToModelsThatRunThem) {
  const WanConfig c = test::tiny_wan_config();
  const WanWeights w = wan_random_weights(c, 13);
  const WanRunConfig run = test::test_run(1, 6, 4, 6, true);
  const int64_t n = 6 * c.in_dim * 4 * 6;
  std::vector<float> text(size_t(c.text_len * c.text_dim), 0.25f);
  Rng rng(14);
  const std::vector<float> noise = test::normals(n, rng);
  std::vector<std::pair<int64_t, int>> asked;
  SelfForcingCallbacks cb;
  cb.renoise = [&](int64_t k, int step, float* dst, size_t m) {
    asked.emplace_back(k, step);
    Rng r(uint64_t(100 + 10 * k + step));
    for (size_t i = 0; i < m; ++i) dst[i] = float(r.normal());
  };
  std::vector<float> want(noise.size()), got(noise.size());
  {
    WanDiT dit;
    ASSERT_TRUE(dit.init(w, run).ok());
    ASSERT_TRUE(dit.set_text(text.data()).ok());
    ASSERT_TRUE(self_forcing_generate(dit, noise.data(), 6, 2, cb, want.data()).ok());
  }
  const std::vector<std::pair<int64_t, int>> order = asked;
  asked.clear();
  WanDiT dit;
  ASSERT_TRUE(dit.init(w, run).ok());
  ASSERT_TRUE(dit.set_text(text.data()).ok());
  WholeChunks chunks(dit);
  ASSERT_TRUE(self_forcing_generate(chunks, noise.data(), 6, 2, cb, got.data()).ok());
  EXPECT_EQ(asked, order);  // the same draws in the same order
  EXPECT_EQ(chunks.refreshes, (std::vector<bool>{true, true, false}));
  for (float x : got) ASSERT_TRUE(std::isfinite(x));
  EXPECT_EQ(got, want);
}

TEST(WanDiT, LoopRejectsAFlowOfAnotherShape) {
  WanConfig c = test::tiny_wan_config();
  c.out_dim = c.in_dim + 1;
  const WanWeights w = wan_random_weights(c, 15);
  const WanRunConfig run = test::test_run(1, 3, 4, 6, false);
  WanDiT dit;
  ASSERT_TRUE(dit.init(w, run).ok());
  std::vector<float> text(size_t(c.text_len * c.text_dim), 0.25f), noise(size_t(3 * c.in_dim * 4 * 6), 0.5f),
      out(noise.size());
  ASSERT_TRUE(dit.set_text(text.data()).ok());
  SelfForcingCallbacks cb;
  cb.renoise = [](int64_t, int, float* dst, size_t m) { std::fill(dst, dst + m, 0.f); };
  const Status s = self_forcing_generate(dit, noise.data(), 3, 3, cb, out.data());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.to_string().find("out_dim"), std::string::npos) << s.to_string();
}

TEST(WanDiT, ScheduleMatchesTheSpecification) {
  const std::vector<SelfForcingStep> s = self_forcing_steps();
  ASSERT_EQ(s.size(), 4u);
  const double t[4] = {1000.0, 937.5, 833.3333, 625.0};
  for (int i = 0; i < 4; ++i) {
    EXPECT_NEAR(s[i].t, t[i], 1e-3);
    EXPECT_NEAR(s[i].sigma, t[i] / 1000.0, 1e-6);
  }
}

}  // namespace
}  // namespace monarchrt

namespace monarchrt {
namespace {

// Spec acceptance: running the chunks one after another through the KV cache equals the
// block-causal full-sequence forward (dense and Monarch self-attention).
TEST(WanDiT, ChunksThroughTheCacheEqualTheBlockCausalFullSequence) {
  const WanConfig c = test::tiny_wan_config();
  const WanWeights w = wan_random_weights(c, 11);
  const int64_t B = 2, T = 6, chunk = 2, Hl = 4, Wl = 6, frame = c.in_dim * Hl * Wl;
  Rng rng(12);
  const std::vector<float> text = test::normals(B * c.text_len * c.text_dim, rng),
                           x = test::normals(B * T * frame, rng);
  for (bool monarch : {false, true}) {
    const WanRunConfig run = test::test_run(B, T, Hl, Wl, monarch);
    WanDiT dit;
    ASSERT_TRUE(dit.init(w, run).ok());
    ASSERT_TRUE(dit.set_text(text.data()).ok());
    std::vector<float> full(x.size());
    ASSERT_TRUE(dit.forward_full(x.data(), T, 700.0, chunk, full.data()).ok());
    double num = 0, den = 0;
    for (int64_t s = 0; s < T; s += chunk) {
      std::vector<float> in(size_t(B * chunk * frame)), out(in.size());
      for (int64_t b = 0; b < B; ++b)
        std::copy_n(x.begin() + (b * T + s) * frame, chunk * frame, in.begin() + b * chunk * frame);
      ASSERT_TRUE(dit.forward(in.data(), chunk, s, 700.0, out.data()).ok());
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < chunk * frame; ++i) {
          const double d = out[size_t(b * chunk * frame + i)] - full[size_t((b * T + s) * frame + i)];
          num += d * d;
          den += double(full[size_t((b * T + s) * frame + i)]) * full[size_t((b * T + s) * frame + i)];
        }
    }
    EXPECT_LT(std::sqrt(num / den), 1e-5) << (monarch ? "monarch" : "dense");
  }
}

// The refresh pass without an output (flow == nullptr) writes the same cache as a full pass: the
// next chunk's output is bitwise the same either way.
TEST(WanDiT, RefreshWithoutOutputWritesTheSameCache) {
  const WanConfig c = test::tiny_wan_config();
  const WanWeights w = wan_random_weights(c, 21);
  const int64_t B = 1, chunk = 2, Hl = 4, Wl = 6, n = B * chunk * c.in_dim * Hl * Wl;
  Rng rng(22);
  const std::vector<float> text = test::normals(B * c.text_len * c.text_dim, rng), x0 = test::normals(n, rng),
                           x1 = test::normals(n, rng);
  for (bool monarch : {false, true}) {
    std::vector<float> next[2];
    for (int with_output = 0; with_output < 2; ++with_output) {
      const WanRunConfig run = test::test_run(B, 2 * chunk, Hl, Wl, monarch);
      WanDiT dit;
      ASSERT_TRUE(dit.init(w, run).ok());
      ASSERT_TRUE(dit.set_text(text.data()).ok());
      std::vector<float> flow(static_cast<size_t>(n));
      ASSERT_TRUE(dit.forward(x0.data(), chunk, 0, 0.0, with_output ? flow.data() : nullptr).ok());
      next[with_output].assign(size_t(n), std::nanf(""));
      ASSERT_TRUE(dit.forward(x1.data(), chunk, chunk, 500.0, next[with_output].data()).ok());
      if (!with_output) {
        EXPECT_EQ(dit.forward_full(x0.data(), chunk, 0.0, 0, nullptr).code(), StatusCode::kInvalidArgument);
      }
    }
    EXPECT_EQ(std::memcmp(next[0].data(), next[1].data(), next[0].size() * sizeof(float)), 0)
        << (monarch ? "monarch" : "dense");
  }
}

}  // namespace
}  // namespace monarchrt
