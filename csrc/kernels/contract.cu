// CUDA contraction: out is zeroed, then each thread owns one (edge, m) and adds its K products with
// atomicAdd (a centre has ~100 edges, so contention is low; no sorting needed).  Backward has no conflicts:
// its two halves are the edge_expand / edge_project kernels (one thread per output entry, the same sums
// in the same order as the CPU's expand_edge / project_edge).
#include <cuda_runtime.h>

#include "contract.h"

namespace dpmd {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void zero_kernel(T* out, int64_t size) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < size) out[i] = T(0);
}

template <typename T>
__global__ void contract_kernel(const T* rows, const T* emb, const int64_t* center, int64_t n, int64_t K, int64_t M,
                                T* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n * M) return;
  const int64_t e = i / M, m = i % M;
  const T g = emb[i];
  T* o = out + center[e] * K * M + m;
  for (int64_t k = 0; k < K; ++k) atomicAdd(o + k * M, rows[e * K + k] * g);
}

// expand: out[e][m] = sum_k a[e][k] tm[c_e][k][m], one thread per (edge, m)
template <typename T>
__global__ void expand_kernel(const T* a, const T* tm, const int64_t* center, int64_t n, int64_t K, int64_t M,
                              T* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n * M) return;
  const int64_t e = i / M, m = i % M;
  const T* t = tm + center[e] * K * M + m;
  T acc = T(0);
  for (int64_t k = 0; k < K; ++k) acc += a[e * K + k] * t[k * M];
  out[i] = acc;
}

// project: out[e][k] = sum_m tm[c_e][k][m] b[e][m], one thread per (edge, k), a loop over m
template <typename T>
__global__ void project_kernel(const T* b, const T* tm, const int64_t* center, int64_t n, int64_t K, int64_t M,
                               T* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n * K) return;
  const int64_t e = i / K, k = i % K;
  const T* t = tm + (center[e] * K + k) * M;
  const T* g = b + e * M;
  T acc = T(0);
  for (int64_t m = 0; m < M; ++m) acc += t[m] * g[m];
  out[i] = acc;
}

inline unsigned blocks(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

template <typename T>
void contract_cuda(const T* rows, const T* emb, const int64_t* center, int64_t n, int64_t ncent, int64_t K,
                   int64_t M, T* out, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (ncent * K * M > 0) zero_kernel<T><<<blocks(ncent * K * M), kThreads, 0, s>>>(out, ncent * K * M);
  if (n * M > 0) contract_kernel<T><<<blocks(n * M), kThreads, 0, s>>>(rows, emb, center, n, K, M, out);
}

template <typename T>
void expand_cuda(const T* a, const T* tm, const int64_t* center, int64_t n, int64_t K, int64_t M, T* out,
                 void* stream) {
  if (n * M > 0)
    expand_kernel<T><<<blocks(n * M), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a, tm, center, n, K, M, out);
}

template <typename T>
void project_cuda(const T* b, const T* tm, const int64_t* center, int64_t n, int64_t K, int64_t M, T* out,
                  void* stream) {
  if (n * K > 0)
    project_kernel<T><<<blocks(n * K), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(b, tm, center, n, K, M, out);
}

template <typename T>
void contract_backward_cuda(const T* grad, const T* rows, const T* emb, const int64_t* center, int64_t n,
                            int64_t K, int64_t M, T* d_rows, T* d_emb, void* stream) {
  expand_cuda<T>(rows, grad, center, n, K, M, d_emb, stream);
  project_cuda<T>(emb, grad, center, n, K, M, d_rows, stream);
}

#define DPMD_INSTANTIATE(T)                                                                                     \
  template void contract_cuda<T>(const T*, const T*, const int64_t*, int64_t, int64_t, int64_t, int64_t, T*,   \
                                 void*);                                                                        \
  template void contract_backward_cuda<T>(const T*, const T*, const T*, const int64_t*, int64_t, int64_t,      \
                                          int64_t, T*, T*, void*);                                     \
  template void expand_cuda<T>(const T*, const T*, const int64_t*, int64_t, int64_t, int64_t, T*, void*);      \
  template void project_cuda<T>(const T*, const T*, const int64_t*, int64_t, int64_t, int64_t, T*, void*);
DPMD_INSTANTIATE(float)
DPMD_INSTANTIATE(double)
#undef DPMD_INSTANTIATE

}  // namespace dpmd
