// Shared definitions of dpmd's framework-free kernels (no PyTorch headers: plain C++ and CUDA).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DPMD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DPMD_HOST_DEVICE inline
#endif

namespace dpmd {

// DeePMD's quintic switch: sw = 1 below rmin, 0 above rmax, C2 in between (u = (r - rmin) / (rmax - rmin)):
// sw = u^3 (-6 u^2 + 15 u - 10) + 1, evaluated as (1 - u)^3 (1 + 3 u + 6 u^2) (and dsw/du = -30 u^2 (1 - u)^2):
// full relative accuracy near rmax, where the expanded form cancels.  Returns sw and dsw/dr.
template <typename T>
DPMD_HOST_DEVICE void quintic_switch(T r, T rmin, T rmax, T& sw, T& dsw) {
  T u = (r - rmin) / (rmax - rmin);
  if (u <= T(0)) {
    sw = T(1);
    dsw = T(0);
  } else if (u >= T(1)) {
    sw = T(0);
    dsw = T(0);
  } else {
    T v = T(1) - u;
    sw = v * v * v * (T(1) + T(3) * u + T(6) * u * u);
    dsw = T(-30) * u * u * v * v / (rmax - rmin);
  }
}

}  // namespace dpmd
