// OFT CUDA kernels: the primitives of csrc/cpu/oft.cpp (math in
// spectral_kernels/ops/oft.py). The rotation kernels stage 32 x 32 tiles through shared
// memory, so any block size works (blocks larger than a tile loop over it);
// accumulation is in float (double for double inputs). The dR reduction writes one
// partial sum per token split and the host sums them: deterministic, no atomics.
// Unlike the CPU backward, dx goes through a temporary: thread blocks own column
// tiles, so rotating g in place would race with the reads of other tiles.
// The Neumann kernels build a rotation block, or its parameters' gradient, in one
// thread block each (blocks of up to kNeumannMaxBlock): one launch each way where peft's
// torch code takes ~20 small ops forward and their autograd graph backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../oft_blocks.h"
#include "../ops.h"

namespace spectral_kernels {
namespace {

constexpr int kTile = 32;                   // tokens, k and columns per shared-memory tile
constexpr int kRowsPerThread = 4;           // blockDim = (kTile, kTile / kRowsPerThread)
constexpr int kThreadRows = kTile / kRowsPerThread;

// grid (token tiles, blocks, column tiles): out[t, j*b + c] = sum_k x[t, j*b + k] M_j[k, c]
// for one kTile x kTile output tile, M_j = R_j (or R_j^T), R shared when n_rot == 1.
template <typename T, typename Acc>
__global__ void rotate_kernel(const T* __restrict__ x, const Acc* __restrict__ rot, T* __restrict__ out,
                              int64_t tokens, int64_t b, int64_t ld, bool shared, bool transpose) {
  __shared__ Acc xs[kTile][kTile + 1];  // +1: no bank conflicts on the column reads
  __shared__ Acc rs[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t t0 = blockIdx.x * int64_t(kTile), j = blockIdx.y, c = blockIdx.z * int64_t(kTile) + tx;
  const Acc* r = rot + (shared ? 0 : j) * b * b;
  const T* xj = x + j * b;
  Acc acc[kRowsPerThread] = {};
  for (int64_t k0 = 0; k0 < b; k0 += kTile) {
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int row = ty + i * kThreadRows;
      const int64_t t = t0 + row, k = k0 + tx, kr = k0 + row;
      xs[row][tx] = t < tokens && k < b ? static_cast<Acc>(xj[t * ld + k]) : Acc(0);
      rs[row][tx] = kr < b && c < b ? (transpose ? r[c * b + kr] : r[kr * b + c]) : Acc(0);
    }
    __syncthreads();
    for (int kk = 0; kk < kTile; ++kk) {
      const Acc m = rs[kk][tx];
      for (int i = 0; i < kRowsPerThread; ++i) acc[i] += xs[ty + i * kThreadRows][kk] * m;
    }
    __syncthreads();
  }
  if (c >= b) return;
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t t = t0 + ty + i * kThreadRows;
    if (t < tokens) out[t * ld + j * b + c] = static_cast<T>(acc[i]);
  }
}

// grid (blocks * k tiles * column tiles, token splits): partial[split, j, k, c] =
// sum over the split's tokens of x[t, j*b + k] g[t, j*b + c] for one kTile x kTile tile.
template <typename T, typename Acc>
__global__ void rotate_grad_kernel(const T* __restrict__ x, const T* __restrict__ g, Acc* __restrict__ partial,
                                   int64_t tokens, int64_t b, int64_t ld, int64_t blocks, int64_t tiles,
                                   int64_t split_len) {
  __shared__ Acc xs[kTile][kTile + 1];
  __shared__ Acc gs[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j = blockIdx.x / (tiles * tiles);
  const int64_t k0 = blockIdx.x / tiles % tiles * kTile, c0 = blockIdx.x % tiles * kTile;
  const int64_t split = blockIdx.y;
  const int64_t t_begin = split * split_len, t_end = t_begin + split_len < tokens ? t_begin + split_len : tokens;
  Acc acc[kRowsPerThread] = {};
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kTile) {
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int row = ty + i * kThreadRows;
      const int64_t t = t0 + row;
      const bool live = t < t_end;
      xs[row][tx] = live && k0 + tx < b ? static_cast<Acc>(x[t * ld + j * b + k0 + tx]) : Acc(0);
      gs[row][tx] = live && c0 + tx < b ? static_cast<Acc>(g[t * ld + j * b + c0 + tx]) : Acc(0);
    }
    __syncthreads();
    for (int tt = 0; tt < kTile; ++tt) {
      const Acc gv = gs[tt][tx];
      for (int i = 0; i < kRowsPerThread; ++i) acc[i] += xs[tt][ty + i * kThreadRows] * gv;
    }
    __syncthreads();
  }
  const int64_t c = c0 + tx;
  if (c >= b) return;
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t k = k0 + ty + i * kThreadRows;
    if (k < b) partial[((split * blocks + j) * b + k) * b + c] = acc[i];
  }
}

// One thread block per rotation block: its b x b matrices in shared memory, each thread owning the entries
// e = threadIdx.x + i * kNeumannThreads (i < kNeumannPerThread) of the results in registers.
constexpr int kNeumannThreads = 256;
constexpr int kNeumannMaxBlock = 64;
constexpr int kNeumannPerThread = kNeumannMaxBlock * kNeumannMaxBlock / kNeumannThreads;
constexpr int kNeumannMaxTerms = 64;  // coefficients passed by value

struct NeumannCoef {
  double c[kNeumannMaxTerms];
};

// Position of parameter (r, c), r < c, in triu_indices(b, b, 1) order.
__device__ __forceinline__ int triu_index(int b, int r, int c) { return r * b - r * (r + 1) / 2 + c - r - 1; }

// q (b x b, row-major) = A - A^T, A's strict upper triangle from p.
template <typename T, typename Acc>
__device__ void load_skew(const T* p, int b, Acc* q) {
  for (int e = threadIdx.x; e < b * b; e += blockDim.x) {
    const int r = e / b, c = e % b;
    q[e] = r < c ? static_cast<Acc>(p[triu_index(b, r, c)]) : r > c ? -static_cast<Acc>(p[triu_index(b, c, r)]) : Acc(0);
  }
}

// (a m)[r, c] for b x b row-major a and m.
template <typename Acc>
__device__ __forceinline__ Acc product_entry(const Acc* a, const Acc* m, int b, int r, int c) {
  Acc s = 0;
  for (int k = 0; k < b; ++k) s += a[r * b + k] * m[k * b + c];
  return s;
}

// grid (rotation blocks): out_j = sum_{p <= last} coef[p] Q_j^p, coef[0] = 1 (as neumann_items on the CPU),
// from power = Q^0 = I on, one product power · Q a term.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kNeumannThreads)
    neumann_kernel(NeumannCoef coef, int last, int b, const T* __restrict__ params, T* __restrict__ out) {
  extern __shared__ __align__(sizeof(double)) unsigned char neumann_smem[];
  Acc* q = reinterpret_cast<Acc*>(neumann_smem);
  Acc* power = q + b * b;
  const int n = b * b;
  const int64_t j = blockIdx.x;
  load_skew(params + j * (int64_t(b) * (b - 1) / 2), b, q);
  Acc rot[kNeumannPerThread], next[kNeumannPerThread];
#pragma unroll
  for (int i = 0; i < kNeumannPerThread; ++i) {
    const int e = threadIdx.x + i * kNeumannThreads;
    rot[i] = e < n && e / b == e % b ? Acc(1) : Acc(0);
    if (e < n) power[e] = rot[i];
  }
  __syncthreads();
  for (int p = 1; p <= last; ++p) {
    const Acc c = static_cast<Acc>(coef.c[p]);
#pragma unroll
    for (int i = 0; i < kNeumannPerThread; ++i) {
      const int e = threadIdx.x + i * kNeumannThreads;
      if (e < n) next[i] = product_entry(power, q, b, e / b, e % b);
    }
    __syncthreads();  // every read of power done
#pragma unroll
    for (int i = 0; i < kNeumannPerThread; ++i) {
      const int e = threadIdx.x + i * kNeumannThreads;
      if (e < n) {
        power[e] = next[i];
        rot[i] += c * next[i];
      }
    }
    __syncthreads();  // power complete for the next product
  }
  T* o = out + j * n;
#pragma unroll
  for (int i = 0; i < kNeumannPerThread; ++i) {
    const int e = threadIdx.x + i * kNeumannThreads;
    if (e < n) o[e] = static_cast<T>(rot[i]);
  }
}

// grid (rotation blocks): the parameters' gradient for G = dL/dR_j as neumann_backward_items on the CPU:
// with Q^T = -Q, D_1 = G, D_p = Q^T D_(p-1) + G (Q^T)^(p-1), dL/dQ = sum_p coef[p] D_p and
// d param (r, c) = dL/dQ[r, c] - dL/dQ[c, r].
template <typename T, typename Acc>
__global__ void __launch_bounds__(kNeumannThreads)
    neumann_backward_kernel(NeumannCoef coef, int last, int b, const T* __restrict__ params,
                            const T* __restrict__ grad, T* __restrict__ dparams) {
  extern __shared__ __align__(sizeof(double)) unsigned char neumann_smem[];
  Acc* q = reinterpret_cast<Acc*>(neumann_smem);
  Acc* term = q + b * b;  // G (Q^T)^(p-1)
  Acc* d = term + b * b;  // D_p
  const int n = b * b;
  const int64_t j = blockIdx.x, n_params = int64_t(b) * (b - 1) / 2;
  load_skew(params + j * n_params, b, q);
  const T* g = grad + j * n;
  Acc dq[kNeumannPerThread], next_term[kNeumannPerThread], next_d[kNeumannPerThread];
#pragma unroll
  for (int i = 0; i < kNeumannPerThread; ++i) {
    const int e = threadIdx.x + i * kNeumannThreads;
    dq[i] = Acc(0);
    if (e < n) {
      const Acc ge = static_cast<Acc>(g[e]);
      term[e] = ge;
      d[e] = ge;
      if (last >= 1) dq[i] = static_cast<Acc>(coef.c[1]) * ge;
    }
  }
  __syncthreads();
  for (int p = 2; p <= last; ++p) {
    const Acc c = static_cast<Acc>(coef.c[p]);
#pragma unroll
    for (int i = 0; i < kNeumannPerThread; ++i) {
      const int e = threadIdx.x + i * kNeumannThreads;
      if (e < n) {
        next_term[i] = -product_entry(term, q, b, e / b, e % b);
        next_d[i] = next_term[i] - product_entry(q, d, b, e / b, e % b);
      }
    }
    __syncthreads();  // every read of term and d done
#pragma unroll
    for (int i = 0; i < kNeumannPerThread; ++i) {
      const int e = threadIdx.x + i * kNeumannThreads;
      if (e < n) {
        term[e] = next_term[i];
        d[e] = next_d[i];
        dq[i] += c * next_d[i];
      }
    }
    __syncthreads();
  }
  // dL/dQ into term (no reads of it are pending), then each upper entry against its mirror.
#pragma unroll
  for (int i = 0; i < kNeumannPerThread; ++i) {
    const int e = threadIdx.x + i * kNeumannThreads;
    if (e < n) term[e] = dq[i];
  }
  __syncthreads();
  T* out = dparams + j * n_params;
#pragma unroll
  for (int i = 0; i < kNeumannPerThread; ++i) {
    const int e = threadIdx.x + i * kNeumannThreads;
    const int r = e / b, c = e % b;
    if (e < n && r < c) out[triu_index(b, r, c)] = static_cast<T>(term[e] - term[c * b + r]);
  }
}

// One thread block per rotation block (`blocks` of size b) with `matrices` b x b Acc matrices of shared memory
// (opted into past 48 KiB) and the coefficients by value.
template <typename Acc, typename... Args>
void launch_neumann(void (*kernel)(NeumannCoef, int, int, Args...), const std::vector<double>& coef, int64_t blocks,
                    int64_t b, int matrices, std::type_identity_t<Args>... args) {
  TORCH_CHECK(coef.size() <= kNeumannMaxTerms, "oft_neumann: at most ", kNeumannMaxTerms,
              " coefficients on CUDA, got ", coef.size());
  TORCH_CHECK(blocks <= 2147483647, "oft_neumann: too many blocks for one launch");
  NeumannCoef c{};
  std::copy(coef.begin(), coef.end(), c.c);
  const size_t bytes = matrices * b * b * sizeof(Acc);
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  kernel<<<static_cast<unsigned>(blocks), kNeumannThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(
      c, static_cast<int>(coef.size()) - 1, static_cast<int>(b), args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t tiles_for(int64_t n) { return (n + kTile - 1) / kTile; }

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// check_blocks, within the limits of one launch.
std::pair<int64_t, int64_t> launchable(std::pair<int64_t, int64_t> blocks_b, const char* op) {
  TORCH_CHECK(tiles_for(blocks_b.second) <= 65535 && blocks_b.first <= 65535, op, ": too many blocks for one launch");
  return blocks_b;
}

void launch_rotate(const at::Tensor& x, const at::Tensor& rot, bool transpose, at::Tensor& out, int64_t blocks,
                   int64_t b) {
  const int64_t tokens = x.size(0);
  if (x.numel() == 0) return;
  const dim3 grid(static_cast<unsigned>(tiles_for(tokens)), static_cast<unsigned>(blocks),
                  static_cast<unsigned>(tiles_for(b)));
  const dim3 threads(kTile, kThreadRows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "oft_rotate_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    rotate_kernel<scalar_t, Acc><<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), rot.data_ptr<Acc>(), out.data_ptr<scalar_t>(), tokens, b, x.size(1),
        rot.size(0) == 1, transpose);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor rotate_grad(const at::Tensor& x, const at::Tensor& g, int64_t blocks, int64_t b, bool shared) {
  const int64_t tokens = x.size(0), tiles = tiles_for(b);
  const int64_t programs = blocks * tiles * tiles;
  // Enough token splits to give every SM a few thread blocks.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()));
  const int64_t splits =
      std::clamp<int64_t>(4 * sms / std::max<int64_t>(programs, 1), 1, std::max<int64_t>(1, tiles_for(tokens)));
  const int64_t split_len = (tiles_for(tokens) + splits - 1) / splits * kTile;
  auto partial = at::zeros({splits, blocks, b, b}, x.options().dtype(acc_type(x.scalar_type())));
  if (tokens > 0 && programs > 0) {
    TORCH_CHECK(programs <= 2147483647 && splits <= 65535, "oft_rotate_backward_: too many blocks for one launch");
    const dim3 grid(static_cast<unsigned>(programs), static_cast<unsigned>(splits));
    const dim3 threads(kTile, kThreadRows);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "oft_rotate_grad_cuda", [&] {
      using Acc = at::opmath_type<scalar_t>;
      rotate_grad_kernel<scalar_t, Acc><<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), partial.data_ptr<Acc>(), tokens, b, x.size(1), blocks,
          tiles, split_len);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto grad = partial.sum(0);
  return shared ? grad.sum(0, true) : grad;
}

}  // namespace

at::Tensor oft_rotate_cuda(const at::Tensor& x_in, const at::Tensor& rot_in, bool transpose) {
  const auto [blocks, b] = launchable(check_blocks(x_in, rot_in, "oft_rotate"), "oft_rotate");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  auto out = at::empty_like(x);
  launch_rotate(x, rot_in.to(acc_type(x.scalar_type())).contiguous(), transpose, out, blocks, b);
  return out;
}

at::Tensor oft_rotate_backward_cuda(at::Tensor& g, const at::Tensor& x_in, const at::Tensor& rot_in, bool need_dx,
                                   bool need_drot) {
  const auto [blocks, b] = launchable(check_rotate_backward(g, x_in, rot_in), "oft_rotate_backward_");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  auto drot = need_drot ? rotate_grad(x, g, blocks, b, rot_in.size(0) == 1)
                        : at::empty({0}, x.options().dtype(acc_type(x.scalar_type())));
  if (need_dx) {
    auto dx = at::empty_like(g);
    launch_rotate(g, rot_in.to(acc_type(x.scalar_type())).contiguous(), true, dx, blocks, b);
    g.copy_(dx);
  }
  return drot;
}

at::Tensor oft_neumann_cuda(const at::Tensor& params_in, int64_t b, at::ArrayRef<double> coef_in) {
  const auto coef = check_neumann(params_in, b, nullptr, coef_in, kNeumannMaxBlock);
  const c10::cuda::CUDAGuard guard(params_in.device());
  const auto params = params_in.contiguous();
  auto out = at::empty({params.size(0), b, b}, params.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params.scalar_type(), "oft_neumann_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    launch_neumann<Acc>(neumann_kernel<scalar_t, Acc>, coef, params.size(0), b, 2, params.const_data_ptr<scalar_t>(),
                        out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor oft_neumann_backward_cuda(const at::Tensor& params_in, const at::Tensor& grad_in, int64_t b,
                                     at::ArrayRef<double> coef_in) {
  const auto coef = check_neumann(params_in, b, &grad_in, coef_in, kNeumannMaxBlock);
  const c10::cuda::CUDAGuard guard(params_in.device());
  const auto params = params_in.contiguous(), grad = grad_in.contiguous();
  auto dparams = at::empty_like(params);
  if (dparams.numel() == 0) return dparams;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params.scalar_type(), "oft_neumann_backward_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    launch_neumann<Acc>(neumann_backward_kernel<scalar_t, Acc>, coef, params.size(0), b, 3,
                        params.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                        dparams.mutable_data_ptr<scalar_t>());
  });
  return dparams;
}

TORCH_LIBRARY_IMPL(spectral_kernels, CUDA, m) {
  m.impl("oft_rotate", &oft_rotate_cuda);
  m.impl("oft_rotate_backward_", &oft_rotate_backward_cuda);
  m.impl("oft_neumann", &oft_neumann_cuda);
  m.impl("oft_neumann_backward", &oft_neumann_backward_cuda);
}

}  // namespace spectral_kernels
