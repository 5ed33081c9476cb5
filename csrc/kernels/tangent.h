// The elementwise part of one tanh layer of an embedding net evaluated with its tangent (value and
// derivative in the net's scalar input s; dpmd.model.network.linearized_embedding), fused into one pass.
//
// Layer (rows e, columns m of width w; x, x' the layer input and its tangent, of width w_in):
//   z = x W + b,  t = tanh(z),  z' = x' W,  t' = (1 - t^2) z'          (the matrix products stay in BLAS)
//   y = t idt + res(x),  y' = t' idt + res(x')                          res: none, x (w_in = w), or (x, x) (w = 2 w_in)
// Forward (t and z' given):  t', y, y'.
// Backward (gy, gy' given):  gt = gy idt,  gt' = gy' idt
//   gz' = (1 - t^2) gt',  gz = (1 - t^2) gt - 2 t t' gt'
//   g_bias = sum_e gz,  g_idt = sum_e (gy t + gy' t'),  gres = res^T gy, gres' = res^T gy'   (doubling only)
#pragma once

#include <cstdint>

namespace dpmd {

// residual: 0 none, 1 same width, 2 doubling.  idt may be null (scale 1).  y, yp null when neither a
// residual nor idt (then y = t, y' = t').  In place (forces only, nothing kept for a backward pass):
// tp = yp = zp and y = t.
template <typename T>
void tangent_forward_cpu(const T* t, const T* zp, const T* x, const T* xp, const T* idt, int64_t n, int64_t w,
                         int residual, T* tp, T* y, T* yp);

// g_idt null when idt is null; gres, gresp only for residual 2 (else null).  Column sums are reduced in a
// fixed order (deterministic for a given thread count).
template <typename T>
void tangent_backward_cpu(const T* gy, const T* gyp, const T* t, const T* tp, const T* idt, int64_t n, int64_t w,
                          int residual, T* gz, T* gzp, T* g_bias, T* g_idt, T* gres, T* gresp);

#if defined(DPMD_WITH_CUDA)
// The same passes on the device (tangent.cu), on `stream`.  The backward's column sums go through `scratch`,
// a device buffer of tangent_backward_cuda_scratch(n, w) entries (per-row-block partial sums, added in order).
template <typename T>
void tangent_forward_cuda(const T* t, const T* zp, const T* x, const T* xp, const T* idt, int64_t n, int64_t w,
                          int residual, T* tp, T* y, T* yp, void* stream);

int64_t tangent_backward_cuda_scratch(int64_t n, int64_t w);

template <typename T>
void tangent_backward_cuda(const T* gy, const T* gyp, const T* t, const T* tp, const T* idt, int64_t n, int64_t w,
                           int residual, T* gz, T* gzp, T* g_bias, T* g_idt, T* gres, T* gresp, T* scratch,
                           void* stream);
#endif

}  // namespace dpmd
