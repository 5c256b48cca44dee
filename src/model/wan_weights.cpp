// Wan DiT parameter list and strict weight loading (include/monarchrt/wan.h).
#include <algorithm>
#include <set>

#include "monarchrt/wan.h"

namespace monarchrt {

Status WanConfig::validate() const {
  const std::pair<const char*, int64_t> dims[] = {
      {"dim", dim},         {"num_heads", num_heads}, {"num_layers", num_layers}, {"ffn_dim", ffn_dim},
      {"freq_dim", freq_dim}, {"text_dim", text_dim}, {"text_len", text_len},     {"in_dim", in_dim},
      {"out_dim", out_dim}, {"patch_t", patch_t},     {"patch_h", patch_h},       {"patch_w", patch_w}};
  for (const auto& d : dims) {
    if (d.second <= 0 || d.second > (int64_t{1} << 20)) {
      return Status::invalid(std::string("config.") + d.first + " = " + std::to_string(d.second) +
                             " must be in [1, 2^20]");
    }
  }
  if (dim % num_heads != 0) {
    return Status::invalid("config.dim = " + std::to_string(dim) + " is not divisible by config.num_heads = " +
                           std::to_string(num_heads));
  }
  if (head_dim() % 2 != 0 || head_dim() < 12) {
    return Status::invalid("config: head dim " + std::to_string(head_dim()) +
                           " must be even and at least 12 (3D RoPE pairs)");
  }
  if (freq_dim % 2 != 0) return Status::invalid("config.freq_dim = " + std::to_string(freq_dim) + " must be even");
  if (!(eps > 0)) return Status::invalid("config.eps must be positive");
  return Status();
}

int64_t WanParameter::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<WanParameter> wan_parameters(const WanConfig& c) {
  const int64_t D = c.dim;
  std::vector<WanParameter> p = {
      {"patch_embedding.weight", {D, c.in_dim, c.patch_t, c.patch_h, c.patch_w}},
      {"patch_embedding.bias", {D}},
      {"text_embedding.0.weight", {D, c.text_dim}},
      {"text_embedding.0.bias", {D}},
      {"text_embedding.2.weight", {D, D}},
      {"text_embedding.2.bias", {D}},
      {"time_embedding.0.weight", {D, c.freq_dim}},
      {"time_embedding.0.bias", {D}},
      {"time_embedding.2.weight", {D, D}},
      {"time_embedding.2.bias", {D}},
      {"time_projection.1.weight", {6 * D, D}},
      {"time_projection.1.bias", {6 * D}},
  };
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string b = "blocks." + std::to_string(i) + ".";
    p.push_back({b + "modulation", {1, 6, D}});
    for (const char* attn : {"self_attn", "cross_attn"}) {
      for (const char* m : {"q", "k", "v", "o"}) {
        p.push_back({b + attn + "." + m + ".weight", {D, D}});
        p.push_back({b + attn + "." + m + ".bias", {D}});
      }
      p.push_back({b + attn + ".norm_q.weight", {D}});
      p.push_back({b + attn + ".norm_k.weight", {D}});
    }
    p.push_back({b + "norm3.weight", {D}});
    p.push_back({b + "norm3.bias", {D}});
    p.push_back({b + "ffn.0.weight", {c.ffn_dim, D}});
    p.push_back({b + "ffn.0.bias", {c.ffn_dim}});
    p.push_back({b + "ffn.2.weight", {D, c.ffn_dim}});
    p.push_back({b + "ffn.2.bias", {D}});
  }
  p.push_back({"head.modulation", {1, 2, D}});
  p.push_back({"head.head.weight", {c.out_dim * c.patch_t * c.patch_h * c.patch_w, D}});
  p.push_back({"head.head.bias", {c.out_dim * c.patch_t * c.patch_h * c.patch_w}});
  return p;
}

std::string wan_checkpoint_prefix(const Checkpoint& ck, bool ema) {
  if (ck.format() == Checkpoint::Format::kSafetensors) return "";
  return std::string(ema ? "generator_ema/" : "generator/") + "model.";
}

Status check_wan_checkpoint(const Checkpoint& ck, const WanConfig& config, const std::string& prefix) {
  MONARCHRT_RETURN_IF_ERROR(config.validate());
  const std::vector<WanParameter> want = wan_parameters(config);
  std::set<std::string> expected;
  std::vector<std::string> problems;
  for (const WanParameter& w : want) {
    expected.insert(prefix + w.name);
    const CheckpointTensor* t = ck.find(prefix + w.name);
    if (t == nullptr) {
      problems.push_back("tensor '" + prefix + w.name + "' is missing");
    } else if (t->shape != w.shape) {
      problems.push_back("tensor '" + prefix + w.name + "' has shape " + shape_string(t->shape) + ", the model needs " +
                         shape_string(w.shape));
    }
  }
  // Another dict of the file (e.g. generator when loading generator_ema) is not "under" prefix.
  const std::string scope = prefix.substr(0, prefix.find('/') == std::string::npos ? 0 : prefix.find('/') + 1);
  for (const CheckpointTensor& t : ck.tensors()) {
    if (t.name.compare(0, scope.size(), scope) != 0) continue;
    if (!expected.count(t.name)) problems.push_back("unexpected tensor '" + t.name + "' (not part of the Wan DiT)");
  }
  if (problems.empty()) return Status();
  std::string msg = ck.source_name() + ": " + problems[0];
  if (problems.size() > 1) msg += " (and " + std::to_string(problems.size() - 1) + " more problems)";
  if (ck.find(prefix + want[0].name) == nullptr && !prefix.empty()) {
    msg += "; expected the DiT under '" + prefix + "'";
  }
  return Status::invalid(msg);
}

Status load_wan_weights(const Checkpoint& ck, const WanConfig& config, const std::string& prefix, WanWeights* out) {
  MONARCHRT_RETURN_IF_ERROR(check_wan_checkpoint(ck, config, prefix));
  WanWeights w;
  w.config = config;
  for (const WanParameter& p : wan_parameters(config)) {
    MONARCHRT_RETURN_IF_ERROR(ck.read_f32(*ck.find(prefix + p.name), &w.tensors[p.name]));
  }
  *out = std::move(w);
  return Status();
}

}  // namespace monarchrt
