// Per-edge pieces of the tabulated embedding shared by the CPU and CUDA kernels (tabulate.cc, tabulate.cu).
//
// A compressed se_e2_a embedding net is a table of quintic polynomials in x = (s - mean) / std:
// interval i covers [node_i, node_i+1) and holds 6 x M coefficients (power-major), G_k(x) = sum_p c[p][k] t^p
// with t = x - node_i.  The grid is `n_fine` intervals of `step` from `lower` to `upper`, then `n_coarse`
// intervals of `step_coarse` (the extrapolated range).  Range checks are the caller's job (the model raises
// an error for x outside the grid); here x is clamped to the first/last interval.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace dpmd {

template <typename T>
struct TableGrid {
  T lower, upper, step, step_coarse;
  int64_t n_fine, n_coarse;
};

// Interval index of x and the offset t = x - node.
template <typename T>
DPMD_HOST_DEVICE void table_locate(const TableGrid<T>& g, T x, int64_t& interval, T& t) {
  if (x < g.upper) {
    T k = floor((x - g.lower) / g.step);
    k = k < T(0) ? T(0) : (k > T(g.n_fine - 1) ? T(g.n_fine - 1) : k);
    interval = static_cast<int64_t>(k);
    t = x - (g.lower + k * g.step);
  } else {
    T k = floor((x - g.upper) / g.step_coarse);
    k = k < T(0) ? T(0) : (k > T(g.n_coarse - 1) ? T(g.n_coarse - 1) : k);
    interval = g.n_fine + static_cast<int64_t>(k);
    t = x - (g.upper + k * g.step_coarse);
  }
}

// Value of channel k of the polynomial whose coefficients start at coef (power p at coef[p * m + k]).
template <typename T>
DPMD_HOST_DEVICE T table_value(const T* coef, int64_t m, int64_t k, T t) {
  return ((((coef[5 * m + k] * t + coef[4 * m + k]) * t + coef[3 * m + k]) * t + coef[2 * m + k]) * t +
          coef[m + k]) * t + coef[k];
}

// Value and derivative d/dx of channel k.
template <typename T>
DPMD_HOST_DEVICE void table_value_deriv(const T* coef, int64_t m, int64_t k, T t, T& value, T& deriv) {
  const T c1 = coef[m + k], c2 = coef[2 * m + k], c3 = coef[3 * m + k], c4 = coef[4 * m + k],
          c5 = coef[5 * m + k];
  value = ((((c5 * t + c4) * t + c3) * t + c2) * t + c1) * t + coef[k];
  deriv = (((T(5) * c5 * t + T(4) * c4) * t + T(3) * c3) * t + T(2) * c2) * t + c1;
}

}  // namespace dpmd
