// Index folding shared by the CPU and CUDA FourierFT kernels.
//
// A real signal of length n is stored as its rfft half spectrum h[0..n/2]. Its
// "plus" transform X^[g] = sum_q x[q] exp(+2 pi i g q / n) at any bin g in [0, n)
// is conj(h[g]) for 2g <= n and h[n - g] otherwise.
// Adding w at bin b of a spectrum and keeping it Hermitian (so that a C2R
// transform returns Re of the complex one) adds w/2 at b and conj(w)/2 at -b;
// only the halves that land in [0, n/2] are stored.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SK_HOST_DEVICE inline
#endif

namespace spectral_kernels {

template <typename T>
SK_HOST_DEVICE void plus_transform_at(const T* half, int64_t g, int64_t n, T& re, T& im) {
  if (2 * g <= n) {
    re = half[2 * g];
    im = -half[2 * g + 1];
  } else {
    re = half[2 * (n - g)];
    im = half[2 * (n - g) + 1];
  }
}

// Bins of the stored half that receive w/2 (first) and conj(w)/2 (second); -1 when
// that half falls outside [0, n/2].
SK_HOST_DEVICE void hermitian_bins(int64_t b, int64_t n, int64_t& first, int64_t& second) {
  const int64_t mirror = (n - b) % n;
  first = (2 * b <= n) ? b : -1;
  second = (2 * mirror <= n) ? mirror : -1;
}

}  // namespace spectral_kernels
