// FourierFT CPU kernels (OpenMP). Complex tensors are read as interleaved
// (re, im) pairs; accumulation is in the real type of the complex input.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "../fourierft_fold.h"
#include "../ops.h"
#include "simd.h"

namespace spectral_kernels {
namespace {

// Every index in [0, n): the kernels address memory with them (O(nnz), next to O(T nnz) work).
void check_range(const at::Tensor& idx, int64_t n, const char* what) {
  const auto contiguous = idx.contiguous();
  const int64_t* p = contiguous.data_ptr<int64_t>();
  for (int64_t k = 0; k < contiguous.numel(); ++k)
    TORCH_CHECK(p[k] >= 0 && p[k] < n, "fourierft: ", what, " index ", p[k], " out of range [0, ", n, ")");
}

}  // namespace

// out[2q], out[2q+1] += w exp(-2 pi i v q / n) for q in [q0, q1): one coefficient
// at column v added to its row of the row-transformed spectrum. The phasors of
// kLanes consecutive bins advance by one complex multiply per step and are re-read
// from the twiddle table (rounded from double) every kAnchor bins, so that at most
// kAnchor / kLanes roundings accumulate.
constexpr int64_t kAnchor = 64;
#define SK_ROW_TERMS(T)                                                                                           \
  SK_CPU_CLONES void row_terms(const T* __restrict__ tw, int64_t n, int64_t v, T w, int64_t q0, int64_t q1,       \
                               T* __restrict__ out) {                                                             \
    typedef T V __attribute__((vector_size(32)));                                                                 \
    constexpr int kLanes = 16 / sizeof(T); /* complex numbers per vector */                                       \
    const int64_t s = v * kLanes % n;                                                                             \
    V step_re, step_im;                                                                                           \
    for (int l = 0; l < kLanes; ++l) {                                                                            \
      step_re[2 * l] = step_re[2 * l + 1] = tw[2 * s];                                                            \
      step_im[2 * l] = -tw[2 * s + 1];                                                                            \
      step_im[2 * l + 1] = tw[2 * s + 1];                                                                         \
    }                                                                                                             \
    for (int64_t q = q0; q < q1;) {                                                                               \
      const int64_t end = std::min(q1, q + kAnchor);                                                              \
      V p;                                                                                                        \
      for (int l = 0; l < kLanes; ++l) {                                                                          \
        const int64_t j = v * (q + l) % n;                                                                        \
        p[2 * l] = tw[2 * j];                                                                                     \
        p[2 * l + 1] = tw[2 * j + 1];                                                                             \
      }                                                                                                           \
      for (; q + kLanes <= end; q += kLanes) {                                                                    \
        V o, swapped;                                                                                             \
        load_vec(o, out + 2 * q);                                                                                 \
        store_vec(out + 2 * q, o + w * p);                                                                        \
        for (int l = 0; l < 2 * kLanes; ++l) swapped[l] = p[l ^ 1];                                               \
        p = p * step_re + swapped * step_im; /* (a + ib)(c + id) */                                               \
      }                                                                                                           \
      for (; q < end; ++q) {                                                                                      \
        const int64_t j = v * q % n;                                                                              \
        out[2 * q] += w * tw[2 * j];                                                                              \
        out[2 * q + 1] += w * tw[2 * j + 1];                                                                      \
      }                                                                                                           \
    }                                                                                                             \
  }
SK_ROW_TERMS(float)
SK_ROW_TERMS(double)
#undef SK_ROW_TERMS

at::Tensor fourierft_spectrum_rows_cpu(const at::Tensor& coef_in, const at::Tensor& rows_in, const at::Tensor& cols_in,
                                      int64_t m, int64_t n, double scale) {
  check_spectrum_rows_args(coef_in, rows_in, cols_in, m, n);
  check_range(rows_in, m, "row");
  check_range(cols_in, n, "column");
  const auto coef = coef_in.contiguous();
  const auto rows = rows_in.contiguous();
  const auto cols = cols_in.contiguous();
  const int64_t bins = n / 2 + 1, nnz = coef.numel();
  auto out = at::empty({m, bins}, coef.options().dtype(c10::toComplexType(coef.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES(coef.scalar_type(), "fourierft_spectrum_rows_cpu", [&] {
    // exp(-2 pi i j / n) for j < n, in double before rounding to scalar_t.
    std::vector<scalar_t> twiddle(2 * n);
    for (int64_t j = 0; j < n; ++j) {
      const double angle = -2.0 * M_PI * static_cast<double>(j) / static_cast<double>(n);
      twiddle[2 * j] = static_cast<scalar_t>(std::cos(angle));
      twiddle[2 * j + 1] = static_cast<scalar_t>(std::sin(angle));
    }
    const scalar_t* c = coef.data_ptr<scalar_t>();
    const int64_t* r = rows.data_ptr<int64_t>();
    const int64_t* v = cols.data_ptr<int64_t>();
    scalar_t* o = reinterpret_cast<scalar_t*>(out.data_ptr());
    const scalar_t s = static_cast<scalar_t>(scale);
    // Threads own ranges of bins (zeroing them first), so coefficients sharing a row never race.
    at::parallel_for(0, (bins + kAnchor - 1) / kAnchor, 1, [&](int64_t a0, int64_t a1) {
      const int64_t q0 = a0 * kAnchor, q1 = std::min(bins, a1 * kAnchor);
      for (int64_t u = 0; u < m; ++u) std::fill(o + 2 * (u * bins + q0), o + 2 * (u * bins + q1), scalar_t(0));
      for (int64_t k = 0; k < nnz; ++k) row_terms(twiddle.data(), n, v[k], s * c[k], q0, q1, o + 2 * r[k] * bins);
    });
  });
  return out;
}

namespace {

// out[p, q] = base[p, q] + Re F[p, q] for the 2-D transform F of a real matrix given
// as ft = F[:, :n/2+1]^T (bins, m), the layout in which MKL returns the FFT along the
// columns; the bins past n/2 are read by Hermitian symmetry, Re F[p, q] =
// Re F[(m - p) % m, n - q]. Tiles of kRows output rows are gathered from ft's rows
// (contiguous runs of kRows) into a buffer, then added to base at unit stride.
constexpr int64_t kRows = 16;

template <typename Out, typename Acc>
void real_mirror(const Acc* ft, const Out* base, Out* out, int64_t m, int64_t n) {
  const int64_t bins = n / 2 + 1;
  at::parallel_for(0, (m + kRows - 1) / kRows, 1, [&](int64_t tile0, int64_t tile1) {
    // Lines one cache line longer than n: at n = 1024 they would all map to one L1 set.
    const int64_t ld = n + 64 / sizeof(Acc);
    Acc* lines = scratch<Acc>(0, kRows * ld);
    for (int64_t tile = tile0; tile < tile1; ++tile) {
      const int64_t p0 = tile * kRows, rows = std::min(kRows, m - p0);
      for (int64_t q = 0; q < bins; ++q) {
        const Acc* src = ft + 2 * (q * m + p0);
        for (int64_t i = 0; i < rows; ++i) lines[i * ld + q] = src[2 * i];
      }
      // Mirrored rows (m - p) % m: row 0 reads itself, the others the run ending at m - p0.
      const int64_t first = p0 == 0 ? 1 : 0;
      for (int64_t q = bins; q < n; ++q) {
        const Acc* src = ft + 2 * (n - q) * m;
        if (first) lines[q] = src[0];
        for (int64_t i = first; i < rows; ++i) lines[i * ld + q] = src[2 * (m - p0 - i)];
      }
      for (int64_t i = 0; i < rows; ++i) {
        const Acc* line = lines + i * ld;
        Out* o = out + (p0 + i) * n;
        if (base) {
          const Out* b = base + (p0 + i) * n;
          for (int64_t q = 0; q < n; ++q) o[q] = static_cast<Out>(static_cast<Acc>(b[q]) + line[q]);
        } else {
          for (int64_t q = 0; q < n; ++q) o[q] = static_cast<Out>(line[q]);
        }
      }
    }
  });
}

}  // namespace

at::Tensor fourierft_real_mirror_cpu(const at::Tensor& ft_in, const std::optional<at::Tensor>& base_in, int64_t n) {
  const auto args = real_mirror_args(ft_in, base_in, n);
  const at::Tensor& base = args.base;
  const at::Tensor& out = args.out;
  const int64_t m = out.size(0);
  const auto ft = ft_in.contiguous();
  const bool wide = ft.scalar_type() == at::kComplexDouble;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "fourierft_real_mirror_cpu", [&] {
    const scalar_t* b = base.defined() ? base.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (wide) {
      real_mirror(reinterpret_cast<const double*>(ft.const_data_ptr()), b, o, m, n);
    } else {
      real_mirror(reinterpret_cast<const float*>(ft.const_data_ptr()), b, o, m, n);
    }
  });
  return out;
}

// Where coefficient k reads in a half spectrum of length n: the stored bin and the
// sign of its imaginary part (see plus_transform_at). Resolved once per call so the
// token loops below are branch-free.
struct Gather {
  std::vector<int32_t> bin;
  std::vector<int8_t> im_sign;
  Gather(const int64_t* g, int64_t nnz, int64_t n) : bin(nnz), im_sign(nnz) {
    for (int64_t k = 0; k < nnz; ++k) {
      const bool low = 2 * g[k] <= n;
      bin[k] = static_cast<int32_t>(low ? g[k] : n - g[k]);
      im_sign[k] = low ? -1 : 1;
    }
  }
};

// The sampled reduction works on tiles of kTile tokens whose spectra are first
// transposed into (bin, token) planes of real and imaginary parts, holding only the
// bins some coefficient reads. Every coefficient is then two contiguous dot products
// of length kTile, vectorized without gathers (slow on many x86 cores). On the 2-core
// AMD EPYC machine at T=2048, 1024 x 1024, n=1000: 1.25 ms against 1.6 ms for a
// per-token loop gathering from the spectra directly.
constexpr int64_t kTile = 32;

// Rows of the tile planes: one per bin that some coefficient reads, in bin order
// (bins of a half spectrum of length n, so no sort is needed).
struct Planes {
  std::vector<int32_t> bin;     // plane row -> stored bin
  std::vector<int32_t> row;     // coefficient -> plane row
  std::vector<int32_t> row_of;  // stored bin -> plane row, -1 where no coefficient reads it
  Planes(const Gather& g, int64_t n) : row(g.bin.size()), row_of(n / 2 + 1, -1) {
    for (int32_t b : g.bin) row_of[b] = 0;
    for (int32_t b = 0; b <= n / 2; ++b) {
      if (row_of[b] == 0) {
        row_of[b] = static_cast<int32_t>(bin.size());
        bin.push_back(b);
      }
    }
    for (size_t k = 0; k < row.size(); ++k) row[k] = row_of[g.bin[k]];
  }
};

typedef float F8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));

// The lanes (indices into a then b) of two 8-float vectors: GCC's __builtin_shufflevector
// is GCC 12 or newer, its __builtin_shuffle GCC only.
#if defined(__clang__)
#define SK_SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SK_SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, I8{__VA_ARGS__})
#endif

// v[c] <- column c of the 8 x 8 matrix whose rows are v[0..8).
SK_INLINE void transpose8x8(F8* v) {
  F8 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = SK_SHUFFLE8(v[i], v[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = SK_SHUFFLE8(v[i], v[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    for (int j = 0; j < 2; ++j) {
      u[i + 2 * j] = SK_SHUFFLE8(t[i + j], t[i + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * j + 1] = SK_SHUFFLE8(t[i + j], t[i + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  }
  for (int c = 0; c < 4; ++c) {
    v[c] = SK_SHUFFLE8(u[c], u[c + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    v[c + 4] = SK_SHUFFLE8(u[c], u[c + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// The float planes of `groups` groups of 8 tokens of a tile from the spectra (rows of
// `bins` complex), 4 bins at a time: the group's 8 rows of 8 floats (re, im of the 4
// bins), transposed in registers, are the re and im plane rows of those bins for its
// tokens. A group at a time, so that 8 rows are read as streams. The element-wise copy
// (the tails, and double) was most of the time of the sampled reduction.
SK_CPU_CLONES void transpose_groups(const float* spectra, int64_t bins, int64_t groups, const int32_t* row_of,
                                    int64_t width, float* re, float* im) {
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t q = 0; q + 4 <= bins; q += 4) {
      F8 v[8];
      for (int i = 0; i < 8; ++i) load_vec(v[i], spectra + 2 * ((8 * g + i) * bins + q));
      transpose8x8(v);
      for (int c = 0; c < 4; ++c) {
        const int64_t r = row_of[q + c];
        if (r < 0) continue;
        store_vec(re + r * width + 8 * g, v[2 * c]);
        store_vec(im + r * width + 8 * g, v[2 * c + 1]);
      }
    }
  }
}

// re/im planes (rows x width) of `tokens` (<= width) rows of a half spectrum of `bins`
// bins, zero past `tokens`: whole groups of 8 tokens and 4 bins by transpose_groups
// (float), the rest element by element, row by row so that consecutive rows read the
// same cache lines of the spectra.
template <typename scalar_t>
void transpose_tile(const scalar_t* spectra, int64_t bins, int64_t tokens, const Planes& p, int64_t width,
                    scalar_t* re, scalar_t* im) {
  int64_t grouped = 0;  // tokens of the bins below bins / 4 * 4 that transpose_groups wrote
  if constexpr (std::is_same_v<scalar_t, float>) {
    grouped = tokens / 8 * 8;
    transpose_groups(spectra, bins, grouped / 8, p.row_of.data(), width, re, im);
  }
  const int64_t rows = static_cast<int64_t>(p.bin.size());
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* src = spectra + 2 * p.bin[r];
    scalar_t* dr = re + r * width;
    scalar_t* di = im + r * width;
    for (int64_t t = p.bin[r] < bins / 4 * 4 ? grouped : 0; t < tokens; ++t) {
      dr[t] = src[2 * t * bins];
      di[t] = src[2 * t * bins + 1];
    }
    std::fill(dr + tokens, dr + width, scalar_t(0));
    std::fill(di + tokens, di + width, scalar_t(0));
  }
}

// The inverse of transpose_groups: rows of `bins` complex for `groups` groups of 8 tokens
// from the planes of the bins that have one (row_of[bin] >= 0), zeros in the others.
SK_CPU_CLONES void untranspose_groups(const float* re, const float* im, const int32_t* row_of, int64_t bins,
                                      int64_t groups, int64_t width, float* out) {
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t q = 0; q + 4 <= bins; q += 4) {
      F8 v[8];
      for (int c = 0; c < 4; ++c) {
        const int64_t r = row_of[q + c];
        v[2 * c] = v[2 * c + 1] = F8{};
        if (r < 0) continue;
        load_vec(v[2 * c], re + r * width + 8 * g);
        load_vec(v[2 * c + 1], im + r * width + 8 * g);
      }
      transpose8x8(v);
      for (int i = 0; i < 8; ++i) store_vec(out + 2 * ((8 * g + i) * bins + q), v[i]);
    }
  }
}

// `tokens` (<= width) rows of a half spectrum of row_of.size() bins from the planes of
// the bins in `bin` (plane row -> bin; row_of the other way, -1 for a bin without a
// row, which is zero): whole groups of 8 tokens by 4 bins by untranspose_groups
// (float), the rest element by element.
template <typename scalar_t>
void untranspose_tile(const scalar_t* re, const scalar_t* im, const std::vector<int32_t>& bin,
                      const std::vector<int32_t>& row_of, int64_t tokens, int64_t width, scalar_t* out) {
  const int64_t bins = static_cast<int64_t>(row_of.size());
  int64_t done = 0;  // bins written for every token by untranspose_groups
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (tokens % 8 == 0) {
      untranspose_groups(re, im, row_of.data(), bins, tokens / 8, width, out);
      done = bins / 4 * 4;
    }
  }
  for (int64_t t = 0; t < tokens; ++t) std::fill(out + 2 * (t * bins + done), out + 2 * (t + 1) * bins, scalar_t(0));
  for (size_t r = 0; r < bin.size(); ++r) {
    if (bin[r] < done) continue;
    scalar_t* dst = out + 2 * bin[r];
    for (int64_t t = 0; t < tokens; ++t) {
      dst[2 * t * bins] = re[r * width + t];
      dst[2 * t * bins + 1] = im[r * width + t];
    }
  }
}

// The mix, out[t, scatter bins] += w_k X^[t, gather_k] kept Hermitian, works on tiles
// of kMixTile tokens (one SIMD vector of floats), transposed into planes as above. Each
// coefficient becomes one or two terms (plane row read, output bin written, weights of
// the real and imaginary parts), grouped by output bin, so that each used output bin
// sums its terms for the tile in registers and is written once. Against a per-token
// loop that added each term into its output bin in memory, on the 2-core AMD EPYC with
// n=1000 (2 threads): 512 x 512, 62 against 127 us at T=128, 34 against 58 at T=32,
// 22 against 21 at T=1; 4096 x 4096 (as many bins as terms, so the transposes weigh
// more), 180 against 192 us at T=128, 67 against 62 at T=32, 35 against 24 at T=1.
// Tiles of 32 tokens were no faster and leave a thread idle at T <= 32.
constexpr int64_t kMixTile = 8;

template <typename scalar_t>
struct MixTerm {
  int32_t src;  // plane row
  scalar_t w_re, w_im;
};

template <typename scalar_t>
struct MixPlan {
  std::vector<int32_t> bin;  // output row -> output bin, ascending
  std::vector<int32_t> ptr;  // output row -> its terms [ptr[r], ptr[r + 1])
  std::vector<MixTerm<scalar_t>> terms;
};

// (out_re, out_im)[r, :] = sum over r's terms of (w_re re[src, :], w_im im[src, :]) over a tile.
#define SK_MIX_TILE(T)                                                                                             \
  SK_CPU_CLONES void mix_tile(const T* __restrict__ re, const T* __restrict__ im, const int32_t* __restrict__ ptr, \
                              const MixTerm<T>* __restrict__ terms, int64_t rows, T* __restrict__ out_re,          \
                              T* __restrict__ out_im) {                                                            \
    typedef T V __attribute__((vector_size(32)));                                                                  \
    constexpr int64_t kLanes = 32 / sizeof(T), kVecs = kMixTile / kLanes;                                          \
    for (int64_t r = 0; r < rows; ++r) {                                                                           \
      V acc_re[kVecs] = {}, acc_im[kVecs] = {};                                                                    \
      for (int32_t e = ptr[r]; e < ptr[r + 1]; ++e) {                                                              \
        const MixTerm<T> term = terms[e];                                                                          \
        for (int64_t v = 0; v < kVecs; ++v) {                                                                      \
          V a, b;                                                                                                  \
          load_vec(a, re + term.src * kMixTile + v * kLanes);                                                      \
          load_vec(b, im + term.src * kMixTile + v * kLanes);                                                      \
          acc_re[v] += term.w_re * a;                                                                              \
          acc_im[v] += term.w_im * b;                                                                              \
        }                                                                                                          \
      }                                                                                                            \
      for (int64_t v = 0; v < kVecs; ++v) {                                                                        \
        store_vec(out_re + r * kMixTile + v * kLanes, acc_re[v]);                                                  \
        store_vec(out_im + r * kMixTile + v * kLanes, acc_im[v]);                                                  \
      }                                                                                                            \
    }                                                                                                              \
  }
SK_MIX_TILE(float)
SK_MIX_TILE(double)
#undef SK_MIX_TILE

at::Tensor fourierft_mix_cpu(const at::Tensor& xf_in, const at::Tensor& coef_in, const at::Tensor& gather_in,
                             const at::Tensor& scatter_in, int64_t n_in, int64_t n_out, double scale) {
  check_mix_args(xf_in, coef_in, gather_in, scatter_in, n_in, n_out);
  check_range(gather_in, n_in, "gather");
  check_range(scatter_in, n_out, "scatter");
  const auto xf = xf_in.contiguous();
  const auto coef = coef_in.contiguous().to(c10::toRealValueType(xf.scalar_type()));
  const auto scatter = scatter_in.contiguous();
  const int64_t tokens = xf.size(0), nnz = coef.numel();
  const int64_t in_stride = n_in / 2 + 1, out_stride = n_out / 2 + 1;
  const Gather src(gather_in.contiguous().data_ptr<int64_t>(), nnz, n_in);
  const Planes planes(src, n_in);
  auto out = at::empty({tokens, out_stride}, xf.options());
  if (tokens == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(coef.scalar_type(), "fourierft_mix_cpu", [&] {
    const scalar_t* c = coef.data_ptr<scalar_t>();
    const int64_t* dst = scatter.data_ptr<int64_t>();
    const scalar_t s = static_cast<scalar_t>(scale) / 2;
    // The terms with their output bins, then placed in bin order (a counting sort).
    std::vector<std::pair<int32_t, MixTerm<scalar_t>>> unsorted;
    unsorted.reserve(2 * nnz);
    std::vector<int32_t> count(out_stride, 0);
    for (int64_t k = 0; k < nnz; ++k) {
      int64_t first, second;
      hermitian_bins(dst[k], n_out, first, second);
      const scalar_t w = s * c[k], w_im = w * src.im_sign[k];
      if (first >= 0) unsorted.push_back({static_cast<int32_t>(first), {planes.row[k], w, w_im}});
      if (second >= 0) unsorted.push_back({static_cast<int32_t>(second), {planes.row[k], w, -w_im}});
    }
    for (const auto& term : unsorted) ++count[term.first];
    MixPlan<scalar_t> plan;
    std::vector<int32_t> row_of(out_stride, -1);  // output bin -> output row
    plan.ptr.push_back(0);
    for (int64_t bin = 0; bin < out_stride; ++bin) {
      if (count[bin] == 0) continue;
      row_of[bin] = static_cast<int32_t>(plan.bin.size());
      plan.bin.push_back(static_cast<int32_t>(bin));
      plan.ptr.push_back(plan.ptr.back() + count[bin]);
    }
    std::vector<int32_t> next(plan.ptr.begin(), plan.ptr.end() - 1);
    plan.terms.resize(unsorted.size());
    for (const auto& term : unsorted) plan.terms[next[row_of[term.first]]++] = term.second;
    const int64_t in_rows = static_cast<int64_t>(planes.bin.size()), out_rows = static_cast<int64_t>(plan.bin.size());
    const scalar_t* x = reinterpret_cast<const scalar_t*>(xf.data_ptr());
    scalar_t* y = reinterpret_cast<scalar_t*>(out.data_ptr());
    at::parallel_for(0, (tokens + kMixTile - 1) / kMixTile, 1, [&](int64_t tile0, int64_t tile1) {
      scalar_t* re = scratch<scalar_t>(0, 2 * kMixTile * (in_rows + out_rows));
      scalar_t *im = re + in_rows * kMixTile, *out_re = im + in_rows * kMixTile, *out_im = out_re + out_rows * kMixTile;
      for (int64_t tile = tile0; tile < tile1; ++tile) {
        const int64_t t0 = tile * kMixTile, rows = std::min(kMixTile, tokens - t0);
        transpose_tile(x + 2 * t0 * in_stride, in_stride, rows, planes, kMixTile, re, im);
        mix_tile(re, im, plan.ptr.data(), plan.terms.data(), out_rows, out_re, out_im);
        untranspose_tile(out_re, out_im, plan.bin, row_of, rows, kMixTile, y + 2 * t0 * out_stride);
      }
    });
  });
  return out;
}

// acc[k] += sum over the tile of Re(X^[a_k] Y^[b_k]) = xr.yr - sign_k xi.yi, in
// 32-byte vectors (GCC vector extension: the code follows each clone's ISA); written
// out per type because target_clones does not apply to templates.
#define SK_REDUCE_TILE(T)                                                                                         \
  SK_CPU_CLONES void reduce_tile(const T* __restrict__ xr, const T* __restrict__ xi, const T* __restrict__ yr,     \
                                 const T* __restrict__ yi, const int32_t* __restrict__ xrow,                      \
                                 const int32_t* __restrict__ yrow, const T* __restrict__ sign, T* __restrict__ acc, \
                                 int64_t nnz) {                                                                   \
    typedef T V __attribute__((vector_size(32)));                                                                 \
    constexpr int kLanes = 32 / sizeof(T);                                                                        \
    for (int64_t k = 0; k < nnz; ++k) {                                                                           \
      const int64_t a = xrow[k] * kTile, b = yrow[k] * kTile;                                                     \
      V re = {}, im = {};                                                                                         \
      for (int64_t t = 0; t < kTile; t += kLanes) {                                                               \
        V u, v, w, z;                                                                                             \
        load_vec(u, xr + a + t);                                                                                  \
        load_vec(v, yr + b + t);                                                                                  \
        load_vec(w, xi + a + t);                                                                                  \
        load_vec(z, yi + b + t);                                                                                  \
        re += u * v;                                                                                              \
        im += w * z;                                                                                              \
      }                                                                                                           \
      const V d = re - sign[k] * im;                                                                              \
      T sum = 0;                                                                                                  \
      for (int l = 0; l < kLanes; ++l) sum += d[l];                                                               \
      acc[k] += sum;                                                                                              \
    }                                                                                                             \
  }
SK_REDUCE_TILE(float)
SK_REDUCE_TILE(double)
#undef SK_REDUCE_TILE

at::Tensor fourierft_coef_grad_cpu(const at::Tensor& xf_in, const at::Tensor& yf_in, const at::Tensor& x_idx_in,
                                   const at::Tensor& y_idx_in, int64_t n_x, int64_t n_y, double scale) {
  check_coef_grad_args(xf_in, yf_in, x_idx_in, y_idx_in, n_x, n_y);
  check_range(x_idx_in, n_x, "x");
  check_range(y_idx_in, n_y, "y");
  const auto xf = xf_in.contiguous();
  const auto yf = yf_in.contiguous().to(xf.scalar_type());
  const int64_t tokens = xf.size(0), nnz = x_idx_in.numel();
  const int64_t x_stride = n_x / 2 + 1, y_stride = n_y / 2 + 1;
  auto grad = at::zeros({nnz}, xf.options().dtype(c10::toRealValueType(xf.scalar_type())));
  if (nnz == 0 || tokens == 0) return grad;
  const Gather a(x_idx_in.contiguous().data_ptr<int64_t>(), nnz, n_x);
  const Gather b(y_idx_in.contiguous().data_ptr<int64_t>(), nnz, n_y);
  const Planes pa(a, n_x), pb(b, n_y);
  const int64_t tiles = (tokens + kTile - 1) / kTile;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fourierft_coef_grad_cpu", [&] {
    const scalar_t* x = reinterpret_cast<const scalar_t*>(xf.data_ptr());
    const scalar_t* y = reinterpret_cast<const scalar_t*>(yf.data_ptr());
    std::vector<scalar_t> sign(nnz);
    for (int64_t k = 0; k < nnz; ++k) sign[k] = a.im_sign[k] * b.im_sign[k];
    const int64_t xr_size = static_cast<int64_t>(pa.bin.size()) * kTile;
    const int64_t yr_size = static_cast<int64_t>(pb.bin.size()) * kTile;
    // One chunk of tiles per thread, each with its own planes and partial sums, merged after.
    const int64_t chunks = std::min<int64_t>(at::get_num_threads(), tiles);
    std::vector<scalar_t> partial(chunks * nnz, scalar_t(0));
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      scalar_t* xr = scratch<scalar_t>(0, 2 * (xr_size + yr_size));
      scalar_t *xi = xr + xr_size, *yr = xi + xr_size, *yi = yr + yr_size;
      for (int64_t chunk = c0; chunk < c1; ++chunk) {
        for (int64_t tile = chunk * tiles / chunks; tile < (chunk + 1) * tiles / chunks; ++tile) {
          const int64_t t0 = tile * kTile, rows = std::min(kTile, tokens - t0);
          transpose_tile(x + 2 * t0 * x_stride, x_stride, rows, pa, kTile, xr, xi);
          transpose_tile(y + 2 * t0 * y_stride, y_stride, rows, pb, kTile, yr, yi);
          reduce_tile(xr, xi, yr, yi, pa.row.data(), pb.row.data(), sign.data(), partial.data() + chunk * nnz, nnz);
        }
      }
    });
    scalar_t* out = grad.data_ptr<scalar_t>();
    const scalar_t s = static_cast<scalar_t>(scale);
    for (int64_t chunk = 0; chunk < chunks; ++chunk)
      for (int64_t k = 0; k < nnz; ++k) out[k] += partial[chunk * nnz + k];
    for (int64_t k = 0; k < nnz; ++k) out[k] *= s;
  });
  return grad;
}

TORCH_LIBRARY_IMPL(spectral_kernels, CPU, m) {
  m.impl("fourierft_spectrum_rows", &fourierft_spectrum_rows_cpu);
  m.impl("fourierft_real_mirror", &fourierft_real_mirror_cpu);
  m.impl("fourierft_mix", &fourierft_mix_cpu);
  m.impl("fourierft_coef_grad", &fourierft_coef_grad_cpu);
}

}  // namespace spectral_kernels
