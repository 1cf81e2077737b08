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

#include "checks.h"

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

// Argument checks of the entry points: shapes, dtypes and devices. Index values are
// checked where the kernels read them: on the host by the CPU kernels, by device-side
// asserts in the CUDA kernels (no synchronisation).

// Floating-point coefficients (nnz) with two int64 index vectors of the same length.
inline void check_indices(const char* op, const at::Tensor& coef, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(coef.dim() == 1 && a.dim() == 1 && b.dim() == 1 && coef.is_floating_point(), op,
              ": 1-D floating-point coefficients and 1-D indices expected");
  TORCH_CHECK(a.numel() == coef.numel() && b.numel() == coef.numel(), op, ": ", coef.numel(),
              " coefficients but ", a.numel(), " and ", b.numel(), " indices");
  TORCH_CHECK(a.scalar_type() == at::kLong && b.scalar_type() == at::kLong, op, ": int64 indices expected");
  check_devices(op, coef, {a, b});
}

// xf: the complex half spectra (T, n/2+1) of T real signals of length n >= 1.
inline void check_half_spectrum(const char* op, const char* name, const at::Tensor& xf, int64_t n) {
  TORCH_CHECK(n >= 1 && xf.dim() == 2 && xf.is_complex() && xf.size(1) == n / 2 + 1, op, ": ", name,
              " must be complex (T, n/2+1) for n=", n, ", got ", xf.scalar_type(), " ", xf.sizes());
}

inline void check_spectrum_rows_args(const at::Tensor& coef, const at::Tensor& rows, const at::Tensor& cols,
                                     int64_t m, int64_t n) {
  check_indices("fourierft_spectrum_rows", coef, rows, cols);
  TORCH_CHECK(m >= 0 && n >= 1, "fourierft_spectrum_rows: sizes m >= 0, n >= 1 expected, got ", m, ", ", n);
}

inline void check_mix_args(const at::Tensor& xf, const at::Tensor& coef, const at::Tensor& gather,
                           const at::Tensor& scatter, int64_t n_in, int64_t n_out) {
  check_indices("fourierft_mix", coef, gather, scatter);
  check_half_spectrum("fourierft_mix", "xf", xf, n_in);
  TORCH_CHECK(n_out >= 1, "fourierft_mix: n_out >= 1 expected, got ", n_out);
  check_devices("fourierft_mix", xf, {coef});
}

inline void check_coef_grad_args(const at::Tensor& xf, const at::Tensor& yf, const at::Tensor& x_idx,
                                 const at::Tensor& y_idx, int64_t n_x, int64_t n_y) {
  TORCH_CHECK(x_idx.dim() == 1 && x_idx.sizes() == y_idx.sizes() && x_idx.scalar_type() == at::kLong &&
                  y_idx.scalar_type() == at::kLong,
              "fourierft_coef_grad: two int64 index vectors of the same length expected");
  check_half_spectrum("fourierft_coef_grad", "xf", xf, n_x);
  check_half_spectrum("fourierft_coef_grad", "yf", yf, n_y);
  TORCH_CHECK(xf.size(0) == yf.size(0), "fourierft_coef_grad: ", xf.size(0), " and ", yf.size(0), " tokens");
  check_devices("fourierft_coef_grad", xf, {yf, x_idx, y_idx});
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
    check_devices("fourierft_real_mirror", ft, {args.base});
  }
  const auto dtype = args.base.defined() ? args.base.scalar_type() : c10::toRealValueType(ft.scalar_type());
  args.out = at::empty({m, n}, ft.options().dtype(dtype));
  return args;
}

}  // namespace spectral_kernels
