// Checkpoint readers (include/monarchrt/checkpoint.h): safetensors (a minimal JSON parser for its
// header), the zip container of torch.save (stored entries, ZIP64), and a restricted pickle VM.
// Every length and offset read from a file is checked before use; limits bound the work per byte.
#include "monarchrt/checkpoint.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>

namespace monarchrt {

namespace {

std::string str(uint64_t v) { return std::to_string(v); }

// ---- byte sources ----------------------------------------------------------------------------

class FileSource : public ByteSource {
 public:
  FileSource(std::string path, uint64_t size) : path_(std::move(path)), size_(size), f_(path_, std::ios::binary) {}
  bool ok() const { return bool(f_); }
  uint64_t size() const override { return size_; }
  bool read(uint64_t offset, uint64_t n, void* dst) const override {
    if (offset > size_ || n > size_ - offset) return false;
    if (n == 0) return true;
    std::lock_guard<std::mutex> lock(mu_);
    f_.clear();
    f_.seekg(static_cast<std::streamoff>(offset));
    f_.read(static_cast<char*>(dst), static_cast<std::streamsize>(n));
    return bool(f_);
  }
  const std::string& name() const override { return path_; }

 private:
  std::string path_;
  uint64_t size_;
  mutable std::ifstream f_;
  mutable std::mutex mu_;
};

class MemorySource : public ByteSource {
 public:
  MemorySource(std::vector<uint8_t> bytes, std::string name) : bytes_(std::move(bytes)), name_(std::move(name)) {}
  uint64_t size() const override { return bytes_.size(); }
  bool read(uint64_t offset, uint64_t n, void* dst) const override {
    if (offset > bytes_.size() || n > bytes_.size() - offset) return false;
    if (n > 0) std::memcpy(dst, bytes_.data() + offset, n);
    return true;
  }
  const std::string& name() const override { return name_; }

 private:
  std::vector<uint8_t> bytes_;
  std::string name_;
};

uint64_t le(const uint8_t* p, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

bool dtype_from_name(const std::string& s, DType* d) {
  if (s == "F32") *d = DType::kF32;
  else if (s == "F16") *d = DType::kF16;
  else if (s == "BF16") *d = DType::kBF16;
  else if (s == "F64") *d = DType::kF64;
  else return false;
  return true;
}
const char* safetensors_name(DType d) {
  switch (d) {
    case DType::kF32: return "F32";
    case DType::kF16: return "F16";
    case DType::kBF16: return "BF16";
    case DType::kF64: return "F64";
  }
  return "?";
}

// Product of a shape with overflow detection (false: negative dimension or overflow past 2^62).
bool checked_numel(const std::vector<int64_t>& shape, int64_t* n) {
  int64_t p = 1;
  for (int64_t d : shape) {
    if (d < 0) return false;
    if (d != 0 && p > (int64_t{1} << 62) / d) return false;
    p *= d;
  }
  *n = p;
  return true;
}

// ---- minimal JSON (the safetensors header) ---------------------------------------------------

struct Json {
  enum Kind { kNull, kBool, kNumber, kString, kArray, kObject } kind = kNull;
  bool b = false;
  double num = 0;
  bool is_integer = false;
  int64_t integer = 0;
  std::string s;
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> members;
};

class JsonParser {
 public:
  JsonParser(const std::string& text) : t_(text) {}
  bool parse(Json* out, std::string* err) {
    if (!value(out, 0)) {
      *err = err_ + " at byte " + str(i_);
      return false;
    }
    ws();
    if (i_ != t_.size()) {
      *err = "trailing characters at byte " + str(i_);
      return false;
    }
    return true;
  }

 private:
  const std::string& t_;
  size_t i_ = 0;
  std::string err_ = "invalid JSON";

  void ws() {
    while (i_ < t_.size() && (t_[i_] == ' ' || t_[i_] == '\n' || t_[i_] == '\r' || t_[i_] == '\t')) ++i_;
  }
  bool fail(const char* why) {
    err_ = why;
    return false;
  }
  bool literal(const char* word) {
    const size_t n = std::strlen(word);
    if (t_.compare(i_, n, word) != 0) return fail("unknown literal");
    i_ += n;
    return true;
  }
  bool string(std::string* out) {
    if (i_ >= t_.size() || t_[i_] != '"') return fail("expected a string");
    ++i_;
    while (i_ < t_.size() && t_[i_] != '"') {
      char ch = t_[i_++];
      if (ch == '\\') {
        if (i_ >= t_.size()) return fail("unterminated escape");
        const char e = t_[i_++];
        switch (e) {
          case '"': case '\\': case '/': out->push_back(e); break;
          case 'b': out->push_back('\b'); break;
          case 'f': out->push_back('\f'); break;
          case 'n': out->push_back('\n'); break;
          case 'r': out->push_back('\r'); break;
          case 't': out->push_back('\t'); break;
          case 'u': {
            if (i_ + 4 > t_.size()) return fail("short \\u escape");
            unsigned cp = 0;
            for (int k = 0; k < 4; ++k) {
              const char h = t_[i_++];
              cp <<= 4;
              if (h >= '0' && h <= '9') cp |= unsigned(h - '0');
              else if (h >= 'a' && h <= 'f') cp |= unsigned(h - 'a' + 10);
              else if (h >= 'A' && h <= 'F') cp |= unsigned(h - 'A' + 10);
              else return fail("bad \\u escape");
            }
            // UTF-8 of a BMP code point (surrogate pairs are kept as two code points).
            if (cp < 0x80) {
              out->push_back(char(cp));
            } else if (cp < 0x800) {
              out->push_back(char(0xc0 | (cp >> 6)));
              out->push_back(char(0x80 | (cp & 0x3f)));
            } else {
              out->push_back(char(0xe0 | (cp >> 12)));
              out->push_back(char(0x80 | ((cp >> 6) & 0x3f)));
              out->push_back(char(0x80 | (cp & 0x3f)));
            }
            break;
          }
          default: return fail("bad escape");
        }
      } else {
        if (static_cast<unsigned char>(ch) < 0x20) return fail("control character in a string");
        out->push_back(ch);
      }
    }
    if (i_ >= t_.size()) return fail("unterminated string");
    ++i_;
    return true;
  }
  bool number(Json* out) {
    const size_t start = i_;
    if (i_ < t_.size() && t_[i_] == '-') ++i_;
    bool frac = false;
    while (i_ < t_.size() && (std::isdigit(static_cast<unsigned char>(t_[i_])) || t_[i_] == '.' || t_[i_] == 'e' ||
                              t_[i_] == 'E' || t_[i_] == '+' || t_[i_] == '-')) {
      if (!std::isdigit(static_cast<unsigned char>(t_[i_]))) frac = true;
      ++i_;
    }
    const std::string text = t_.substr(start, i_ - start);
    if (text.empty() || text == "-") return fail("expected a value");
    out->kind = Json::kNumber;
    char* end = nullptr;
    out->num = std::strtod(text.c_str(), &end);
    if (end != text.c_str() + text.size()) return fail("malformed number");
    if (!frac) {
      errno = 0;
      const long long v = std::strtoll(text.c_str(), &end, 10);
      if (errno == 0 && end == text.c_str() + text.size()) {
        out->is_integer = true;
        out->integer = v;
      }
    }
    return true;
  }
  bool value(Json* out, int depth) {
    if (depth > 32) return fail("nesting too deep");
    ws();
    if (i_ >= t_.size()) return fail("unexpected end");
    const char ch = t_[i_];
    if (ch == '{') {
      ++i_;
      out->kind = Json::kObject;
      ws();
      if (i_ < t_.size() && t_[i_] == '}') return ++i_, true;
      while (true) {
        ws();
        std::pair<std::string, Json> m;
        if (!string(&m.first)) return false;
        ws();
        if (i_ >= t_.size() || t_[i_] != ':') return fail("expected ':'");
        ++i_;
        if (!value(&m.second, depth + 1)) return false;
        out->members.push_back(std::move(m));
        ws();
        if (i_ < t_.size() && t_[i_] == ',') { ++i_; continue; }
        if (i_ < t_.size() && t_[i_] == '}') return ++i_, true;
        return fail("expected ',' or '}'");
      }
    }
    if (ch == '[') {
      ++i_;
      out->kind = Json::kArray;
      ws();
      if (i_ < t_.size() && t_[i_] == ']') return ++i_, true;
      while (true) {
        Json item;
        if (!value(&item, depth + 1)) return false;
        out->items.push_back(std::move(item));
        ws();
        if (i_ < t_.size() && t_[i_] == ',') { ++i_; continue; }
        if (i_ < t_.size() && t_[i_] == ']') return ++i_, true;
        return fail("expected ',' or ']'");
      }
    }
    if (ch == '"') {
      out->kind = Json::kString;
      return string(&out->s);
    }
    if (ch == 't') { out->kind = Json::kBool; out->b = true; return literal("true"); }
    if (ch == 'f') { out->kind = Json::kBool; return literal("false"); }
    if (ch == 'n') { out->kind = Json::kNull; return literal("null"); }
    return number(out);
  }
};

const Json* member(const Json& obj, const char* key) {
  for (const auto& m : obj.members)
    if (m.first == key) return &m.second;
  return nullptr;
}

Status open_safetensors(const ByteSource& src, std::vector<CheckpointTensor>* tensors) {
  const std::string& what = src.name();
  auto bad = [&](const std::string& why) { return Status::corrupt(what + ": not a valid safetensors file: " + why); };
  uint8_t head[8];
  if (!src.read(0, 8, head)) return bad("shorter than the 8-byte header length");
  const uint64_t n = le(head, 8);
  if (n > src.size() - 8) return bad("header length " + str(n) + " exceeds the file (" + str(src.size()) + " bytes)");
  if (n > (uint64_t{100} << 20)) return bad("header length " + str(n) + " exceeds 100 MB");
  std::string text(n, '\0');
  if (!src.read(8, n, text.data())) return Status::io_error(what + ": read failed");
  Json root;
  std::string err;
  if (!JsonParser(text).parse(&root, &err)) return bad("header: " + err);
  if (root.kind != Json::kObject) return bad("header is not a JSON object");
  const uint64_t data_start = 8 + n, data_size = src.size() - data_start;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const auto& m : root.members) {
    if (m.first == "__metadata__") continue;
    const std::string tname = "tensor '" + m.first + "': ";
    const Json& e = m.second;
    if (e.kind != Json::kObject) return bad(tname + "entry is not an object");
    const Json* dt = member(e, "dtype");
    const Json* sh = member(e, "shape");
    const Json* off = member(e, "data_offsets");
    if (!dt || dt->kind != Json::kString) return bad(tname + "missing dtype");
    if (!sh || sh->kind != Json::kArray) return bad(tname + "missing shape");
    if (!off || off->kind != Json::kArray || off->items.size() != 2) return bad(tname + "data_offsets must be [begin, end]");
    CheckpointTensor t;
    t.name = m.first;
    if (!dtype_from_name(dt->s, &t.dtype)) {
      return Status::unsupported(what + ": " + tname + "dtype " + dt->s + " is not supported (F32, F16, BF16, F64)");
    }
    for (const Json& d : sh->items) {
      if (d.kind != Json::kNumber || !d.is_integer || d.integer < 0) return bad(tname + "shape entries must be integers >= 0");
      t.shape.push_back(d.integer);
    }
    int64_t numel = 0;
    if (!checked_numel(t.shape, &numel)) return bad(tname + "shape is too large");
    for (const Json& o : off->items)
      if (o.kind != Json::kNumber || !o.is_integer || o.integer < 0) return bad(tname + "data_offsets must be integers >= 0");
    const uint64_t b = uint64_t(off->items[0].integer), end = uint64_t(off->items[1].integer);
    if (b > end || end > data_size) {
      return bad(tname + "data_offsets [" + str(b) + ", " + str(end) + ") outside the " + str(data_size) + " data bytes");
    }
    if (end - b != uint64_t(numel) * uint64_t(dtype_size(t.dtype))) {
      return bad(tname + "data_offsets span " + str(end - b) + " bytes, shape and dtype need " +
                 str(uint64_t(numel) * uint64_t(dtype_size(t.dtype))));
    }
    t.strides.assign(t.shape.size(), 1);
    for (int i = int(t.shape.size()) - 2; i >= 0; --i) t.strides[i] = t.strides[i + 1] * std::max<int64_t>(t.shape[i + 1], 1);
    t.offset = data_start + b;
    if (end > b) ranges.emplace_back(b, end);
    tensors->push_back(std::move(t));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first < ranges[i - 1].second) return bad("two tensors overlap in the data section");
  return Status();
}

// ---- zip (torch.save) ------------------------------------------------------------------------

struct ZipEntry {
  uint64_t data_offset = 0, size = 0;
};

Status read_zip(const ByteSource& src, std::map<std::string, ZipEntry>* entries) {
  const std::string& what = src.name();
  auto bad = [&](const std::string& why) { return Status::corrupt(what + ": not a valid torch zip file: " + why); };
  const uint64_t size = src.size();
  if (size < 22) return bad("too short for a zip directory");
  const uint64_t tail_len = std::min<uint64_t>(size, 22 + 65535);
  std::vector<uint8_t> tail(tail_len);
  if (!src.read(size - tail_len, tail_len, tail.data())) return Status::io_error(what + ": read failed");
  int64_t eocd = -1;
  for (int64_t i = int64_t(tail_len) - 22; i >= 0; --i) {
    if (le(&tail[i], 4) == 0x06054b50) {
      eocd = i;
      break;
    }
  }
  if (eocd < 0) return bad("no end-of-central-directory record (truncated?)");
  const uint8_t* e = &tail[eocd];
  uint64_t count = le(e + 10, 2), cd_size = le(e + 12, 4), cd_offset = le(e + 16, 4);
  if (count == 0xffff || cd_size == 0xffffffffu || cd_offset == 0xffffffffu) {  // ZIP64
    const uint64_t eocd_abs = size - tail_len + uint64_t(eocd);
    uint8_t loc[20], rec[56];
    if (eocd_abs < 20 || !src.read(eocd_abs - 20, 20, loc) || le(loc, 4) != 0x07064b50) return bad("missing ZIP64 locator");
    const uint64_t rec_off = le(loc + 8, 8);
    if (!src.read(rec_off, 56, rec) || le(rec, 4) != 0x06064b50) return bad("bad ZIP64 end-of-directory record");
    count = le(rec + 32, 8);
    cd_size = le(rec + 40, 8);
    cd_offset = le(rec + 48, 8);
  }
  if (cd_offset > size || cd_size > size - cd_offset) return bad("central directory outside the file");
  if (count > cd_size / 46) return bad("more entries than the central directory can hold");
  std::vector<uint8_t> cd(cd_size);
  if (!src.read(cd_offset, cd_size, cd.data())) return Status::io_error(what + ": read failed");
  uint64_t p = 0;
  for (uint64_t n = 0; n < count; ++n) {
    if (p + 46 > cd_size || le(&cd[p], 4) != 0x02014b50) return bad("corrupt central directory entry " + str(n));
    const uint8_t* h = &cd[p];
    const uint64_t method = le(h + 10, 2), name_len = le(h + 28, 2), extra_len = le(h + 30, 2), comment_len = le(h + 32, 2);
    uint64_t csize = le(h + 20, 4), usize = le(h + 24, 4), local = le(h + 42, 4);
    if (p + 46 + name_len + extra_len + comment_len > cd_size) return bad("central directory entry " + str(n) + " runs past its end");
    const std::string name(reinterpret_cast<const char*>(h + 46), name_len);
    // ZIP64 extra field: the 64-bit values of the fields that hold 0xffffffff, in order.
    for (uint64_t x = 0; x + 4 <= extra_len;) {
      const uint8_t* f = h + 46 + name_len + x;
      const uint64_t id = le(f, 2), len = le(f + 2, 2);
      if (x + 4 + len > extra_len) return bad("corrupt extra field of '" + name + "'");
      if (id == 1) {
        uint64_t q = 4;
        for (uint64_t* v : {&usize, &csize, &local}) {
          if (*v != 0xffffffffu) continue;
          if (q + 8 > 4 + len) return bad("short ZIP64 field of '" + name + "'");
          *v = le(f + q, 8);
          q += 8;
        }
      }
      x += 4 + len;
    }
    if (method != 0) return Status::unsupported(what + ": zip entry '" + name + "' is compressed; torch.save stores entries uncompressed");
    if (csize != usize) return bad("entry '" + name + "' has different stored and real sizes");
    uint8_t lh[30];
    if (!src.read(local, 30, lh) || le(lh, 4) != 0x04034b50) return bad("local header of '" + name + "' missing");
    const uint64_t data = local + 30 + le(lh + 26, 2) + le(lh + 28, 2);
    if (data > size || usize > size - data) return bad("entry '" + name + "' extends past the end of the file (truncated?)");
    (*entries)[name] = ZipEntry{data, usize};
    p += 46 + name_len + extra_len + comment_len;
  }
  return Status();
}

// ---- restricted pickle VM --------------------------------------------------------------------

struct PyObj {
  enum Kind { kNone, kBool, kInt, kFloat, kStr, kBytes, kTuple, kList, kDict, kGlobal, kStorage, kTensor, kMark };
  Kind kind = kNone;
  int64_t i = 0;
  double f = 0;
  std::string s;                                       // str, bytes, global "module.name", storage key
  std::vector<PyObj*> items;                           // tuple, list
  std::vector<std::pair<PyObj*, PyObj*>> dict;         // dict (insertion order)
  DType dtype = DType::kF32;                           // storage, tensor
  int64_t numel = 0;                                   // storage
  PyObj* storage = nullptr;                            // tensor
  int64_t storage_offset = 0;                          // tensor, elements
  std::vector<int64_t> shape, strides;                 // tensor
};

class Unpickler {
 public:
  Unpickler(const std::vector<uint8_t>& data, std::string what) : d_(data), what_(std::move(what)) {}

  Status run(PyObj** root) {
    while (true) {
      if (pos_ >= d_.size()) return bad("ends without STOP");
      if (++ops_ > 100000000) return bad("too many operations");
      const uint8_t op = d_[pos_++];
      switch (op) {
        case 0x80: MONARCHRT_RETURN_IF_ERROR(skip(1)); break;  // PROTO
        case 0x95: MONARCHRT_RETURN_IF_ERROR(skip(8)); break;  // FRAME
        case '}': push(make(PyObj::kDict)); break;
        case ']': push(make(PyObj::kList)); break;
        case ')': push(make(PyObj::kTuple)); break;
        case '(': push(make(PyObj::kMark)); break;
        case 'N': push(make(PyObj::kNone)); break;
        case 0x88: case 0x89: { PyObj* o = make(PyObj::kBool); o->i = op == 0x88; push(o); break; }
        case 'J': { uint64_t v; MONARCHRT_RETURN_IF_ERROR(u(4, &v)); push(integer(int32_t(uint32_t(v)))); break; }
        case 'K': { uint64_t v; MONARCHRT_RETURN_IF_ERROR(u(1, &v)); push(integer(int64_t(v))); break; }
        case 'M': { uint64_t v; MONARCHRT_RETURN_IF_ERROR(u(2, &v)); push(integer(int64_t(v))); break; }
        case 0x8a: {  // LONG1
          uint64_t n;
          MONARCHRT_RETURN_IF_ERROR(u(1, &n));
          if (n > 8) return bad("integer wider than 64 bits");
          uint64_t v;
          MONARCHRT_RETURN_IF_ERROR(u(int(n), &v));
          if (n > 0 && n < 8 && (v >> (8 * n - 1)) & 1) v |= ~uint64_t{0} << (8 * n);  // sign-extend
          push(integer(int64_t(v)));
          break;
        }
        case 'G': {  // BINFLOAT, big-endian
          MONARCHRT_RETURN_IF_ERROR(need(8));
          uint64_t v = 0;
          for (int k = 0; k < 8; ++k) v = (v << 8) | d_[pos_ + k];
          pos_ += 8;
          PyObj* o = make(PyObj::kFloat);
          std::memcpy(&o->f, &v, 8);
          push(o);
          break;
        }
        case 'X': case 0x8c: case 0x8d: case 'B': case 'C': case 0x8e: {  // strings and bytes
          const int w = (op == 'X' || op == 'B') ? 4 : (op == 0x8c || op == 'C') ? 1 : 8;
          uint64_t n;
          MONARCHRT_RETURN_IF_ERROR(u(w, &n));
          MONARCHRT_RETURN_IF_ERROR(need(n));
          PyObj* o = make((op == 'B' || op == 'C' || op == 0x8e) ? PyObj::kBytes : PyObj::kStr);
          o->s.assign(reinterpret_cast<const char*>(&d_[pos_]), n);
          pos_ += n;
          push(o);
          break;
        }
        case 'c': {  // GLOBAL module\nname\n
          std::string mod, name;
          MONARCHRT_RETURN_IF_ERROR(line(&mod));
          MONARCHRT_RETURN_IF_ERROR(line(&name));
          MONARCHRT_RETURN_IF_ERROR(global(mod, name));
          break;
        }
        case 0x93: {  // STACK_GLOBAL
          PyObj *name, *mod;
          MONARCHRT_RETURN_IF_ERROR(pop(&name));
          MONARCHRT_RETURN_IF_ERROR(pop(&mod));
          if (mod->kind != PyObj::kStr || name->kind != PyObj::kStr) return bad("STACK_GLOBAL needs two strings");
          MONARCHRT_RETURN_IF_ERROR(global(mod->s, name->s));
          break;
        }
        case 'q': case 'r': case 0x94: {  // BINPUT, LONG_BINPUT, MEMOIZE
          uint64_t idx = memo_.size();
          if (op != 0x94) MONARCHRT_RETURN_IF_ERROR(u(op == 'q' ? 1 : 4, &idx));
          if (stack_.empty()) return bad("memo put on an empty stack");
          if (idx > 10000000) return bad("memo index too large");
          if (idx >= memo_.size()) memo_.resize(idx + 1, nullptr);
          memo_[idx] = stack_.back();
          break;
        }
        case 'h': case 'j': {  // BINGET, LONG_BINGET
          uint64_t idx;
          MONARCHRT_RETURN_IF_ERROR(u(op == 'h' ? 1 : 4, &idx));
          if (idx >= memo_.size() || memo_[idx] == nullptr) return bad("memo get of an unset index " + str(idx));
          push(memo_[idx]);
          break;
        }
        case 't': {  // TUPLE
          std::vector<PyObj*> items;
          MONARCHRT_RETURN_IF_ERROR(pop_mark(&items));
          PyObj* o = make(PyObj::kTuple);
          o->items = std::move(items);
          push(o);
          break;
        }
        case 0x85: case 0x86: case 0x87: {  // TUPLE1..3
          const size_t n = size_t(op - 0x84);
          if (stack_.size() < n) return bad("stack underflow");
          PyObj* o = make(PyObj::kTuple);
          o->items.assign(stack_.end() - long(n), stack_.end());
          stack_.resize(stack_.size() - n);
          for (PyObj* x : o->items) if (x->kind == PyObj::kMark) return bad("mark inside a tuple");
          push(o);
          break;
        }
        case 'a': {  // APPEND
          PyObj *v, *l;
          MONARCHRT_RETURN_IF_ERROR(pop(&v));
          MONARCHRT_RETURN_IF_ERROR(top(&l));
          if (l->kind != PyObj::kList) return bad("APPEND to a non-list");
          l->items.push_back(v);
          break;
        }
        case 'e': {  // APPENDS
          std::vector<PyObj*> items;
          MONARCHRT_RETURN_IF_ERROR(pop_mark(&items));
          PyObj* l;
          MONARCHRT_RETURN_IF_ERROR(top(&l));
          if (l->kind != PyObj::kList) return bad("APPENDS to a non-list");
          l->items.insert(l->items.end(), items.begin(), items.end());
          break;
        }
        case 's': {  // SETITEM
          PyObj *v, *k, *dct;
          MONARCHRT_RETURN_IF_ERROR(pop(&v));
          MONARCHRT_RETURN_IF_ERROR(pop(&k));
          MONARCHRT_RETURN_IF_ERROR(top(&dct));
          if (dct->kind != PyObj::kDict) return bad("SETITEM on a non-dict");
          dct->dict.emplace_back(k, v);
          break;
        }
        case 'u': {  // SETITEMS
          std::vector<PyObj*> items;
          MONARCHRT_RETURN_IF_ERROR(pop_mark(&items));
          PyObj* dct;
          MONARCHRT_RETURN_IF_ERROR(top(&dct));
          if (dct->kind != PyObj::kDict || items.size() % 2 != 0) return bad("SETITEMS needs a dict and key/value pairs");
          for (size_t k = 0; k < items.size(); k += 2) dct->dict.emplace_back(items[k], items[k + 1]);
          break;
        }
        case 'b': {  // BUILD: state of a tensor or dict (e.g. parameter attributes), ignored
          PyObj *state, *obj;
          MONARCHRT_RETURN_IF_ERROR(pop(&state));
          MONARCHRT_RETURN_IF_ERROR(top(&obj));
          if (obj->kind != PyObj::kTensor && obj->kind != PyObj::kDict) return bad("BUILD on an unsupported object");
          break;
        }
        case 'Q': {  // BINPERSID: ('storage', StorageType, key, location, numel)
          PyObj* pid;
          MONARCHRT_RETURN_IF_ERROR(pop(&pid));
          MONARCHRT_RETURN_IF_ERROR(storage(pid));
          break;
        }
        case 'R': {  // REDUCE
          PyObj *args, *fn;
          MONARCHRT_RETURN_IF_ERROR(pop(&args));
          MONARCHRT_RETURN_IF_ERROR(pop(&fn));
          PyObj* result = nullptr;
          MONARCHRT_RETURN_IF_ERROR(reduce(fn, args, &result));
          push(result);
          break;
        }
        case '.': {  // STOP
          PyObj* r;
          MONARCHRT_RETURN_IF_ERROR(pop(&r));
          *root = r;
          return Status();
        }
        default:
          return bad("unsupported pickle opcode 0x" + hex(op) + " at byte " + str(pos_ - 1) +
                     " (only what torch.save writes for state dicts is accepted)");
      }
      if (stack_.size() > 1000000) return bad("stack too deep");
    }
  }

 private:
  const std::vector<uint8_t>& d_;
  std::string what_;
  size_t pos_ = 0;
  uint64_t ops_ = 0;
  std::vector<PyObj*> stack_, memo_;
  std::vector<std::unique_ptr<PyObj>> arena_;

  static std::string hex(uint8_t v) {
    const char* digits = "0123456789abcdef";
    return std::string{digits[v >> 4], digits[v & 15]};
  }
  Status bad(const std::string& why) const { return Status::corrupt(what_ + ": data.pkl: " + why); }
  PyObj* make(PyObj::Kind k) {
    arena_.push_back(std::make_unique<PyObj>());
    arena_.back()->kind = k;
    return arena_.back().get();
  }
  PyObj* integer(int64_t v) {
    PyObj* o = make(PyObj::kInt);
    o->i = v;
    return o;
  }
  void push(PyObj* o) { stack_.push_back(o); }
  Status need(uint64_t n) const { return n <= d_.size() - pos_ ? Status() : bad("truncated"); }
  Status skip(uint64_t n) {
    MONARCHRT_RETURN_IF_ERROR(need(n));
    pos_ += n;
    return Status();
  }
  Status u(int n, uint64_t* v) {
    MONARCHRT_RETURN_IF_ERROR(need(uint64_t(n)));
    *v = n == 0 ? 0 : le(&d_[pos_], n);
    pos_ += size_t(n);
    return Status();
  }
  Status line(std::string* out) {
    const size_t start = pos_;
    while (pos_ < d_.size() && d_[pos_] != '\n') {
      if (pos_ - start > 256) return bad("GLOBAL name too long");
      ++pos_;
    }
    if (pos_ >= d_.size()) return bad("truncated GLOBAL");
    out->assign(reinterpret_cast<const char*>(&d_[start]), pos_ - start);
    ++pos_;
    return Status();
  }
  Status pop(PyObj** o) {
    if (stack_.empty() || stack_.back()->kind == PyObj::kMark) return bad("stack underflow");
    *o = stack_.back();
    stack_.pop_back();
    return Status();
  }
  Status top(PyObj** o) {
    if (stack_.empty() || stack_.back()->kind == PyObj::kMark) return bad("stack underflow");
    *o = stack_.back();
    return Status();
  }
  Status pop_mark(std::vector<PyObj*>* items) {
    size_t k = stack_.size();
    while (k > 0 && stack_[k - 1]->kind != PyObj::kMark) --k;
    if (k == 0) return bad("no MARK on the stack");
    items->assign(stack_.begin() + long(k), stack_.end());
    stack_.resize(k - 1);
    return Status();
  }
  Status global(const std::string& mod, const std::string& name) {
    static const char* kAllowed[] = {
        "collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
        "torch._tensor._rebuild_from_type_v2", "torch.FloatStorage", "torch.HalfStorage", "torch.BFloat16Storage",
        "torch.DoubleStorage", "torch.nn.parameter.Parameter", "torch.Tensor"};
    const std::string full = mod + "." + name;
    for (const char* a : kAllowed) {
      if (full == a) {
        PyObj* o = make(PyObj::kGlobal);
        o->s = full;
        push(o);
        return Status();
      }
    }
    if (mod == "torch" && name.size() > 7 && name.compare(name.size() - 7, 7, "Storage") == 0) {
      return Status::unsupported(what_ + ": storage type " + full +
                                 " is not supported (FloatStorage, HalfStorage, BFloat16Storage, DoubleStorage)");
    }
    return Status::unsupported(what_ + ": data.pkl refers to '" + full +
                               "', which a state-dict reader does not accept (no code from a file is run)");
  }
  Status storage(PyObj* pid) {
    if (pid->kind != PyObj::kTuple || pid->items.size() != 5 || pid->items[0]->kind != PyObj::kStr ||
        pid->items[0]->s != "storage" || pid->items[1]->kind != PyObj::kGlobal || pid->items[2]->kind != PyObj::kStr ||
        pid->items[4]->kind != PyObj::kInt || pid->items[4]->i < 0) {
      return bad("persistent id is not ('storage', type, key, location, numel)");
    }
    const std::string& type = pid->items[1]->s;
    PyObj* o = make(PyObj::kStorage);
    if (type == "torch.FloatStorage") o->dtype = DType::kF32;
    else if (type == "torch.HalfStorage") o->dtype = DType::kF16;
    else if (type == "torch.BFloat16Storage") o->dtype = DType::kBF16;
    else if (type == "torch.DoubleStorage") o->dtype = DType::kF64;
    else return bad("persistent id names " + type + ", not a storage type");
    o->s = pid->items[2]->s;
    o->numel = pid->items[4]->i;
    push(o);
    return Status();
  }
  static bool int_tuple(const PyObj* t, std::vector<int64_t>* out) {
    if (t->kind != PyObj::kTuple) return false;
    for (const PyObj* x : t->items) {
      if (x->kind != PyObj::kInt) return false;
      out->push_back(x->i);
    }
    return true;
  }
  Status reduce(PyObj* fn, PyObj* args, PyObj** result) {
    if (fn->kind != PyObj::kGlobal || args->kind != PyObj::kTuple) return bad("REDUCE needs a global and a tuple");
    const std::string& f = fn->s;
    const auto& a = args->items;
    if (f == "collections.OrderedDict") {
      if (!a.empty()) return bad("OrderedDict with arguments");
      *result = make(PyObj::kDict);
      return Status();
    }
    if (f == "torch._utils._rebuild_tensor_v2") {
      if (a.size() < 4 || a[0]->kind != PyObj::kStorage || a[1]->kind != PyObj::kInt) {
        return bad("_rebuild_tensor_v2 arguments are not (storage, offset, size, stride, ...)");
      }
      PyObj* t = make(PyObj::kTensor);
      t->storage = a[0];
      t->dtype = a[0]->dtype;
      t->storage_offset = a[1]->i;
      if (!int_tuple(a[2], &t->shape) || !int_tuple(a[3], &t->strides) || t->shape.size() != t->strides.size()) {
        return bad("tensor size and stride must be tuples of integers of one length");
      }
      *result = t;
      return Status();
    }
    if (f == "torch._utils._rebuild_parameter") {
      if (a.empty() || a[0]->kind != PyObj::kTensor) return bad("_rebuild_parameter without a tensor");
      *result = a[0];
      return Status();
    }
    if (f == "torch._tensor._rebuild_from_type_v2") {  // (func, type, args, state)
      if (a.size() < 3 || a[0]->kind != PyObj::kGlobal || a[2]->kind != PyObj::kTuple) {
        return bad("_rebuild_from_type_v2 arguments are not (func, type, args, state)");
      }
      if (a[0]->s == "torch._tensor._rebuild_from_type_v2") return bad("recursive _rebuild_from_type_v2");
      return reduce(a[0], a[2], result);
    }
    return Status::unsupported(what_ + ": data.pkl calls '" + f + "', which a state-dict reader does not accept");
  }
};

// Collects the tensors of nested dicts, names joined with '/'.
Status flatten(const PyObj* dict, const std::string& prefix, int depth, const std::string& what,
               std::vector<std::pair<std::string, const PyObj*>>* out) {
  if (depth > 16) return Status::corrupt(what + ": data.pkl: dicts nested deeper than 16 levels");
  for (const auto& kv : dict->dict) {
    std::string key;
    if (kv.first->kind == PyObj::kStr) key = kv.first->s;
    else if (kv.first->kind == PyObj::kInt) key = std::to_string(kv.first->i);
    else continue;  // other keys never name tensors of a state dict
    if (kv.second->kind == PyObj::kTensor) out->emplace_back(prefix + key, kv.second);
    else if (kv.second->kind == PyObj::kDict) MONARCHRT_RETURN_IF_ERROR(flatten(kv.second, prefix + key + "/", depth + 1, what, out));
  }
  return Status();
}

Status open_torch_zip(const ByteSource& src, std::vector<CheckpointTensor>* tensors) {
  const std::string& what = src.name();
  std::map<std::string, ZipEntry> entries;
  MONARCHRT_RETURN_IF_ERROR(read_zip(src, &entries));
  std::string root;
  for (const auto& e : entries) {
    const std::string& n = e.first;
    if (n.size() >= 9 && n.compare(n.size() - 9, 9, "/data.pkl") == 0 && n.find('/') == n.size() - 9) {
      root = n.substr(0, n.size() - 8);  // "<root>/"
      break;
    }
  }
  if (root.empty()) return Status::corrupt(what + ": not a torch.save file: no <root>/data.pkl entry");
  auto bo = entries.find(root + "byteorder");
  if (bo != entries.end()) {
    std::string order(std::min<uint64_t>(bo->second.size, 16), '\0');
    if (!src.read(bo->second.data_offset, order.size(), order.data())) return Status::io_error(what + ": read failed");
    if (order != "little") return Status::unsupported(what + ": byte order '" + order + "' (only little-endian files)");
  }
  const ZipEntry& pkl = entries[root + "data.pkl"];
  if (pkl.size > (uint64_t{256} << 20)) return Status::corrupt(what + ": data.pkl larger than 256 MB");
  std::vector<uint8_t> bytes(pkl.size);
  if (!src.read(pkl.data_offset, pkl.size, bytes.data())) return Status::io_error(what + ": read failed");
  Unpickler vm(bytes, what);
  PyObj* top = nullptr;
  MONARCHRT_RETURN_IF_ERROR(vm.run(&top));
  if (top->kind != PyObj::kDict) return Status::corrupt(what + ": data.pkl does not hold a dict (a state dict)");
  std::vector<std::pair<std::string, const PyObj*>> found;
  MONARCHRT_RETURN_IF_ERROR(flatten(top, "", 0, what, &found));
  for (const auto& f : found) {
    const PyObj* t = f.second;
    const std::string tname = what + ": tensor '" + f.first + "': ";
    auto it = entries.find(root + "data/" + t->storage->s);
    if (it == entries.end()) return Status::corrupt(tname + "storage '" + t->storage->s + "' is missing from the zip");
    const uint64_t es = uint64_t(dtype_size(t->dtype));
    if (uint64_t(t->storage->numel) > it->second.size / es) {
      return Status::corrupt(tname + "storage of " + str(t->storage->numel) + " elements does not fit its " +
                             str(it->second.size) + "-byte zip entry");
    }
    CheckpointTensor c;
    c.name = f.first;
    c.dtype = t->dtype;
    c.shape = t->shape;
    c.strides = t->strides;
    int64_t numel = 0;
    if (!checked_numel(c.shape, &numel)) return Status::corrupt(tname + "invalid shape");
    if (t->storage_offset < 0) return Status::corrupt(tname + "negative storage offset");
    // Highest element touched must lie inside the storage.
    uint64_t last = uint64_t(t->storage_offset);
    if (numel > 0) {
      for (size_t d = 0; d < c.shape.size(); ++d) {
        if (c.strides[d] < 0 || c.strides[d] > (int64_t{1} << 40)) return Status::corrupt(tname + "invalid stride");
        last += uint64_t(c.shape[d] - 1) * uint64_t(c.strides[d]);
      }
      if (last >= uint64_t(t->storage->numel)) {
        return Status::corrupt(tname + "reads element " + str(last) + " of a storage of " + str(t->storage->numel));
      }
    }
    c.offset = it->second.data_offset + uint64_t(t->storage_offset) * es;
    tensors->push_back(std::move(c));
  }
  return Status();
}

}  // namespace

int64_t CheckpointTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

Status open_file_source(const std::string& path, std::unique_ptr<ByteSource>* out) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) return Status::io_error(path + ": is a directory");
  const auto size = std::filesystem::file_size(path, ec);
  if (ec) return Status::io_error(path + ": cannot open for reading");
  auto src = std::make_unique<FileSource>(path, uint64_t(size));
  if (!src->ok()) return Status::io_error(path + ": cannot open for reading");
  *out = std::move(src);
  return Status();
}

std::unique_ptr<ByteSource> memory_source(std::vector<uint8_t> bytes, std::string name) {
  return std::make_unique<MemorySource>(std::move(bytes), std::move(name));
}

Status Checkpoint::open(const std::string& path, Checkpoint* out) {
  std::unique_ptr<ByteSource> src;
  MONARCHRT_RETURN_IF_ERROR(open_file_source(path, &src));
  return open(std::move(src), out);
}

Status Checkpoint::open(std::unique_ptr<ByteSource> source, Checkpoint* out) {
  Checkpoint c;
  uint8_t magic[4] = {0, 0, 0, 0};
  const bool zip = source->read(0, 4, magic) && le(magic, 4) == 0x04034b50;
  c.format_ = zip ? Format::kTorchZip : Format::kSafetensors;
  try {
    MONARCHRT_RETURN_IF_ERROR(zip ? open_torch_zip(*source, &c.tensors_) : open_safetensors(*source, &c.tensors_));
  } catch (const std::bad_alloc&) {
    return Status::corrupt(source->name() + ": metadata too large to hold in memory");
  }
  std::vector<const CheckpointTensor*> sorted;
  for (const auto& t : c.tensors_) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->name < b->name; });
  for (size_t i = 1; i < sorted.size(); ++i)
    if (sorted[i]->name == sorted[i - 1]->name) return Status::corrupt(source->name() + ": tensor '" + sorted[i]->name + "' appears twice");
  c.source_ = std::move(source);
  *out = std::move(c);
  return Status();
}

const CheckpointTensor* Checkpoint::find(const std::string& name) const {
  for (const auto& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

const std::string& Checkpoint::source_name() const {
  static const std::string none = "(no checkpoint)";
  return source_ ? source_->name() : none;
}

Status Checkpoint::read_f32(const CheckpointTensor& t, std::vector<float>* out) const {
  if (!source_) return Status::invalid("checkpoint: not open");
  const int64_t n = t.numel();
  const int64_t es = dtype_size(t.dtype);
  // Bytes spanned by the tensor (contiguous or not), read in one piece.
  uint64_t span = n > 0 ? 1 : 0;
  for (size_t d = 0; d < t.shape.size() && n > 0; ++d) span += uint64_t(t.shape[d] - 1) * uint64_t(t.strides[d]);
  std::vector<uint8_t> raw;
  try {
    raw.resize(span * uint64_t(es));
    out->resize(size_t(n));
  } catch (const std::bad_alloc&) {
    return Status::io_error(source_->name() + ": tensor '" + t.name + "' does not fit in memory");
  }
  if (!source_->read(t.offset, raw.size(), raw.data())) {
    return Status::io_error(source_->name() + ": read of tensor '" + t.name + "' failed (file changed or truncated?)");
  }
  const size_t rank = t.shape.size();
  std::vector<int64_t> idx(rank, 0);
  for (int64_t i = 0; i < n; ++i) {
    int64_t off = 0;
    for (size_t d = 0; d < rank; ++d) off += idx[d] * t.strides[d];
    (*out)[size_t(i)] = static_cast<float>(load_element(raw.data(), t.dtype, off));
    for (size_t d = rank; d-- > 0;) {
      if (++idx[d] < t.shape[d]) break;
      idx[d] = 0;
    }
  }
  return Status();
}

Status encode_safetensors(const std::vector<SafetensorsEntry>& entries, std::vector<uint8_t>* out) {
  std::string header = "{";
  uint64_t offset = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const SafetensorsEntry& e = entries[i];
    for (char ch : e.name)
      if (ch == '"' || ch == '\\' || static_cast<unsigned char>(ch) < 0x20) return Status::invalid("name: '" + e.name + "' needs JSON escaping");
    int64_t n = 0;
    if (!checked_numel(e.shape, &n)) return Status::invalid("shape of '" + e.name + "' is invalid");
    const uint64_t bytes = uint64_t(n) * uint64_t(dtype_size(e.dtype));
    header += (i ? "," : "") + std::string("\"") + e.name + "\":{\"dtype\":\"" + safetensors_name(e.dtype) + "\",\"shape\":[";
    for (size_t d = 0; d < e.shape.size(); ++d) header += (d ? "," : "") + std::to_string(e.shape[d]);
    header += "],\"data_offsets\":[" + str(offset) + "," + str(offset + bytes) + "]}";
    offset += bytes;
  }
  header += "}";
  while ((8 + header.size()) % 8 != 0) header += ' ';
  out->clear();
  for (int k = 0; k < 8; ++k) out->push_back(uint8_t(uint64_t(header.size()) >> (8 * k)));
  out->insert(out->end(), header.begin(), header.end());
  for (const SafetensorsEntry& e : entries) {
    int64_t n = 0;
    checked_numel(e.shape, &n);
    if (n == 0) continue;
    if (e.data == nullptr) return Status::invalid("data of '" + e.name + "' is null");
    const auto* p = static_cast<const uint8_t*>(e.data);
    out->insert(out->end(), p, p + n * dtype_size(e.dtype));
  }
  return Status();
}

Status write_safetensors(const std::string& path, const std::vector<SafetensorsEntry>& entries) {
  std::vector<uint8_t> bytes;
  MONARCHRT_RETURN_IF_ERROR(encode_safetensors(entries, &bytes));
  std::ofstream f(path, std::ios::binary);
  if (!f) return Status::io_error(path + ": cannot open for writing");
  f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  if (!f) return Status::io_error(path + ": write failed (disk full?)");
  return Status();
}

}  // namespace monarchrt
