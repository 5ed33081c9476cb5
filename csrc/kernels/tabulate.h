// Fused tabulated embedding x environment-matrix contraction of the compressed se_e2_a model.
//
//   forward:   out[c][a][k] = sum_{e in [offsets[c], offsets[c+1])} rows[e][a] * G_k(rows[e][0])
//   backward:  grad_rows[e][a] = sum_k grad_out[c][a][k] G_k(x_e)  (+ for a = 0:
//              sum_k (sum_b grad_out[c][b][k] rows[e][b]) G'_k(x_e)),  c = center[e]
// table (intervals, 6, m) for one embedding net (layout in tabulate_impl.h); rows (n, 4); edges sorted by
// centre, offsets (ncent + 1); out (ncent, 4, m).
#pragma once

#include <cstdint>

#include "tabulate_impl.h"

namespace dpmd {

template <typename T>
void tabulate_fusion_cpu(const T* table, const TableGrid<T>& grid, const T* rows, const int64_t* offsets,
                         int64_t ncent, int64_t m, T* out);

template <typename T>
void tabulate_fusion_backward_cpu(const T* table, const TableGrid<T>& grid, const T* rows, const int64_t* center,
                                  int64_t n, const T* grad_out, int64_t m, T* grad_rows);

#if defined(DPMD_WITH_CUDA)
template <typename T>
void tabulate_fusion_cuda(const T* table, const TableGrid<T>& grid, const T* rows, const int64_t* offsets,
                          int64_t ncent, int64_t m, T* out, void* stream);
template <typename T>
void tabulate_fusion_backward_cuda(const T* table, const TableGrid<T>& grid, const T* rows, const int64_t* center,
                                   int64_t n, const T* grad_out, int64_t m, T* grad_rows, void* stream);
#endif

}  // namespace dpmd
