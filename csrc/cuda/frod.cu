// FRoD CUDA kernels: the two primitives of csrc/cpu/frod.cpp (math in
// spectral_kernels/ops/frod.py), on feature-major activations (features, T) so
// that threads of a block read consecutive tokens of one row (coalesced).
//   mix:   one thread block per (output row, token tile), one token per thread.
//   sddmm: one thread block per (output row, token split); per entry of the row a
//          block reduction; the host sums the per-split partials (deterministic,
//          no atomics).
// Accumulation is in float (double for double inputs).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>

#include "../ops.h"

namespace spectral_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T, typename Acc>
__global__ void mix_kernel(const T* __restrict__ in, const Acc* __restrict__ coef, const int64_t* __restrict__ ptr,
                           const int64_t* __restrict__ src, const int64_t* __restrict__ perm, T* __restrict__ out,
                           int64_t tokens) {
  const int64_t i = blockIdx.x, t = blockIdx.y * int64_t(kThreads) + threadIdx.x;
  if (t >= tokens) return;
  Acc acc = 0;
  for (int64_t e = ptr[i]; e < ptr[i + 1]; ++e) acc += coef[perm[e]] * static_cast<Acc>(in[src[e] * tokens + t]);
  out[i * tokens + t] = static_cast<T>(acc);
}

template <typename T, typename Acc>
__global__ void sddmm_kernel(const T* __restrict__ g, const T* __restrict__ z, const int64_t* __restrict__ ptr,
                             const int64_t* __restrict__ src, const int64_t* __restrict__ perm,
                             Acc* __restrict__ partial, int64_t tokens, int64_t entries, int64_t split_len) {
  __shared__ Acc sums[kWarps];
  const int64_t i = blockIdx.x, split = blockIdx.y;
  const int64_t t_begin = split * split_len, t_end = min(tokens, t_begin + split_len);
  const T* gi = g + i * tokens;
  for (int64_t e = ptr[i]; e < ptr[i + 1]; ++e) {
    const T* ze = z + src[e] * tokens;
    Acc s = 0;
    for (int64_t t = t_begin + threadIdx.x; t < t_end; t += kThreads) s += static_cast<Acc>(gi[t]) * static_cast<Acc>(ze[t]);
    for (int offset = 16; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
    if (threadIdx.x % 32 == 0) sums[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      Acc total = 0;
      for (int w = 0; w < kWarps; ++w) total += sums[w];
      partial[split * entries + perm[e]] = total;
    }
    __syncthreads();  // sums is reused by the next entry
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

int64_t tiles(int64_t n, int64_t tile) { return (n + tile - 1) / tile; }

void check_plan(const at::Tensor& ptr, const at::Tensor& src, const at::Tensor& perm, const char* name) {
  TORCH_CHECK(ptr.dim() == 1 && ptr.size(0) >= 1 && ptr.scalar_type() == at::kLong, name,
              ": ptr must be a non-empty int64 vector");
  TORCH_CHECK(src.dim() == 1 && perm.sizes() == src.sizes() && src.scalar_type() == at::kLong &&
                  perm.scalar_type() == at::kLong,
              name, ": src and perm must be int64 vectors of the same length");
  TORCH_CHECK(ptr.size(0) - 1 <= 2147483647, name, ": too many rows for one launch");
}

}  // namespace

at::Tensor frod_mix_cuda(const at::Tensor& in_, const at::Tensor& coef_, const at::Tensor& ptr_,
                         const at::Tensor& src_, const at::Tensor& perm_) {
  TORCH_CHECK(in_.dim() == 2, "frod_mix: input must be (features, tokens)");
  check_plan(ptr_, src_, perm_, "frod_mix");
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
        src.const_data_ptr<int64_t>(), perm.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), tokens);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor frod_sddmm_cuda(const at::Tensor& g_, const at::Tensor& z_, const at::Tensor& ptr_,
                           const at::Tensor& src_, const at::Tensor& perm_) {
  TORCH_CHECK(g_.dim() == 2 && z_.dim() == 2 && g_.size(1) == z_.size(1) && g_.scalar_type() == z_.scalar_type(),
              "frod_sddmm: g and z must be (features, tokens) of the same dtype and token count");
  check_plan(ptr_, src_, perm_, "frod_sddmm");
  TORCH_CHECK(ptr_.size(0) - 1 == g_.size(0), "frod_sddmm: ptr has ", ptr_.size(0) - 1, " rows, g has ", g_.size(0));
  const c10::cuda::CUDAGuard guard(g_.device());
  const auto g = g_.contiguous(), z = z_.contiguous();
  const auto ptr = ptr_.contiguous(), src = src_.contiguous(), perm = perm_.contiguous();
  const int64_t rows = g.size(0), tokens = g.size(1), entries = src.size(0);
  const auto acc = acc_type(g.scalar_type());
  if (entries == 0 || tokens == 0) return at::zeros({entries}, g.options().dtype(acc));
  // Enough token splits to give every SM a few thread blocks.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, g.device().index()));
  const int64_t splits = std::clamp<int64_t>(tiles(4 * sms, rows), 1, std::min<int64_t>(65535, tiles(tokens, kThreads)));
  const int64_t split_len = tiles(tiles(tokens, splits), kThreads) * kThreads;
  auto partial = at::zeros({splits, entries}, g.options().dtype(acc));
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(splits));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "frod_sddmm_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    sddmm_kernel<scalar_t, Acc><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), ptr.const_data_ptr<int64_t>(),
        src.const_data_ptr<int64_t>(), perm.const_data_ptr<int64_t>(), partial.mutable_data_ptr<Acc>(), tokens,
        entries, split_len);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial.sum(0);
}

TORCH_LIBRARY_IMPL(spectral_kernels, CUDA, m) {
  m.impl("frod_mix", &frod_mix_cuda);
  m.impl("frod_sddmm", &frod_sddmm_cuda);
}

}  // namespace spectral_kernels
