// Reading model weights: safetensors files and PyTorch zip-pickle files (.pt / .pth, what
// torch.save writes), through a restricted unpickler that understands only what state dicts are
// made of: dicts and ordered dicts (nested, e.g. Self-Forcing's `generator` / `generator_ema`),
// lists, tuples, numbers, strings, and tensors of float32 / float16 / bfloat16 / float64 storages
// (`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`, `torch._tensor._rebuild_from_type_v2`).
// Any other global is refused with its name: no code from a file is ever run.
//
// Opening reads only the metadata (the safetensors JSON header; the zip directory and data.pkl)
// and checks it against the file: every tensor's bytes must lie inside the file (inside its
// storage for .pt), sizes must agree, dtypes must be known. A truncated or corrupt file gives a
// kCorruptData Status naming the file and what is wrong, never a crash. Tensor data is read on
// demand. Names of nested dicts are joined with '/': "generator_ema/model.blocks.0.ffn.0.weight".
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "monarchrt/status.h"
#include "monarchrt/tensor.h"

namespace monarchrt {

// Random-access bytes: a file or a memory buffer (for tests and fuzzing).
class ByteSource {
 public:
  virtual ~ByteSource() = default;
  virtual uint64_t size() const = 0;
  // Reads [offset, offset + n); false if that range is not inside the source or the read failed.
  virtual bool read(uint64_t offset, uint64_t n, void* dst) const = 0;
  virtual const std::string& name() const = 0;
};
Status open_file_source(const std::string& path, std::unique_ptr<ByteSource>* out);
std::unique_ptr<ByteSource> memory_source(std::vector<uint8_t> bytes, std::string name);

struct CheckpointTensor {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements (row-major contiguous for safetensors)
  uint64_t offset = 0;           // byte offset of element 0 in the source
  int64_t numel() const;
};

class Checkpoint {
 public:
  enum class Format { kSafetensors, kTorchZip };

  // Detects the format from the first bytes ("PK\x03\x04": torch zip, else safetensors).
  static Status open(const std::string& path, Checkpoint* out);
  static Status open(std::unique_ptr<ByteSource> source, Checkpoint* out);

  Format format() const { return format_; }
  const std::vector<CheckpointTensor>& tensors() const { return tensors_; }
  const CheckpointTensor* find(const std::string& name) const;  // nullptr if absent
  // The tensor's elements in row-major order of its shape, converted to float32.
  Status read_f32(const CheckpointTensor& t, std::vector<float>* out) const;
  const std::string& source_name() const;

 private:
  Format format_ = Format::kSafetensors;
  std::shared_ptr<ByteSource> source_;
  std::vector<CheckpointTensor> tensors_;
};

// Writes float32 / float16 / bfloat16 / float64 tensors (row-major data) as a safetensors file.
struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
};
Status write_safetensors(const std::string& path, const std::vector<SafetensorsEntry>& entries);
Status encode_safetensors(const std::vector<SafetensorsEntry>& entries, std::vector<uint8_t>* out);

}  // namespace monarchrt
