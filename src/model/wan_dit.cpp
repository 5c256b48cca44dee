// The causal Wan DiT on the CPU in fp32 (../shared/docs/self-forcing-spec.md section 1.3): patch
// embedding, time and text embeddings, modulation, qk RMSNorm, 3D RoPE with absolute frame
// positions, self-attention over the KV cache (dense or Monarch, through src/cpu), cross-attention
// over the cached text K/V, FFN, head and unpatchify. Plain loops with threads over rows: this is
// the path that tiny test models and the parity tests run, not a fast path.
#include <algorithm>
#include <cmath>

#include "../core/threads.h"
#include "monarchrt/attention.h"
#include "monarchrt/wan.h"
#include "monarchrt/workload.h"

namespace monarchrt {

namespace {

using Vec = std::vector<float>;

// out[n][m] = b[m] + sum_k in[n][k] * W[m][k]  (W row-major [M][K], a PyTorch Linear weight).
Vec linear(const Vec& in, int64_t N, int64_t K, const Vec& W, const Vec* b, int64_t M) {
  Vec out(size_t(N * M));
  parallel_for(N, [&](int64_t n) {
    const float* x = &in[size_t(n * K)];
    for (int64_t m = 0; m < M; ++m) {
      const float* w = &W[size_t(m * K)];
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += x[k] * w[k];
      out[size_t(n * M + m)] = acc + (b ? (*b)[size_t(m)] : 0.f);
    }
  });
  return out;
}

// LayerNorm over rows of D (statistics in double), optional affine weight / bias.
Vec layer_norm(const Vec& x, int64_t N, int64_t D, double eps, const Vec* w = nullptr, const Vec* b = nullptr) {
  Vec out(x.size());
  parallel_for(N, [&](int64_t n) {
    const float* r = &x[size_t(n * D)];
    double mean = 0, var = 0;
    for (int64_t d = 0; d < D; ++d) mean += r[d];
    mean /= double(D);
    for (int64_t d = 0; d < D; ++d) var += (r[d] - mean) * (r[d] - mean);
    const double inv = 1.0 / std::sqrt(var / double(D) + eps);
    for (int64_t d = 0; d < D; ++d) {
      float y = float((r[d] - mean) * inv);
      if (w) y = y * (*w)[size_t(d)] + (*b)[size_t(d)];
      out[size_t(n * D + d)] = y;
    }
  });
  return out;
}

void rms_norm(Vec& x, int64_t N, int64_t D, double eps, const Vec& gain) {
  parallel_for(N, [&](int64_t n) {
    float* r = &x[size_t(n * D)];
    double ss = 0;
    for (int64_t d = 0; d < D; ++d) ss += double(r[d]) * r[d];
    const float inv = float(1.0 / std::sqrt(ss / double(D) + eps));
    for (int64_t d = 0; d < D; ++d) r[d] = r[d] * inv * gain[size_t(d)];
  });
}

float silu(float x) { return x / (1.f + std::exp(-x)); }
float gelu_tanh(float x) {
  return 0.5f * x * (1.f + std::tanh(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// 3D RoPE on [N tokens][H heads][hd] in place (spec 1.3.4); token n is at frame f0 + n / (th tw).
void rope(Vec& x, int64_t B, int64_t S, int64_t H, int64_t hd, int64_t th, int64_t tw, int64_t f0) {
  const int64_t pairs = hd / 2;
  parallel_for(B * S, [&](int64_t bn) {
    const int64_t n = bn % S, f = f0 + n / (th * tw), r = (n % (th * tw)) / tw, c = n % tw;
    for (int64_t j = 0; j < pairs; ++j) {
      const double angle = wan_rope_angle(hd, j, f, r, c);
      const float cs = float(std::cos(angle)), sn = float(std::sin(angle));
      for (int64_t h = 0; h < H; ++h) {
        float* p = &x[size_t((bn * H + h) * hd + 2 * j)];
        const float x0 = p[0], x1 = p[1];
        p[0] = x0 * cs - x1 * sn;
        p[1] = x0 * sn + x1 * cs;
      }
    }
  });
}

// Dense attention of q [B, Sq, H, hd] over k, v [B, Sk, H, hd] (no mask), scale 1/sqrt(hd).
Vec cross_attention(const Vec& q, const Vec& k, const Vec& v, int64_t B, int64_t Sq, int64_t Sk, int64_t H,
                    int64_t hd) {
  Vec out(q.size());
  const float scale = float(1.0 / std::sqrt(double(hd)));
  parallel_for(B * Sq, [&](int64_t bn) {
    const int64_t b = bn / Sq;
    std::vector<float> z(static_cast<size_t>(Sk));
    for (int64_t h = 0; h < H; ++h) {
      const float* qr = &q[size_t((bn * H + h) * hd)];
      float mx = -INFINITY;
      for (int64_t s = 0; s < Sk; ++s) {
        const float* kr = &k[size_t(((b * Sk + s) * H + h) * hd)];
        float acc = 0.f;
        for (int64_t d = 0; d < hd; ++d) acc += qr[d] * kr[d];
        z[size_t(s)] = acc * scale;
        mx = std::max(mx, z[size_t(s)]);
      }
      double sum = 0;
      for (float& e : z) sum += (e = std::exp(e - mx));
      float* o = &out[size_t((bn * H + h) * hd)];
      for (int64_t d = 0; d < hd; ++d) o[d] = 0.f;
      for (int64_t s = 0; s < Sk; ++s) {
        const float p = float(z[size_t(s)] / sum);
        const float* vr = &v[size_t(((b * Sk + s) * H + h) * hd)];
        for (int64_t d = 0; d < hd; ++d) o[d] += p * vr[d];
      }
    }
  });
  return out;
}

}  // namespace

WanRopePairs wan_rope_pairs(int64_t head_dim) {
  const int64_t c_hw = 2 * (head_dim / 6);
  return {(head_dim - 2 * c_hw) / 2, c_hw / 2};
}

double wan_rope_angle(int64_t head_dim, int64_t pair, int64_t frame, int64_t row, int64_t col) {
  const WanRopePairs p = wan_rope_pairs(head_dim);
  if (pair < p.frame) return double(frame) * std::pow(10000.0, -double(pair) / double(p.frame));
  pair -= p.frame;
  const int64_t pos = pair < p.hw ? row : col;
  return double(pos) * std::pow(10000.0, -double(pair % p.hw) / double(p.hw));
}

void wan_time_sinusoid(double t, int64_t freq_dim, float* out) {
  const int64_t half = freq_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const double a = t * std::pow(10000.0, -double(i) / double(half));
    out[i] = float(std::cos(a));
    out[half + i] = float(std::sin(a));
  }
}

std::vector<SelfForcingStep> self_forcing_steps() {
  std::vector<SelfForcingStep> steps;
  for (int idx : {0, 250, 500, 750}) {
    const float raw = float(1.0 - idx / 1000.0);
    const float sigma = float(5.0 * raw / (1.0 + 4.0 * raw));
    steps.push_back({double(float(1000.0f * sigma)), double(sigma)});
  }
  return steps;
}

Status wan_config_from_checkpoint(const Checkpoint& ck, const std::string& prefix, int64_t num_heads, WanConfig* out) {
  auto shape = [&](const std::string& name, size_t rank, std::vector<int64_t>* s) -> Status {
    const CheckpointTensor* t = ck.find(prefix + name);
    if (!t) return Status::invalid(ck.source_name() + ": tensor '" + prefix + name + "' is missing");
    if (t->shape.size() != rank) return Status::invalid(ck.source_name() + ": tensor '" + prefix + name + "' has the wrong rank");
    *s = t->shape;
    return Status();
  };
  WanConfig c;
  std::vector<int64_t> s;
  MONARCHRT_RETURN_IF_ERROR(shape("patch_embedding.weight", 5, &s));
  c.dim = s[0];
  c.in_dim = s[1];
  c.patch_t = s[2];
  c.patch_h = s[3];
  c.patch_w = s[4];
  MONARCHRT_RETURN_IF_ERROR(shape("text_embedding.0.weight", 2, &s));
  c.text_dim = s[1];
  MONARCHRT_RETURN_IF_ERROR(shape("time_embedding.0.weight", 2, &s));
  c.freq_dim = s[1];
  MONARCHRT_RETURN_IF_ERROR(shape("blocks.0.ffn.0.weight", 2, &s));
  c.ffn_dim = s[0];
  MONARCHRT_RETURN_IF_ERROR(shape("head.head.weight", 2, &s));
  c.out_dim = s[0] / (c.patch_t * c.patch_h * c.patch_w);
  c.num_layers = 0;
  while (ck.find(prefix + "blocks." + std::to_string(c.num_layers) + ".modulation")) ++c.num_layers;
  c.num_heads = num_heads;
  MONARCHRT_RETURN_IF_ERROR(c.validate());
  *out = c;
  return Status();
}

WanWeights wan_random_weights(const WanConfig& c, uint64_t seed) {
  Rng rng(seed);
  WanWeights w;
  w.config = c;
  for (const WanParameter& p : wan_parameters(c)) {
    Vec v(size_t(p.numel()));
    const std::string& n = p.name;
    const bool gain = n.find("norm") != std::string::npos && n.find(".weight") != std::string::npos;
    const double fan_in = p.shape.size() >= 2 ? double(p.numel() / p.shape[0]) : 1.0;
    for (float& x : v) {
      if (gain) x = float(1.0 + 0.1 * rng.normal());
      else if (n.find("modulation") != std::string::npos) x = float(0.1 * rng.normal());
      else if (p.shape.size() >= 2) x = float(rng.normal() / std::sqrt(fan_in));
      else x = float(0.02 * rng.normal());
    }
    w.tensors[n] = std::move(v);
  }
  return w;
}

Status check_wan_model(const WanWeights& weights, const WanRunConfig& run) {
  const WanConfig& c = weights.config;
  MONARCHRT_RETURN_IF_ERROR(c.validate());
  if (c.patch_t != 1) return Status::unsupported("config.patch_t = " + std::to_string(c.patch_t) + ": the causal model needs 1");
  for (const WanParameter& p : wan_parameters(c)) {
    auto it = weights.tensors.find(p.name);
    if (it == weights.tensors.end() || int64_t(it->second.size()) != p.numel()) {
      return Status::invalid("weights: tensor '" + p.name + "' is missing or has the wrong size");
    }
  }
  return check_wan_run(c, run, 0);
}

int64_t wan_cache_frames(const WanRunConfig& run) {
  const bool window = run.window_frames > 0 && run.sink_frames + run.window_frames < run.max_frames;
  return window ? run.sink_frames + run.window_frames : run.max_frames;
}

AttentionParams wan_attention_params(const WanConfig& c, const WanRunConfig& run, int64_t frames, int64_t start_frame,
                                     int64_t* kv_tokens) {
  const int64_t tpf = (run.latent_h / c.patch_h) * (run.latent_w / c.patch_w), cache_frames = wan_cache_frames(run);
  const bool ring = cache_frames < run.max_frames;
  AttentionParams ap;
  ap.grid = VideoGrid{frames, run.latent_h / c.patch_h, run.latent_w / c.patch_w};
  ap.layout = run.layout;
  ap.num_iters = run.num_iters;
  ap.scale = 1.0 / std::sqrt(double(c.head_dim()));
  ap.kv_cache = true;
  ap.sink_frames = run.sink_frames;
  ap.window_frames = run.window_frames;
  if (ring) {
    ap.cache_capacity_frames = cache_frames;
    ap.cache_frames = start_frame + frames;
  }
  if (kv_tokens) *kv_tokens = (ring ? cache_frames : start_frame + frames) * tpf;
  return ap;
}

Status check_wan_run(const WanConfig& c, const WanRunConfig& run, int64_t chunk_frames) {
  MONARCHRT_RETURN_IF_ERROR(c.validate());
  if (run.batch < 1 || run.max_frames < 1) return Status::invalid("run: batch and max_frames must be >= 1");
  if (run.latent_h <= 0 || run.latent_w <= 0 || run.latent_h % c.patch_h || run.latent_w % c.patch_w) {
    return Status::invalid("run: latent size " + std::to_string(run.latent_h) + "x" + std::to_string(run.latent_w) +
                           " must be positive multiples of the patch (" + std::to_string(c.patch_h) + "x" +
                           std::to_string(c.patch_w) + ")");
  }
  if (run.sink_frames < 0 || run.window_frames < 0) {  // the cache's size and ring slots rely on them
    return Status::invalid("run: sink_frames = " + std::to_string(run.sink_frames) + " and window_frames = " +
                           std::to_string(run.window_frames) + " must be >= 0");
  }
  if (chunk_frames == 0) return Status();
  if (chunk_frames < 0 || run.max_frames % chunk_frames != 0) {
    return Status::invalid("run: max_frames = " + std::to_string(run.max_frames) +
                           " must be a positive multiple of the chunk's " + std::to_string(chunk_frames) + " frames");
  }
  const int64_t tpf = (run.latent_h / c.patch_h) * (run.latent_w / c.patch_w);
  for (int64_t start = 0; start < run.max_frames; start += chunk_frames) {
    int64_t kv_tokens = 0;
    const AttentionParams ap = wan_attention_params(c, run, chunk_frames, start, &kv_tokens);
    const Status s = check_attention_params(ap, chunk_frames * tpf, kv_tokens, run.monarch);
    if (!s.ok()) {
      return Status(s.code(), "self-attention of the chunk of frames [" + std::to_string(start) + ", " +
                                  std::to_string(start + chunk_frames) + "): " + s.message());
    }
  }
  return Status();
}

Status WanDiT::init(const WanWeights& weights, const WanRunConfig& run) {
  MONARCHRT_RETURN_IF_ERROR(check_wan_model(weights, run));
  const WanConfig& c = weights.config;
  w_ = &weights;
  run_ = run;
  th_ = run.latent_h / c.patch_h;
  tw_ = run.latent_w / c.patch_w;
  const size_t cache = size_t(run.batch * wan_cache_frames(run) * th_ * tw_ * c.dim);
  kc_.assign(size_t(c.num_layers), Vec(cache, 0.f));
  vc_.assign(size_t(c.num_layers), Vec(cache, 0.f));
  xk_.assign(size_t(c.num_layers), Vec());
  xv_.assign(size_t(c.num_layers), Vec());
  text_ready_ = false;
  return Status();
}

Status WanDiT::set_text(const float* context) {
  if (!w_) return Status::invalid("WanDiT: init() first");
  const WanConfig& c = w_->config;
  const int64_t N = run_.batch * c.text_len, D = c.dim;
  Vec ctx(context, context + N * c.text_dim);
  Vec h = linear(ctx, N, c.text_dim, w_->at("text_embedding.0.weight"), &w_->at("text_embedding.0.bias"), D);
  for (float& x : h) x = gelu_tanh(x);
  const Vec e = linear(h, N, D, w_->at("text_embedding.2.weight"), &w_->at("text_embedding.2.bias"), D);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string b = "blocks." + std::to_string(i) + ".cross_attn.";
    xk_[size_t(i)] = linear(e, N, D, w_->at(b + "k.weight"), &w_->at(b + "k.bias"), D);
    rms_norm(xk_[size_t(i)], N, D, c.eps, w_->at(b + "norm_k.weight"));
    xv_[size_t(i)] = linear(e, N, D, w_->at(b + "v.weight"), &w_->at(b + "v.bias"), D);
  }
  text_ready_ = true;
  return Status();
}

Status WanDiT::forward(const float* x, int64_t frames, int64_t start_frame, double t, float* flow) {
  return pass(x, frames, start_frame, t, -1, flow);
}

Status WanDiT::forward_full(const float* x, int64_t frames, double t, int64_t causal_chunk_frames, float* flow) {
  if (causal_chunk_frames < 0) return Status::invalid("causal_chunk_frames must be >= 0");
  if (flow == nullptr) return Status::invalid("forward_full: flow must not be null");
  return pass(x, frames, 0, t, causal_chunk_frames, flow);
}

Status WanDiT::pass(const float* x_in, int64_t F, int64_t start_frame, double t, int64_t causal, float* flow) {
  if (!w_ || !text_ready_) return Status::invalid("WanDiT: init() and set_text() first");
  if (F < 1) return Status::invalid("frames = " + std::to_string(F) + " must be >= 1");
  if (causal < 0 && (start_frame < 0 || start_frame + F > run_.max_frames)) {
    return Status::invalid("frames [" + std::to_string(start_frame) + ", " + std::to_string(start_frame + F) +
                           ") do not fit the cache of " + std::to_string(run_.max_frames) + " frames");
  }
  const WanConfig& c = w_->config;
  const int64_t B = run_.batch, D = c.dim, H = c.num_heads, hd = c.head_dim();
  const int64_t tpf = th_ * tw_, S = F * tpf, N = B * S, Hl = run_.latent_h, Wl = run_.latent_w;
  const int64_t ph = c.patch_h, pw = c.patch_w, P = c.in_dim * ph * pw;
  // 1. patch embedding: token vector index c * ph * pw + dy * pw + dx.
  Vec tok(size_t(N * P));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t f = 0; f < F; ++f)
      for (int64_t n = 0; n < tpf; ++n)
        for (int64_t ch = 0; ch < c.in_dim; ++ch)
          for (int64_t dy = 0; dy < ph; ++dy)
            for (int64_t dx = 0; dx < pw; ++dx) {
              const int64_t y = (n / tw_) * ph + dy, xx = (n % tw_) * pw + dx;
              tok[size_t(((b * S + f * tpf + n) * P) + (ch * ph + dy) * pw + dx)] =
                  x_in[((b * F + f) * c.in_dim + ch) * Hl * Wl + y * Wl + xx];
            }
  Vec x = linear(tok, N, P, w_->at("patch_embedding.weight"), &w_->at("patch_embedding.bias"), D);
  // 2. time embedding (sinusoid in float64, cos half first), e and e0 = 6 modulation rows.
  Vec sinus(size_t(c.freq_dim));
  wan_time_sinusoid(t, c.freq_dim, sinus.data());
  Vec e = linear(sinus, 1, c.freq_dim, w_->at("time_embedding.0.weight"), &w_->at("time_embedding.0.bias"), D);
  for (float& v : e) v = silu(v);
  e = linear(e, 1, D, w_->at("time_embedding.2.weight"), &w_->at("time_embedding.2.bias"), D);
  Vec se = e;
  for (float& v : se) v = silu(v);
  const Vec e0 = linear(se, 1, D, w_->at("time_projection.1.weight"), &w_->at("time_projection.1.bias"), 6 * D);

  const int64_t cache_rows = wan_cache_frames(run_) * tpf;
  int64_t used = 0;  // k / v rows the attention sees
  AttentionParams ap = wan_attention_params(c, run_, F, start_frame, &used);
  if (causal >= 0) {  // forward_full: the F frames block-causal, no cache
    AttentionParams full;
    full.grid = ap.grid;
    full.layout = ap.layout;
    full.num_iters = ap.num_iters;
    full.scale = ap.scale;
    full.causal_chunk_frames = causal;
    ap = full;
  }
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string bl = "blocks." + std::to_string(i) + ".";
    const Vec& mod = w_->at(bl + "modulation");
    Vec m(size_t(6 * D));
    for (int64_t j = 0; j < 6 * D; ++j) m[size_t(j)] = mod[size_t(j)] + e0[size_t(j)];
    auto modulate = [&](const Vec& normed, int shift, int scale) {
      Vec h = normed;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t d = 0; d < D; ++d)
          h[size_t(n * D + d)] = normed[size_t(n * D + d)] * (1.f + m[size_t(scale * D + d)]) + m[size_t(shift * D + d)];
      return h;
    };
    // 3. self-attention
    Vec h = modulate(layer_norm(x, N, D, c.eps), 0, 1);
    const std::string sa = bl + "self_attn.";
    Vec q = linear(h, N, D, w_->at(sa + "q.weight"), &w_->at(sa + "q.bias"), D);
    Vec k = linear(h, N, D, w_->at(sa + "k.weight"), &w_->at(sa + "k.bias"), D);
    Vec v = linear(h, N, D, w_->at(sa + "v.weight"), &w_->at(sa + "v.bias"), D);
    rms_norm(q, N, D, c.eps, w_->at(sa + "norm_q.weight"));
    rms_norm(k, N, D, c.eps, w_->at(sa + "norm_k.weight"));
    rope(q, B, S, H, hd, th_, tw_, start_frame);
    rope(k, B, S, H, hd, th_, tw_, start_frame);
    Vec attn(size_t(N * D));
    TensorView qv = TensorView::contiguous(q.data(), DType::kF32, B, S, H, hd);
    TensorView ov = TensorView::contiguous(attn.data(), DType::kF32, B, S, H, hd);
    TensorView kv = TensorView::contiguous(k.data(), DType::kF32, B, S, H, hd);
    TensorView vv = TensorView::contiguous(v.data(), DType::kF32, B, S, H, hd);
    if (causal < 0) {  // write the chunk into the cache, attend the cache
      Vec& kc = kc_[size_t(i)];
      Vec& vc = vc_[size_t(i)];
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t f = 0; f < F; ++f) {  // frame by frame: with a ring they may wrap
          const int64_t src = (b * S + f * tpf) * D, dst = (b * cache_rows + cache_slot(ap, start_frame + f) * tpf) * D;
          std::copy(k.begin() + src, k.begin() + src + tpf * D, kc.begin() + dst);
          std::copy(v.begin() + src, v.begin() + src + tpf * D, vc.begin() + dst);
        }
      }
      kv = TensorView::contiguous(kc.data(), DType::kF32, B, used, H, hd);
      vv = TensorView::contiguous(vc.data(), DType::kF32, B, used, H, hd);
      kv.stride[0] = vv.stride[0] = cache_rows * D;  // the cache holds cache_frames frames per batch
    }
    if (flow == nullptr && i + 1 == c.num_layers) return Status();  // cache only (wan.h)
    MONARCHRT_RETURN_IF_ERROR(run_.monarch ? cpu::monarch_attention(qv, kv, vv, ov, ap)
                                           : cpu::dense_attention(qv, kv, vv, ov, ap));
    Vec y = linear(attn, N, D, w_->at(sa + "o.weight"), &w_->at(sa + "o.bias"), D);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t d = 0; d < D; ++d) x[size_t(n * D + d)] += y[size_t(n * D + d)] * m[size_t(2 * D + d)];
    // 5. cross-attention (no modulation, no gate)
    const std::string ca = bl + "cross_attn.";
    h = layer_norm(x, N, D, c.eps, &w_->at(bl + "norm3.weight"), &w_->at(bl + "norm3.bias"));
    Vec cq = linear(h, N, D, w_->at(ca + "q.weight"), &w_->at(ca + "q.bias"), D);
    rms_norm(cq, N, D, c.eps, w_->at(ca + "norm_q.weight"));
    const Vec cat = cross_attention(cq, xk_[size_t(i)], xv_[size_t(i)], B, S, c.text_len, H, hd);
    y = linear(cat, N, D, w_->at(ca + "o.weight"), &w_->at(ca + "o.bias"), D);
    for (size_t j = 0; j < x.size(); ++j) x[j] += y[j];
    // 6. FFN
    h = modulate(layer_norm(x, N, D, c.eps), 3, 4);
    Vec f1 = linear(h, N, D, w_->at(bl + "ffn.0.weight"), &w_->at(bl + "ffn.0.bias"), c.ffn_dim);
    for (float& a : f1) a = gelu_tanh(a);
    y = linear(f1, N, c.ffn_dim, w_->at(bl + "ffn.2.weight"), &w_->at(bl + "ffn.2.bias"), D);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t d = 0; d < D; ++d) x[size_t(n * D + d)] += y[size_t(n * D + d)] * m[size_t(5 * D + d)];
  }
  // 7. head: shift = modulation[0] + e, scale = modulation[1] + e.
  const Vec& hm = w_->at("head.modulation");
  Vec h = layer_norm(x, N, D, c.eps);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < D; ++d)
      h[size_t(n * D + d)] = h[size_t(n * D + d)] * (1.f + hm[size_t(D + d)] + e[size_t(d)]) + hm[size_t(d)] + e[size_t(d)];
  const int64_t O = c.out_dim * ph * pw;
  const Vec out = linear(h, N, D, w_->at("head.head.weight"), &w_->at("head.head.bias"), O);
  // 8. unpatchify: output index (dy * pw + dx) * out_dim + channel.
  for (int64_t b = 0; b < B; ++b)
    for (int64_t f = 0; f < F; ++f)
      for (int64_t n = 0; n < tpf; ++n)
        for (int64_t dy = 0; dy < ph; ++dy)
          for (int64_t dx = 0; dx < pw; ++dx)
            for (int64_t ch = 0; ch < c.out_dim; ++ch) {
              const int64_t y = (n / tw_) * ph + dy, xx = (n % tw_) * pw + dx;
              flow[((b * F + f) * c.out_dim + ch) * Hl * Wl + y * Wl + xx] =
                  out[size_t((b * S + f * tpf + n) * O + (dy * pw + dx) * c.out_dim + ch)];
            }
  return Status();
}

}  // namespace monarchrt
