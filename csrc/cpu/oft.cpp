// OFT CPU kernels (math in spectral_kernels/ops/oft.py): the block rotation
// out_j = x_j · M_j (M_j = R_j or R_j^T) and the reduction dR_j = sum_t x_j[t]^T g_j[t].
//
// Both are many small GEMMs with a b x b operand. At b = 32 a BLAS call per block
// (at::bmm) runs at a third of the rate of the layer's own GEMM on this class of
// CPU, which alone would cost ~10% of the layer, so they share one register-tiled
// micro-kernel: MR rows x NV SIMD vectors of accumulators, one broadcast of A and NV
// loads of B per step of the depth loop. It is compiled for AVX-512, AVX2 and the
// baseline ISA and the widest one the CPU supports is chosen at run time (no
// -march at build time). Accumulation is in float (double for double inputs);
// bfloat16/float16 tiles are converted to float in small per-thread buffers.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../ops.h"

namespace spectral_kernels {
namespace {

#define SK_INLINE inline __attribute__((always_inline))

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

template <typename V, typename T>
SK_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
SK_INLINE void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// C[i, :NV*W] = (accumulate ? C[i, :] : 0) + sum_k A(i, k) B[k, :NV*W] for i < rows,
// with A(i, k) = a[i * a_row + k * a_col]. Rows from `rows` to MR recompute the last
// valid row and are not stored, so callers need no remainder loop.
template <typename Acc, int Bytes, int MR, int NV>
SK_INLINE void micro_tile(const Acc* a, int64_t a_row, int64_t a_col, const Acc* b, int64_t ldb, int64_t depth,
                          Acc* c, int64_t ldc, int rows, bool accumulate) {
  using S = Simd<Acc, Bytes>;
  using V = typename S::V;
  V acc[MR][NV];
  const Acc* arow[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    arow[i] = a + std::min(i, rows - 1) * a_row;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = accumulate && i < rows ? load<V>(c + i * ldc + v * S::kWidth) : V{};
  }
  for (int64_t k = 0; k < depth; ++k) {
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = load<V>(b + k * ldb + v * S::kWidth);
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
      for (int v = 0; v < NV; ++v) store(c + i * ldc + v * S::kWidth, acc[i][v]);
    }
  }
}

template <typename Acc, int Bytes, int NV>
SK_INLINE void panel(const Acc* a, int64_t a_row, int64_t a_col, int64_t m, const Acc* b, int64_t ldb,
                     int64_t depth, Acc* c, int64_t ldc, bool accumulate) {
  constexpr int MR = Simd<Acc, Bytes>::rows_for(NV);
  for (int64_t i = 0; i < m; i += MR) {
    micro_tile<Acc, Bytes, MR, NV>(a + i * a_row, a_row, a_col, b, ldb, depth, c + i * ldc, ldc,
                                   static_cast<int>(std::min<int64_t>(MR, m - i)), accumulate);
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

// rows x cols of src (leading dimension ld_src) into dst (ld_dst), converting; the
// columns up to ld_dst are zeroed so padded SIMD loads read zeros.
template <typename From, typename To>
SK_INLINE void pack(const From* src, int64_t ld_src, int64_t rows, int64_t cols, To* dst, int64_t ld_dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const From* s = src + i * ld_src;
    To* d = dst + i * ld_dst;
    for (int64_t k = 0; k < cols; ++k) d[k] = static_cast<To>(s[k]);
    for (int64_t k = cols; k < ld_dst; ++k) d[k] = To(0);
  }
}

template <typename From, typename To>
SK_INLINE void unpack(const From* src, int64_t ld_src, int64_t rows, int64_t cols, To* dst, int64_t ld_dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const From* s = src + i * ld_src;
    To* d = dst + i * ld_dst;
    for (int64_t k = 0; k < cols; ++k) d[k] = static_cast<To>(s[k]);
  }
}

// Shapes shared by the kernels: `tokens` rows of `blocks` blocks of `b` columns
// (row stride blocks * b); `bp` is b rounded up to whole SIMD vectors of the widest
// ISA, the row length of the padded rotation blocks and of the float buffers.
struct Layout {
  int64_t tokens, blocks, b, bp, tile;
  int64_t ld() const { return blocks * b; }
  int64_t tiles() const { return (tokens + tile - 1) / tile; }
};

constexpr int64_t kPadTo = 16;  // floats in 64 bytes: bp is valid for every ISA below

// out_j = x_j · M_j for the (block, token tile) items in [begin, end), item = j * tiles + tile.
template <typename T, typename Acc, int Bytes>
SK_INLINE void rotate_items(const T* x, const Acc* rot, int64_t n_rot, T* out, const Layout& s, int64_t begin,
                            int64_t end) {
  using S = Simd<Acc, Bytes>;
  constexpr bool kSameType = std::is_same_v<T, Acc>;
  const int64_t n_vec = (s.b + S::kWidth - 1) / S::kWidth;
  // x is read in place when one panel of the micro-kernel covers the block (each
  // element is used once) and out written in place when blocks are whole vectors;
  // otherwise they go through per-thread float tiles (conversion, padding, and no
  // L1 set aliasing of rows a power-of-two stride apart when re-read per panel).
  const bool direct_in = kSameType && n_vec <= S::kMaxVecs;
  const bool direct_out = kSameType && s.b % S::kWidth == 0;
  std::vector<Acc> a_buf(direct_in ? 0 : s.tile * s.b), c_buf(direct_out ? 0 : s.tile * s.bp);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t j = item / s.tiles(), t0 = (item % s.tiles()) * s.tile;
    const int64_t rows = std::min(s.tile, s.tokens - t0);
    const T* xin = x + t0 * s.ld() + j * s.b;
    const Acc* a = direct_in ? reinterpret_cast<const Acc*>(xin) : a_buf.data();
    if (!direct_in) pack(xin, s.ld(), rows, s.b, a_buf.data(), s.b);
    const int64_t lda = direct_in ? s.ld() : s.b;
    T* dst = out + t0 * s.ld() + j * s.b;
    Acc* c = direct_out ? reinterpret_cast<Acc*>(dst) : c_buf.data();
    const int64_t ldc = direct_out ? s.ld() : s.bp;
    const Acc* m = rot + (n_rot == 1 ? 0 : j) * s.b * s.bp;
    small_gemm<Acc, Bytes>(a, lda, 1, rows, m, s.bp, s.b, n_vec, c, ldc, false);
    if (!direct_out) unpack(c_buf.data(), s.bp, rows, s.b, dst, s.ld());
  }
}

// partial[chunk] (blocks, b, bp) = sum over the chunk's tokens of x_j[t]^T g_j[t]
// for the token chunks in [begin, end). Each tile of rows is visited for all blocks
// in turn: its rows stay in L2 and are read front to back (walking one block's
// column strip down the tensor instead touches a new page per row, which the
// prefetchers do not follow).
template <typename T, typename Acc, int Bytes>
SK_INLINE void grad_items(const T* x, const T* g, Acc* partial, int64_t chunk_len, const Layout& s, int64_t begin,
                          int64_t end) {
  using S = Simd<Acc, Bytes>;
  // Both tiles are copied: every row group of dR re-reads the whole g tile, and in
  // place its rows lie a power-of-two stride apart in the common layer widths,
  // which maps them onto the same few L1 sets.
  std::vector<Acc> x_buf(s.tile * s.b), g_buf(s.tile * s.bp);
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    const int64_t t_end = std::min(s.tokens, (chunk + 1) * chunk_len);
    for (int64_t t0 = chunk * chunk_len; t0 < t_end; t0 += s.tile) {
      const int64_t rows = std::min(s.tile, t_end - t0);
      for (int64_t j = 0; j < s.blocks; ++j) {
        pack(x + t0 * s.ld() + j * s.b, s.ld(), rows, s.b, x_buf.data(), s.b);
        pack(g + t0 * s.ld() + j * s.b, s.ld(), rows, s.b, g_buf.data(), s.bp);
        // dR_j rows are x's columns: A(k, t) = x[t, k], the depth runs over tokens.
        small_gemm<Acc, Bytes>(x_buf.data(), 1, s.b, s.b, g_buf.data(), s.bp, rows, (s.b + S::kWidth - 1) / S::kWidth,
                               partial + (chunk * s.blocks + j) * s.b * s.bp, s.bp, true);
      }
    }
  }
}

// One entry per ISA; everything below them is inlined, so each is compiled whole
// for its instruction set.
template <typename T, typename Acc>
struct Entry {
  using Rotate = void (*)(const T*, const Acc*, int64_t, T*, const Layout&, int64_t, int64_t);
  using Grad = void (*)(const T*, const T*, Acc*, int64_t, const Layout&, int64_t, int64_t);
  Rotate rotate;
  Grad grad;
};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SK_X86 1
template <typename T, typename Acc>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma,f16c"))) void rotate_avx512(
    const T* x, const Acc* rot, int64_t n_rot, T* out, const Layout& s, int64_t begin, int64_t end) {
  rotate_items<T, Acc, 64>(x, rot, n_rot, out, s, begin, end);
}
template <typename T, typename Acc>
__attribute__((target("avx2,fma,f16c"))) void rotate_avx2(const T* x, const Acc* rot, int64_t n_rot, T* out,
                                                           const Layout& s, int64_t begin, int64_t end) {
  rotate_items<T, Acc, 32>(x, rot, n_rot, out, s, begin, end);
}
template <typename T, typename Acc>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma,f16c"))) void grad_avx512(
    const T* x, const T* g, Acc* partial, int64_t chunk_len, const Layout& s, int64_t begin, int64_t end) {
  grad_items<T, Acc, 64>(x, g, partial, chunk_len, s, begin, end);
}
template <typename T, typename Acc>
__attribute__((target("avx2,fma,f16c"))) void grad_avx2(const T* x, const T* g, Acc* partial, int64_t chunk_len,
                                                         const Layout& s, int64_t begin, int64_t end) {
  grad_items<T, Acc, 32>(x, g, partial, chunk_len, s, begin, end);
}
#endif

template <typename T, typename Acc>
void rotate_baseline(const T* x, const Acc* rot, int64_t n_rot, T* out, const Layout& s, int64_t begin, int64_t end) {
  rotate_items<T, Acc, 16>(x, rot, n_rot, out, s, begin, end);
}
template <typename T, typename Acc>
void grad_baseline(const T* x, const T* g, Acc* partial, int64_t chunk_len, const Layout& s, int64_t begin,
                   int64_t end) {
  grad_items<T, Acc, 16>(x, g, partial, chunk_len, s, begin, end);
}

template <typename T, typename Acc>
Entry<T, Acc> select_entry() {
#ifdef SK_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    return {rotate_avx512<T, Acc>, grad_avx512<T, Acc>};
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return {rotate_avx2<T, Acc>, grad_avx2<T, Acc>};
#endif
  return {rotate_baseline<T, Acc>, grad_baseline<T, Acc>};
}

template <typename T, typename Acc>
const Entry<T, Acc>& entry() {
  static const Entry<T, Acc> chosen = select_entry<T, Acc>();
  return chosen;
}

// Tokens per tile: the float A and C tiles of one item stay within ~32 KiB (L1),
// in multiples of 48 so that the row tiles of every micro-kernel shape divide them.
int64_t tile_tokens(int64_t b, int64_t bp) { return 48 * std::max<int64_t>(1, 8192 / (b + bp) / 48); }

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_blocks(const at::Tensor& x, int64_t b, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (tokens, features), got ", x.sizes());
  TORCH_CHECK(b >= 1 && x.size(1) % b == 0, op, ": block size ", b, " does not divide ", x.size(1), " features");
}

}  // namespace

at::Tensor oft_rotate_cpu(const at::Tensor& x_in, const at::Tensor& rot_in, bool transpose) {
  TORCH_CHECK(rot_in.dim() == 3 && rot_in.size(1) == rot_in.size(2), "oft_rotate: rotation blocks must be (n, b, b)");
  const int64_t b = rot_in.size(1);
  check_blocks(x_in, b, "oft_rotate");
  const int64_t blocks = x_in.size(1) / b, n_rot = rot_in.size(0);
  TORCH_CHECK(n_rot == 1 || n_rot == blocks, "oft_rotate: ", n_rot, " rotation blocks for ", blocks, " blocks");
  const auto x = x_in.contiguous();
  auto out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const int64_t bp = (b + kPadTo - 1) / kPadTo * kPadTo;
  const Layout s{x.size(0), blocks, b, bp, tile_tokens(b, bp)};
  // M_j = R_j or R_j^T, zero-padded to bp columns so every SIMD load of a row is whole.
  const auto acc = acc_type(x.scalar_type());
  auto rot = at::zeros({n_rot, b, bp}, x.options().dtype(acc));
  rot.narrow(2, 0, b).copy_(transpose ? rot_in.transpose(1, 2) : rot_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "oft_rotate_cpu", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto kernel = entry<scalar_t, Acc>().rotate;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const Acc* rp = rot.const_data_ptr<Acc>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, blocks * s.tiles(), 1, [&](int64_t begin, int64_t end) {
      kernel(xp, rp, n_rot, op, s, begin, end);
    });
  });
  return out;
}

at::Tensor oft_rotate_grad_cpu(const at::Tensor& x_in, const at::Tensor& g_in, int64_t b, bool shared) {
  check_blocks(x_in, b, "oft_rotate_grad");
  TORCH_CHECK(g_in.sizes() == x_in.sizes(), "oft_rotate_grad: x ", x_in.sizes(), " and g ", g_in.sizes(), " differ");
  const auto x = x_in.contiguous();
  const auto g = g_in.to(x.scalar_type()).contiguous();
  const int64_t blocks = x.size(1) / b, tokens = x.size(0);
  const int64_t bp = (b + kPadTo - 1) / kPadTo * kPadTo;
  const Layout s{tokens, blocks, b, bp, tile_tokens(b, bp)};
  // One chunk of whole tiles per thread, each with its own partial sum.
  const int64_t chunks = std::clamp<int64_t>(at::get_num_threads(), 1, std::max<int64_t>(1, s.tiles()));
  const int64_t chunk_len = (s.tiles() + chunks - 1) / chunks * s.tile;
  const auto acc = acc_type(x.scalar_type());
  auto partial = at::zeros({chunks, blocks, b, bp}, x.options().dtype(acc));
  if (tokens > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "oft_rotate_grad_cpu", [&] {
      using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const auto kernel = entry<scalar_t, Acc>().grad;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      Acc* pp = partial.mutable_data_ptr<Acc>();
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        kernel(xp, gp, pp, chunk_len, s, begin, end);
      });
    });
  }
  auto grad = partial.sum(0).narrow(2, 0, b);
  return (shared ? grad.sum(0, true) : grad).contiguous();
}

TORCH_LIBRARY_IMPL(spectral_kernels, CPU, m) {
  m.impl("oft_rotate", &oft_rotate_cpu);
  m.impl("oft_rotate_grad", &oft_rotate_grad_cpu);
}

}  // namespace spectral_kernels
