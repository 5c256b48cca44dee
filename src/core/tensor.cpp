// dtype names and sizes, fp16/bf16 host conversions, element access and view validation.
#include "monarchrt/tensor.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace monarchrt {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "float32";
    case DType::kF16: return "float16";
    case DType::kBF16: return "bfloat16";
    case DType::kF64: return "float64";
  }
  return "unknown";
}

int64_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kF32: return 4;
    case DType::kF16: return 2;
    case DType::kBF16: return 2;
    case DType::kF64: return 8;
  }
  return 0;
}

const char* device_name(Device device) { return device == Device::kCPU ? "cpu" : "cuda"; }

static uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    // zero or subnormal: man * 2^-24
    const float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf or nan
    return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  }
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (abs < 0x38800000u) {
    // subnormal half (or zero): value / 2^-24, rounded to nearest even by the FPU
    const float scaled = std::fabs(f) * 16777216.0f;  // 2^24, exact
    const uint32_t m = static_cast<uint32_t>(std::nearbyint(scaled));
    return static_cast<uint16_t>(sign | m);  // m == 0x400 becomes the smallest normal, correctly
  }
  // normal: rebias exponent, round mantissa 23 -> 10 bits to nearest even
  uint32_t r = abs - 0x38000000u;  // exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return static_cast<uint16_t>(sign | (r >> 13));
}

float bf16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet nan
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(rounded >> 16);
}

double load_element(const void* data, DType dtype, int64_t offset) {
  switch (dtype) {
    case DType::kF32: return static_cast<const float*>(data)[offset];
    case DType::kF64: return static_cast<const double*>(data)[offset];
    case DType::kF16: return half_to_float(static_cast<const uint16_t*>(data)[offset]);
    case DType::kBF16: return bf16_to_float(static_cast<const uint16_t*>(data)[offset]);
  }
  return 0.0;
}

void store_element(void* data, DType dtype, int64_t offset, double value) {
  switch (dtype) {
    case DType::kF32: static_cast<float*>(data)[offset] = static_cast<float>(value); return;
    case DType::kF64: static_cast<double*>(data)[offset] = value; return;
    case DType::kF16:
      static_cast<uint16_t*>(data)[offset] = float_to_half(static_cast<float>(value));
      return;
    case DType::kBF16:
      static_cast<uint16_t*>(data)[offset] = float_to_bf16(static_cast<float>(value));
      return;
  }
}

TensorView TensorView::contiguous(void* data, DType dtype, int64_t B, int64_t S, int64_t H,
                                  int64_t D, Device device) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = device;
  v.shape[0] = B;
  v.shape[1] = S;
  v.shape[2] = H;
  v.shape[3] = D;
  v.stride[3] = 1;
  v.stride[2] = D;
  v.stride[1] = H * D;
  v.stride[0] = S * H * D;
  return v;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string o = "[";
  for (size_t i = 0; i < shape.size(); ++i) o += (i ? ", " : "") + std::to_string(shape[i]);
  return o + "]";
}

std::string TensorView::shape_string() const { return monarchrt::shape_string({shape[0], shape[1], shape[2], shape[3]}); }

Status validate_view(const TensorView& view, const char* name, bool writable) {
  static const char* kDims[4] = {"batch (dim 0)", "tokens (dim 1)", "heads (dim 2)", "head dim (dim 3)"};
  for (int i = 0; i < 4; ++i) {
    if (view.shape[i] <= 0) {
      return Status::invalid(std::string(name) + ": " + kDims[i] + " must be positive, got shape " +
                             view.shape_string());
    }
    if (view.stride[i] < 0) {
      return Status::invalid(std::string(name) + ": strides must be non-negative, got stride " +
                             std::to_string(view.stride[i]) + " for " + kDims[i]);
    }
  }
  if (view.data == nullptr) return Status::invalid(std::string(name) + ": data pointer is null");
  if (writable) {
    // No two elements may share an address: sorted by stride, each stride must step over
    // everything the smaller dimensions span.
    int order[4] = {0, 1, 2, 3};
    std::sort(order, order + 4, [&](int a, int b) { return view.stride[a] < view.stride[b]; });
    int64_t span = 1;
    for (int i = 0; i < 4; ++i) {
      const int d = order[i];
      if (view.shape[d] == 1) continue;
      if (view.stride[d] < span) {
        return Status::invalid(std::string(name) +
                               ": output strides overlap (two elements would share an address)");
      }
      int64_t extent = 0;
      if (__builtin_mul_overflow(view.stride[d], view.shape[d] - 1, &extent) ||
          __builtin_add_overflow(span, extent, &span)) {
        return Status::invalid(std::string(name) + ": strides times sizes overflow 64 bits");
      }
    }
  }
  return Status();
}

}  // namespace monarchrt
