// Small fp32 building blocks of the CPU paths. The reductions use `omp simd reduction` (compiled
// with -fopenmp-simd, no OpenMP runtime) so the compiler may vectorize them; the rest is plain
// loops the auto-vectorizer handles.
#pragma once

#include <cmath>
#include <cstdint>
#include <new>

#include "monarchrt/status.h"

namespace monarchrt {
namespace cpu {

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// y += alpha * x
inline void axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

inline void scale_in_place(float alpha, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] *= alpha;
}

// Turns z[0..n) into softmax(z) in place and returns the log-sum-exp of the input.
inline float softmax_in_place(float* z, int64_t n) {
  float zmax = -INFINITY;
  for (int64_t i = 0; i < n; ++i) zmax = z[i] > zmax ? z[i] : zmax;
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    z[i] = std::exp(z[i] - zmax);
    sum += z[i];
  }
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < n; ++i) z[i] *= inv;
  return zmax + std::log(sum);
}

// Runs `body` and turns an allocation failure into a Status instead of an escaping exception.
template <typename Body>
Status guard_allocation(Body&& body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return Status::unsupported("out of host memory for this problem size");
  }
}

}  // namespace cpu
}  // namespace monarchrt
