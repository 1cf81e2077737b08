// Helpers shared by the CPU kernels: SIMD and per-thread scratch. Hot loops are compiled for several
// instruction sets and the widest one the CPU supports is chosen when the library
// loads (no -march at build time): SK_CPU_CLONES for GCC's target_clones, and
// SK_INLINE for everything such a function calls, so that it is compiled for the
// clone's ISA. Vectors are GCC/Clang vector extensions, whose code follows the ISA of
// the function they are inlined into. The clones are the x86-64 levels v4 (AVX-512)
// and v3 (AVX2 with FMA): a plain "avx2" clone leaves FMA off, so every
// multiply-add compiled to a multiply and an add.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#define SK_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SK_CPU_CLONES
#endif

namespace spectral_kernels {

template <typename V>
using Lane = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V>()[0])>>;

// v = p[0 .. lanes), converted to the vector's lane type (unaligned; an out-parameter,
// so that no vector type crosses a call of the baseline ISA).
template <typename V, typename T>
SK_INLINE void load_vec(V& v, const T* p) {
  if constexpr (std::is_same_v<T, Lane<V>>) {
    std::memcpy(&v, p, sizeof(V));
  } else {
    Lane<V> lanes[sizeof(V) / sizeof(Lane<V>)];
    for (size_t l = 0; l < sizeof(V) / sizeof(Lane<V>); ++l) lanes[l] = static_cast<Lane<V>>(p[l]);
    std::memcpy(&v, lanes, sizeof(V));
  }
}

// p[0 .. lanes) = v, converted to T.
template <typename V, typename T>
SK_INLINE void store_vec(T* p, const V& v) {
  if constexpr (std::is_same_v<T, Lane<V>>) {
    std::memcpy(p, &v, sizeof(V));
  } else {
    Lane<V> lanes[sizeof(V) / sizeof(Lane<V>)];
    std::memcpy(lanes, &v, sizeof(V));
    for (size_t l = 0; l < sizeof(V) / sizeof(Lane<V>); ++l) p[l] = static_cast<T>(lanes[l]);
  }
}

// Per-thread scratch (slot 0-2, each a buffer of at least n Acc), kept between calls:
// allocated per call, buffers of this size are mapped and page-faulted afresh each
// time (~400 faults per training step of a 1024 x 1024 OFT layer). Callers must not
// nest uses of one slot.
template <typename Acc>
Acc* scratch(int slot, int64_t n) {
  thread_local std::vector<Acc> buffers[3];
  auto& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

}  // namespace spectral_kernels
