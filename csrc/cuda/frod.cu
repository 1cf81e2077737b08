// FRoD CUDA kernels: the two primitives of csrc/cpu/frod.cpp (math in
// spectral_kernels/ops/frod.py), on feature-major activations (features, T) so
// that threads of a block read consecutive tokens of one row (coalesced).
//   mix:          one thread block per (written row, token tile), a token per thread.
//   mix_backward: one thread block per (written row j, tile of kThreads·kTokens
//                 tokens), kTokens per thread kept in registers; per entry of the
//                 row a block reduction of its sampled gradient into
//                 partial[tile, entry], summed over tiles by the host
//                 (deterministic, no atomics).
// Accumulation is in float (double for double inputs). The plan's values are checked
// by device-side asserts where they are read (check_plan_values of the CPU kernels
// would synchronise with the device): each row's entries within [0, entries), the
// first row starting at 0 and the last ending at entries, src and perm in range.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <tuple>

#include "../frod_plan.h"
#include "../ops.h"

namespace spectral_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// The entries [begin, end) of written row i, asserted to lie within the plan.
struct RowEntries {
  int64_t begin, end;
};

__device__ __forceinline__ RowEntries row_entries(const int64_t* ptr, int64_t i, int64_t entries) {
  const RowEntries r{ptr[i], ptr[i + 1]};
  CUDA_KERNEL_ASSERT(0 <= r.begin && r.begin <= r.end && r.end <= entries && (i > 0 || r.begin == 0) &&
                     (i + 1 < gridDim.x || r.end == entries));
  return r;
}

template <typename T, typename Acc>
__global__ void mix_kernel(const T* __restrict__ in, const Acc* __restrict__ coef, const int64_t* __restrict__ ptr,
                           const int64_t* __restrict__ src, const int64_t* __restrict__ perm, T* __restrict__ out,
                           int64_t tokens, int64_t in_rows, int64_t coefs, int64_t entries) {
  const int64_t i = blockIdx.x, t = blockIdx.y * int64_t(kThreads) + threadIdx.x;
  if (t >= tokens) return;
  const RowEntries row = row_entries(ptr, i, entries);
  Acc acc = 0;
  for (int64_t e = row.begin; e < row.end; ++e) {
    const int64_t s = src[e], p = perm[e];
    CUDA_KERNEL_ASSERT(0 <= s && s < in_rows && 0 <= p && p < coefs);
    acc += coef[p] * static_cast<Acc>(in[s * tokens + t]);
  }
  out[i * tokens + t] = static_cast<T>(acc);
}

constexpr int kTokens = 4;  // tokens per thread in mix_backward

template <typename T, typename Acc>
__global__ void mix_backward_kernel(const T* __restrict__ g, const T* __restrict__ z, const Acc* __restrict__ coef,
                                    const int64_t* __restrict__ ptr, const int64_t* __restrict__ src,
                                    const int64_t* __restrict__ perm, T* __restrict__ dz, Acc* __restrict__ partial,
                                    int64_t tokens, int64_t g_rows, int64_t coefs, int64_t entries, bool need_dz) {
  __shared__ Acc sums[kWarps];
  const int64_t j = blockIdx.x, tile = blockIdx.y;
  const int64_t t0 = tile * int64_t(kThreads * kTokens) + threadIdx.x;
  Acc zr[kTokens], acc[kTokens];
#pragma unroll
  for (int k = 0; k < kTokens; ++k) {
    const int64_t t = t0 + k * kThreads;
    zr[k] = t < tokens ? static_cast<Acc>(z[j * tokens + t]) : Acc(0);
    acc[k] = 0;
  }
  const RowEntries row = row_entries(ptr, j, entries);
  for (int64_t e = row.begin; e < row.end; ++e) {
    const int64_t index = perm[e], s_row = src[e];
    CUDA_KERNEL_ASSERT(0 <= s_row && s_row < g_rows && 0 <= index && index < coefs && index < entries);
    const Acc c = coef[index];
    const T* ge = g + s_row * tokens;
    Acc s = 0;
#pragma unroll
    for (int k = 0; k < kTokens; ++k) {
      const int64_t t = t0 + k * kThreads;
      const Acc gv = t < tokens ? static_cast<Acc>(ge[t]) : Acc(0);
      acc[k] += c * gv;
      s += gv * zr[k];
    }
    for (int offset = 16; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
    if (threadIdx.x % 32 == 0) sums[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      Acc total = 0;
      for (int w = 0; w < kWarps; ++w) total += sums[w];
      partial[tile * entries + index] = total;
    }
    __syncthreads();  // sums is reused by the next entry
  }
  if (!need_dz) return;
#pragma unroll
  for (int k = 0; k < kTokens; ++k) {
    const int64_t t = t0 + k * kThreads;
    if (t < tokens) dz[j * tokens + t] = static_cast<T>(acc[k]);
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

int64_t tiles(int64_t n, int64_t tile) { return (n + tile - 1) / tile; }

}  // namespace

at::Tensor frod_mix_cuda(const at::Tensor& in_, const at::Tensor& coef_, const at::Tensor& ptr_,
                         const at::Tensor& src_, const at::Tensor& perm_) {
  check_frod_plan(in_, coef_, ptr_, src_, perm_, "frod_mix");
  const c10::cuda::CUDAGuard guard(in_.device());
  const auto in = in_.contiguous();
  const auto ptr = ptr_.contiguous(), src = src_.contiguous(), perm = perm_.contiguous();
  const int64_t rows = ptr.size(0) - 1, tokens = in.size(1);
  auto out = at::empty({rows, tokens}, in.options());
  if (rows == 0 || tokens == 0) return out;
  TORCH_CHECK(tiles(tokens, kThreads) <= 65535, "frod_mix: too many tokens for one launch");
  const auto coef = coef_.to(acc_type(in.scalar_type())).contiguous();
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(tiles(tokens, kThreads)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "frod_mix_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    mix_kernel<scalar_t, Acc><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        in.const_data_ptr<scalar_t>(), coef.const_data_ptr<Acc>(), ptr.const_data_ptr<int64_t>(),
        src.const_data_ptr<int64_t>(), perm.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), tokens,
        in.size(0), coef.numel(), src.size(0));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> frod_mix_backward_cuda(const at::Tensor& g_, const at::Tensor& z_,
                                                         const at::Tensor& coef_, const at::Tensor& ptr_,
                                                         const at::Tensor& src_, const at::Tensor& perm_,
                                                         bool need_dz) {
  check_frod_backward(g_, z_, coef_, ptr_, src_, perm_);
  const c10::cuda::CUDAGuard guard(g_.device());
  const auto g = g_.contiguous(), z = z_.contiguous();
  const auto ptr = ptr_.contiguous(), src = src_.contiguous(), perm = perm_.contiguous();
  const int64_t rows = z.size(0), tokens = z.size(1), entries = src.size(0);
  const auto acc = acc_type(g.scalar_type());
  auto dz = need_dz ? at::empty({rows, tokens}, g.options()) : at::empty({0}, g.options());
  const int64_t token_tiles = tiles(tokens, kThreads * kTokens);
  auto partial = at::zeros({token_tiles, entries}, g.options().dtype(acc));
  if (rows > 0 && tokens > 0) {
    TORCH_CHECK(token_tiles <= 65535, "frod_mix_backward: too many tokens for one launch");
    const auto coef = coef_.to(acc).contiguous();
    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(token_tiles));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "frod_mix_backward_cuda", [&] {
      using Acc = at::opmath_type<scalar_t>;
      mix_backward_kernel<scalar_t, Acc><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          g.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), coef.const_data_ptr<Acc>(),
          ptr.const_data_ptr<int64_t>(), src.const_data_ptr<int64_t>(), perm.const_data_ptr<int64_t>(),
          need_dz ? dz.mutable_data_ptr<scalar_t>() : nullptr, partial.mutable_data_ptr<Acc>(), tokens, g.size(0),
          coef.numel(), entries, need_dz);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {dz, partial.sum(0)};
}

TORCH_LIBRARY_IMPL(spectral_kernels, CUDA, m) {
  m.impl("frod_mix", &frod_mix_cuda);
  m.impl("frod_mix_backward", &frod_mix_backward_cuda);
}

}  // namespace spectral_kernels
