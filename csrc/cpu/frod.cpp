// FRoD CPU kernels (math in spectral_kernels/ops/frod.py). Activations are
// feature-major, (features, T), so every term of the sparse product is a
// contiguous row operation over tokens. With the entries of M grouped by the row
// they write (ptr: row pointers of that CSR order; per entry src, the row it reads,
// and perm, its index into coef/dcoef):
//   mix:           out[i, :] = sum_{e in row i} coef[perm[e]] · in[src[e], :]
//   mix_backward:  dz[j, :]  = sum_{e in row j} coef[perm[e]] · g[src[e], :]   (M^T g)
//                  dcoef[perm[e]] = sum_t g[src[e], t] · z[j, t]              (sampled dM)
// in one pass: each row of g read for an entry serves both. Threads split the
// output rows; tokens go in chunks so that one chunk of every input row stays in
// cache while the rows of the thread use it. Accumulation is in float (double
// for double inputs).
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

// Bytes of one input tensor's token chunk that should stay cache-resident.
constexpr int64_t kChunkBytes = int64_t(1024) << 10;

// The hot loops, cloned per instruction set and chosen when the library loads
// (no -march at build time). They are plain loops the compiler vectorises.
#define SK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

template <typename T, typename Acc>
inline void axpy_impl(Acc* acc, const T* x, Acc c, int64_t n) {
  for (int64_t t = 0; t < n; ++t) acc[t] += c * static_cast<Acc>(x[t]);
}

// acc += c · g and returns sum_t g[t] z[t], reading g once.
template <typename T, typename Acc>
inline Acc axpy_dot_impl(Acc* acc, const T* g, const Acc* z, Acc c, int64_t n) {
  Acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t t = 0; t < n; ++t) {
    const Acc gv = static_cast<Acc>(g[t]);
    acc[t] += c * gv;
    s += gv * z[t];
  }
  return s;
}

SK_CLONES void axpy(float* acc, const float* x, float c, int64_t n) { axpy_impl(acc, x, c, n); }
SK_CLONES void axpy(float* acc, const at::BFloat16* x, float c, int64_t n) { axpy_impl(acc, x, c, n); }
SK_CLONES void axpy(float* acc, const at::Half* x, float c, int64_t n) { axpy_impl(acc, x, c, n); }
SK_CLONES void axpy(double* acc, const double* x, double c, int64_t n) { axpy_impl(acc, x, c, n); }
#define SK_AXPY_DOT(T, Acc) \
  SK_CLONES Acc axpy_dot(Acc* acc, const T* g, const Acc* z, Acc c, int64_t n) { return axpy_dot_impl(acc, g, z, c, n); }
SK_AXPY_DOT(float, float)
SK_AXPY_DOT(at::BFloat16, float)
SK_AXPY_DOT(at::Half, float)
SK_AXPY_DOT(double, double)
#undef SK_AXPY_DOT

int64_t chunk_tokens(int64_t rows, int64_t tokens, int64_t elem) {
  const int64_t fit = kChunkBytes / std::max<int64_t>(1, rows * elem);
  return std::clamp<int64_t>(fit / 16 * 16, 16, std::max<int64_t>(tokens, 1));
}

}  // namespace

at::Tensor frod_mix_cpu(const at::Tensor& in_, const at::Tensor& coef_, const at::Tensor& ptr_,
                        const at::Tensor& src_, const at::Tensor& perm_) {
  check_frod_plan(in_, ptr_, src_, perm_, "frod_mix");
  const auto in = in_.contiguous();
  const auto ptr = ptr_.contiguous(), src = src_.contiguous(), perm = perm_.contiguous();
  const int64_t rows_out = ptr.size(0) - 1, tokens = in.size(1);
  auto out = at::empty({rows_out, tokens}, in.options());
  if (rows_out == 0 || tokens == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "frod_mix_cpu", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto coef = coef_.to(c10::CppTypeToScalarType<Acc>::value).contiguous();
    const Acc* cp = coef.const_data_ptr<Acc>();
    const int64_t* pp = ptr.const_data_ptr<int64_t>();
    const int64_t* sp = src.const_data_ptr<int64_t>();
    const int64_t* mp = perm.const_data_ptr<int64_t>();
    const scalar_t* xp = in.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t chunk = chunk_tokens(in.size(0), tokens, sizeof(scalar_t));
    at::parallel_for(0, rows_out, 16, [&](int64_t begin, int64_t end) {
      std::vector<Acc> acc(std::min(chunk, tokens));
      for (int64_t t0 = 0; t0 < tokens; t0 += chunk) {
        const int64_t len = std::min(chunk, tokens - t0);
        for (int64_t i = begin; i < end; ++i) {
          std::fill_n(acc.begin(), len, Acc(0));
          for (int64_t e = pp[i]; e < pp[i + 1]; ++e) axpy(acc.data(), xp + sp[e] * tokens + t0, cp[mp[e]], len);
          scalar_t* o = op + i * tokens + t0;
          for (int64_t t = 0; t < len; ++t) o[t] = static_cast<scalar_t>(acc[t]);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> frod_mix_backward_cpu(const at::Tensor& g_, const at::Tensor& z_,
                                                        const at::Tensor& coef_, const at::Tensor& ptr_,
                                                        const at::Tensor& src_, const at::Tensor& perm_, bool need_dz) {
  check_frod_backward(g_, z_, ptr_, src_, perm_);
  const auto g = g_.contiguous(), z = z_.contiguous();
  const auto ptr = ptr_.contiguous(), src = src_.contiguous(), perm = perm_.contiguous();
  const int64_t rows = z.size(0), tokens = z.size(1), entries = src.size(0);
  const auto acc_type = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto dcoef = at::zeros({entries}, g.options().dtype(acc_type));
  auto dz = need_dz ? at::empty({rows, tokens}, g.options()) : at::empty({0}, g.options());
  if (rows == 0 || tokens == 0) {
    if (need_dz) dz.zero_();
    return {dz, dcoef};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "frod_mix_backward_cpu", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto coef = coef_.to(c10::CppTypeToScalarType<Acc>::value).contiguous();
    const Acc* cp = coef.const_data_ptr<Acc>();
    const int64_t* pp = ptr.const_data_ptr<int64_t>();
    const int64_t* sp = src.const_data_ptr<int64_t>();
    const int64_t* mp = perm.const_data_ptr<int64_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    Acc* dcp = dcoef.mutable_data_ptr<Acc>();
    scalar_t* dzp = need_dz ? dz.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t chunk = chunk_tokens(g.size(0), tokens, sizeof(scalar_t));
    // Entries are owned by their row's thread: the per-chunk partial sums need no reduction.
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<Acc> acc(std::min(chunk, tokens)), zrow(acc.size());
      for (int64_t t0 = 0; t0 < tokens; t0 += chunk) {
        const int64_t len = std::min(chunk, tokens - t0);
        for (int64_t j = begin; j < end; ++j) {
          const scalar_t* zj = zp + j * tokens + t0;
          for (int64_t t = 0; t < len; ++t) zrow[t] = static_cast<Acc>(zj[t]);
          std::fill_n(acc.begin(), len, Acc(0));
          for (int64_t e = pp[j]; e < pp[j + 1]; ++e)
            dcp[mp[e]] += axpy_dot(acc.data(), gp + sp[e] * tokens + t0, zrow.data(), cp[mp[e]], len);
          if (need_dz) {
            scalar_t* o = dzp + j * tokens + t0;
            for (int64_t t = 0; t < len; ++t) o[t] = static_cast<scalar_t>(acc[t]);
          }
        }
      }
    });
  });
  return {dz, dcoef};
}

TORCH_LIBRARY_IMPL(spectral_kernels, CPU, m) {
  m.impl("frod_mix", &frod_mix_cpu);
  m.impl("frod_mix_backward", &frod_mix_backward_cpu);
}

}  // namespace spectral_kernels
