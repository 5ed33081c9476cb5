#include "tangent.h"

#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace dpmd {

template <typename T>
void tangent_forward_cpu(const T* t, const T* zp, const T* x, const T* xp, const T* idt, int64_t n, int64_t w,
                         int residual, T* tp, T* y, T* yp) {
  const int64_t w_in = residual == 2 ? w / 2 : w;
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < n; ++e) {
    const T* te = t + e * w;
    const T* zpe = zp + e * w;
    T* tpe = tp + e * w;
#pragma omp simd
    for (int64_t m = 0; m < w; ++m) tpe[m] = (T(1) - te[m] * te[m]) * zpe[m];
    if (y == nullptr) continue;
    T* ye = y + e * w;
    T* ype = yp + e * w;
    if (idt != nullptr) {
#pragma omp simd
      for (int64_t m = 0; m < w; ++m) {
        ye[m] = te[m] * idt[m];
        ype[m] = tpe[m] * idt[m];
      }
    } else {
      if (ye != te) std::copy(te, te + w, ye);
      if (ype != tpe) std::copy(tpe, tpe + w, ype);
    }
    if (residual == 0) continue;
    const T* xe = x + e * w_in;
    const T* xpe = xp + e * w_in;
    for (int64_t h = 0; h < w; h += w_in) {
#pragma omp simd
      for (int64_t i = 0; i < w_in; ++i) {
        ye[h + i] += xe[i];
        ype[h + i] += xpe[i];
      }
    }
  }
}

template <typename T>
void tangent_backward_cpu(const T* gy, const T* gyp, const T* t, const T* tp, const T* idt, int64_t n, int64_t w,
                          int residual, T* gz, T* gzp, T* g_bias, T* g_idt, T* gres, T* gresp) {
  int nthreads = 1;
#ifdef _OPENMP
  nthreads = omp_get_max_threads();
#endif
  // per-thread column sums (bias, idt), added up in thread order afterwards
  std::vector<T> partial(static_cast<size_t>(nthreads) * 2 * w, T(0));
#pragma omp parallel num_threads(nthreads)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    T* sb = partial.data() + static_cast<size_t>(tid) * 2 * w;
    T* si = sb + w;
#pragma omp for schedule(static)
    for (int64_t e = 0; e < n; ++e) {
      const T* gye = gy + e * w;
      const T* gype = gyp + e * w;
      const T* te = t + e * w;
      const T* tpe = tp + e * w;
      T* gze = gz + e * w;
      T* gzpe = gzp + e * w;
#pragma omp simd
      for (int64_t m = 0; m < w; ++m) {
        const T s = idt != nullptr ? idt[m] : T(1);
        const T gt = gye[m] * s, gtp = gype[m] * s;
        const T u = T(1) - te[m] * te[m];
        gzpe[m] = u * gtp;
        gze[m] = u * gt - T(2) * te[m] * tpe[m] * gtp;
        sb[m] += gze[m];
      }
      if (g_idt != nullptr) {
#pragma omp simd
        for (int64_t m = 0; m < w; ++m) si[m] += gye[m] * te[m] + gype[m] * tpe[m];
      }
      if (residual == 2) {
        const int64_t h = w / 2;
#pragma omp simd
        for (int64_t i = 0; i < h; ++i) {
          gres[e * h + i] = gye[i] + gye[h + i];
          gresp[e * h + i] = gype[i] + gype[h + i];
        }
      }
    }
  }
  std::fill(g_bias, g_bias + w, T(0));
  if (g_idt != nullptr) std::fill(g_idt, g_idt + w, T(0));
  for (int k = 0; k < nthreads; ++k) {
    const T* sb = partial.data() + static_cast<size_t>(k) * 2 * w;
    for (int64_t m = 0; m < w; ++m) g_bias[m] += sb[m];
    if (g_idt != nullptr)
      for (int64_t m = 0; m < w; ++m) g_idt[m] += sb[w + m];
  }
}

#define DPMD_INSTANTIATE(T)                                                                                  \
  template void tangent_forward_cpu<T>(const T*, const T*, const T*, const T*, const T*, int64_t, int64_t,   \
                                       int, T*, T*, T*);                                                     \
  template void tangent_backward_cpu<T>(const T*, const T*, const T*, const T*, const T*, int64_t, int64_t,  \
                                        int, T*, T*, T*, T*, T*, T*);
DPMD_INSTANTIATE(float)
DPMD_INSTANTIATE(double)
#undef DPMD_INSTANTIATE

}  // namespace dpmd
