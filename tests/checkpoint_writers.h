// Minimal writers of torch.save-style files for the tests: a protocol-2 pickle builder and a zip
// container of stored entries (what torch.save writes), so that loaders can be tested with the
// real layout on machines without torch.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace monarchrt {
namespace test {

inline void put_le(std::vector<uint8_t>& b, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b.push_back(uint8_t(v >> (8 * i)));
}

struct PickleWriter {
  std::vector<uint8_t> b;
  int memo = 0;
  void op(uint8_t o) { b.push_back(o); }
  void str(const std::string& s) {
    op('X');
    put_le(b, s.size(), 4);
    b.insert(b.end(), s.begin(), s.end());
  }
  void integer(int64_t v) {
    op('J');
    put_le(b, uint64_t(v), 4);
  }
  void global(const std::string& mod, const std::string& name) {
    op('c');
    b.insert(b.end(), mod.begin(), mod.end());
    op('\n');
    b.insert(b.end(), name.begin(), name.end());
    op('\n');
  }
  void put() {
    op('q');
    op(uint8_t(memo++));
  }
  void int_tuple(const std::vector<int64_t>& v) {
    op('(');
    for (int64_t x : v) integer(x);
    op('t');
  }
  // torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())
  void tensor(const std::string& storage_type, const std::string& key, int64_t numel, int64_t offset,
              const std::vector<int64_t>& size, const std::vector<int64_t>& stride, bool parameter) {
    if (parameter) global("torch._utils", "_rebuild_parameter");
    global("torch._utils", "_rebuild_tensor_v2");
    put();
    op('(');
    op('(');
    str("storage");
    global("torch", storage_type);
    str(key);
    str("cpu");
    integer(numel);
    op('t');
    op('Q');  // BINPERSID
    integer(offset);
    int_tuple(size);
    int_tuple(stride);
    op(0x89);  // False
    global("collections", "OrderedDict");
    op(')');
    op('R');
    op('t');
    op('R');
    if (parameter) {
      op(0x88);  // requires_grad True
      global("collections", "OrderedDict");
      op(')');
      op('R');
      op(0x87);  // TUPLE3
      op('R');
    }
  }
};

struct ZipWriter {
  std::vector<uint8_t> b, cd;
  int count = 0;
  void add(const std::string& name, const std::vector<uint8_t>& data) {
    const uint64_t local = b.size();
    put_le(b, 0x04034b50, 4);
    put_le(b, 20, 2);  // version
    put_le(b, 0, 2);   // flags
    put_le(b, 0, 2);   // stored
    put_le(b, 0, 4);   // time, date
    put_le(b, 0, 4);   // crc (not checked by the reader)
    put_le(b, data.size(), 4);
    put_le(b, data.size(), 4);
    put_le(b, name.size(), 2);
    put_le(b, 0, 2);
    b.insert(b.end(), name.begin(), name.end());
    b.insert(b.end(), data.begin(), data.end());
    put_le(cd, 0x02014b50, 4);
    put_le(cd, 20, 2);
    put_le(cd, 20, 2);
    put_le(cd, 0, 2);
    put_le(cd, 0, 2);
    put_le(cd, 0, 4);
    put_le(cd, 0, 4);
    put_le(cd, data.size(), 4);
    put_le(cd, data.size(), 4);
    put_le(cd, name.size(), 2);
    put_le(cd, 0, 2);
    put_le(cd, 0, 2);
    put_le(cd, 0, 2);
    put_le(cd, 0, 2);
    put_le(cd, 0, 4);
    put_le(cd, local, 4);
    cd.insert(cd.end(), name.begin(), name.end());
    ++count;
  }
  std::vector<uint8_t> finish() {
    std::vector<uint8_t> out = b;
    const uint64_t cd_offset = out.size();
    out.insert(out.end(), cd.begin(), cd.end());
    put_le(out, 0x06054b50, 4);
    put_le(out, 0, 4);
    put_le(out, count, 2);
    put_le(out, count, 2);
    put_le(out, cd.size(), 4);
    put_le(out, cd_offset, 4);
    put_le(out, 0, 2);
    return out;
  }
};

}  // namespace test
}  // namespace monarchrt
