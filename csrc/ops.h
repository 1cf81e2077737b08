// Declarations of every native kernel. The op schemas live in Python
// (spectral_kernels/kernels/native/__init__.py); this library only adds implementations, so
// the ops and their pure-PyTorch reference exist even when this build failed.
#pragma once
#include <torch/types.h>

namespace spectral_kernels {

// FourierFT (math in spectral_kernels/ops/fourierft.py).
// The sparse spectrum S (c_k at (rows_k, cols_k)) transformed along its rows:
// R[u, q] = scale * sum_{k: rows_k = u} c_k exp(-2 pi i cols_k q / n), (m, n/2+1) complex.
at::Tensor fourierft_spectrum_rows_cpu(const at::Tensor& coef, const at::Tensor& rows,
                                       const at::Tensor& cols, int64_t m, int64_t n, double scale);
// For ft = fft(R, dim=0)^T (bins, m), the rfft2 of a real matrix transposed: base + the
// real part of the full (m, n) transform, its bins past n/2 read by Hermitian symmetry;
// base's dtype (ft's real type without base).
at::Tensor fourierft_real_mirror_cpu(const at::Tensor& ft, const std::optional<at::Tensor>& base, int64_t n);
// Per-token sparse spectral mixing: (T, n_in/2+1) -> (T, n_out/2+1).
at::Tensor fourierft_mix_cpu(const at::Tensor& xf, const at::Tensor& coef,
                             const at::Tensor& gather_idx, const at::Tensor& scatter_idx,
                             int64_t n_in, int64_t n_out, double scale);
// Sampled reduction over tokens: d coef_k = scale * sum_t Re(X^[t, a_k] * Y^[t, b_k]).
at::Tensor fourierft_coef_grad_cpu(const at::Tensor& xf, const at::Tensor& yf,
                                   const at::Tensor& x_idx, const at::Tensor& y_idx,
                                   int64_t n_x, int64_t n_y, double scale);

// OFT (math in spectral_kernels/ops/oft.py).
// Block rotation: out[:, j] = x[:, j] · R_j (transpose: · R_j^T) for the b-column
// blocks j of x (T, n·b); rot (n or 1, b, b), one block shared by all when 1.
at::Tensor oft_rotate_cpu(const at::Tensor& x, const at::Tensor& rot, bool transpose);
// Backward of x_rot = x · blockdiag(R) for its gradient g: g[:, j] <- g[:, j] · R_j^T
// (dx, in place, if need_dx) and returns dR_j = sum_t x[t, j]^T g[t, j] (if
// need_drot; (1, b, b) summed over the blocks when rot is shared) in float (double
// for double x).
at::Tensor oft_rotate_backward_cpu(at::Tensor& g, const at::Tensor& x, const at::Tensor& rot, bool need_dx,
                                   bool need_drot);
// Neumann rotation blocks R_j = sum_p coef[p] Q_j^p (coef[0] = 1) of skew blocks Q_j from
// parameters (n, b(b-1)/2) in triu_indices(b, b, 1) order, and the parameters' gradient
// for dL/dR; both in the parameters' dtype, accumulated in float (double for double).
at::Tensor oft_neumann_cpu(const at::Tensor& params, int64_t b, at::ArrayRef<double> coef);
at::Tensor oft_neumann_backward_cpu(const at::Tensor& params, const at::Tensor& grad, int64_t b,
                                    at::ArrayRef<double> coef);

// FRoD (math in spectral_kernels/ops/frod.py), on feature-major activations
// (features, T) and a CSR plan (ptr over output rows, src input row, perm index
// into coef/grad per entry):
// out[i, :] = sum_{e in row i} coef[perm[e]] · in[src[e], :]
at::Tensor frod_mix_cpu(const at::Tensor& in, const at::Tensor& coef, const at::Tensor& ptr, const at::Tensor& src,
                        const at::Tensor& perm);
// Its backward for a plan grouped by the rows j of M^T: dz[j, :] = sum_{e in row j}
// coef[perm[e]] · g[src[e], :] (if need_dz) and dcoef[perm[e]] = sum_t g[src[e], t] z[j, t]
// (float; double for double).
std::tuple<at::Tensor, at::Tensor> frod_mix_backward_cpu(const at::Tensor& g, const at::Tensor& z,
                                                        const at::Tensor& coef, const at::Tensor& ptr,
                                                        const at::Tensor& src, const at::Tensor& perm, bool need_dz);

#ifdef SPECTRAL_KERNELS_WITH_CUDA
at::Tensor fourierft_spectrum_rows_cuda(const at::Tensor& coef, const at::Tensor& rows,
                                        const at::Tensor& cols, int64_t m, int64_t n, double scale);
at::Tensor fourierft_real_mirror_cuda(const at::Tensor& ft, const std::optional<at::Tensor>& base, int64_t n);
at::Tensor fourierft_mix_cuda(const at::Tensor& xf, const at::Tensor& coef,
                              const at::Tensor& gather_idx, const at::Tensor& scatter_idx,
                              int64_t n_in, int64_t n_out, double scale);
at::Tensor fourierft_coef_grad_cuda(const at::Tensor& xf, const at::Tensor& yf,
                                    const at::Tensor& x_idx, const at::Tensor& y_idx,
                                    int64_t n_x, int64_t n_y, double scale);
at::Tensor oft_rotate_cuda(const at::Tensor& x, const at::Tensor& rot, bool transpose);
at::Tensor oft_rotate_backward_cuda(at::Tensor& g, const at::Tensor& x, const at::Tensor& rot, bool need_dx,
                                    bool need_drot);
at::Tensor oft_neumann_cuda(const at::Tensor& params, int64_t b, at::ArrayRef<double> coef);
at::Tensor oft_neumann_backward_cuda(const at::Tensor& params, const at::Tensor& grad, int64_t b,
                                     at::ArrayRef<double> coef);
at::Tensor frod_mix_cuda(const at::Tensor& in, const at::Tensor& coef, const at::Tensor& ptr, const at::Tensor& src,
                         const at::Tensor& perm);
std::tuple<at::Tensor, at::Tensor> frod_mix_backward_cuda(const at::Tensor& g, const at::Tensor& z,
                                                         const at::Tensor& coef, const at::Tensor& ptr,
                                                         const at::Tensor& src, const at::Tensor& perm, bool need_dz);
#endif

}  // namespace spectral_kernels
