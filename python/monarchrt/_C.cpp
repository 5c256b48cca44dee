// The PyTorch binding of monarchrt (TORCH_LIBRARY namespace "monarchrt"): Monarch attention
// forward (also with each query's stage-2 log-sum-exp, for training), its backward and the
// in-place KV-cache write, on CPU tensors (float64: the fp64
// reference, so that gradcheck is exact; float32 / float16 / bfloat16: the fast fp32 CPU path)
// and, when built with CUDA, on CUDA tensors (bfloat16 / float16, the kernels of src/cuda).
// Autograd, fake kernels and the Python API live in python/monarchrt/__init__.py. Errors from the
// library keep their message (which names the argument and the rule): invalid arguments raise
// ValueError, unsupported problems NotImplementedError.
#include <Python.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>
#include <ATen/ATen.h>
#include <torch/library.h>

#ifdef MONARCHRT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "monarchrt/cuda.h"
#endif

#include "monarchrt/attention.h"

namespace {

using monarchrt::AttentionParams;
using monarchrt::Status;
using monarchrt::StatusCode;
using monarchrt::TensorView;

// Messages are built as one std::string: on the GPU machine's build (g++ 13, torch 2.11+cu130),
// integers streamed through TORCH_CHECK's variadic formatting crashed the process (seen
// there, not reproduced with g++ 12 here).
template <typename T>
std::string num(T x) {
  return std::to_string(x);
}

void check(const Status& s) {
  if (s.ok()) return;
  if (s.code() == StatusCode::kInvalidArgument) TORCH_CHECK_VALUE(false, "monarchrt: ", s.message());
  if (s.code() == StatusCode::kUnsupported) TORCH_CHECK_NOT_IMPLEMENTED(false, "monarchrt: ", s.message());
  TORCH_CHECK(false, "monarchrt: ", s.message());
}

AttentionParams make_params(at::IntArrayRef grid, at::IntArrayRef tiling, int64_t num_iters, double scale,
                            int64_t causal_chunk_frames, bool kv_cache, int64_t sink_frames,
                            int64_t window_frames, int64_t cache_capacity_frames, int64_t cache_frames) {
  TORCH_CHECK_VALUE(grid.size() == 3, "monarchrt: grid must be (T, h, w), got " + num(grid.size()) + " values");
  TORCH_CHECK_VALUE(tiling.size() == 3,
                    "monarchrt: tiling must be (f_tied, h_reduce, w_reduce), got " + num(tiling.size()) + " values");
  TORCH_CHECK_VALUE(num_iters >= 1 && num_iters <= monarchrt::kMaxIterations,
                    "monarchrt: num_iters must be in [1, " + num(monarchrt::kMaxIterations) + "], got " + num(num_iters));
  AttentionParams p;
  p.grid = {grid[0], grid[1], grid[2]};
  p.layout = {tiling[0], tiling[1], tiling[2]};
  p.num_iters = static_cast<int>(num_iters);
  p.scale = scale;
  p.causal_chunk_frames = causal_chunk_frames;
  p.kv_cache = kv_cache;
  p.sink_frames = sink_frames;
  p.window_frames = window_frames;
  p.cache_capacity_frames = cache_capacity_frames;
  p.cache_frames = cache_frames;
  return p;
}

TensorView view_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, std::string("monarchrt: ") + name + ": expected a 4-d [B, S, H, D] tensor, got " +
                                       num(t.dim()) + " dimensions");
  TensorView v;
  switch (t.scalar_type()) {
    case at::kFloat: v.dtype = monarchrt::DType::kF32; break;
    case at::kHalf: v.dtype = monarchrt::DType::kF16; break;
    case at::kBFloat16: v.dtype = monarchrt::DType::kBF16; break;
    case at::kDouble: v.dtype = monarchrt::DType::kF64; break;
    default: TORCH_CHECK_VALUE(false, "monarchrt: ", name, ": dtype ", t.scalar_type(),
                               " is not supported (float32, float16, bfloat16, float64)");
  }
  v.device = t.is_cuda() ? monarchrt::Device::kCUDA : monarchrt::Device::kCPU;
  TORCH_CHECK_VALUE(t.is_cuda() || t.is_cpu(),
                    std::string("monarchrt: ") + name + ": tensors must be on CPU or CUDA, got " + t.device().str());
  v.data = t.data_ptr();
  for (int i = 0; i < 4; ++i) {
    v.shape[i] = t.size(i);
    v.stride[i] = t.stride(i);
  }
  return v;
}

struct Named {
  const at::Tensor& t;
  const char* name;
};

// What every op checks first, on CPU and CUDA alike: q and the other inputs are 4-d tensors of a
// supported dtype on CPU or CUDA, all of q's dtype.
void check_inputs(const at::Tensor& q, std::initializer_list<Named> others) {
  view_of(q, "q");
  for (const Named& o : others) {
    view_of(o.t, o.name);
    TORCH_CHECK_VALUE(o.t.scalar_type() == q.scalar_type(), "monarchrt: ", o.name, ": dtype ", o.t.scalar_type(),
                      " differs from q's ", q.scalar_type());
  }
}

// Each query's stage-2 log-sum-exp: float32 [B, H, S] (empty when not asked for).
std::vector<int64_t> lse_shape(const at::Tensor& q, bool with_lse) {
  return with_lse ? std::vector<int64_t>{q.size(0), q.size(2), q.size(1)} : std::vector<int64_t>{0};
}

// ---- CPU ------------------------------------------------------------------------------------

// The forward on CPU tensors (float64: the fp64 reference); with `with_lse` also each query's
// stage-2 log-sum-exp (float32 [B, H, S]), which the CUDA backward takes instead of recomputing
// it, else an empty lse.
std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const AttentionParams& p, bool with_lse) {
  check_inputs(q, {{k, "k"}, {v, "v"}});
  const TensorView qv = view_of(q, "q"), kv = view_of(k, "k"), vv = view_of(v, "v");
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty(lse_shape(q, with_lse), q.options().dtype(at::kFloat));
  const TensorView ov = view_of(out, "out");
  const bool exact = q.scalar_type() == at::kDouble;
  if (with_lse) {
    float* l = lse.data_ptr<float>();
    check(exact ? monarchrt::ref::monarch_attention_with_lse(qv, kv, vv, ov, l, p)
                : monarchrt::cpu::monarch_attention_with_lse(qv, kv, vv, ov, l, p));
  } else {
    check(exact ? monarchrt::ref::monarch_attention(qv, kv, vv, ov, p)
                : monarchrt::cpu::monarch_attention(qv, kv, vv, ov, p));
  }
  return {out, lse};
}

// out / lse (optional, from monarch_attention_lse): checked here; the CPU backward recomputes
// what it needs and does not read them.
void check_stats(const at::Tensor& q, const std::optional<at::Tensor>& out, const std::optional<at::Tensor>& lse) {
  TORCH_CHECK_VALUE(out.has_value() == lse.has_value(), "monarchrt: out and lse must be given together");
  if (!out.has_value()) return;
  TORCH_CHECK_VALUE(out->sizes() == q.sizes() && out->scalar_type() == q.scalar_type() &&
                        out->device() == q.device(),
                    "monarchrt: out must have q's shape, dtype and device");
  TORCH_CHECK_VALUE(lse->dim() == 3 && lse->size(0) == q.size(0) && lse->size(1) == q.size(2) &&
                        lse->size(2) == q.size(1) && lse->scalar_type() == at::kFloat && lse->device() == q.device(),
                    "monarchrt: lse must be float32 [B, H, S] on q's device");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::IntArrayRef grid,
    at::IntArrayRef tiling, int64_t num_iters, double scale, int64_t causal_chunk_frames, bool kv_cache,
    int64_t sink_frames, int64_t window_frames, int64_t cache_capacity_frames, int64_t cache_frames,
    const std::optional<at::Tensor>& out, const std::optional<at::Tensor>& lse) {
  const AttentionParams p = make_params(grid, tiling, num_iters, scale, causal_chunk_frames, kv_cache, sink_frames,
                                        window_frames, cache_capacity_frames, cache_frames);
  check_inputs(q, {{k, "k"}, {v, "v"}, {grad_out, "grad_out"}});
  check_stats(q, out, lse);
  const TensorView qv = view_of(q, "q"), kv = view_of(k, "k"), vv = view_of(v, "v"), gv = view_of(grad_out, "grad_out");
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
             dv = at::empty(v.sizes(), v.options());
  const TensorView a[7] = {qv, kv, vv, gv, view_of(dq, "dq"), view_of(dk, "dk"), view_of(dv, "dv")};
  check(q.scalar_type() == at::kDouble
            ? monarchrt::ref::monarch_attention_backward(a[0], a[1], a[2], a[3], a[4], a[5], a[6], p)
            : monarchrt::cpu::monarch_attention_backward(a[0], a[1], a[2], a[3], a[4], a[5], a[6], p));
  return {dq, dk, dv};
}

void kv_cache_write_cpu(const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& new_k,
                        const at::Tensor& new_v, at::IntArrayRef grid, at::IntArrayRef tiling, int64_t sink_frames,
                        int64_t window_frames, int64_t cache_capacity_frames, int64_t cache_frames) {
  const AttentionParams p =
      make_params(grid, tiling, 1, 0.0, 0, true, sink_frames, window_frames, cache_capacity_frames, cache_frames);
  check(monarchrt::cpu::kv_cache_write(view_of(new_k, "new_k"), view_of(new_v, "new_v"), view_of(cache_k, "cache_k"),
                                       view_of(cache_v, "cache_v"), p));
}

// ---- CUDA -----------------------------------------------------------------------------------

#ifdef MONARCHRT_WITH_CUDA
// The kernels need the head dim contiguous and 16-byte aligned rows; anything else is copied.
at::Tensor kernel_ready(const at::Tensor& t) {
  const bool ok = t.dim() == 4 && t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
                  t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0;
  return ok ? t : t.contiguous();
}

// The forward on CUDA tensors; with `with_lse` also each query's stage-2 log-sum-exp (float32
// [B, H, S]), else an empty lse.
std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                                const AttentionParams& p, bool with_lse) {
  check_inputs(q_in, {{k_in, "k"}, {v_in, "v"}});
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = kernel_ready(q_in), k = kernel_ready(k_in), v = kernel_ready(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty(lse_shape(q, with_lse), q.options().dtype(at::kFloat));
  const TensorView qv = view_of(q, "q"), kv = view_of(k, "k"), vv = view_of(v, "v"), ov = view_of(out, "out");
  check(monarchrt::cuda::can_implement(qv, kv, vv, ov, p));
  const size_t bytes = monarchrt::cuda::workspace_size(qv, kv, vv, ov, p);
  at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  check(with_lse ? monarchrt::cuda::monarch_attention_with_lse(qv, kv, vv, ov, lse.data_ptr<float>(), p, ws.data_ptr(),
                                                               bytes, stream)
                 : monarchrt::cuda::monarch_attention(qv, kv, vv, ov, p, ws.data_ptr(), bytes, stream));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& g_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    at::IntArrayRef grid, at::IntArrayRef tiling, int64_t num_iters, double scale, int64_t causal_chunk_frames,
    bool kv_cache, int64_t sink_frames, int64_t window_frames, int64_t cache_capacity_frames, int64_t cache_frames,
    const std::optional<at::Tensor>& out_in, const std::optional<at::Tensor>& lse_in) {
  const AttentionParams p = make_params(grid, tiling, num_iters, scale, causal_chunk_frames, kv_cache, sink_frames,
                                        window_frames, cache_capacity_frames, cache_frames);
  check_inputs(q_in, {{k_in, "k"}, {v_in, "v"}, {g_in, "grad_out"}});
  check_stats(q_in, out_in, lse_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor g = kernel_ready(g_in), q = kernel_ready(q_in), k = kernel_ready(k_in), v = kernel_ready(v_in);
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
             dv = at::empty(v.sizes(), v.options());
  const TensorView a[7] = {view_of(q, "q"), view_of(k, "k"), view_of(v, "v"), view_of(g, "grad_out"),
                           view_of(dq, "dq"), view_of(dk, "dk"), view_of(dv, "dv")};
  const size_t bytes = monarchrt::cuda::backward_workspace_size(a[0], a[1], a[2], a[3], a[4], a[5], a[6], p);
  at::Tensor ws = at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 16))}, q.options().dtype(at::kByte));
  // With bytes == 0 (unsupported problem) the call reports why.
  cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  if (out_in.has_value()) {
    const at::Tensor out = kernel_ready(*out_in), lse = lse_in->contiguous();
    check(monarchrt::cuda::monarch_attention_backward(a[0], a[1], a[2], view_of(out, "out"), lse.data_ptr<float>(),
                                                      a[3], a[4], a[5], a[6], p, ws.data_ptr(), bytes, stream));
  } else {
    check(monarchrt::cuda::monarch_attention_backward(a[0], a[1], a[2], a[3], a[4], a[5], a[6], p, ws.data_ptr(),
                                                      bytes, stream));
  }
  return {dq, dk, dv};
}

void kv_cache_write_cuda(const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& new_k_in,
                         const at::Tensor& new_v_in, at::IntArrayRef grid, at::IntArrayRef tiling,
                         int64_t sink_frames, int64_t window_frames, int64_t cache_capacity_frames,
                         int64_t cache_frames) {
  const AttentionParams p =
      make_params(grid, tiling, 1, 0.0, 0, true, sink_frames, window_frames, cache_capacity_frames, cache_frames);
  const c10::cuda::CUDAGuard guard(cache_k.device());
  const at::Tensor new_k = kernel_ready(new_k_in), new_v = kernel_ready(new_v_in);
  check(monarchrt::cuda::kv_cache_write(view_of(new_k, "new_k"), view_of(new_v, "new_v"),
                                        view_of(cache_k, "cache_k"), view_of(cache_v, "cache_v"), p,
                                        at::cuda::getCurrentCUDAStream().stream()));
}
#endif

// The forward ops of one device from its forward helper: the plain op keeps the output only.
using ForwardFn = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                         const AttentionParams&, bool);
template <ForwardFn Forward, bool WithLse>
std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              at::IntArrayRef grid, at::IntArrayRef tiling, int64_t num_iters,
                                              double scale, int64_t causal_chunk_frames, bool kv_cache,
                                              int64_t sink_frames, int64_t window_frames,
                                              int64_t cache_capacity_frames, int64_t cache_frames) {
  return Forward(q, k, v,
                 make_params(grid, tiling, num_iters, scale, causal_chunk_frames, kv_cache, sink_frames,
                             window_frames, cache_capacity_frames, cache_frames),
                 WithLse);
}
template <ForwardFn Forward>
at::Tensor attention_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::IntArrayRef grid,
                        at::IntArrayRef tiling, int64_t num_iters, double scale, int64_t causal_chunk_frames,
                        bool kv_cache, int64_t sink_frames, int64_t window_frames, int64_t cache_capacity_frames,
                        int64_t cache_frames) {
  return std::get<0>(forward_op<Forward, false>(q, k, v, grid, tiling, num_iters, scale, causal_chunk_frames,
                                                kv_cache, sink_frames, window_frames, cache_capacity_frames,
                                                cache_frames));
}

}  // namespace

#define MONARCHRT_PARAMS \
  "int[] grid, int[] tiling, int num_iters, float scale, int causal_chunk_frames, bool kv_cache, " \
  "int sink_frames, int window_frames, int cache_capacity_frames, int cache_frames"

TORCH_LIBRARY(monarchrt, m) {
  m.def("monarch_attention(Tensor q, Tensor k, Tensor v, " MONARCHRT_PARAMS ") -> Tensor");
  m.def("monarch_attention_lse(Tensor q, Tensor k, Tensor v, " MONARCHRT_PARAMS ") -> (Tensor, Tensor)");
  m.def("monarch_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, " MONARCHRT_PARAMS
        ", Tensor? out=None, Tensor? lse=None) -> (Tensor, Tensor, Tensor)");
  m.def("kv_cache_write_(Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor new_k, Tensor new_v, int[] grid, "
        "int[] tiling, int sink_frames, int window_frames, int cache_capacity_frames, int cache_frames) -> ()");
}

TORCH_LIBRARY_IMPL(monarchrt, CPU, m) {
  m.impl("monarch_attention", &attention_op<forward_cpu>);
  m.impl("monarch_attention_lse", &forward_op<forward_cpu, true>);
  m.impl("monarch_attention_backward", &backward_cpu);
  m.impl("kv_cache_write_", &kv_cache_write_cpu);
}

#ifdef MONARCHRT_WITH_CUDA
TORCH_LIBRARY_IMPL(monarchrt, CUDA, m) {
  m.impl("monarch_attention", &attention_op<forward_cuda>);
  m.impl("monarch_attention_lse", &forward_op<forward_cuda, true>);
  m.impl("monarch_attention_backward", &backward_cuda);
  m.impl("kv_cache_write_", &kv_cache_write_cuda);
}
#endif

// An importable, empty Python module: importing monarchrt._C loads the library, whose static
// initializers register the ops above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "monarchrt ops (torch.ops.monarchrt)", -1, nullptr,
                               nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
