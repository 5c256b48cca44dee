// The causal Wan DiT on one GPU (include/monarchrt/wan_cuda.h, design in docs/engine.md).
// Per layer: LN + modulation (fused with the previous gated residual) -> one q|k|v GEMM ->
// q/k RMSNorm + RoPE + KV-cache write -> self-attention over the cache (Monarch or dense) -> o
// GEMM -> residual + norm3 -> cross q GEMM -> RMSNorm -> dense attention over the text K/V -> o
// GEMM -> residual + LN + modulation -> FFN GEMMs (GELU in the epilogue) -> gated residual,
// fused with the next layer's norm. The residual stream x is fp32; everything else bf16.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../core/threads.h"
#include "../cuda/attention/flash.h"
#include "../cuda/common/host.h"
#include "../cuda/common/linear.h"
#include "monarchrt/cuda.h"
#include "monarchrt/wan_cuda.h"

namespace monarchrt {

namespace {

using bf16 = __nv_bfloat16;
using cuda_detail::LinearEpilogue;
using cuda_detail::LinearPlan;

// Row kernels: one CTA per token, a thread owns 8 consecutive channels (16-byte loads of bf16,
// two float4 of fp32) and keeps them in registers; dim is a multiple of 8 (checked in init).
constexpr int kVec = 8;

int row_threads(int64_t D) { return int((D / kVec + 31) / 32 * 32); }

// Sum over the block (blockDim.x a multiple of 32); `red` holds 32 floats.
__device__ float block_sum(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // red may still be read from a previous call
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float s = 0.f;
  for (int i = 0; i < int(blockDim.x) / 32; ++i) s += red[i];
  return s;
}

// Two sums over the block at once; `red` holds 64 floats.
__device__ float2 block_sum2(float a, float b, float* red) {
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  __syncthreads();  // red may still be read from a previous call
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = a, red[32 + threadIdx.x / 32] = b;
  __syncthreads();
  float2 s = make_float2(0.f, 0.f);
  for (int i = 0; i < int(blockDim.x) / 32; ++i) s.x += red[i], s.y += red[32 + i];
  return s;
}

__device__ void load8(const float* p, float (&v)[kVec]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ void store8(float* p, const float (&v)[kVec]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ void load8(const bf16* p, float (&v)[kVec]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
  for (int i = 0; i < kVec / 2; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}
__device__ void store8(bf16* p, const float (&v)[kVec]) {
  uint4 raw;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
  for (int i = 0; i < kVec / 2; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = raw;
}

__device__ float silu_f(float x) { return x / (1.f + __expf(-x)); }

// tok[n][(c ph + dy) pw + dx] = x[b][f][c][y][x] (spec 1.3.1: the conv3d patch as a GEMM row).
__global__ void patchify_kernel(const float* x, bf16* tok, int F, int C, int Hl, int Wl, int ph, int pw, int tw,
                                int64_t total) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int P = C * ph * pw, tpf = (Hl / ph) * tw;
  const int p = int(i % P);
  const int64_t n = i / P;  // global token: (b F + f) tpf + t
  const int t = int(n % tpf);
  const int64_t bf = n / tpf;
  const int ch = p / (ph * pw), dy = (p / pw) % ph, dx = p % pw;
  const int y = (t / tw) * ph + dy, xx = (t % tw) * pw + dx;
  tok[i] = __float2bfloat16_rn(x[(bf * C + ch) * Hl * Wl + int64_t(y) * Wl + xx]);
}

// flow[b][f][c][y][x] = out[n][(dy pw + dx) C + c] (spec 1.3.8).
__global__ void unpatchify_kernel(const float* out, float* flow, int C, int Hl, int Wl, int ph, int pw, int tw,
                                  int64_t total) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int xx = int(i % Wl), y = int((i / Wl) % Hl), ch = int((i / (int64_t(Wl) * Hl)) % C);
  const int64_t bf = i / (int64_t(Wl) * Hl * C);
  const int tpf = (Hl / ph) * tw;
  const int64_t n = bf * tpf + (y / ph) * tw + xx / pw;
  flow[i] = out[n * (C * ph * pw) + ((y % ph) * pw + xx % pw) * C + ch];
}

// y[m] = b[m] + sum_k W[m][k] f(x[k]), f = SiLU or identity; one warp per output.
__global__ void matvec_kernel(const bf16* W, const float* x, const float* b, float* y, int M, int K, bool silu_in) {
  const int m = int(blockIdx.x) * (blockDim.x / 32) + int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  if (m >= M) return;
  float acc = 0.f;
  for (int k = lane; k < K; k += 32) {
    const float xv = silu_in ? silu_f(x[k]) : x[k];
    acc += __bfloat162float(W[int64_t(m) * K + k]) * xv;
  }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) y[m] = acc + b[m];
}

__global__ void to_bf16_kernel(const float* in, bf16* out, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = __float2bfloat16_rn(in[i]);
}

// One step of the Self-Forcing sampler on the device (WanModel::denoise_chunk), rounded as the
// host loop rounds (sampler_x0 / sampler_renoise, wan.h): x0 = xt - sigma v; then xt = (1 -
// sigma_next) x0 + sigma_next draw in place (the next pass's input), or, without a draw (the last
// step), xt = x0 (the refresh pass's input).
__global__ void sampler_kernel(float* xt, const float* v, const float* draw, float* x0, double sigma,
                               double sigma_next, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float clean = float(fma(-sigma, double(v[i]), double(xt[i])));
  x0[i] = clean;
  xt[i] = draw ? float(fma(sigma_next, double(draw[i]), __dmul_rn(1.0 - sigma_next, double(clean)))) : clean;
}

// One token per block: optional residual x += y * gate (gate null: the plain residual), then
// LayerNorm (no affine) and h = n * mul + add, with mul / add the modulation rows of the pass
// (mod_kernel: 1 + scale, shift) or norm3's weight and bias. Every vector is one load per thread:
// the kernel runs at the rate of a copy of its bytes (docs/perf.md, eighteenth session).
struct AddNormArgs {
  float* x;
  const bf16* y;
  const float *gate, *mul, *add;
  bf16* h;
  int D;
  float eps;
};

__global__ void add_norm_kernel(const AddNormArgs a) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const int d0 = int(threadIdx.x) * kVec;
  const bool mine = d0 < a.D;
  float v[kVec] = {}, sum = 0.f;
  if (mine) {
    float* x = a.x + row * a.D + d0;
    load8(x, v);
    if (a.y) {
      float y[kVec], g[kVec];
      load8(a.y + row * a.D + d0, y);
      if (a.gate) {
        load8(a.gate + d0, g);
        for (int i = 0; i < kVec; ++i) y[i] *= g[i];
      }
      for (int i = 0; i < kVec; ++i) v[i] += y[i];
      store8(x, v);
    }
    for (int i = 0; i < kVec; ++i) sum += v[i];
  }
  const float mean = block_sum(sum, red) / float(a.D);
  float var = 0.f;
  if (mine)
    for (int i = 0; i < kVec; ++i) var += (v[i] - mean) * (v[i] - mean);
  const float inv = rsqrtf(block_sum(var, red) / float(a.D) + a.eps);
  if (mine) {
    float mul[kVec], add[kVec];
    load8(a.mul + d0, mul);
    load8(a.add + d0, add);
    for (int i = 0; i < kVec; ++i) v[i] = (v[i] - mean) * inv * mul[i] + add[i];
    store8(a.h + row * a.D + d0, v);
  }
}

// The modulation rows of one pass, for every layer and the head (spec 1.3.5 and 1.3.7), so that
// the row kernels read one vector per operand: layer l's row r is mod[l][r] + e0[r], plus 1 on the
// scale rows (r = 1, 4); the head's rows are head_mod[r] + e, plus 1 on its scale row (r = 1).
__global__ void mod_kernel(const float* const* layer_mod, const float* e0, const float* head_mod, const float* e,
                           float* out, int layers, int D) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t layer_rows = int64_t(layers) * 6 * D;
  if (i < layer_rows) {
    const int l = int(i / (6 * D)), r = int(i / D % 6), d = int(i % D);
    const float v = layer_mod[l][r * D + d] + e0[r * D + d];
    out[i] = r == 1 || r == 4 ? 1.f + v : v;
  } else if (i < layer_rows + 2 * D) {
    const int r = int((i - layer_rows) / D), d = int((i - layer_rows) % D);
    out[i] = r == 1 ? (1.f + head_mod[D + d]) + e[d] : head_mod[d] + e[d];  // as the CPU path rounds
  }
}

// In place RMSNorm over the D channels of rows with pitch ld (cross-attention q, text k).
__global__ void rms_rows_kernel(bf16* x, int64_t ld, const float* gain, int D, float eps) {
  __shared__ float red[32];
  bf16* r = x + int64_t(blockIdx.x) * ld;
  const int d0 = int(threadIdx.x) * kVec;
  const bool mine = d0 < D;
  float v[kVec] = {}, g[kVec], ss = 0.f;
  if (mine) {
    load8(r + d0, v);
    load8(gain + d0, g);
    for (int i = 0; i < kVec; ++i) ss += v[i] * v[i];
  }
  const float inv = rsqrtf(block_sum(ss, red) / float(D) + eps);
  if (mine) {
    for (int i = 0; i < kVec; ++i) v[i] *= inv * g[i];
    store8(r + d0, v);
  }
}

// Self-attention q/k: RMSNorm over all D channels (gains gq, gk), 3D RoPE at the token's
// absolute (frame, row, column) from cos/sin tables, q written back in place into the q|k|v row,
// k and v written into the layer's cache at the token's frame slot (frame f in slot f, or with a
// ring of `ring` frames after `sink` fixed ones, slot sink + (f - sink) % ring for f >= sink). One
// token per block; a thread owns 8 channels (4 RoPE pairs of one head: head dims are multiples of 8).
struct QkRopeArgs {
  bf16* qkv;  // [B * S, 3 D]
  const float *gq, *gk;
  bf16 *cache_k, *cache_v;  // [B][cache_rows][D]
  int64_t cache_rows;
  int sink, ring;  // ring = 0: no ring buffer
  const float2 *rope_f, *rope_r, *rope_c;  // [frame][frame pairs], [row][hw pairs], [col][hw pairs]
  int S, D, hd, th, tw, f0, pf, phw;
  float eps;
};

__global__ void qk_rope_kernel(const QkRopeArgs a) {
  __shared__ float red[64];
  const int tok = int(blockIdx.x);  // 32-bit index arithmetic: 64-bit divisions cost 6% of the kernel
  const int b = tok / a.S, n = tok - b * a.S;
  const int d0 = int(threadIdx.x) * kVec;
  const bool mine = d0 < a.D;
  bf16* q = a.qkv + int64_t(tok) * 3 * a.D;
  const int tpf = a.th * a.tw, fi = n / tpf, in_frame = n - fi * tpf, frame = a.f0 + fi;
  const int row = in_frame / a.tw, col = in_frame - row * a.tw;
  const int slot = a.ring > 0 && frame >= a.sink ? a.sink + (frame - a.sink) % a.ring : frame;
  const int64_t crow = int64_t(b) * a.cache_rows + int64_t(slot) * tpf + in_frame;
  // The sums from q and k as loaded; v goes to the cache before the reduction. After it q and k
  // are read again (L1): 5% faster than keeping them in registers across the barrier.
  float sq = 0.f, sk = 0.f;
  if (mine) {
    const uint4 qraw = *reinterpret_cast<const uint4*>(q + d0), kraw = *reinterpret_cast<const uint4*>(q + a.D + d0);
    *reinterpret_cast<uint4*>(a.cache_v + crow * a.D + d0) = *reinterpret_cast<const uint4*>(q + 2 * a.D + d0);
    const __nv_bfloat162* hq = reinterpret_cast<const __nv_bfloat162*>(&qraw);
    const __nv_bfloat162* hk = reinterpret_cast<const __nv_bfloat162*>(&kraw);
    for (int i = 0; i < kVec / 2; ++i) {
      const float2 fq = __bfloat1622float2(hq[i]), fk = __bfloat1622float2(hk[i]);
      sq += fq.x * fq.x + fq.y * fq.y;
      sk += fk.x * fk.x + fk.y * fk.y;
    }
  }
  const float2 ss = block_sum2(sq, sk, red);
  if (!mine) return;
  const float iq = rsqrtf(ss.x / float(a.D) + a.eps), ik = rsqrtf(ss.y / float(a.D) + a.eps);
  float qv[kVec], kv[kVec], gq[kVec], gk[kVec];
  load8(q + d0, qv);
  load8(q + a.D + d0, kv);
  load8(a.gq + d0, gq);
  load8(a.gk + d0, gk);
  const int j0 = (d0 / 2) % (a.hd / 2);  // the thread's first pair in its head (hd % 8 == 0: no wrap)
  for (int i = 0; i < kVec / 2; ++i) {
    const int j = j0 + i;
    const float2 cs = j < a.pf            ? a.rope_f[frame * a.pf + j]
                      : j < a.pf + a.phw ? a.rope_r[row * a.phw + (j - a.pf)]
                                         : a.rope_c[col * a.phw + (j - a.pf - a.phw)];
    const float q0 = qv[2 * i] * iq * gq[2 * i], q1 = qv[2 * i + 1] * iq * gq[2 * i + 1];
    const float k0 = kv[2 * i] * ik * gk[2 * i], k1 = kv[2 * i + 1] * ik * gk[2 * i + 1];
    qv[2 * i] = q0 * cs.x - q1 * cs.y;
    qv[2 * i + 1] = q0 * cs.y + q1 * cs.x;
    kv[2 * i] = k0 * cs.x - k1 * cs.y;
    kv[2 * i + 1] = k0 * cs.y + k1 * cs.x;
  }
  store8(q + d0, qv);
  store8(a.cache_k + crow * a.D + d0, kv);
}

unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

// Kinds of steps for the profile (options.profile).
enum Step { kEmbed, kNorm, kQkvGemm, kQkRope, kSelfAttention, kProjGemm, kCrossAttention, kFfnGemm, kHead, kSteps };
const char* const kStepNames[kSteps] = {"patch + time embedding",          "LayerNorm / RMSNorm / modulation",
                                        "q|k|v GEMM",                      "q/k RMSNorm + RoPE + cache write",
                                        "self-attention",                  "o / cross-q / cross-o GEMMs",
                                        "cross-attention (512 text keys)", "FFN GEMMs (GELU fused)",
                                        "head + unpatchify"};

}  // namespace

// ---------------------------------------------------------------------------------------------

struct WanDiTCuda::Impl {
  struct Layer {
    bf16 *qkv_w, *qkv_b, *so_w, *so_b, *cq_w, *cq_b, *ck_w, *ck_b, *cv_w, *cv_b, *co_w, *co_b;
    bf16 *f0_w, *f0_b, *f2_w, *f2_b;
    float *nq, *nk, *cnq, *cnk, *n3w, *n3b, *mod;
    bf16 *kc, *vc, *xk, *xv;  // self-attention cache, cross-attention K/V
  };
  // GEMM plans of one token count M.
  struct Plans {
    LinearPlan qkv, dd, ffn0, ffn2, patch, head;
  };

  WanConfig c;
  WanRunConfig run;
  WanCudaOptions opt;
  int64_t th = 0, tw = 0, tpf = 0, P = 0, O = 0, max_tokens = 0;
  // Frames the KV cache holds: every frame of the video, or, when the attended window is smaller,
  // the sink and the window as a ring buffer (memory independent of the video's length).
  int64_t cache_frames = 0, cache_rows = 0;
  bool ring() const { return cache_frames < run.max_frames; }
  cudaStream_t stream = nullptr;
  cublasLtHandle_t lt = nullptr;
  void* arena = nullptr;
  size_t arena_bytes = 0;
  std::vector<std::pair<std::string, size_t>> usage;  // bytes per category
  void* attn_ws = nullptr;
  size_t attn_ws_bytes = 0;
  void* lt_ws = nullptr;
  static constexpr size_t kLtWorkspace = size_t(32) << 20;
  float *pin_x = nullptr, *pin_flow = nullptr, *pin_sinus = nullptr, *pin_text = nullptr;

  // weights
  std::vector<Layer> layers;
  bf16 *patch_w, *te0_w, *te0_b, *te2_w, *te2_b, *time0_w, *time2_w, *proj_w, *head_w;
  float *patch_b, *time0_b, *time2_b, *proj_b, *head_mod, *head_b;
  float2 *rope_f, *rope_r, *rope_c;
  // activations
  float *x_in, *x, *flow, *hout, *sinus, *t1, *e, *e0, *text_in;
  float *draws, *x0;  // denoise_chunk: the chunk's 3 re-noising draws, its clean latents
  float* modv;                     // the pass's modulation rows: [layer][6][D], then the head's [2][D]
  const float** layer_mod = nullptr;  // device array of the layers' `mod` pointers
  bf16 *tok, *h, *qkv, *att, *y, *cq, *f1, *ctx, *te1, *te;

  std::map<int64_t, std::unique_ptr<Plans>> plans;  // by token count
  std::unique_ptr<LinearPlan> te0_plan, dd_text_plan;
  std::map<std::tuple<int64_t, int64_t, bool>, cudaGraphExec_t> graphs;  // by (frames, start_frame, cache only)
  bool text_ready = false;
  cudaEvent_t x0_ready = nullptr;  // denoise_chunk: x0 is on the host (the refresh pass may follow)
  // profile: events recorded after each step of a pass and the step each one closes
  std::vector<cudaEvent_t> events;
  std::vector<int> event_step;
  size_t marks = 0;
  double step_ms[kSteps] = {};
  int64_t passes = 0, refresh_passes = 0;  // refresh passes: cache only, no last-layer tail

  void mark(int step) {
    if (events.empty()) return;
    cudaEventRecord(events[marks], stream);
    event_step[marks++] = step;
  }
  Status collect_profile(bool cache_only) {
    for (size_t i = 1; i < marks; ++i) {
      float ms = 0.f;
      MONARCHRT_CUDA_CHECK(cudaEventElapsedTime(&ms, events[i - 1], events[i]));
      step_ms[event_step[i]] += ms;
    }
    marks = 0;
    ++passes;
    refresh_passes += cache_only;
    return Status();
  }

  ~Impl() {
    if (stream) cudaStreamSynchronize(stream);  // a refresh pass of denoise_chunk may still run
    if (x0_ready) cudaEventDestroy(x0_ready);
    for (cudaEvent_t e : events) cudaEventDestroy(e);
    for (auto& g : graphs) cudaGraphExecDestroy(g.second);
    plans.clear();
    te0_plan.reset();
    dd_text_plan.reset();
    if (lt) cublasLtDestroy(lt);
    cudaFree(arena);
    cudaFree(attn_ws);
    cudaFreeHost(pin_x);
    cudaFreeHost(pin_flow);
    cudaFreeHost(pin_sinus);
    cudaFreeHost(pin_text);
    if (stream) cudaStreamDestroy(stream);
  }

  Status check_call(int64_t frames, int64_t start_frame) const;
  Status launch_pass(int64_t frames, int64_t start_frame, bool cache_only);

  Status make_plans(int64_t M) {
    if (plans.count(M)) return Status();
    auto p = std::make_unique<Plans>();
    const int64_t D = c.dim;
    MONARCHRT_RETURN_IF_ERROR(p->qkv.init(lt, M, 3 * D, D, DType::kBF16, LinearEpilogue::kBias, kLtWorkspace));
    MONARCHRT_RETURN_IF_ERROR(p->dd.init(lt, M, D, D, DType::kBF16, LinearEpilogue::kBias, kLtWorkspace));
    MONARCHRT_RETURN_IF_ERROR(p->ffn0.init(lt, M, c.ffn_dim, D, DType::kBF16, LinearEpilogue::kBiasGelu, kLtWorkspace));
    MONARCHRT_RETURN_IF_ERROR(p->ffn2.init(lt, M, D, c.ffn_dim, DType::kBF16, LinearEpilogue::kBias, kLtWorkspace));
    MONARCHRT_RETURN_IF_ERROR(p->patch.init(lt, M, D, P, DType::kF32, LinearEpilogue::kBias, kLtWorkspace));
    MONARCHRT_RETURN_IF_ERROR(p->head.init(lt, M, O, D, DType::kF32, LinearEpilogue::kBias, kLtWorkspace));
    plans[M] = std::move(p);
    return Status();
  }

  // q over the chunk, k/v over the cache's first `used` rows, as [B, S, H, hd] views.
  TensorView view(void* data, int64_t tokens, int64_t batch_stride, int64_t token_stride) const {
    TensorView t;
    t.data = data;
    t.dtype = DType::kBF16;
    t.device = Device::kCUDA;
    const int64_t shape[4] = {run.batch, tokens, c.num_heads, c.head_dim()};
    const int64_t stride[4] = {batch_stride, token_stride, c.head_dim(), 1};
    std::copy(shape, shape + 4, t.shape);
    std::copy(stride, stride + 4, t.stride);
    return t;
  }

  // k or v of the cache as the attention of the chunk [start, start + frames) sees it.
  TensorView cache_view(void* data, int64_t start, int64_t frames) const {
    return view(data, ring() ? cache_rows : (start + frames) * tpf, cache_rows * c.dim, c.dim);
  }

  Status self_attention(const Layer& L, int64_t frames, int64_t start) {
    const int64_t S = frames * tpf, D = c.dim;
    const TensorView q = view(qkv, S, S * 3 * D, 3 * D);
    const TensorView k = cache_view(L.kc, start, frames), v = cache_view(L.vc, start, frames);
    const TensorView o = view(att, S, S * D, D);
    const AttentionParams ap = wan_attention_params(c, run, frames, start);
    if (run.monarch) return cuda::monarch_attention(q, k, v, o, ap, attn_ws, attn_ws_bytes, stream);
    return cuda::dense_attention(q, k, v, o, ap, stream);
  }

  Status cross_attention(const Layer& L, int64_t S) {
    const int64_t D = c.dim;
    cuda_detail::FlashArgs a{};
    a.q = cq;
    a.k = L.xk;
    a.v = L.xv;
    a.out = att;
    const int64_t qs[3] = {S * D, D, c.head_dim()}, ks[3] = {c.text_len * D, D, c.head_dim()};
    std::copy(qs, qs + 3, a.q_stride);
    std::copy(qs, qs + 3, a.o_stride);
    std::copy(ks, ks + 3, a.k_stride);
    std::copy(ks, ks + 3, a.v_stride);
    a.B = int(run.batch);
    a.H = int(c.num_heads);
    a.D = int(c.head_dim());
    a.Sq = int(S);
    a.segments = 1;
    a.seg_start[0] = 0;
    a.seg_len[0] = int(c.text_len);
    a.scale = float(1.0 / std::sqrt(double(c.head_dim())));
    a.dtype = DType::kBF16;
    return cuda_detail::flash_attention(a, stream);
  }

  void add_norm(const bf16* yv, const float* gate, const float* mul, const float* add, int64_t N) {
    AddNormArgs a{x, yv, gate, mul, add, h, int(c.dim), float(c.eps)};
    add_norm_kernel<<<unsigned(N), row_threads(c.dim), 0, stream>>>(a);
  }

  // Everything of one pass after x_in and sinus are on the device, on `stream`. cache_only (the
  // refresh pass): stop once the last layer has written its K/V into the cache.
  Status enqueue(int64_t frames, int64_t start, bool cache_only) {
    const int64_t B = run.batch, S = frames * tpf, N = B * S, D = c.dim, nl = int64_t(layers.size());
    Plans& p = *plans.at(N);
    const int64_t n_tok = N * P;
    marks = 0;
    mark(kEmbed);  // the start of the pass
    patchify_kernel<<<blocks_for(n_tok, 256), 256, 0, stream>>>(x_in, tok, int(frames), int(c.in_dim), int(run.latent_h),
                                                                int(run.latent_w), int(c.patch_h), int(c.patch_w), int(tw),
                                                                n_tok);
    MONARCHRT_RETURN_IF_ERROR(p.patch.run(tok, patch_w, patch_b, x, lt_ws, stream));
    matvec_kernel<<<blocks_for(D, 8), 256, 0, stream>>>(time0_w, sinus, time0_b, t1, int(D), int(c.freq_dim), false);
    matvec_kernel<<<blocks_for(D, 8), 256, 0, stream>>>(time2_w, t1, time2_b, e, int(D), int(D), true);
    matvec_kernel<<<blocks_for(6 * D, 8), 256, 0, stream>>>(proj_w, e, proj_b, e0, int(6 * D), int(D), true);
    mod_kernel<<<blocks_for((nl * 6 + 2) * D, 256), 256, 0, stream>>>(layer_mod, e0, head_mod, e, modv, int(nl), int(D));
    mark(kEmbed);
    // Row r of layer l's modulation (0 shift, 1 1 + scale, 2 gate; 3-5 the same for the FFN);
    // layer nl is the head (0 shift, 1 1 + scale).
    auto mrow = [&](int64_t l, int r) { return modv + (l * 6 + r) * D; };
    add_norm(nullptr, nullptr, mrow(0, 1), mrow(0, 0), N);
    mark(kNorm);
    for (int64_t i = 0; i < nl; ++i) {
      const Layer& L = layers[size_t(i)];
      MONARCHRT_RETURN_IF_ERROR(p.qkv.run(h, L.qkv_w, L.qkv_b, qkv, lt_ws, stream));
      mark(kQkvGemm);
      const auto pairs = wan_rope_pairs(c.head_dim());
      QkRopeArgs qa{qkv, L.nq, L.nk, L.kc, L.vc, cache_rows, int(run.sink_frames),
                    int(ring() ? cache_frames - run.sink_frames : 0), rope_f, rope_r, rope_c,
                    int(S), int(D), int(c.head_dim()), int(th), int(tw), int(start), int(pairs.frame), int(pairs.hw),
                    float(c.eps)};
      qk_rope_kernel<<<unsigned(N), row_threads(D), 0, stream>>>(qa);
      mark(kQkRope);
      if (cache_only && i + 1 == nl) {  // nothing after this feeds the cache
        MONARCHRT_CUDA_CHECK(cudaGetLastError());
        return Status();
      }
      MONARCHRT_RETURN_IF_ERROR(self_attention(L, frames, start));
      mark(kSelfAttention);
      MONARCHRT_RETURN_IF_ERROR(p.dd.run(att, L.so_w, L.so_b, y, lt_ws, stream));
      mark(kProjGemm);
      add_norm(y, mrow(i, 2), L.n3w, L.n3b, N);
      mark(kNorm);
      MONARCHRT_RETURN_IF_ERROR(p.dd.run(h, L.cq_w, L.cq_b, cq, lt_ws, stream));
      mark(kProjGemm);
      rms_rows_kernel<<<unsigned(N), row_threads(D), 0, stream>>>(cq, D, L.cnq, int(D), float(c.eps));
      mark(kNorm);
      MONARCHRT_RETURN_IF_ERROR(cross_attention(L, S));
      mark(kCrossAttention);
      MONARCHRT_RETURN_IF_ERROR(p.dd.run(att, L.co_w, L.co_b, y, lt_ws, stream));
      mark(kProjGemm);
      add_norm(y, nullptr, mrow(i, 4), mrow(i, 3), N);
      mark(kNorm);
      MONARCHRT_RETURN_IF_ERROR(p.ffn0.run(h, L.f0_w, L.f0_b, f1, lt_ws, stream));
      MONARCHRT_RETURN_IF_ERROR(p.ffn2.run(f1, L.f2_w, L.f2_b, y, lt_ws, stream));
      mark(kFfnGemm);
      add_norm(y, mrow(i, 5), mrow(i + 1, 1), mrow(i + 1, 0), N);  // the next layer's norm, or the head's
      mark(kNorm);
    }
    MONARCHRT_RETURN_IF_ERROR(p.head.run(h, head_w, head_b, hout, lt_ws, stream));
    const int64_t n_flow = N * O;
    unpatchify_kernel<<<blocks_for(n_flow, 256), 256, 0, stream>>>(hout, flow, int(c.out_dim), int(run.latent_h),
                                                                    int(run.latent_w), int(c.patch_h), int(c.patch_w),
                                                                    int(tw), n_flow);
    mark(kHead);
    MONARCHRT_CUDA_CHECK(cudaGetLastError());
    return Status();
  }
};

WanDiTCuda::WanDiTCuda() = default;
WanDiTCuda::~WanDiTCuda() = default;
const WanRunConfig& WanDiTCuda::run() const {
  static const WanRunConfig none;
  return impl_ ? impl_->run : none;
}
const WanConfig& WanDiTCuda::config() const {
  static const WanConfig none;
  return impl_ ? impl_->c : none;
}
size_t WanDiTCuda::device_bytes() const { return impl_ ? impl_->arena_bytes + impl_->attn_ws_bytes : 0; }

std::string WanDiTCuda::profile_report() const {
  if (!impl_ || impl_->events.empty()) return "profiling is off (WanCudaOptions::profile)";
  const Impl& m = *impl_;
  double total = 0;
  for (double ms : m.step_ms) total += ms;
  std::string s;
  char buf[160];
  std::snprintf(buf, sizeof(buf), "%-36s %10s %10s %6s\n", "step", "total ms", "per pass", "share");
  s += buf;
  for (int i = 0; i < kSteps; ++i) {
    std::snprintf(buf, sizeof(buf), "%-36s %10.1f %10.2f %5.1f%%\n", kStepNames[i], m.step_ms[i],
                  m.step_ms[i] / double(std::max<int64_t>(1, m.passes)), 100.0 * m.step_ms[i] / std::max(total, 1e-9));
    s += buf;
  }
  std::snprintf(buf, sizeof(buf), "%-36s %10.1f %10.2f  (%lld passes, %lld of them cache refreshes)\n", "all GPU work",
                total, total / double(std::max<int64_t>(1, m.passes)), (long long)m.passes,
                (long long)m.refresh_passes);
  return s + buf;
}

std::string WanDiTCuda::memory_report() const {
  if (!impl_) return "not initialized";
  std::string s;
  char buf[96];
  for (const auto& u : impl_->usage) {
    std::snprintf(buf, sizeof(buf), "%s%s %.3f GB", s.empty() ? "" : ", ", u.first.c_str(), double(u.second) / 1e9);
    s += buf;
  }
  std::snprintf(buf, sizeof(buf), "; %.3f GB of device memory in all", double(device_bytes()) / 1e9);
  return s + buf;
}

namespace {

// Carves one allocation into 256-byte aligned pieces: a first pass adds up the sizes
// (base == nullptr), a second hands out the pointers.
class Carver {
 public:
  explicit Carver(char* base) : base_(base) {}
  template <typename T>
  void take(T** p, int64_t count, const char* category) {
    const size_t bytes = (size_t(count) * sizeof(T) + 255) / 256 * 256;
    *p = base_ ? reinterpret_cast<T*>(base_ + used_) : nullptr;
    used_ += bytes;
    if (!base_) by_category_[category] += bytes;
  }
  size_t used() const { return used_; }
  const std::map<std::string, size_t>& by_category() const { return by_category_; }

 private:
  char* base_;
  size_t used_ = 0;
  std::map<std::string, size_t> by_category_;
};

}  // namespace

Status WanDiTCuda::init(const WanWeights& weights, const WanRunConfig& run, const WanCudaOptions& options) {
  MONARCHRT_RETURN_IF_ERROR(check_wan_model(weights, run));
  const WanConfig& c = weights.config;
  if (c.head_dim() != 64 && c.head_dim() != 128) {
    return Status::unsupported("WanDiTCuda: head dim " + std::to_string(c.head_dim()) + " (dim / num_heads); the CUDA attention kernels need 64 or 128");
  }
  const int64_t P = c.in_dim * c.patch_h * c.patch_w, O = c.out_dim * c.patch_h * c.patch_w;
  const std::pair<const char*, int64_t> mult8[] = {{"dim", c.dim}, {"ffn_dim", c.ffn_dim}, {"text_dim", c.text_dim},
                                                   {"in_dim * patch_h * patch_w", P}, {"out_dim * patch_h * patch_w", O}};
  for (const auto& m : mult8) {
    if (m.second % 8 != 0) {
      return Status::unsupported(std::string("WanDiTCuda: config ") + m.first + " = " + std::to_string(m.second) +
                                 " must be a multiple of 8 (16-byte rows for the GEMMs)");
    }
  }
  if (c.dim > 1024 * kVec) return Status::unsupported("WanDiTCuda: dim above " + std::to_string(1024 * kVec));
  if (options.max_chunk_frames < 1 || options.max_chunk_frames > run.max_frames) {
    return Status::invalid("WanDiTCuda: max_chunk_frames = " + std::to_string(options.max_chunk_frames) +
                           " must be in [1, max_frames = " + std::to_string(run.max_frames) + "]");
  }
  if (cuda::device_count() == 0) return Status::unsupported("WanDiTCuda: no CUDA device");
  MONARCHRT_RETURN_IF_ERROR(cuda::prepare());

  auto impl = std::make_unique<Impl>();
  Impl& m = *impl;
  m.c = c;
  m.run = run;
  m.opt = options;
  m.th = run.latent_h / c.patch_h;
  m.tw = run.latent_w / c.patch_w;
  m.tpf = m.th * m.tw;
  m.P = P;
  m.O = O;
  m.max_tokens = run.batch * options.max_chunk_frames * m.tpf;
  m.cache_frames = wan_cache_frames(run);
  m.cache_rows = m.cache_frames * m.tpf;
  MONARCHRT_CUDA_CHECK(cudaStreamCreateWithFlags(&m.stream, cudaStreamNonBlocking));
  if (cublasLtCreate(&m.lt) != CUBLAS_STATUS_SUCCESS) return Status::internal("cublasLtCreate failed");

  const int64_t D = c.dim, L = c.num_layers, B = run.batch, N = m.max_tokens, T = B * c.text_len;
  const auto pairs = wan_rope_pairs(c.head_dim());
  auto plan_all = [&](Carver& cv) {
    m.layers.resize(size_t(L));
    for (Impl::Layer& l : m.layers) {
      cv.take(&l.qkv_w, 3 * D * D, "weights");
      cv.take(&l.qkv_b, 3 * D, "weights");
      for (bf16** w : {&l.so_w, &l.cq_w, &l.ck_w, &l.cv_w, &l.co_w}) cv.take(w, D * D, "weights");
      for (bf16** b : {&l.so_b, &l.cq_b, &l.ck_b, &l.cv_b, &l.co_b}) cv.take(b, D, "weights");
      cv.take(&l.f0_w, c.ffn_dim * D, "weights");
      cv.take(&l.f0_b, c.ffn_dim, "weights");
      cv.take(&l.f2_w, D * c.ffn_dim, "weights");
      cv.take(&l.f2_b, D, "weights");
      for (float** g : {&l.nq, &l.nk, &l.cnq, &l.cnk, &l.n3w, &l.n3b}) cv.take(g, D, "weights");
      cv.take(&l.mod, 6 * D, "weights");
      cv.take(&l.kc, B * m.cache_rows * D, "KV cache");
      cv.take(&l.vc, B * m.cache_rows * D, "KV cache");
      cv.take(&l.xk, T * D, "text cache");
      cv.take(&l.xv, T * D, "text cache");
    }
    cv.take(&m.patch_w, D * P, "weights");
    cv.take(&m.patch_b, D, "weights");
    cv.take(&m.te0_w, D * c.text_dim, "weights");
    cv.take(&m.te0_b, D, "weights");
    cv.take(&m.te2_w, D * D, "weights");
    cv.take(&m.te2_b, D, "weights");
    cv.take(&m.time0_w, D * c.freq_dim, "weights");
    cv.take(&m.time0_b, D, "weights");
    cv.take(&m.time2_w, D * D, "weights");
    cv.take(&m.time2_b, D, "weights");
    cv.take(&m.proj_w, 6 * D * D, "weights");
    cv.take(&m.proj_b, 6 * D, "weights");
    cv.take(&m.head_mod, 2 * D, "weights");
    cv.take(&m.head_w, O * D, "weights");
    cv.take(&m.head_b, O, "weights");
    cv.take(&m.rope_f, run.max_frames * pairs.frame, "weights");
    cv.take(&m.rope_r, m.th * pairs.hw, "weights");
    cv.take(&m.rope_c, m.tw * pairs.hw, "weights");
    cv.take(&m.x_in, N * P, "activations");
    cv.take(&m.draws, 3 * N * P, "activations");
    cv.take(&m.x0, N * P, "activations");
    cv.take(&m.tok, N * P, "activations");
    cv.take(&m.x, N * D, "activations");
    cv.take(&m.h, N * D, "activations");
    cv.take(&m.qkv, N * 3 * D, "activations");
    cv.take(&m.att, N * D, "activations");
    cv.take(&m.y, N * D, "activations");
    cv.take(&m.cq, N * D, "activations");
    cv.take(&m.f1, N * c.ffn_dim, "activations");
    cv.take(&m.hout, N * O, "activations");
    cv.take(&m.flow, N * O, "activations");
    cv.take(&m.sinus, c.freq_dim, "activations");
    cv.take(&m.t1, D, "activations");
    cv.take(&m.e, D, "activations");
    cv.take(&m.e0, 6 * D, "activations");
    cv.take(&m.modv, (L * 6 + 2) * D, "activations");
    cv.take(&m.layer_mod, L, "weights");
    cv.take(&m.text_in, T * c.text_dim, "text staging");
    cv.take(&m.ctx, T * c.text_dim, "text staging");
    cv.take(&m.te1, T * D, "text staging");
    cv.take(&m.te, T * D, "text staging");
    char* lt_ws = nullptr;
    cv.take(&lt_ws, int64_t(Impl::kLtWorkspace), "workspaces");
    m.lt_ws = lt_ws;
  };
  Carver sizing(nullptr);
  plan_all(sizing);
  m.arena_bytes = sizing.used();
  const cudaError_t alloc = cudaMalloc(&m.arena, m.arena_bytes);
  if (alloc != cudaSuccess) {
    return Status::invalid("WanDiTCuda: cannot allocate " + std::to_string(m.arena_bytes >> 20) +
                           " MiB of device memory (" + cudaGetErrorString(alloc) + ")");
  }
  for (const auto& u : sizing.by_category()) m.usage.push_back(u);
  Carver carve(static_cast<char*>(m.arena));
  plan_all(carve);
  MONARCHRT_CUDA_CHECK(cudaMemset(m.arena, 0, m.arena_bytes));

  // Weights: fp32 -> bf16 (or fp32 where the kernels read fp32) on the host, then one copy each.
  std::vector<uint16_t> hb;
  auto up_bf16 = [&](bf16* dst, std::initializer_list<const std::vector<float>*> parts) -> Status {
    size_t n = 0;
    for (const auto* p : parts) n += p->size();
    hb.resize(n);
    size_t off = 0;
    for (const auto* p : parts) {
      const float* src = p->data();
      const int64_t len = int64_t(p->size()), blocks = (len + 65535) / 65536;
      parallel_for(blocks, [&](int64_t blk) {
        for (int64_t i = blk * 65536; i < std::min(len, (blk + 1) * 65536); ++i) hb[off + size_t(i)] = float_to_bf16(src[i]);
      });
      off += p->size();
    }
    MONARCHRT_CUDA_CHECK(cudaMemcpy(dst, hb.data(), n * 2, cudaMemcpyHostToDevice));
    return Status();
  };
  auto up_f32 = [&](float* dst, const std::vector<float>& src) -> Status {
    MONARCHRT_CUDA_CHECK(cudaMemcpy(dst, src.data(), src.size() * 4, cudaMemcpyHostToDevice));
    return Status();
  };
  auto W = [&](const std::string& n) { return &weights.at(n); };
  for (int64_t i = 0; i < L; ++i) {
    Impl::Layer& l = m.layers[size_t(i)];
    const std::string b = "blocks." + std::to_string(i) + ".", sa = b + "self_attn.", ca = b + "cross_attn.";
    MONARCHRT_RETURN_IF_ERROR(up_bf16(l.qkv_w, {W(sa + "q.weight"), W(sa + "k.weight"), W(sa + "v.weight")}));
    MONARCHRT_RETURN_IF_ERROR(up_bf16(l.qkv_b, {W(sa + "q.bias"), W(sa + "k.bias"), W(sa + "v.bias")}));
    const std::pair<bf16*, std::string> mats[] = {
        {l.so_w, sa + "o.weight"}, {l.so_b, sa + "o.bias"}, {l.cq_w, ca + "q.weight"}, {l.cq_b, ca + "q.bias"},
        {l.ck_w, ca + "k.weight"}, {l.ck_b, ca + "k.bias"}, {l.cv_w, ca + "v.weight"}, {l.cv_b, ca + "v.bias"},
        {l.co_w, ca + "o.weight"}, {l.co_b, ca + "o.bias"}, {l.f0_w, b + "ffn.0.weight"}, {l.f0_b, b + "ffn.0.bias"},
        {l.f2_w, b + "ffn.2.weight"}, {l.f2_b, b + "ffn.2.bias"}};
    for (const auto& mt : mats) MONARCHRT_RETURN_IF_ERROR(up_bf16(mt.first, {W(mt.second)}));
    const std::pair<float*, std::string> vecs[] = {
        {l.nq, sa + "norm_q.weight"}, {l.nk, sa + "norm_k.weight"}, {l.cnq, ca + "norm_q.weight"},
        {l.cnk, ca + "norm_k.weight"}, {l.n3w, b + "norm3.weight"}, {l.n3b, b + "norm3.bias"}, {l.mod, b + "modulation"}};
    for (const auto& v : vecs) MONARCHRT_RETURN_IF_ERROR(up_f32(v.first, *W(v.second)));
  }
  const std::pair<bf16*, std::string> gm[] = {
      {m.patch_w, "patch_embedding.weight"}, {m.te0_w, "text_embedding.0.weight"}, {m.te0_b, "text_embedding.0.bias"},
      {m.te2_w, "text_embedding.2.weight"},  {m.te2_b, "text_embedding.2.bias"},   {m.time0_w, "time_embedding.0.weight"},
      {m.time2_w, "time_embedding.2.weight"}, {m.proj_w, "time_projection.1.weight"}, {m.head_w, "head.head.weight"}};
  for (const auto& g : gm) MONARCHRT_RETURN_IF_ERROR(up_bf16(g.first, {W(g.second)}));
  const std::pair<float*, std::string> gv[] = {{m.patch_b, "patch_embedding.bias"}, {m.time0_b, "time_embedding.0.bias"},
                                               {m.time2_b, "time_embedding.2.bias"}, {m.proj_b, "time_projection.1.bias"},
                                               {m.head_mod, "head.modulation"},      {m.head_b, "head.head.bias"}};
  for (const auto& g : gv) MONARCHRT_RETURN_IF_ERROR(up_f32(g.first, *W(g.second)));
  std::vector<const float*> mods;
  for (const Impl::Layer& l : m.layers) mods.push_back(l.mod);
  MONARCHRT_CUDA_CHECK(cudaMemcpy(m.layer_mod, mods.data(), mods.size() * sizeof(float*), cudaMemcpyHostToDevice));
  // RoPE tables (angles in double, as the CPU path).
  auto table = [&](float2* dst, int64_t positions, int64_t first_pair, int64_t count, int axis) -> Status {
    std::vector<float2> t(size_t(positions * count));
    for (int64_t pos = 0; pos < positions; ++pos)
      for (int64_t j = 0; j < count; ++j) {
        const double a = wan_rope_angle(c.head_dim(), first_pair + j, axis == 0 ? pos : 0, axis == 1 ? pos : 0,
                                        axis == 2 ? pos : 0);
        t[size_t(pos * count + j)] = make_float2(float(std::cos(a)), float(std::sin(a)));
      }
    MONARCHRT_CUDA_CHECK(cudaMemcpy(dst, t.data(), t.size() * sizeof(float2), cudaMemcpyHostToDevice));
    return Status();
  };
  MONARCHRT_RETURN_IF_ERROR(table(m.rope_f, run.max_frames, 0, pairs.frame, 0));
  MONARCHRT_RETURN_IF_ERROR(table(m.rope_r, m.th, pairs.frame, pairs.hw, 1));
  MONARCHRT_RETURN_IF_ERROR(table(m.rope_c, m.tw, pairs.frame + pairs.hw, pairs.hw, 2));

  // GEMM plans for full chunks and the text; the attention workspace for the largest call.
  MONARCHRT_RETURN_IF_ERROR(m.make_plans(N));
  m.te0_plan = std::make_unique<LinearPlan>();
  m.dd_text_plan = std::make_unique<LinearPlan>();
  MONARCHRT_RETURN_IF_ERROR(m.te0_plan->init(m.lt, T, D, c.text_dim, DType::kBF16, LinearEpilogue::kBiasGelu, Impl::kLtWorkspace));
  MONARCHRT_RETURN_IF_ERROR(m.dd_text_plan->init(m.lt, T, D, D, DType::kBF16, LinearEpilogue::kBias, Impl::kLtWorkspace));
  // Every position of a full chunk in the cache; positions that the layout cannot run (a cache
  // that is not whole tiles) fail at forward() with the same message. The first must work.
  const int64_t F = options.max_chunk_frames, S = F * m.tpf;
  for (int64_t start = 0; start + F <= run.max_frames; ++start) {
    const TensorView q = m.view(m.qkv, S, S * 3 * D, 3 * D), o = m.view(m.att, S, S * D, D);
    const TensorView k = m.cache_view(m.layers[0].kc, start, F);
    const AttentionParams ap = wan_attention_params(c, run, F, start);
    const Status ok = run.monarch ? cuda::can_implement(q, k, k, o, ap) : check_attention(q, k, k, o, ap, false);
    if (!ok.ok() && start == 0) return ok;
    if (ok.ok() && run.monarch) m.attn_ws_bytes = std::max(m.attn_ws_bytes, cuda::workspace_size(q, k, k, o, ap));
  }
  if (m.attn_ws_bytes > 0) {
    const cudaError_t e = cudaMalloc(&m.attn_ws, m.attn_ws_bytes);
    if (e != cudaSuccess) {
      return Status::invalid("WanDiTCuda: cannot allocate the attention workspace (" + std::to_string(m.attn_ws_bytes >> 20) +
                             " MiB): " + cudaGetErrorString(e));
    }
    m.usage.emplace_back("attention workspace", m.attn_ws_bytes);
  }
  if (options.profile) {
    m.opt.cuda_graphs = false;
    m.events.resize(size_t(16 + 16 * L));
    m.event_step.resize(m.events.size());
    for (cudaEvent_t& e : m.events) MONARCHRT_CUDA_CHECK(cudaEventCreate(&e));
  }
  // pin_x: a pass's input, or denoise_chunk's noise and 3 draws; pin_sinus: one sinusoid per
  // pass of a chunk (its copies are queued together).
  MONARCHRT_CUDA_CHECK(cudaMallocHost(&m.pin_x, size_t(4 * N * P) * 4));
  MONARCHRT_CUDA_CHECK(cudaMallocHost(&m.pin_flow, size_t(N * std::max(O, P)) * 4));
  MONARCHRT_CUDA_CHECK(cudaMallocHost(&m.pin_sinus, (self_forcing_steps().size() + 1) * size_t(c.freq_dim) * 4));
  MONARCHRT_CUDA_CHECK(cudaMallocHost(&m.pin_text, size_t(T * c.text_dim) * 4));
  MONARCHRT_CUDA_CHECK(cudaEventCreateWithFlags(&m.x0_ready, cudaEventDisableTiming));
  MONARCHRT_CUDA_CHECK(cudaDeviceSynchronize());
  impl_ = std::move(impl);
  return Status();
}

Status WanDiTCuda::set_text(const float* context) {
  if (!impl_) return Status::invalid("WanDiTCuda: init() first");
  Impl& m = *impl_;
  const WanConfig& c = m.c;
  const int64_t T = m.run.batch * c.text_len, D = c.dim, n = T * c.text_dim;
  std::memcpy(m.pin_text, context, size_t(n) * 4);
  MONARCHRT_CUDA_CHECK(cudaMemcpyAsync(m.text_in, m.pin_text, size_t(n) * 4, cudaMemcpyHostToDevice, m.stream));
  to_bf16_kernel<<<blocks_for(n, 256), 256, 0, m.stream>>>(m.text_in, m.ctx, n);
  MONARCHRT_RETURN_IF_ERROR(m.te0_plan->run(m.ctx, m.te0_w, m.te0_b, m.te1, m.lt_ws, m.stream));
  MONARCHRT_RETURN_IF_ERROR(m.dd_text_plan->run(m.te1, m.te2_w, m.te2_b, m.te, m.lt_ws, m.stream));
  for (Impl::Layer& l : m.layers) {
    MONARCHRT_RETURN_IF_ERROR(m.dd_text_plan->run(m.te, l.ck_w, l.ck_b, l.xk, m.lt_ws, m.stream));
    rms_rows_kernel<<<unsigned(T), row_threads(D), 0, m.stream>>>(l.xk, D, l.cnk, int(D), float(c.eps));
    MONARCHRT_RETURN_IF_ERROR(m.dd_text_plan->run(m.te, l.cv_w, l.cv_b, l.xv, m.lt_ws, m.stream));
  }
  MONARCHRT_CUDA_CHECK(cudaGetLastError());
  MONARCHRT_CUDA_CHECK(cudaStreamSynchronize(m.stream));
  m.text_ready = true;
  return Status();
}

Status WanDiTCuda::Impl::check_call(int64_t frames, int64_t start_frame) const {
  if (!text_ready) return Status::invalid("WanDiTCuda: init() and set_text() first");
  if (frames < 1 || frames > opt.max_chunk_frames) {
    return Status::invalid("frames = " + std::to_string(frames) + " must be in [1, max_chunk_frames = " +
                           std::to_string(opt.max_chunk_frames) + "]");
  }
  if (start_frame < 0 || start_frame + frames > run.max_frames) {
    return Status::invalid("frames [" + std::to_string(start_frame) + ", " + std::to_string(start_frame + frames) +
                           ") do not fit the cache of " + std::to_string(run.max_frames) + " frames");
  }
  return Status();
}

// One pass on the stream, its inputs (x_in, sinus) queued before: the captured graph of this
// (frames, start_frame, cache_only), captured on its first use, or direct launches.
Status WanDiTCuda::Impl::launch_pass(int64_t frames, int64_t start_frame, bool cache_only) {
  if (!opt.cuda_graphs) return enqueue(frames, start_frame, cache_only);
  const auto key = std::make_tuple(frames, start_frame, cache_only);
  auto it = graphs.find(key);
  if (it == graphs.end()) {
    MONARCHRT_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    const Status s = enqueue(frames, start_frame, cache_only);
    cudaGraph_t graph = nullptr;
    const cudaError_t end = cudaStreamEndCapture(stream, &graph);
    if (!s.ok()) {
      if (graph) cudaGraphDestroy(graph);
      return s;
    }
    if (end != cudaSuccess) return cuda_detail::cuda_error(end, "cudaStreamEndCapture", __FILE__, __LINE__);
    cudaGraphExec_t exec = nullptr;
    const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    if (inst != cudaSuccess) return cuda_detail::cuda_error(inst, "cudaGraphInstantiate", __FILE__, __LINE__);
    it = graphs.emplace(key, exec).first;
  }
  MONARCHRT_CUDA_CHECK(cudaGraphLaunch(it->second, stream));
  return Status();
}

Status WanDiTCuda::forward(const float* x, int64_t frames, int64_t start_frame, double t, float* flow) {
  if (!impl_) return Status::invalid("WanDiTCuda: init() and set_text() first");
  Impl& m = *impl_;
  MONARCHRT_RETURN_IF_ERROR(m.check_call(frames, start_frame));
  const int64_t N = m.run.batch * frames * m.tpf, nin = N * m.P, nout = N * m.O;
  const bool cache_only = flow == nullptr;  // the refresh pass (wan.h)
  MONARCHRT_RETURN_IF_ERROR(m.make_plans(N));
  std::memcpy(m.pin_x, x, size_t(nin) * 4);
  wan_time_sinusoid(t, m.c.freq_dim, m.pin_sinus);
  MONARCHRT_CUDA_CHECK(cudaMemcpyAsync(m.x_in, m.pin_x, size_t(nin) * 4, cudaMemcpyHostToDevice, m.stream));
  MONARCHRT_CUDA_CHECK(cudaMemcpyAsync(m.sinus, m.pin_sinus, size_t(m.c.freq_dim) * 4, cudaMemcpyHostToDevice, m.stream));
  MONARCHRT_RETURN_IF_ERROR(m.launch_pass(frames, start_frame, cache_only));
  if (!cache_only) {
    MONARCHRT_CUDA_CHECK(cudaMemcpyAsync(m.pin_flow, m.flow, size_t(nout) * 4, cudaMemcpyDeviceToHost, m.stream));
  }
  MONARCHRT_CUDA_CHECK(cudaStreamSynchronize(m.stream));
  if (!cache_only) std::memcpy(flow, m.pin_flow, size_t(nout) * 4);
  return m.events.empty() ? Status() : m.collect_profile(cache_only);
}

bool WanDiTCuda::runs_chunks() const { return impl_ && !impl_->opt.profile && impl_->c.out_dim == impl_->c.in_dim; }

Status WanDiTCuda::denoise_chunk(const float* xt, const std::function<void(int step, float* dst)>& draw,
                                 int64_t frames, int64_t start_frame, bool refresh, float* x0) {
  if (!impl_) return Status::invalid("WanDiTCuda: init() and set_text() first");
  if (!runs_chunks()) {
    return Status::invalid("WanDiTCuda::denoise_chunk: not with options.profile (every pass is timed on its own) "
                           "or out_dim != in_dim");
  }
  if (xt == nullptr || !draw || x0 == nullptr) {
    return Status::invalid("WanDiTCuda::denoise_chunk: xt, draw and x0 are required");
  }
  Impl& m = *impl_;
  MONARCHRT_RETURN_IF_ERROR(m.check_call(frames, start_frame));
  const int64_t N = m.run.batch * frames * m.tpf, nin = N * m.P;
  MONARCHRT_RETURN_IF_ERROR(m.make_plans(N));
  const std::vector<SelfForcingStep> steps = self_forcing_steps();
  const int64_t fd = m.c.freq_dim, nsteps = int64_t(steps.size());
  // pin_x: [xt, draw 1, draw 2, draw 3]; each part is written once per call, before its copy is
  // queued, and every copy of the previous call finished before that call returned.
  std::memcpy(m.pin_x, xt, size_t(nin) * 4);
  for (int64_t j = 0; j <= nsteps; ++j) wan_time_sinusoid(j < nsteps ? steps[size_t(j)].t : 0.0, fd, m.pin_sinus + j * fd);
  MONARCHRT_CUDA_CHECK(cudaMemcpyAsync(m.x_in, m.pin_x, size_t(nin) * 4, cudaMemcpyHostToDevice, m.stream));
  for (int64_t j = 0; j < nsteps; ++j) {
    MONARCHRT_CUDA_CHECK(
        cudaMemcpyAsync(m.sinus, m.pin_sinus + j * fd, size_t(fd) * 4, cudaMemcpyHostToDevice, m.stream));
    MONARCHRT_RETURN_IF_ERROR(m.launch_pass(frames, start_frame, false));
    float* next_draw = nullptr;
    if (j + 1 < nsteps) {  // the draw the sampler needs next, made on the host while the pass runs
      try {
        draw(int(j + 1), m.pin_x + (j + 1) * nin);
      } catch (...) {  // the caller's code: leave no copy from the pinned buffers in flight
        cudaStreamSynchronize(m.stream);
        throw;
      }
      next_draw = m.draws + j * nin;
      MONARCHRT_CUDA_CHECK(cudaMemcpyAsync(next_draw, m.pin_x + (j + 1) * nin, size_t(nin) * 4, cudaMemcpyHostToDevice,
                                           m.stream));
    }
    // x0 from this pass's flow; x_in becomes the next pass's input (after the last: x0 itself)
    const double sigma = steps[size_t(j)].sigma, next = j + 1 < nsteps ? steps[size_t(j + 1)].sigma : 0.0;
    sampler_kernel<<<blocks_for(nin, 256), 256, 0, m.stream>>>(m.x_in, m.flow, next_draw, m.x0, sigma, next, nin);
    MONARCHRT_CUDA_CHECK(cudaGetLastError());
  }
  // The refresh pass's sinusoid is copied before x0 goes out, so that once x0 has arrived every
  // copy from the pinned buffers is done and the next call may refill them; the refresh pass itself
  // runs after this call returns (whatever comes next on the stream waits for it).
  if (refresh) {
    MONARCHRT_CUDA_CHECK(
        cudaMemcpyAsync(m.sinus, m.pin_sinus + nsteps * fd, size_t(fd) * 4, cudaMemcpyHostToDevice, m.stream));
  }
  MONARCHRT_CUDA_CHECK(cudaMemcpyAsync(m.pin_flow, m.x0, size_t(nin) * 4, cudaMemcpyDeviceToHost, m.stream));
  MONARCHRT_CUDA_CHECK(cudaEventRecord(m.x0_ready, m.stream));
  if (refresh) MONARCHRT_RETURN_IF_ERROR(m.launch_pass(frames, start_frame, true));
  MONARCHRT_CUDA_CHECK(cudaEventSynchronize(m.x0_ready));
  std::memcpy(x0, m.pin_flow, size_t(nin) * 4);
  return Status();
}

}  // namespace monarchrt
