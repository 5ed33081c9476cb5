#include "contract.h"

#include <algorithm>

namespace dpmd {

bool segment_offsets(const int64_t* center, int64_t n, int64_t ncent, int64_t* seg) {
  int64_t c = 0;
  seg[0] = 0;
  for (int64_t e = 0; e < n; ++e) {
    const int64_t ce = center[e];
    if (ce < c || ce >= ncent) return false;
    while (c < ce) seg[++c] = e;
  }
  while (c < ncent) seg[++c] = n;
  return true;
}

template <typename T>
void contract_cpu(const T* rows, const T* emb, const int64_t* seg, int64_t ncent, int64_t K, int64_t M, T* out) {
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < ncent; ++c) {
    T* o = out + c * K * M;
    std::fill(o, o + K * M, T(0));
    for (int64_t e = seg[c]; e < seg[c + 1]; ++e) {
      const T* g = emb + e * M;
      for (int64_t k = 0; k < K; ++k) {
        const T r = rows[e * K + k];
        T* ok = o + k * M;
#pragma omp simd
        for (int64_t m = 0; m < M; ++m) ok[m] += r * g[m];
      }
    }
  }
}

template <typename T>
void contract_backward_cpu(const T* grad, const T* rows, const T* emb, const int64_t* center, int64_t n,
                           int64_t K, int64_t M, T* d_rows, T* d_emb) {
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < n; ++e) {
    const T* dT = grad + center[e] * K * M;
    const T* g = emb + e * M;
    const T* r = rows + e * K;
    T* dg = d_emb + e * M;
    // two separate streaming passes vectorise better than one loop with a reduction and a store
    {
      const T r0 = r[0];
#pragma omp simd
      for (int64_t m = 0; m < M; ++m) dg[m] = r0 * dT[m];
    }
    for (int64_t k = 1; k < K; ++k) {
      const T rk = r[k];
      const T* dTk = dT + k * M;
#pragma omp simd
      for (int64_t m = 0; m < M; ++m) dg[m] += rk * dTk[m];
    }
    for (int64_t k = 0; k < K; ++k) {
      const T* dTk = dT + k * M;
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t m = 0; m < M; ++m) acc += dTk[m] * g[m];
      d_rows[e * K + k] = acc;
    }
  }
}

template <typename T>
void expand_cpu(const T* a, const T* tm, const int64_t* center, int64_t n, int64_t K, int64_t M, T* out) {
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < n; ++e) {
    const T* t = tm + center[e] * K * M;
    const T* ae = a + e * K;
    T* o = out + e * M;
    const T a0 = ae[0];
#pragma omp simd
    for (int64_t m = 0; m < M; ++m) o[m] = a0 * t[m];
    for (int64_t k = 1; k < K; ++k) {
      const T ak = ae[k];
      const T* tk = t + k * M;
#pragma omp simd
      for (int64_t m = 0; m < M; ++m) o[m] += ak * tk[m];
    }
  }
}

template <typename T>
void project_cpu(const T* b, const T* tm, const int64_t* center, int64_t n, int64_t K, int64_t M, T* out) {
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < n; ++e) {
    const T* t = tm + center[e] * K * M;
    const T* be = b + e * M;
    for (int64_t k = 0; k < K; ++k) {
      const T* tk = t + k * M;
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t m = 0; m < M; ++m) acc += tk[m] * be[m];
      out[e * K + k] = acc;
    }
  }
}

#define DPMD_INSTANTIATE(T)                                                                                  \
  template void contract_cpu<T>(const T*, const T*, const int64_t*, int64_t, int64_t, int64_t, T*);        \
  template void contract_backward_cpu<T>(const T*, const T*, const T*, const int64_t*, int64_t, int64_t,    \
                                         int64_t, T*, T*);                                                 \
  template void expand_cpu<T>(const T*, const T*, const int64_t*, int64_t, int64_t, int64_t, T*);           \
  template void project_cpu<T>(const T*, const T*, const int64_t*, int64_t, int64_t, int64_t, T*);
DPMD_INSTANTIATE(float)
DPMD_INSTANTIATE(double)
#undef DPMD_INSTANTIATE

}  // namespace dpmd
