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

namespace {

// One edge's halves of the backward (also the edge_expand / edge_project ops), for centre matrix t (K, M):
//   out (M) = sum_k a[k] t[k]        and        out (K)[k] = t[k] . b
// two separate streaming passes vectorise better than one loop with a reduction and a store
template <typename T>
inline void expand_edge(const T* a, const T* t, int64_t K, int64_t M, T* out) {
  const T a0 = a[0];
#pragma omp simd
  for (int64_t m = 0; m < M; ++m) out[m] = a0 * t[m];
  for (int64_t k = 1; k < K; ++k) {
    const T ak = a[k];
    const T* tk = t + k * M;
#pragma omp simd
    for (int64_t m = 0; m < M; ++m) out[m] += ak * tk[m];
  }
}

template <typename T>
inline void project_edge(const T* b, const T* t, int64_t K, int64_t M, T* out) {
  for (int64_t k = 0; k < K; ++k) {
    const T* tk = t + k * M;
    T acc = T(0);
#pragma omp simd reduction(+ : acc)
    for (int64_t m = 0; m < M; ++m) acc += tk[m] * b[m];
    out[k] = acc;
  }
}

}  // namespace

template <typename T>
void contract_backward_cpu(const T* grad, const T* rows, const T* emb, const int64_t* center, int64_t n,
                           int64_t K, int64_t M, T* d_rows, T* d_emb) {
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < n; ++e) {
    const T* dT = grad + center[e] * K * M;
    expand_edge(rows + e * K, dT, K, M, d_emb + e * M);
    project_edge(emb + e * M, dT, K, M, d_rows + e * K);
  }
}

template <typename T>
void expand_cpu(const T* a, const T* tm, const int64_t* center, int64_t n, int64_t K, int64_t M, T* out) {
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < n; ++e) expand_edge(a + e * K, tm + center[e] * K * M, K, M, out + e * M);
}

template <typename T>
void project_cpu(const T* b, const T* tm, const int64_t* center, int64_t n, int64_t K, int64_t M, T* out) {
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < n; ++e) project_edge(b + e * M, tm + center[e] * K * M, K, M, out + e * K);
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
