// Argument checks shared by the CPU and CUDA OFT kernels (contracts in ops.h).
#pragma once
#include <torch/types.h>

#include <utility>
#include <vector>

#include "checks.h"

namespace spectral_kernels {

// (blocks, b) of x (tokens, features) for rotation blocks rot (n, b, b), n = blocks or 1.
inline std::pair<int64_t, int64_t> check_blocks(const at::Tensor& x, const at::Tensor& rot, const char* op) {
  TORCH_CHECK(rot.dim() == 3 && rot.size(1) == rot.size(2) && rot.is_floating_point(), op,
              ": rotation blocks must be floating-point (n, b, b), got ", rot.scalar_type(), " ", rot.sizes());
  const int64_t b = rot.size(1);
  TORCH_CHECK(x.dim() == 2 && x.is_floating_point(), op, ": x must be floating-point (tokens, features), got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(b >= 1 && x.size(1) % b == 0, op, ": block size ", b, " does not divide ", x.size(1), " features");
  const int64_t blocks = x.size(1) / b;
  TORCH_CHECK(rot.size(0) == 1 || rot.size(0) == blocks, op, ": ", rot.size(0), " rotation blocks for ", blocks,
              " blocks");
  check_devices(op, x, {rot});
  return {blocks, b};
}

// oft_rotate_backward_: g, overwritten with dx, of x's shape, dtype and device, contiguous.
inline std::pair<int64_t, int64_t> check_rotate_backward(const at::Tensor& g, const at::Tensor& x,
                                                         const at::Tensor& rot) {
  const auto blocks_b = check_blocks(x, rot, "oft_rotate_backward_");
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(), "oft_rotate_backward_: g ", g.sizes(),
              " ", g.scalar_type(), " and x ", x.sizes(), " ", x.scalar_type(), " differ");
  TORCH_CHECK(g.is_contiguous(), "oft_rotate_backward_: g must be contiguous (it is overwritten with dx)");
  check_devices("oft_rotate_backward_", x, {g});
  return blocks_b;
}

// oft_neumann(_backward): the coefficients c[0..last] of a call with blocks of size b (at most max_block) after
// checking the parameters' shape (n, b(b-1)/2) and the gradient's (n, b, b).
inline std::vector<double> check_neumann(const at::Tensor& params, int64_t b, const at::Tensor* grad,
                                         at::ArrayRef<double> coef, int64_t max_block) {
  TORCH_CHECK(b >= 1 && b <= max_block, "oft_neumann: block size ", b, " out of range [1, ", max_block, "] on ",
              params.device().type());
  TORCH_CHECK(params.dim() == 2 && params.size(1) == b * (b - 1) / 2, "oft_neumann: parameters (n, ",
              b * (b - 1) / 2, ") expected for block size ", b, ", got ", params.sizes());
  TORCH_CHECK(params.is_floating_point(), "oft_neumann: floating-point parameters expected");
  TORCH_CHECK(!coef.empty() && coef[0] == 1.0, "oft_neumann: coefficients must start with 1 (the identity)");
  if (grad) {
    TORCH_CHECK(grad->sizes() == at::IntArrayRef({params.size(0), b, b}) &&
                    grad->scalar_type() == params.scalar_type(),
                "oft_neumann_backward: gradient (", params.size(0), ", ", b, ", ", b, ") of the parameters' dtype expected");
    check_devices("oft_neumann_backward", params, {*grad});
  }
  return coef.vec();
}

}  // namespace spectral_kernels
