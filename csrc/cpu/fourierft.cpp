// FourierFT CPU kernels (OpenMP). Complex tensors are read as interleaved
// (re, im) pairs; accumulation is in the real type of the complex input.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

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

// Where coefficient k reads in a half spectrum of length n: the stored bin and the
// sign of its imaginary part (see plus_transform_at). Resolved once per call so the
// token loops below are branch-free.
struct Gather {
  std::vector<int32_t> bin;
  std::vector<int8_t> im_sign;
  Gather(const int64_t* g, int64_t nnz, int64_t n) : bin(nnz), im_sign(nnz) {
    for (int64_t k = 0; k < nnz; ++k) {
      const bool low = 2 * g[k] <= n;
      bin[k] = static_cast<int32_t>(low ? g[k] : n - g[k]);
      im_sign[k] = low ? -1 : 1;
    }
  }
};

at::Tensor fourierft_mix_cpu(const at::Tensor& xf_in, const at::Tensor& coef_in, const at::Tensor& gather_in,
                             const at::Tensor& scatter_in, int64_t n_in, int64_t n_out, double scale) {
  check_indices(coef_in, gather_in, scatter_in);
  TORCH_CHECK(xf_in.dim() == 2 && xf_in.size(1) == n_in / 2 + 1 && xf_in.is_complex(),
              "fourierft_mix: xf must be complex (T, n_in/2+1)");
  const auto xf = xf_in.contiguous();
  const auto coef = coef_in.contiguous().to(c10::toRealValueType(xf.scalar_type()));
  const auto scatter = scatter_in.contiguous();
  const int64_t tokens = xf.size(0), nnz = coef.numel();
  const int64_t in_stride = n_in / 2 + 1, out_stride = n_out / 2 + 1;
  const Gather src(gather_in.contiguous().data_ptr<int64_t>(), nnz, n_in);
  const int64_t* b = scatter.data_ptr<int64_t>();
  auto out = at::empty({tokens, out_stride}, xf.options());
  AT_DISPATCH_FLOATING_TYPES(coef.scalar_type(), "fourierft_mix_cpu", [&] {
    // Flatten every coefficient into its one or two (output bin, input bin, weights)
    // terms up front: the token loop is then branch-free (the folding branches are
    // data-dependent and would mispredict about half the time).
    std::vector<int32_t> to, from;
    std::vector<scalar_t> w_re, w_im;
    const scalar_t* c = coef.data_ptr<scalar_t>();
    const scalar_t half_scale = static_cast<scalar_t>(scale) / 2;
    for (int64_t k = 0; k < nnz; ++k) {
      int64_t first, second;
      hermitian_bins(b[k], n_out, first, second);
      const scalar_t w = half_scale * c[k];
      for (const auto& [bin, conj] : {std::pair{first, false}, std::pair{second, true}}) {
        if (bin < 0) continue;
        to.push_back(static_cast<int32_t>(bin));
        from.push_back(src.bin[k]);
        w_re.push_back(w);
        w_im.push_back(conj ? -w * src.im_sign[k] : w * src.im_sign[k]);
      }
    }
    const int64_t terms = static_cast<int64_t>(to.size());
    const scalar_t* x = reinterpret_cast<const scalar_t*>(xf.data_ptr());
    scalar_t* y = reinterpret_cast<scalar_t*>(out.data_ptr());
    // Tokens are independent; each thread owns whole output rows, zeroes and fills them.
    at::parallel_for(0, tokens, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* xt = x + 2 * t * in_stride;
        scalar_t* yt = y + 2 * t * out_stride;
        std::fill(yt, yt + 2 * out_stride, scalar_t(0));
        for (int64_t e = 0; e < terms; ++e) {
          yt[2 * to[e]] += w_re[e] * xt[2 * from[e]];
          yt[2 * to[e] + 1] += w_im[e] * xt[2 * from[e] + 1];
        }
      }
    });
  });
  return out;
}

// sum_t Re(x[t] y[t]) for interleaved complex streams whose imaginary parts carry
// the signs of the folding (sign = product of both); outside the dispatch macro so
// the pragma applies.
template <typename T>
T streamed_re_product(const T* x, const T* y, int64_t n, T sign) {
  T re = 0, im = 0;
#pragma omp simd reduction(+ : re, im)
  for (int64_t t = 0; t < n; ++t) {
    re += x[2 * t] * y[2 * t];
    im += x[2 * t + 1] * y[2 * t + 1];
  }
  return re - sign * im;
}

at::Tensor fourierft_coef_grad_cpu(const at::Tensor& xf_in, const at::Tensor& yf_in, const at::Tensor& x_idx_in,
                                   const at::Tensor& y_idx_in, int64_t n_x, int64_t n_y, double scale) {
  TORCH_CHECK(x_idx_in.dim() == 1 && x_idx_in.sizes() == y_idx_in.sizes(), "fourierft_coef_grad: index shapes differ");
  TORCH_CHECK(xf_in.is_complex() && yf_in.is_complex() && xf_in.dim() == 2 && yf_in.dim() == 2 &&
                  xf_in.size(0) == yf_in.size(0) && xf_in.size(1) == n_x / 2 + 1 && yf_in.size(1) == n_y / 2 + 1,
              "fourierft_coef_grad: xf (T, n_x/2+1) and yf (T, n_y/2+1) complex expected");
  const int64_t tokens = xf_in.size(0), nnz = x_idx_in.numel();
  const Gather a(x_idx_in.contiguous().data_ptr<int64_t>(), nnz, n_x);
  const Gather b(y_idx_in.contiguous().data_ptr<int64_t>(), nnz, n_y);
  auto grad = at::zeros({nnz}, xf_in.options().dtype(c10::toRealValueType(xf_in.scalar_type())));
  // Spectra stored bin-major ((T, bins) views of (bins, T) tensors) make each
  // coefficient one contiguous complex dot product over tokens: streamed and
  // vectorized instead of gathered. Token-major spectra take the gather loop.
  const bool bin_major = xf_in.stride(0) == 1 && xf_in.stride(1) == tokens && yf_in.stride(0) == 1 &&
                         yf_in.stride(1) == tokens && yf_in.scalar_type() == xf_in.scalar_type();
  const auto xf = bin_major ? xf_in : xf_in.contiguous();
  const auto yf = bin_major ? yf_in : yf_in.contiguous().to(xf.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fourierft_coef_grad_cpu", [&] {
    const scalar_t* x = reinterpret_cast<const scalar_t*>(xf.data_ptr());
    const scalar_t* y = reinterpret_cast<const scalar_t*>(yf.data_ptr());
    std::vector<scalar_t> sign(nnz);  // Re(X^ Y^) = xr yr - sign * xi yi
    for (int64_t k = 0; k < nnz; ++k) sign[k] = a.im_sign[k] * b.im_sign[k];
    scalar_t* out = grad.data_ptr<scalar_t>();
    const scalar_t s = static_cast<scalar_t>(scale);
    if (bin_major) {
      at::parallel_for(0, nnz, 16, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const scalar_t* xk = x + 2 * a.bin[k] * tokens;
          const scalar_t* yk = y + 2 * b.bin[k] * tokens;
          out[k] = s * streamed_re_product(xk, yk, tokens, sign[k]);
        }
      });
      return;
    }
    const int64_t x_stride = n_x / 2 + 1, y_stride = n_y / 2 + 1;
    // Each thread streams its own tokens once (both rows stay in L1 while all
    // coefficients gather from them) into a private accumulator; sums are merged after.
    const int64_t chunks = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(tokens, 1));
    std::vector<scalar_t> partial(chunks * nnz, scalar_t(0));
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t chunk = c0; chunk < c1; ++chunk) {
        scalar_t* acc = partial.data() + chunk * nnz;
        for (int64_t t = chunk * tokens / chunks; t < (chunk + 1) * tokens / chunks; ++t) {
          const scalar_t* xt = x + 2 * t * x_stride;
          const scalar_t* yt = y + 2 * t * y_stride;
          for (int64_t k = 0; k < nnz; ++k) {
            acc[k] += xt[2 * a.bin[k]] * yt[2 * b.bin[k]] - sign[k] * xt[2 * a.bin[k] + 1] * yt[2 * b.bin[k] + 1];
          }
        }
      }
    });
    for (int64_t chunk = 0; chunk < chunks; ++chunk)
      for (int64_t k = 0; k < nnz; ++k) out[k] += partial[chunk * nnz + k];
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
