// Per-edge bodies of env.h, shared by the CPU (.cc) and CUDA (.cu) kernels.
#pragma once

#include <cmath>

#include "common.h"

namespace dpmd {

template <typename T>
DPMD_HOST_DEVICE void env_row(const T* v, T rmin, T rmax, T* row, T* deriv) {
  const T x = v[0], y = v[1], z = v[2];
  const T r = sqrt(x * x + y * y + z * z);
  const T inv_r = T(1) / r;
  T sw, dsw;
  quintic_switch(r, rmin, rmax, sw, dsw);
  const T s = sw * inv_r;
  const T t = s * inv_r;  // s / r
  const T u[3] = {x * inv_r, y * inv_r, z * inv_r};
  row[0] = s;
  row[1] = t * x;
  row[2] = t * y;
  row[3] = t * z;
  if (deriv == nullptr) return;
  const T ds_dr = dsw * inv_r - s * inv_r;      // d(sw / r)/dr
  const T dt_dr = ds_dr * inv_r - t * inv_r;    // d(s / r)/dr
  const T xyz[3] = {x, y, z};
  for (int k = 0; k < 3; ++k) deriv[k] = ds_dr * u[k];
  for (int m = 0; m < 3; ++m)
    for (int k = 0; k < 3; ++k) deriv[3 * (m + 1) + k] = dt_dr * u[k] * xyz[m] + (m == k ? t : T(0));
}

template <typename T>
DPMD_HOST_DEVICE void env_row_backward(const T* grad_row, const T* deriv, T* grad_vec) {
  for (int k = 0; k < 3; ++k) {
    T acc = T(0);
    for (int m = 0; m < 4; ++m) acc += grad_row[m] * deriv[3 * m + k];
    grad_vec[k] = acc;
  }
}

}  // namespace dpmd
