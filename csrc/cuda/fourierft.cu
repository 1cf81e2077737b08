// FourierFT CUDA kernels: the same primitives as csrc/cpu/fourierft.cpp, with
// float32 (or float64) accumulation through atomics on zeroed outputs. Index values
// are checked by device-side asserts where they are read (the host checks of the CPU
// kernels would synchronise with the device).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../fourierft_fold.h"
#include "../ops.h"

namespace spectral_kernels {
namespace {

constexpr int kThreads = 256;

// sincospi in T's precision: the angles come from exact integer indices.
__device__ __forceinline__ void sincos_pi(float x, float* s, float* c) { sincospif(x, s, c); }
__device__ __forceinline__ void sincos_pi(double x, double* s, double* c) { sincospi(x, s, c); }

// grid: (bin blocks, coefficient slots); thread q adds every coefficient of its slot
// to bin q of that coefficient's row: out[r_k, q] += w_k exp(-2 pi i v_k q / n).
template <typename T>
__global__ void spectrum_rows_kernel(const T* __restrict__ c, const int64_t* __restrict__ rows,
                                     const int64_t* __restrict__ cols, int64_t nnz, int64_t m, int64_t n, int64_t bins,
                                     T scale, T* __restrict__ out) {
  const int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (q >= bins) return;
  for (int64_t k = blockIdx.y; k < nnz; k += gridDim.y) {
    const int64_t r = rows[k], v = cols[k];
    CUDA_KERNEL_ASSERT(r >= 0 && r < m && v >= 0 && v < n);
    T s, co;
    sincos_pi(T(-2) * static_cast<T>(v * q % n) / static_cast<T>(n), &s, &co);
    const T w = scale * c[k];
    T* dst = out + 2 * (r * bins + q);
    atomicAdd(dst, w * co);
    atomicAdd(dst + 1, w * s);
  }
}

// out[p, q] = base[p, q] + Re ft[q, p] for q < bins, else Re ft[n - q, (m - p) % m]
// (ft = F[:, :bins]^T at strides (stride_q, stride_p) in complex elements); grid:
// (bin blocks, row slots).
template <typename Acc, typename Out>
__global__ void real_mirror_kernel(const Acc* __restrict__ ft, int64_t stride_q, int64_t stride_p,
                                   const Out* __restrict__ base, int64_t m, int64_t n, Out* __restrict__ out) {
  const int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (q >= n) return;
  const bool low = q <= n / 2;
  for (int64_t p = blockIdx.y; p < m; p += gridDim.y) {
    const int64_t src = (low ? q : n - q) * stride_q + (low ? p : (m - p) % m) * stride_p;
    Acc value = ft[2 * src];
    if (base) value += static_cast<Acc>(base[p * n + q]);
    out[p * n + q] = static_cast<Out>(value);
  }
}

// grid: (coefficient blocks, token slots); one thread per coefficient, striding
// over tokens.
template <typename T>
__global__ void mix_kernel(const T* __restrict__ xf, const T* __restrict__ c, const int64_t* __restrict__ gather,
                           const int64_t* __restrict__ scatter, int64_t nnz, int64_t tokens, int64_t n_in, int64_t n_out, T scale,
                           T* __restrict__ out) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= nnz) return;
  const T w = scale * c[k];
  const int64_t gk = gather[k], sk = scatter[k];
  CUDA_KERNEL_ASSERT(gk >= 0 && gk < n_in && sk >= 0 && sk < n_out);
  int64_t first, second;
  hermitian_bins(sk, n_out, first, second);
  for (int64_t t = blockIdx.y; t < tokens; t += gridDim.y) {
    T re, im;
    plus_transform_at(xf + 2 * t * (n_in / 2 + 1), gk, n_in, re, im);
    re *= w;
    im *= w;
    T* yt = out + 2 * t * (n_out / 2 + 1);
    if (first >= 0) {
      atomicAdd(yt + 2 * first, re);
      atomicAdd(yt + 2 * first + 1, im);
    }
    if (second >= 0) {
      atomicAdd(yt + 2 * second, re);
      atomicAdd(yt + 2 * second + 1, -im);
    }
  }
}

// grid: (coefficient blocks, token slots); each thread reduces one coefficient
// over the tokens of its slot, then adds its partial sum.
template <typename T>
__global__ void coef_grad_kernel(const T* __restrict__ xf, const T* __restrict__ yf, const int64_t* __restrict__ a,
                                 const int64_t* __restrict__ b, int64_t nnz, int64_t tokens, int64_t n_x,
                                 int64_t n_y, T scale, T* __restrict__ grad) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= nnz) return;
  const int64_t ak = a[k], bk = b[k];
  CUDA_KERNEL_ASSERT(ak >= 0 && ak < n_x && bk >= 0 && bk < n_y);
  T acc = 0;
  for (int64_t t = blockIdx.y; t < tokens; t += gridDim.y) {
    T xr, xi, yr, yi;
    plus_transform_at(xf + 2 * t * (n_x / 2 + 1), ak, n_x, xr, xi);
    plus_transform_at(yf + 2 * t * (n_y / 2 + 1), bk, n_y, yr, yi);
    acc += xr * yr - xi * yi;
  }
  atomicAdd(grad + k, scale * acc);
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

template <typename T>
T* real_ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

}  // namespace

at::Tensor fourierft_spectrum_rows_cuda(const at::Tensor& coef_in, const at::Tensor& rows_in, const at::Tensor& cols_in,
                                       int64_t m, int64_t n, double scale) {
  check_spectrum_rows_args(coef_in, rows_in, cols_in, m, n);
  const c10::cuda::CUDAGuard guard(coef_in.device());
  const auto coef = coef_in.contiguous();
  const auto rows = rows_in.contiguous();
  const auto cols = cols_in.contiguous();
  const int64_t bins = n / 2 + 1, nnz = coef.numel();
  auto out = at::zeros({m, bins}, coef.options().dtype(c10::toComplexType(coef.scalar_type())));
  if (nnz == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(coef.scalar_type(), "fourierft_spectrum_rows_cuda", [&] {
    const dim3 grid(blocks_for(bins), static_cast<unsigned>(std::min<int64_t>(nnz, 65535)));
    spectrum_rows_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        coef.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(), cols.data_ptr<int64_t>(), nnz, m, n, bins,
        static_cast<scalar_t>(scale), real_ptr<scalar_t>(out));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor fourierft_real_mirror_cuda(const at::Tensor& ft, const std::optional<at::Tensor>& base_in, int64_t n) {
  const auto args = real_mirror_args(ft, base_in, n);
  const at::Tensor& base = args.base;
  const at::Tensor& out = args.out;
  const c10::cuda::CUDAGuard guard(ft.device());
  const int64_t m = out.size(0);
  const bool wide = ft.scalar_type() == at::kComplexDouble;
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "fourierft_real_mirror_cuda", [&] {
    const scalar_t* b = base.defined() ? base.const_data_ptr<scalar_t>() : nullptr;
    const dim3 grid(blocks_for(n), static_cast<unsigned>(std::min<int64_t>(m, 65535)));
    const auto stream = c10::cuda::getCurrentCUDAStream();
    if (wide) {
      real_mirror_kernel<<<grid, kThreads, 0, stream>>>(reinterpret_cast<const double*>(ft.const_data_ptr()),
                                                        ft.stride(0), ft.stride(1), b, m, n,
                                                        out.mutable_data_ptr<scalar_t>());
    } else {
      real_mirror_kernel<<<grid, kThreads, 0, stream>>>(reinterpret_cast<const float*>(ft.const_data_ptr()),
                                                        ft.stride(0), ft.stride(1), b, m, n,
                                                        out.mutable_data_ptr<scalar_t>());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor fourierft_mix_cuda(const at::Tensor& xf_in, const at::Tensor& coef_in, const at::Tensor& gather_in,
                              const at::Tensor& scatter_in, int64_t n_in, int64_t n_out, double scale) {
  check_mix_args(xf_in, coef_in, gather_in, scatter_in, n_in, n_out);
  const c10::cuda::CUDAGuard guard(xf_in.device());
  const auto xf = xf_in.contiguous();
  const auto coef = coef_in.contiguous().to(c10::toRealValueType(xf.scalar_type()));
  const auto gather = gather_in.contiguous();
  const auto scatter = scatter_in.contiguous();
  const int64_t tokens = xf.size(0), nnz = coef.numel();
  auto out = at::zeros({tokens, n_out / 2 + 1}, xf.options());
  if (nnz == 0 || tokens == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(coef.scalar_type(), "fourierft_mix_cuda", [&] {
    const dim3 grid(blocks_for(nnz), static_cast<unsigned>(std::min<int64_t>(tokens, 65535)));
    mix_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        real_ptr<scalar_t>(xf), coef.data_ptr<scalar_t>(), gather.data_ptr<int64_t>(), scatter.data_ptr<int64_t>(),
        nnz, tokens, n_in, n_out, static_cast<scalar_t>(scale / 2), real_ptr<scalar_t>(out));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor fourierft_coef_grad_cuda(const at::Tensor& xf_in, const at::Tensor& yf_in, const at::Tensor& x_idx_in,
                                    const at::Tensor& y_idx_in, int64_t n_x, int64_t n_y, double scale) {
  check_coef_grad_args(xf_in, yf_in, x_idx_in, y_idx_in, n_x, n_y);
  const c10::cuda::CUDAGuard guard(xf_in.device());
  const auto xf = xf_in.contiguous();
  const auto yf = yf_in.contiguous().to(xf.scalar_type());
  const auto x_idx = x_idx_in.contiguous();
  const auto y_idx = y_idx_in.contiguous();
  const int64_t tokens = xf.size(0), nnz = x_idx.numel();
  auto grad = at::zeros({nnz}, xf.options().dtype(c10::toRealValueType(xf.scalar_type())));
  if (nnz == 0 || tokens == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fourierft_coef_grad_cuda", [&] {
    // Enough token splits for about eight blocks per multiprocessor (n = 1000 coefficients make only four
    // blocks): each thread reduces tokens / splits tokens before its one atomic.
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, xf.get_device()));
    const int64_t splits = std::clamp<int64_t>(8 * sms / blocks_for(nnz), 1, std::min<int64_t>(tokens, 65535));
    const dim3 grid(blocks_for(nnz), static_cast<unsigned>(splits));
    coef_grad_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        real_ptr<scalar_t>(xf), real_ptr<scalar_t>(yf), x_idx.data_ptr<int64_t>(), y_idx.data_ptr<int64_t>(), nnz,
        tokens, n_x, n_y, static_cast<scalar_t>(scale), grad.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

TORCH_LIBRARY_IMPL(spectral_kernels, CUDA, m) {
  m.impl("fourierft_spectrum_rows", &fourierft_spectrum_rows_cuda);
  m.impl("fourierft_real_mirror", &fourierft_real_mirror_cuda);
  m.impl("fourierft_mix", &fourierft_mix_cuda);
  m.impl("fourierft_coef_grad", &fourierft_coef_grad_cuda);
}

}  // namespace spectral_kernels
