// The causal Wan DiT on one GPU (design: docs/engine.md). bf16 weights and activations, fp32
// accumulation and an fp32 residual stream; cuBLASLt linear layers, fused kernels for the norms,
// modulation, gated residuals, q/k RMSNorm + 3D RoPE + KV-cache write, our attention kernels
// (Monarch, or the dense FlashAttention-style kernel; cross-attention always dense). All device
// memory is planned and allocated in init(); forward() allocates nothing and, by default, runs
// each chunk position as a CUDA graph captured on its first use. This header is CUDA-free; the
// class exists when the library was built with CUDA (MONARCHRT_WITH_CUDA).
#pragma once

#include <memory>
#include <string>

#include "monarchrt/wan.h"

namespace monarchrt {

struct WanCudaOptions {
  int64_t max_chunk_frames = 3;  // largest `frames` of a forward() call (activations are sized for it)
  bool cuda_graphs = true;       // replay a captured graph per (frames, start_frame)
  bool profile = false;          // time every step with CUDA events (launches directly, no graphs)
};

class WanDiTCuda : public WanModel {
 public:
  WanDiTCuda();
  ~WanDiTCuda() override;
  WanDiTCuda(const WanDiTCuda&) = delete;
  WanDiTCuda& operator=(const WanDiTCuda&) = delete;

  // Converts the weights to bf16 on the current device and allocates everything a video needs
  // (weights, KV cache, text cache, activations, attention and GEMM workspaces). Needs head dim
  // 64 or 128 and dim, ffn_dim, text_dim multiples of 8. The weights may be freed afterwards.
  Status init(const WanWeights& weights, const WanRunConfig& run, const WanCudaOptions& options = {});
  // Text features [batch, text_len, text_dim] (host, fp32): fills every layer's cross-attention
  // K/V on the device (once per video).
  Status set_text(const float* context);
  // WanModel::forward with host buffers: copies x in, runs the pass on the device, copies the
  // flow out (the only host synchronization).
  Status forward(const float* x, int64_t frames, int64_t start_frame, double t, float* flow) override;
  // WanModel::denoise_chunk on the device: the noise copied in, the passes and the sampler queued
  // back to back with no synchronization between them (each draw made on the host and copied in
  // while the pass before it runs), x0 copied out once and returned while the refresh pass runs
  // (every later call, and the destructor, waits for it). Not with options.profile, which times
  // and synchronizes every pass on its own.
  bool runs_chunks() const override;
  Status denoise_chunk(const float* xt, const std::function<void(int step, float* dst)>& draw, int64_t frames,
                       int64_t start_frame, bool refresh, float* x0) override;
  const WanRunConfig& run() const override;
  const WanConfig& config() const override;
  // Device bytes allocated by init(), and what they hold, for messages.
  size_t device_bytes() const;
  std::string memory_report() const;
  // With options.profile: GPU time per kind of step summed over every forward() so far, as a
  // table (milliseconds, per pass, share).
  std::string profile_report() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace monarchrt
