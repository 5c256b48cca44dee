// Element types and the tensor view that every attention entry point takes: a pointer, a dtype, a
// device and a [B, S, H, D] shape with element strides. The view owns nothing. Host-side fp16 and
// bf16 conversions live here too, so that the CPU paths, the file readers and the tests agree on
// rounding (round to nearest even, NaN kept NaN).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "monarchrt/status.h"

namespace monarchrt {

enum class DType { kF32, kF16, kBF16, kF64 };
enum class Device { kCPU, kCUDA };

const char* dtype_name(DType dtype);     // "float32", "float16", "bfloat16", "float64"
int64_t dtype_size(DType dtype);          // bytes per element
const char* device_name(Device device);  // "cpu", "cuda"

float half_to_float(uint16_t h);
uint16_t float_to_half(float f);
float bf16_to_float(uint16_t b);
uint16_t float_to_bf16(float f);

// "[a, b, c]": a shape for messages.
std::string shape_string(const std::vector<int64_t>& shape);

// Reads element `offset` (in elements, not bytes) of a buffer of `dtype` as double / writes it.
double load_element(const void* data, DType dtype, int64_t offset);
void store_element(void* data, DType dtype, int64_t offset, double value);

// A [B, S, H, D] view: batch, tokens, heads, head dim (the FlashAttention convention).
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kF32;
  Device device = Device::kCPU;
  int64_t shape[4] = {0, 0, 0, 0};
  int64_t stride[4] = {0, 0, 0, 0};  // in elements

  // A densely packed row-major view (D fastest).
  static TensorView contiguous(void* data, DType dtype, int64_t B, int64_t S, int64_t H, int64_t D,
                               Device device = Device::kCPU);

  int64_t batch() const { return shape[0]; }
  int64_t tokens() const { return shape[1]; }
  int64_t heads() const { return shape[2]; }
  int64_t head_dim() const { return shape[3]; }
  int64_t numel() const { return shape[0] * shape[1] * shape[2] * shape[3]; }
  int64_t offset(int64_t b, int64_t s, int64_t h, int64_t d) const {
    return b * stride[0] + s * stride[1] + h * stride[2] + d * stride[3];
  }
  std::string shape_string() const;  // "[1, 4680, 12, 128]"
};

// Checks that `view` (called `name` in messages) is usable: non-null data unless empty, positive
// sizes, non-negative strides, and for an output (`writable`) no two elements at one address.
Status validate_view(const TensorView& view, const char* name, bool writable);

}  // namespace monarchrt
