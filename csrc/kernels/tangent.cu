// CUDA versions of the fused tangent-layer passes (see tangent.h; the math of tangent.cc, entry by entry).
//   forward:  one thread per entry (e, m); reads t, z' before writing, so the in-place call (tp = yp = zp,
//             y = t) is safe
//   backward: blocks of 32 columns x 8 rows, each block striding over the rows: the entrywise gz, gz', gres,
//             gres' and the block's column sums, reduced in shared memory into one partial row per row block;
//             a second kernel adds the partial rows in order (deterministic, like the CPU's per-thread sums)
#include <cuda_runtime.h>

#include "tangent.h"

namespace dpmd {
namespace {

constexpr int kThreads = 256;
constexpr int kCols = 32;           // backward block: columns (threadIdx.x, coalesced along a row)
constexpr int kRows = 8;            //                 rows (threadIdx.y)
constexpr int64_t kRowsPerThread = 16;
constexpr int64_t kMaxRowBlocks = 4096;

inline unsigned blocks(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

template <typename T>
__global__ void tangent_forward_kernel(const T* t, const T* zp, const T* x, const T* xp, const T* idt, int64_t n,
                                       int64_t w, int64_t w_in, int residual, T* tp, T* y, T* yp) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n * w) return;
  const int64_t e = i / w, m = i % w;
  const T te = t[i];
  const T tpe = (T(1) - te * te) * zp[i];
  tp[i] = tpe;
  if (y == nullptr) return;
  T ye = te, ype = tpe;
  if (idt != nullptr) {
    ye = te * idt[m];
    ype = tpe * idt[m];
  }
  if (residual != 0) {  // same width: x[e][m]; doubling: x[e][m mod w_in] for both halves
    const int64_t j = e * w_in + m % w_in;
    ye += x[j];
    ype += xp[j];
  }
  y[i] = ye;
  yp[i] = ype;
}

template <typename T>
__global__ void tangent_backward_kernel(const T* gy, const T* gyp, const T* t, const T* tp, const T* idt, int64_t n,
                                        int64_t w, int residual, T* gz, T* gzp, T* gres, T* gresp, T* partial) {
  __shared__ T sb[kRows][kCols];
  __shared__ T si[kRows][kCols];
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  T acc_b = T(0), acc_i = T(0);
  if (m < w) {
    const T s = idt != nullptr ? idt[m] : T(1);
    const int64_t h = w / 2;
    for (int64_t e = static_cast<int64_t>(blockIdx.y) * kRows + threadIdx.y; e < n;
         e += static_cast<int64_t>(gridDim.y) * kRows) {
      const int64_t i = e * w + m;
      const T gye = gy[i], gype = gyp[i], te = t[i], tpe = tp[i];
      const T gt = gye * s, gtp = gype * s;
      const T u = T(1) - te * te;
      const T gze = u * gt - T(2) * te * tpe * gtp;
      gzp[i] = u * gtp;
      gz[i] = gze;
      acc_b += gze;
      if (idt != nullptr) acc_i += gye * te + gype * tpe;
      if (residual == 2 && m < h) {
        gres[e * h + m] = gye + gy[e * w + h + m];
        gresp[e * h + m] = gype + gyp[e * w + h + m];
      }
    }
  }
  sb[threadIdx.y][threadIdx.x] = acc_b;
  si[threadIdx.y][threadIdx.x] = acc_i;
  __syncthreads();
  if (threadIdx.y == 0 && m < w) {
    T b = T(0), c = T(0);
    for (int r = 0; r < kRows; ++r) {
      b += sb[r][threadIdx.x];
      c += si[r][threadIdx.x];
    }
    T* p = partial + static_cast<int64_t>(blockIdx.y) * 2 * w;
    p[m] = b;
    p[w + m] = c;
  }
}

// g_bias[m] = sum_b partial[b][m], g_idt[m] = sum_b partial[b][w + m], row blocks in order
template <typename T>
__global__ void column_sum_kernel(const T* partial, int64_t nblocks, int64_t w, T* g_bias, T* g_idt) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= 2 * w || (j >= w && g_idt == nullptr)) return;
  T acc = T(0);
  for (int64_t b = 0; b < nblocks; ++b) acc += partial[b * 2 * w + j];
  if (j < w)
    g_bias[j] = acc;
  else
    g_idt[j - w] = acc;
}

int64_t row_blocks(int64_t n) {
  const int64_t per_block = kRows * kRowsPerThread;
  const int64_t b = (n + per_block - 1) / per_block;
  return b < kMaxRowBlocks ? b : kMaxRowBlocks;
}

}  // namespace

template <typename T>
void tangent_forward_cuda(const T* t, const T* zp, const T* x, const T* xp, const T* idt, int64_t n, int64_t w,
                          int residual, T* tp, T* y, T* yp, void* stream) {
  if (n * w == 0) return;
  const int64_t w_in = residual == 2 ? w / 2 : w;
  tangent_forward_kernel<T><<<blocks(n * w), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      t, zp, x, xp, idt, n, w, w_in, residual, tp, y, yp);
}

int64_t tangent_backward_cuda_scratch(int64_t n, int64_t w) { return row_blocks(n) * 2 * w; }

template <typename T>
void tangent_backward_cuda(const T* gy, const T* gyp, const T* t, const T* tp, const T* idt, int64_t n, int64_t w,
                           int residual, T* gz, T* gzp, T* g_bias, T* g_idt, T* gres, T* gresp, T* scratch,
                           void* stream) {
  if (w == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t nb = row_blocks(n);
  if (nb > 0) {
    const dim3 grid(static_cast<unsigned>((w + kCols - 1) / kCols), static_cast<unsigned>(nb));
    tangent_backward_kernel<T><<<grid, dim3(kCols, kRows), 0, s>>>(gy, gyp, t, tp, idt, n, w, residual, gz, gzp,
                                                                   gres, gresp, scratch);
  }
  column_sum_kernel<T><<<blocks(2 * w), kThreads, 0, s>>>(scratch, nb, w, g_bias, g_idt);
}

#define DPMD_INSTANTIATE(T)                                                                                   \
  template void tangent_forward_cuda<T>(const T*, const T*, const T*, const T*, const T*, int64_t, int64_t,   \
                                        int, T*, T*, T*, void*);                                              \
  template void tangent_backward_cuda<T>(const T*, const T*, const T*, const T*, const T*, int64_t, int64_t,  \
                                         int, T*, T*, T*, T*, T*, T*, T*, void*);
DPMD_INSTANTIATE(float)
DPMD_INSTANTIATE(double)
#undef DPMD_INSTANTIATE

}  // namespace dpmd
