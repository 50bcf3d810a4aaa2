// Running cross-derivative average L <- a L + b B (docs/design.md §2.4), one pass.
#include "cpu/kernels.h"
#include "cpu/simd.h"
#include "checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace nhgd::cpu {

void running_average_(const at::Tensor& L, const at::Tensor& B, double a, double b) {
  const at::Tensor Bc = B.contiguous();
  check_finite("running_average_", "B", Bc);
  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "running_average_", [&] {
    scalar_t* l = L.data_ptr<scalar_t>();
    const scalar_t* x = Bc.data_ptr<scalar_t>();
    const scalar_t ca = static_cast<scalar_t>(a), cb = static_cast<scalar_t>(b);
    using V = Vec<scalar_t>;
    constexpr int N = V::kLanes;
    const auto va = V::broadcast(ca), vb = V::broadcast(cb);
    at::parallel_for(0, L.numel(), 1 << 14, [&](int64_t i0, int64_t i1) {
      int64_t i = i0;
      for (; i + N <= i1; i += N) V::store(l + i, va * V::load(l + i) + vb * V::load(x + i));
      for (; i < i1; ++i) l[i] = ca * l[i] + cb * x[i];
    });
  });
}

}  // namespace nhgd::cpu
