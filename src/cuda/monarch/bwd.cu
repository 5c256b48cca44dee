// Host side of the CUDA Monarch backward (kernels and design: bwd.cuh): checks, workspace
// layout and the four launches.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <type_traits>

#include "../../core/plan.h"
#include "../common/host.h"
#include "bwd.cuh"
#include "monarchrt/cuda.h"

namespace monarchrt {
namespace cuda_detail {
namespace {

size_t round16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// Workspace layout: aL and Y planes (rows x D, input dtype), then per row cL, lse1 and D1
// (floats), then per query dq's stage-2 part (D floats). Every part starts 16-byte aligned.
struct BwdLayout {
  size_t plane = 0, rows_f = 0, total = 0;
};
BwdLayout bwd_layout(const AttentionPlan& plan, DType dtype) {
  BwdLayout l;
  const size_t rows = size_t(workspace_rows(plan)), queries = size_t(plan.B * plan.H * plan.Sq);
  l.plane = rows * size_t(plan.D) * size_t(dtype_size(dtype));
  l.rows_f = round16(rows * sizeof(float));
  l.total = 2 * l.plane + 3 * l.rows_f + queries * size_t(plan.D) * sizeof(float);
  return l;
}

const char* kNames[7] = {"q", "k", "v", "dout", "dq", "dk", "dv"};

Status check_backward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& dout,
                      const TensorView& dq, const TensorView& dk, const TensorView& dv,
                      const AttentionParams& params, AttentionPlan* plan) {
  MONARCHRT_RETURN_IF_ERROR(make_backward_plan(q, k, v, dout, dq, dk, dv, params, true, Device::kCUDA, plan));
  const TensorView* views[7] = {&q, &k, &v, &dout, &dq, &dk, &dv};
  if (q.dtype != DType::kBF16 && q.dtype != DType::kF16) {
    return Status::unsupported(std::string("q: dtype ") + dtype_name(q.dtype) +
                               " is not supported by the CUDA backward (bfloat16 or float16)");
  }
  for (int i = 1; i < 7; ++i) {
    if (views[i]->dtype != q.dtype) {
      return Status::unsupported(std::string(kNames[i]) + ": dtype must equal q's " + dtype_name(q.dtype) +
                                 " on the CUDA path, got " + dtype_name(views[i]->dtype));
    }
  }
  if (plan->D != 64 && plan->D != 128) {
    return Status::unsupported("q: head dim " + std::to_string(plan->D) +
                               " is not supported by the CUDA backward (64 or 128)");
  }
  int device = 0, optin = 0;
  MONARCHRT_CUDA_CHECK(cudaGetDevice(&device));
  MONARCHRT_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  // Head dim 128 with rows wider than 64 keys needs the wide configuration's shared memory.
  const bool wide_ok = size_t(optin) >= std::max(Dq1Config<__nv_bfloat16, 128, 128>::kSmem,
                                                 DkvConfig<__nv_bfloat16, 128, 128>::kSmem);
  const int b2_max = plan->D == 128 && !wide_ok ? 64 : 128;
  if (plan->qg.b2 > b2_max) {
    return Status::unsupported("layout: tile width b2 = " + std::to_string(plan->qg.b2) + " exceeds the CUDA "
                               "backward's " + std::to_string(b2_max) + " at head dim " + std::to_string(plan->D) +
                               " on this device");
  }
  if (plan->qg.b1 > 256) {
    return Status::unsupported("layout: tile height b1 = " + std::to_string(plan->qg.b1) +
                               " exceeds the CUDA path's 256");
  }
  const size_t stage2 = plan->D == 128 ? Bwd2Config<__nv_bfloat16, 128>::smem(int(plan->qg.b1))
                                       : Bwd2Config<__nv_bfloat16, 64>::smem(int(plan->qg.b1));
  if (size_t(optin) < stage2) {
    return Status::unsupported("layout: tile height b1 = " + std::to_string(plan->qg.b1) + " needs " +
                               std::to_string(stage2) + " bytes of shared memory per block in the CUDA backward; "
                               "the device has " + std::to_string(optin));
  }
  for (int i = 0; i < 7; ++i) {
    const TensorView& t = *views[i];
    if (t.stride[3] != 1) {
      return Status::unsupported(std::string(kNames[i]) + ": the head dim must be contiguous (stride 1)");
    }
    if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0 || t.stride[0] % 8 != 0 || t.stride[1] % 8 != 0 ||
        t.stride[2] % 8 != 0) {
      return Status::unsupported(std::string(kNames[i]) +
                                 ": data and strides must be 16-byte aligned (multiples of 8 elements)");
    }
  }
  if (plan->qg.tiles > 65535 || plan->kg.tiles > 65535 || plan->B * plan->H > 65535) {
    return Status::unsupported("q: too many tiles or batch*heads for one launch");
  }
  const size_t need = plan->D == 128 ? DkvConfig<__nv_bfloat16, 128>::kSmem : DkvConfig<__nv_bfloat16, 64>::kSmem;
  if (size_t(optin) < need) {
    return Status::unsupported("device: " + std::to_string(optin) +
                               " bytes of shared memory per block are too few for the CUDA backward");
  }
  return Status();
}

template <typename T, int D>
Status prepare_backward_typed() {
  static std::atomic<uint64_t> d0{0}, d1{0}, d2{0}, d3{0}, d4{0}, d5{0}, d6{0}, d7{0};
  constexpr int kNarrow = D == 128 ? 64 : 128;
  int device = 0, optin = 0;
  MONARCHRT_CUDA_CHECK(cudaGetDevice(&device));
  MONARCHRT_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  // The stage-2 kernel for up to 64, 128 and 256 query rows (as much shared memory as the device
  // has: taller tiles than it serves are rejected by check_backward).
  using C2 = Bwd2Config<T, D>;
  MONARCHRT_RETURN_IF_ERROR(
      ensure_smem(monarch_bwd_stage2_kernel<T, D, 4, 2>, std::min<size_t>(C2::smem(32), optin), d0));
  MONARCHRT_RETURN_IF_ERROR(
      ensure_smem(monarch_bwd_stage2_kernel<T, D, 4, 1>, std::min<size_t>(C2::smem(64), optin), d1));
  MONARCHRT_RETURN_IF_ERROR(
      ensure_smem(monarch_bwd_stage2_kernel<T, D, 8, 1>, std::min<size_t>(C2::smem(128), optin), d2));
  MONARCHRT_RETURN_IF_ERROR(
      ensure_smem(monarch_bwd_stage2_kernel<T, D, 16, 1>, std::min<size_t>(C2::smem(256), optin), d7));
  MONARCHRT_RETURN_IF_ERROR(ensure_smem(monarch_bwd_dq1_kernel<T, D, kNarrow>, Dq1Config<T, D, kNarrow>::kSmem, d3));
  MONARCHRT_RETURN_IF_ERROR(ensure_smem(monarch_bwd_dkv_kernel<T, D, kNarrow>, DkvConfig<T, D, kNarrow>::kSmem, d4));
  if (use_wgmma()) {
    static std::atomic<uint64_t> d8{0}, d9{0}, d10{0};
    MONARCHRT_RETURN_IF_ERROR(ensure_smem(monarch_bwd_stage2_kernel<T, D, 4, 2, true>, C2::smem(32, true), d10));
    MONARCHRT_RETURN_IF_ERROR(ensure_smem(monarch_bwd_dq_wg_kernel<T, D>, DqWgConfig<T, D>::kSmem, d8));
    MONARCHRT_RETURN_IF_ERROR(ensure_smem(monarch_bwd_dkv_wg_kernel<T, D>, DkvWgConfig<T, D>::kSmem, d9));
  }
  if (D == 128) {  // the wide configuration, where the device has the shared memory for it
    if (size_t(optin) >= Dq1Config<T, D, 128>::kSmem && size_t(optin) >= DkvConfig<T, D, 128>::kSmem) {
      MONARCHRT_RETURN_IF_ERROR(ensure_smem(monarch_bwd_dq1_kernel<T, D, 128>, Dq1Config<T, D, 128>::kSmem, d5));
      MONARCHRT_RETURN_IF_ERROR(ensure_smem(monarch_bwd_dkv_kernel<T, D, 128>, DkvConfig<T, D, 128>::kSmem, d6));
    }
  }
  return Status();
}

template <typename T, int D>
Status launch_backward(const MonarchBwdParams& bp, int B, bool zero_dkv, int64_t k_rows, cudaStream_t s) {
  const MonarchFwdParams& p = bp.f;
  MONARCHRT_RETURN_IF_ERROR((prepare_backward_typed<T, D>()));
  const DType dtype = std::is_same<T, __half>::value ? DType::kF16 : DType::kBF16;
  MONARCHRT_RETURN_IF_ERROR(launch_stage1(p, B, dtype, D, s));
  const int BH = B * p.H;
  const dim3 grid2(p.b2, p.A, BH);
  // One warp per 16 query rows, at least four (the others only help with daL / dY); with 17 to
  // 32 rows, two warps per 16 rows, each taking half of every chunk's virtual keys, and on Hopper
  // the workspace copied by TMA.
  const int warps2 = std::max(4, (p.b1 + 15) / 16);
  const size_t smem2 = Bwd2Config<T, D>::smem(p.b1);
  Bwd2Tma tma2{};
  if (p.b1 > 16 && p.b1 <= 32 && use_wgmma() &&
      plane_maps(p, B, std::is_same<T, __nv_bfloat16>::value, D, p.b1, &tma2.al, &tma2.y)) {
    monarch_bwd_stage2_kernel<T, D, 4, 2, true><<<grid2, 128, Bwd2Config<T, D>::smem(p.b1, true), s>>>(bp, tma2);
  } else if (p.b1 > 16 && p.b1 <= 32) {
    monarch_bwd_stage2_kernel<T, D, 4, 2><<<grid2, 128, smem2, s>>>(bp, tma2);
  } else if (warps2 <= 4) {
    monarch_bwd_stage2_kernel<T, D, 4, 1><<<grid2, 32 * warps2, smem2, s>>>(bp, tma2);
  } else if (warps2 <= 8) {
    monarch_bwd_stage2_kernel<T, D, 8, 1><<<grid2, 32 * warps2, smem2, s>>>(bp, tma2);
  } else {
    monarch_bwd_stage2_kernel<T, D, 16, 1><<<grid2, 32 * warps2, smem2, s>>>(bp, tma2);
  }
  MONARCHRT_CUDA_CHECK(cudaGetLastError());
  if (zero_dkv) {
    zero_rows_kernel<D><<<1024, 256, 0, s>>>(bp.dk, bp.dk_stride[0], bp.dk_stride[1], bp.dk_stride[2], B, k_rows,
                                             p.H, int(sizeof(T)));
    zero_rows_kernel<D><<<1024, 256, 0, s>>>(bp.dv, bp.dv_stride[0], bp.dv_stride[1], bp.dv_stride[2], B, k_rows,
                                             p.H, int(sizeof(T)));
    MONARCHRT_CUDA_CHECK(cudaGetLastError());
  }
  const int warps = (p.b2 + 15) / 16;
  constexpr int kNarrow = D == 128 ? 64 : 128;
  Stage1Tma tma{};
  CUtensorMap qmap{};
  const int64_t q_shape[4] = {B, int64_t(p.A) * p.b1 * p.b2, p.H, D};
  // Hopper, rows of up to 64 keys: the maps of the stage-1 recompute, and q in the same row tiles
  if (stage1_maps(p, B, dtype, D, &tma) &&
      encode_row_tiles(&qmap, p.q, dtype == DType::kBF16, q_shape, p.q_stride, p.b2).ok()) {
    // dK / dV first: it forms D1 and leaves s dz in the workspace for the dq kernel
    monarch_bwd_dkv_wg_kernel<T, D><<<dim3(p.b1, p.F, BH), 128, DkvWgConfig<T, D>::kSmem, s>>>(bp, tma, qmap);
    MONARCHRT_CUDA_CHECK(cudaGetLastError());
    monarch_bwd_dq_wg_kernel<T, D><<<dim3(p.A, p.b1, BH), 128, DqWgConfig<T, D>::kSmem, s>>>(bp, tma);
  } else if (p.b2 <= kNarrow) {
    monarch_bwd_dq1_kernel<T, D, kNarrow><<<dim3(p.b1, p.A, BH), 32 * warps, Dq1Config<T, D, kNarrow>::kSmem, s>>>(bp);
    MONARCHRT_CUDA_CHECK(cudaGetLastError());
    monarch_bwd_dkv_kernel<T, D, kNarrow><<<dim3(p.b1, p.F, BH), 32 * warps, DkvConfig<T, D, kNarrow>::kSmem, s>>>(bp);
  } else {
    monarch_bwd_dq1_kernel<T, D, 128><<<dim3(p.b1, p.A, BH), 32 * warps, Dq1Config<T, D, 128>::kSmem, s>>>(bp);
    MONARCHRT_CUDA_CHECK(cudaGetLastError());
    monarch_bwd_dkv_kernel<T, D, 128><<<dim3(p.b1, p.F, BH), 32 * warps, DkvConfig<T, D, 128>::kSmem, s>>>(bp);
  }
  MONARCHRT_CUDA_CHECK(cudaGetLastError());
  return Status();
}

}  // namespace

Status prepare_backward() {
  MONARCHRT_RETURN_IF_ERROR((prepare_backward_typed<__nv_bfloat16, 128>()));
  MONARCHRT_RETURN_IF_ERROR((prepare_backward_typed<__nv_bfloat16, 64>()));
  MONARCHRT_RETURN_IF_ERROR((prepare_backward_typed<__half, 128>()));
  return prepare_backward_typed<__half, 64>();
}

}  // namespace cuda_detail

namespace cuda {

size_t backward_workspace_size(const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView& dout, const TensorView& dq, const TensorView& dk,
                               const TensorView& dv, const AttentionParams& params) {
  AttentionPlan plan;
  if (!cuda_detail::check_backward(q, k, v, dout, dq, dk, dv, params, &plan).ok()) return 0;
  return cuda_detail::bwd_layout(plan, q.dtype).total;
}

namespace {

// out / lse: the forward's output and log-sum-exp (out == nullptr: the stage-2 kernel forms both itself).
Status backward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* out,
                const float* lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                const TensorView& dv, const AttentionParams& params, void* workspace, size_t workspace_bytes,
                void* stream) {
  using namespace cuda_detail;
  AttentionPlan plan;
  MONARCHRT_RETURN_IF_ERROR(check_backward(q, k, v, dout, dq, dk, dv, params, &plan));
  if (out != nullptr) {
    MONARCHRT_RETURN_IF_ERROR(validate_view(*out, "out", false));
    for (int i = 0; i < 4; ++i) {
      if (out->shape[i] != q.shape[i]) {
        return Status::invalid("out: shape " + out->shape_string() + " must equal q's " + q.shape_string());
      }
    }
    if (out->dtype != q.dtype || out->device != Device::kCUDA) {
      return Status::invalid(std::string("out: must be a CUDA tensor of q's dtype ") + dtype_name(q.dtype));
    }
    if (out->stride[3] != 1 || reinterpret_cast<uintptr_t>(out->data) % 16 != 0) {
      return Status::unsupported("out: the head dim must be contiguous and the data 16-byte aligned");
    }
    if (lse == nullptr || reinterpret_cast<uintptr_t>(lse) % alignof(float) != 0) {
      return Status::invalid("lse: must point to B * H * q.tokens() floats (4-byte aligned device memory)");
    }
  }
  const BwdLayout layout = bwd_layout(plan, q.dtype);
  if (workspace == nullptr || workspace_bytes < layout.total) {
    return Status::invalid("workspace: " + std::to_string(workspace_bytes) + " bytes given, the backward needs "
                           "backward_workspace_size() = " + std::to_string(layout.total));
  }
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0) return Status::invalid("workspace: must be 16-byte aligned");
  MonarchBwdParams bp{};
  bp.f = make_fwd_params(q, k, v, dq, params, plan);
  char* ws = static_cast<char*>(workspace);
  bp.f.ws_al = ws;
  bp.f.ws_y = ws + layout.plane;
  ws += 2 * layout.plane;
  bp.f.ws_cl = reinterpret_cast<float*>(ws);
  bp.f.ws_lse1 = reinterpret_cast<float*>(ws + layout.rows_f);
  bp.ws_d1 = reinterpret_cast<float*>(ws + 2 * layout.rows_f);
  ws += 3 * layout.rows_f;
  bp.dq_acc = reinterpret_cast<float*>(ws);
  bp.dout = dout.data;
  bp.dq = dq.data;
  bp.dk = dk.data;
  bp.dv = dv.data;
  for (int i = 0; i < 3; ++i) {
    bp.do_stride[i] = dout.stride[i];
    bp.dq_stride[i] = dq.stride[i];
    bp.dk_stride[i] = dk.stride[i];
    bp.dv_stride[i] = dv.stride[i];
  }
  bp.scale = float(plan.scale);
  if (out != nullptr) {
    bp.fwd_out = out->data;
    for (int i = 0; i < 3; ++i) bp.fo_stride[i] = out->stride[i];
    bp.lse_in = lse;
  }
  // Keys nobody attends (outside the KV window, ring slots of no attended frame) get zero.
  const bool zero_dkv = params.kv_cache;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int B = int(plan.B);
  if (q.dtype == DType::kBF16) {
    return plan.D == 128 ? launch_backward<__nv_bfloat16, 128>(bp, B, zero_dkv, k.tokens(), s)
                         : launch_backward<__nv_bfloat16, 64>(bp, B, zero_dkv, k.tokens(), s);
  }
  return plan.D == 128 ? launch_backward<__half, 128>(bp, B, zero_dkv, k.tokens(), s)
                       : launch_backward<__half, 64>(bp, B, zero_dkv, k.tokens(), s);
}

}  // namespace

Status monarch_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& dout, const TensorView& dq, const TensorView& dk,
                                  const TensorView& dv, const AttentionParams& params, void* workspace,
                                  size_t workspace_bytes, void* stream) {
  return backward(q, k, v, nullptr, nullptr, dout, dq, dk, dv, params, workspace, workspace_bytes, stream);
}

Status monarch_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& out, const float* lse, const TensorView& dout,
                                  const TensorView& dq, const TensorView& dk, const TensorView& dv,
                                  const AttentionParams& params, void* workspace, size_t workspace_bytes,
                                  void* stream) {
  return backward(q, k, v, &out, lse, dout, dq, dk, dv, params, workspace, workspace_bytes, stream);
}

}  // namespace cuda
}  // namespace monarchrt
