#include "env.h"

#include "env_impl.h"

namespace dpmd {

template <typename T>
void env_mat_cpu(const T* vec, int64_t n, T rmin, T rmax, T* rows, T* deriv) {
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < n; ++e)
    env_row(vec + 3 * e, rmin, rmax, rows + 4 * e, deriv == nullptr ? nullptr : deriv + 12 * e);
}

template <typename T>
void env_mat_backward_cpu(const T* grad_rows, const T* deriv, int64_t n, T* grad_vec) {
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < n; ++e) env_row_backward(grad_rows + 4 * e, deriv + 12 * e, grad_vec + 3 * e);
}

template void env_mat_cpu<float>(const float*, int64_t, float, float, float*, float*);
template void env_mat_cpu<double>(const double*, int64_t, double, double, double*, double*);
template void env_mat_backward_cpu<float>(const float*, const float*, int64_t, float*);
template void env_mat_backward_cpu<double>(const double*, const double*, int64_t, double*);

}  // namespace dpmd
