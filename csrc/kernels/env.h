// Environment-matrix rows of se_e2_a and their derivative with respect to the edge vector.
//   row_e = (s, s x/r, s y/r, s z/r),  s = sw(r) / r,  (x, y, z) = edge vector, r = |edge|
//   deriv_e[m][k] = d row_e[m] / d edge_k   (E, 4, 3)
#pragma once

#include <cstdint>

namespace dpmd {

// rows (n, 4); deriv (n, 4, 3) or nullptr.
template <typename T>
void env_mat_cpu(const T* vec, int64_t n, T rmin, T rmax, T* rows, T* deriv);

// grad_vec[e][k] = sum_m grad_rows[e][m] deriv[e][m][k]
template <typename T>
void env_mat_backward_cpu(const T* grad_rows, const T* deriv, int64_t n, T* grad_vec);

#if defined(DPMD_WITH_CUDA)
template <typename T>
void env_mat_cuda(const T* vec, int64_t n, T rmin, T rmax, T* rows, T* deriv, void* stream);
template <typename T>
void env_mat_backward_cuda(const T* grad_rows, const T* deriv, int64_t n, T* grad_vec, void* stream);
#endif

}  // namespace dpmd
