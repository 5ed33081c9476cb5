#include <cuda_runtime.h>

#include "env.h"
#include "env_impl.h"

namespace dpmd {
namespace {

template <typename T>
__global__ void env_mat_kernel(const T* vec, int64_t n, T rmin, T rmax, T* rows, T* deriv) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e < n) env_row(vec + 3 * e, rmin, rmax, rows + 4 * e, deriv == nullptr ? nullptr : deriv + 12 * e);
}

template <typename T>
__global__ void env_mat_backward_kernel(const T* grad_rows, const T* deriv, int64_t n, T* grad_vec) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e < n) env_row_backward(grad_rows + 4 * e, deriv + 12 * e, grad_vec + 3 * e);
}

constexpr int kThreads = 256;
inline unsigned blocks(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

template <typename T>
void env_mat_cuda(const T* vec, int64_t n, T rmin, T rmax, T* rows, T* deriv, void* stream) {
  if (n == 0) return;
  env_mat_kernel<T><<<blocks(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(vec, n, rmin, rmax, rows, deriv);
}

template <typename T>
void env_mat_backward_cuda(const T* grad_rows, const T* deriv, int64_t n, T* grad_vec, void* stream) {
  if (n == 0) return;
  env_mat_backward_kernel<T><<<blocks(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(grad_rows, deriv, n,
                                                                                             grad_vec);
}

template void env_mat_cuda<float>(const float*, int64_t, float, float, float*, float*, void*);
template void env_mat_cuda<double>(const double*, int64_t, double, double, double*, double*, void*);
template void env_mat_backward_cuda<float>(const float*, const float*, int64_t, float*, void*);
template void env_mat_backward_cuda<double>(const double*, const double*, int64_t, double*, void*);

}  // namespace dpmd
