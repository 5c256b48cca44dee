// The fast fp32 CPU backward passes (cpu::dense_attention_backward, cpu::monarch_attention_backward)
// against the fp64 reference backward (ref::, itself checked against finite differences in
// tests/test_backward.cpp) on fresh random inputs of many shapes: odd tiles, f_tied, h_reduce and
// w_reduce > 1, batch and heads > 1, bidirectional, block-causal, KV cache with sinks, windows and
// ring buffers, every input dtype, padded strides. Gradients are poisoned with NaN first, so an
// unwritten element fails; keys the reference gives exactly zero gradient must get exactly zero.
// Then thread-count invariance (bitwise) and bad input (the reference's errors, nothing written).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "test_util.h"

namespace monarchrt {
namespace {

using test::Tensor;

// fp32 arithmetic against fp64 on the same input values: about fp32 epsilon times a small growth
// factor (the worst seen is printed by each test).
constexpr double kFp32Tolerance = 2e-5;

struct Case {
  VideoGrid grid;
  MonarchLayout layout;
  int64_t B, H, D;
  int64_t causal_chunk;  // frames, 0 = bidirectional
};

// b1 = f_tied * h / h_reduce, b2 = w / w_reduce.
const Case kCases[] = {
    {{2, 1, 1}, {1, 1, 1}, 1, 1, 4, 0},     // 1x1 tiles
    {{3, 3, 5}, {1, 1, 1}, 2, 3, 8, 1},     // 3x5, batch 2, heads 3
    {{3, 3, 5}, {3, 3, 5}, 1, 2, 5, 0},     // every divisor > 1: 3x1
    {{2, 5, 3}, {1, 1, 1}, 1, 2, 6, 0},     // 5x3
    {{4, 15, 1}, {1, 1, 1}, 1, 1, 3, 2},    // 15x1
    {{2, 30, 4}, {1, 2, 4}, 1, 2, 4, 1},    // h_reduce 2, w_reduce 4: 15x1
    {{2, 30, 52}, {1, 1, 1}, 1, 1, 16, 0},  // 30x52 (Wan tiles)
    {{2, 6, 52}, {1, 2, 1}, 2, 1, 3, 1},    // 3x52
    {{6, 2, 3}, {3, 1, 1}, 2, 1, 4, 3},     // f_tied 3: 6x3
    {{4, 4, 6}, {2, 2, 3}, 1, 2, 7, 2},     // 4x2
    {{3, 30, 52}, {3, 1, 1}, 1, 1, 8, 0},   // f_tied 3: 90x52
    {{1, 2, 2}, {1, 1, 1}, 3, 1, 64, 0},    // one tile, batch 3, D 64
    {{2, 4, 4}, {1, 1, 1}, 1, 2, 128, 1},   // D 128, block-causal
    {{2, 1, 5}, {1, 1, 1}, 2, 2, 5, 0},     // 1x5: single-row tiles
};

std::string describe(bool monarch, const Case& c, const AttentionParams& p, DType dtype) {
  return std::string(monarch ? "monarch " : "dense ") + test::describe(p) + " B" + std::to_string(c.B) +
         " H" + std::to_string(c.H) + " D" + std::to_string(c.D) + " " + dtype_name(dtype);
}

struct Inputs {
  Tensor q{DType::kF32, 1, 1, 1, 1}, k = q, v = q, dout = q;
};

// q over p.grid, k and v of kv_tokens tokens, every view padded differently.
Inputs make_inputs(Rng& rng, DType dtype, const Case& c, const AttentionParams& p, int64_t kv_tokens,
                   DType dout_dtype) {
  Inputs in;
  in.q = Tensor(dtype, c.B, p.grid.tokens(), c.H, c.D, 1);
  in.k = Tensor(dtype, c.B, kv_tokens, c.H, c.D);
  in.v = Tensor(dtype, c.B, kv_tokens, c.H, c.D, 3);
  in.dout = Tensor(dout_dtype, c.B, p.grid.tokens(), c.H, c.D, 2);
  in.q.fill_normal(rng, 1.5);
  in.k.fill_normal(rng, 1.5);
  in.v.fill_normal(rng);
  in.dout.fill_normal(rng);
  return in;
}

Status backward(bool monarch, bool reference, const Inputs& in, const TensorView& dq,
                const TensorView& dk, const TensorView& dv, const AttentionParams& p) {
  const TensorView &q = in.q.view, &k = in.k.view, &v = in.v.view, &o = in.dout.view;
  if (reference) {
    return monarch ? ref::monarch_attention_backward(q, k, v, o, dq, dk, dv, p)
                   : ref::dense_attention_backward(q, k, v, o, dq, dk, dv, p);
  }
  return monarch ? cpu::monarch_attention_backward(q, k, v, o, dq, dk, dv, p)
                 : cpu::dense_attention_backward(q, k, v, o, dq, dk, dv, p);
}

struct Grads {
  Tensor dq{DType::kF32, 1, 1, 1, 1}, dk = dq, dv = dq;
  Grads() = default;
  Grads(const Inputs& in, DType tq, DType tk, DType tv) {
    const TensorView &q = in.q.view, &k = in.k.view;
    dq = Tensor(tq, q.batch(), q.tokens(), q.heads(), q.head_dim(), 2);
    dk = Tensor(tk, k.batch(), k.tokens(), k.heads(), k.head_dim(), 1);
    dv = Tensor(tv, k.batch(), k.tokens(), k.heads(), k.head_dim());
  }
};

// The worst relative error seen per test, printed at its end.
std::map<std::string, double>& worst() {
  static std::map<std::string, double> w;
  return w;
}

void print_worst(const std::string& test) {
  for (const auto& kv : worst()) {
    if (kv.first.rfind(test, 0) == 0) {
      std::printf("[ fp32 err ] %-36s max relative L2 %.3g\n", kv.first.c_str(), kv.second);
    }
  }
}

// Runs both backward passes and compares each gradient (relative L2 < tolerance); every element
// the reference makes exactly zero (keys no query attends) must be exactly zero in the fast path.
void expect_match(const std::string& test, bool monarch, const Case& c, const AttentionParams& p,
                  Rng& rng, int64_t kv_tokens, DType dtype = DType::kF32,
                  DType dout_dtype = DType::kF32, DType grad_dtype = DType::kF32,
                  double tolerance = kFp32Tolerance) {
  const std::string name = describe(monarch, c, p, dtype);
  SCOPED_TRACE(name);
  const Inputs in = make_inputs(rng, dtype, c, p, kv_tokens, dout_dtype);
  Grads want(in, DType::kF64, DType::kF64, DType::kF64);
  Grads got(in, grad_dtype, grad_dtype, grad_dtype);
  for (Tensor* t : {&got.dq, &got.dk, &got.dv}) test::poison(*t);
  Status s = backward(monarch, true, in, want.dq.view, want.dk.view, want.dv.view, p);
  ASSERT_TRUE(s.ok()) << s.to_string();
  s = backward(monarch, false, in, got.dq.view, got.dk.view, got.dv.view, p);
  ASSERT_TRUE(s.ok()) << s.to_string();
  const char* names[3] = {"dq", "dk", "dv"};
  const Tensor* g[3] = {&got.dq, &got.dk, &got.dv};
  const Tensor* w[3] = {&want.dq, &want.dk, &want.dv};
  for (int i = 0; i < 3; ++i) {
    const std::vector<double> a = g[i]->values(), r = w[i]->values();
    ASSERT_TRUE(test::all_finite(a)) << names[i] << ": unwritten or non-finite element";
    size_t zeros = 0;
    for (size_t e = 0; e < r.size(); ++e) {
      if (r[e] == 0.0) {
        ++zeros;
        ASSERT_EQ(a[e], 0.0) << names[i] << " element " << e << ": the reference gives exactly 0";
      }
    }
    if (zeros == r.size()) continue;  // e.g. dq, dk of a softmax over a single key
    const double err = test::relative_l2(a, r);
    EXPECT_LT(err, tolerance) << names[i];
    double& wst = worst()[test + (monarch ? " monarch " : " dense ") + names[i]];
    wst = std::max(wst, err);
  }
}

AttentionParams full_params(const Case& c, bool causal) {
  AttentionParams p;
  p.grid = c.grid;
  p.layout = c.layout;
  p.causal_chunk_frames = causal ? c.causal_chunk : 0;
  return p;
}

TEST(CpuBackward, MonarchMatchesReference) {
  Rng rng(101);
  for (const Case& c : kCases) {
    for (bool causal : {false, true}) {
      if (causal && c.causal_chunk == 0) continue;
      expect_match("shapes", true, c, full_params(c, causal), rng, c.grid.tokens());
    }
  }
  // An explicit scale.
  AttentionParams p = full_params(kCases[1], true);
  p.scale = 0.7;
  expect_match("shapes", true, kCases[1], p, rng, kCases[1].grid.tokens());
  print_worst("shapes monarch");
}

TEST(CpuBackward, DenseMatchesReference) {
  Rng rng(102);
  for (const Case& c : kCases) {
    // Dense ignores the tiling; the 30x52 grids (3120, 4680 tokens) add nothing but time: the
    // 6x52 frames already end in partial query and key blocks.
    if (c.grid.tokens() > 2000) continue;
    for (bool causal : {false, true}) {
      if (causal && c.causal_chunk == 0) continue;
      expect_match("shapes", false, c, full_params(c, causal), rng, c.grid.tokens());
    }
  }
  print_worst("shapes dense");
}

TEST(CpuBackward, KvCacheWithSinkAndWindow) {
  Rng rng(103);
  const Case c{{2, 3, 4}, {2, 1, 2}, 2, 2, 8, 0};  // 6x2 tiles, f_tied 2
  const int64_t per_frame = c.grid.tokens_per_frame();
  for (int64_t cache : {2, 6, 10}) {
    for (auto sw : {std::pair<int64_t, int64_t>{0, 0}, {2, 4}, {0, 2}, {4, 4}}) {
      for (bool monarch : {true, false}) {
        AttentionParams p = full_params(c, false);
        p.kv_cache = true;
        p.sink_frames = sw.first;
        p.window_frames = sw.second;
        expect_match("kv", monarch, c, p, rng, cache * per_frame);
      }
    }
  }
  print_worst("kv");
}

TEST(CpuBackward, KvCacheRingBuffer) {
  Rng rng(104);
  struct Ring {
    Case c;
    int64_t capacity, written, sink, window;  // in units of f_tied
  };
  const Ring rings[] = {
      {{{1, 1, 3}, {1, 1, 1}, 2, 2, 3, 0}, 4, 7, 1, 2},  // one slot holds an overwritten frame
      {{{2, 2, 3}, {2, 1, 1}, 1, 1, 5, 0}, 3, 5, 0, 3},  // no sink, the window is the whole ring
      {{{1, 4, 4}, {1, 2, 2}, 1, 2, 3, 0}, 5, 3, 1, 0},  // not yet full: slots never written
      {{{2, 3, 4}, {2, 1, 2}, 2, 1, 8, 0}, 5, 9, 1, 3},  // 6x2 tiles, wrapped twice
  };
  for (const Ring& rc : rings) {
    const int64_t f = rc.c.layout.f_tied;
    for (bool monarch : {true, false}) {
      AttentionParams p = full_params(rc.c, false);
      p.kv_cache = true;
      p.sink_frames = rc.sink * f;
      p.window_frames = rc.window * f;
      p.cache_capacity_frames = rc.capacity * f;
      p.cache_frames = rc.written * f;
      expect_match("ring", monarch, rc.c, p, rng, rc.capacity * f * rc.c.grid.tokens_per_frame());
    }
  }
  print_worst("ring");
}

TEST(CpuBackward, EveryDtype) {
  Rng rng(105);
  const Case c{{3, 3, 5}, {1, 1, 1}, 2, 2, 8, 1};
  for (DType dtype : {DType::kF16, DType::kBF16, DType::kF64, DType::kF32}) {
    for (bool monarch : {true, false}) {
      // Inputs of every dtype, dout of another, gradients in fp64 (holding the fp32 result).
      const DType dout_dtype = dtype == DType::kF32 ? DType::kBF16 : DType::kF32;
      expect_match("dtypes", monarch, c, full_params(c, true), rng, c.grid.tokens(), dtype,
                   dout_dtype, DType::kF64);
    }
  }
  // Gradients stored in fp16 and bf16: their rounding (2^-11, 2^-8 relative) dominates.
  for (bool monarch : {true, false}) {
    expect_match("dtypes f16 out", monarch, c, full_params(c, true), rng, c.grid.tokens(),
                 DType::kF32, DType::kF32, DType::kF16, 1e-3);
    expect_match("dtypes bf16 out", monarch, c, full_params(c, true), rng, c.grid.tokens(),
                 DType::kF32, DType::kF32, DType::kBF16, 8e-3);
  }
  print_worst("dtypes");
}

// Logits in the hundreds: finite gradients. The fp32 rounding of the scores is amplified in
// proportion to the logits (measured on this shape, Monarch dq: 1.3e-5 at scale 1, 1.2e-4 at 4,
// 1.2e-3 at 16, 2.5e-3 at 32; dense about 50x less), as in the forward (tests/test_cpu.cpp).
TEST(CpuBackward, LargeLogits) {
  Rng rng(106);
  const Case c{{2, 6, 52}, {1, 2, 1}, 1, 2, 16, 1};
  for (bool monarch : {true, false}) {
    AttentionParams p = full_params(c, true);
    p.scale = 8.0 * 8.0 / 4.0;  // as if q and k were 8x larger
    expect_match("large logits", monarch, c, p, rng, c.grid.tokens(), DType::kF32, DType::kF32,
                 DType::kF32, 4e-3);
  }
  print_worst("large logits");
}

TEST(CpuBackward, ThreadCountDoesNotChangeResults) {
  Rng rng(107);
  struct Setting {
    Case c;
    bool kv;
  };
  const Setting settings[] = {
      {{{3, 10, 52}, {1, 2, 1}, 1, 2, 8, 1}, false},  // 6 query tiles of 5x52, block-causal
      {{{4, 4, 6}, {2, 2, 3}, 2, 1, 7, 0}, false},    // 8 query tiles, bidirectional
      {{{2, 3, 4}, {2, 1, 2}, 1, 2, 8, 0}, true},     // KV ring
  };
  for (const Setting& st : settings) {
    for (bool monarch : {true, false}) {
      AttentionParams p = full_params(st.c, true);
      int64_t kv_tokens = st.c.grid.tokens();
      if (st.kv) {
        p.kv_cache = true;
        p.sink_frames = 2;
        p.window_frames = 4;
        p.cache_capacity_frames = 6;
        p.cache_frames = 10;
        kv_tokens = 6 * st.c.grid.tokens_per_frame();
      }
      const Inputs in = make_inputs(rng, DType::kF32, st.c, p, kv_tokens, DType::kF32);
      std::vector<std::vector<double>> results[3];
      for (int threads : {1, 3, 2}) {
        cpu::set_num_threads(threads);
        Grads g(in, DType::kF32, DType::kF32, DType::kF32);
        const Status s = backward(monarch, false, in, g.dq.view, g.dk.view, g.dv.view, p);
        ASSERT_TRUE(s.ok()) << s.to_string();
        results[0].push_back(g.dq.values());
        results[1].push_back(g.dk.values());
        results[2].push_back(g.dv.values());
      }
      cpu::set_num_threads(0);
      for (int i = 0; i < 3; ++i) {
        EXPECT_EQ(results[i][0], results[i][1]) << (monarch ? "monarch" : "dense") << " grad " << i;
        EXPECT_EQ(results[i][0], results[i][2]) << (monarch ? "monarch" : "dense") << " grad " << i;
      }
    }
  }
}

// ---- bad input -------------------------------------------------------------------------------

// A valid, Monarch-valid problem every case breaks one rule of (as in tests/test_backward.cpp).
struct Bad {
  AttentionParams params;
  Inputs in;
  Tensor dq{DType::kF32, 2, 48, 2, 4, 1}, dk{DType::kF16, 2, 48, 2, 4}, dv{DType::kF64, 2, 48, 2, 4, 2};
  Bad() {
    Rng rng(41);
    params.grid = VideoGrid{4, 2, 6};
    params.layout = MonarchLayout{2, 1, 2};
    params.causal_chunk_frames = 2;
    const Case c{params.grid, params.layout, 2, 2, 4, 2};
    in = make_inputs(rng, DType::kF64, c, params, 48, DType::kF64);
  }
};

void fill_sentinel(std::vector<uint8_t>& bytes) {
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(0x5A ^ (i * 151));
}

// The fast path rejects the mutated problem exactly as the reference does (code and message) and
// writes nothing. monarch_only: the mutation breaks a Monarch rule only (dense stays valid).
void expect_same_error(const std::string& what, const std::function<void(Bad&)>& mutate,
                       bool monarch_only = false) {
  for (bool monarch : {true, false}) {
    if (monarch_only && !monarch) continue;
    SCOPED_TRACE(what + (monarch ? " (monarch)" : " (dense)"));
    Status results[2];
    for (bool reference : {true, false}) {
      Bad bad;
      mutate(bad);
      for (Tensor* t : {&bad.dq, &bad.dk, &bad.dv}) fill_sentinel(t->storage);
      const std::vector<uint8_t> dq0 = bad.dq.storage, dk0 = bad.dk.storage, dv0 = bad.dv.storage;
      results[reference] = backward(monarch, reference, bad.in, bad.dq.view, bad.dk.view, bad.dv.view, bad.params);
      EXPECT_FALSE(results[reference].ok()) << "the mutation must be an error";
      EXPECT_TRUE(bad.dq.storage == dq0 && bad.dk.storage == dk0 && bad.dv.storage == dv0)
          << "a gradient was written despite the error";
    }
    EXPECT_EQ(results[0].code(), results[1].code());
    EXPECT_EQ(results[0].message(), results[1].message());
  }
}

TEST(CpuBackward, BadInputGivesTheReferenceErrors) {
  {  // the control: valid, every element written
    Bad bad;
    for (Tensor* t : {&bad.dq, &bad.dk, &bad.dv}) fill_sentinel(t->storage);
    for (bool monarch : {true, false}) {
      const Status s = backward(monarch, false, bad.in, bad.dq.view, bad.dk.view, bad.dv.view, bad.params);
      ASSERT_TRUE(s.ok()) << s.to_string();
      for (Tensor* t : {&bad.dq, &bad.dk, &bad.dv}) EXPECT_TRUE(test::all_finite(t->values()));
    }
  }
  expect_same_error("dout shape", [](Bad& b) { b.in.dout = Tensor(DType::kF64, 2, 48, 2, 5); });
  expect_same_error("dq shape", [](Bad& b) { b.dq = Tensor(DType::kF32, 2, 48, 3, 4); });
  expect_same_error("dk shape", [](Bad& b) { b.dk = Tensor(DType::kF32, 2, 49, 2, 4); });
  expect_same_error("dv shape", [](Bad& b) { b.dv = Tensor(DType::kF32, 3, 48, 2, 4); });
  expect_same_error("num_iters 2", [](Bad& b) { b.params.num_iters = 2; }, true);
  expect_same_error("num_iters 0", [](Bad& b) { b.params.num_iters = 0; });
  expect_same_error("all on cuda", [](Bad& b) {
    for (Tensor* t : {&b.in.q, &b.in.k, &b.in.v, &b.in.dout, &b.dq, &b.dk, &b.dv}) t->view.device = Device::kCUDA;
  });
  expect_same_error("dv on cuda", [](Bad& b) { b.dv.view.device = Device::kCUDA; });
  expect_same_error("dout null", [](Bad& b) { b.in.dout.view.data = nullptr; });
  expect_same_error("dq self-overlapping", [](Bad& b) { b.dq.view.stride[2] = 0; });
  expect_same_error("dk is dq", [](Bad& b) { b.dk = b.dq; b.dk.view.data = b.dq.view.data; });
  expect_same_error("bad tiling", [](Bad& b) { b.params.layout = MonarchLayout{3, 1, 1}; }, true);
  expect_same_error("chunk not whole tiles", [](Bad& b) { b.params.causal_chunk_frames = 1; }, true);
  expect_same_error("q dtype", [](Bad& b) { b.in.q = Tensor(DType::kF32, 2, 48, 2, 4); });
  expect_same_error("kv window too small", [](Bad& b) {
    b.params.causal_chunk_frames = 0;
    b.params.kv_cache = true;
    b.params.grid.T = 2;
    b.params.window_frames = 1;
    b.in.q = Tensor(DType::kF64, 2, 24, 2, 4);
    b.in.dout = b.in.q;
    b.dq = Tensor(DType::kF32, 2, 24, 2, 4);
  });
}

}  // namespace
}  // namespace monarchrt
