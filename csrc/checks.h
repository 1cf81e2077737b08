// Argument checks shared by every entry point of the CPU and CUDA kernels.
#pragma once
#include <torch/types.h>

#include <initializer_list>

namespace spectral_kernels {

// Every tensor of `others` on the device of `first`: a kernel of one device would
// otherwise address another's memory (the dispatcher picks the CUDA kernel as soon as
// one argument is a CUDA tensor).
inline void check_devices(const char* op, const at::Tensor& first, std::initializer_list<at::Tensor> others) {
  for (const auto& t : others)
    TORCH_CHECK(t.device() == first.device(), op, ": tensors on different devices (", first.device(), ", ",
                t.device(), ")");
}

}  // namespace spectral_kernels
