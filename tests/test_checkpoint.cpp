// Checkpoint readers: safetensors written by encode_safetensors and torch.save-style zip files
// built here byte by byte (protocol-2 pickle with _rebuild_tensor_v2, nested generator /
// generator_ema dicts, strided views, parameters, every storage dtype), read back exactly; then
// fuzzed: every truncation and thousands of corrupted copies must give an error or a valid
// result, never a crash (CI runs this under ASan + UBSan). Real torch.save files are checked
// against torch itself in python/tests/test_checkpoint.py.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "monarchrt/checkpoint.h"
#include "monarchrt/workload.h"
#include "checkpoint_writers.h"
#include "test_util.h"

namespace monarchrt {
namespace {

using test::put_le;
using test::PickleWriter;
using test::ZipWriter;

template <typename T>
std::vector<uint8_t> bytes_of(const std::vector<T>& v) {
  std::vector<uint8_t> b(v.size() * sizeof(T));
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

// {"generator": {w (f32 4x3), p (f32 parameter 2x2), t (f16, transposed 3x2 view of 2x3),
//   v (bf16 slice [1:4] of 6), d (f64 scalar)}, "generator_ema": same dict (memo), "step": 7}
struct TorchSample {
  std::vector<uint8_t> file;
  std::vector<float> w, p, t, v;
  double d = 0;
};

TorchSample torch_sample() {
  TorchSample s;
  Rng rng(3);
  for (int i = 0; i < 12; ++i) s.w.push_back(float(rng.normal()));
  for (int i = 0; i < 4; ++i) s.p.push_back(float(rng.normal()));
  std::vector<uint16_t> half_storage, bf_storage;
  std::vector<float> half_values;  // storage order [2][3]
  for (int i = 0; i < 6; ++i) {
    half_storage.push_back(float_to_half(float(rng.normal())));
    half_values.push_back(half_to_float(half_storage.back()));
    bf_storage.push_back(float_to_bf16(float(rng.normal())));
  }
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 2; ++c) s.t.push_back(half_values[c * 3 + r]);  // transpose
  for (int i = 1; i < 4; ++i) s.v.push_back(bf16_to_float(bf_storage[i]));
  s.d = 0.125;
  PickleWriter pk;
  pk.op(0x80);
  pk.op(2);
  pk.op('}');
  pk.put();
  pk.op('(');
  pk.str("generator");
  pk.global("collections", "OrderedDict");
  pk.op(')');
  pk.op('R');
  const int inner = pk.memo;
  pk.put();
  pk.op('(');
  pk.str("model.blocks.0.ffn.0.weight");
  pk.tensor("FloatStorage", "0", 12, 0, {4, 3}, {3, 1}, false);
  pk.str("model.head.modulation");
  pk.tensor("FloatStorage", "1", 4, 0, {2, 2}, {2, 1}, true);
  pk.str("t");
  pk.tensor("HalfStorage", "2", 6, 0, {3, 2}, {1, 3}, false);
  pk.str("v");
  pk.tensor("BFloat16Storage", "3", 6, 1, {3}, {1}, false);
  pk.str("d");
  pk.tensor("DoubleStorage", "4", 1, 0, {}, {}, false);
  pk.op('u');  // SETITEMS into the inner dict
  pk.str("generator_ema");
  pk.op('h');  // BINGET the same inner dict
  pk.op(uint8_t(inner));
  pk.str("step");
  pk.integer(7);
  pk.op('u');
  pk.op('.');
  ZipWriter z;
  z.add("archive/data.pkl", pk.b);
  z.add("archive/byteorder", {'l', 'i', 't', 't', 'l', 'e'});
  z.add("archive/data/0", bytes_of(s.w));
  z.add("archive/data/1", bytes_of(s.p));
  z.add("archive/data/2", bytes_of(half_storage));
  z.add("archive/data/3", bytes_of(bf_storage));
  z.add("archive/data/4", bytes_of(std::vector<double>{s.d}));
  z.add("archive/version", {'3', '\n'});
  s.file = z.finish();
  return s;
}

void expect_tensor(const Checkpoint& ck, const std::string& name, DType dtype, std::vector<int64_t> shape,
                   const std::vector<float>& want) {
  const CheckpointTensor* t = ck.find(name);
  ASSERT_NE(t, nullptr) << name;
  EXPECT_EQ(t->dtype, dtype) << name;
  EXPECT_EQ(t->shape, shape) << name;
  std::vector<float> got;
  ASSERT_TRUE(ck.read_f32(*t, &got).ok()) << name;
  EXPECT_EQ(got, want) << name;
}

TEST(Checkpoint, TorchZipNestedDictsEveryDtypeAndStridedViews) {
  const TorchSample s = torch_sample();
  Checkpoint ck;
  const Status st = Checkpoint::open(memory_source(s.file, "sample.pt"), &ck);
  ASSERT_TRUE(st.ok()) << st.to_string();
  EXPECT_EQ(ck.format(), Checkpoint::Format::kTorchZip);
  EXPECT_EQ(ck.tensors().size(), 10u);  // 5 tensors under each of the two names, "step" skipped
  for (const char* prefix : {"generator/", "generator_ema/"}) {
    const std::string p = prefix;
    expect_tensor(ck, p + "model.blocks.0.ffn.0.weight", DType::kF32, {4, 3}, s.w);
    expect_tensor(ck, p + "model.head.modulation", DType::kF32, {2, 2}, s.p);
    expect_tensor(ck, p + "t", DType::kF16, {3, 2}, s.t);
    expect_tensor(ck, p + "v", DType::kBF16, {3}, s.v);
    expect_tensor(ck, p + "d", DType::kF64, {}, {float(s.d)});
  }
  // The same bytes from a file.
  test::TempDir dir("checkpoint");
  const std::string path = dir.path() + "/sample.pt";
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(s.file.data()), long(s.file.size()));
  Checkpoint from_file;
  ASSERT_TRUE(Checkpoint::open(path, &from_file).ok());
  expect_tensor(from_file, "generator_ema/t", DType::kF16, {3, 2}, s.t);
}

TEST(Checkpoint, SafetensorsRoundTripEveryDtype) {
  std::vector<float> f32 = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -1.0f};
  std::vector<double> f64 = {0.5, -0.25};
  std::vector<uint16_t> f16 = {float_to_half(1.0f), float_to_half(-3.5f), float_to_half(0.125f)};
  std::vector<uint16_t> bf16 = {float_to_bf16(2.0f), float_to_bf16(-0.5f)};
  std::vector<SafetensorsEntry> entries = {
      {"blocks.0.self_attn.q.weight", DType::kF32, {2, 3}, f32.data()},
      {"head.modulation", DType::kF64, {1, 2, 1}, f64.data()},
      {"half", DType::kF16, {3}, f16.data()},
      {"bf", DType::kBF16, {2, 1}, bf16.data()},
      {"empty", DType::kF32, {0, 4}, nullptr},
  };
  std::vector<uint8_t> bytes;
  ASSERT_TRUE(encode_safetensors(entries, &bytes).ok());
  Checkpoint ck;
  const Status st = Checkpoint::open(memory_source(bytes, "w.safetensors"), &ck);
  ASSERT_TRUE(st.ok()) << st.to_string();
  EXPECT_EQ(ck.format(), Checkpoint::Format::kSafetensors);
  expect_tensor(ck, "blocks.0.self_attn.q.weight", DType::kF32, {2, 3}, f32);
  expect_tensor(ck, "head.modulation", DType::kF64, {1, 2, 1}, {0.5f, -0.25f});
  expect_tensor(ck, "half", DType::kF16, {3}, {1.0f, -3.5f, 0.125f});
  expect_tensor(ck, "bf", DType::kBF16, {2, 1}, {2.0f, -0.5f});
  expect_tensor(ck, "empty", DType::kF32, {0, 4}, {});
  EXPECT_EQ(ck.find("missing"), nullptr);
}

TEST(Checkpoint, ClearErrors) {
  Checkpoint ck;
  Status s = Checkpoint::open("/nonexistent/weights.safetensors", &ck);
  EXPECT_EQ(s.code(), StatusCode::kIoError);
  EXPECT_NE(s.message().find("/nonexistent/weights.safetensors"), std::string::npos);
  test::TempDir dir("checkpoint");
  s = Checkpoint::open(dir.path(), &ck);
  EXPECT_NE(s.message().find("directory"), std::string::npos);
  // Unsupported dtype in safetensors, named with the tensor.
  const std::string header = R"({"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})";
  std::vector<uint8_t> b;
  put_le(b, header.size(), 8);
  b.insert(b.end(), header.begin(), header.end());
  put_le(b, 5, 8);
  s = Checkpoint::open(memory_source(b, "ids.safetensors"), &ck);
  EXPECT_EQ(s.code(), StatusCode::kUnsupported);
  EXPECT_NE(s.message().find("'ids'"), std::string::npos);
  EXPECT_NE(s.message().find("I64"), std::string::npos);
  // A pickle that names an arbitrary callable is refused before anything runs.
  PickleWriter pk;
  pk.op(0x80);
  pk.op(2);
  pk.global("os", "system");
  pk.str("echo pwned");
  pk.op(0x85);
  pk.op('R');
  pk.op('.');
  ZipWriter z;
  z.add("archive/data.pkl", pk.b);
  s = Checkpoint::open(memory_source(z.finish(), "evil.pt"), &ck);
  EXPECT_EQ(s.code(), StatusCode::kUnsupported);
  EXPECT_NE(s.message().find("os.system"), std::string::npos);
  // A .pt holding {"x": tensor} on one storage of `storage_bytes` bytes.
  auto one_tensor = [](const std::string& storage_type, int64_t numel, int64_t offset, int64_t size,
                       size_t storage_bytes) {
    PickleWriter pw;
    pw.op(0x80);
    pw.op(2);
    pw.op('}');
    pw.str("x");
    pw.tensor(storage_type, "0", numel, offset, {size}, {1}, false);
    pw.op('s');
    pw.op('.');
    ZipWriter zw;
    zw.add("archive/data.pkl", pw.b);
    zw.add("archive/data/0", std::vector<uint8_t>(storage_bytes, 0));
    return zw.finish();
  };
  // Integer storages (not model weights here) are named.
  s = Checkpoint::open(memory_source(one_tensor("LongStorage", 1, 0, 1, 8), "long.pt"), &ck);
  EXPECT_EQ(s.code(), StatusCode::kUnsupported);
  EXPECT_NE(s.message().find("LongStorage"), std::string::npos);
  // A tensor reaching past its storage.
  s = Checkpoint::open(memory_source(one_tensor("FloatStorage", 4, 2, 3, 16), "over.pt"), &ck);
  EXPECT_EQ(s.code(), StatusCode::kCorruptData);
  EXPECT_NE(s.message().find("'x'"), std::string::npos);
}

// Opens `bytes` and, on success, reads every tensor: any outcome but a crash is fine, and a
// successful open must be consistent (reads succeed from a memory source).
void open_and_read(const std::vector<uint8_t>& bytes) {
  Checkpoint ck;
  if (!Checkpoint::open(memory_source(bytes, "fuzz"), &ck).ok()) return;
  for (const CheckpointTensor& t : ck.tensors()) {
    if (t.numel() > (int64_t{1} << 20)) continue;  // a corrupted size may be huge but still valid
    std::vector<float> data;
    EXPECT_TRUE(ck.read_f32(t, &data).ok()) << t.name;
  }
}

void fuzz(const std::vector<uint8_t>& good, uint64_t seed) {
  for (size_t n = 0; n < good.size(); ++n) {
    std::vector<uint8_t> cut(good.begin(), good.begin() + long(n));
    open_and_read(cut);
  }
  Rng rng(seed);
  for (int trial = 0; trial < 4000; ++trial) {
    std::vector<uint8_t> bad = good;
    const int edits = 1 + int(rng.uniform() * 4);
    for (int e = 0; e < edits; ++e) {
      const size_t at = size_t(rng.uniform() * double(bad.size())) % bad.size();
      bad[at] = trial % 2 ? uint8_t(rng.uniform() * 256) : uint8_t(bad[at] ^ (1u << (trial % 8)));
    }
    open_and_read(bad);
  }
}

TEST(Checkpoint, FuzzTorchZip) { fuzz(torch_sample().file, 11); }

TEST(Checkpoint, FuzzSafetensors) {
  std::vector<float> a = {1, 2, 3, 4, 5, 6};
  std::vector<uint16_t> h = {float_to_half(1.0f), float_to_half(2.0f)};
  std::vector<uint8_t> bytes;
  ASSERT_TRUE(encode_safetensors({{"a", DType::kF32, {2, 3}, a.data()}, {"h", DType::kF16, {2}, h.data()}}, &bytes).ok());
  fuzz(bytes, 12);
}

}  // namespace
}  // namespace monarchrt
