// The causal Wan DiT's configuration and its weights (../shared/docs/self-forcing-spec.md
// sections 1.1, 1.2, 6): the parameter list of a configuration (825 tensors, 1,418,996,800
// parameters for Wan2.1-T2V-1.3B) and a strict loader that checks a checkpoint against it: every
// expected name present with exactly its shape, a float dtype, and no other tensor under the
// prefix. Dimensions are a config so that tests can build tiny models.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "monarchrt/checkpoint.h"
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
