// Reading and writing NumPy .npy files (format versions 1.0, 2.0 and 3.0): float16, float32 and
// float64, any byte order (converted to little-endian on read), C order. The reader checks every
// field and the file size against the header and never reads past the buffer, so a truncated or
// corrupt file yields a kCorruptData Status naming what is wrong.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "monarchrt/status.h"
#include "monarchrt/tensor.h"

namespace monarchrt {

struct NpyArray {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;  // C order, little-endian, shape.product() * dtype_size(dtype) bytes
  int64_t numel() const;
};

// Parses an in-memory .npy image (`what` names it in messages). Used by read_npy and the fuzzers.
Status parse_npy(const uint8_t* bytes, size_t size, const std::string& what, NpyArray* out);
Status read_npy(const std::string& path, NpyArray* out);
// Writes `data` (C order, native little-endian) as a version 1.0 .npy file; kF32/kF16/kF64 only.
Status write_npy(const std::string& path, DType dtype, const std::vector<int64_t>& shape,
                 const void* data);
// The .npy image write_npy would write, in memory.
Status encode_npy(DType dtype, const std::vector<int64_t>& shape, const void* data,
                  std::vector<uint8_t>* out);

}  // namespace monarchrt
