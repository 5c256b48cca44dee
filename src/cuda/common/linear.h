// Linear layers through cuBLASLt: out[M, N] = epilogue(in[M, K] W[N, K]^T + bias) with row-major
// bf16 `in` and W (a PyTorch Linear weight), fp32 accumulation, out bf16 or fp32 (the bias in the
// output's dtype). Each shape is planned once (cuBLASLt's heuristic picks the algorithm when the
// plan is made, at start-up: never at run time), and a run only sets the bias pointer and
// launches, so it can be captured in a CUDA graph.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "monarchrt/status.h"
#include "monarchrt/tensor.h"

namespace monarchrt {
namespace cuda_detail {

enum class LinearEpilogue { kBias, kBiasGelu };

class LinearPlan {
 public:
  LinearPlan() = default;
  LinearPlan(const LinearPlan&) = delete;
  LinearPlan& operator=(const LinearPlan&) = delete;
  ~LinearPlan();
  Status init(cublasLtHandle_t handle, int64_t M, int64_t N, int64_t K, DType out, LinearEpilogue epilogue,
              size_t workspace_bytes);
  Status run(const void* in, const void* weight, const void* bias, void* out, void* workspace, cudaStream_t stream);
  int64_t M() const { return M_; }
  int64_t N() const { return N_; }
  int64_t K() const { return K_; }

 private:
  cublasLtHandle_t handle_ = nullptr;
  cublasLtMatmulDesc_t desc_ = nullptr;
  cublasLtMatrixLayout_t a_ = nullptr, b_ = nullptr, d_ = nullptr;
  cublasLtMatmulAlgo_t algo_{};
  size_t workspace_bytes_ = 0;
  int64_t M_ = 0, N_ = 0, K_ = 0;
};

}  // namespace cuda_detail
}  // namespace monarchrt
