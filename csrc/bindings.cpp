// Python module of the native library. Kernels register themselves with the
// dispatcher (TORCH_LIBRARY_IMPL in each source); this module only reports what
// was compiled in.
#include <torch/extension.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "spectral_kernels native kernels (CPU always, CUDA when built with it)";
#ifdef SPECTRAL_KERNELS_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
}
