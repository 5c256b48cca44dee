// .npy reader and writer. The header is a Python dict literal; this file parses exactly the
// subset NumPy writes ({'descr': str, 'fortran_order': bool, 'shape': tuple of ints}) and
// rejects everything else with a message that says which part of the file is wrong.
#include "monarchrt/npy.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

namespace monarchrt {

int64_t NpyArray::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicSize = 6;
constexpr int64_t kMaxDims = 32;
constexpr int64_t kMaxBytes = int64_t{1} << 46;  // 64 TiB: anything larger is surely corrupt

// Cursor over the header text.
struct HeaderParser {
  const std::string& text;
  size_t pos = 0;

  void skip_space() {
    while (pos < text.size() && (text[pos] == ' ' || text[pos] == '\t' || text[pos] == '\n')) ++pos;
  }
  bool consume(char c) {
    skip_space();
    if (pos < text.size() && text[pos] == c) {
      ++pos;
      return true;
    }
    return false;
  }
  bool peek(char c) {
    skip_space();
    return pos < text.size() && text[pos] == c;
  }
  bool parse_string(std::string* out) {
    skip_space();
    if (pos >= text.size() || (text[pos] != '\'' && text[pos] != '"')) return false;
    const char quote = text[pos++];
    const size_t end = text.find(quote, pos);
    if (end == std::string::npos) return false;
    *out = text.substr(pos, end - pos);
    pos = end + 1;
    return true;
  }
  bool parse_word(const char* word) {
    skip_space();
    const size_t n = std::strlen(word);
    if (text.compare(pos, n, word) != 0) return false;
    pos += n;
    return true;
  }
  bool parse_int(int64_t* out) {
    skip_space();
    const size_t start = pos;
    int64_t v = 0;
    while (pos < text.size() && text[pos] >= '0' && text[pos] <= '9') {
      if (v > (std::numeric_limits<int64_t>::max() - 9) / 10) return false;
      v = v * 10 + (text[pos++] - '0');
    }
    if (pos == start) return false;
    if (pos < text.size() && text[pos] == 'L') ++pos;  // Python 2 longs
    *out = v;
    return true;
  }
};

Status bad(const std::string& what, const std::string& why) {
  return Status::corrupt(what + ": not a valid .npy file: " + why);
}

bool parse_descr(const std::string& descr, DType* dtype, bool* swap) {
  if (descr.size() != 3) return false;
  const char order = descr[0];
  if (order != '<' && order != '>' && order != '=' && order != '|') return false;
  if (descr[1] != 'f') return false;
  switch (descr[2]) {
    case '2': *dtype = DType::kF16; break;
    case '4': *dtype = DType::kF32; break;
    case '8': *dtype = DType::kF64; break;
    default: return false;
  }
  *swap = order == '>';
  return true;
}

}  // namespace

Status parse_npy(const uint8_t* bytes, size_t size, const std::string& what, NpyArray* out) {
  if (size < kMagicSize + 4 || std::memcmp(bytes, kMagic, kMagicSize) != 0) {
    return bad(what, "missing the \\x93NUMPY magic (file too short or of another format)");
  }
  const int major = bytes[6];
  size_t header_len = 0, header_start = 0;
  if (major == 1) {
    header_len = bytes[8] | (static_cast<size_t>(bytes[9]) << 8);
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (size < 12) return bad(what, "truncated in the header length");
    header_len = bytes[8] | (static_cast<size_t>(bytes[9]) << 8) |
                 (static_cast<size_t>(bytes[10]) << 16) | (static_cast<size_t>(bytes[11]) << 24);
    header_start = 12;
  } else {
    return bad(what, "unsupported format version " + std::to_string(major) + "." +
                         std::to_string(bytes[7]) + " (1.0, 2.0 and 3.0 are supported)");
  }
  if (header_len > size - header_start) {
    return bad(what, "header length " + std::to_string(header_len) + " runs past the end of the " +
                         std::to_string(size) + "-byte file (truncated?)");
  }
  const std::string header(reinterpret_cast<const char*>(bytes + header_start), header_len);
  HeaderParser hp{header};
  if (!hp.consume('{')) return bad(what, "header is not a dict literal");
  bool have_descr = false, have_order = false, have_shape = false, fortran = false, swap = false;
  DType dtype = DType::kF32;
  std::string descr;
  std::vector<int64_t> shape;
  while (!hp.consume('}')) {
    std::string key;
    if (!hp.parse_string(&key) || !hp.consume(':')) return bad(what, "malformed header dict");
    if (key == "descr") {
      if (have_descr || !hp.parse_string(&descr)) return bad(what, "malformed 'descr'");
      if (!parse_descr(descr, &dtype, &swap)) {
        return Status::unsupported(what + ": dtype '" + descr +
                                   "' is not supported (float16, float32 or float64 only)");
      }
      have_descr = true;
    } else if (key == "fortran_order") {
      if (have_order) return bad(what, "duplicate 'fortran_order'");
      if (hp.parse_word("True")) {
        fortran = true;
      } else if (!hp.parse_word("False")) {
        return bad(what, "'fortran_order' must be True or False");
      }
      have_order = true;
    } else if (key == "shape") {
      if (have_shape || !hp.consume('(')) return bad(what, "malformed 'shape'");
      while (!hp.consume(')')) {
        int64_t dim = 0;
        if (!hp.parse_int(&dim)) return bad(what, "'shape' must be a tuple of non-negative integers");
        shape.push_back(dim);
        if (static_cast<int64_t>(shape.size()) > kMaxDims) return bad(what, "more than 32 dimensions");
        if (!hp.consume(',') && !hp.peek(')')) return bad(what, "malformed 'shape' tuple");
      }
      have_shape = true;
    } else {
      return bad(what, "unexpected header key '" + key + "'");
    }
    if (!hp.consume(',') && !hp.peek('}')) return bad(what, "malformed header dict");
  }
  if (!have_descr || !have_order || !have_shape) {
    return bad(what, "header lacks one of 'descr', 'fortran_order', 'shape'");
  }
  if (fortran) {
    return Status::unsupported(what + ": Fortran-ordered arrays are not supported; save a C-ordered "
                                      "array (numpy.ascontiguousarray)");
  }
  const int64_t item = dtype_size(dtype);
  int64_t bytes_needed = item;
  for (int64_t d : shape) {
    if (d != 0 && bytes_needed > kMaxBytes / d) return bad(what, "shape is impossibly large");
    bytes_needed *= d;
  }
  const size_t data_start = header_start + header_len;
  const size_t available = size - data_start;
  if (static_cast<size_t>(bytes_needed) != available) {
    return bad(what, "shape " + std::to_string(bytes_needed / item) + " elements of " +
                         std::to_string(item) + " bytes needs " + std::to_string(bytes_needed) +
                         " data bytes but the file has " + std::to_string(available) +
                         (static_cast<size_t>(bytes_needed) > available ? " (truncated?)" : ""));
  }
  out->dtype = dtype;
  out->shape = shape;
  out->data.assign(bytes + data_start, bytes + size);
  if (swap) {
    for (size_t i = 0; i + static_cast<size_t>(item) <= out->data.size(); i += static_cast<size_t>(item)) {
      for (int64_t a = 0, b = item - 1; a < b; ++a, --b) std::swap(out->data[i + a], out->data[i + b]);
    }
  }
  return Status();
}

Status read_npy(const std::string& path, NpyArray* out) {
  std::error_code ec;  // a directory opens, and may report any size (2^63 - 1 on ext4)
  if (std::filesystem::is_directory(path, ec)) return Status::io_error(path + ": is a directory");
  std::ifstream f(path, std::ios::binary);
  if (!f) return Status::io_error(path + ": cannot open for reading");
  f.seekg(0, std::ios::end);
  const std::streamoff size = f.tellg();
  if (size < 0) return Status::io_error(path + ": cannot determine the file size");
  f.seekg(0, std::ios::beg);
  std::vector<uint8_t> bytes;
  try {
    bytes.resize(static_cast<size_t>(size));
  } catch (const std::bad_alloc&) {
    return Status::io_error(path + ": file of " + std::to_string(size) + " bytes does not fit in memory");
  }
  if (size > 0 && !f.read(reinterpret_cast<char*>(bytes.data()), size)) {
    return Status::io_error(path + ": read failed");
  }
  return parse_npy(bytes.data(), bytes.size(), path, out);
}

Status encode_npy(DType dtype, const std::vector<int64_t>& shape, const void* data,
                  std::vector<uint8_t>* out) {
  const char* descr = nullptr;
  switch (dtype) {
    case DType::kF16: descr = "<f2"; break;
    case DType::kF32: descr = "<f4"; break;
    case DType::kF64: descr = "<f8"; break;
    case DType::kBF16:
      return Status::unsupported("dtype: .npy has no bfloat16; write float32 instead");
  }
  std::string header = std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': (";
  int64_t n = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0) return Status::invalid("shape: dimension " + std::to_string(i) + " is negative");
    header += std::to_string(shape[i]) + (shape.size() == 1 || i + 1 < shape.size() ? ", " : "");
    n *= shape[i];
  }
  if (shape.size() == 1) header.pop_back();  // "(5, )" -> "(5,)"
  header += "), }";
  // Pad with spaces so that magic + length + header + '\n' is a multiple of 64 bytes.
  const size_t unpadded = kMagicSize + 4 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  if (header.size() > 0xffff) return Status::invalid("shape: too many dimensions for a .npy header");
  const size_t payload = static_cast<size_t>(n * dtype_size(dtype));
  out->clear();
  out->reserve(kMagicSize + 4 + header.size() + payload);
  out->insert(out->end(), kMagic, kMagic + kMagicSize);
  out->push_back(1);
  out->push_back(0);
  out->push_back(static_cast<uint8_t>(header.size() & 0xff));
  out->push_back(static_cast<uint8_t>(header.size() >> 8));
  out->insert(out->end(), header.begin(), header.end());
  const uint8_t* p = static_cast<const uint8_t*>(data);
  out->insert(out->end(), p, p + payload);
  return Status();
}

Status write_npy(const std::string& path, DType dtype, const std::vector<int64_t>& shape,
                 const void* data) {
  std::vector<uint8_t> image;
  MONARCHRT_RETURN_IF_ERROR(encode_npy(dtype, shape, data, &image));
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) return Status::io_error(path + ": cannot open for writing");
  f.write(reinterpret_cast<const char*>(image.data()), static_cast<std::streamsize>(image.size()));
  f.close();
  if (!f) return Status::io_error(path + ": write failed (disk full?)");
  return Status();
}

}  // namespace monarchrt
