// FourierFT CPU kernels (OpenMP). Complex tensors are read as interleaved
// (re, im) pairs; accumulation is in the real type of the complex input.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../fourierft_fold.h"
#include "../ops.h"

namespace spectral_kernels {
namespace {

void check_indices(const at::Tensor& coef, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(coef.dim() == 1 && a.dim() == 1 && b.dim() == 1, "fourierft: 1-D coefficients and indices expected");
  TORCH_CHECK(a.numel() == coef.numel() && b.numel() == coef.numel(), "fourierft: ", coef.numel(),
              " coefficients but ", a.numel(), " and ", b.numel(), " indices");
  TORCH_CHECK(a.scalar_type() == at::kLong && b.scalar_type() == at::kLong, "fourierft: int64 indices expected");
}

}  // namespace

at::Tensor fourierft_spectrum_to_half_cpu(const at::Tensor& coef_in, const at::Tensor& rows_in,
                                          const at::Tensor& cols_in, int64_t m, int64_t n, double scale) {
  check_indices(coef_in, rows_in, cols_in);
  const auto coef = coef_in.contiguous();
  const auto rows = rows_in.contiguous();
  const auto cols = cols_in.contiguous();
  const auto complex_type = c10::toComplexType(coef.scalar_type());
  auto half = at::zeros({m, n / 2 + 1}, coef.options().dtype(complex_type));
  const int64_t stride = n / 2 + 1;
  AT_DISPATCH_FLOATING_TYPES(coef.scalar_type(), "fourierft_spectrum_to_half_cpu", [&] {
    const scalar_t* c = coef.data_ptr<scalar_t>();
    const int64_t* r = rows.data_ptr<int64_t>();
    const int64_t* q = cols.data_ptr<int64_t>();
    scalar_t* h = reinterpret_cast<scalar_t*>(half.data_ptr());
    const scalar_t s = static_cast<scalar_t>(scale) / 2;
    // Sequential: n coefficients, and two of them may fold onto the same bin.
    for (int64_t k = 0; k < coef.numel(); ++k) {
      int64_t first, second;
      hermitian_bins(q[k], n, first, second);
      const scalar_t v = s * c[k];
      if (first >= 0) h[2 * (r[k] * stride + first)] += v;
      if (second >= 0) h[2 * (((m - r[k]) % m) * stride + second)] += v;
    }
  });
  return half;
}

at::Tensor fourierft_mix_cpu(const at::Tensor& xf_in, const at::Tensor& coef_in, const at::Tensor& gather_in,
                             const at::Tensor& scatter_in, int64_t n_in, int64_t n_out, double scale) {
  check_indices(coef_in, gather_in, scatter_in);
  TORCH_CHECK(xf_in.dim() == 2 && xf_in.size(1) == n_in / 2 + 1 && xf_in.is_complex(),
              "fourierft_mix: xf must be complex (T, n_in/2+1)");
  const auto xf = xf_in.contiguous();
  const auto coef = coef_in.contiguous().to(c10::toRealValueType(xf.scalar_type()));
  const auto gather = gather_in.contiguous();
  const auto scatter = scatter_in.contiguous();
  const int64_t tokens = xf.size(0), nnz = coef.numel();
  const int64_t in_stride = n_in / 2 + 1, out_stride = n_out / 2 + 1;
  auto out = at::zeros({tokens, out_stride}, xf.options());
  AT_DISPATCH_FLOATING_TYPES(coef.scalar_type(), "fourierft_mix_cpu", [&] {
    const scalar_t* c = coef.data_ptr<scalar_t>();
    const int64_t* g = gather.data_ptr<int64_t>();
    const int64_t* b = scatter.data_ptr<int64_t>();
    const scalar_t* x = reinterpret_cast<const scalar_t*>(xf.data_ptr());
    scalar_t* y = reinterpret_cast<scalar_t*>(out.data_ptr());
    const scalar_t s = static_cast<scalar_t>(scale) / 2;
    // Tokens are independent; each thread owns whole output rows.
    at::parallel_for(0, tokens, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* xt = x + 2 * t * in_stride;
        scalar_t* yt = y + 2 * t * out_stride;
        for (int64_t k = 0; k < nnz; ++k) {
          scalar_t re, im;
          plus_transform_at(xt, g[k], n_in, re, im);
          re *= s * c[k];
          im *= s * c[k];
          int64_t first, second;
          hermitian_bins(b[k], n_out, first, second);
          if (first >= 0) {
            yt[2 * first] += re;
            yt[2 * first + 1] += im;
          }
          if (second >= 0) {
            yt[2 * second] += re;
            yt[2 * second + 1] -= im;
          }
        }
      }
    });
  });
  return out;
}

at::Tensor fourierft_coef_grad_cpu(const at::Tensor& xf_in, const at::Tensor& yf_in, const at::Tensor& x_idx_in,
                                   const at::Tensor& y_idx_in, int64_t n_x, int64_t n_y, double scale) {
  TORCH_CHECK(x_idx_in.dim() == 1 && x_idx_in.sizes() == y_idx_in.sizes(), "fourierft_coef_grad: index shapes differ");
  TORCH_CHECK(xf_in.is_complex() && yf_in.is_complex() && xf_in.dim() == 2 && yf_in.dim() == 2 &&
                  xf_in.size(0) == yf_in.size(0) && xf_in.size(1) == n_x / 2 + 1 && yf_in.size(1) == n_y / 2 + 1,
              "fourierft_coef_grad: xf (T, n_x/2+1) and yf (T, n_y/2+1) complex expected");
  const auto xf = xf_in.contiguous();
  const auto yf = yf_in.contiguous().to(xf.scalar_type());
  const auto x_idx = x_idx_in.contiguous();
  const auto y_idx = y_idx_in.contiguous();
  const int64_t tokens = xf.size(0), nnz = x_idx.numel();
  const int64_t x_stride = n_x / 2 + 1, y_stride = n_y / 2 + 1;
  auto grad = at::empty({nnz}, xf.options().dtype(c10::toRealValueType(xf.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fourierft_coef_grad_cpu", [&] {
    const scalar_t* x = reinterpret_cast<const scalar_t*>(xf.data_ptr());
    const scalar_t* y = reinterpret_cast<const scalar_t*>(yf.data_ptr());
    const int64_t* a = x_idx.data_ptr<int64_t>();
    const int64_t* b = y_idx.data_ptr<int64_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    // Parallel over chunks of coefficients; each chunk sweeps all tokens, so a
    // token's two half spectra are read from cache by every coefficient of the chunk.
    at::parallel_for(0, nnz, 256, [&](int64_t k0, int64_t k1) {
      std::fill(out + k0, out + k1, scalar_t(0));
      for (int64_t t = 0; t < tokens; ++t) {
        const scalar_t* xt = x + 2 * t * x_stride;
        const scalar_t* yt = y + 2 * t * y_stride;
        for (int64_t k = k0; k < k1; ++k) {
          scalar_t xr, xi, yr, yi;
          plus_transform_at(xt, a[k], n_x, xr, xi);
          plus_transform_at(yt, b[k], n_y, yr, yi);
          out[k] += xr * yr - xi * yi;
        }
      }
    });
    const scalar_t s = static_cast<scalar_t>(scale);
    for (int64_t k = 0; k < nnz; ++k) out[k] *= s;
  });
  return grad;
}

TORCH_LIBRARY_IMPL(spectral_kernels, CPU, m) {
  m.impl("fourierft_spectrum_to_half", &fourierft_spectrum_to_half_cpu);
  m.impl("fourierft_mix", &fourierft_mix_cpu);
  m.impl("fourierft_coef_grad", &fourierft_coef_grad_cpu);
}

}  // namespace spectral_kernels
