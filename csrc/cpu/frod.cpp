// FRoD CPU kernels (math in spectral_kernels/ops/frod.py). Activations are
// feature-major, (features, T), so every term of the sparse product is a
// contiguous row operation over tokens. With the entries of M grouped by the row
// they write (ptr: row pointers of that CSR order; per entry src, the row it reads,
// and perm, its index into coef/dcoef):
//   mix:           out[i, :] = sum_{e in row i} coef[perm[e]] · in[src[e], :]
//   mix_backward:  dz[j, :]  = sum_{e in row j} coef[perm[e]] · g[src[e], :]   (M^T g)
//                  dcoef[perm[e]] = sum_t g[src[e], t] · z[j, t]              (sampled dM)
// in one pass: each row of g read for an entry serves both. Threads split the
// written rows. The coefficients are laid out in entry order first. Accumulation
// is in float (double for double inputs).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../frod_plan.h"
#include "../ops.h"
#include "simd.h"

namespace spectral_kernels {
namespace {

// Register blocks: a row's sum over its entries is held in SIMD registers for a block
// of tokens and written once, instead of being accumulated in memory entry by entry
// (one load, one FMA and one store per token and entry). Each vector of a block is a
// chain of dependent FMAs over the entries, and two FMA pipes of four cycles' latency
// need eight chains to stay busy: the mix's blocks are kWide vectors, the backward's
// half as many, each carrying two chains (dz and the sampled dot product). The last
// tokens go in blocks of half the width, a quarter, ..., one vector, then one at a time.
// Each row is processed over all tokens of a pass (chunk_tokens) at once: every entry
// then reads its input row's strip as one long stream, which the prefetchers follow.
// Short strips do not: passes of 256 KiB of the input were up to 3x slower than whole
// rows at n=1024 and 2048, T=512 to 2048 (2-core AMD EPYC, 2 threads, 1% density).
template <typename Acc>
struct Lanes {
  typedef Acc V __attribute__((vector_size(32)));  // GCC vector extension: follows each clone's ISA
  static constexpr int64_t kCount = 32 / sizeof(Acc);
};
constexpr int kWide = 8;

// out[b:] = sum_e coef[e] · in[src[e] * ld + b:] for one written row, in blocks of NV
// vectors while they fit, then of NV / 2, ...; returns the first token left (under one vector).
template <int NV, typename T, typename Acc>
SK_INLINE int64_t mix_blocks(T* __restrict__ out, const T* in, int64_t ld, int64_t b, int64_t len,
                             const int64_t* src, const Acc* coef, int64_t count) {
  using V = typename Lanes<Acc>::V;
  constexpr int64_t L = Lanes<Acc>::kCount;
  for (; b + NV * L <= len; b += NV * L) {
    V acc[NV] = {};
    for (int64_t e = 0; e < count; ++e) {
      const T* row = in + src[e] * ld + b;
      const Acc c = coef[e];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        V x;
        load_vec(x, row + v * L);
        acc[v] += c * x;
      }
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) store_vec(out + b + v * L, acc[v]);
  }
  if constexpr (NV > 1) return mix_blocks<NV / 2>(out, in, ld, b, len, src, coef, count);
  return b;
}

// out[:len] = sum_e coef[e] · in[src[e] * ld + :len] for one written row.
template <typename T, typename Acc>
SK_INLINE void mix_row_impl(T* __restrict__ out, const T* in, int64_t ld, int64_t len, const int64_t* src,
                            const Acc* coef, int64_t count) {
  for (int64_t b = mix_blocks<kWide>(out, in, ld, 0, len, src, coef, count); b < len; ++b) {
    Acc sum = 0;
    for (int64_t e = 0; e < count; ++e) sum += coef[e] * static_cast<Acc>(in[src[e] * ld + b]);
    out[b] = static_cast<T>(sum);
  }
}

// The backward's blocks, as mix_blocks: dz[b:] = sum_e coef[e] · g[src[e] * ld + b:]
// (when dz is non-null) and part[e] += the lane-wise sums of g[src[e] * ld + t] z[t].
template <int NV, typename T, typename Acc>
SK_INLINE int64_t mix_backward_blocks(T* __restrict__ dz, const T* g, int64_t ld, int64_t b, int64_t len,
                                      const T* z, const int64_t* src, const Acc* coef, int64_t count,
                                      Acc* __restrict__ part) {
  using V = typename Lanes<Acc>::V;
  constexpr int64_t L = Lanes<Acc>::kCount;
  for (; b + NV * L <= len; b += NV * L) {
    V zb[NV], acc[NV] = {};
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) load_vec(zb[v], z + b + v * L);
    for (int64_t e = 0; e < count; ++e) {
      const T* row = g + src[e] * ld + b;
      const Acc c = coef[e];
      V dot = {};
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        V gv;
        load_vec(gv, row + v * L);
        acc[v] += c * gv;
        dot += gv * zb[v];
      }
      V sum;
      load_vec(sum, part + e * L);
      store_vec(part + e * L, sum + dot);
    }
    if (dz) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) store_vec(dz + b + v * L, acc[v]);
    }
  }
  if constexpr (NV > 1) return mix_backward_blocks<NV / 2>(dz, g, ld, b, len, z, src, coef, count, part);
  return b;
}

// One row j of the backward over `len` tokens: dz[:len] = sum_e coef[e] · g[src[e] * ld + :len]
// (when dz is non-null) and dcoef[e] += sum_t g[src[e] * ld + t] z[t], reading each g row once.
// part: scratch of `count` vectors' worth of Acc for the per-entry partial dot products.
template <typename T, typename Acc>
SK_INLINE void mix_backward_row_impl(T* __restrict__ dz, const T* g, int64_t ld, int64_t len, const T* z,
                                     const int64_t* src, const Acc* coef, Acc* dcoef, int64_t count,
                                     Acc* __restrict__ part) {
  constexpr int64_t L = Lanes<Acc>::kCount;
  std::fill_n(part, count * L, Acc(0));
  int64_t b = mix_backward_blocks<kWide / 2>(dz, g, ld, 0, len, z, src, coef, count, part);
  for (int64_t e = 0; e < count; ++e) {
    Acc sum = 0;
    for (int l = 0; l < L; ++l) sum += part[e * L + l];
    dcoef[e] += sum;
  }
  for (; b < len; ++b) {
    const Acc zt = static_cast<Acc>(z[b]);
    Acc sum = 0;
    for (int64_t e = 0; e < count; ++e) {
      const Acc gv = static_cast<Acc>(g[src[e] * ld + b]);
      sum += coef[e] * gv;
      dcoef[e] += gv * zt;
    }
    if (dz) dz[b] = static_cast<T>(sum);
  }
}

#define SK_ROWS(T, Acc)                                                                                          \
  SK_CPU_CLONES void mix_row(T* out, const T* in, int64_t ld, int64_t len, const int64_t* src, const Acc* coef,    \
                             int64_t count) {                                                                    \
    mix_row_impl(out, in, ld, len, src, coef, count);                                                            \
  }                                                                                                              \
  SK_CPU_CLONES void mix_backward_row(T* dz, const T* g, int64_t ld, int64_t len, const T* z, const int64_t* src,   \
                                      const Acc* coef, Acc* dcoef, int64_t count, Acc* part) {                   \
    mix_backward_row_impl(dz, g, ld, len, z, src, coef, dcoef, count, part);                                     \
  }
SK_ROWS(float, float)
SK_ROWS(at::BFloat16, float)
SK_ROWS(at::Half, float)
SK_ROWS(double, double)
#undef SK_ROWS

// Whether ptr never decreases and every src and perm is below its bound, in branch-free
// vectorized passes (unsigned compares catch negatives too).
SK_CPU_CLONES bool plan_in_range(const int64_t* pp, int64_t rows, const int64_t* sp, const int64_t* mp,
                                 int64_t entries, int64_t in_rows, int64_t coefs) {
  int64_t ok = 1;
  for (int64_t i = 0; i < rows; ++i) ok &= pp[i] <= pp[i + 1];
  for (int64_t e = 0; e < entries; ++e)
    ok &= (static_cast<uint64_t>(sp[e]) < static_cast<uint64_t>(in_rows)) &
          (static_cast<uint64_t>(mp[e]) < static_cast<uint64_t>(coefs));
  return ok;
}

// The plan's values, which the kernels address memory with (O(rows + entries), next to
// O(T entries) work): ptr runs from 0 to the entry count without decreasing, every src
// is a row of the input (`in_rows` of them), every perm a coefficient.
void check_plan_values(const at::Tensor& ptr, const at::Tensor& src, const at::Tensor& perm, int64_t in_rows,
                       int64_t coefs, const char* name) {
  const int64_t* pp = ptr.const_data_ptr<int64_t>();
  const int64_t* sp = src.const_data_ptr<int64_t>();
  const int64_t* mp = perm.const_data_ptr<int64_t>();
  const int64_t rows = ptr.size(0) - 1, entries = src.size(0);
  TORCH_CHECK(pp[0] == 0 && pp[rows] == entries, name, ": ptr must run from 0 to ", entries, ", got ", pp[0], " to ",
              pp[rows]);
  if (plan_in_range(pp, rows, sp, mp, entries, in_rows, coefs)) return;  // else find the culprit for the message
  for (int64_t i = 0; i < rows; ++i) TORCH_CHECK(pp[i] <= pp[i + 1], name, ": ptr decreases at row ", i);
  for (int64_t e = 0; e < entries; ++e) {
    TORCH_CHECK(sp[e] >= 0 && sp[e] < in_rows, name, ": src ", sp[e], " out of range [0, ", in_rows, ")");
    TORCH_CHECK(mp[e] >= 0 && mp[e] < coefs, name, ": perm ", mp[e], " out of range [0, ", coefs, ")");
  }
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

// Tokens per pass over the rows. Each entry reads a strip of a random input row; an
// input of more than 12 MiB goes in passes of 8 MiB of it, which stay in the last-level
// cache while every row reads them. Sized on the 2-core EPYC (32 MiB L3) with glibc
// keeping freed memory, as the benchmark runs: passes halved the mix's time at 3072 and
// 4096 features and T = 2048, were even at 16 MiB for 1024 and 2048 features, and lost a
// little at 12 MiB, where each entry's strip is still one long stream.
int64_t chunk_tokens(int64_t rows, int64_t tokens, int64_t elem) {
  constexpr int64_t kWhole = int64_t(12) << 20, kPass = int64_t(8) << 20, kStep = kWide * Lanes<float>::kCount;
  if (rows * tokens * elem <= kWhole) return std::max<int64_t>(tokens, 1);
  return std::max<int64_t>(kPass / (rows * elem) / kStep * kStep, kStep);  // whole register blocks
}

}  // namespace

at::Tensor frod_mix_cpu(const at::Tensor& in_, const at::Tensor& coef, const at::Tensor& ptr_,
                        const at::Tensor& src_, const at::Tensor& perm_) {
  check_frod_plan(in_, coef, ptr_, src_, perm_, "frod_mix");
  const auto in = in_.contiguous();
  const auto ptr = ptr_.contiguous(), src = src_.contiguous(), perm = perm_.contiguous();
  const int64_t rows_out = ptr.size(0) - 1, tokens = in.size(1);
  check_plan_values(ptr, src, perm, in.size(0), coef.numel(), "frod_mix");
  auto out = at::empty({rows_out, tokens}, in.options());
  if (rows_out == 0 || tokens == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "frod_mix_cpu", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto coef_e = entry_coefficients<Acc>(coef, perm);
    const int64_t* pp = ptr.const_data_ptr<int64_t>();
    const int64_t* sp = src.const_data_ptr<int64_t>();
    const scalar_t* xp = in.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t chunk = chunk_tokens(in.size(0), tokens, sizeof(scalar_t));
    for (int64_t t0 = 0; t0 < tokens; t0 += chunk) {
      const int64_t len = std::min(chunk, tokens - t0);
      at::parallel_for(0, rows_out, 16, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          mix_row(op + i * tokens + t0, xp + t0, tokens, len, sp + pp[i], coef_e.data() + pp[i], pp[i + 1] - pp[i]);
      });
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> frod_mix_backward_cpu(const at::Tensor& g_, const at::Tensor& z_,
                                                        const at::Tensor& coef, const at::Tensor& ptr_,
                                                        const at::Tensor& src_, const at::Tensor& perm_, bool need_dz) {
  check_frod_backward(g_, z_, coef, ptr_, src_, perm_);
  const auto g = g_.contiguous(), z = z_.contiguous();
  const auto ptr = ptr_.contiguous(), src = src_.contiguous(), perm = perm_.contiguous();
  const int64_t rows = z.size(0), tokens = z.size(1), entries = src.size(0);
  check_plan_values(ptr, src, perm, g.size(0), std::min(coef.numel(), entries), "frod_mix_backward");
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
    int64_t widest = 0;
    for (int64_t j = 0; j < rows; ++j) widest = std::max(widest, pp[j + 1] - pp[j]);
    // Entries are owned by their row's thread: their sums need no reduction.
    const int64_t chunk = chunk_tokens(g.size(0), tokens, sizeof(scalar_t));
    for (int64_t t0 = 0; t0 < tokens; t0 += chunk) {
      const int64_t len = std::min(chunk, tokens - t0);
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        std::vector<Acc> part(widest * Lanes<Acc>::kCount);
        for (int64_t j = begin; j < end; ++j) {
          mix_backward_row(need_dz ? dzp + j * tokens + t0 : nullptr, gp + t0, tokens, len, zp + j * tokens + t0,
                           sp + pp[j], coef_e.data() + pp[j], dcoef_e.data() + pp[j], pp[j + 1] - pp[j], part.data());
        }
      });
    }
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
