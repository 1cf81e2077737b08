// FRoD CUDA kernels: the two primitives of csrc/cpu/frod.cpp (math in
// spectral_kernels/ops/frod.py), on feature-major activations (features, T). A thread
// block owns one written row and a tile of tokens, each thread kPer consecutive tokens
// (16 bytes of the rows' dtype): one vector load per row read where the rows allow it
// (tokens a multiple of kPer, 16-byte aligned tensors), kPer loads otherwise. A row's
// entries go kBatch at a time, their loads issued together: each entry reads a few
// bytes a thread through two dependent loads (src, then the row), so the latency of
// those loads, not bandwidth, sets the pace of an entry at a time.
//   mix:          out[i, tile] = sum over row i's entries of coef · in[src, tile].
//   mix_backward: dz[j, tile] likewise from g; the sampled gradients of a batch of
//                 entries are reduced over the block (warp shuffles, then one barrier
//                 a batch: their shared sums are double-buffered) into
//                 partial[tile, entry], summed over tiles by the host (deterministic,
//                 no atomics).
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

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <tuple>
#include <type_traits>

#include "../frod_plan.h"
#include "../ops.h"

namespace spectral_kernels {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kBatch = 4;  // entries whose loads are in flight together

template <typename T>
constexpr int kPer = 16 / sizeof(T);  // tokens a thread

template <typename T>
struct alignas(16) Pack {
  T v[kPer<T>];
};

// row[t, t + kPer) as Acc, zeros past `tokens`; kVector: one 16-byte load (tokens a multiple of kPer, row aligned).
template <bool kVector, typename T, typename Acc>
__device__ __forceinline__ void load_tokens(const T* row, int64_t t, int64_t tokens, Acc (&out)[kPer<T>]) {
  if constexpr (kVector) {
    const Pack<T> p = t < tokens ? *reinterpret_cast<const Pack<T>*>(row + t) : Pack<T>{};
#pragma unroll
    for (int k = 0; k < kPer<T>; ++k) out[k] = static_cast<Acc>(p.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kPer<T>; ++k) out[k] = t + k < tokens ? static_cast<Acc>(row[t + k]) : Acc(0);
  }
}

template <bool kVector, typename T, typename Acc>
__device__ __forceinline__ void store_tokens(T* row, int64_t t, int64_t tokens, const Acc (&in)[kPer<T>]) {
  if constexpr (kVector) {
    if (t >= tokens) return;
    Pack<T> p;
#pragma unroll
    for (int k = 0; k < kPer<T>; ++k) p.v[k] = static_cast<T>(in[k]);
    *reinterpret_cast<Pack<T>*>(row + t) = p;
  } else {
#pragma unroll
    for (int k = 0; k < kPer<T>; ++k)
      if (t + k < tokens) row[t + k] = static_cast<T>(in[k]);
  }
}

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

// grid (rows, token tiles)
template <typename T, typename Acc, bool kVector>
__global__ void __launch_bounds__(kMaxThreads)
    mix_kernel(const T* __restrict__ in, const Acc* __restrict__ coef, const int64_t* __restrict__ ptr,
               const int64_t* __restrict__ src, const int64_t* __restrict__ perm, T* __restrict__ out,
               int64_t tokens, int64_t in_rows, int64_t coefs, int64_t entries) {
  const int64_t i = blockIdx.x, t = (blockIdx.y * int64_t(blockDim.x) + threadIdx.x) * kPer<T>;
  if (t >= tokens) return;
  const RowEntries row = row_entries(ptr, i, entries);
  Acc acc[kPer<T>] = {};
  for (int64_t e0 = row.begin; e0 < row.end; e0 += kBatch) {
    Acc c[kBatch], x[kBatch][kPer<T>];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (e0 + u < row.end) {
        const int64_t s = src[e0 + u], p = perm[e0 + u];
        CUDA_KERNEL_ASSERT(0 <= s && s < in_rows && 0 <= p && p < coefs);
        c[u] = coef[p];
        load_tokens<kVector>(in + s * tokens, t, tokens, x[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (e0 + u < row.end) {
#pragma unroll
        for (int k = 0; k < kPer<T>; ++k) acc[k] += c[u] * x[u][k];
      }
    }
  }
  store_tokens<kVector>(out + i * tokens, t, tokens, acc);
}

// grid (rows j, token tiles)
template <typename T, typename Acc, bool kVector>
__global__ void __launch_bounds__(kMaxThreads)
    mix_backward_kernel(const T* __restrict__ g, const T* __restrict__ z, const Acc* __restrict__ coef,
                        const int64_t* __restrict__ ptr, const int64_t* __restrict__ src,
                        const int64_t* __restrict__ perm, T* __restrict__ dz, Acc* __restrict__ partial,
                        int64_t tokens, int64_t g_rows, int64_t coefs, int64_t entries, bool need_dz) {
  __shared__ Acc sums[2][kBatch][kMaxWarps];
  const int64_t j = blockIdx.x, tile = blockIdx.y;
  const int64_t t = (tile * blockDim.x + threadIdx.x) * kPer<T>;
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  Acc zr[kPer<T>], acc[kPer<T>] = {};
  load_tokens<kVector>(z + j * tokens, t, tokens, zr);
  const RowEntries row = row_entries(ptr, j, entries);
  int buffer = 0;
  for (int64_t e0 = row.begin; e0 < row.end; e0 += kBatch, buffer ^= 1) {
    Acc s[kBatch] = {};
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (e0 + u < row.end) {
        const int64_t index = perm[e0 + u], s_row = src[e0 + u];
        CUDA_KERNEL_ASSERT(0 <= s_row && s_row < g_rows && 0 <= index && index < coefs && index < entries);
        const Acc c = coef[index];
        Acc gv[kPer<T>];
        load_tokens<kVector>(g + s_row * tokens, t, tokens, gv);
#pragma unroll
        for (int k = 0; k < kPer<T>; ++k) {
          acc[k] += c * gv[k];
          s[u] += gv[k] * zr[k];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      for (int offset = 16; offset > 0; offset /= 2) s[u] += __shfl_down_sync(0xffffffffu, s[u], offset);
    if (threadIdx.x % 32 == 0)
      for (int u = 0; u < kBatch; ++u) sums[buffer][u][warp] = s[u];
    // One barrier a batch: the next batch writes the other buffer, and the one after this buffer only once every
    // thread has passed the next barrier, after its reads below.
    __syncthreads();
    if (threadIdx.x < kBatch && e0 + threadIdx.x < row.end) {
      Acc total = 0;
      for (int w = 0; w < warps; ++w) total += sums[buffer][threadIdx.x][w];
      partial[tile * entries + perm[e0 + threadIdx.x]] = total;
    }
  }
  if (need_dz) store_tokens<kVector>(dz + j * tokens, t, tokens, acc);
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

int64_t tiles(int64_t n, int64_t tile) { return (n + tile - 1) / tile; }

// A block's threads (whole warps, up to kMaxThreads) for rows of `tokens` at `per` tokens a thread, and the token
// tiles they make.
struct Tiling {
  int threads;
  int64_t tiles;
};

Tiling tiling(int64_t tokens, int per) {
  const int threads = static_cast<int>(std::clamp<int64_t>(tiles(tiles(tokens, per), 32) * 32, 32, kMaxThreads));
  return {threads, tiles(tokens, int64_t(threads) * per)};
}

// Whether rows of `tokens` in these tensors can be read `per` tokens at a time with 16-byte loads.
bool vector_rows(int64_t tokens, int per, std::initializer_list<const at::Tensor*> tensors) {
  if (tokens % per != 0) return false;
  return std::all_of(tensors.begin(), tensors.end(),
                     [](const at::Tensor* t) { return reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 == 0; });
}

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
  const auto coef = coef_.to(acc_type(in.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "frod_mix_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const Tiling tl = tiling(tokens, kPer<scalar_t>);
    TORCH_CHECK(tl.tiles <= 65535, "frod_mix: too many tokens for one launch");
    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(tl.tiles));
    auto launch = [&](auto vector) {
      constexpr bool kVector = decltype(vector)::value;
      mix_kernel<scalar_t, Acc, kVector><<<grid, tl.threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          in.const_data_ptr<scalar_t>(), coef.const_data_ptr<Acc>(), ptr.const_data_ptr<int64_t>(),
          src.const_data_ptr<int64_t>(), perm.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), tokens,
          in.size(0), coef.numel(), src.size(0));
    };
    if (vector_rows(tokens, kPer<scalar_t>, {&in, &out}))
      launch(std::true_type{});
    else
      launch(std::false_type{});
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
  at::Tensor partial;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "frod_mix_backward_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const Tiling tl = tiling(tokens, kPer<scalar_t>);
    partial = at::zeros({tl.tiles, entries}, g.options().dtype(acc));
    if (rows == 0 || tokens == 0) return;
    TORCH_CHECK(tl.tiles <= 65535, "frod_mix_backward: too many tokens for one launch");
    const auto coef = coef_.to(acc).contiguous();
    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(tl.tiles));
    auto launch = [&](auto vector) {
      constexpr bool kVector = decltype(vector)::value;
      mix_backward_kernel<scalar_t, Acc, kVector><<<grid, tl.threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          g.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), coef.const_data_ptr<Acc>(),
          ptr.const_data_ptr<int64_t>(), src.const_data_ptr<int64_t>(), perm.const_data_ptr<int64_t>(),
          need_dz ? dz.mutable_data_ptr<scalar_t>() : nullptr, partial.mutable_data_ptr<Acc>(), tokens, g.size(0),
          coef.numel(), entries, need_dz);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vector_rows(tokens, kPer<scalar_t>, {&g, &z}) && (!need_dz || vector_rows(tokens, kPer<scalar_t>, {&dz})))
      launch(std::true_type{});
    else
      launch(std::false_type{});
  });
  return {dz, partial.sum(0)};
}

TORCH_LIBRARY_IMPL(spectral_kernels, CUDA, m) {
  m.impl("frod_mix", &frod_mix_cuda);
  m.impl("frod_mix_backward", &frod_mix_backward_cuda);
}

}  // namespace spectral_kernels
