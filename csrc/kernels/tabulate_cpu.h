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
// dG/dx = c1 + 2t c2 + 3t^2 c3 + 4t^3 c4 + 5t^4 c5 with the powers taken once per edge, and the dG/dx term
// summed per row (sum_k grad_out[a][k] dG_k, then times row[a]): 17 vector operations per channel block
// instead of 23.
template <typename T>
inline void table_contract_grad(const T* coef, int64_t m, T t, const T* row, const T* grad_out, T* grad_row) {
  const T q2 = T(2) * t, q3 = T(3) * t * t, q4 = T(4) * t * t * t, q5 = T(5) * t * t * t * t;
  T d0 = 0, d1 = 0, d2 = 0, d3 = 0, s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3, s0, s1, s2, s3)
  for (int64_t k = 0; k < m; ++k) {
    const T g = table_value(coef, m, k, t);
    const T dg = coef[m + k] + q2 * coef[2 * m + k] + q3 * coef[3 * m + k] + q4 * coef[4 * m + k] +
                 q5 * coef[5 * m + k];
    const T a0 = grad_out[k], a1 = grad_out[m + k], a2 = grad_out[2 * m + k], a3 = grad_out[3 * m + k];
    d0 += a0 * g;
    d1 += a1 * g;
    d2 += a2 * g;
    d3 += a3 * g;
    s0 += a0 * dg;
    s1 += a1 * dg;
    s2 += a2 * dg;
    s3 += a3 * dg;
  }
  grad_row[0] = d0 + (s0 * row[0] + s1 * row[1] + s2 * row[2] + s3 * row[3]);
  grad_row[1] = d1;
  grad_row[2] = d2;
  grad_row[3] = d3;
}

}  // namespace dpmd
