// The .npy reader and writer: round trips through encode_npy/parse_npy and write_npy/read_npy
// (float16/32/64, rank 0 to 5, zero-size dimensions), byte images of the headers NumPy writes
// (format 1.0, 2.0 and 3.0, '<', '=' and big-endian '>' descriptors that must be byte-swapped,
// shapes with and without a trailing comma, Python 2 longs), malformed and unsupported files,
// which must fail with the right code and a message naming the problem and must leave the
// output alone, I/O errors, and a deterministic mutation fuzzer over valid images: parse_npy
// must never crash or read out of bounds (CI runs it under ASan + UBSan), and whatever it
// accepts must be self-consistent and survive a re-encode.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "monarchrt/npy.h"
#include "monarchrt/workload.h"
#include "test_util.h"

namespace monarchrt {
namespace {

using Bytes = std::vector<uint8_t>;

// ---- helpers -----------------------------------------------------------------------------------

// A .npy image as NumPy lays it out: magic, version, little-endian header length (2 bytes for
// 1.0, 4 for 2.0 and 3.0), the header dict padded with spaces and a final '\n' so that the data
// starts at a multiple of `align` (64 since NumPy 1.14, 16 before; 0: no padding, no newline).
Bytes npy_image(int major, const std::string& dict, const Bytes& data, size_t align = 64) {
  const size_t prefix = major == 1 ? 10 : 12;
  std::string header = dict;
  if (align > 0) {
    header.append((align - (prefix + header.size() + 1) % align) % align, ' ');
    header += '\n';
  }
  Bytes img = {0x93, 'N', 'U', 'M', 'P', 'Y', static_cast<uint8_t>(major), 0};
  const size_t n = header.size();
  img.push_back(static_cast<uint8_t>(n & 0xff));
  img.push_back(static_cast<uint8_t>((n >> 8) & 0xff));
  if (major != 1) {
    img.push_back(static_cast<uint8_t>((n >> 16) & 0xff));
    img.push_back(static_cast<uint8_t>((n >> 24) & 0xff));
  }
  img.insert(img.end(), header.begin(), header.end());
  img.insert(img.end(), data.begin(), data.end());
  return img;
}

std::string dict(const std::string& descr, const std::string& shape, const char* order = "False") {
  return "{'descr': '" + descr + "', 'fortran_order': " + order + ", 'shape': " + shape + ", }";
}

// Parses from an exactly sized heap copy, so that AddressSanitizer sees any read past the end.
Status parse(const Bytes& img, NpyArray* out, const std::string& what = "img") {
  std::unique_ptr<uint8_t[]> copy(img.empty() ? nullptr : new uint8_t[img.size()]);
  if (!img.empty()) std::memcpy(copy.get(), img.data(), img.size());
  return parse_npy(copy.get(), img.size(), what, out);
}

Bytes random_bytes(Rng& rng, size_t n) {
  Bytes b(n);
  for (uint8_t& x : b) x = static_cast<uint8_t>(rng.next() >> 56);
  return b;
}

// Little-endian bytes of native values (the tests run on little-endian hosts only).
template <typename T>
Bytes le_bytes(const std::vector<T>& values) {
  Bytes b(values.size() * sizeof(T));
  std::memcpy(b.data(), values.data(), b.size());
  return b;
}
template <typename T>
Bytes be_bytes(const std::vector<T>& values) {
  Bytes b = le_bytes(values);
  for (size_t i = 0; i < b.size(); i += sizeof(T)) std::reverse(b.begin() + i, b.begin() + i + sizeof(T));
  return b;
}

// A sentinel that no successful parse produces, to prove a failed parse leaves `out` alone.
NpyArray sentinel_array() {
  NpyArray a;
  a.dtype = DType::kBF16;
  a.shape = {7, 11};
  a.data = {1, 2, 3};
  return a;
}
bool is_sentinel(const NpyArray& a) {
  const NpyArray s = sentinel_array();
  return a.dtype == s.dtype && a.shape == s.shape && a.data == s.data;
}

Bytes read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return Bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}
void write_file(const std::string& path, const Bytes& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

const DType kDtypes[] = {DType::kF16, DType::kF32, DType::kF64};

const std::vector<std::vector<int64_t>> kShapes = {
    {}, {1}, {5}, {0}, {2, 3}, {3, 0}, {2, 0, 3}, {3, 1, 4, 2}, {2, 1, 3, 1, 2}, {1, 2, 1, 0, 3},
};

int64_t product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// ---- round trips -------------------------------------------------------------------------------

TEST(Npy, RoundTripInMemory) {
  Rng rng(1);
  for (DType dtype : kDtypes) {
    for (const auto& shape : kShapes) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + " rank " + std::to_string(shape.size()));
      // Arbitrary bit patterns (NaNs, infinities, subnormals) must come back bit for bit.
      const Bytes data = random_bytes(rng, static_cast<size_t>(product(shape) * dtype_size(dtype)));
      Bytes img;
      ASSERT_TRUE(encode_npy(dtype, shape, data.data(), &img).ok());
      // NumPy's layout: version 1.0, header + '\n' ending at a multiple of 64 bytes.
      ASSERT_GE(img.size(), 10u);
      EXPECT_EQ(img[6], 1);
      EXPECT_EQ(img[7], 0);
      const size_t header_len = img[8] | (img[9] << 8);
      EXPECT_EQ((10 + header_len) % 64, 0u);
      EXPECT_EQ(img[10 + header_len - 1], '\n');
      EXPECT_EQ(img.size(), 10 + header_len + data.size());
      NpyArray a;
      const Status s = parse(img, &a);
      ASSERT_TRUE(s.ok()) << s.to_string();
      EXPECT_EQ(a.dtype, dtype);
      EXPECT_EQ(a.shape, shape);
      EXPECT_EQ(a.numel(), product(shape));
      EXPECT_TRUE(a.data == data);
    }
  }
}

TEST(Npy, EncodedHeaderIsWhatNumpyWrites) {
  const float f[6] = {0, 1, 2, 3, 4, 5};
  struct Case {
    DType dtype;
    std::vector<int64_t> shape;
    std::string header;
  };
  const Case cases[] = {
      {DType::kF32, {2, 3}, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"},
      {DType::kF16, {5}, "{'descr': '<f2', 'fortran_order': False, 'shape': (5,), }"},
      {DType::kF64, {}, "{'descr': '<f8', 'fortran_order': False, 'shape': (), }"},
      {DType::kF32, {1, 0, 3}, "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 0, 3), }"},
  };
  for (const Case& c : cases) {
    Bytes img;
    ASSERT_TRUE(encode_npy(c.dtype, c.shape, f, &img).ok());
    const size_t header_len = img[8] | (img[9] << 8);
    std::string header(img.begin() + 10, img.begin() + 10 + header_len);
    EXPECT_EQ(header.substr(0, c.header.size()), c.header);
    EXPECT_EQ(header.find_first_not_of(' ', c.header.size()), header.size() - 1) << "padding: '" << header << "'";
  }
}

TEST(Npy, RoundTripThroughFiles) {
  test::TempDir dir{"npy"};
  Rng rng(2);
  for (DType dtype : kDtypes) {
    for (const auto& shape : kShapes) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + " rank " + std::to_string(shape.size()));
      const std::string path = dir.file("a.npy");
      const Bytes data = random_bytes(rng, static_cast<size_t>(product(shape) * dtype_size(dtype)));
      ASSERT_TRUE(write_npy(path, dtype, shape, data.data()).ok());
      Bytes img;
      ASSERT_TRUE(encode_npy(dtype, shape, data.data(), &img).ok());
      EXPECT_TRUE(read_file(path) == img) << "write_npy and encode_npy disagree";
      NpyArray a;
      const Status s = read_npy(path, &a);
      ASSERT_TRUE(s.ok()) << s.to_string();
      EXPECT_EQ(a.dtype, dtype);
      EXPECT_EQ(a.shape, shape);
      EXPECT_TRUE(a.data == data);
    }
  }
  // Overwriting a larger file truncates it.
  const std::string path = dir.file("b.npy");
  const Bytes big = random_bytes(rng, 4 * 1000);
  ASSERT_TRUE(write_npy(path, DType::kF32, {1000}, big.data()).ok());
  const float one = 1.0f;
  ASSERT_TRUE(write_npy(path, DType::kF32, {1}, &one).ok());
  NpyArray a;
  ASSERT_TRUE(read_npy(path, &a).ok());
  EXPECT_EQ(a.shape, std::vector<int64_t>{1});
  EXPECT_EQ(a.data, le_bytes(std::vector<float>{1.0f}));
}

// ---- headers NumPy writes ----------------------------------------------------------------------

TEST(Npy, HeadersNumpyWrites) {
  const std::vector<float> f6 = {1.5f, -2.0f, 3.25f, 0.0f, -0.0f, 1e-40f};
  const Bytes d6 = le_bytes(f6);
  struct Case {
    const char* what;
    Bytes img;
    DType dtype;
    std::vector<int64_t> shape;
    Bytes data;
  };
  const Case cases[] = {
      {"1.0, 64-byte aligned", npy_image(1, dict("<f4", "(2, 3)"), d6), DType::kF32, {2, 3}, d6},
      {"1.0, 16-byte aligned (NumPy < 1.14)", npy_image(1, dict("<f4", "(2, 3)"), d6, 16), DType::kF32, {2, 3}, d6},
      {"1.0, no padding", npy_image(1, dict("<f4", "(2, 3)"), d6, 0), DType::kF32, {2, 3}, d6},
      {"trailing comma", npy_image(1, dict("<f4", "(2, 3,)"), d6), DType::kF32, {2, 3}, d6},
      {"one dim", npy_image(1, dict("<f4", "(6,)"), d6), DType::kF32, {6}, d6},
      {"one dim, no comma", npy_image(1, dict("<f4", "(6)"), d6), DType::kF32, {6}, d6},
      {"Python 2 longs", npy_image(1, dict("<f4", "(3L, 2L)"), d6), DType::kF32, {3, 2}, d6},
      {"Python 2 long, one dim", npy_image(1, dict("<f4", "(6L,)"), d6), DType::kF32, {6}, d6},
      {"native order '='", npy_image(1, dict("=f4", "(6,)"), d6), DType::kF32, {6}, d6},
      {"2.0", npy_image(2, dict("<f4", "(3, 2)"), d6), DType::kF32, {3, 2}, d6},
      {"3.0", npy_image(3, dict("<f4", "(1, 6)"), d6), DType::kF32, {1, 6}, d6},
      {"keys in another order",
       npy_image(1, "{'shape': (2, 3), 'descr': '<f4', 'fortran_order': False}", d6), DType::kF32, {2, 3}, d6},
      {"no spaces, no trailing comma",
       npy_image(1, "{'descr':'<f4','fortran_order':False,'shape':(2,3)}", d6), DType::kF32, {2, 3}, d6},
      {"double quotes", npy_image(1, "{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (6,)}", d6),
       DType::kF32, {6}, d6},
      {"scalar", npy_image(1, dict("<f8", "()"), le_bytes(std::vector<double>{2.5})), DType::kF64, {},
       le_bytes(std::vector<double>{2.5})},
      {"zero-size", npy_image(1, dict("<f2", "(0, 3)"), {}), DType::kF16, {0, 3}, {}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    NpyArray a;
    const Status s = parse(c.img, &a);
    ASSERT_TRUE(s.ok()) << s.to_string();
    EXPECT_EQ(a.dtype, c.dtype);
    EXPECT_EQ(a.shape, c.shape);
    EXPECT_TRUE(a.data == c.data);
  }
}

TEST(Npy, BigEndianIsByteSwapped) {
  {
    const std::vector<double> v = {1.5, -2.25, 1e300, 4.9406564584124654e-324, -0.0};
    NpyArray a;
    ASSERT_TRUE(parse(npy_image(1, dict(">f8", "(5,)"), be_bytes(v)), &a).ok());
    EXPECT_EQ(a.dtype, DType::kF64);
    EXPECT_TRUE(a.data == le_bytes(v));
    // The bytes really were reversed: the file's first byte is the sign/exponent byte 0x3f.
    EXPECT_EQ(a.data[7], 0x3f);
  }
  {
    const std::vector<float> v = {1.0f, -3.5f, 1e-42f, 3.4e38f};
    NpyArray a;
    ASSERT_TRUE(parse(npy_image(2, dict(">f4", "(2, 2)"), be_bytes(v)), &a).ok());
    EXPECT_EQ(a.dtype, DType::kF32);
    EXPECT_TRUE(a.data == le_bytes(v));
  }
  {
    // 1.0, -2.0, 65504, the smallest subnormal, +inf, a NaN
    const std::vector<uint16_t> v = {0x3C00, 0xC000, 0x7BFF, 0x0001, 0x7C00, 0x7E01};
    NpyArray a;
    ASSERT_TRUE(parse(npy_image(1, dict(">f2", "(3, 2)"), be_bytes(v)), &a).ok());
    EXPECT_EQ(a.dtype, DType::kF16);
    ASSERT_TRUE(a.data == le_bytes(v));
    uint16_t h[6];
    std::memcpy(h, a.data.data(), sizeof h);
    EXPECT_EQ(half_to_float(h[0]), 1.0f);
    EXPECT_EQ(half_to_float(h[1]), -2.0f);
    EXPECT_EQ(half_to_float(h[2]), 65504.0f);
  }
}

// ---- malformed and unsupported files -----------------------------------------------------------

struct Bad {
  const char* what;
  Bytes img;
  StatusCode code;
  std::string needle;
};

void expect_bad(const Bad& c) {
  SCOPED_TRACE(c.what);
  NpyArray a = sentinel_array();
  const Status s = parse(c.img, &a, "bad.npy");
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), c.code) << s.to_string();
  EXPECT_EQ(s.message().rfind("bad.npy: ", 0), 0u) << "message must start with the file: " << s.message();
  EXPECT_NE(s.message().find(c.needle), std::string::npos) << "message lacks '" << c.needle << "': " << s.message();
  EXPECT_TRUE(is_sentinel(a)) << "output written despite the error";
}

Bytes with(Bytes b, size_t pos, uint8_t value) {
  b[pos] = value;
  return b;
}

TEST(Npy, MalformedFiles) {
  const Bytes d6 = le_bytes(std::vector<float>{1, 2, 3, 4, 5, 6});
  const Bytes good = npy_image(1, dict("<f4", "(2, 3)"), d6);
  const StatusCode kCorrupt = StatusCode::kCorruptData;
  Bytes truncated_data(good.begin(), good.end() - 1);
  Bytes trailing = good;
  trailing.push_back(0);
  Bytes long_v1 = good;
  long_v1[8] = 0xff, long_v1[9] = 0xff;
  Bytes long_v2 = npy_image(2, dict("<f4", "(2, 3)"), d6);
  long_v2[8] = long_v2[9] = long_v2[10] = long_v2[11] = 0xff;
  const Bytes v2 = npy_image(2, dict("<f4", "(2, 3)"), d6);
  const Bytes short_v2(v2.begin(), v2.begin() + 11);
  std::string dims33 = "(";
  for (int i = 0; i < 33; ++i) dims33 += "1, ";
  dims33 += ")";

  const Bad cases[] = {
      {"empty", {}, kCorrupt, "magic"},
      {"too short", Bytes(good.begin(), good.begin() + 5), kCorrupt, "magic"},
      {"wrong magic", with(good, 5, 'Z'), kCorrupt, "magic"},
      {"no \\x93", with(good, 0, 'N'), kCorrupt, "magic"},
      {"version 4.0", with(good, 6, 4), kCorrupt, "unsupported format version 4.0"},
      {"version 0.0", with(good, 6, 0), kCorrupt, "unsupported format version 0.0"},
      {"version 255.7", with(with(good, 6, 255), 7, 7), kCorrupt, "unsupported format version 255.7"},
      {"1.0 header length past the end", long_v1, kCorrupt, "header length 65535 runs past the end"},
      {"2.0 header length past the end", long_v2, kCorrupt, "header length 4294967295 runs past the end"},
      {"2.0 cut in the header length", short_v2, kCorrupt, "truncated in the header length"},
      {"truncated data", truncated_data, kCorrupt, "needs 24 data bytes but the file has 23 (truncated?)"},
      {"extra trailing byte", trailing, kCorrupt, "needs 24 data bytes but the file has 25"},
      {"no data at all", npy_image(1, dict("<f4", "(2, 3)"), {}), kCorrupt, "(truncated?)"},
      {"list, not dict", npy_image(1, "['descr', '<f4']", d6), kCorrupt, "header is not a dict literal"},
      {"empty header", npy_image(1, "", d6, 0), kCorrupt, "header is not a dict literal"},
      {"unterminated dict", npy_image(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (6,)", d6, 0),
       kCorrupt, "malformed header dict"},
      {"missing colon", npy_image(1, "{'descr' '<f4'}", d6), kCorrupt, "malformed header dict"},
      {"missing comma", npy_image(1, "{'descr': '<f4' 'fortran_order': False}", d6), kCorrupt,
       "malformed header dict"},
      {"unquoted key", npy_image(1, "{descr: '<f4'}", d6), kCorrupt, "malformed header dict"},
      {"unterminated string", npy_image(1, "{'descr: '<f4'}", d6), kCorrupt, "malformed"},
      {"missing shape", npy_image(1, "{'descr': '<f4', 'fortran_order': False}", d6), kCorrupt,
       "header lacks one of 'descr', 'fortran_order', 'shape'"},
      {"missing descr", npy_image(1, "{'fortran_order': False, 'shape': (6,)}", d6), kCorrupt, "header lacks"},
      {"missing fortran_order", npy_image(1, "{'descr': '<f4', 'shape': (6,)}", d6), kCorrupt, "header lacks"},
      {"empty dict", npy_image(1, "{}", d6), kCorrupt, "header lacks"},
      {"duplicate descr", npy_image(1, "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (6,)}", d6),
       kCorrupt, "malformed 'descr'"},
      {"duplicate fortran_order",
       npy_image(1, "{'descr': '<f4', 'fortran_order': False, 'fortran_order': False, 'shape': (6,)}", d6), kCorrupt,
       "duplicate 'fortran_order'"},
      {"duplicate shape", npy_image(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (6,), 'shape': (6,)}", d6),
       kCorrupt, "malformed 'shape'"},
      {"unknown key", npy_image(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (6,), 'order': 'C'}", d6),
       kCorrupt, "unexpected header key 'order'"},
      {"descr not a string", npy_image(1, "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (6,)}", d6),
       kCorrupt, "malformed 'descr'"},
      {"fortran_order 0", npy_image(1, dict("<f4", "(2, 3)", "0"), d6), kCorrupt,
       "'fortran_order' must be True or False"},
      {"fortran_order true", npy_image(1, dict("<f4", "(2, 3)", "true"), d6), kCorrupt,
       "'fortran_order' must be True or False"},
      {"fortran_order True", npy_image(1, dict("<f4", "(2, 3)", "True"), d6), StatusCode::kUnsupported,
       "Fortran-ordered arrays are not supported"},
      {"int32", npy_image(1, dict("<i4", "(2, 3)"), d6), StatusCode::kUnsupported, "dtype '<i4' is not supported"},
      {"complex64", npy_image(1, dict("<c8", "(3,)"), d6), StatusCode::kUnsupported, "dtype '<c8' is not supported"},
      {"uint8", npy_image(1, dict("|u1", "(24,)"), d6), StatusCode::kUnsupported, "dtype '|u1' is not supported"},
      {"float128", npy_image(1, dict("<f16", "(1,)"), Bytes(16)), StatusCode::kUnsupported, "'<f16'"},
      {"bool", npy_image(1, dict("|b1", "(24,)"), d6), StatusCode::kUnsupported, "'|b1'"},
      {"empty descr", npy_image(1, dict("", "(24,)"), d6), StatusCode::kUnsupported, "dtype ''"},
      {"shape a list", npy_image(1, dict("<f4", "[2, 3]"), d6), kCorrupt, "malformed 'shape'"},
      {"shape an int", npy_image(1, dict("<f4", "6"), d6), kCorrupt, "malformed 'shape'"},
      {"negative dim", npy_image(1, dict("<f4", "(-2, -3)"), d6), kCorrupt,
       "'shape' must be a tuple of non-negative integers"},
      {"negative second dim", npy_image(1, dict("<f4", "(6, -1)"), d6), kCorrupt, "non-negative integers"},
      {"float dim", npy_image(1, dict("<f4", "(2.0, 3)"), d6), kCorrupt, "malformed 'shape' tuple"},
      {"exponent dim", npy_image(1, dict("<f4", "(6e0,)"), d6), kCorrupt, "malformed 'shape' tuple"},
      {"string dim", npy_image(1, dict("<f4", "('6',)"), d6), kCorrupt, "non-negative integers"},
      {"lone L", npy_image(1, dict("<f4", "(L,)"), {}), kCorrupt, "non-negative integers"},
      {"L before digits", npy_image(1, dict("<f4", "(L6,)"), d6), kCorrupt, "non-negative integers"},
      {"empty dim", npy_image(1, dict("<f4", "(,)"), {}), kCorrupt, "non-negative integers"},
      {"double comma", npy_image(1, dict("<f4", "(2,, 3)"), d6), kCorrupt, "non-negative integers"},
      {"dims without comma", npy_image(1, dict("<f4", "(2 3)"), d6), kCorrupt, "malformed 'shape' tuple"},
      {"unterminated shape", npy_image(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3", d6, 0), kCorrupt,
       "malformed 'shape' tuple"},
      {"33 dimensions", npy_image(1, dict("<f4", dims33), Bytes(4)), kCorrupt, "more than 32 dimensions"},
  };
  for (const Bad& c : cases) expect_bad(c);
}

// Shapes whose byte count overflows int64 or is absurd must be refused without allocating.
TEST(Npy, AbsurdShapes) {
  const Bad cases[] = {
      {"2^62", npy_image(1, dict("<f4", "(4611686018427387904,)"), {}), StatusCode::kCorruptData,
       "impossibly large"},
      {"int64 max", npy_image(1, dict("<f4", "(9223372036854775807,)"), {}), StatusCode::kCorruptData, "'shape'"},
      {"2^32 x 2^32", npy_image(1, dict("<f8", "(4294967296, 4294967296)"), {}), StatusCode::kCorruptData,
       "impossibly large"},
      {"product wraps to 0", npy_image(1, dict("<f2", "(4294967296, 4294967296, 2)"), {}), StatusCode::kCorruptData,
       "impossibly large"},
      {"many large dims", npy_image(1, dict("<f4", "(65536, 65536, 65536, 65536)"), {}), StatusCode::kCorruptData,
       "impossibly large"},
      {"past int64", npy_image(1, dict("<f4", "(9223372036854775808,)"), {}), StatusCode::kCorruptData,
       "non-negative integers"},
      {"20 digits", npy_image(1, dict("<f4", "(99999999999999999999,)"), {}), StatusCode::kCorruptData,
       "non-negative integers"},
      // Plausible size, but the file does not hold it: refused by size, nothing allocated.
      {"4 TiB", npy_image(1, dict("<f4", "(1048576, 1048576)"), Bytes(64)), StatusCode::kCorruptData,
       "needs 4398046511104 data bytes but the file has 64 (truncated?)"},
  };
  for (const Bad& c : cases) expect_bad(c);
  // A zero-size dimension makes any other size harmless: the array is empty.
  NpyArray a;
  const Status s = parse(npy_image(1, dict("<f4", "(0, 4611686018427387904)"), {}), &a);
  if (s.ok()) {
    EXPECT_TRUE(a.data.empty());
    EXPECT_EQ(a.numel(), 0);
  } else {
    EXPECT_EQ(s.code(), StatusCode::kCorruptData);
  }
}

// ---- writing and I/O errors --------------------------------------------------------------------

TEST(Npy, WriteErrors) {
  test::TempDir dir{"npy"};
  const uint16_t bf[4] = {0x3f80, 0, 0, 0};
  Bytes img = {1, 2, 3};
  Status s = encode_npy(DType::kBF16, {4}, bf, &img);
  EXPECT_EQ(s.code(), StatusCode::kUnsupported) << s.to_string();
  EXPECT_NE(s.message().find("bfloat16"), std::string::npos);
  EXPECT_EQ(img, (Bytes{1, 2, 3})) << "image written despite the error";

  const std::string path = dir.file("bf16.npy");
  s = write_npy(path, DType::kBF16, {4}, bf);
  EXPECT_EQ(s.code(), StatusCode::kUnsupported) << s.to_string();
  EXPECT_FALSE(std::filesystem::exists(path)) << "file created despite the error";

  const float f[4] = {0, 0, 0, 0};
  s = encode_npy(DType::kF32, {2, -2}, f, &img);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.to_string();
  EXPECT_NE(s.message().find("shape: dimension 1 is negative"), std::string::npos) << s.message();
  s = write_npy(dir.file("neg.npy"), DType::kF32, {-1}, f);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_FALSE(std::filesystem::exists(dir.file("neg.npy")));

  const std::string nowhere = dir.file("no/such/dir/a.npy");
  s = write_npy(nowhere, DType::kF32, {4}, f);
  EXPECT_EQ(s.code(), StatusCode::kIoError) << s.to_string();
  EXPECT_NE(s.message().find(nowhere), std::string::npos) << s.message();
}

TEST(Npy, ReadErrors) {
  test::TempDir dir{"npy"};
  NpyArray a = sentinel_array();
  const std::string missing = dir.file("missing.npy");
  Status s = read_npy(missing, &a);
  EXPECT_EQ(s.code(), StatusCode::kIoError) << s.to_string();
  EXPECT_NE(s.message().find(missing), std::string::npos) << s.message();
  EXPECT_TRUE(is_sentinel(a));

  // A directory opens for reading on Linux; its "size" may be huge (ext4 reports 2^63 - 1).
  s = read_npy(dir.path(), &a);
  EXPECT_EQ(s.code(), StatusCode::kIoError) << s.to_string();
  EXPECT_EQ(s.message(), dir.path() + ": is a directory");
  EXPECT_TRUE(is_sentinel(a));

  const std::string empty = dir.file("empty.npy");
  write_file(empty, {});
  s = read_npy(empty, &a);
  EXPECT_EQ(s.code(), StatusCode::kCorruptData) << s.to_string();
  EXPECT_EQ(s.message().rfind(empty + ": ", 0), 0u) << s.message();
  EXPECT_TRUE(is_sentinel(a));

  // A truncated file names itself and says so.
  const float f[6] = {1, 2, 3, 4, 5, 6};
  Bytes img;
  ASSERT_TRUE(encode_npy(DType::kF32, {2, 3}, f, &img).ok());
  img.resize(img.size() - 3);
  const std::string cut = dir.file("cut.npy");
  write_file(cut, img);
  s = read_npy(cut, &a);
  EXPECT_EQ(s.code(), StatusCode::kCorruptData);
  EXPECT_NE(s.message().find(cut), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("truncated"), std::string::npos) << s.message();
  EXPECT_TRUE(is_sentinel(a));
}

// ---- fuzzing -------------------------------------------------------------------------------------

const uint8_t kInteresting[] = {0x00, 0xff, 0x7f, 0x80, 0x93, '(', ')', ',', '\'', '"', ':', '{', '}', ' ',
                                '\n', '0', '1', '2', '4', '8', '9', '-', 'L', 'T', 'F', '<', '>', '=',
                                '|', 'f', 'i', 'e', '.'};

// The valid images the fuzzer starts from.
std::vector<Bytes> fuzz_seeds() {
  Rng rng(3);
  std::vector<Bytes> seeds;
  seeds.push_back(npy_image(1, dict("<f4", "(2, 3)"), random_bytes(rng, 24)));
  seeds.push_back(npy_image(1, dict(">f2", "(5,)"), random_bytes(rng, 10)));
  seeds.push_back(npy_image(2, dict("<f8", "()"), random_bytes(rng, 8)));
  seeds.push_back(npy_image(3, dict("=f4", "(0, 3)"), {}));
  seeds.push_back(npy_image(1, dict("<f2", "(3L, 1L)"), random_bytes(rng, 6), 16));
  seeds.push_back(npy_image(1, "{'shape':(2,1,1),'descr':'>f8','fortran_order':False}", random_bytes(rng, 16), 0));
  Bytes img;
  const float f[12] = {};
  encode_npy(DType::kF32, {1, 2, 3, 2}, f, &img);
  seeds.push_back(img);
  return seeds;
}

size_t header_end(const Bytes& seed) {
  const size_t prefix = seed[6] == 1 ? 10 : 12;
  size_t len = seed[8] | (seed[9] << 8);
  if (seed[6] != 1) len |= (static_cast<size_t>(seed[10]) << 16) | (static_cast<size_t>(seed[11]) << 24);
  return prefix + len;
}

// Sets the header-length field of `img` (version 1.0, 2.0 or 3.0 as its byte 6 says).
void set_header_len(Bytes& img, size_t len) {
  if (img.size() < 12) return;
  img[8] = static_cast<uint8_t>(len & 0xff);
  img[9] = static_cast<uint8_t>((len >> 8) & 0xff);
  if (img[6] != 1) {
    img[10] = static_cast<uint8_t>((len >> 16) & 0xff);
    img[11] = static_cast<uint8_t>((len >> 24) & 0xff);
  }
}

struct FuzzStats {
  int64_t runs = 0, accepted = 0;
};

// Parses one image; whatever the outcome it must be coherent.
void check_one(const Bytes& img, FuzzStats* stats) {
  ++stats->runs;
  NpyArray a = sentinel_array();
  const Status s = parse(img, &a);
  if (!s.ok()) {
    ASSERT_TRUE(s.code() == StatusCode::kCorruptData || s.code() == StatusCode::kUnsupported) << s.to_string();
    ASSERT_FALSE(s.message().empty());
    ASSERT_TRUE(is_sentinel(a)) << "output written despite " << s.to_string();
    return;
  }
  ++stats->accepted;
  ASSERT_TRUE(a.dtype == DType::kF16 || a.dtype == DType::kF32 || a.dtype == DType::kF64);
  ASSERT_LE(a.shape.size(), 32u);
  int64_t numel = 1;
  for (int64_t d : a.shape) {
    ASSERT_GE(d, 0);
    ASSERT_FALSE(__builtin_mul_overflow(numel, d, &numel)) << "accepted shape overflows int64";
  }
  ASSERT_EQ(a.numel(), numel);
  ASSERT_EQ(static_cast<int64_t>(a.data.size()), numel * dtype_size(a.dtype));
  // What parses must also re-encode and parse back to itself.
  Bytes again;
  ASSERT_TRUE(encode_npy(a.dtype, a.shape, a.data.data(), &again).ok());
  NpyArray b;
  ASSERT_TRUE(parse(again, &b).ok());
  ASSERT_EQ(b.dtype, a.dtype);
  ASSERT_EQ(b.shape, a.shape);
  ASSERT_TRUE(b.data == a.data);
}

TEST(NpyFuzz, TruncationAtEveryLength) {
  FuzzStats stats;
  for (const Bytes& seed : fuzz_seeds()) {
    NpyArray a;
    ASSERT_TRUE(parse(seed, &a).ok()) << "seed must be valid";
    for (size_t n = 0; n < seed.size(); ++n) {
      const Bytes cut(seed.begin(), seed.begin() + n);
      check_one(cut, &stats);
      if (HasFatalFailure()) return;
      NpyArray b;
      ASSERT_FALSE(parse(cut, &b).ok()) << "a proper prefix of a valid image parsed, length " << n;
    }
  }
  EXPECT_EQ(stats.accepted, 0);
}

TEST(NpyFuzz, EveryHeaderByteOverwritten) {
  FuzzStats stats;
  for (const Bytes& seed : fuzz_seeds()) {
    for (size_t pos = 0; pos < header_end(seed); ++pos) {
      for (uint8_t value : kInteresting) {
        check_one(with(seed, pos, value), &stats);
        if (HasFatalFailure()) return;
      }
    }
  }
  // Some overwrites are harmless (a space for a space, '<' for '='): the fuzzer reaches success.
  EXPECT_GT(stats.accepted, 0);
  EXPECT_LT(stats.accepted, stats.runs);
}

TEST(NpyFuzz, RandomMutations) {
  const std::vector<Bytes> seeds = fuzz_seeds();
  Rng rng(20240611);
  auto below = [&](size_t n) { return n == 0 ? size_t{0} : static_cast<size_t>(rng.next() % n); };
  auto interesting = [&]() { return kInteresting[below(sizeof kInteresting)]; };
  FuzzStats stats;
  constexpr int kIterations = 300000;
  for (int it = 0; it < kIterations; ++it) {
    const Bytes& seed = seeds[below(seeds.size())];
    Bytes img = seed;
    const size_t hend = header_end(seed);
    const int mutations = 1 + static_cast<int>(below(4));
    for (int m = 0; m < mutations && !img.empty(); ++m) {
      // Most mutations land in the header, where the parsing is.
      const size_t pos = below(2) ? below(std::min(hend, img.size())) : below(img.size());
      switch (below(9)) {
        case 0: img[pos] ^= static_cast<uint8_t>(1u << below(8)); break;
        case 1: img[pos] = interesting(); break;
        case 2: img[pos] = static_cast<uint8_t>(rng.next() >> 56); break;
        case 3:  // insert, keeping the header length consistent half the time
          img.insert(img.begin() + static_cast<std::ptrdiff_t>(pos), interesting());
          if (below(2) && pos >= 12 && pos < hend) set_header_len(img, hend - (img[6] == 1 ? 10 : 12) + 1);
          break;
        case 4:  // delete, likewise
          img.erase(img.begin() + static_cast<std::ptrdiff_t>(pos));
          if (below(2) && pos >= 12 && pos < hend) set_header_len(img, hend - (img[6] == 1 ? 10 : 12) - 1);
          break;
        case 5: img.resize(below(img.size() + 1)); break;
        case 6:  // the header length field
          if (img.size() > 11) img[8 + below(4)] = interesting();
          break;
        case 7: {  // duplicate a slice of the header in place
          const size_t len = 1 + below(16);
          if (pos + len <= img.size()) {
            const Bytes slice(img.begin() + static_cast<std::ptrdiff_t>(pos),
                              img.begin() + static_cast<std::ptrdiff_t>(pos + len));
            img.insert(img.begin() + static_cast<std::ptrdiff_t>(pos), slice.begin(), slice.end());
          }
          break;
        }
        case 8: img.push_back(interesting()); break;
      }
    }
    check_one(img, &stats);
    if (HasFatalFailure()) {
      ADD_FAILURE() << "iteration " << it;
      return;
    }
  }
  EXPECT_EQ(stats.runs, kIterations);
  // The mutations must exercise both outcomes, or the fuzzer is not looking at anything.
  EXPECT_GT(stats.accepted, kIterations / 100);
  EXPECT_LT(stats.accepted, kIterations / 2);
}

}  // namespace
}  // namespace monarchrt
