// OFT CPU kernels (math in spectral_kernels/ops/oft.py): the block rotation
// out_j = x_j · M_j (M_j = R_j or R_j^T), and the backward of x_rot = x · blockdiag(R)
// for its gradient g in one pass: dR_j = sum_t x_j[t]^T g_j[t] and, in place of g,
// dx_j = g_j · R_j^T.
//
// Both are many small GEMMs with a b x b operand. At b = 32 a BLAS call per block
// (at::bmm) runs at a third of the rate of the layer's own GEMM on this class of
// CPU, which alone would cost ~10% of the layer, so they share one register-tiled
// micro-kernel: MR rows x NV SIMD vectors of accumulators, one broadcast of A and NV
// loads of B per step of the depth loop. It is compiled for AVX-512, AVX2 and the
// baseline ISA and the widest one the CPU supports is chosen at run time (no
// -march at build time). Accumulation is in float (double for double inputs): the
// input rows are converted on their way into the per-thread tile buffers below.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../oft_blocks.h"
#include "../ops.h"
#include "simd.h"

namespace spectral_kernels {
namespace {

// A SIMD vector of `Bytes` bytes of Acc (GCC/Clang vector extension; the code
// generated for it follows the target ISA of the function it is inlined into).
template <typename Acc, int Bytes>
struct Simd {
  typedef Acc V __attribute__((vector_size(Bytes)));
  static constexpr int kWidth = Bytes / sizeof(Acc);
  // Accumulator tile shapes that fit the register file: 32 vector registers with
  // AVX-512, 16 otherwise (accumulators + NV B vectors + one broadcast).
  static constexpr int kMaxVecs = Bytes == 64 ? 4 : 2;
  static constexpr int rows_for(int nv) { return Bytes == 64 ? (nv == 1 ? 16 : nv == 4 ? 6 : 8) : (nv == 1 ? 8 : 6); }
};

// C[i, :NV*W] = (Accumulate ? C[i, :] : 0) + sum_k A(i, k) B[k, :NV*W] for i < rows,
// with A(i, k) = a[i * a_row + k * a_col]. Rows from `rows` to MR recompute the last
// valid row and are not stored. Whole tiles (Full: rows = MR) and the accumulate flag
// are compile-time, so that the accumulators stay in registers from their first FMA
// to their stores: with both known only at run time, GCC passed every accumulator
// through the stack before and after the depth loop, which at b = 32 is only 32 steps.
template <typename Acc, int Bytes, int MR, int NV, bool Full, bool Accumulate>
SK_INLINE void micro_tile(const Acc* a, int64_t a_row, int64_t a_col, const Acc* b, int64_t ldb, int64_t depth,
                          Acc* c, int64_t ldc, int partial_rows) {
  const int rows = Full ? MR : partial_rows;
  using S = Simd<Acc, Bytes>;
  using V = typename S::V;
  V acc[MR][NV];
  const Acc* arow[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    arow[i] = a + std::min(i, rows - 1) * a_row;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[i][v] = V{};
      if (Accumulate && i < rows) load_vec(acc[i][v], c + i * ldc + v * S::kWidth);
    }
  }
  for (int64_t k = 0; k < depth; ++k) {
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) load_vec(bv[v], b + k * ldb + v * S::kWidth);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const Acc s = arow[i][k * a_col];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] += s * bv[v];
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    if (i < rows) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) store_vec(c + i * ldc + v * S::kWidth, acc[i][v]);
    }
  }
}

// Rows [0, m) of C in tiles of MR: the whole tiles, then the remainder.
template <typename Acc, int Bytes, int NV, bool Accumulate>
SK_INLINE void panel_rows(const Acc* a, int64_t a_row, int64_t a_col, int64_t m, const Acc* b, int64_t ldb,
                          int64_t depth, Acc* c, int64_t ldc) {
  constexpr int MR = Simd<Acc, Bytes>::rows_for(NV);
  int64_t i = 0;
  for (; i + MR <= m; i += MR) {
    micro_tile<Acc, Bytes, MR, NV, true, Accumulate>(a + i * a_row, a_row, a_col, b, ldb, depth, c + i * ldc, ldc, MR);
  }
  if (i < m) {
    micro_tile<Acc, Bytes, MR, NV, false, Accumulate>(a + i * a_row, a_row, a_col, b, ldb, depth, c + i * ldc, ldc,
                                                      static_cast<int>(m - i));
  }
}

template <typename Acc, int Bytes, int NV>
SK_INLINE void panel(const Acc* a, int64_t a_row, int64_t a_col, int64_t m, const Acc* b, int64_t ldb,
                     int64_t depth, Acc* c, int64_t ldc, bool accumulate) {
  if (accumulate) {
    panel_rows<Acc, Bytes, NV, true>(a, a_row, a_col, m, b, ldb, depth, c, ldc);
  } else {
    panel_rows<Acc, Bytes, NV, false>(a, a_row, a_col, m, b, ldb, depth, c, ldc);
  }
}

// C (m x n_vec SIMD vectors) (+)= A (m x depth, strided) · B (depth x n_vec vectors).
template <typename Acc, int Bytes>
SK_INLINE void small_gemm(const Acc* a, int64_t a_row, int64_t a_col, int64_t m, const Acc* b, int64_t ldb,
                          int64_t depth, int64_t n_vec, Acc* c, int64_t ldc, bool accumulate) {
  using S = Simd<Acc, Bytes>;
  for (int64_t v = 0; v < n_vec; v += S::kMaxVecs) {
    const int64_t off = v * S::kWidth;
    switch (std::min<int64_t>(S::kMaxVecs, n_vec - v)) {
      case 1: panel<Acc, Bytes, 1>(a, a_row, a_col, m, b + off, ldb, depth, c + off, ldc, accumulate); break;
      case 2: panel<Acc, Bytes, 2>(a, a_row, a_col, m, b + off, ldb, depth, c + off, ldc, accumulate); break;
      case 3:
        if constexpr (S::kMaxVecs >= 3) panel<Acc, Bytes, 3>(a, a_row, a_col, m, b + off, ldb, depth, c + off, ldc, accumulate);
        break;
      default:
        if constexpr (S::kMaxVecs >= 4) panel<Acc, Bytes, 4>(a, a_row, a_col, m, b + off, ldb, depth, c + off, ldc, accumulate);
        break;
    }
  }
}

// Shapes shared by the kernels: `tokens` rows of `blocks` blocks of `b` columns
// (row stride blocks * b); `bp` is b rounded up to whole SIMD vectors of the widest
// ISA, the row length of the padded rotation blocks and of the float buffers.
struct Layout {
  int64_t tokens, blocks, b, bp, tile;
  int64_t ld() const { return blocks * b; }
  // Tile buffers are block-major: block j of a tile's rows is `tile` rows of bp
  // floats (zero past b) from j * block_stride() on.
  int64_t block_stride() const { return tile * bp; }
  int64_t tile_size() const { return blocks * block_stride(); }
  int64_t tiles() const { return (tokens + tile - 1) / tile; }
  static constexpr int64_t kPadTo = 16;  // floats in 64 bytes: bp is valid for every ISA below
};

int64_t padded(int64_t b) { return (b + Layout::kPadTo - 1) / Layout::kPadTo * Layout::kPadTo; }

// Both kernels work a tile of rows at a time: the rows are first copied whole (and
// converted to the accumulation type) into a per-thread buffer, then every block is
// computed from there. Copying whole rows reads memory as a few long streams, which
// the prefetchers follow; walking the tensor block by block instead reads short
// strips of many rows and runs at memory latency (measured on Zen 5 at T=2048,
// d=1024, b=32: 7.5 GB/s and 84 GFLOPS a core for the backward, against 60 GB/s for
// a plain copy). The copy goes block-major, so that the micro-kernel reads each
// block's rows from a few KiB at unit stride rather than one strip per row of the
// tile. Tiles of up to 256 KiB per buffer stay in L2; the backward's dR accumulates
// over a tile's rows per pass, so deeper tiles (56 rows rather than 24 at d=1024)
// run it faster: 1.31 against 1.40 ms a core.
int64_t tile_rows(int64_t row_floats) {
  return std::clamp<int64_t>(65536 / std::max<int64_t>(row_floats, 1) / 8 * 8, 8, 64);  // x may have 0 features
}

// `rows` rows of src (leading dimension s.ld()) into the block-major tile buffer dst,
// converting and zero-padding every block row to bp.
template <typename T, typename Acc>
SK_INLINE void load_blocks(const T* src, const Layout& s, int64_t rows, Acc* dst) {
  for (int64_t t = 0; t < rows; ++t) {
    const T* row = src + t * s.ld();
    for (int64_t j = 0; j < s.blocks; ++j) {
      Acc* d = dst + j * s.block_stride() + t * s.bp;
      for (int64_t c = 0; c < s.b; ++c) d[c] = static_cast<Acc>(row[j * s.b + c]);
      for (int64_t c = s.b; c < s.bp; ++c) d[c] = Acc(0);
    }
  }
}

// Part `part` of `parts` of the rows [begin, end) of a (rows, s.ld()) tensor, prefetched
// into L2: spread over a tile's blocks, the next tile's rows arrive while this one
// computes, instead of the tile's copy waiting on memory (most of the backward's time
// outside the micro-kernel, at T=2048, d=1024).
template <typename T>
SK_INLINE void prefetch_rows(const T* src, const Layout& s, int64_t begin, int64_t end, int64_t part, int64_t parts) {
  const char* p = reinterpret_cast<const char*>(src + begin * s.ld());
  const int64_t bytes = (end - begin) * s.ld() * static_cast<int64_t>(sizeof(T));
  for (int64_t o = bytes * part / parts / 64 * 64; o < bytes * (part + 1) / parts; o += 64) __builtin_prefetch(p + o, 0, 2);
}

// rows x cols of src into dst, converting, and zeroing dst's row ends up to ld_dst.
template <typename T, typename Acc>
SK_INLINE void load_rows(const T* src, int64_t ld, int64_t rows, int64_t cols, Acc* dst, int64_t ld_dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = src + i * ld;
    Acc* d = dst + i * ld_dst;
    for (int64_t k = 0; k < cols; ++k) d[k] = static_cast<Acc>(s[k]);
    for (int64_t k = cols; k < ld_dst; ++k) d[k] = Acc(0);
  }
}

// rows x cols of src (a float tile, leading dimension ld_src) into rows of dst, converting.
template <typename Acc, typename T>
SK_INLINE void store_rows(const Acc* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    const Acc* s = src + i * ld_src;
    T* d = dst + i * ld;
    for (int64_t k = 0; k < cols; ++k) d[k] = static_cast<T>(s[k]);
  }
}

// out[t, j] = x[t, j] · M_j for the row tiles in [begin, end).
template <typename T, typename Acc, int Bytes>
SK_INLINE void rotate_items(const T* x, const Acc* rot, int64_t n_rot, T* out, const Layout& s, int64_t begin,
                            int64_t end) {
  using S = Simd<Acc, Bytes>;
  const int64_t n_vec = (s.b + S::kWidth - 1) / S::kWidth;
  // out is written in place when blocks are whole vectors, else through c_buf.
  const bool direct_out = std::is_same_v<T, Acc> && s.b % S::kWidth == 0;
  Acc* x_tile = scratch<Acc>(0, s.tile_size());
  Acc* c_buf = direct_out ? nullptr : scratch<Acc>(2, s.tile * s.bp);
  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t t0 = tile * s.tile, rows = std::min(s.tile, s.tokens - t0);
    load_blocks(x + t0 * s.ld(), s, rows, x_tile);
    const int64_t next_end = std::min(s.tokens, std::min(end, tile + 2) * s.tile);
    for (int64_t j = 0; j < s.blocks; ++j) {
      prefetch_rows(x, s, t0 + rows, next_end, j, s.blocks);
      T* dst = out + t0 * s.ld() + j * s.b;
      Acc* c = direct_out ? reinterpret_cast<Acc*>(dst) : c_buf;
      const int64_t ldc = direct_out ? s.ld() : s.bp;
      small_gemm<Acc, Bytes>(x_tile + j * s.block_stride(), s.bp, 1, rows, rot + (n_rot == 1 ? 0 : j) * s.b * s.bp, s.bp,
                             s.b, n_vec, c, ldc, false);
      if (!direct_out) store_rows(c_buf, s.bp, rows, s.b, dst, s.ld());
    }
  }
}

// For the token chunks in [begin, end): partial[chunk] (blocks, b, bp) = sum over
// the chunk's tokens of x_j[t]^T g_j[t] (when partial is non-null), and g_j <- g_j ·
// M_j with M_j = R_j^T (when rot is non-null), so g is read once and dx written
// over it.
template <typename T, typename Acc, int Bytes>
SK_INLINE void backward_items(T* g, const T* x, const Acc* rot, int64_t n_rot, Acc* partial, int64_t chunk_len,
                              const Layout& s, int64_t begin, int64_t end) {
  using S = Simd<Acc, Bytes>;
  const int64_t n_vec = (s.b + S::kWidth - 1) / S::kWidth;
  const bool direct_out = std::is_same_v<T, Acc> && s.b % S::kWidth == 0;
  Acc* g_tile = scratch<Acc>(0, s.tile_size());
  Acc* x_tile = partial ? scratch<Acc>(1, s.tile_size()) : nullptr;
  Acc* c_buf = rot && !direct_out ? scratch<Acc>(2, s.tile * s.bp) : nullptr;
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    const int64_t t_end = std::min(s.tokens, (chunk + 1) * chunk_len);
    for (int64_t t0 = chunk * chunk_len; t0 < t_end; t0 += s.tile) {
      const int64_t rows = std::min(s.tile, t_end - t0);
      load_blocks(g + t0 * s.ld(), s, rows, g_tile);
      if (partial) load_blocks(x + t0 * s.ld(), s, rows, x_tile);
      const int64_t next_end = std::min(t_end, t0 + rows + s.tile);
      for (int64_t j = 0; j < s.blocks; ++j) {
        prefetch_rows(g, s, t0 + rows, next_end, j, s.blocks);
        if (partial) prefetch_rows(x, s, t0 + rows, next_end, j, s.blocks);
        const Acc* gj = g_tile + j * s.block_stride();
        if (partial) {
          // dR_j rows are x's columns: A(k, t) = x[t, k], the depth runs over tokens.
          small_gemm<Acc, Bytes>(x_tile + j * s.block_stride(), 1, s.bp, s.b, gj, s.bp, rows, n_vec,
                                 partial + (chunk * s.blocks + j) * s.b * s.bp, s.bp, true);
        }
        if (rot) {
          T* dst = g + t0 * s.ld() + j * s.b;
          Acc* c = direct_out ? reinterpret_cast<Acc*>(dst) : c_buf;
          const int64_t ldc = direct_out ? s.ld() : s.bp;
          small_gemm<Acc, Bytes>(gj, s.bp, 1, rows, rot + (n_rot == 1 ? 0 : j) * s.b * s.bp, s.bp, s.b, n_vec,
                                 c, ldc, false);
          if (!direct_out) store_rows(c_buf, s.bp, rows, s.b, dst, s.ld());
        }
      }
    }
  }
}

// Neumann rotations (peft's truncated Cayley series, coefficients in
// ops/oft.py: R = sum_p c[p] Q^p, Q = A - A^T from the upper-triangle parameters),
// per b x b block through small_gemm, on matrices with rows padded to bp. Scratch
// holds kNeumannScratch such matrices.
constexpr int kNeumannScratch = 4;
constexpr int64_t kNeumannMaxBlock = int64_t(1) << 20;  // no limit of the kernels' own: bounds b * b

// Q (b x bp, zero padded) of one block's parameters in triu_indices(b, b, 1) order.
template <typename T, typename Acc>
SK_INLINE void skew_block(const T* p, int64_t b, int64_t bp, Acc* q) {
  std::fill_n(q, b * bp, Acc(0));
  for (int64_t r = 0, k = 0; r < b; ++r) {
    for (int64_t c = r + 1; c < b; ++c, ++k) {
      q[r * bp + c] = static_cast<Acc>(p[k]);
      q[c * bp + r] = -static_cast<Acc>(p[k]);
    }
  }
}

// out (b x b) = sum_p coef[p] Q^p for blocks [begin, end).
template <typename T, typename Acc, int Bytes>
SK_INLINE void neumann_items(const T* params, const double* coef, int64_t last, int64_t b, T* out, int64_t begin,
                             int64_t end) {
  using S = Simd<Acc, Bytes>;
  const int64_t bp = padded(b), n_vec = (b + S::kWidth - 1) / S::kWidth, len = b * bp;
  Acc* q = scratch<Acc>(0, kNeumannScratch * len);
  Acc *power = q + len, *next = power + len, *rot = next + len;
  for (int64_t j = begin; j < end; ++j) {
    skew_block(params + j * (b * (b - 1) / 2), b, bp, q);
    std::fill_n(rot, len, Acc(0));
    for (int64_t i = 0; i < b; ++i) rot[i * bp + i] = Acc(1);
    std::copy_n(q, len, power);
    for (int64_t p = 1; p <= last; ++p) {
      if (p > 1) {
        small_gemm<Acc, Bytes>(power, bp, 1, b, q, bp, b, n_vec, next, bp, false);
        std::swap(power, next);
      }
      const Acc c = static_cast<Acc>(coef[p]);
      for (int64_t e = 0; e < len; ++e) rot[e] += c * power[e];
    }
    store_rows(rot, bp, b, b, out + j * b * b, b);
  }
}

// d params of blocks [begin, end) from dL/dR = grad: with Q^T = -Q,
// dL/dQ = sum_p c[p] D_p, D_1 = G, D_p = Q^T D_{p-1} + G (Q^T)^(p-1), and
// d param (r, c) = dL/dQ[r, c] - dL/dQ[c, r].
template <typename T, typename Acc, int Bytes>
SK_INLINE void neumann_backward_items(const T* params, const T* grad, const double* coef, int64_t last, int64_t b,
                                      T* dparams, int64_t begin, int64_t end) {
  using S = Simd<Acc, Bytes>;
  const int64_t bp = padded(b), n_vec = (b + S::kWidth - 1) / S::kWidth, len = b * bp;
  const int64_t n_params = b * (b - 1) / 2;
  Acc* q = scratch<Acc>(1, (kNeumannScratch + 2) * len);
  Acc *term = q + len, *d = term + len, *tmp = d + len, *dq = tmp + len, *g = dq + len;
  for (int64_t j = begin; j < end; ++j) {
    skew_block(params + j * n_params, b, bp, q);
    load_rows(grad + j * b * b, b, b, b, g, bp);
    std::copy_n(g, len, term);
    std::copy_n(g, len, d);
    std::fill_n(dq, len, Acc(0));
    for (int64_t p = 1; p <= last; ++p) {
      if (p > 1) {
        small_gemm<Acc, Bytes>(term, bp, 1, b, q, bp, b, n_vec, tmp, bp, false);  // G (Q^T)^(p-1) = -(prev Q)
        for (int64_t e = 0; e < len; ++e) term[e] = -tmp[e];
        small_gemm<Acc, Bytes>(q, bp, 1, b, d, bp, b, n_vec, tmp, bp, false);  // Q^T D = -(Q D)
        for (int64_t e = 0; e < len; ++e) d[e] = term[e] - tmp[e];
      }
      const Acc c = static_cast<Acc>(coef[p]);
      for (int64_t e = 0; e < len; ++e) dq[e] += c * d[e];
    }
    T* out = dparams + j * n_params;
    for (int64_t r = 0, k = 0; r < b; ++r)
      for (int64_t c = r + 1; c < b; ++c, ++k) out[k] = static_cast<T>(dq[r * bp + c] - dq[c * bp + r]);
  }
}

// One entry per ISA; everything below them is inlined, so each is compiled whole
// for its instruction set.
template <typename T, typename Acc>
struct Entry {
  using Rotate = void (*)(const T*, const Acc*, int64_t, T*, const Layout&, int64_t, int64_t);
  using Backward = void (*)(T*, const T*, const Acc*, int64_t, Acc*, int64_t, const Layout&, int64_t, int64_t);
  using Neumann = void (*)(const T*, const double*, int64_t, int64_t, T*, int64_t, int64_t);
  using NeumannBackward = void (*)(const T*, const T*, const double*, int64_t, int64_t, T*, int64_t, int64_t);
  Rotate rotate;
  Backward backward;
  Neumann neumann;
  NeumannBackward neumann_backward;
};

#define SK_ENTRIES(NAME, BYTES)                                                                                    \
  template <typename T, typename Acc>                                                                             \
  SK_TARGET_##NAME void rotate_##NAME(const T* x, const Acc* rot, int64_t n_rot, T* out, const Layout& s,          \
                                      int64_t begin, int64_t end) {                                               \
    rotate_items<T, Acc, BYTES>(x, rot, n_rot, out, s, begin, end);                                               \
  }                                                                                                               \
  template <typename T, typename Acc>                                                                             \
  SK_TARGET_##NAME void backward_##NAME(T* g, const T* x, const Acc* rot, int64_t n_rot, Acc* partial,            \
                                        int64_t chunk_len, const Layout& s, int64_t begin, int64_t end) {         \
    backward_items<T, Acc, BYTES>(g, x, rot, n_rot, partial, chunk_len, s, begin, end);                           \
  }                                                                                                               \
  template <typename T, typename Acc>                                                                             \
  SK_TARGET_##NAME void neumann_##NAME(const T* params, const double* coef, int64_t last, int64_t b, T* out,      \
                                       int64_t begin, int64_t end) {                                              \
    neumann_items<T, Acc, BYTES>(params, coef, last, b, out, begin, end);                                         \
  }                                                                                                               \
  template <typename T, typename Acc>                                                                             \
  SK_TARGET_##NAME void neumann_backward_##NAME(const T* params, const T* grad, const double* coef, int64_t last,  \
                                                int64_t b, T* dparams, int64_t begin, int64_t end) {              \
    neumann_backward_items<T, Acc, BYTES>(params, grad, coef, last, b, dparams, begin, end);                      \
  }

#define SK_TARGET_baseline
SK_ENTRIES(baseline, 16)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SK_X86 1
#define SK_TARGET_avx512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma,f16c")))
#define SK_TARGET_avx2 __attribute__((target("avx2,fma,f16c")))
SK_ENTRIES(avx512, 64)
SK_ENTRIES(avx2, 32)
#endif

template <typename T, typename Acc>
Entry<T, Acc> select_entry() {
#ifdef SK_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    return {rotate_avx512<T, Acc>, backward_avx512<T, Acc>, neumann_avx512<T, Acc>, neumann_backward_avx512<T, Acc>};
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return {rotate_avx2<T, Acc>, backward_avx2<T, Acc>, neumann_avx2<T, Acc>, neumann_backward_avx2<T, Acc>};
  }
#endif
  return {rotate_baseline<T, Acc>, backward_baseline<T, Acc>, neumann_baseline<T, Acc>,
          neumann_backward_baseline<T, Acc>};
}

template <typename T, typename Acc>
const Entry<T, Acc>& entry() {
  static const Entry<T, Acc> chosen = select_entry<T, Acc>();
  return chosen;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// M_j = R_j or R_j^T in the accumulation type, zero-padded to bp columns so that
// every SIMD load of a row is whole. R itself when it already is that (at T=1 the
// copy would cost as much as the rotation).
at::Tensor padded_rotation(const at::Tensor& rot, int64_t bp, bool transpose, at::ScalarType acc) {
  const int64_t b = rot.size(1);
  if (!transpose && b == bp && rot.scalar_type() == acc && rot.is_contiguous()) return rot;
  auto m = at::zeros({rot.size(0), b, bp}, rot.options().dtype(acc));
  m.narrow(2, 0, b).copy_(transpose ? rot.transpose(1, 2) : rot);
  return m;
}

}  // namespace

at::Tensor oft_rotate_cpu(const at::Tensor& x_in, const at::Tensor& rot_in, bool transpose) {
  const auto [blocks, b] = check_blocks(x_in, rot_in, "oft_rotate");
  const auto x = x_in.contiguous();
  auto out = at::empty_like(x);
  if (x.numel() == 0) return out;
  Layout s{x.size(0), blocks, b, padded(b), 0};
  s.tile = tile_rows(s.blocks * s.bp);
  const auto rot = padded_rotation(rot_in, s.bp, transpose, acc_type(x.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "oft_rotate_cpu", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto kernel = entry<scalar_t, Acc>().rotate;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const Acc* rp = rot.const_data_ptr<Acc>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t n_rot = rot.size(0);
    at::parallel_for(0, s.tiles(), 1, [&](int64_t begin, int64_t end) {
      kernel(xp, rp, n_rot, op, s, begin, end);
    });
  });
  return out;
}

at::Tensor oft_rotate_backward_cpu(at::Tensor& g, const at::Tensor& x_in, const at::Tensor& rot_in, bool need_dx,
                                   bool need_drot) {
  const auto [blocks, b] = check_rotate_backward(g, x_in, rot_in);
  const auto x = x_in.contiguous();
  const auto acc = acc_type(x.scalar_type());
  const int64_t tokens = x.size(0), n_rot = rot_in.size(0);
  Layout s{tokens, blocks, b, padded(b), 0};
  s.tile = tile_rows(s.blocks * s.bp);
  // One chunk of whole tiles per thread, each with its own partial sum of dR.
  const int64_t chunks = std::clamp<int64_t>(at::get_num_threads(), 1, std::max<int64_t>(1, s.tiles()));
  const int64_t chunk_len = (s.tiles() + chunks - 1) / chunks * s.tile;
  auto partial = at::zeros({need_drot ? chunks : 0, blocks, b, s.bp}, x.options().dtype(acc));
  if (tokens > 0 && (need_dx || need_drot)) {
    const auto rot = need_dx ? padded_rotation(rot_in, s.bp, true, acc) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "oft_rotate_backward_cpu", [&] {
      using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const auto kernel = entry<scalar_t, Acc>().backward;
      scalar_t* gp = g.mutable_data_ptr<scalar_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const Acc* rp = need_dx ? rot.const_data_ptr<Acc>() : nullptr;
      Acc* pp = need_drot ? partial.mutable_data_ptr<Acc>() : nullptr;
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        kernel(gp, xp, rp, n_rot, pp, chunk_len, s, begin, end);
      });
    });
  }
  if (!need_drot) return at::empty({0}, x.options().dtype(acc));
  auto grad = partial.sum(0).narrow(2, 0, b);
  return (n_rot == 1 ? grad.sum(0, true) : grad).contiguous();
}

at::Tensor oft_neumann_cpu(const at::Tensor& params_in, int64_t b, at::ArrayRef<double> coef_in) {
  const auto coef = check_neumann(params_in, b, nullptr, coef_in, kNeumannMaxBlock);
  const auto params = params_in.contiguous();
  auto out = at::empty({params.size(0), b, b}, params.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params.scalar_type(), "oft_neumann_cpu", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto kernel = entry<scalar_t, Acc>().neumann;
    const scalar_t* pp = params.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t last = static_cast<int64_t>(coef.size()) - 1;
    at::parallel_for(0, params.size(0), 1, [&](int64_t begin, int64_t end) {
      kernel(pp, coef.data(), last, b, op, begin, end);
    });
  });
  return out;
}

at::Tensor oft_neumann_backward_cpu(const at::Tensor& params_in, const at::Tensor& grad_in, int64_t b,
                                    at::ArrayRef<double> coef_in) {
  const auto coef = check_neumann(params_in, b, &grad_in, coef_in, kNeumannMaxBlock);
  const auto params = params_in.contiguous(), grad = grad_in.contiguous();
  auto dparams = at::empty_like(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params.scalar_type(), "oft_neumann_backward_cpu", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto kernel = entry<scalar_t, Acc>().neumann_backward;
    const scalar_t* pp = params.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* dp = dparams.mutable_data_ptr<scalar_t>();
    const int64_t last = static_cast<int64_t>(coef.size()) - 1;
    at::parallel_for(0, params.size(0), 1, [&](int64_t begin, int64_t end) {
      kernel(pp, gp, coef.data(), last, b, dp, begin, end);
    });
  });
  return dparams;
}

TORCH_LIBRARY_IMPL(spectral_kernels, CPU, m) {
  m.impl("oft_rotate", &oft_rotate_cpu);
  m.impl("oft_rotate_backward_", &oft_rotate_backward_cpu);
  m.impl("oft_neumann", &oft_neumann_cpu);
  m.impl("oft_neumann_backward", &oft_neumann_backward_cpu);
}

}  // namespace spectral_kernels
