// FRoD CPU kernels (math in spectral_kernels/ops/frod.py). Activations are
// feature-major, (features, T), so every term of the sparse product is a
// contiguous row operation over tokens:
//   mix:   out[i, :] = sum_{e in row i} coef[perm[e]] · in[src[e], :]
//   sddmm: grad[perm[e]] = sum_t g[i, t] · z[src[e], t]      for e in row i
// with the entries grouped by output row i (ptr is the row-pointer array of that
// CSR order). Tokens are processed in chunks sized so that one chunk of every
// input row stays in the last-level cache while all output rows use it; threads
// split the output rows. Accumulation is in float (double for double inputs).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../ops.h"

namespace spectral_kernels {
namespace {

// Bytes of one input tensor's token chunk that should stay cache-resident.
constexpr int64_t kChunkBytes = int64_t(4) << 20;

// The hot loops, cloned per instruction set and chosen when the library loads
// (no -march at build time). They are plain loops the compiler vectorises.
#define SK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

template <typename T, typename Acc>
inline void axpy_impl(Acc* acc, const T* x, Acc c, int64_t n) {
  for (int64_t t = 0; t < n; ++t) acc[t] += c * static_cast<Acc>(x[t]);
}

template <typename T, typename Acc>
inline Acc dot_impl(const Acc* a, const T* x, int64_t n) {
  Acc s = 0;
  for (int64_t t = 0; t < n; ++t) s += a[t] * static_cast<Acc>(x[t]);
  return s;
}

SK_CLONES void axpy(float* acc, const float* x, float c, int64_t n) { axpy_impl(acc, x, c, n); }
SK_CLONES void axpy(float* acc, const at::BFloat16* x, float c, int64_t n) { axpy_impl(acc, x, c, n); }
SK_CLONES void axpy(float* acc, const at::Half* x, float c, int64_t n) { axpy_impl(acc, x, c, n); }
SK_CLONES void axpy(double* acc, const double* x, double c, int64_t n) { axpy_impl(acc, x, c, n); }
SK_CLONES float dot(const float* a, const float* x, int64_t n) { return dot_impl(a, x, n); }
SK_CLONES float dot(const float* a, const at::BFloat16* x, int64_t n) { return dot_impl(a, x, n); }
SK_CLONES float dot(const float* a, const at::Half* x, int64_t n) { return dot_impl(a, x, n); }
SK_CLONES double dot(const double* a, const double* x, int64_t n) { return dot_impl(a, x, n); }

void check_plan(const at::Tensor& ptr, const at::Tensor& src, const at::Tensor& perm, const char* name) {
  TORCH_CHECK(ptr.dim() == 1 && ptr.size(0) >= 1 && ptr.scalar_type() == at::kLong, name,
              ": ptr must be a non-empty int64 vector");
  TORCH_CHECK(src.dim() == 1 && perm.sizes() == src.sizes() && src.scalar_type() == at::kLong &&
                  perm.scalar_type() == at::kLong,
              name, ": src and perm must be int64 vectors of the same length");
}

int64_t chunk_tokens(int64_t rows, int64_t tokens, int64_t elem) {
  const int64_t fit = kChunkBytes / std::max<int64_t>(1, rows * elem);
  return std::clamp<int64_t>(fit / 16 * 16, 64, std::max<int64_t>(tokens, 1));
}

}  // namespace

at::Tensor frod_mix_cpu(const at::Tensor& in_, const at::Tensor& coef_, const at::Tensor& ptr_,
                        const at::Tensor& src_, const at::Tensor& perm_) {
  TORCH_CHECK(in_.dim() == 2, "frod_mix: input must be (features, tokens)");
  check_plan(ptr_, src_, perm_, "frod_mix");
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
    for (int64_t t0 = 0; t0 < tokens; t0 += chunk) {
      const int64_t len = std::min(chunk, tokens - t0);
      at::parallel_for(0, rows_out, 16, [&](int64_t begin, int64_t end) {
        std::vector<Acc> acc(len);
        for (int64_t i = begin; i < end; ++i) {
          std::fill(acc.begin(), acc.end(), Acc(0));
          for (int64_t e = pp[i]; e < pp[i + 1]; ++e) axpy(acc.data(), xp + sp[e] * tokens + t0, cp[mp[e]], len);
          scalar_t* o = op + i * tokens + t0;
          for (int64_t t = 0; t < len; ++t) o[t] = static_cast<scalar_t>(acc[t]);
        }
      });
    }
  });
  return out;
}

at::Tensor frod_sddmm_cpu(const at::Tensor& g_, const at::Tensor& z_, const at::Tensor& ptr_,
                          const at::Tensor& src_, const at::Tensor& perm_) {
  TORCH_CHECK(g_.dim() == 2 && z_.dim() == 2 && g_.size(1) == z_.size(1) && g_.scalar_type() == z_.scalar_type(),
              "frod_sddmm: g and z must be (features, tokens) of the same dtype and token count");
  check_plan(ptr_, src_, perm_, "frod_sddmm");
  TORCH_CHECK(ptr_.size(0) - 1 == g_.size(0), "frod_sddmm: ptr has ", ptr_.size(0) - 1, " rows, g has ", g_.size(0));
  const auto g = g_.contiguous(), z = z_.contiguous();
  const auto ptr = ptr_.contiguous(), src = src_.contiguous(), perm = perm_.contiguous();
  const int64_t rows = g.size(0), tokens = g.size(1), entries = src.size(0);
  const auto acc_type = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto grad = at::zeros({entries}, g.options().dtype(acc_type));
  if (entries == 0 || tokens == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "frod_sddmm_cpu", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const int64_t* pp = ptr.const_data_ptr<int64_t>();
    const int64_t* sp = src.const_data_ptr<int64_t>();
    const int64_t* mp = perm.const_data_ptr<int64_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    Acc* out = grad.mutable_data_ptr<Acc>();
    const int64_t chunk = chunk_tokens(z.size(0), tokens, sizeof(scalar_t));
    // Entries are owned by their row's thread, so the per-chunk partial sums need no reduction.
    for (int64_t t0 = 0; t0 < tokens; t0 += chunk) {
      const int64_t len = std::min(chunk, tokens - t0);
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        std::vector<Acc> row(len);
        for (int64_t i = begin; i < end; ++i) {
          if (pp[i] == pp[i + 1]) continue;
          const scalar_t* gi = gp + i * tokens + t0;
          for (int64_t t = 0; t < len; ++t) row[t] = static_cast<Acc>(gi[t]);
          for (int64_t e = pp[i]; e < pp[i + 1]; ++e) out[mp[e]] += dot(row.data(), zp + sp[e] * tokens + t0, len);
        }
      });
    }
  });
  return grad;
}

TORCH_LIBRARY_IMPL(spectral_kernels, CPU, m) {
  m.impl("frod_mix", &frod_mix_cpu);
  m.impl("frod_sddmm", &frod_sddmm_cpu);
}

}  // namespace spectral_kernels
