// Index folding and argument checks shared by the CPU and CUDA FourierFT kernels.
//
// A real signal of length n is stored as its rfft half spectrum h[0..n/2]. Its
// "plus" transform X^[g] = sum_q x[q] exp(+2 pi i g q / n) at any bin g in [0, n)
// is conj(h[g]) for 2g <= n and h[n - g] otherwise.
// Adding w at bin b of a spectrum and keeping it Hermitian (so that a C2R
// transform returns Re of the complex one) adds w/2 at b and conj(w)/2 at -b;
// only the halves that land in [0, n/2] are stored.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <optional>

#if defined(__CUDACC__)
#define SK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SK_HOST_DEVICE inline
#endif

namespace spectral_kernels {

template <typename T>
SK_HOST_DEVICE void plus_transform_at(const T* half, int64_t g, int64_t n, T& re, T& im) {
  if (2 * g <= n) {
    re = half[2 * g];
    im = -half[2 * g + 1];
  } else {
    re = half[2 * (n - g)];
    im = half[2 * (n - g) + 1];
  }
}

// Bins of the stored half that receive w/2 (first) and conj(w)/2 (second); -1 when
// that half falls outside [0, n/2].
SK_HOST_DEVICE void hermitian_bins(int64_t b, int64_t n, int64_t& first, int64_t& second) {
  const int64_t mirror = (n - b) % n;
  first = (2 * b <= n) ? b : -1;
  second = (2 * mirror <= n) ? mirror : -1;
}

// fourierft_real_mirror's arguments: ft (n/2+1, m) complex64 or complex128 and an
// optional floating-point base (m, n). Returns base made contiguous (undefined
// without one) and the output, of base's dtype or else ft's real type.
struct RealMirrorArgs {
  at::Tensor base, out;
};

inline RealMirrorArgs real_mirror_args(const at::Tensor& ft, const std::optional<at::Tensor>& base_in, int64_t n) {
  TORCH_CHECK(ft.dim() == 2 && ft.size(0) == n / 2 + 1 &&
                  (ft.scalar_type() == at::kComplexFloat || ft.scalar_type() == at::kComplexDouble),
              "fourierft_real_mirror: ft must be complex64/128 (n/2+1, m), got ", ft.scalar_type(), " ", ft.sizes(),
              " for n=", n);
  const int64_t m = ft.size(1);
  RealMirrorArgs args;
  if (base_in.has_value()) {
    args.base = base_in->contiguous();
    TORCH_CHECK(args.base.sizes() == at::IntArrayRef({m, n}) && args.base.is_floating_point(),
                "fourierft_real_mirror: base must be a floating-point (", m, ", ", n, ") tensor, got ",
                args.base.scalar_type(), " ", args.base.sizes());
    TORCH_CHECK(args.base.device() == ft.device(), "fourierft_real_mirror: base on ", args.base.device(),
                ", ft on ", ft.device());
  }
  const auto dtype = args.base.defined() ? args.base.scalar_type() : c10::toRealValueType(ft.scalar_type());
  args.out = at::empty({m, n}, ft.options().dtype(dtype));
  return args;
}

}  // namespace spectral_kernels
