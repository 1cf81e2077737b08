// Argument checks shared by the CPU and CUDA OFT kernels (contracts in ops.h).
#pragma once
#include <torch/types.h>

#include <utility>

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

}  // namespace spectral_kernels
