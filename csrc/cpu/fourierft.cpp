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
  std::vector<int32_t> bin;  // 32-bit: vector gathers take 32-bit lanes
  std::vector<int8_t> im_sign;
  Gather(const int64_t* g, int64_t nnz, int64_t n) : bin(nnz), im_sign(nnz) {
    for (int64_t k = 0; k < nnz; ++k) {
      const bool low = 2 * g[k] <= n;
      bin[k] = static_cast<int32_t>(low ? g[k] : n - g[k]);
      im_sign[k] = low ? -1 : 1;
    }
  }
};

// The per-token gather loops are the hot spot of the sampled reduction. They are
// compiled for several instruction sets and the best one is picked at load time
// (GCC target_clones), so the wheel still runs on any x86-64 CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SK_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SK_CPU_CLONES
#endif

// acc[k] += Re(X^[a_k] Y^[b_k]) for one token; written out per type because GCC
// vectorizes the clones only when the loop is in the cloned function itself.
SK_CPU_CLONES void accumulate_token(const float* __restrict__ xt, const float* __restrict__ yt,
                                    const int32_t* __restrict__ abin, const int32_t* __restrict__ bbin,
                                    const float* __restrict__ sign, float* __restrict__ acc, int64_t nnz) {
  for (int64_t k = 0; k < nnz; ++k)
    acc[k] += xt[2 * abin[k]] * yt[2 * bbin[k]] - sign[k] * xt[2 * abin[k] + 1] * yt[2 * bbin[k] + 1];
}

SK_CPU_CLONES void accumulate_token(const double* __restrict__ xt, const double* __restrict__ yt,
                                    const int32_t* __restrict__ abin, const int32_t* __restrict__ bbin,
                                    const double* __restrict__ sign, double* __restrict__ acc, int64_t nnz) {
  for (int64_t k = 0; k < nnz; ++k)
    acc[k] += xt[2 * abin[k]] * yt[2 * bbin[k]] - sign[k] * xt[2 * abin[k] + 1] * yt[2 * bbin[k] + 1];
}

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
  std::vector<int64_t> first(nnz), second(nnz);
  for (int64_t k = 0; k < nnz; ++k) hermitian_bins(scatter.data_ptr<int64_t>()[k], n_out, first[k], second[k]);
  auto out = at::empty({tokens, out_stride}, xf.options());
  AT_DISPATCH_FLOATING_TYPES(coef.scalar_type(), "fourierft_mix_cpu", [&] {
    const scalar_t* c = coef.data_ptr<scalar_t>();
    const scalar_t* x = reinterpret_cast<const scalar_t*>(xf.data_ptr());
    scalar_t* y = reinterpret_cast<scalar_t*>(out.data_ptr());
    const scalar_t s = static_cast<scalar_t>(scale) / 2;
    // Tokens are independent; each thread owns whole output rows, zeroes and fills them.
    at::parallel_for(0, tokens, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* xt = x + 2 * t * in_stride;
        scalar_t* yt = y + 2 * t * out_stride;
        std::fill(yt, yt + 2 * out_stride, scalar_t(0));
        for (int64_t k = 0; k < nnz; ++k) {
          const scalar_t w = s * c[k];
          const scalar_t re = w * xt[2 * src.bin[k]];
          const scalar_t im = w * src.im_sign[k] * xt[2 * src.bin[k] + 1];
          if (first[k] >= 0) {
            yt[2 * first[k]] += re;
            yt[2 * first[k] + 1] += im;
          }
          if (second[k] >= 0) {
            yt[2 * second[k]] += re;
            yt[2 * second[k] + 1] -= im;
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
  const int64_t tokens = xf.size(0), nnz = x_idx_in.numel();
  const int64_t x_stride = n_x / 2 + 1, y_stride = n_y / 2 + 1;
  const Gather a(x_idx_in.contiguous().data_ptr<int64_t>(), nnz, n_x);
  const Gather b(y_idx_in.contiguous().data_ptr<int64_t>(), nnz, n_y);
  auto grad = at::zeros({nnz}, xf.options().dtype(c10::toRealValueType(xf.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fourierft_coef_grad_cpu", [&] {
    const scalar_t* x = reinterpret_cast<const scalar_t*>(xf.data_ptr());
    const scalar_t* y = reinterpret_cast<const scalar_t*>(yf.data_ptr());
    std::vector<scalar_t> sign(nnz);  // Re(X^ Y^) = xr yr - sign * xi yi
    for (int64_t k = 0; k < nnz; ++k) sign[k] = a.im_sign[k] * b.im_sign[k];
    // Each thread streams its own tokens once (both rows stay in L1 while all
    // coefficients gather from them) into a private accumulator; sums are merged after.
    const int64_t chunks = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(tokens, 1));
    std::vector<scalar_t> partial(chunks * nnz, scalar_t(0));
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t chunk = c0; chunk < c1; ++chunk) {
        scalar_t* acc = partial.data() + chunk * nnz;
        for (int64_t t = chunk * tokens / chunks; t < (chunk + 1) * tokens / chunks; ++t) {
          accumulate_token(x + 2 * t * x_stride, y + 2 * t * y_stride, a.bin.data(), b.bin.data(), sign.data(), acc,
                           nnz);
        }
      }
    });
    scalar_t* out = grad.data_ptr<scalar_t>();
    const scalar_t s = static_cast<scalar_t>(scale);
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
