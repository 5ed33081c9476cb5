// CPU (OpenMP) kernels of the fused tabulated-embedding contraction (see tabulate.h).
#include "tabulate.h"

#include <algorithm>

namespace dpmd {

template <typename T>
void tabulate_fusion_cpu(const T* table, const TableGrid<T>& grid, const T* rows, const int64_t* offsets,
                         int64_t ncent, int64_t m, T* out) {
#pragma omp parallel for schedule(dynamic, 8)
  for (int64_t c = 0; c < ncent; ++c) {
    T* o = out + c * 4 * m;
    std::fill(o, o + 4 * m, T(0));
    for (int64_t e = offsets[c]; e < offsets[c + 1]; ++e) {
      const T* r = rows + e * 4;
      int64_t interval;
      T t;
      table_locate(grid, r[0], interval, t);
      const T* coef = table + interval * 6 * m;
      const T r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
#pragma omp simd
      for (int64_t k = 0; k < m; ++k) {
        const T g = table_value(coef, m, k, t);
        o[k] += r0 * g;
        o[m + k] += r1 * g;
        o[2 * m + k] += r2 * g;
        o[3 * m + k] += r3 * g;
      }
    }
  }
}

template <typename T>
void tabulate_fusion_backward_cpu(const T* table, const TableGrid<T>& grid, const T* rows, const int64_t* center,
                                  int64_t n, const T* grad_out, int64_t m, T* grad_rows) {
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < n; ++e) {
    const T* r = rows + e * 4;
    const T* go = grad_out + center[e] * 4 * m;
    int64_t interval;
    T t;
    table_locate(grid, r[0], interval, t);
    const T* coef = table + interval * 6 * m;
    T d0 = 0, d1 = 0, d2 = 0, d3 = 0, dx = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3, dx)
    for (int64_t k = 0; k < m; ++k) {
      T g, dg;
      table_value_deriv(coef, m, k, t, g, dg);
      const T a0 = go[k], a1 = go[m + k], a2 = go[2 * m + k], a3 = go[3 * m + k];
      d0 += a0 * g;
      d1 += a1 * g;
      d2 += a2 * g;
      d3 += a3 * g;
      dx += (a0 * r[0] + a1 * r[1] + a2 * r[2] + a3 * r[3]) * dg;
    }
    T* gr = grad_rows + e * 4;
    gr[0] = d0 + dx;
    gr[1] = d1;
    gr[2] = d2;
    gr[3] = d3;
  }
}

template void tabulate_fusion_cpu<float>(const float*, const TableGrid<float>&, const float*, const int64_t*,
                                         int64_t, int64_t, float*);
template void tabulate_fusion_cpu<double>(const double*, const TableGrid<double>&, const double*, const int64_t*,
                                          int64_t, int64_t, double*);
template void tabulate_fusion_backward_cpu<float>(const float*, const TableGrid<float>&, const float*,
                                                  const int64_t*, int64_t, const float*, int64_t, float*);
template void tabulate_fusion_backward_cpu<double>(const double*, const TableGrid<double>&, const double*,
                                                   const int64_t*, int64_t, const double*, int64_t, double*);

}  // namespace dpmd
