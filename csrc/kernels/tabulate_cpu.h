// Per-edge loops of the tabulated embedding x contraction, vectorised over the M channels, shared by the CPU
// kernels tabulate.cc (op by op) and descriptor.cc (the fused descriptor).  Not for CUDA (see tabulate.cu).
#pragma once

#include <cstdint>

#include "tabulate_impl.h"

namespace dpmd {

// out[a][k] += row[a] * G_k(x), G from the coefficients of x's interval (offset t).
template <typename T>
inline void table_contract_add(const T* coef, int64_t m, T t, const T* row, T* out) {
  const T r0 = row[0], r1 = row[1], r2 = row[2], r3 = row[3];
#pragma omp simd
  for (int64_t k = 0; k < m; ++k) {
    const T g = table_value(coef, m, k, t);
    out[k] += r0 * g;
    out[m + k] += r1 * g;
    out[2 * m + k] += r2 * g;
    out[3 * m + k] += r3 * g;
  }
}

// d(sum_{a,k} grad_out[a][k] row[a] G_k(row[0])) / d row, into grad_row[4] (column 0 includes dG/dx).
template <typename T>
inline void table_contract_grad(const T* coef, int64_t m, T t, const T* row, const T* grad_out, T* grad_row) {
  const T r0 = row[0], r1 = row[1], r2 = row[2], r3 = row[3];
  T d0 = 0, d1 = 0, d2 = 0, d3 = 0, dx = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3, dx)
  for (int64_t k = 0; k < m; ++k) {
    T g, dg;
    table_value_deriv(coef, m, k, t, g, dg);
    const T a0 = grad_out[k], a1 = grad_out[m + k], a2 = grad_out[2 * m + k], a3 = grad_out[3 * m + k];
    d0 += a0 * g;
    d1 += a1 * g;
    d2 += a2 * g;
    d3 += a3 * g;
    dx += (a0 * r0 + a1 * r1 + a2 * r2 + a3 * r3) * dg;
  }
  grad_row[0] = d0 + dx;
  grad_row[1] = d1;
  grad_row[2] = d2;
  grad_row[3] = d3;
}

}  // namespace dpmd
