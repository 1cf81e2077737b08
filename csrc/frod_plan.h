// Argument checks shared by the CPU and CUDA FRoD kernels (contracts in ops.h).
#pragma once
#include <torch/types.h>

#include "checks.h"

namespace spectral_kernels {

// in: (features, tokens); plan: ptr (rows + 1) over the rows written, src and perm per
// entry. The plan's values are checked where the kernels read them: on the host by the
// CPU kernels, by device-side asserts in the CUDA kernels.
inline void check_frod_plan(const at::Tensor& in, const at::Tensor& coef, const at::Tensor& ptr, const at::Tensor& src,
                            const at::Tensor& perm, const char* name) {
  TORCH_CHECK(in.dim() == 2, name, ": activations must be (features, tokens), got ", in.sizes());
  TORCH_CHECK(ptr.dim() == 1 && ptr.size(0) >= 1 && ptr.scalar_type() == at::kLong, name,
              ": ptr must be a non-empty int64 vector");
  TORCH_CHECK(src.dim() == 1 && perm.sizes() == src.sizes() && src.scalar_type() == at::kLong &&
                  perm.scalar_type() == at::kLong,
              name, ": src and perm must be int64 vectors of the same length");
  TORCH_CHECK(coef.dim() == 1 && coef.is_floating_point(), name, ": coefficients must be a floating-point vector");
  check_devices(name, in, {coef, ptr, src, perm});
}

// mix_backward: g and z of the same dtype and token count, one plan row per row of z.
inline void check_frod_backward(const at::Tensor& g, const at::Tensor& z, const at::Tensor& coef, const at::Tensor& ptr,
                                const at::Tensor& src, const at::Tensor& perm) {
  check_frod_plan(z, coef, ptr, src, perm, "frod_mix_backward");
  TORCH_CHECK(g.dim() == 2 && g.size(1) == z.size(1) && g.scalar_type() == z.scalar_type(),
              "frod_mix_backward: g ", g.sizes(), " ", g.scalar_type(), " and z ", z.sizes(), " ", z.scalar_type(),
              " must be (features, tokens) of the same dtype and token count");
  check_devices("frod_mix_backward", z, {g});
  TORCH_CHECK(ptr.size(0) - 1 == z.size(0), "frod_mix_backward: ptr has ", ptr.size(0) - 1, " rows, z has ",
              z.size(0));
}

}  // namespace spectral_kernels
