// Argument checks of the backward entry points (every implementation: the fp64 reference, the
// fast CPU path), so that all of them accept and reject exactly the same calls with the same
// messages. See make_backward_plan() in plan.h.
#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "plan.h"

namespace monarchrt {

namespace {

std::string str(int64_t v) { return std::to_string(v); }

Status check_shape(const TensorView& ref, const char* ref_name, const TensorView& t,
                   const char* name) {
  for (int d = 0; d < 4; ++d) {
    if (t.shape[d] != ref.shape[d]) {
      return Status::invalid(std::string(name) + ": size (dim " + str(d) + ") = " + str(t.shape[d]) +
                             " must equal " + ref_name + "'s " + str(ref.shape[d]) + " (" +
                             ref_name + " " + ref.shape_string() + ", " + name + " " +
                             t.shape_string() + ")");
    }
  }
  return Status();
}

// a * b and a + b, saturating at UINT64_MAX (a view that large cannot be real anyway).
uint64_t sat_mul(uint64_t a, uint64_t b) { return b != 0 && a > UINT64_MAX / b ? UINT64_MAX : a * b; }
uint64_t sat_add(uint64_t a, uint64_t b) { return a > UINT64_MAX - b ? UINT64_MAX : a + b; }

// Byte range [lo, hi) covered by a validated view (positive sizes, non-negative strides).
std::pair<uint64_t, uint64_t> byte_extent(const TensorView& t) {
  uint64_t last = 0;
  for (int d = 0; d < 4; ++d) {
    last = sat_add(last, sat_mul(static_cast<uint64_t>(t.stride[d]), static_cast<uint64_t>(t.shape[d] - 1)));
  }
  const uint64_t lo = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(t.data));
  const uint64_t size = static_cast<uint64_t>(dtype_size(t.dtype));
  return {lo, sat_add(lo, sat_mul(sat_add(last, 1), size))};
}

// Whether two validated output views share a byte. Disjoint extents answer at once; otherwise
// (e.g. dq, dk, dv interleaved in one packed buffer) every element is compared: the start
// addresses of both views, sorted, each checked against the furthest end seen so far. A view
// never overlaps itself (validate_view), so any hit is between the two.
bool views_overlap(const TensorView& a, const TensorView& b) {
  const auto ea = byte_extent(a), eb = byte_extent(b);
  if (ea.second <= eb.first || eb.second <= ea.first) return false;
  std::vector<std::pair<uintptr_t, uintptr_t>> elems;  // (start, end)
  for (const TensorView* t : {&a, &b}) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(t->data);
    const uintptr_t size = static_cast<uintptr_t>(dtype_size(t->dtype));
    for (int64_t i0 = 0; i0 < t->shape[0]; ++i0)
      for (int64_t i1 = 0; i1 < t->shape[1]; ++i1)
        for (int64_t i2 = 0; i2 < t->shape[2]; ++i2)
          for (int64_t i3 = 0; i3 < t->shape[3]; ++i3) {
            const uintptr_t start = base + static_cast<uintptr_t>(t->offset(i0, i1, i2, i3)) * size;
            elems.emplace_back(start, start + size);
          }
  }
  std::sort(elems.begin(), elems.end());
  uintptr_t end = 0;
  for (size_t e = 0; e < elems.size(); ++e) {
    if (elems[e].first < end) return true;
    end = std::max(end, elems[e].second);
  }
  return false;
}

}  // namespace

Status make_backward_plan(const TensorView& q, const TensorView& k, const TensorView& v,
                          const TensorView& dout, const TensorView& dq, const TensorView& dk,
                          const TensorView& dv, const AttentionParams& params, bool monarch,
                          Device required_device, AttentionPlan* plan) {
  MONARCHRT_RETURN_IF_ERROR(validate_view(q, "q", false));
  MONARCHRT_RETURN_IF_ERROR(validate_view(k, "k", false));
  MONARCHRT_RETURN_IF_ERROR(validate_view(v, "v", false));
  MONARCHRT_RETURN_IF_ERROR(validate_view(dout, "dout", false));
  MONARCHRT_RETURN_IF_ERROR(validate_view(dq, "dq", true));
  MONARCHRT_RETURN_IF_ERROR(validate_view(dk, "dk", true));
  MONARCHRT_RETURN_IF_ERROR(validate_view(dv, "dv", true));
  MONARCHRT_RETURN_IF_ERROR(check_shape(q, "q", dout, "dout"));
  MONARCHRT_RETURN_IF_ERROR(check_shape(q, "q", dq, "dq"));
  MONARCHRT_RETURN_IF_ERROR(check_shape(k, "k", dk, "dk"));
  MONARCHRT_RETURN_IF_ERROR(check_shape(k, "k", dv, "dv"));
  const std::pair<const TensorView*, const char*> others[6] = {
      {&k, "k"}, {&v, "v"}, {&dout, "dout"}, {&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}};
  for (const auto& g : others) {
    if (g.first->device != q.device) {
      return Status::invalid(std::string(g.second) + ": tensor is on " + device_name(g.first->device) +
                             " but q is on " + device_name(q.device) +
                             ": q, k, v, dout, dq, dk, dv must all be on one device");
    }
  }
  MONARCHRT_RETURN_IF_ERROR(make_plan(q, k, v, dq, params, monarch, required_device, plan));
  const std::pair<const TensorView*, const char*> outs[3] = {{&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}};
  for (int a = 0; a < 3; ++a) {
    for (int b = a + 1; b < 3; ++b) {
      if (views_overlap(*outs[a].first, *outs[b].first)) {
        return Status::invalid(std::string(outs[b].second) + ": overlaps " + outs[a].second +
                               " (the gradient outputs dq, dk, dv must not share memory)");
      }
    }
  }
  if (monarch && params.num_iters != 1) {
    return Status::unsupported("num_iters = " + str(params.num_iters) +
                               ": the Monarch backward pass supports num_iters = 1 only");
  }
  return Status();
}

}  // namespace monarchrt
