#include "attention.h"

#include <algorithm>
#include <cmath>

namespace dpmd {

namespace {
constexpr double kFloor = 1e-12;  // F.normalize's floor on |x|

template <typename T>
inline T dot_h(const T* a, const T* b, int64_t h) {
  T s = T(0);
#pragma omp simd reduction(+ : s)
  for (int64_t m = 0; m < h; ++m) s += a[m] * b[m];
  return s;
}
}  // namespace

template <typename T>
void attention_normalize_cpu(const T* qkv, int64_t rows, int64_t h, T* U, T* n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < 3; ++j) {
      const T* x = qkv + (i * 3 + j) * h;
      T* u = U + (j * rows + i) * h;
      const T norm = std::max(std::sqrt(dot_h(x, x, h)), T(kFloor));
      n[j * rows + i] = norm;
#pragma omp simd
      for (int64_t m = 0; m < h; ++m) u[m] = x[m] / norm;
    }
  }
}

template <typename T>
void attention_normalize_project_cpu(const T* U, const T* n, const T* x, bool x_split, int64_t rows, int64_t h,
                                     T scale, T* out, T* dot) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < 3; ++j) {
      const int64_t k = j * rows + i, split = k * h, row = (i * 3 + j) * h;
      const T* u = U + split;
      const T* xi = x + (x_split ? split : row);
      T* o = out + (x_split ? row : split);
      const T r = (j < 2 ? scale : T(1)) / n[k];
      const T s = dot_h(u, xi, h);
      dot[k] = s;
      const T c = n[k] > T(kFloor) ? s : T(0);
#pragma omp simd
      for (int64_t m = 0; m < h; ++m) o[m] = r * (xi[m] - c * u[m]);
    }
  }
}

template <typename T>
void attention_normalize_second_finish_cpu(const T* a_U, const T* g, const T* U, const T* dU, const T* n,
                                           const T* dot, const T* gdot, int64_t rows, int64_t h, T scale, T* a_x) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < 3; ++j) {
      const int64_t k = j * rows + i;
      const T* u = U + k * h;
      const T* du = dU + k * h;
      const T* au = a_U + k * h;
      const T* gi = g + (i * 3 + j) * h;
      T* out = a_x + (i * 3 + j) * h;
      const T kept = n[k] > T(kFloor) ? T(1) : T(0);
      const T mr = kept * (j < 2 ? scale : T(1)) / n[k];
      const T along = kept * (dot_h(u, au, h) + dot_h(gi, du, h) * mr - T(3) * mr * dot[k] * gdot[k]);
      const T cg = mr * dot[k], cd = mr * gdot[k], inv = T(1) / n[k];
#pragma omp simd
      for (int64_t m = 0; m < h; ++m) out[m] = (au[m] - cg * gi[m] - cd * du[m] - along * u[m]) * inv;
    }
  }
}

template <typename T>
void attention_softmax_backward_cpu(const T* dp, const T* e, const T* weight, const T* t, const T* gate, const T* c,
                                    int64_t rows, int64_t w, T* dweight, T* dgate, T* da) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t o = i * w;
    const T ci = c[i];
#pragma omp simd
    for (int64_t k = o; k < o + w; ++k) {
      const T y = (dp[k] * weight[k] - ci) * e[k];
      dweight[k] = dp[k] * e[k];
      dgate[k] = y * t[k];
      da[k] = y * gate[k];
    }
  }
}

template <typename T>
void attention_softmax_second_cpu(const T* a_da, const T* ggate, const T* gweight, const T* dp, const T* e,
                                  const T* weight, const T* t, const T* gate, const T* c, int64_t rows, int64_t w,
                                  T* a_t, T* a_e, T* a_dp, T* a_weight, T* a_c) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t o = i * w;
    const T ci = c[i];
    T sum = T(0);
#pragma omp simd reduction(+ : sum)
    for (int64_t k = o; k < o + w; ++k) {
      const T inner = dp[k] * weight[k] - ci;
      const T a_y = a_da[k] * gate[k] + ggate[k] * t[k];
      const T a_inner = a_y * e[k];
      a_t[k] = ggate[k] * inner * e[k];
      a_e[k] = a_y * inner + gweight[k] * dp[k];
      a_dp[k] = gweight[k] * e[k] + a_inner * weight[k];
      sum += a_inner;
    }
    a_c[i] = -sum;
    if (a_weight == nullptr) continue;
#pragma omp simd
    for (int64_t k = o; k < o + w; ++k) a_weight[k] = (a_da[k] * gate[k] + ggate[k] * t[k]) * e[k] * dp[k];
  }
}

template <typename T>
void attention_softmax_second_finish_cpu(T* a_p, const T* a_e, T* a_weight, T* a_t, const T* a_da, const T* dp,
                                         const T* e, const T* weight, const T* t, const T* gate, const T* c,
                                         const T* a_c, const T* den, const T* a_den, int64_t rows, int64_t w,
                                         T* a_gate) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t o = i * w;
    const T ci = c[i], f = a_c[i] / den[i], ad = a_den[i];
#pragma omp simd
    for (int64_t k = o; k < o + w; ++k) {
      const T ap = a_p[k] + dp[k] * f;
      const T a_z = (a_e[k] + ap * weight[k] + ad) * e[k];
      a_p[k] = ap;
      a_t[k] += a_z * gate[k];
    }
    if (a_weight == nullptr) continue;
#pragma omp simd
    for (int64_t k = o; k < o + w; ++k) {
      const T ap = a_p[k];
      const T a_z = (a_e[k] + ap * weight[k] + ad) * e[k];
      a_weight[k] += ap * e[k];
      a_gate[k] = a_z * t[k] + a_da[k] * (dp[k] * weight[k] - ci) * e[k];
    }
  }
}

#define DPMD_INSTANTIATE(T)                                                                                        \
  template void attention_normalize_cpu<T>(const T*, int64_t, int64_t, T*, T*);                                   \
  template void attention_normalize_project_cpu<T>(const T*, const T*, const T*, bool, int64_t, int64_t, T, T*,  \
                                                   T*);                                                           \
  template void attention_normalize_second_finish_cpu<T>(const T*, const T*, const T*, const T*, const T*,        \
                                                         const T*, const T*, int64_t, int64_t, T, T*);   \
  template void attention_softmax_backward_cpu<T>(const T*, const T*, const T*, const T*, const T*, const T*,    \
                                                  int64_t, int64_t, T*, T*, T*);                                  \
  template void attention_softmax_second_cpu<T>(const T*, const T*, const T*, const T*, const T*, const T*,      \
                                                const T*, const T*, const T*, int64_t, int64_t, T*, T*, T*, T*,   \
                                                T*);                                                              \
  template void attention_softmax_second_finish_cpu<T>(T*, const T*, T*, T*, const T*, const T*, const T*,       \
                                                       const T*, const T*, const T*, const T*, const T*,          \
                                                       const T*, const T*, int64_t, int64_t, T*);
DPMD_INSTANTIATE(float)
DPMD_INSTANTIATE(double)
#undef DPMD_INSTANTIATE

}  // namespace dpmd
