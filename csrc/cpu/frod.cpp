// FRoD CPU kernels (math in spectral_kernels/ops/frod.py). Activations are
// feature-major, (features, T), so every term of the sparse product is a
// contiguous row operation over tokens. With the entries of M grouped by the row
// they write (ptr: row pointers of that CSR order; per entry src, the row it reads,
// and perm, its index into coef/dcoef):
//   mix:           out[i, :] = sum_{e in row i} coef[perm[e]] · in[src[e], :]
//   mix_backward:  dz[j, :]  = sum_{e in row j} coef[perm[e]] · g[src[e], :]   (M^T g)
//                  dcoef[perm[e]] = sum_t g[src[e], t] · z[j, t]              (sampled dM)
// in one pass: each row of g read for an entry serves both. Threads split the
// written rows; tokens go in chunks so that one chunk of every input row stays in
// cache while the rows use it. The coefficients are laid out in entry order
// first. Accumulation is in float (double for double inputs).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../frod_plan.h"
#include "../ops.h"

namespace spectral_kernels {
namespace {

// Cloned per instruction set and chosen when the library loads (no -march at
// build time); the loops inside are plain loops the compiler vectorises.
#define SK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// Bytes of one input's token chunk (all of its rows) meant to stay in the shared
// last-level cache, per kernel: long chunks keep each entry's row access a stream
// (measured on the 2-core CPU machine with 2 threads at 1% density, T=512 x 2048
// and T=2048 x 1024: mix 2-2.8 ms with 2-8 MiB chunks against 4.2-4.7 ms with 1 MiB,
// and the backward best with whole rows).
constexpr int64_t kMixChunkBytes = int64_t(4) << 20;
constexpr int64_t kBackwardChunkBytes = int64_t(8) << 20;

// acc[:n] += c · x[:n], one entry over one chunk.
template <typename T, typename Acc>
inline void axpy_impl(Acc* acc, const T* x, Acc c, int64_t n) {
  for (int64_t t = 0; t < n; ++t) acc[t] += c * static_cast<Acc>(x[t]);
}

// One row j of the backward over one chunk of `len` tokens: acc = sum_e coef[e] · g[src[e] * ld + :len]
// and dcoef[e] += sum_t g[src[e] * ld + t] z[t] over its `count` entries, reading g once.
template <typename T, typename Acc>
inline void mix_backward_row_impl(Acc* __restrict__ acc, const T* g, int64_t ld, int64_t len,
                                  const Acc* __restrict__ z, const int64_t* src, const Acc* coef, Acc* dcoef,
                                  int64_t count) {
  std::fill_n(acc, len, Acc(0));
  for (int64_t e = 0; e < count; ++e) {
    const T* __restrict__ row = g + src[e] * ld;
    const Acc c = coef[e];
    Acc s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t t = 0; t < len; ++t) {
      const Acc gv = static_cast<Acc>(row[t]);
      acc[t] += c * gv;
      s += gv * z[t];
    }
    dcoef[e] += s;
  }
}

#define SK_ROWS(T, Acc)                                                                                          \
  SK_CLONES void axpy(Acc* acc, const T* x, Acc c, int64_t n) { axpy_impl(acc, x, c, n); }                      \
  SK_CLONES void mix_backward_row(Acc* acc, const T* g, int64_t ld, int64_t len, const Acc* z, const int64_t* src, \
                                  const Acc* coef, Acc* dcoef, int64_t count) {                                  \
    mix_backward_row_impl(acc, g, ld, len, z, src, coef, dcoef, count);                                          \
  }
SK_ROWS(float, float)
SK_ROWS(at::BFloat16, float)
SK_ROWS(at::Half, float)
SK_ROWS(double, double)
#undef SK_ROWS

int64_t chunk_tokens(int64_t bytes, int64_t rows, int64_t tokens, int64_t elem) {
  const int64_t fit = bytes / std::max<int64_t>(1, rows * elem);
  return std::clamp<int64_t>(fit / 16 * 16, 16, std::max<int64_t>(tokens, 1));
}

// coef in entry order (coef[perm[e]]), in the accumulation type.
template <typename Acc>
std::vector<Acc> entry_coefficients(const at::Tensor& coef, const at::Tensor& perm) {
  const auto values = coef.to(c10::CppTypeToScalarType<Acc>::value).contiguous();
  const Acc* cp = values.template const_data_ptr<Acc>();
  const int64_t* mp = perm.const_data_ptr<int64_t>();
  std::vector<Acc> out(perm.size(0));
  for (size_t e = 0; e < out.size(); ++e) out[e] = cp[mp[e]];
  return out;
}

}  // namespace

at::Tensor frod_mix_cpu(const at::Tensor& in_, const at::Tensor& coef, const at::Tensor& ptr_,
                        const at::Tensor& src_, const at::Tensor& perm_) {
  check_frod_plan(in_, ptr_, src_, perm_, "frod_mix");
  const auto in = in_.contiguous();
  const auto ptr = ptr_.contiguous(), src = src_.contiguous(), perm = perm_.contiguous();
  const int64_t rows_out = ptr.size(0) - 1, tokens = in.size(1);
  auto out = at::empty({rows_out, tokens}, in.options());
  if (rows_out == 0 || tokens == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "frod_mix_cpu", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto coef_e = entry_coefficients<Acc>(coef, perm);
    const int64_t* pp = ptr.const_data_ptr<int64_t>();
    const int64_t* sp = src.const_data_ptr<int64_t>();
    const scalar_t* xp = in.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t chunk = chunk_tokens(kMixChunkBytes, in.size(0), tokens, sizeof(scalar_t));
    at::parallel_for(0, rows_out, 16, [&](int64_t begin, int64_t end) {
      std::vector<Acc> acc(std::min(chunk, tokens));
      for (int64_t t0 = 0; t0 < tokens; t0 += chunk) {
        const int64_t len = std::min(chunk, tokens - t0);
        for (int64_t i = begin; i < end; ++i) {
          std::fill_n(acc.begin(), len, Acc(0));
          for (int64_t e = pp[i]; e < pp[i + 1]; ++e) axpy(acc.data(), xp + sp[e] * tokens + t0, coef_e[e], len);
          scalar_t* o = op + i * tokens + t0;
          for (int64_t t = 0; t < len; ++t) o[t] = static_cast<scalar_t>(acc[t]);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> frod_mix_backward_cpu(const at::Tensor& g_, const at::Tensor& z_,
                                                        const at::Tensor& coef, const at::Tensor& ptr_,
                                                        const at::Tensor& src_, const at::Tensor& perm_, bool need_dz) {
  check_frod_backward(g_, z_, ptr_, src_, perm_);
  const auto g = g_.contiguous(), z = z_.contiguous();
  const auto ptr = ptr_.contiguous(), src = src_.contiguous(), perm = perm_.contiguous();
  const int64_t rows = z.size(0), tokens = z.size(1), entries = src.size(0);
  const auto acc_type = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto dcoef = at::zeros({entries}, g.options().dtype(acc_type));
  auto dz = need_dz ? at::empty({rows, tokens}, g.options()) : at::empty({0}, g.options());
  if (rows == 0 || tokens == 0) return {dz, dcoef};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "frod_mix_backward_cpu", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto coef_e = entry_coefficients<Acc>(coef, perm);
    std::vector<Acc> dcoef_e(entries, Acc(0));
    const int64_t* pp = ptr.const_data_ptr<int64_t>();
    const int64_t* sp = src.const_data_ptr<int64_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* dzp = need_dz ? dz.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t chunk = chunk_tokens(kBackwardChunkBytes, g.size(0), tokens, sizeof(scalar_t));
    // Entries are owned by their row's thread: the per-chunk partial sums need no reduction.
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<Acc> acc(std::min(chunk, tokens)), zrow(acc.size());
      for (int64_t t0 = 0; t0 < tokens; t0 += chunk) {
        const int64_t len = std::min(chunk, tokens - t0);
        for (int64_t j = begin; j < end; ++j) {
          const scalar_t* zj = zp + j * tokens + t0;
          for (int64_t t = 0; t < len; ++t) zrow[t] = static_cast<Acc>(zj[t]);
          mix_backward_row(acc.data(), gp + t0, tokens, len, zrow.data(), sp + pp[j], coef_e.data() + pp[j],
                           dcoef_e.data() + pp[j], pp[j + 1] - pp[j]);
          if (need_dz) {
            scalar_t* o = dzp + j * tokens + t0;
            for (int64_t t = 0; t < len; ++t) o[t] = static_cast<scalar_t>(acc[t]);
          }
        }
      }
    });
    Acc* dcp = dcoef.mutable_data_ptr<Acc>();
    const int64_t* mp = perm.const_data_ptr<int64_t>();
    for (int64_t e = 0; e < entries; ++e) dcp[mp[e]] = dcoef_e[e];
  });
  return {dz, dcoef};
}

TORCH_LIBRARY_IMPL(spectral_kernels, CPU, m) {
  m.impl("frod_mix", &frod_mix_cpu);
  m.impl("frod_mix_backward", &frod_mix_backward_cpu);
}

}  // namespace spectral_kernels
