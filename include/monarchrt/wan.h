// The causal Wan DiT's configuration and its weights (../shared/docs/self-forcing-spec.md
// sections 1.1, 1.2, 6): the parameter list of a configuration (825 tensors, 1,418,996,800
// parameters for Wan2.1-T2V-1.3B) and a strict loader that checks a checkpoint against it: every
// expected name present with exactly its shape, a float dtype, and no other tensor under the
// prefix. Dimensions are a config so that tests can build tiny models.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "monarchrt/attention.h"
#include "monarchrt/checkpoint.h"
#include "monarchrt/layout.h"
#include "monarchrt/status.h"

namespace monarchrt {

struct WanConfig {
  int64_t dim = 1536;
  int64_t num_heads = 12;
  int64_t num_layers = 30;
  int64_t ffn_dim = 8960;
  int64_t freq_dim = 256;   // timestep sinusoid width
  int64_t text_dim = 4096;  // umT5 width
  int64_t text_len = 512;
  int64_t in_dim = 16, out_dim = 16;
  int64_t patch_t = 1, patch_h = 2, patch_w = 2;
  double eps = 1e-6;

  int64_t head_dim() const { return dim / num_heads; }
  // Every dimension in [1, 2^20], dim divisible by num_heads, an even head dim of at least 12
  // (3D RoPE pairs), an even freq_dim, eps > 0.
  Status validate() const;
};

struct WanParameter {
  std::string name;  // bare Wan name, e.g. "blocks.0.self_attn.q.weight"
  std::vector<int64_t> shape;
  int64_t numel() const;
};

// The state-dict tensors of a configuration, in the order of spec section 1.2.
std::vector<WanParameter> wan_parameters(const WanConfig& config);

// Where the DiT's tensors live in a checkpoint: "" for the Wan safetensors file; for a
// Self-Forcing .pt, "generator_ema/model." (ema) or "generator/model.".
std::string wan_checkpoint_prefix(const Checkpoint& ck, bool ema);

// Checks names, shapes and dtypes of the tensors under `prefix` against `config` without reading
// any data. The error names the first missing, misshapen or unexpected tensor (and how many
// problems there are in all).
Status check_wan_checkpoint(const Checkpoint& ck, const WanConfig& config, const std::string& prefix);

// check_wan_checkpoint(), then reads every tensor as float32 (keyed by bare Wan name).
struct WanWeights {
  WanConfig config;
  std::map<std::string, std::vector<float>> tensors;
  const std::vector<float>& at(const std::string& name) const { return tensors.at(name); }
};
Status load_wan_weights(const Checkpoint& ck, const WanConfig& config, const std::string& prefix,
                        WanWeights* out);

}  // namespace monarchrt

namespace monarchrt {

// The configuration a checkpoint implies (every dimension except num_heads, which the weights do
// not determine): for a Self-Forcing .pt pass the prefix from wan_checkpoint_prefix().
Status wan_config_from_checkpoint(const Checkpoint& ck, const std::string& prefix, int64_t num_heads,
                                  WanConfig* out);
// Random weights in the real layout (N(0, scale^2) matrices, gains near 1), for trying the
// pipeline without a checkpoint and for tests.
WanWeights wan_random_weights(const WanConfig& config, uint64_t seed);

// How the DiT runs (spec sections 1.3, 2.4, 3): latent size, cache capacity, self-attention kind.
struct WanRunConfig {
  int64_t batch = 1;
  int64_t latent_h = 60, latent_w = 104;  // latent rows / columns (tokens: / patch_h, / patch_w)
  int64_t max_frames = 21;                // latent frames of the video (the KV cache's logical
                                          // size; see wan_cache_frames())
  bool monarch = false;                   // self-attention: Monarch (else dense)
  MonarchLayout layout;                   // Monarch tiling
  int num_iters = 1;
  int64_t sink_frames = 0, window_frames = 0;  // attended cache window (0 = all frames)
};

// Frames of K / V the engines keep per layer: max_frames, or sink + window when the attended
// window is smaller than the video (then a ring buffer, AttentionParams::cache_capacity_frames).
int64_t wan_cache_frames(const WanRunConfig& run);

// The self-attention call of both engines for the chunk [start_frame, start_frame + frames),
// KV-cache mode over the layer's cache (sink, window, ring buffer from `run`). kv_tokens, where
// given, receives the tokens (dim 1) of the k / v views that call passes.
AttentionParams wan_attention_params(const WanConfig& config, const WanRunConfig& run, int64_t frames,
                                     int64_t start_frame, int64_t* kv_tokens = nullptr);

// The run settings against the model's dimensions, before any weight is read: batch, frames,
// latent size a multiple of the patch, and, for chunk_frames > 0 (max_frames a multiple of it),
// the self-attention call of every chunk (tiling, sink and window; check_attention_params's
// rules, the message naming the chunk). chunk_frames = 0 checks the sizes only.
Status check_wan_run(const WanConfig& config, const WanRunConfig& run, int64_t chunk_frames);

// Spec 1.3.4: the head_dim / 2 RoPE pairs of a head are `frame` pairs on the frame axis, then
// `hw` pairs on the row axis and `hw` on the column axis; the angle of pair j of a token at
// (frame, row, col). Spec 1.3.2: the timestep sinusoid (cos half first), freq_dim floats.
struct WanRopePairs {
  int64_t frame, hw;
};
WanRopePairs wan_rope_pairs(int64_t head_dim);
double wan_rope_angle(int64_t head_dim, int64_t pair, int64_t frame, int64_t row, int64_t col);
void wan_time_sinusoid(double t, int64_t freq_dim, float* out);

// The checks every DiT implementation makes in init(): a valid config with patch_t == 1, every
// weight present with its size, batch and cache >= 1, a latent size divisible by the patch.
Status check_wan_model(const WanWeights& weights, const WanRunConfig& run);

// What the Self-Forcing loop needs of a DiT: one call on a chunk (spec 1.3). x is
// [batch, frames, in_dim, latent_h, latent_w] at timestep t (all frames), first frame
// start_frame; the call writes the chunk's K/V into the cache at its frames, attends the cache
// window and returns the flow prediction in flow (same layout). Host pointers, fp32. flow ==
// nullptr: only the cache is updated (the Self-Forcing refresh pass), and the work that feeds
// nothing but the output (the last layer after its K/V, the head) is skipped.
//
// A model that can also run the Self-Forcing sampler itself (runs_chunks() true) gets whole chunks
// through denoise_chunk(): from the noise xt [batch, frames, in_dim, h, w], the 4 denoising passes
// of self_forcing_steps() with x0 = xt - sigma v and xt = (1 - sigma') x0 + sigma' draw after each
// of the first three, then the refresh pass on x0 when `refresh`; writes x0, possibly before the
// refresh pass is done (the model's next call waits for it). draw(step, dst) fills dst (xt's size)
// with re-noising draw step = 1, 2, 3, called in that order, each before the model needs it. The
// GPU engine keeps the chunk on its device that way, with no copy or synchronization between
// passes; it asks for each draw while the pass before it runs, and hands x0 out while its refresh
// pass runs.
class WanModel {
 public:
  virtual ~WanModel() = default;
  virtual Status forward(const float* x, int64_t frames, int64_t start_frame, double t, float* flow) = 0;
  virtual bool runs_chunks() const { return false; }
  virtual Status denoise_chunk(const float* xt, const std::function<void(int step, float* dst)>& draw, int64_t frames,
                               int64_t start_frame, bool refresh, float* x0);
  virtual const WanRunConfig& run() const = 0;
  virtual const WanConfig& config() const = 0;
};

// The causal Wan DiT on the CPU in fp32 (a reference-quality path: plain loops, threads over
// rows). Holds the per-layer KV cache (post-RMSNorm, post-RoPE keys; values) and the
// cross-attention cache of the current text. The GPU version is WanDiTCuda (wan_cuda.h).
class WanDiT : public WanModel {
 public:
  Status init(const WanWeights& weights, const WanRunConfig& run);
  // Text features [batch, text_len, text_dim]: runs the text MLP and fills every layer's
  // cross-attention K/V (once per video).
  Status set_text(const float* context);
  Status forward(const float* x, int64_t frames, int64_t start_frame, double t, float* flow) override;
  // The full-sequence pass (training without a cache, spec 1.5): all `frames` at once, self-
  // attention block-causal by chunks of causal_chunk_frames (0: bidirectional); the cache is
  // neither read nor written. Chunk by chunk through the cache gives the same result.
  Status forward_full(const float* x, int64_t frames, double t, int64_t causal_chunk_frames, float* flow);
  const WanRunConfig& run() const override { return run_; }
  const WanConfig& config() const override { return w_->config; }

 private:
  Status pass(const float* x, int64_t frames, int64_t start_frame, double t, int64_t causal, float* flow);
  const WanWeights* w_ = nullptr;
  WanRunConfig run_;
  int64_t th_ = 0, tw_ = 0;                       // token grid of a frame
  std::vector<std::vector<float>> kc_, vc_;       // per layer [B, wan_cache_frames() * th * tw, H, hd]
  std::vector<std::vector<float>> xk_, xv_;       // per layer cross-attention [B, text_len, H, hd]
  bool text_ready_ = false;
};

// The Self-Forcing schedule (spec 2.2): t and sigma of the 4 denoising steps.
struct SelfForcingStep {
  double t, sigma;
};
std::vector<SelfForcingStep> self_forcing_steps();
// The sampler's arithmetic per element, in double with explicit fused multiply-adds so that every
// implementation (the host loop, the GPU engine's kernel) rounds the same way: x0 = xt - sigma v,
// and the re-noised xt = (1 - sigma') x0 + sigma' draw.
inline float sampler_x0(float xt, float v, double sigma) { return float(std::fma(-sigma, double(v), double(xt))); }
inline float sampler_renoise(float x0, float draw, double sigma_next) {
  return float(std::fma(sigma_next, double(draw), (1.0 - sigma_next) * double(x0)));
}

// The Self-Forcing loop (spec 2.3) over `frames` latent frames in chunks of `chunk` frames:
// per chunk, 4 denoising calls (x0 = xt - sigma v; re-noised to the next level with fresh
// Gaussian noise) and one refresh call at t = 0 on the clean chunk (skipped after the last chunk:
// its cache is never read). `noise` is the initial noise [batch, frames, in_dim, h, w];
// `renoise(chunk, step, dst, n)` fills the n values of the noise for step 1..3 of a chunk
// (layout [batch, chunk, in_dim, h, w]; in that order, from the caller's thread, also when the
// model runs whole chunks). `on_chunk(chunk, x0, seconds)` sees each finished chunk. Writes the
// clean latents [batch, frames, in_dim, h, w]. set_text() must have run; the flow must have the
// latents' shape (out_dim == in_dim).
struct SelfForcingCallbacks {
  std::function<void(int64_t chunk, int step, float* dst, size_t n)> renoise;
  std::function<void(int64_t chunk, const float* x0, double seconds)> on_chunk;
};
Status self_forcing_generate(WanModel& dit, const float* noise, int64_t frames, int64_t chunk,
                             const SelfForcingCallbacks& callbacks, float* latents);

}  // namespace monarchrt
