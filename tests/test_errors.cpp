// Bad input to every attention entry point (ref:: and cpu:: dense, Monarch and top-k, the
// effective Monarch matrix, and check_attention itself) and to make_tile_geometry. Each case
// starts from one valid problem that every entry point accepts and breaks exactly one rule of it:
// tilings that do not divide the grid, mismatched shapes, dtypes and devices, bad views (null,
// empty, negative or overlapping strides, oversized dimensions), block-causal and KV-cache
// parameter errors, iteration counts, scales and top-k densities. For every entry point the
// Status must be an error of the expected code whose message names the offending argument, and
// the output buffer (and the inputs) must be bit-for-bit what they were before the call.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "random_problem.h"
#include "test_util.h"

namespace monarchrt {
namespace {

using test::Tensor;

// ---- entry points ----------------------------------------------------------------------------

enum Entry : unsigned {
  kRefDense = 1u << 0,
  kRefMonarch = 1u << 1,
  kRefTopk = 1u << 2,
  kRefEffective = 1u << 3,
  kCpuDense = 1u << 4,
  kCpuMonarch = 1u << 5,
  kCpuTopk = 1u << 6,
  kCheckDense = 1u << 7,    // check_attention(..., monarch = false)
  kCheckMonarch = 1u << 8,  // check_attention(..., monarch = true)
};
constexpr unsigned kEntryCount = 9;
constexpr unsigned kAll = (1u << kEntryCount) - 1;
constexpr unsigned kMonarch = kRefMonarch | kRefEffective | kCpuMonarch | kCheckMonarch;
constexpr unsigned kNotMonarch = kAll & ~kMonarch;
constexpr unsigned kTopk = kRefTopk | kCpuTopk;
constexpr unsigned kCheck = kCheckDense | kCheckMonarch;
constexpr unsigned kCompute = kAll & ~kCheck;
// monarch_effective_matrix takes no v and no out (it checks k in v's place and a view shaped
// like q in out's place), so rules about v and out do not apply to it.
constexpr unsigned kHasVOut = kAll & ~kRefEffective;

const char* entry_name(unsigned e) {
  switch (e) {
    case kRefDense: return "ref::dense_attention";
    case kRefMonarch: return "ref::monarch_attention";
    case kRefTopk: return "ref::topk_attention";
    case kRefEffective: return "ref::monarch_effective_matrix";
    case kCpuDense: return "cpu::dense_attention";
    case kCpuMonarch: return "cpu::monarch_attention";
    case kCpuTopk: return "cpu::topk_attention";
    case kCheckDense: return "check_attention(monarch=false)";
    case kCheckMonarch: return "check_attention(monarch=true)";
  }
  return "?";
}

// ---- the valid problem -----------------------------------------------------------------------

// Grid 4x2x6 (12 tokens a frame, 48 in all), tiling 2/1/2 (6x3 tiles), B = 2, H = 2, D = 4; q
// and v padded so that no view is contiguous. Each case mutates one thing.
constexpr int64_t kB = 2, kS = 48, kH = 2, kD = 4, kPerFrame = 12;

struct Problem {
  Tensor q{DType::kF32, kB, kS, kH, kD, 1};
  Tensor k{DType::kF32, kB, kS, kH, kD};
  Tensor v{DType::kF32, kB, kS, kH, kD, 2};
  Tensor out{DType::kF32, kB, kS, kH, kD, 1};
  AttentionParams params;
  double density = 0.5;
  int64_t b = 1, h = 1;  // monarch_effective_matrix's (batch, head)

  Problem() {
    Rng rng(7);
    q.fill_normal(rng);
    k.fill_normal(rng);
    v.fill_normal(rng);
    params.grid = VideoGrid{4, 2, 6};
    params.layout = MonarchLayout{2, 1, 2};
    params.num_iters = 2;
  }
  // Replaces k and v by caches of `frames` frames (or `tokens` tokens) of random values.
  void set_kv_tokens(int64_t tokens) {
    Rng rng(8);
    k = Tensor(k.view.dtype, kB, tokens, kH, kD);
    v = Tensor(v.view.dtype, kB, tokens, kH, kD, 2);
    k.fill_normal(rng);
    v.fill_normal(rng);
  }
  void set_kv_cache(int64_t frames) {
    params.kv_cache = true;
    set_kv_tokens(frames * kPerFrame);
  }
};

Status call(unsigned e, Problem& p, std::vector<double>* P) {
  const TensorView &q = p.q.view, &k = p.k.view, &v = p.v.view, &out = p.out.view;
  switch (e) {
    case kRefDense: return ref::dense_attention(q, k, v, out, p.params);
    case kRefMonarch: return ref::monarch_attention(q, k, v, out, p.params);
    case kRefTopk: return ref::topk_attention(q, k, v, out, p.params, p.density);
    case kRefEffective: return ref::monarch_effective_matrix(q, k, p.params, p.b, p.h, P);
    case kCpuDense: return cpu::dense_attention(q, k, v, out, p.params);
    case kCpuMonarch: return cpu::monarch_attention(q, k, v, out, p.params);
    case kCpuTopk: return cpu::topk_attention(q, k, v, out, p.params, p.density);
    case kCheckDense: return check_attention(q, k, v, out, p.params, false);
    case kCheckMonarch: return check_attention(q, k, v, out, p.params, true);
  }
  return Status::internal("unknown entry");
}

// A byte pattern no attention output contains (it is mostly NaNs and huge values as floats).
void fill_sentinel(std::vector<uint8_t>& bytes) {
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(0xA5 ^ (i * 131));
}
std::vector<double> sentinel_matrix() {
  std::vector<double> P(7);
  for (size_t i = 0; i < P.size(); ++i) P[i] = -1.25 * static_cast<double>(i) - 0.5;
  P[3] = std::numeric_limits<double>::quiet_NaN();
  return P;
}
bool same_bits(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0);
}

using Mutation = std::function<void(Problem&)>;

// Every entry point in `entries` must reject the mutated problem with `code` and a message that
// contains every string of `needles`, leaving out (and q, k, v, and P) untouched.
void expect_rejected(const std::string& what, const Mutation& mutate, unsigned entries,
                     StatusCode code, const std::vector<std::string>& needles) {
  ASSERT_NE(entries, 0u);
  for (unsigned i = 0; i < kEntryCount; ++i) {
    const unsigned e = 1u << i;
    if (!(entries & e)) continue;
    SCOPED_TRACE(what + " via " + entry_name(e));
    Problem p;
    mutate(p);
    fill_sentinel(p.out.storage);
    const std::vector<uint8_t> out0 = p.out.storage, q0 = p.q.storage, k0 = p.k.storage,
                               v0 = p.v.storage;
    std::vector<double> P = sentinel_matrix();
    const std::vector<double> P0 = P;
    const Status s = call(e, p, &P);
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.code(), code) << s.to_string();
    for (const std::string& needle : needles) {
      EXPECT_NE(s.message().find(needle), std::string::npos)
          << "message lacks '" << needle << "': " << s.message();
    }
    EXPECT_TRUE(p.out.storage == out0) << "output buffer written despite the error";
    EXPECT_TRUE(p.q.storage == q0 && p.k.storage == k0 && p.v.storage == v0) << "inputs modified";
    EXPECT_TRUE(same_bits(P, P0)) << "effective matrix written despite the error";
  }
}

// Every entry point in `entries` accepts the mutated problem (and writes the output).
void expect_accepted(const std::string& what, const Mutation& mutate, unsigned entries) {
  for (unsigned i = 0; i < kEntryCount; ++i) {
    const unsigned e = 1u << i;
    if (!(entries & e)) continue;
    SCOPED_TRACE(what + " via " + entry_name(e));
    Problem p;
    mutate(p);
    std::vector<double> P;
    const Status s = call(e, p, &P);
    EXPECT_TRUE(s.ok()) << s.to_string();
  }
}

const StatusCode kInvalid = StatusCode::kInvalidArgument;

// ---- the valid problem itself ----------------------------------------------------------------

// The control every other test relies on: the unmutated problem is valid for all entry points,
// and the compute entry points overwrite the sentinel (so "untouched" below means something).
TEST(AttentionErrors, BaseProblemIsValidAndWritesTheOutput) {
  for (unsigned i = 0; i < kEntryCount; ++i) {
    const unsigned e = 1u << i;
    SCOPED_TRACE(entry_name(e));
    Problem p;
    fill_sentinel(p.out.storage);
    const std::vector<uint8_t> out0 = p.out.storage;
    std::vector<double> P = sentinel_matrix();
    const Status s = call(e, p, &P);
    ASSERT_TRUE(s.ok()) << s.to_string();
    if (e & kCheck) {
      EXPECT_TRUE(p.out.storage == out0) << "check_attention must not touch any data";
    } else if (e == kRefEffective) {
      EXPECT_EQ(P.size(), static_cast<size_t>(kS * kS));
    } else {
      EXPECT_FALSE(p.out.storage == out0);
      EXPECT_TRUE(test::all_finite(p.out.values()));
    }
  }
}

// ---- tilings ---------------------------------------------------------------------------------

TEST(AttentionErrors, TilingMustDivideTheGrid) {
  struct Bad {
    int64_t f, hr, wr;
    const char* needle;
  };
  // grid 4x2x6
  const Bad cases[] = {
      {3, 1, 2, "layout.f_tied = 3 does not divide grid.T = 4"},
      {8, 1, 2, "layout.f_tied = 8 does not divide grid.T = 4"},
      {0, 1, 2, "layout.f_tied = 0 must be positive"},
      {-2, 1, 2, "layout.f_tied = -2 must be positive"},
      {2, 3, 2, "layout.h_reduce = 3 does not divide grid.h = 2"},
      {2, 0, 2, "layout.h_reduce = 0 must be positive"},
      {2, -1, 2, "layout.h_reduce = -1 must be positive"},
      {2, 1, 4, "layout.w_reduce = 4 does not divide grid.w = 6"},
      {2, 1, 0, "layout.w_reduce = 0 must be positive"},
      {2, 1, -3, "layout.w_reduce = -3 must be positive"},
  };
  for (const Bad& c : cases) {
    const Mutation m = [&](Problem& p) { p.params.layout = MonarchLayout{c.f, c.hr, c.wr}; };
    const std::string what = "tiling " + MonarchLayout{c.f, c.hr, c.wr}.to_string();
    expect_rejected(what, m, kMonarch, kInvalid, {c.needle});
    // Dense and top-k ignore the layout.
    expect_accepted(what, m, kNotMonarch);
  }
}

TEST(AttentionErrors, MakeTileGeometryMessages) {
  struct Bad {
    VideoGrid grid;
    MonarchLayout layout;
    std::string message;
  };
  const Bad cases[] = {
      {{21, 30, 52}, {1, 4, 1},
       "layout.h_reduce = 4 does not divide grid.h = 30 (a tile must hold whole frames, rows and "
       "columns)"},
      {{21, 30, 52}, {2, 1, 1}, "layout.f_tied = 2 does not divide grid.T = 21"},
      {{21, 30, 52}, {1, 1, 3}, "layout.w_reduce = 3 does not divide grid.w = 52"},
      {{21, 30, 52}, {0, 1, 1}, "layout.f_tied = 0 must be positive"},
      {{21, 30, 52}, {1, -2, 1}, "layout.h_reduce = -2 must be positive"},
      {{21, 30, 52}, {1, 1, -4}, "layout.w_reduce = -4 must be positive"},
      // The first broken field is reported.
      {{21, 30, 52}, {2, 4, 3}, "layout.f_tied = 2 does not divide grid.T = 21"},
      {{0, 30, 52}, {1, 1, 1}, "grid: T, h and w must be positive, got 0x30x52"},
      {{21, -30, 52}, {1, 1, 1}, "grid: T, h and w must be positive, got 21x-30x52"},
      {{21, 30, 0}, {1, 1, 1}, "grid: T, h and w must be positive, got 21x30x0"},
  };
  for (const Bad& c : cases) {
    SCOPED_TRACE(c.grid.to_string() + " / " + c.layout.to_string());
    TileGeometry g;
    g.b1 = -7, g.b2 = -8, g.tiles = -9, g.tiles_per_frame_group = -10;
    const Status s = make_tile_geometry(c.grid, c.layout, &g);
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.code(), kInvalid);
    EXPECT_EQ(s.message().rfind(c.message, 0), 0u) << s.message();
    EXPECT_EQ(g.b1, -7);
    EXPECT_EQ(g.b2, -8);
    EXPECT_EQ(g.tiles, -9);
    EXPECT_EQ(g.tiles_per_frame_group, -10);
  }
  // And a valid one fills the geometry: 21x30x52 by 3/2/4 gives 45x13 tiles, 7 * 8 of them.
  TileGeometry g;
  ASSERT_TRUE(make_tile_geometry({21, 30, 52}, {3, 2, 4}, &g).ok());
  EXPECT_EQ(g.b1, 45);
  EXPECT_EQ(g.b2, 13);
  EXPECT_EQ(g.tiles, 56);
  EXPECT_EQ(g.tiles_per_frame_group, 8);
}

// A grid whose token count does not fit in int64 must be refused, not wrapped around.
TEST(AttentionErrors, MakeTileGeometryRejectsOverflowingGrids) {
  const int64_t big = int64_t{1} << 32;
  TileGeometry g;
  g.b1 = -7;
  Status s = make_tile_geometry({big, big, 1}, {big, 1, 1}, &g);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), kInvalid);
  EXPECT_NE(s.message().find("grid"), std::string::npos) << s.message();
  EXPECT_EQ(g.b1, -7);
  s = make_tile_geometry({3, big, big}, {1, big, big}, &g);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("grid"), std::string::npos) << s.message();
  EXPECT_EQ(g.b1, -7);
}

// ---- shapes ----------------------------------------------------------------------------------

TEST(AttentionErrors, MismatchedShapes) {
  const DType f = DType::kF32;
  expect_rejected("k batch", [&](Problem& p) { p.k = Tensor(f, 3, kS, kH, kD); }, kAll, kInvalid,
                  {"k: batch (dim 0) = 3 must equal q's 2"});
  expect_rejected("v batch", [&](Problem& p) { p.v = Tensor(f, 1, kS, kH, kD); }, kHasVOut, kInvalid,
                  {"v: batch (dim 0) = 1 must equal q's 2"});
  expect_rejected("k heads", [&](Problem& p) { p.k = Tensor(f, kB, kS, 3, kD); }, kAll, kInvalid,
                  {"k: heads (dim 2) = 3"});
  expect_rejected("v heads", [&](Problem& p) { p.v = Tensor(f, kB, kS, 1, kD); }, kHasVOut, kInvalid,
                  {"v: heads (dim 2) = 1"});
  expect_rejected("k head dim", [&](Problem& p) { p.k = Tensor(f, kB, kS, kH, 5); }, kAll, kInvalid,
                  {"k: head dim (dim 3) = 5"});
  expect_rejected("v head dim", [&](Problem& p) { p.v = Tensor(f, kB, kS, kH, 3); }, kHasVOut,
                  kInvalid, {"v: head dim (dim 3) = 3"});
  expect_rejected("k vs v tokens", [&](Problem& p) { p.v = Tensor(f, kB, kS + 12, kH, kD); },
                  kHasVOut, kInvalid, {"v: tokens (dim 1) = 60 must equal k's 48"});
  const int64_t good[4] = {kB, kS, kH, kD};
  for (int d = 0; d < 4; ++d) {
    int64_t s[4] = {good[0], good[1], good[2], good[3]};
    s[d] += 1;
    expect_rejected("out dim " + std::to_string(d),
                    [&](Problem& p) { p.out = Tensor(f, s[0], s[1], s[2], s[3]); }, kHasVOut,
                    kInvalid, {"out: size (dim " + std::to_string(d) + ")"});
  }
}

TEST(AttentionErrors, QueryTokensMustMatchTheGrid) {
  expect_rejected("grid 8x2x6", [](Problem& p) { p.params.grid = VideoGrid{8, 2, 6}; }, kAll,
                  kInvalid, {"q: tokens (dim 1) = 48 must equal grid T*h*w = 8x2x6 = 96"});
  expect_rejected("grid 2x2x6", [](Problem& p) { p.params.grid = VideoGrid{2, 2, 6}; }, kAll,
                  kInvalid, {"q: tokens (dim 1) = 48", "grid"});
  for (VideoGrid g : {VideoGrid{0, 2, 6}, VideoGrid{4, 0, 6}, VideoGrid{4, 2, -6}}) {
    expect_rejected("grid " + g.to_string(), [&](Problem& p) { p.params.grid = g; }, kAll, kInvalid,
                    {"grid: T, h and w must be positive"});
  }
}

// T*h*w = 16 * 5 * 461168601842738791 = 2^65 + 48, which wraps to q's 48 tokens in int64.
TEST(AttentionErrors, GridWhoseTokenCountOverflows) {
  for (VideoGrid g : {VideoGrid{16, 5, 461168601842738791}, VideoGrid{int64_t{1} << 21, int64_t{1} << 21, int64_t{1} << 22},
                      VideoGrid{std::numeric_limits<int64_t>::max(), 2, 3}}) {
    expect_rejected("grid " + g.to_string(),
                    [&](Problem& p) {
                      p.params.grid = g;
                      p.params.layout = MonarchLayout{1, 1, 1};
                    },
                    kAll, kInvalid, {"q: tokens (dim 1) = 48", "grid"});
  }
}

TEST(AttentionErrors, KeyTokensMustMatchOutsideKvCache) {
  expect_rejected("k tokens 96", [](Problem& p) { p.set_kv_tokens(96); }, kAll, kInvalid,
                  {"k: tokens (dim 1) = 96 must equal q's 48 outside KV-cache mode"});
  expect_rejected("k tokens 24", [](Problem& p) { p.set_kv_tokens(24); }, kAll, kInvalid,
                  {"k: tokens (dim 1) = 24"});
}

// ---- block-causal chunks ---------------------------------------------------------------------

TEST(AttentionErrors, CausalChunk) {
  expect_rejected("chunk 1 with f_tied 2", [](Problem& p) { p.params.causal_chunk_frames = 1; },
                  kMonarch, kInvalid, {"causal_chunk_frames = 1", "layout.f_tied = 2"});
  expect_rejected("chunk 3 with f_tied 2", [](Problem& p) { p.params.causal_chunk_frames = 3; },
                  kMonarch, kInvalid, {"causal_chunk_frames = 3", "layout.f_tied = 2"});
  expect_accepted("chunk 1 (dense, top-k)", [](Problem& p) { p.params.causal_chunk_frames = 1; },
                  kNotMonarch);
  expect_accepted("chunk 2", [](Problem& p) { p.params.causal_chunk_frames = 2; }, kAll);
  for (int64_t c : {-1, -2}) {
    expect_rejected("chunk " + std::to_string(c), [&](Problem& p) { p.params.causal_chunk_frames = c; },
                    kAll, kInvalid, {"causal_chunk_frames = " + std::to_string(c) + " must be >= 0"});
  }
}

// ---- KV cache ----------------------------------------------------------------------------------

TEST(AttentionErrors, KvCache) {
  // The valid KV-cache problem: 8 cached frames, sink 2, window 4, all whole tiles.
  const Mutation kv = [](Problem& p) {
    p.set_kv_cache(8);
    p.params.sink_frames = 2;
    p.params.window_frames = 4;
  };
  expect_accepted("valid KV cache", kv, kAll);

  expect_rejected("causal chunk in KV mode", [&](Problem& p) { kv(p); p.params.causal_chunk_frames = 2; },
                  kAll, kInvalid, {"causal_chunk_frames must be 0 in KV-cache mode"});
  expect_rejected("cache not whole frames", [&](Problem& p) { kv(p); p.set_kv_tokens(8 * kPerFrame + 5); },
                  kAll, kInvalid, {"k: tokens (dim 1) = 101 is not a whole number of frames"});
  expect_rejected("cache shorter than the chunk", [&](Problem& p) { kv(p); p.set_kv_tokens(3 * kPerFrame); },
                  kAll, kInvalid, {"k: the cache holds 3 frames", "grid.T = 4"});
  expect_rejected("window smaller than the chunk", [&](Problem& p) { kv(p); p.params.window_frames = 2; },
                  kAll, kInvalid, {"window_frames = 2 must be 0 (whole cache) or at least"});
  expect_rejected("negative sink", [&](Problem& p) { kv(p); p.params.sink_frames = -2; }, kAll, kInvalid,
                  {"sink_frames = -2 must be >= 0"});
  expect_rejected("negative window", [&](Problem& p) { kv(p); p.params.window_frames = -4; }, kAll,
                  kInvalid, {"window_frames = -4 must be >= 0"});

  // Whole tiles: the rules of Monarch only.
  const Mutation sink1 = [&](Problem& p) { kv(p); p.params.sink_frames = 1; };
  const Mutation window5 = [&](Problem& p) { kv(p); p.params.window_frames = 5; };
  const Mutation cache9 = [&](Problem& p) { kv(p); p.set_kv_tokens(9 * kPerFrame); };
  expect_rejected("sink not whole tiles", sink1, kMonarch, kInvalid, {"sink_frames = 1", "layout.f_tied = 2"});
  expect_rejected("window not whole tiles", window5, kMonarch, kInvalid, {"window_frames = 5", "layout.f_tied = 2"});
  expect_rejected("cache not whole tiles", cache9, kMonarch, kInvalid, {"cache frames (k tokens / (h*w)) = 9"});
  expect_accepted("sink 1 (dense, top-k)", sink1, kNotMonarch);
  expect_accepted("window 5 (dense, top-k)", window5, kNotMonarch);
  expect_accepted("cache 9 (dense, top-k)", cache9, kNotMonarch);

  // Sink and window outside KV-cache mode.
  expect_rejected("sink outside KV mode", [](Problem& p) { p.params.sink_frames = 2; }, kAll, kInvalid,
                  {"sink_frames", "only in KV-cache mode"});
  expect_rejected("window outside KV mode", [](Problem& p) { p.params.window_frames = 4; }, kAll, kInvalid,
                  {"window_frames", "only in KV-cache mode"});
}

// ---- scalar parameters -------------------------------------------------------------------------

TEST(AttentionErrors, NumIters) {
  for (int n : {0, -1, 65, 1000}) {
    expect_rejected("num_iters " + std::to_string(n), [&](Problem& p) { p.params.num_iters = n; }, kAll,
                    kInvalid, {"num_iters = " + std::to_string(n) + " must be in [1, 64]"});
  }
  expect_accepted("num_iters 64", [](Problem& p) { p.params.num_iters = kMaxIterations; }, kCheck);
  expect_accepted("num_iters 1", [](Problem& p) { p.params.num_iters = 1; }, kAll);
}

TEST(AttentionErrors, NonFiniteScale) {
  for (double s : {std::nan(""), std::numeric_limits<double>::infinity(),
                   -std::numeric_limits<double>::infinity()}) {
    expect_rejected("scale " + std::to_string(s), [&](Problem& p) { p.params.scale = s; }, kAll, kInvalid,
                    {"scale must be finite"});
  }
  expect_accepted("scale 0.25", [](Problem& p) { p.params.scale = 0.25; }, kAll);
}

TEST(AttentionErrors, TopkDensity) {
  for (double d : {0.0, -0.0, -0.5, 1.0000001, 1.5, std::nan(""), std::numeric_limits<double>::infinity()}) {
    expect_rejected("density " + std::to_string(d), [&](Problem& p) { p.density = d; }, kTopk, kInvalid,
                    {"density = ", "must be in (0, 1]"});
  }
  for (double d : {1e-9, 1.0}) {
    expect_accepted("density " + std::to_string(d), [&](Problem& p) { p.density = d; }, kTopk);
  }
}

TEST(AttentionErrors, EffectiveMatrixBatchAndHeadOutOfRange) {
  const std::pair<int64_t, int64_t> bad[] = {{-1, 0}, {2, 0}, {0, -1}, {0, 2}, {100, 100}};
  for (auto bh : bad) {
    expect_rejected("b, h = " + std::to_string(bh.first) + ", " + std::to_string(bh.second),
                    [&](Problem& p) { p.b = bh.first, p.h = bh.second; }, kRefEffective, kInvalid,
                    {"b, h: (" + std::to_string(bh.first) + ", " + std::to_string(bh.second) + ")",
                     "batch 2 x heads 2"});
  }
}

// ---- dtypes and devices ------------------------------------------------------------------------

TEST(AttentionErrors, DtypesMustMatch) {
  expect_rejected("k float16", [](Problem& p) { p.k = Tensor(DType::kF16, kB, kS, kH, kD); }, kAll,
                  kInvalid, {"dtype must equal q's float32", "k float16"});
  expect_rejected("v float64", [](Problem& p) { p.v = Tensor(DType::kF64, kB, kS, kH, kD); }, kHasVOut,
                  kInvalid, {"dtype must equal q's float32", "v float64"});
  expect_rejected("q bfloat16", [](Problem& p) { p.q = Tensor(DType::kBF16, kB, kS, kH, kD); }, kAll,
                  kInvalid, {"dtype must equal q's bfloat16"});
  // The output dtype is free.
  expect_accepted("out float16", [](Problem& p) { p.out = Tensor(DType::kF16, kB, kS, kH, kD); }, kAll);
  expect_accepted("out float64", [](Problem& p) { p.out = Tensor(DType::kF64, kB, kS, kH, kD); }, kAll);
}

TEST(AttentionErrors, CudaTensorsOnTheCpuPath) {
  const Mutation all_cuda = [](Problem& p) {
    for (Tensor* t : {&p.q, &p.k, &p.v, &p.out}) t->view.device = Device::kCUDA;
  };
  expect_rejected("all on cuda", all_cuda, kCompute, kInvalid, {"q: tensors are on cuda", "needs cpu"});
  // check_attention has no device of its own: it only asks for one device.
  expect_accepted("all on cuda", all_cuda, kCheck);
  expect_rejected("k on cuda", [](Problem& p) { p.k.view.device = Device::kCUDA; }, kAll, kInvalid,
                  {"k: tensor is on cuda, q on cpu", "must be on one device"});
  expect_rejected("v on cuda", [](Problem& p) { p.v.view.device = Device::kCUDA; }, kHasVOut, kInvalid,
                  {"v: tensor is on cuda, q on cpu"});
  expect_rejected("out on cuda", [](Problem& p) { p.out.view.device = Device::kCUDA; }, kHasVOut, kInvalid,
                  {"out: tensor is on cuda, q on cpu"});
}

// ---- views -------------------------------------------------------------------------------------

Tensor* tensor_of(Problem& p, int i) {
  Tensor* ts[4] = {&p.q, &p.k, &p.v, &p.out};
  return ts[i];
}
const char* const kNames[4] = {"q", "k", "v", "out"};
const unsigned kEntriesFor[4] = {kAll, kAll, kHasVOut, kHasVOut};

TEST(AttentionErrors, NullDataPointer) {
  for (int t = 0; t < 4; ++t) {
    expect_rejected(std::string(kNames[t]) + " null", [&](Problem& p) { tensor_of(p, t)->view.data = nullptr; },
                    kEntriesFor[t], kInvalid, {std::string(kNames[t]) + ": data pointer is null"});
  }
}

TEST(AttentionErrors, ZeroAndNegativeSizes) {
  const char* dims[4] = {"batch (dim 0)", "tokens (dim 1)", "heads (dim 2)", "head dim (dim 3)"};
  for (int t = 0; t < 4; ++t) {
    for (int d = 0; d < 4; ++d) {
      for (int64_t size : {0, -1}) {
        expect_rejected(std::string(kNames[t]) + " dim " + std::to_string(d) + " = " + std::to_string(size),
                        [&](Problem& p) { tensor_of(p, t)->view.shape[d] = size; }, kEntriesFor[t], kInvalid,
                        {std::string(kNames[t]) + ": " + dims[d] + " must be positive"});
      }
    }
  }
}

TEST(AttentionErrors, NegativeStrides) {
  for (int t = 0; t < 4; ++t) {
    for (int d = 0; d < 4; ++d) {
      // A legal-looking reversed view: data points at the last element along d.
      const Mutation m = [&](Problem& p) {
        TensorView& v = tensor_of(p, t)->view;
        v.data = static_cast<uint8_t*>(v.data) + (v.shape[d] - 1) * v.stride[d] * dtype_size(v.dtype);
        v.stride[d] = -v.stride[d];
      };
      expect_rejected(std::string(kNames[t]) + " stride " + std::to_string(d), m, kEntriesFor[t], kInvalid,
                      {std::string(kNames[t]) + ": strides must be non-negative"});
    }
  }
}

TEST(AttentionErrors, OverlappingOutputStrides) {
  // Heads share an address; tokens step by one head only; batch stride zero; D stride zero.
  const std::vector<std::pair<int, int64_t>> bad = {{2, 0}, {1, kD + 1}, {0, 0}, {3, 0}, {0, kS}};
  for (auto ds : bad) {
    expect_rejected("out stride[" + std::to_string(ds.first) + "] = " + std::to_string(ds.second),
                    [&](Problem& p) { p.out.view.stride[ds.first] = ds.second; }, kHasVOut, kInvalid,
                    {"out: output strides overlap"});
  }
  // Inputs may alias (a broadcast k over heads is fine), and so may an output along a size-1 dim.
  expect_accepted("k stride[2] = 0", [](Problem& p) { p.k.view.stride[2] = 0; }, kAll);
  expect_accepted("out [2,48,1,4] with stride[2] = 0", [](Problem& p) {
    for (Tensor* t : {&p.q, &p.k, &p.v, &p.out}) *t = Tensor(DType::kF32, kB, kS, 1, kD);
    p.out.view.stride[2] = 0;
  }, kHasVOut);
}

TEST(AttentionErrors, OversizedDimensions) {
  // Views that claim 2^31 batches (the outermost stride, so no overlap): checked before any data
  // is read.
  const int64_t big = int64_t{1} << 31;
  for (int t = 0; t < 4; ++t) {
    expect_rejected(std::string(kNames[t]) + " with 2^31 batches",
                    [&](Problem& p) { tensor_of(p, t)->view.shape[0] = big; }, kEntriesFor[t],
                    StatusCode::kUnsupported, {std::string(kNames[t]) + ":", "2147483648", "2^31 - 1"});
  }
}

// ---- random parameters -----------------------------------------------------------------------

// Parameters drawn around the valid problem's (negative, zero, too large, not whole tiles, ring
// buffers that do not fit, NaN scales): every entry point (the forwards, kv_cache_write and the
// backward passes) must give check_attention's verdict, with its message, leave what it would
// write and its inputs untouched when it refuses, and write finite values when it accepts. Guards the order of the checks against work done before them (the CPU
// engine once wrote a ring slot before the attention refused a negative sink: docs/engine.md).
TEST(AttentionErrors, RandomParametersAreRefusedOrRun) {
  Rng rng(test::test_seed(41));
  const unsigned entries[] = {kRefDense, kRefMonarch, kRefTopk, kCpuDense, kCpuMonarch, kCpuTopk};
  int accepted = 0, refused = 0;
  for (int i = 0; i < 150; ++i) {
    const test::PerturbedParams pp = test::perturbed_params(rng);
    const AttentionParams& a = pp.params;
    Problem base;
    base.params = a;
    if (a.kv_cache) base.set_kv_tokens(pp.kv_tokens);
    const std::string what = pp.to_string();
    for (unsigned e : entries) {
      SCOPED_TRACE(what + " via " + entry_name(e));
      Problem p = base;
      const Status check = call((e & kMonarch) ? kCheckMonarch : kCheckDense, p, nullptr);
      fill_sentinel(p.out.storage);
      const std::vector<uint8_t> out0 = p.out.storage, q0 = p.q.storage, k0 = p.k.storage, v0 = p.v.storage;
      const Status s = call(e, p, nullptr);
      ASSERT_EQ(s.ok(), check.ok()) << "call: " << s.to_string() << "\ncheck_attention: " << check.to_string();
      EXPECT_TRUE(p.q.storage == q0 && p.k.storage == k0 && p.v.storage == v0) << "inputs modified";
      if (s.ok()) {
        EXPECT_FALSE(p.out.storage == out0) << "output not written";
        EXPECT_TRUE(test::all_finite(p.out.values()));
        ++accepted;
      } else {
        EXPECT_EQ(s.to_string(), check.to_string());
        EXPECT_TRUE(p.out.storage == out0) << "output buffer written despite the error";
        ++refused;
      }
    }
    {  // kv_cache_write: the chunk (shaped like q) into the k / v caches
      SCOPED_TRACE(what + " via cpu::kv_cache_write");
      Problem p = base;
      const Status check = a.kv_cache ? call(kCheckDense, p, nullptr)
                                      : Status::invalid("kv_cache must be set for kv_cache_write");
      const std::vector<uint8_t> k0 = p.k.storage, v0 = p.v.storage;
      const Status s = cpu::kv_cache_write(p.q.view, p.q.view, p.k.view, p.v.view, a);
      ASSERT_EQ(s.ok(), check.ok()) << "call: " << s.to_string() << "\ncheck: " << check.to_string();
      if (s.ok()) {
        EXPECT_FALSE(p.k.storage == k0 || p.v.storage == v0) << "chunk not written";
        ++accepted;
      } else {
        ++refused;
        EXPECT_EQ(s.to_string(), check.to_string());
        EXPECT_TRUE(p.k.storage == k0 && p.v.storage == v0) << "cache written despite the error";
      }
    }
    for (const bool monarch : {false, true}) {  // the backward passes, reference and CPU
      for (const bool cpu_path : {false, true}) {
        SCOPED_TRACE(what + (monarch ? " via monarch" : " via dense") + (cpu_path ? " backward, cpu" : " backward, ref"));
        Problem p = base;
        const Status check =
            monarch ? test::monarch_backward_verdict(call(kCheckMonarch, p, nullptr), a) : call(kCheckDense, p, nullptr);
        Tensor dout = p.q, dq = p.out, dk = p.k, dv = p.v;  // shapes of q, q, k, v
        Rng grad_rng(9);
        dout.fill_normal(grad_rng);
        for (Tensor* g : {&dq, &dk, &dv}) fill_sentinel(g->storage);
        const std::vector<uint8_t> dq0 = dq.storage, dk0 = dk.storage, dv0 = dv.storage;
        const TensorView &q = p.q.view, &k = p.k.view, &v = p.v.view;
        const Status s =
            monarch ? (cpu_path ? cpu::monarch_attention_backward(q, k, v, dout.view, dq.view, dk.view, dv.view, a)
                                : ref::monarch_attention_backward(q, k, v, dout.view, dq.view, dk.view, dv.view, a))
                    : (cpu_path ? cpu::dense_attention_backward(q, k, v, dout.view, dq.view, dk.view, dv.view, a)
                                : ref::dense_attention_backward(q, k, v, dout.view, dq.view, dk.view, dv.view, a));
        ASSERT_EQ(s.ok(), check.ok()) << "call: " << s.to_string() << "\ncheck: " << check.to_string();
        if (s.ok()) {
          EXPECT_TRUE(test::all_finite(dq.values()) && test::all_finite(dk.values()) && test::all_finite(dv.values()));
          ++accepted;
        } else {
          ++refused;
          EXPECT_EQ(s.to_string(), check.to_string());
          EXPECT_TRUE(dq.storage == dq0 && dk.storage == dk0 && dv.storage == dv0) << "gradients written despite the error";
        }
      }
    }
  }
  std::printf("[ calls    ] %d accepted, %d refused\n", accepted, refused);
  EXPECT_GT(accepted, 0);
  EXPECT_GT(refused, 0);
}

}  // namespace
}  // namespace monarchrt
