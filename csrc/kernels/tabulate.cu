// CUDA kernels of the fused tabulated-embedding contraction (see tabulate.h).
//   forward:  one block per centre, threads over the M channels, a serial loop over the centre's edges
//   backward: one warp per edge, lanes over the channels, warp-shuffle reductions of the five sums
#include <cuda_runtime.h>

#include "tabulate.h"

namespace dpmd {
namespace {

constexpr int kForwardThreads = 128;
constexpr int kWarpsPerBlock = 8;

template <typename T>
__global__ void tabulate_fusion_kernel(const T* __restrict__ table, TableGrid<T> grid, const T* __restrict__ rows,
                                       const int64_t* __restrict__ offsets, int64_t m, T* __restrict__ out) {
  const int64_t c = blockIdx.x;
  for (int64_t k = threadIdx.x; k < m; k += blockDim.x) {
    T o0 = 0, o1 = 0, o2 = 0, o3 = 0;
    for (int64_t e = offsets[c]; e < offsets[c + 1]; ++e) {
      const T* r = rows + e * 4;
      int64_t interval;
      T t;
      table_locate(grid, r[0], interval, t);
      const T g = table_value(table + interval * 6 * m, m, k, t);
      o0 += r[0] * g;
      o1 += r[1] * g;
      o2 += r[2] * g;
      o3 += r[3] * g;
    }
    T* o = out + c * 4 * m;
    o[k] = o0;
    o[m + k] = o1;
    o[2 * m + k] = o2;
    o[3 * m + k] = o3;
  }
}

template <typename T>
__device__ T warp_sum(T v) {
  for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
  return v;
}

template <typename T>
__global__ void tabulate_fusion_backward_kernel(const T* __restrict__ table, TableGrid<T> grid,
                                                const T* __restrict__ rows, const int64_t* __restrict__ center,
                                                int64_t n, const T* __restrict__ grad_out, int64_t m,
                                                T* __restrict__ grad_rows) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (e >= n) return;  // whole warps exit together
  const T* r = rows + e * 4;
  const T* go = grad_out + center[e] * 4 * m;
  int64_t interval;
  T t;
  table_locate(grid, r[0], interval, t);
  const T* coef = table + interval * 6 * m;
  T d0 = 0, d1 = 0, d2 = 0, d3 = 0, dx = 0;
  for (int64_t k = lane; k < m; k += 32) {
    T g, dg;
    table_value_deriv(coef, m, k, t, g, dg);
    const T a0 = go[k], a1 = go[m + k], a2 = go[2 * m + k], a3 = go[3 * m + k];
    d0 += a0 * g;
    d1 += a1 * g;
    d2 += a2 * g;
    d3 += a3 * g;
    dx += (a0 * r[0] + a1 * r[1] + a2 * r[2] + a3 * r[3]) * dg;
  }
  d0 = warp_sum(d0);
  d1 = warp_sum(d1);
  d2 = warp_sum(d2);
  d3 = warp_sum(d3);
  dx = warp_sum(dx);
  if (lane == 0) {
    T* gr = grad_rows + e * 4;
    gr[0] = d0 + dx;
    gr[1] = d1;
    gr[2] = d2;
    gr[3] = d3;
  }
}

}  // namespace

template <typename T>
void tabulate_fusion_cuda(const T* table, const TableGrid<T>& grid, const T* rows, const int64_t* offsets,
                          int64_t ncent, int64_t m, T* out, void* stream) {
  if (ncent == 0) return;
  tabulate_fusion_kernel<T><<<static_cast<unsigned>(ncent), kForwardThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      table, grid, rows, offsets, m, out);
}

template <typename T>
void tabulate_fusion_backward_cuda(const T* table, const TableGrid<T>& grid, const T* rows, const int64_t* center,
                                   int64_t n, const T* grad_out, int64_t m, T* grad_rows, void* stream) {
  if (n == 0) return;
  const unsigned blocks = static_cast<unsigned>((n + kWarpsPerBlock - 1) / kWarpsPerBlock);
  tabulate_fusion_backward_kernel<T><<<blocks, kWarpsPerBlock * 32, 0, static_cast<cudaStream_t>(stream)>>>(
      table, grid, rows, center, n, grad_out, m, grad_rows);
}

template void tabulate_fusion_cuda<float>(const float*, const TableGrid<float>&, const float*, const int64_t*,
                                          int64_t, int64_t, float*, void*);
template void tabulate_fusion_cuda<double>(const double*, const TableGrid<double>&, const double*, const int64_t*,
                                           int64_t, int64_t, double*, void*);
template void tabulate_fusion_backward_cuda<float>(const float*, const TableGrid<float>&, const float*,
                                                   const int64_t*, int64_t, const float*, int64_t, float*, void*);
template void tabulate_fusion_backward_cuda<double>(const double*, const TableGrid<double>&, const double*,
                                                    const int64_t*, int64_t, const double*, int64_t, double*, void*);

}  // namespace dpmd
