// The `monarchrt` command line, run as a child process (MONARCHRT_CLI_PATH): --help of the
// program and of each command; `attention` end to end on random .npy inputs ([S, H, D] float32
// and [B, S, H, D] float16; Monarch with a tiling, dense block-causal, oracle top-k, KV cache
// with sink and window; the fast path and --reference), whose output file must have q's shape
// and the chosen dtype and hold exactly what the library computes for the same inputs; `analyze
// --json` on a small synthetic workload; and the error paths, with their exit status (2 for
// usage errors, 1 for everything else), a message naming the problem, and no --out file left
// behind. Nothing here depends on timing.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "monarchrt/attention.h"
#include "monarchrt/checkpoint.h"
#include "monarchrt/npy.h"
#include "monarchrt/wan.h"
#include "monarchrt/workload.h"
#include "test_util.h"
#include "wan_test_util.h"

namespace monarchrt {
namespace {

// ---- running the CLI ---------------------------------------------------------------------------

struct Result {
  int exit_code = -1;  // 128 + signal if it died of one
  std::string output;  // what it printed (see run())
};

// Runs `monarchrt ARGS REDIRECT` through the shell and collects its stdout (with the default
// redirect, stderr too).
Result run(const std::string& args, const std::string& redirect = "2>&1") {
  const std::string cmd = std::string("'") + MONARCHRT_CLI_PATH + "' " + args + " " + redirect;
  Result r;
  FILE* pipe = popen(cmd.c_str(), "r");
  if (!pipe) {
    ADD_FAILURE() << "popen failed for: " << cmd;
    return r;
  }
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, pipe)) > 0) r.output.append(buf, n);
  const int status = pclose(pipe);
  if (WIFEXITED(status)) {
    r.exit_code = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    r.exit_code = 128 + WTERMSIG(status);
  }
  return r;
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

size_t count(const std::string& haystack, const std::string& needle) {
  size_t n = 0;
  for (size_t pos = haystack.find(needle); pos != std::string::npos; pos = haystack.find(needle, pos + 1)) ++n;
  return n;
}

std::string quote(const std::string& s) { return "'" + s + "'"; }
bool exists(const std::string& path) { return std::filesystem::exists(path); }

// ---- inputs and the library's answer -------------------------------------------------------------

// Writes a random tensor of `shape` ([S, H, D] or [B, S, H, D]) as .npy in `dtype`.
void write_random(const std::string& path, DType dtype, const std::vector<int64_t>& shape, Rng& rng) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::vector<uint8_t> data(static_cast<size_t>(n * dtype_size(dtype)));
  for (int64_t i = 0; i < n; ++i) store_element(data.data(), dtype, i, rng.normal());
  const Status s = write_npy(path, dtype, shape, data.data());
  ASSERT_TRUE(s.ok()) << s.to_string();
}

TensorView view_of(NpyArray& a) {
  const std::vector<int64_t>& s = a.shape;
  if (s.size() == 3) return TensorView::contiguous(a.data.data(), a.dtype, 1, s[0], s[1], s[2]);
  return TensorView::contiguous(a.data.data(), a.dtype, s[0], s[1], s[2], s[3]);
}

enum class Method { kMonarch, kDense, kTopk };

struct AttentionCase {
  const char* what;
  Method method;
  bool reference;
  DType in_dtype;
  std::vector<int64_t> q_shape, kv_shape;  // [S, H, D] or [B, S, H, D]
  AttentionParams params;
  double density;
  const char* out_dtype;  // nullptr: q's
  std::string extra;      // further options (already implied by params)
};

std::string method_name(Method m) {
  return m == Method::kMonarch ? "monarch" : m == Method::kDense ? "dense" : "topk";
}

// The CLI's output file must be what the library writes for the same inputs and parameters.
void expect_cli_matches_library(const AttentionCase& c) {
  SCOPED_TRACE(c.what);
  test::TempDir dir{"cli"};
  Rng rng(99);
  const std::string qp = dir.file("q.npy"), kp = dir.file("k.npy"), vp = dir.file("v.npy"),
                    op = dir.file("out.npy");
  write_random(qp, c.in_dtype, c.q_shape, rng);
  write_random(kp, c.in_dtype, c.kv_shape, rng);
  write_random(vp, c.in_dtype, c.kv_shape, rng);
  if (::testing::Test::HasFatalFailure()) return;
  const AttentionParams& p = c.params;
  std::string args = "attention --q " + quote(qp) + " --k " + quote(kp) + " --v " + quote(vp) + " --out " +
                     quote(op) + " --grid " + std::to_string(p.grid.T) + "," + std::to_string(p.grid.h) + "," +
                     std::to_string(p.grid.w) + " --method " + method_name(c.method) + " --tiling " +
                     std::to_string(p.layout.f_tied) + "," + std::to_string(p.layout.h_reduce) + "," +
                     std::to_string(p.layout.w_reduce) + " --iters " + std::to_string(p.num_iters) +
                     " --causal-chunk " + std::to_string(p.causal_chunk_frames) + " --density " +
                     std::to_string(c.density) + " " + c.extra;
  if (c.reference) args += " --reference";
  if (c.out_dtype) args += std::string(" --out-dtype ") + c.out_dtype;
  const Result r = run(args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "wrote " + op)) << r.output;

  NpyArray q, k, v, got;
  ASSERT_TRUE(read_npy(qp, &q).ok());
  ASSERT_TRUE(read_npy(kp, &k).ok());
  ASSERT_TRUE(read_npy(vp, &v).ok());
  const Status rs = read_npy(op, &got);
  ASSERT_TRUE(rs.ok()) << rs.to_string();
  DType out_dtype = c.in_dtype;
  if (c.out_dtype) out_dtype = std::string(c.out_dtype) == "float64" ? DType::kF64 : std::string(c.out_dtype) == "float32" ? DType::kF32 : DType::kF16;
  EXPECT_EQ(got.dtype, out_dtype);
  EXPECT_EQ(got.shape, c.q_shape);

  const TensorView qv = view_of(q), kv = view_of(k), vv = view_of(v);
  std::vector<uint8_t> want(static_cast<size_t>(qv.numel() * dtype_size(out_dtype)), 0xEE);
  const TensorView ov = TensorView::contiguous(want.data(), out_dtype, qv.batch(), qv.tokens(), qv.heads(),
                                               qv.head_dim());
  Status s;
  switch (c.method) {
    case Method::kMonarch:
      s = c.reference ? ref::monarch_attention(qv, kv, vv, ov, p) : cpu::monarch_attention(qv, kv, vv, ov, p);
      break;
    case Method::kDense:
      s = c.reference ? ref::dense_attention(qv, kv, vv, ov, p) : cpu::dense_attention(qv, kv, vv, ov, p);
      break;
    case Method::kTopk:
      s = c.reference ? ref::topk_attention(qv, kv, vv, ov, p, c.density)
                      : cpu::topk_attention(qv, kv, vv, ov, p, c.density);
      break;
  }
  ASSERT_TRUE(s.ok()) << s.to_string();
  ASSERT_EQ(got.data.size(), want.size());
  // Same library, same inputs, deterministic for any thread count: the very same bits.
  size_t mismatches = 0;
  double worst = 0;
  for (int64_t i = 0; i < qv.numel(); ++i) {
    const double a = load_element(got.data.data(), out_dtype, i), b = load_element(want.data(), out_dtype, i);
    if (std::memcmp(got.data.data() + i * dtype_size(out_dtype), want.data() + i * dtype_size(out_dtype),
                    static_cast<size_t>(dtype_size(out_dtype))) != 0) {
      ++mismatches;
      worst = std::max(worst, std::fabs(a - b) / std::max(std::fabs(b), 1e-30));
    }
  }
  EXPECT_EQ(mismatches, 0u) << "worst relative difference " << worst;
  // And the output is a real attention output, not zeros.
  double norm = 0;
  for (int64_t i = 0; i < qv.numel(); ++i) norm += std::fabs(load_element(got.data.data(), out_dtype, i));
  EXPECT_GT(norm, 0.0);
}

AttentionParams params(VideoGrid grid, MonarchLayout layout = {1, 1, 1}, int iters = 1, int64_t chunk = 0) {
  AttentionParams p;
  p.grid = grid;
  p.layout = layout;
  p.num_iters = iters;
  p.causal_chunk_frames = chunk;
  return p;
}

AttentionParams kv_params(VideoGrid grid, MonarchLayout layout, int64_t sink, int64_t window) {
  AttentionParams p = params(grid, layout, 2);
  p.kv_cache = true;
  p.sink_frames = sink;
  p.window_frames = window;
  return p;
}

// ---- help --------------------------------------------------------------------------------------

TEST(Cli, Help) {
  Result r = run("--help");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "usage: monarchrt <command>")) << r.output;
  EXPECT_TRUE(contains(r.output, "attention")) << r.output;
  EXPECT_TRUE(contains(r.output, "analyze")) << r.output;

  r = run("attention --help");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  for (const char* opt : {"--q FILE", "--k FILE", "--v FILE", "--out FILE", "--grid T,h,w", "--method NAME",
                          "--tiling F,HR,WR", "--iters N", "--causal-chunk FRAMES", "--kv-cache", "--sink-frames N",
                          "--window-frames N", "--scale S", "--density P", "--reference", "--out-dtype DTYPE",
                          "--threads N", "--help"}) {
    EXPECT_TRUE(contains(r.output, opt)) << "attention --help lacks " << opt << ":\n" << r.output;
  }

  r = run("analyze --help");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  for (const char* opt : {"--grid T,h,w", "--heads N", "--head-dim D", "--seed N", "--tilings LIST", "--max-iters N",
                          "--causal-chunk FRAMES", "--json", "--threads N", "--q FILE"}) {
    EXPECT_TRUE(contains(r.output, opt)) << "analyze --help lacks " << opt << ":\n" << r.output;
  }

  r = run("inspect --help");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  for (const char* opt : {"--json", "--sums", "--check-wan", "--ema"}) {
    EXPECT_TRUE(contains(r.output, opt)) << "inspect --help lacks " << opt << ":\n" << r.output;
  }
  r = run("generate --help");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  for (const char* opt : {"--dit FILE", "--ema", "--heads N", "--text FILE", "--frames N", "--chunk N", "--latent H,W",
                          "--attention KIND", "--noise FILE", "--renoise FILE", "--out FILE", "--seed N"}) {
    EXPECT_TRUE(contains(r.output, opt)) << "generate --help lacks " << opt << ":\n" << r.output;
  }

  // Help wins over everything else on the line, even options that would be errors.
  r = run("attention --grid 1,2 --help");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  // No command at all is a usage error that still shows the usage.
  r = run("");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_TRUE(contains(r.output, "usage: monarchrt <command>")) << r.output;
}

// ---- attention end to end ------------------------------------------------------------------------

TEST(Cli, AttentionMonarchFloat32) {
  const VideoGrid g{4, 2, 6};
  for (bool reference : {false, true}) {
    expect_cli_matches_library({"monarch [S,H,D] f32 tiling 2,1,2, 2 iterations", Method::kMonarch, reference,
                                DType::kF32, {48, 2, 8}, {48, 2, 8}, params(g, {2, 1, 2}, 2), 0.05, nullptr,
                                "--threads 2"});
    expect_cli_matches_library({"monarch [S,H,D] f32 tiling 1,2,3, causal chunk 1, out float64", Method::kMonarch,
                                reference, DType::kF32, {48, 1, 4}, {48, 1, 4}, params(g, {1, 2, 3}, 1, 1), 0.05,
                                "float64", ""});
  }
}

TEST(Cli, AttentionDenseFloat16) {
  const VideoGrid g{3, 2, 4};
  for (bool reference : {false, true}) {
    expect_cli_matches_library({"dense [B,S,H,D] f16 causal chunk 1", Method::kDense, reference, DType::kF16,
                                {2, 24, 2, 8}, {2, 24, 2, 8}, params(g, {1, 1, 1}, 1, 1), 0.05, nullptr, ""});
  }
  // An explicit scale, and a float32 output of float16 inputs.
  AttentionParams p = params(g, {1, 1, 1}, 1, 2);
  p.scale = 0.3;
  expect_cli_matches_library({"dense [B,S,H,D] f16 scale 0.3, out float32", Method::kDense, false, DType::kF16,
                              {2, 24, 2, 8}, {2, 24, 2, 8}, p, 0.05, "float32", "--scale 0.3"});
}

TEST(Cli, AttentionTopk) {
  const VideoGrid g{2, 3, 4};
  for (bool reference : {false, true}) {
    expect_cli_matches_library({"topk [S,H,D] f32 density 0.2", Method::kTopk, reference, DType::kF32, {24, 2, 8},
                                {24, 2, 8}, params(g), 0.2, nullptr, ""});
    expect_cli_matches_library({"topk [B,S,H,D] f16 density 0.5 causal", Method::kTopk, reference, DType::kF16,
                                {2, 24, 1, 8}, {2, 24, 1, 8}, params(g, {1, 1, 1}, 1, 1), 0.5, nullptr, ""});
  }
}

TEST(Cli, AttentionKvCache) {
  // A chunk of 2 frames against a cache of 6: sink 2 frames, window 4 frames.
  const VideoGrid g{2, 2, 3};
  for (bool reference : {false, true}) {
    expect_cli_matches_library({"monarch KV cache, sink 2, window 4", Method::kMonarch, reference, DType::kF32,
                                {12, 2, 8}, {36, 2, 8}, kv_params(g, {2, 1, 1}, 2, 4), 0.05, nullptr,
                                "--kv-cache --sink-frames 2 --window-frames 4"});
    expect_cli_matches_library({"dense KV cache, window 2", Method::kDense, reference, DType::kF16,
                                {1, 12, 2, 8}, {1, 36, 2, 8}, kv_params(g, {1, 1, 1}, 0, 2), 0.05, nullptr,
                                "--kv-cache --window-frames 2"});
  }
}

// ---- analyze -------------------------------------------------------------------------------------

// A JSON syntax check: value := object | array | string | number | true | false | null.
class JsonChecker {
 public:
  explicit JsonChecker(const std::string& s) : s_(s) {}
  bool valid() {
    pos_ = 0;
    if (!value()) return false;
    space();
    return pos_ == s_.size();
  }

 private:
  void space() {
    while (pos_ < s_.size() && std::strchr(" \t\r\n", s_[pos_])) ++pos_;
  }
  bool eat(char c) {
    space();
    if (pos_ < s_.size() && s_[pos_] == c) return ++pos_, true;
    return false;
  }
  bool string() {
    if (!eat('"')) return false;
    while (pos_ < s_.size() && s_[pos_] != '"') {
      if (static_cast<unsigned char>(s_[pos_]) < 0x20) return false;
      pos_ += s_[pos_] == '\\' ? 2 : 1;
    }
    return pos_ < s_.size() && s_[pos_++] == '"';
  }
  bool number() {
    space();
    const size_t start = pos_;
    if (pos_ < s_.size() && s_[pos_] == '-') ++pos_;
    while (pos_ < s_.size() && std::strchr("0123456789.eE+-", s_[pos_])) ++pos_;
    if (pos_ == start) return false;
    const std::string text = s_.substr(start, pos_ - start);
    char* end = nullptr;
    std::strtod(text.c_str(), &end);
    return *end == '\0' && text != "-" && text.find("nan") == std::string::npos;
  }
  bool value() {
    space();
    if (pos_ >= s_.size()) return false;
    const char c = s_[pos_];
    if (c == '{') {
      ++pos_;
      if (eat('}')) return true;
      do {
        space();
        if (!string() || !eat(':') || !value()) return false;
      } while (eat(','));
      return eat('}');
    }
    if (c == '[') {
      ++pos_;
      if (eat(']')) return true;
      do {
        if (!value()) return false;
      } while (eat(','));
      return eat(']');
    }
    if (c == '"') return string();
    for (const char* word : {"true", "false", "null"}) {
      if (s_.compare(pos_, std::strlen(word), word) == 0) return pos_ += std::strlen(word), true;
    }
    return number();
  }
  const std::string& s_;
  size_t pos_ = 0;
};

TEST(Cli, JsonCheckerRejectsBrokenJson) {
  // The checker used below must be able to say no.
  for (const char* bad : {"", "{", "{\"a\": 1,}", "[1, 2", "{\"a\" 1}", "{\"a\": nan}", "[1] x", "{'a': 1}"}) {
    std::string s = bad;
    EXPECT_FALSE(JsonChecker(s).valid()) << bad;
  }
  std::string good = "{\"a\": [1, -2.5e-3, \"x\", true, null, {}], \"b\": {\"c\": []}}";
  EXPECT_TRUE(JsonChecker(good).valid());
}

TEST(Cli, AnalyzeJson) {
  test::TempDir dir{"cli"};
  const std::string err = dir.file("stderr.txt");
  const Result r = run("analyze --grid 2,6,8 --heads 1 --head-dim 16 --max-iters 2 --json", "2>" + quote(err));
  std::ifstream ef(err);
  const std::string errors((std::istreambuf_iterator<char>(ef)), std::istreambuf_iterator<char>());
  ASSERT_EQ(r.exit_code, 0) << r.output << errors;
  EXPECT_TRUE(JsonChecker(r.output).valid()) << "stdout is not JSON:\n" << r.output;
  EXPECT_TRUE(contains(r.output, "\"grid\": [2, 6, 8]")) << r.output;
  EXPECT_TRUE(contains(r.output, "\"shape\": \"[1, 96, 1, 16]\"")) << r.output;
  // Rows: dense; Monarch 1/1/1 (6x8 tiles) and 1/2/1 (3x8) with 1 and 2 iterations; top-k at the
  // density of each. The default tiling 3/1/1 does not divide T = 2 and is skipped (on stderr).
  EXPECT_EQ(count(r.output, "\"method\": \"dense\""), 1u) << r.output;
  EXPECT_EQ(count(r.output, "\"method\": \"monarch\""), 4u) << r.output;
  EXPECT_EQ(count(r.output, "\"method\": \"oracle top-k\""), 2u) << r.output;
  EXPECT_TRUE(contains(r.output, "\"tiling\": \"1/1/1\", \"tile\": \"6x8\", \"iters\": 2")) << r.output;
  EXPECT_TRUE(contains(r.output, "\"tiling\": \"1/2/1\", \"tile\": \"3x8\", \"iters\": 1")) << r.output;
  EXPECT_FALSE(contains(r.output, "3/1/1")) << r.output;
  EXPECT_TRUE(contains(errors, "skipping tiling 3/1/1")) << errors;
  EXPECT_TRUE(contains(r.output, "\"flops_vs_dense\": 1.000000, \"rel_l2_vs_dense\": 0,")) << r.output;
  // Monarch on 6x8 tiles keeps (6 + 8) / 48 of the parameters: sparsity 1 - 14/48.
  EXPECT_TRUE(contains(r.output, "\"sparsity\": 0.708333")) << r.output;
}

// ---- generate ------------------------------------------------------------------------------------

// The built-in model on the CPU: the streamed chunks are exactly the slices of the final latents,
// a second run with the same seed gives the same latents, and bad devices are usage errors.
TEST(Cli, GenerateStreamsChunksAndIsDeterministic) {
  test::TempDir dir{"cli"};
  const std::string base = "generate --device cpu --frames 6 --batch 2 --attention monarch --seed 3 ";
  const std::string chunks = dir.file("chunks/new");  // created by the command
  Result r = run(base + "--stream-dir " + quote(chunks) + " --out " + quote(dir.file("a.npy")));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "chunk 2/2")) << r.output;
  NpyArray all, again;
  ASSERT_TRUE(read_npy(dir.file("a.npy"), &all).ok());
  ASSERT_EQ(all.shape, (std::vector<int64_t>{2, 6, 16, 8, 12}));
  const int64_t frame = 16 * 8 * 12;
  for (int64_t k = 0; k < 2; ++k) {
    NpyArray part;
    char name[32];
    std::snprintf(name, sizeof name, "chunk_%03lld.npy", (long long)k);
    ASSERT_TRUE(read_npy(chunks + "/" + name, &part).ok()) << name;
    ASSERT_EQ(part.shape, (std::vector<int64_t>{2, 3, 16, 8, 12}));
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t i = 0; i < 3 * frame; ++i)
        ASSERT_EQ(load_element(part.data.data(), part.dtype, b * 3 * frame + i),
                  load_element(all.data.data(), all.dtype, (b * 6 + k * 3) * frame + i));
  }
  r = run(base + "--out " + quote(dir.file("b.npy")));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  ASSERT_TRUE(read_npy(dir.file("b.npy"), &again).ok());
  EXPECT_EQ(all.data, again.data);
  // A stream folder that cannot be made fails before the first chunk, naming the option.
  r = run(base + "--stream-dir " + quote(dir.file("a.npy") + "/sub") + " --out " + quote(dir.file("d.npy")));
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "--stream-dir")) << r.output;
  EXPECT_FALSE(contains(r.output, "chunk 1/2")) << r.output;
  // So does an --out whose folder does not exist.
  r = run(base + "--out " + quote(dir.file("missing/e.npy")));
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "--out")) << r.output;
  EXPECT_FALSE(contains(r.output, "chunk 1/2")) << r.output;
  r = run("generate --device tpu --out " + quote(dir.file("c.npy")));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_TRUE(contains(r.output, "--device must be cpu, cuda or auto")) << r.output;
  r = run("generate --device cpu --repeat 0 --out " + quote(dir.file("c.npy")));
  EXPECT_EQ(r.exit_code, 2) << r.output;
}

// Options that need no file are checked before the checkpoint is read (a real one takes a while):
// with a --dit that does not exist, each bad option is the error, naming itself; with good options
// the missing file is.
TEST(Cli, GenerateChecksItsOptionsBeforeReadingTheCheckpoint) {
  test::TempDir dir{"cli"};
  const std::string base = "generate --device cpu --dit " + quote(dir.file("missing.pt")) + " --out " +
                           quote(dir.file("x.npy")) + " ";
  const std::pair<std::string, std::string> cases[] = {
      {"--frames 4", "--frames must be a positive multiple of --chunk (3), got 4"},
      {"--frames 0", "--frames must be a positive multiple of --chunk (3), got 0"},
      {"--frames 6 --chunk 4", "--frames must be a positive multiple of --chunk (4), got 6"},
      {"--chunk 0", "--chunk must be >= 1"},
      {"--batch 0", "--batch must be >= 1"},
      {"--attention sparse", "--attention must be dense or monarch, got 'sparse'"},
      {"--tiling 1,2", "--tiling expects 3 comma-separated integers"},
      {"--latent 60", "--latent expects 2 comma-separated integers"},
      {"--repeat 0", "--repeat must be >= 1"},
  };
  for (const auto& [args, message] : cases) {
    const Result r = run(base + args);
    EXPECT_EQ(r.exit_code, 2) << args << ":\n" << r.output;
    EXPECT_TRUE(contains(r.output, message)) << args << ":\n" << r.output;
    EXPECT_FALSE(contains(r.output, "missing.pt")) << args << ":\n" << r.output;
  }
  const Result r = run(base + "--frames 6 --chunk 3");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "missing.pt")) << r.output;
  EXPECT_FALSE(exists(dir.file("x.npy")));
}

// With a checkpoint, the input files are checked against the model's dimensions (from the
// checkpoint's metadata) before its tensors are read: a --noise of the wrong shape fails without
// the "loading" line, and the right one runs.
TEST(Cli, GenerateChecksItsInputFilesBeforeLoadingTheWeights) {
  test::TempDir dir{"cli"};
  const WanConfig c = test::tiny_wan_config();
  const WanWeights w = wan_random_weights(c, 11);
  std::vector<SafetensorsEntry> entries;
  for (const WanParameter& p : wan_parameters(c)) entries.push_back({p.name, DType::kF32, p.shape, w.at(p.name).data()});
  Rng rng(11);
  std::vector<uint8_t> bytes;
  ASSERT_TRUE(encode_safetensors(entries, &bytes).ok());
  const std::string dit = dir.file("tiny.safetensors");
  std::ofstream(dit, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  write_random(dir.file("bad.npy"), DType::kF32, {1, 3, 4, 4, 5}, rng);
  write_random(dir.file("good.npy"), DType::kF32, {1, 3, 4, 4, 4}, rng);
  const std::string base = "generate --device cpu --dit " + quote(dit) + " --heads 2 --frames 3 --latent 4,4 --out " +
                           quote(dir.file("x.npy")) + " --noise ";
  Result r = run(base + quote(dir.file("bad.npy")));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "--noise")) << r.output;
  EXPECT_TRUE(contains(r.output, "expected [1, 3, 4, 4, 4]")) << r.output;
  EXPECT_FALSE(contains(r.output, "loading")) << r.output;
  EXPECT_FALSE(exists(dir.file("x.npy")));
  // Settings that only the model's token grid (2 x 2 here: latent 4,4 over 2 x 2 patches) rules
  // out fail before the weights too, naming the chunk and the rule.
  const std::pair<std::string, std::string> bad_settings[] = {
      {" --attention monarch --tiling 1,3,1", "h_reduce = 3 does not divide grid.h = 2"},
      {" --window-frames 2", "window_frames = 2 must be 0 (whole cache) or at least the chunk's grid.T = 3"},
      {" --latent 5,4", "latent size 5x4 must be positive multiples of the patch"}};
  for (const auto& [extra, rule] : bad_settings) {
    r = run(base + quote(dir.file("good.npy")) + extra);
    EXPECT_EQ(r.exit_code, 1) << extra << "\n" << r.output;
    EXPECT_TRUE(contains(r.output, "chunks of 3")) << r.output;
    EXPECT_TRUE(contains(r.output, rule)) << r.output;
    EXPECT_FALSE(contains(r.output, "loading")) << r.output;
  }
  EXPECT_FALSE(exists(dir.file("x.npy")));
  r = run(base + quote(dir.file("good.npy")) + " --attention monarch --tiling 1,2,1");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "loading")) << r.output;
  EXPECT_TRUE(exists(dir.file("x.npy")));
}

// ---- errors --------------------------------------------------------------------------------------

// Valid inputs for the error cases: grid 4,2,6, [48, 2, 8] float32.
struct ErrorFixture {
  test::TempDir dir{"cli"};
  std::string q = dir.file("q.npy"), k = dir.file("k.npy"), v = dir.file("v.npy"), out = dir.file("out.npy");
  ErrorFixture() {
    Rng rng(5);
    write_random(q, DType::kF32, {48, 2, 8}, rng);
    write_random(k, DType::kF32, {48, 2, 8}, rng);
    write_random(v, DType::kF32, {48, 2, 8}, rng);
  }
  std::string args(const std::string& q_path, const std::string& extra = "") const {
    return "attention --q " + quote(q_path) + " --k " + quote(k) + " --v " + quote(v) + " --out " + quote(out) +
           " --grid 4,2,6 " + extra;
  }
};

void expect_failure(const ErrorFixture& f, const std::string& args, int code, const std::vector<std::string>& needles) {
  SCOPED_TRACE(args);
  const Result r = run(args);
  EXPECT_EQ(r.exit_code, code) << r.output;
  for (const std::string& n : needles) EXPECT_TRUE(contains(r.output, n)) << "output lacks '" << n << "':\n" << r.output;
  EXPECT_FALSE(exists(f.out)) << "--out file created by a failing run";
}

TEST(Cli, FixtureIsValid) {
  // The control for the error cases below: with nothing broken, the same command works.
  ErrorFixture f;
  const Result r = run(f.args(f.q, "--tiling 2,1,2"));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(exists(f.out));
}

TEST(Cli, UsageErrors) {
  ErrorFixture f;
  expect_failure(f, "frobnicate --out " + quote(f.out), 2, {"unknown command 'frobnicate'"});
  expect_failure(f, f.args(f.q, "--bogus 1"), 2, {"unknown option '--bogus'"});
  expect_failure(f, f.args(f.q, "stray"), 2, {"unexpected argument 'stray'"});
  expect_failure(f, f.args(f.q, "--iters abc"), 2, {"--iters expects an integer, got 'abc'"});
  expect_failure(f, f.args(f.q, "--iters 2x"), 2, {"--iters expects an integer, got '2x'"});
  expect_failure(f, f.args(f.q, "--iters=1.5"), 2, {"--iters expects an integer"});
  expect_failure(f, f.args(f.q, "--iters"), 2, {"option '--iters' needs a value"});
  expect_failure(f, f.args(f.q, "--reference=1"), 2, {"option '--reference' takes no value"});
  expect_failure(f, f.args(f.q, "--method sparse"), 2, {"--method must be monarch, dense or topk"});
  expect_failure(f, f.args(f.q, "--out-dtype int8"), 2, {"--out-dtype must be float32, float16 or float64"});
  expect_failure(f, f.args(f.q, "--tiling 1,2"), 2, {"--tiling expects 3 comma-separated integers"});
  expect_failure(f, f.args(f.q, "--threads 0"), 2, {"--threads must be at least 1"});
  expect_failure(f, "analyze --max-iters 0 --grid 1,1,4", 2, {"--max-iters must be in [1, 64]"});
  // Missing required options, each named.
  expect_failure(f, "attention --k " + quote(f.k) + " --v " + quote(f.v) + " --out " + quote(f.out) + " --grid 4,2,6",
                 2, {"missing required option --q"});
  expect_failure(f, "attention --q " + quote(f.q) + " --k " + quote(f.k) + " --v " + quote(f.v) + " --grid 4,2,6", 2,
                 {"missing required option --out"});
  expect_failure(f, "attention --q " + quote(f.q) + " --k " + quote(f.k) + " --v " + quote(f.v) + " --out " +
                        quote(f.out),
                 2, {"missing required option --grid"});
  expect_failure(f, "attention --q " + quote(f.q) + " --v " + quote(f.v) + " --out " + quote(f.out) + " --grid 4,2,6",
                 2, {"missing required option --k"});
}

TEST(Cli, RuntimeErrors) {
  ErrorFixture f;
  // Tilings the grid 4x2x6 does not allow.
  expect_failure(f, f.args(f.q, "--tiling 3,1,1"), 1, {"layout.f_tied = 3 does not divide grid.T = 4"});
  expect_failure(f, f.args(f.q, "--tiling 1,1,4"), 1, {"layout.w_reduce"});
  expect_failure(f, f.args(f.q, "--tiling 1,0,1"), 1, {"layout.h_reduce = 0"});
  // A grid q does not fit, a causal chunk that splits tiles, out-of-range parameters.
  expect_failure(f, f.args(f.q, "--grid 2,2,6"), 1, {"q: tokens (dim 1) = 48"});
  expect_failure(f, f.args(f.q, "--tiling 2,1,1 --causal-chunk 1"), 1, {"causal_chunk_frames = 1"});
  expect_failure(f, f.args(f.q, "--iters 65"), 1, {"num_iters = 65"});
  expect_failure(f, f.args(f.q, "--method topk --density 0"), 1, {"density"});
  expect_failure(f, f.args(f.q, "--window-frames 2"), 1, {"window_frames"});

  // A truncated input names the file and says it is truncated.
  std::vector<char> bytes;
  {
    std::ifstream in(f.q, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  const std::string cut = f.dir.file("cut.npy");
  {
    std::ofstream o(cut, std::ios::binary);
    o.write(bytes.data(), static_cast<std::streamsize>(bytes.size() - 10));
  }
  expect_failure(f, f.args(cut), 1, {cut, "truncated"});
  const std::string cut_header = f.dir.file("cut_header.npy");
  {
    std::ofstream o(cut_header, std::ios::binary);
    o.write(bytes.data(), 40);
  }
  expect_failure(f, f.args(cut_header), 1, {cut_header, "truncated"});

  // A 2-D input.
  const std::string flat = f.dir.file("flat.npy");
  Rng rng(6);
  write_random(flat, DType::kF32, {48, 16}, rng);
  expect_failure(f, f.args(flat), 1, {flat, "expected shape [S, H, D] or [B, S, H, D], got 2 dimensions"});
  // Missing files and a directory.
  const std::string missing = f.dir.file("missing.npy");
  expect_failure(f, f.args(missing), 1, {missing, "cannot open for reading"});
  expect_failure(f, f.args(f.dir.path()), 1, {f.dir.path(), "is a directory"});
  // Inputs that disagree.
  const std::string small = f.dir.file("small.npy");
  write_random(small, DType::kF32, {48, 2, 4}, rng);
  expect_failure(f, f.args(small), 1, {"head dim"});
  const std::string half = f.dir.file("half.npy");
  write_random(half, DType::kF16, {48, 2, 8}, rng);
  expect_failure(f, f.args(half), 1, {"dtype must equal q's float16"});

  // An output that cannot be written.
  const std::string nowhere = f.dir.file("no/such/dir/out.npy");
  const Result r = run("attention --q " + quote(f.q) + " --k " + quote(f.k) + " --v " + quote(f.v) + " --out " +
                       quote(nowhere) + " --grid 4,2,6");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output, nowhere)) << r.output;
}

TEST(Cli, FailedRunLeavesAnExistingOutputAlone) {
  ErrorFixture f;
  const std::string before = "not an npy file, and it must stay exactly this";
  {
    std::ofstream o(f.out, std::ios::binary);
    o << before;
  }
  const Result r = run(f.args(f.q, "--tiling 3,1,1"));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  std::ifstream in(f.out, std::ios::binary);
  const std::string after((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(after, before);
}

}  // namespace
}  // namespace monarchrt
