// CPU (OpenMP) kernels of the fused tabulated-embedding contraction (see tabulate.h).
#include "tabulate.h"

#include <algorithm>

#include "tabulate_cpu.h"

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
      table_contract_add(table + interval * 6 * m, m, t, r, o);
    }
  }
}

template <typename T>
void tabulate_fusion_backward_cpu(const T* table, const TableGrid<T>& grid, const T* rows, const int64_t* center,
                                  int64_t n, const T* grad_out, int64_t m, T* grad_rows) {
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < n; ++e) {
    const T* r = rows + e * 4;
    int64_t interval;
    T t;
    table_locate(grid, r[0], interval, t);
    table_contract_grad(table + interval * 6 * m, m, t, r, grad_out + center[e] * 4 * m, grad_rows + e * 4);
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
